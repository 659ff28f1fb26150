//! The hot path of the SQLite store: publishing, claiming and recording, each as a few
//! set-based statements per batch rather than a few statements per delivery.
//!
//! Why: with SQLite every statement is a round trip to the connection's thread, and all
//! writes share one connection. The profile of the first version showed more than half
//! of the CPU in the kernel switching threads for those round trips. Here a batch of
//! publishes costs about four statements, a claim three, and a batch of successful
//! attempts three, whatever their size.

use std::collections::{HashMap, HashSet};

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::hold_pending;
use crate::domain::event_type::Subscription;
use crate::domain::ids::DeliveryId;
use crate::domain::retry::should_disable;
use crate::domain::time::EpochMillis;
use crate::store::{
    AttemptRecord, AttemptReport, ClaimedDelivery, DeliveryPolicy, DeliveryStatus, NewEvent,
    Published, SealedSecrets, StoreError, StoreResult, Tenant,
};

/// When a delivery could not be attempted through a fault of ours, it is tried again
/// after this long.
const INTERNAL_ERROR_RETRY_MS: i64 = 60_000;
/// Candidate queries per claim at most (see `claim`).
const MAX_CLAIM_ROUNDS: usize = 4;
/// Rows per multi-row statement (SQLite allows 32,766 bound values; 8 per row here).
const ROWS_PER_STATEMENT: usize = 1_000;
/// Publishes committed together at most.
const PUBLISH_BATCH: usize = 256;
/// How long a publish may wait for others to share its commit, under load.
const PUBLISH_LINGER: std::time::Duration = std::time::Duration::from_micros(500);

struct PublishJob {
    tenant: Tenant,
    event: NewEvent,
    reply: oneshot::Sender<StoreResult<Published>>,
}

/// Group commit for publishes: callers queue their event and wait; one task commits
/// whatever has queued up in one transaction and answers each caller after the commit.
#[derive(Clone)]
pub(super) struct Publisher {
    jobs: mpsc::Sender<PublishJob>,
}

impl Publisher {
    pub(super) fn spawn(writer: SqlitePool) -> Self {
        let (jobs, rx) = mpsc::channel(PUBLISH_BATCH * 4);
        tokio::spawn(run_publisher(writer, rx));
        Self { jobs }
    }
}

/// Queues one publish and waits for its commit.
pub(super) async fn publish(
    publisher: &Publisher,
    tenant: Tenant,
    event: NewEvent,
) -> StoreResult<Published> {
    let (reply, answer) = oneshot::channel();
    publisher
        .jobs
        .send(PublishJob {
            tenant,
            event,
            reply,
        })
        .await
        .map_err(|_| StoreError::Corrupt("the publisher has stopped".to_owned()))?;
    answer
        .await
        .map_err(|_| StoreError::Corrupt("the publisher dropped a publish".to_owned()))?
}

async fn run_publisher(writer: SqlitePool, mut rx: mpsc::Receiver<PublishJob>) {
    let mut jobs = Vec::with_capacity(PUBLISH_BATCH);
    let mut busy = false;
    while let Some(first) = rx.recv().await {
        // Linger briefly only when publishes are arriving together: a lone publish is
        // committed at once.
        let linger = if busy {
            PUBLISH_LINGER
        } else {
            std::time::Duration::ZERO
        };
        crate::batch::gather(&mut rx, first, &mut jobs, PUBLISH_BATCH, linger).await;
        busy = jobs.len() > 1;
        let requests: Vec<(Tenant, &NewEvent)> =
            jobs.iter().map(|j| (j.tenant, &j.event)).collect();
        match publish_committed(&writer, &requests).await {
            Ok(results) => {
                for (job, result) in jobs.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            // The group failed as a whole: try each alone, so one cannot sink the others
            // and each caller gets its own answer.
            Err(_) => {
                for job in jobs.drain(..) {
                    let result = publish_committed(&writer, &[(job.tenant, &job.event)])
                        .await
                        .and_then(|mut r| r.pop().unwrap_or(Err(StoreError::NotFound)));
                    let _ = job.reply.send(result);
                }
            }
        }
    }
}

async fn publish_committed(
    writer: &SqlitePool,
    requests: &[(Tenant, &NewEvent)],
) -> StoreResult<Vec<StoreResult<Published>>> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let results = publish_batch(&mut tx, requests).await?;
    tx.commit().await?;
    Ok(results)
}

/// One transaction's worth of publishes: events, then one delivery per subscribed
/// webhook (held for an inactive one). A caller id already published by the organization
/// returns the first result and queues nothing.
async fn publish_batch(
    conn: &mut SqliteConnection,
    requests: &[(Tenant, &NewEvent)],
) -> StoreResult<Vec<StoreResult<Published>>> {
    // Organizations that exist.
    let orgs: HashSet<String> = requests
        .iter()
        .map(|(t, _)| t.organization_id.to_string())
        .collect();
    let mut q = QueryBuilder::<Sqlite>::new("SELECT id FROM organizations WHERE id IN (");
    push_list(&mut q, &orgs, |org| org.clone());
    q.push(")");
    let existing: HashSet<String> = q
        .build_query_scalar::<String>()
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();

    // Events, skipping ids the tenant already has (and repeats within the batch).
    let mut seen: HashSet<(Tenant, &str)> = HashSet::new();
    let fresh: Vec<usize> = (0..requests.len())
        .filter(|&i| {
            let (tenant, event) = requests[i];
            existing.contains(&tenant.organization_id.to_string())
                && seen.insert((tenant, event.id.as_str()))
        })
        .collect();
    let mut seqs: HashMap<(String, String, String), i64> = HashMap::new();
    for chunk in fresh.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (id, organization_id, environment, type, payload, created_at) ",
        );
        q.push_values(chunk, |mut row, &i| {
            let (tenant, event) = requests[i];
            row.push_bind(event.id.clone())
                .push_bind(tenant.organization_id.to_string())
                .push_bind(tenant.environment.as_str())
                .push_bind(event.event_type.clone())
                .push_bind(event.payload.clone())
                .push_bind(event.created_at);
        });
        q.push(
            " ON CONFLICT (organization_id, environment, id) DO NOTHING \
             RETURNING seq, organization_id, environment, id",
        );
        for row in q.build().fetch_all(&mut *conn).await? {
            seqs.insert(
                (
                    row.try_get("organization_id")?,
                    row.try_get("environment")?,
                    row.try_get("id")?,
                ),
                row.try_get("seq")?,
            );
        }
    }

    // The tenants' webhooks, read once per batch.
    let mut webhooks: HashMap<Tenant, Vec<(String, Subscription, bool)>> = HashMap::new();
    let mut q = QueryBuilder::<Sqlite>::new(
        "SELECT organization_id, environment, id, events, active FROM webhooks \
         WHERE deleted_at IS NULL AND organization_id IN (",
    );
    push_list(&mut q, &existing, |org| org.clone());
    q.push(")");
    if !existing.is_empty() {
        for row in q.build().fetch_all(&mut *conn).await? {
            let (org, env, id, events): (String, String, String, String) = (
                row.try_get("organization_id")?,
                row.try_get("environment")?,
                row.try_get("id")?,
                row.try_get("events")?,
            );
            let corrupt = || StoreError::Corrupt(format!("webhook {id}"));
            let tenant = Tenant {
                organization_id: org.parse().map_err(|_| corrupt())?,
                environment: env.parse().map_err(|_| corrupt())?,
            };
            let names: Vec<String> = serde_json::from_str(&events).map_err(|_| corrupt())?;
            webhooks.entry(tenant).or_default().push((
                id,
                Subscription::from_stored(names),
                row.try_get("active")?,
            ));
        }
    }

    // Deliveries for the new events.
    struct NewDelivery<'a> {
        tenant: Tenant,
        webhook: &'a str,
        seq: i64,
        active: bool,
        at: EpochMillis,
    }
    let key = |tenant: &Tenant, event: &NewEvent| {
        (
            tenant.organization_id.to_string(),
            tenant.environment.as_str().to_owned(),
            event.id.clone(),
        )
    };
    let mut deliveries: Vec<NewDelivery> = Vec::new();
    let mut counts: HashMap<i64, u64> = HashMap::new();
    for &i in &fresh {
        let (tenant, event) = requests[i];
        let Some(&seq) = seqs.get(&key(&tenant, event)) else {
            continue; // published before this batch
        };
        for (webhook, subscription, active) in webhooks.get(&tenant).map_or(&[][..], Vec::as_slice)
        {
            if subscription.matches(&event.event_type) {
                deliveries.push(NewDelivery {
                    tenant,
                    webhook,
                    seq,
                    active: *active,
                    at: event.created_at,
                });
                *counts.entry(seq).or_default() += 1;
            }
        }
    }
    for chunk in deliveries.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO deliveries (id, organization_id, environment, webhook_id, event_seq, \
             status, attempt_count, next_attempt_at, created_at, updated_at) ",
        );
        q.push_values(chunk, |mut row, d| {
            row.push_bind(DeliveryId::new().to_string())
                .push_bind(d.tenant.organization_id.to_string())
                .push_bind(d.tenant.environment.as_str())
                .push_bind(d.webhook.to_owned())
                .push_bind(d.seq)
                .push_bind(if d.active { "pending" } else { "held" })
                .push_bind(0i64)
                .push_bind(d.active.then_some(d.at))
                .push_bind(d.at)
                .push_bind(d.at);
        });
        q.build().execute(&mut *conn).await?;
    }

    // Answers, in request order.
    let fresh: HashSet<usize> = fresh.into_iter().collect();
    let mut results = Vec::with_capacity(requests.len());
    for (i, (tenant, event)) in requests.iter().enumerate() {
        let org = tenant.organization_id.to_string();
        if !existing.contains(&org) {
            results.push(Err(StoreError::NotFound));
            continue;
        }
        let result = match seqs.get(&key(tenant, event)) {
            Some(seq) => Published {
                id: event.id.clone(),
                deliveries: counts.get(seq).copied().unwrap_or(0),
                // A repeat of an id within this batch is a duplicate of its first.
                duplicate: !fresh.contains(&i),
            },
            None => {
                let deliveries: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM deliveries d JOIN events e ON e.seq = d.event_seq \
                     WHERE e.organization_id = ? AND e.environment = ? AND e.id = ?",
                )
                .bind(&org)
                .bind(tenant.environment.as_str())
                .bind(&event.id)
                .fetch_one(&mut *conn)
                .await?;
                Published {
                    id: event.id.clone(),
                    deliveries: u64::try_from(deliveries).unwrap_or(0),
                    duplicate: true,
                }
            }
        };
        results.push(Ok(result));
    }
    Ok(results)
}

/// Appends `a, b, c` (bound values) for an `IN (…)` list; the caller closes it.
pub(super) fn push_list<T, V>(
    q: &mut QueryBuilder<Sqlite>,
    items: impl IntoIterator<Item = T>,
    bind: impl Fn(T) -> V,
) where
    V: for<'q> sqlx::Encode<'q, Sqlite> + sqlx::Type<Sqlite> + Send + 'static,
{
    let mut list = q.separated(", ");
    for item in items {
        list.push_bind(bind(item));
    }
}

/// Inserts attempt rows, one statement per chunk.
pub(super) async fn insert_attempts(
    conn: &mut SqliteConnection,
    attempts: &[(DeliveryId, &AttemptRecord)],
) -> StoreResult<()> {
    for chunk in attempts.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO attempts (delivery_id, attempted_at, response_time_ms, status_code, \
             failure, response_body) ",
        );
        q.push_values(chunk, |mut row, (id, a)| {
            row.push_bind(id.to_string())
                .push_bind(a.attempted_at)
                .push_bind(a.response_time_ms)
                .push_bind(a.status_code.map(i64::from))
                .push_bind(a.failure.clone())
                .push_bind(a.response_body.clone());
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// The sealed secrets of a row that has `secret`, `previous_secret` and
/// `previous_secret_expires_at`.
pub(super) fn sealed_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<SealedSecrets> {
    let previous: Option<Vec<u8>> = row.try_get("previous_secret")?;
    let expires: Option<i64> = row.try_get("previous_secret_expires_at")?;
    Ok(SealedSecrets {
        current: row.try_get("secret")?,
        previous: previous.zip(expires),
    })
}

/// Claims due deliveries of active webhooks under a lease, keeping every webhook under
/// `per_webhook` leased deliveries (a hanging endpoint's backlog never takes the places
/// of healthy endpoints).
pub(super) async fn claim(
    conn: &mut SqliteConnection,
    now: EpochMillis,
    limit: u32,
    per_webhook: u32,
    lease_until: EpochMillis,
) -> StoreResult<Vec<ClaimedDelivery>> {
    // Counted here rather than with GROUP BY, which makes SQLite scan the whole table by
    // its webhook index instead of the few leased rows (seen at 3 ms per claim).
    let leased: Vec<String> = sqlx::query_scalar(
        "SELECT webhook_id FROM deliveries WHERE status = 'pending' AND lease_until > ?1",
    )
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let cap = i64::from(per_webhook);
    let mut room: HashMap<String, i64> = HashMap::new();
    for webhook in leased {
        *room.entry(webhook).or_insert(cap) -= 1;
    }
    // Candidates come oldest first, LIMIT at a time; a webhook that fills up is excluded
    // from the next query, so one webhook's backlog cannot take every candidate place and
    // starve the others (a few rounds at most: each one fills at least one webhook).
    let mut claimed: Vec<ClaimedDelivery> = Vec::with_capacity(limit as usize);
    let mut taken: HashSet<String> = HashSet::new();
    for _round in 0..MAX_CLAIM_ROUNDS {
        let want = i64::from(limit) - claimed.len() as i64;
        if want <= 0 {
            break;
        }
        let full: Vec<&String> = room
            .iter()
            .filter(|(_, left)| **left <= 0)
            .map(|(w, _)| w)
            .collect();
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT d.id, d.organization_id, d.environment, d.webhook_id, d.attempt_count, \
               e.id AS event_id, e.created_at AS event_created_at, e.payload, \
               w.url, w.secret, w.previous_secret, w.previous_secret_expires_at \
             FROM deliveries d \
             JOIN events e ON e.seq = d.event_seq \
             JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.status = 'pending' AND d.next_attempt_at <= ",
        );
        q.push_bind(now);
        q.push(" AND (d.lease_until IS NULL OR d.lease_until <= ");
        q.push_bind(now);
        q.push(") AND w.active = 1 AND w.deleted_at IS NULL");
        if !full.is_empty() {
            q.push(" AND d.webhook_id NOT IN (");
            push_list(&mut q, &full, |w| (*w).clone());
            q.push(")");
        }
        q.push(" ORDER BY d.next_attempt_at LIMIT ");
        q.push_bind(want);
        let rows = q.build().fetch_all(&mut *conn).await?;
        let exhausted = (rows.len() as i64) < want;
        for row in rows {
            let id: String = row.try_get("id")?;
            let webhook: String = row.try_get("webhook_id")?;
            let left = room.entry(webhook.clone()).or_insert(cap);
            if *left <= 0 || taken.contains(&id) {
                continue;
            }
            *left -= 1;
            taken.insert(id.clone());
            claimed.push(claimed_from_row(&row, id, &webhook)?);
        }
        if exhausted {
            break;
        }
    }
    for c in &mut claimed {
        c.lease_until = lease_until;
    }
    if !claimed.is_empty() {
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE deliveries SET lease_until = ");
        q.push_bind(lease_until);
        q.push(" WHERE id IN (");
        push_list(&mut q, &claimed, |c| c.delivery_id.to_string());
        q.push(")");
        q.build().execute(&mut *conn).await?;
    }
    Ok(claimed)
}

fn claimed_from_row(
    row: &sqlx::sqlite::SqliteRow,
    id: String,
    webhook: &str,
) -> StoreResult<ClaimedDelivery> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("delivery {id}: {what}"));
    let org: String = row.try_get("organization_id")?;
    let env: String = row.try_get("environment")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    let attempts: i64 = row.try_get("attempt_count")?;
    Ok(ClaimedDelivery {
        delivery_id: id.parse().map_err(|_| corrupt("id"))?,
        tenant: Tenant {
            organization_id: org.parse().map_err(|_| corrupt("organization"))?,
            environment: env.parse().map_err(|_| corrupt("environment"))?,
        },
        webhook_id: webhook.parse().map_err(|_| corrupt("webhook"))?,
        url: row.try_get("url")?,
        secrets: sealed_from_row(row)?,
        event_id: row.try_get("event_id")?,
        event_created_at: row.try_get("event_created_at")?,
        payload: payload.into(),
        attempts_made: u32::try_from(attempts).unwrap_or(0),
        lease_until: 0,
    })
}

/// Records a batch of attempts and decides what comes next for each delivery and its
/// webhook. Successes (the common case) are written with one statement each for the
/// attempts, the deliveries and the webhooks; failures take the careful path one by one.
pub(super) async fn record(
    conn: &mut SqliteConnection,
    all_reports: &[AttemptReport],
    policy: &DeliveryPolicy,
    now: EpochMillis,
) -> StoreResult<Vec<DeliveryStatus>> {
    // Where each delivery stands now. One can vanish while in flight (purged past the
    // retention): its report is dropped rather than failing the whole batch. One whose
    // lease is no longer this claim's (it expired and the delivery was claimed again) is
    // stale: its attempt is logged, but it decides nothing.
    let mut current: HashMap<String, (String, Option<i64>)> = HashMap::new();
    for chunk in all_reports.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT id, status, lease_until FROM deliveries WHERE id IN (",
        );
        push_list(&mut q, chunk, |r| r.delivery_id.to_string());
        q.push(")");
        for row in q.build().fetch_all(&mut *conn).await? {
            current.insert(
                row.try_get("id")?,
                (row.try_get("status")?, row.try_get("lease_until")?),
            );
        }
    }
    let is_current = |r: &AttemptReport| {
        current
            .get(&r.delivery_id.to_string())
            .is_some_and(|(status, lease)| status == "pending" && *lease == Some(r.lease_until))
    };
    let logged: Vec<&AttemptReport> = all_reports
        .iter()
        .filter(|r| !r.internal_error && current.contains_key(&r.delivery_id.to_string()))
        .collect();
    let reports: Vec<&AttemptReport> = all_reports
        .iter()
        .filter(|r| !r.internal_error && is_current(r))
        .collect();
    let mut decided: HashMap<String, DeliveryStatus> = HashMap::new();
    // Our own faults: try again in a minute, counting nothing against the endpoint.
    for r in all_reports
        .iter()
        .filter(|r| r.internal_error && is_current(r))
    {
        sqlx::query(
            "UPDATE deliveries SET lease_until = NULL, next_attempt_at = ?1, updated_at = ?2 \
             WHERE id = ?3",
        )
        .bind(now + INTERNAL_ERROR_RETRY_MS)
        .bind(now)
        .bind(r.delivery_id.to_string())
        .execute(&mut *conn)
        .await?;
        decided.insert(r.delivery_id.to_string(), DeliveryStatus::Pending);
    }
    // Every attempt, stale ones included (they were sent).
    let attempts: Vec<(DeliveryId, &AttemptRecord)> =
        logged.iter().map(|r| (r.delivery_id, &r.attempt)).collect();
    insert_attempts(conn, &attempts).await?;

    // Successes: the deliveries are done; their webhooks' failure clocks stop.
    let successes: Vec<&AttemptReport> = reports.iter().copied().filter(|r| r.succeeded).collect();
    for chunk in successes.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "UPDATE deliveries SET status = 'succeeded', attempt_count = attempt_count + 1, \
             lease_until = NULL, next_attempt_at = NULL, updated_at = ",
        );
        q.push_bind(now);
        q.push(" WHERE id IN (");
        push_list(&mut q, chunk, |r| r.delivery_id.to_string());
        q.push(")");
        q.build().execute(&mut *conn).await?;
    }
    // The last success per webhook in this batch; failures before it do not count
    // towards `consecutive_failures` (a success came after them).
    let mut last_success: HashMap<String, usize> = HashMap::new();
    for (i, r) in reports.iter().enumerate() {
        if r.succeeded {
            last_success.insert(r.webhook_id.to_string(), i);
        }
    }
    if !last_success.is_empty() {
        let mut q = QueryBuilder::<Sqlite>::new(
            "UPDATE webhooks SET consecutive_failures = 0, failing_since = NULL, last_success_at = ",
        );
        q.push_bind(now);
        q.push(" WHERE id IN (");
        push_list(&mut q, last_success.keys(), |w| w.clone());
        q.push(")");
        q.build().execute(&mut *conn).await?;
    }

    for (i, report) in reports.iter().enumerate() {
        let status = if report.succeeded {
            DeliveryStatus::Succeeded
        } else {
            let webhook_id = report.webhook_id.to_string();
            let counts = last_success.get(&webhook_id).is_none_or(|&s| s < i);
            record_failure(conn, report, counts, policy, now).await?
        };
        decided.insert(report.delivery_id.to_string(), status);
    }
    Ok(all_reports
        .iter()
        .map(|r| {
            let id = r.delivery_id.to_string();
            decided.get(&id).copied().unwrap_or_else(|| {
                // Stale or vanished: report where the delivery stands.
                current
                    .get(&id)
                    .and_then(|(status, _)| DeliveryStatus::parse(status))
                    .unwrap_or(DeliveryStatus::Cancelled)
            })
        })
        .collect())
}

/// One failed attempt: count it (unless a later success in the batch reset the count),
/// disable the webhook if it is gone or has failed for too long, and schedule the next
/// attempt, hold, or give up.
async fn record_failure(
    conn: &mut SqliteConnection,
    report: &AttemptReport,
    counts: bool,
    policy: &DeliveryPolicy,
    now: EpochMillis,
) -> StoreResult<DeliveryStatus> {
    let delivery_id = report.delivery_id.to_string();
    let webhook_id = report.webhook_id.to_string();
    let attempts: i64 = sqlx::query_scalar(
        "UPDATE deliveries SET attempt_count = attempt_count + 1, lease_until = NULL, \
           updated_at = ?1 WHERE id = ?2 RETURNING attempt_count",
    )
    .bind(now)
    .bind(&delivery_id)
    .fetch_one(&mut *conn)
    .await?;
    let (active, failing_since, deleted_at): (bool, Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT active, failing_since, deleted_at FROM webhooks WHERE id = ?")
            .bind(&webhook_id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("webhook {webhook_id}")))?;
    let failing_since = failing_since.unwrap_or(report.attempt.attempted_at);
    if counts {
        sqlx::query(
            "UPDATE webhooks SET consecutive_failures = consecutive_failures + 1, \
               failing_since = ?1 WHERE id = ?2",
        )
        .bind(failing_since)
        .bind(&webhook_id)
        .execute(&mut *conn)
        .await?;
    }
    let disable_reason = if report.gone {
        Some("gone")
    } else if counts && should_disable(failing_since, now, policy.disable_after) {
        Some("failing")
    } else {
        None
    };
    let status = if deleted_at.is_some() {
        DeliveryStatus::Cancelled
    } else if let Some(reason) = disable_reason.filter(|_| active) {
        sqlx::query(
            "UPDATE webhooks SET active = 0, disabled_reason = ?1, updated_at = ?2 WHERE id = ?3",
        )
        .bind(reason)
        .bind(now)
        .bind(&webhook_id)
        .execute(&mut *conn)
        .await?;
        hold_pending(conn, report.webhook_id, now).await?;
        DeliveryStatus::Held
    } else if !active {
        DeliveryStatus::Held
    } else {
        let made = u32::try_from(attempts).unwrap_or(u32::MAX);
        match policy
            .schedule
            .next(made, now, report.retry_after, report.jitter_draw)
        {
            Some(at) => {
                sqlx::query("UPDATE deliveries SET next_attempt_at = ? WHERE id = ?")
                    .bind(at)
                    .bind(&delivery_id)
                    .execute(&mut *conn)
                    .await?;
                DeliveryStatus::Pending
            }
            None => DeliveryStatus::Failed,
        }
    };
    if status != DeliveryStatus::Pending {
        sqlx::query("UPDATE deliveries SET status = ?, next_attempt_at = NULL WHERE id = ?")
            .bind(status.as_str())
            .bind(&delivery_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(status)
}
