//! The delivery engine: publish, fan out, sign, retry, hold, recover, rotate, isolate.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use vignetim_webhooks::domain::retry::RetrySchedule;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(10);

fn schedule(text: &str) -> RetrySchedule {
    RetrySchedule::parse(text).expect("schedule")
}

/// Waits until `receiver` holds `n` requests; returns them.
async fn received(receiver: &TestReceiver, n: usize) -> Vec<Received> {
    eventually(WAIT, || async {
        let got = receiver.requests();
        (got.len() >= n).then_some(got)
    })
    .await
}

/// `POST …/deliveries/{id}/retry`.
async fn retry(customer: &Customer, webhook: &str, delivery: &str) -> (StatusCode, Value) {
    customer
        .post(
            &format!("/webhooks/{webhook}/deliveries/{delivery}/retry"),
            json!({}),
        )
        .await
}

/// The delivery log of a webhook.
async fn log(customer: &Customer, webhook: &str, query: &str) -> Value {
    let (status, body) = customer
        .get(&format!("/webhooks/{webhook}/deliveries{query}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Waits until the webhook's only (newest) delivery has `status`; returns it with its
/// attempts.
async fn delivery_with_status(customer: &Customer, webhook: &str, status: &str) -> Value {
    eventually(WAIT, || async {
        let list = log(customer, webhook, "").await;
        let first = list["data"][0].clone();
        if first["status"] != status {
            return None;
        }
        let id = first["id"].as_str().expect("id");
        let (_, detail) = customer
            .get(&format!("/webhooks/{webhook}/deliveries/{id}"))
            .await;
        Some(detail)
    })
    .await
}

#[tokio::test]
async fn fan_out_follows_subscriptions_and_every_delivery_is_signed() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let (completed, all, failed) = (
        TestReceiver::start().await,
        TestReceiver::start().await,
        TestReceiver::start().await,
    );
    let mut secrets = Vec::new();
    for (receiver, events) in [
        (&completed, json!(["order.completed"])),
        (&all, json!(["*"])),
        (&failed, json!(["order.failed"])),
    ] {
        let (status, body) = customer
            .post(
                "/webhooks",
                json!({"url": receiver.url(), "events": events}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        secrets.push(body["signingSecret"].as_str().expect("secret").to_owned());
    }
    // Another organization's webhook gets nothing.
    let stranger = app.customer().await;
    let strangers_receiver = TestReceiver::start().await;
    stranger.create_webhook_id(&strangers_receiver.url()).await;

    let data =
        json!({"orderId": "ord_123", "amount": {"value": 1999, "currency": "EUR"}, "zeta": [1, 2]});
    let accepted = app
        .publish(&customer, "order.completed", data.clone())
        .await;
    assert_eq!(accepted["deliveries"], 2);
    let event_id = accepted["id"].as_str().expect("id");
    assert!(event_id.starts_with("evt-"));

    for (receiver, secret) in [(&completed, &secrets[0]), (&all, &secrets[1])] {
        let request = &received(receiver, 1).await[0];
        assert_eq!(request.headers["webhook-id"], event_id);
        assert_signed_by(request, secret);
        let body: Value = serde_json::from_slice(&request.body).expect("json");
        assert_eq!(body["id"], event_id);
        assert_eq!(body["type"], "order.completed");
        assert_eq!(body["data"], data);
        assert!(
            body["createdAt"]
                .as_str()
                .expect("createdAt")
                .ends_with('Z')
        );
        let text = std::str::from_utf8(&request.body).expect("utf8");
        let prefix = format!(r#"{{"id":"{event_id}","type":"order.completed","createdAt":""#);
        assert!(
            text.starts_with(&prefix),
            "fields in contract order: {text}"
        );
        assert_eq!(body.as_object().expect("object").len(), 4);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(failed.requests().is_empty());
    assert!(strangers_receiver.requests().is_empty());
}

#[tokio::test]
async fn data_is_delivered_byte_for_byte() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    customer.create_webhook_id(&receiver.url()).await;
    let raw = r#"{"organizationId":"ORG","environment":"sandbox","type":"order.completed","data":{"z": 1,  "a":"Zo\u00eb ✓","n":1.50}}"#
        .replace("ORG", &customer.org);
    let response = app
        .http
        .post(app.url("/admin/events"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let request = &received(&receiver, 1).await[0];
    let body = String::from_utf8(request.body.to_vec()).expect("utf8");
    assert!(
        body.ends_with(r#","data":{"z": 1,  "a":"Zo\u00eb ✓","n":1.50}}"#),
        "{body}"
    );
}

#[tokio::test]
async fn failures_retry_on_schedule_with_the_same_id_then_fail_and_a_manual_retry_succeeds() {
    let app = TestApp::spawn_with(|c| c.retry_schedule = schedule("150ms,150ms")).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Status(500, "database down"));
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    let event = app
        .publish(&customer, "order.completed", json!({"n": 1}))
        .await;

    let detail = delivery_with_status(&customer, &webhook, "failed").await;
    assert_eq!(detail["attemptCount"], 3);
    assert_eq!(detail["nextAttemptAt"], Value::Null);
    assert_eq!(detail["eventId"], event["id"]);
    assert_eq!(detail["eventType"], "order.completed");
    let attempts = detail["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3);
    for attempt in attempts {
        assert_eq!(attempt["statusCode"], 500);
        assert_eq!(attempt["failure"], "http_status");
        assert_eq!(attempt["responseBody"], "database down");
        assert!(attempt["responseTime"].as_i64().is_some());
    }
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    let ids: HashSet<_> = requests
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    assert_eq!(ids.len(), 1, "webhook-id changed between retries");
    let (_, webhook_now) = customer.get(&format!("/webhooks/{webhook}")).await;
    assert_eq!(webhook_now["consecutiveFailures"], 3);
    assert_eq!(webhook_now["lastSuccessAt"], Value::Null);

    // A manual retry sends now, also for a failed delivery.
    receiver.set(Respond::Status(200, "ok"));
    let delivery = detail["id"].as_str().expect("id");
    let (status, queued) = retry(&customer, &webhook, delivery).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    assert_eq!(queued["status"], "pending");
    let done = delivery_with_status(&customer, &webhook, "succeeded").await;
    assert_eq!(done["attemptCount"], 4);
    let (_, webhook_now) = customer.get(&format!("/webhooks/{webhook}")).await;
    assert_eq!(webhook_now["consecutiveFailures"], 0);
    assert!(webhook_now["lastSuccessAt"].is_string());
}

#[tokio::test]
async fn retry_after_is_honoured_and_capped() {
    // Schedule step 5 s; the receiver asks for 1 s: the retry comes after about 1 s.
    let app = TestApp::spawn_with(|c| c.retry_schedule = schedule("5s,5s")).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::RetryAfter(429, "1"));
    customer.create_webhook_id(&receiver.url()).await;
    app.publish(&customer, "order.completed", json!({})).await;
    received(&receiver, 1).await;
    let first = Instant::now();
    receiver.set(Respond::Status(200, "ok"));
    received(&receiver, 2).await;
    let gap = first.elapsed();
    assert!(
        gap >= Duration::from_millis(700) && gap < Duration::from_secs(4),
        "{gap:?}"
    );

    // Asking for an hour is capped at the largest step (here 300 ms).
    let app = TestApp::spawn_with(|c| c.retry_schedule = schedule("100ms,300ms")).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::RetryAfter(503, "3600"));
    customer.create_webhook_id(&receiver.url()).await;
    app.publish(&customer, "order.completed", json!({})).await;
    received(&receiver, 3).await;
}

#[tokio::test]
async fn gone_disables_at_once_and_held_events_arrive_after_re_enabling() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Status(410, "gone"));
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    app.publish(&customer, "order.completed", json!({"n": 1}))
        .await;
    let held = delivery_with_status(&customer, &webhook, "held").await;
    assert_eq!(held["attempts"][0]["statusCode"], 410);
    let (_, disabled) = customer.get(&format!("/webhooks/{webhook}")).await;
    assert_eq!(disabled["active"], false);
    assert_eq!(disabled["disabledReason"], "gone");

    // New events are held, not sent, not lost.
    let second = app
        .publish(&customer, "order.completed", json!({"n": 2}))
        .await;
    assert_eq!(second["deliveries"], 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1);
    let list = log(&customer, &webhook, "?status=held").await;
    assert_eq!(list["data"].as_array().expect("data").len(), 2);
    // A manual retry of a held delivery is refused while the webhook is off.
    let id = list["data"][0]["id"].as_str().expect("id");
    let (status, body) = retry(&customer, &webhook, id).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "webhook_inactive");

    receiver.set(Respond::Status(200, "ok"));
    let (_, enabled) = customer
        .put(&format!("/webhooks/{webhook}"), json!({"active": true}))
        .await;
    assert_eq!(enabled["active"], true);
    assert_eq!(enabled["disabledReason"], Value::Null);
    assert_eq!(enabled["consecutiveFailures"], 0);
    let requests = received(&receiver, 3).await;
    let ids: HashSet<_> = requests[1..]
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    assert_eq!(ids.len(), 2);
    eventually(WAIT, || async {
        let list = log(&customer, &webhook, "?status=succeeded").await;
        (list["data"].as_array().expect("data").len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn paused_webhooks_hold_their_events_and_resume_delivers_them() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    customer
        .put(&format!("/webhooks/{webhook}"), json!({"active": false}))
        .await;
    for n in 0..3 {
        app.publish(&customer, "order.failed", json!({"n": n}))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.requests().is_empty());
    let (_, paused) = customer.get(&format!("/webhooks/{webhook}")).await;
    assert_eq!(
        paused["disabledReason"],
        Value::Null,
        "paused by the owner, not disabled"
    );
    customer
        .put(&format!("/webhooks/{webhook}"), json!({"active": true}))
        .await;
    received(&receiver, 3).await;
}

#[tokio::test]
async fn a_webhook_failing_for_the_disable_period_is_disabled_and_its_retries_held() {
    let app = TestApp::spawn_with(|c| {
        c.retry_schedule = schedule("100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms");
        c.disable_after = Duration::from_millis(400);
    })
    .await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Status(503, "maintenance"));
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    app.publish(&customer, "order.completed", json!({})).await;
    let webhook_now = eventually(WAIT, || async {
        let (_, w) = customer.get(&format!("/webhooks/{webhook}")).await;
        (w["active"] == false).then_some(w)
    })
    .await;
    assert_eq!(webhook_now["disabledReason"], "failing");
    let failures = webhook_now["consecutiveFailures"].as_i64().expect("n");
    assert!((3..=10).contains(&failures), "{failures}");
    let detail = delivery_with_status(&customer, &webhook, "held").await;
    assert_eq!(detail["attemptCount"], failures);
}

#[tokio::test]
async fn rotation_signs_with_both_secrets_for_the_overlap() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let created = customer.create_webhook(&receiver.url()).await;
    let webhook = created["id"].as_str().expect("id");
    let old = created["signingSecret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let (status, rotated) = customer
        .post(&format!("/webhooks/{webhook}/rotate-secret"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = rotated["signingSecret"]
        .as_str()
        .expect("secret")
        .to_owned();
    assert_ne!(new, old);
    assert!(new.starts_with("whs_") && new.len() == 68);
    let (_, fetched) = customer.get(&format!("/webhooks/{webhook}")).await;
    assert!(fetched.get("signingSecret").is_none());

    app.publish(&customer, "order.completed", json!({})).await;
    let request = &received(&receiver, 1).await[0];
    let header = request.headers["webhook-signature"]
        .to_str()
        .expect("ascii");
    let entries: Vec<&str> = header.split(' ').collect();
    assert_eq!(entries.len(), 2, "{header}");
    assert!(entries.iter().all(|e| e.starts_with("v1,")));
    assert_signed_by(request, &old);
    assert_signed_by(request, &new);
    // The test call signs the same way.
    customer.test_webhook(webhook).await;
    let test_request = &receiver.requests()[1];
    assert_signed_by(test_request, &old);
    assert_signed_by(test_request, &new);
}

#[tokio::test]
async fn recover_requeues_the_failed_deliveries_of_a_window() {
    let app = TestApp::spawn_with(|c| c.retry_schedule = schedule("100ms")).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Status(500, "down"));
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    let since = chrono::Utc::now().to_rfc3339();
    for n in 0..3 {
        app.publish(&customer, "order.completed", json!({"n": n}))
            .await;
    }
    eventually(WAIT, || async {
        let list = log(&customer, &webhook, "?status=failed").await;
        (list["data"].as_array().expect("data").len() == 3).then_some(())
    })
    .await;
    receiver.set(Respond::Status(200, "ok"));
    // A window before the events recovers nothing.
    let (status, body) = customer
        .post(
            &format!("/webhooks/{webhook}/recover"),
            json!({"since": "2020-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"}),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::ACCEPTED, json!({"recovered": 0}))
    );
    let (status, body) = customer
        .post(
            &format!("/webhooks/{webhook}/recover"),
            json!({"since": since}),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::ACCEPTED, json!({"recovered": 3}))
    );
    eventually(WAIT, || async {
        let list = log(&customer, &webhook, "?status=succeeded").await;
        (list["data"].as_array().expect("data").len() == 3).then_some(())
    })
    .await;
    for bad in [
        json!({"since": "yesterday"}),
        json!({}),
        json!({"since": since, "until": "2020-01-01T00:00:00Z"}),
    ] {
        let (status, _) = customer
            .post(&format!("/webhooks/{webhook}/recover"), bad.clone())
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
}

#[tokio::test]
async fn publishing_is_idempotent_per_tenant_and_validated() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    customer.create_webhook_id(&receiver.url()).await;
    let body = json!({"organizationId": customer.org, "environment": "sandbox", "type": "order.completed", "data": {"n": 1}, "id": "order_42-completed"});
    let (status, first) = app.publish_raw(body.clone()).await;
    assert_eq!(
        (status, &first),
        (
            StatusCode::ACCEPTED,
            &json!({"id": "order_42-completed", "deliveries": 1})
        )
    );
    let (status, again) = app.publish_raw(body).await;
    assert_eq!((status, again), (StatusCode::ACCEPTED, first));
    received(&receiver, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1);

    let org = customer.org.clone();
    let base = json!({"organizationId": org, "environment": "sandbox", "type": "order.completed", "data": {}});
    let with = |key: &str, value: Value| {
        let mut b = base.clone();
        b[key] = value;
        b
    };
    let big = "x".repeat(256 * 1024);
    for (body, status, code) in [
        (
            with("type", json!("order.shipped")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_event_type",
        ),
        (
            with("type", json!("webhook.test")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_event_type",
        ),
        (
            with("id", json!("has.dot")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_event_id",
        ),
        (
            with("id", json!("x".repeat(65))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_event_id",
        ),
        (
            with("environment", json!("prod")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            with("data", json!({"blob": big})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            with(
                "organizationId",
                json!("org-00000000-0000-4000-8000-000000000000"),
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            with("extra", json!(1)),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
    ] {
        let (got, error) = app.publish_raw(body.clone()).await;
        assert_eq!(got, status, "{error}");
        assert_eq!(error["error"]["code"], code, "{error}");
    }
    // Just under the data cap is accepted.
    let fits = "x".repeat(256 * 1024 - 20);
    let (status, _) = app.publish_raw(with("data", json!({"blob": fits}))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Without the admin token: 401.
    let response = app
        .http
        .post(app.url("/admin/events"))
        .json(&base)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_delivery_log_pages_filters_and_stays_private() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    let mut published = Vec::new();
    for n in 0..7 {
        published.push(
            app.publish(&customer, "order.completed", json!({"n": n}))
                .await["id"]
                .clone(),
        );
    }
    received(&receiver, 7).await;
    eventually(WAIT, || async {
        let list = log(&customer, &webhook, "?status=succeeded&limit=250").await;
        (list["data"].as_array().expect("data").len() == 7).then_some(())
    })
    .await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("?limit=3&cursor={c}"),
            None => "?limit=3".to_owned(),
        };
        let page = log(&customer, &webhook, &query).await;
        for d in page["data"].as_array().expect("data") {
            assert_eq!(d["status"], "succeeded");
            assert!(d["id"].as_str().expect("id").starts_with("dlv-"));
            seen.push(d["eventId"].clone());
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    published.reverse();
    assert_eq!(seen, published, "newest first, each once");
    assert_eq!(
        log(&customer, &webhook, "?status=failed").await["data"],
        json!([])
    );
    for bad in [
        "?status=done",
        "?limit=0",
        "?limit=251",
        "?cursor=nope",
        "?limit=x",
        "?other=1",
    ] {
        let (status, body) = customer
            .get(&format!("/webhooks/{webhook}/deliveries{bad}"))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    // Another organization sees nothing of it.
    let stranger = app.customer().await;
    let delivery = log(&customer, &webhook, "").await["data"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for path in [
        format!("/webhooks/{webhook}/deliveries"),
        format!("/webhooks/{webhook}/deliveries/{delivery}"),
    ] {
        assert_eq!(stranger.get(&path).await.0, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = retry(&stranger, &webhook, &delivery).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = stranger
        .post(
            &format!("/webhooks/{webhook}/recover"),
            json!({"since": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn deleting_a_webhook_cancels_its_pending_deliveries() {
    let app = TestApp::spawn_with(|c| c.retry_schedule = schedule("1h")).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Status(500, "no"));
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    app.publish(&customer, "order.completed", json!({})).await;
    delivery_with_status(&customer, &webhook, "pending").await;
    received(&receiver, 1).await;
    assert_eq!(
        customer.delete(&format!("/webhooks/{webhook}")).await.0,
        StatusCode::NO_CONTENT
    );
    let statuses: Vec<String> = db_rows(
        &app.data_dir,
        "SELECT status FROM deliveries WHERE webhook_id = ?",
        [&webhook],
        |r| r.get(0),
    );
    assert_eq!(statuses, vec!["cancelled".to_owned()]);
}

#[tokio::test]
async fn a_hanging_endpoint_never_delays_a_healthy_one() {
    let app = TestApp::spawn_with(|c| {
        c.delivery_timeout = Duration::from_secs(5);
        c.webhook_concurrency = std::num::NonZeroU32::new(4).expect("nz");
    })
    .await;
    let customer = app.customer().await;
    let hanging = TestReceiver::start().await;
    hanging.set(Respond::Hang);
    let healthy = TestReceiver::start().await;
    customer.create_webhook_id(&hanging.url()).await;
    customer.create_webhook_id(&healthy.url()).await;
    let started = Instant::now();
    for n in 0..40 {
        app.publish(&customer, "order.completed", json!({"n": n}))
            .await;
    }
    received(&healthy, 40).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "healthy endpoint waited {took:?}"
    );
    // The hanging one holds no more than its cap of attempts.
    assert!(
        hanging.requests().len() <= 4,
        "{}",
        hanging.requests().len()
    );
}

#[tokio::test]
async fn a_name_that_turns_private_is_refused_at_delivery_without_connecting() {
    let app = TestApp::spawn_with(|c| c.retry_schedule = schedule("100ms")).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start_with(pki(), KeepAlive::No).await;
    app.resolver.set("receiver.test", &["127.0.0.1"]);
    let webhook = customer
        .create_webhook_id(&format!("https://receiver.test:{}/hook", receiver.port))
        .await;
    app.resolver.set("receiver.test", &["169.254.169.254"]);
    app.publish(&customer, "order.completed", json!({})).await;
    let detail = delivery_with_status(&customer, &webhook, "failed").await;
    for attempt in detail["attempts"].as_array().expect("attempts") {
        assert_eq!(attempt["failure"], "blocked_address");
        assert_eq!(attempt["statusCode"], Value::Null);
    }
    assert!(receiver.requests().is_empty());
}

#[tokio::test]
async fn delivery_metrics_are_exported() {
    let app = TestApp::spawn_with(|c| c.retry_schedule = schedule("1h")).await;
    let customer = app.customer().await;
    let ok = TestReceiver::start().await;
    let bad = TestReceiver::start().await;
    bad.set(Respond::Status(500, "no"));
    customer.create_webhook_id(&ok.url()).await;
    let failing = customer.create_webhook_id(&bad.url()).await;
    // A paused webhook: its delivery is held. (The counts by status come from three
    // indexes, succeeded being what the others leave: each status is checked.)
    let paused = customer.create_webhook_id(&ok.url()).await;
    customer
        .put(&format!("/webhooks/{paused}"), json!({"active": false}))
        .await;
    app.publish(&customer, "order.completed", json!({})).await;
    received(&ok, 1).await;
    received(&bad, 1).await;
    let text = eventually(WAIT, || async {
        let text = app.metrics().await;
        text.contains(
            r#"vignetim_delivery_attempts_total{outcome="failure",failure="http_status"} 1"#,
        )
        .then_some(text)
    })
    .await;
    assert!(
        text.contains(r#"vignetim_delivery_attempts_total{outcome="success",failure="none"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("vignetim_delivery_publish_to_success_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains(r#"vignetim_deliveries{status="pending"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"vignetim_deliveries{status="succeeded"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"vignetim_deliveries{status="held"} 1"#),
        "{text}"
    );
    for none in ["failed", "cancelled"] {
        assert!(
            text.contains(&format!(r#"vignetim_deliveries{{status="{none}"}} 0"#)),
            "{text}"
        );
    }
    assert!(text.contains("vignetim_deliveries_due 0"), "{text}");
    assert!(
        text.contains("vignetim_oldest_due_delivery_age_seconds"),
        "{text}"
    );

    // How deliveries came to the engine: the two sent so far were handed over by their
    // publish; the held one, resumed, is claimed for its first attempt; the failed one,
    // retried by hand, is claimed for its second.
    let started = |via: &str| format!(r#"vignetim_deliveries_started_total{{via="{via}"}}"#);
    assert!(
        text.contains(&format!("{} 2", started("publish"))),
        "{text}"
    );
    assert!(text.contains(&format!("{} 0", started("claim"))), "{text}");
    assert!(text.contains(&format!("{} 0", started("retry"))), "{text}");
    customer
        .put(&format!("/webhooks/{paused}"), json!({"active": true}))
        .await;
    received(&ok, 2).await;
    let failed = log(&customer, &failing, "").await["data"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        retry(&customer, &failing, &failed).await.0,
        StatusCode::ACCEPTED
    );
    received(&bad, 2).await;
    let text = app.metrics().await;
    for (via, n) in [("publish", 2), ("claim", 1), ("retry", 1)] {
        assert!(text.contains(&format!("{} {n}", started(via))), "{text}");
    }
}

#[tokio::test]
async fn the_log_is_purged_after_the_retention() {
    let app = TestApp::spawn_with(|c| c.retention = Duration::from_millis(800)).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    app.publish(&customer, "order.completed", json!({})).await;
    let delivered = delivery_with_status(&customer, &webhook, "succeeded").await;
    let path = format!(
        "/webhooks/{webhook}/deliveries/{}",
        delivered["id"].as_str().expect("id")
    );
    eventually(WAIT, || async {
        let (status, _) = customer.get(&path).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    assert_eq!(log(&customer, &webhook, "").await["data"], json!([]));
    // The webhook itself stays.
    assert_eq!(
        customer.get(&format!("/webhooks/{webhook}")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn racing_publishes_of_one_id_deliver_once_and_a_bad_one_spoils_nothing() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    customer.create_webhook_id(&receiver.url()).await;
    let missing_org = "org-00000000-0000-4000-8000-000000000000";
    let tasks: Vec<_> = (0..24)
        .map(|n| {
            let app_url = app.url("/admin/events");
            let http = app.http.clone();
            let org = if n % 4 == 3 { missing_org.to_owned() } else { customer.org.clone() };
            tokio::spawn(async move {
                let response = http
                    .post(app_url)
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"organizationId": org, "environment": "sandbox", "type": "order.completed", "data": {"n": n}, "id": "same-id"}))
                    .send()
                    .await
                    .expect("send");
                read(response).await
            })
        })
        .collect();
    let mut accepted = 0;
    for (n, task) in tasks.into_iter().enumerate() {
        let (status, body) = task.await.expect("task");
        if n % 4 == 3 {
            assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        } else {
            assert_eq!(
                (status, body),
                (
                    StatusCode::ACCEPTED,
                    json!({"id": "same-id", "deliveries": 1})
                )
            );
            accepted += 1;
        }
    }
    assert_eq!(accepted, 18);
    received(&receiver, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1);
}

#[tokio::test]
async fn test_deliveries_are_records_not_queue_entries() {
    let app = TestApp::spawn_with(|c| c.retry_schedule = schedule("100ms")).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Status(500, "no"));
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    let since = chrono::Utc::now().to_rfc3339();
    customer.test_webhook(&webhook).await;
    let list = log(&customer, &webhook, "").await;
    assert_eq!(list["data"][0]["eventType"], "webhook.test");
    assert_eq!(list["data"][0]["status"], "failed");
    let id = list["data"][0]["id"].as_str().expect("id");
    let (status, body) = retry(&customer, &webhook, id).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "test_delivery");
    let (_, body) = customer
        .post(
            &format!("/webhooks/{webhook}/recover"),
            json!({"since": since}),
        )
        .await;
    assert_eq!(body["recovered"], 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1);
    let (_, w) = customer.get(&format!("/webhooks/{webhook}")).await;
    assert_eq!(w["consecutiveFailures"], 0);
    // A deleted webhook's log is gone with it.
    customer.delete(&format!("/webhooks/{webhook}")).await;
    let (status, _) = customer
        .get(&format!("/webhooks/{webhook}/deliveries/{id}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sandbox_and_live_event_ids_are_separate() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let live_key = app.create_key(&customer.org, "live").await;
    let live = customer.with_key(&live_key);
    let (sandbox_receiver, live_receiver) =
        (TestReceiver::start().await, TestReceiver::start().await);
    customer.create_webhook_id(&sandbox_receiver.url()).await;
    live.create_webhook_id(&live_receiver.url()).await;
    for environment in ["sandbox", "live"] {
        let (status, body) = app
            .publish_raw(json!({"organizationId": customer.org, "environment": environment, "type": "order.completed", "data": {}, "id": "ord_1043-completed"}))
            .await;
        assert_eq!(
            (status, body),
            (
                StatusCode::ACCEPTED,
                json!({"id": "ord_1043-completed", "deliveries": 1})
            )
        );
    }
    received(&sandbox_receiver, 1).await;
    received(&live_receiver, 1).await;
}

/// The guarded client on its own, trusting the test CA, allowed to reach loopback.
fn loopback_client() -> vignetim_webhooks::delivery::GuardedClient {
    use vignetim_webhooks::delivery::client::ClientSettings;
    vignetim_webhooks::delivery::GuardedClient::new(ClientSettings {
        allow: vignetim_webhooks::domain::url_policy::AllowList::parse("127.0.0.0/8")
            .expect("allow-list"),
        extra_roots_pem: Some(pki().ca_pem.clone().into_bytes()),
        timeout: Duration::from_secs(10),
        resolver: std::sync::Arc::new(vignetim_webhooks::delivery::SystemResolver),
    })
    .expect("client")
}

/// 16 attempts at once to one endpoint, all answered 2xx.
async fn burst(client: &vignetim_webhooks::delivery::GuardedClient, url: &str) {
    let sends = (0..16).map(|n| {
        client.send(vignetim_webhooks::delivery::Dispatch {
            url,
            msg_id: "evt-burst",
            timestamp: 1_700_000_000,
            signature: format!("v1,{n}"),
            body: bytes::Bytes::from_static(b"{}"),
        })
    });
    for outcome in futures_util::future::join_all(sends).await {
        assert!(outcome.succeeded(), "{outcome:?}");
    }
}

#[tokio::test]
async fn a_burst_to_an_endpoint_without_a_connection_opens_one_not_one_per_attempt() {
    // Over HTTP/2 the attempts share the first attempt's connection. (Without the
    // one-connection-first rule each of them made its own TLS handshake: HTTP/2 is only
    // known once a handshake has ended.)
    let receiver = TestReceiver::start().await;
    let client = loopback_client();
    let url = format!("https://127.0.0.1:{}/hook", receiver.port);
    burst(&client, &url).await;
    assert_eq!(receiver.received.lock().expect("lock").len(), 16);
    let opened = receiver.connections();
    assert_eq!(
        opened, 1,
        "TLS connections opened for 16 attempts over HTTP/2"
    );
    // Later bursts reuse it.
    burst(&client, &url).await;
    let opened = receiver.connections();
    assert_eq!(
        opened, 1,
        "TLS connections opened for 32 attempts over HTTP/2"
    );

    // Over HTTP/1.1 without keep-alive every attempt needs its own connection: once the
    // first has connected, the others open theirs at once, and none waits on another.
    let one_shot = TestReceiver::start_with(pki(), KeepAlive::No).await;
    let url = format!("https://127.0.0.1:{}/hook", one_shot.port);
    burst(&client, &url).await;
    assert_eq!(one_shot.received.lock().expect("lock").len(), 16);
    let opened = one_shot.connections();
    assert_eq!(opened, 16, "one connection per attempt without keep-alive");
}

#[tokio::test]
async fn an_attempt_hanging_on_the_first_connection_holds_the_others_up_only_briefly() {
    // The first attempt opens the connection and never gets an answer (another webhook
    // at the same host might hang so): the others share the connection all the same,
    // after a short while, instead of waiting for its timeout.
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Hang);
    let client = loopback_client();
    let url = format!("https://127.0.0.1:{}/hook", receiver.port);
    let hanging = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .send(vignetim_webhooks::delivery::Dispatch {
                    url: &url,
                    msg_id: "evt-hang",
                    timestamp: 1_700_000_000,
                    signature: "v1,hang".to_owned(),
                    body: bytes::Bytes::from_static(b"{}"),
                })
                .await
        }
    });
    eventually(WAIT, || async {
        (receiver.received.lock().expect("lock").len() == 1).then_some(())
    })
    .await;
    receiver.set(Respond::Status(200, "ok"));
    let started = Instant::now();
    burst(&client, &url).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the burst waited {:?} (the client's timeout is 10 s)",
        started.elapsed()
    );
    let opened = receiver.connections();
    assert_eq!(opened, 1, "the hanging attempt's connection is shared");
    hanging.abort();
}
