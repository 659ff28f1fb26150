//! The store on its own: the rules of recording that the API cannot reach in time.

use std::sync::Arc;
use std::time::Duration;

use vignetim_webhooks::domain::apikey::Environment;
use vignetim_webhooks::domain::ids::{OrganizationId, WebhookId};
use vignetim_webhooks::domain::retry::RetrySchedule;
use vignetim_webhooks::store::sqlite::SqliteStore;
use vignetim_webhooks::store::{
    AttemptRecord, AttemptReport, ClaimRoom, ClaimedDelivery, DeliveryPolicy, DeliveryStatus,
    Handover, NewEvent, NewWebhook, Organization, Published, Store, Tenant, Unsent,
};

async fn store_with_one_delivery() -> (tempfile::TempDir, SqliteStore, Tenant, WebhookId) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = SqliteStore::open_url(&url).await.expect("open");
    let org = Organization {
        id: OrganizationId::new(),
        name: "t".into(),
        created_at: 0,
    };
    store.create_organization(&org).await.expect("org");
    let tenant = Tenant {
        organization_id: org.id,
        environment: Environment::Sandbox,
    };
    let webhook = add_webhook(&store, tenant, "https://example.com/hook", 0).await;
    let event = event("e1", 1);
    publish(&store, tenant, &event, None).await;
    (dir, store, tenant, webhook)
}

/// A webhook subscribed to everything.
async fn add_webhook(store: &SqliteStore, tenant: Tenant, url: &str, created_at: i64) -> WebhookId {
    let id = WebhookId::new();
    store
        .create_webhook(
            tenant,
            &NewWebhook {
                id,
                url: url.into(),
                events: vec!["*".into()],
                description: None,
                sealed_secret: vec![1, 2, 3],
                created_at,
            },
            10,
        )
        .await
        .expect("webhook");
    id
}

/// Claims up to 10 due deliveries, with room for 10 per webhook.
async fn claim(store: &SqliteStore, now: i64, lease_until: i64) -> Vec<ClaimedDelivery> {
    store
        .claim_due(now, 10, &ClaimRoom::empty(10), lease_until)
        .await
        .expect("claim")
}

/// Publishes `event`, with the engine's `handover` if one is given.
async fn publish(
    store: &SqliteStore,
    tenant: Tenant,
    event: &NewEvent,
    handover: Option<Arc<dyn Handover>>,
) -> Published {
    store
        .publish_event(tenant, event, handover)
        .await
        .expect("publish")
}

/// An `order.completed` event with an empty object as data.
fn event(id: impl Into<String>, created_at: i64) -> NewEvent {
    NewEvent {
        id: id.into(),
        event_type: "order.completed".into(),
        payload: bytes::Bytes::from_static(b"{}"),
        created_at,
    }
}

fn report(claimed: &ClaimedDelivery, succeeded: bool, lease_until: i64) -> AttemptReport {
    AttemptReport {
        delivery_id: claimed.delivery_id,
        row: claimed.row,
        webhook_id: claimed.webhook_id,
        attempt: AttemptRecord {
            attempted_at: 10,
            response_time_ms: 1,
            status_code: Some(if succeeded { 200 } else { 500 }),
            failure: (!succeeded).then(|| "http_status".to_owned()),
            response_body: None,
        },
        succeeded,
        gone: false,
        retry_after: None,
        jitter_draw: 0.5,
        lease_until,
        unsent: None,
    }
}

fn policy() -> DeliveryPolicy {
    DeliveryPolicy {
        schedule: RetrySchedule::parse("1s").expect("schedule"),
        disable_after: Duration::from_secs(3600),
    }
}

#[tokio::test]
async fn a_claimed_delivery_carries_what_was_published() {
    let (_dir, store, tenant, webhook) = store_with_one_delivery().await;
    let claimed = claim(&store, 5, 1_000).await;
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    // Every field the claim reads (by position: a column out of place shows here).
    assert_eq!(c.tenant, tenant);
    assert_eq!(c.webhook_id, webhook);
    assert_eq!(c.url, "https://example.com/hook");
    assert_eq!(c.event_id, "e1");
    assert_eq!(c.event_created_at, 1);
    assert_eq!(c.payload.as_ref(), b"{}");
    assert_eq!(c.attempts_made, 0);
    assert_eq!(c.secrets.current, vec![1, 2, 3]);
    assert!(c.secrets.previous.is_none());
    assert!(c.delivery_id.to_string().starts_with("dlv-"));
}

#[tokio::test]
async fn a_claim_of_several_events_and_webhooks_gives_each_delivery_its_own() {
    let (_dir, store, tenant, first) = store_with_one_delivery().await;
    let second = add_webhook(&store, tenant, "https://example.com/other", 0).await;
    publish(&store, tenant, &event("e2", 2), None).await;
    // e1 went to the first webhook only (the second came later); e2 to both.
    let mut claimed = claim(&store, 5, 1_000).await;
    claimed.sort_by_key(|c| (c.event_id.clone(), c.url.clone()));
    let seen: Vec<(&str, i64, &str, WebhookId)> = claimed
        .iter()
        .map(|c| {
            (
                c.event_id.as_str(),
                c.event_created_at,
                c.url.as_str(),
                c.webhook_id,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("e1", 1, "https://example.com/hook", first),
            ("e2", 2, "https://example.com/hook", first),
            ("e2", 2, "https://example.com/other", second),
        ]
    );
    let ids: std::collections::HashSet<_> = claimed.iter().map(|c| c.delivery_id).collect();
    assert_eq!(ids.len(), 3);
}

#[tokio::test]
async fn a_stale_report_is_logged_but_decides_nothing() {
    let (_dir, store, tenant, webhook) = store_with_one_delivery().await;
    let claimed = claim(&store, 5, 1_000).await;
    assert_eq!(claimed.len(), 1);
    let first = &claimed[0];
    // The lease runs from when the writer was had: 1,000 plus however long that took.
    assert!(
        (1_000..1_500).contains(&first.lease_until),
        "{}",
        first.lease_until
    );
    // The lease expires; the delivery is claimed again.
    let again = claim(&store, 2_000, 3_000).await;
    assert_eq!(again.len(), 1);
    // The first claim's late failure changes nothing...
    let statuses = store
        .record_attempts(&[report(first, false, first.lease_until)], &policy(), 2_500)
        .await
        .expect("record");
    assert_eq!(statuses, vec![DeliveryStatus::Pending]);
    let w = store
        .get_webhook(tenant, webhook)
        .await
        .expect("get")
        .expect("webhook");
    assert_eq!(w.consecutive_failures, 0);
    // ...and the current claim's success is recorded.
    let statuses = store
        .record_attempts(
            &[report(&again[0], true, again[0].lease_until)],
            &policy(),
            2_600,
        )
        .await
        .expect("record");
    assert_eq!(statuses, vec![DeliveryStatus::Succeeded]);
    let (view, attempts) = store
        .get_delivery(tenant, webhook, first.delivery_id)
        .await
        .expect("get")
        .expect("delivery");
    assert_eq!(view.status, DeliveryStatus::Succeeded);
    assert_eq!(attempts.len(), 2, "both attempts are in the log");
    assert_eq!(
        view.attempt_count, 1,
        "only the current claim's attempt counts"
    );
}

#[tokio::test]
async fn a_report_whose_row_key_holds_another_delivery_decides_only_its_own() {
    let (_dir, store, tenant, webhook) = store_with_one_delivery().await;
    publish(&store, tenant, &event("e2", 2), None).await;
    let claimed = claim(&store, 5, 1_000).await;
    assert_eq!(claimed.len(), 2);
    let (a, b) = (&claimed[0], &claimed[1]);
    assert_ne!(a.row, b.row);
    // Each report carries the other's row key, as after the rows were renumbered: the
    // success is still its own delivery's, and the failure too.
    let mut success = report(a, true, a.lease_until);
    success.row = b.row;
    let mut failure = report(b, false, b.lease_until);
    failure.row = a.row;
    let statuses = store
        .record_attempts(&[success, failure], &policy(), 10)
        .await
        .expect("record");
    assert_eq!(
        statuses,
        vec![DeliveryStatus::Succeeded, DeliveryStatus::Pending]
    );
    for (delivery, status) in [(a, DeliveryStatus::Succeeded), (b, DeliveryStatus::Pending)] {
        let (view, attempts) = store
            .get_delivery(tenant, webhook, delivery.delivery_id)
            .await
            .expect("get")
            .expect("delivery");
        assert_eq!(view.status, status, "{}", delivery.event_id);
        assert_eq!(view.attempt_count, 1);
        assert_eq!(attempts.len(), 1);
    }
}

/// Claims the one delivery, reports it unsent for `why` at `now`, and checks that it is
/// pending with no attempt logged or counted; returns where it stands.
async fn put_back_unsent(
    why: Unsent,
    now: i64,
) -> (
    tempfile::TempDir,
    SqliteStore,
    Tenant,
    WebhookId,
    vignetim_webhooks::store::DeliveryView,
) {
    let (dir, store, tenant, webhook) = store_with_one_delivery().await;
    let claimed = claim(&store, 5, 1_000).await;
    let mut r = report(&claimed[0], false, claimed[0].lease_until);
    r.unsent = Some(why);
    let statuses = store
        .record_attempts(&[r], &policy(), now)
        .await
        .expect("record");
    assert_eq!(statuses, vec![DeliveryStatus::Pending]);
    let (view, attempts) = store
        .get_delivery(tenant, webhook, claimed[0].delivery_id)
        .await
        .expect("get")
        .expect("delivery");
    assert!(attempts.is_empty(), "nothing was sent");
    assert_eq!(view.attempt_count, 0);
    (dir, store, tenant, webhook, view)
}

#[tokio::test]
async fn an_internal_error_puts_the_delivery_back_without_counting() {
    let (_dir, store, tenant, webhook, view) = put_back_unsent(Unsent::InternalError, 100).await;
    assert_eq!(view.next_attempt_at, Some(100 + 60_000));
    let w = store
        .get_webhook(tenant, webhook)
        .await
        .expect("get")
        .expect("webhook");
    assert_eq!(w.consecutive_failures, 0);
}

#[tokio::test]
async fn purge_removes_everything_past_the_retention_in_chunks() {
    let (_dir, store, tenant, webhook) = store_with_one_delivery().await;
    // 1,100 more events (more than two purge chunks), old; one new.
    let tasks: Vec<_> = (0..1_100)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let event = event(format!("old-{n}"), 100 + n);
                publish(&store, tenant, &event, None).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let new = event("new", 10_000);
    publish(&store, tenant, &new, None).await;
    assert_eq!(store.purge(5_000).await.expect("purge"), 1_101);
    let left = store
        .list_deliveries(tenant, webhook, None, None, 250)
        .await
        .expect("list")
        .expect("webhook");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].event_id, "new");
    assert_eq!(store.purge(5_000).await.expect("purge"), 0);
}

#[tokio::test]
async fn a_claim_gives_a_webhook_at_its_cap_nothing() {
    let (_dir, store, _tenant, webhook) = store_with_one_delivery().await;
    let mut room = ClaimRoom::empty(2);
    room.left.insert(webhook, 0);
    let claimed = store.claim_due(5, 10, &room, 1_000).await.expect("claim");
    assert!(claimed.is_empty(), "claimed {} past the cap", claimed.len());
    room.left.insert(webhook, 1);
    let claimed = store.claim_due(5, 10, &room, 1_000).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    // Claimed and leased: not claimed again while the lease holds.
    let again = store
        .claim_due(6, 10, &ClaimRoom::empty(2), 1_000)
        .await
        .expect("claim");
    assert!(again.is_empty());
}

#[tokio::test]
async fn a_delivery_that_waited_too_long_is_due_again_at_once_unsent() {
    let (_dir, store, _tenant, _webhook, view) = put_back_unsent(Unsent::WaitedTooLong, 400).await;
    assert_eq!(view.next_attempt_at, Some(400));
    // And it is claimed again at once.
    let again = claim(&store, 401, 2_000).await;
    assert_eq!(again.len(), 1);
}

#[tokio::test]
async fn due_rows_of_a_paused_webhook_never_take_the_places_of_others() {
    let (_dir, store, tenant, paused) = store_with_one_delivery().await;
    // 300 more due deliveries for the first webhook, ahead of a second webhook's one.
    for n in 0..300 {
        publish(&store, tenant, &event(format!("p{n}"), 2), None).await;
    }
    // All of them claimed, then the webhook paused while they are in flight, then their
    // leases run out: they are pending, due, and their webhook inactive.
    let claimed = store
        .claim_due(5, 256, &ClaimRoom::empty(1_000), 10)
        .await
        .expect("claim");
    let more = store
        .claim_due(6, 256, &ClaimRoom::empty(1_000), 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len() + more.len(), 301);
    let patch = vignetim_webhooks::store::WebhookPatch {
        resume_since: 0,
        url: None,
        events: None,
        description: None,
        active: Some(false),
        updated_at: 7,
    };
    store
        .update_webhook(tenant, paused, &patch)
        .await
        .expect("pause");
    let healthy = add_webhook(&store, tenant, "https://example.com/other", 8).await;
    publish(&store, tenant, &event("h1", 20), None).await;
    // Past the leases: the paused webhook's 301 rows come first in the due index.
    let next = store
        .claim_due(30, 10, &ClaimRoom::empty(16), 1_000)
        .await
        .expect("claim");
    assert_eq!(next.len(), 1, "the other webhook's delivery is claimed");
    assert_eq!(next[0].webhook_id, healthy);
}

/// Takes the deliveries of one webhook, as the engine does when it has room for them.
struct TakeOnly(WebhookId);

impl Handover for TakeOnly {
    fn take(&self, webhook: WebhookId) -> bool {
        webhook == self.0
    }
    fn lease_until(&self) -> i64 {
        1_000
    }
}

#[tokio::test]
async fn a_delivery_handed_over_at_publish_is_leased_and_not_claimed_until_its_lease_ends() {
    let (_dir, store, tenant, first) = store_with_one_delivery().await;
    let taken = add_webhook(&store, tenant, "https://example.com/taken", 0).await;
    // The first webhook's delivery of e1 is still due; e2's goes to both webhooks.
    let published = publish(
        &store,
        tenant,
        &event("e2", 2),
        Some(Arc::new(TakeOnly(taken))),
    )
    .await;
    assert_eq!(published.deliveries, 2);
    assert_eq!(published.handed.len(), 1);
    let handed = &published.handed[0];
    assert_eq!(handed.webhook_id, taken);
    assert_eq!(handed.url, "https://example.com/taken");
    assert_eq!(handed.secrets.current, vec![1, 2, 3]);
    assert_eq!(
        (handed.event_id.as_str(), handed.event_created_at),
        ("e2", 2)
    );
    assert_eq!(handed.payload.as_ref(), b"{}");
    assert_eq!((handed.attempts_made, handed.lease_until), (0, 1_000));

    // Claims see only the deliveries not handed over while the lease holds.
    let claimed = claim(&store, 5, 2_000).await;
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|c| c.webhook_id == first));
    // Its outcome is recorded like a claimed one's.
    let statuses = store
        .record_attempts(&[report(handed, true, 1_000)], &policy(), 20)
        .await
        .expect("record");
    assert_eq!(statuses, vec![DeliveryStatus::Succeeded]);

    // Had its attempt never reported, it is due again when the lease ends.
    let lost = publish(
        &store,
        tenant,
        &event("e3", 3),
        Some(Arc::new(TakeOnly(taken))),
    )
    .await;
    assert_eq!(lost.handed.len(), 1);
    let before = claim(&store, 999, 5_000).await;
    assert!(before.iter().all(|c| c.webhook_id == first));
    let after = claim(&store, 1_000, 5_000).await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].delivery_id, lost.handed[0].delivery_id);
}
