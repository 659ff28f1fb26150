//! `POST /webhooks/:id/test`: a real signed HTTPS delivery through the guarded client.

use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::*;

/// An implementation of the signature check written from the spec, independent of the
/// service's own signing module.
fn independent_signature(secret_whs: &str, id: &str, ts: &str, body: &[u8]) -> String {
    let key = hex::decode(&secret_whs[4..]).expect("hex secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

fn whsec(secret_whs: &str) -> String {
    let key = hex::decode(&secret_whs[4..]).expect("hex secret");
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

#[tokio::test]
async fn test_call_delivers_a_signed_event_that_official_libraries_verify() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let created = customer.create_webhook(&receiver.url()).await;
    let id = created["id"].as_str().expect("id");
    let secret = created["signingSecret"].as_str().expect("secret");

    let result = customer.test_webhook(id).await;
    assert_eq!(result["success"], true, "{result}");
    assert_eq!(result["statusCode"], 200);
    assert_eq!(result["message"], "Test webhook delivered successfully");
    assert!(result["responseTime"].as_u64().is_some(), "{result}");
    let keys: Vec<&String> = result.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 4, "{result}");

    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    let header = |name: &str| request.headers[name].to_str().expect("ascii").to_owned();
    let (msg_id, ts, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    assert_eq!(header("content-type"), "application/json");
    assert!(request.headers.get("accept-encoding").is_none());

    // The body: {id, type, createdAt, data}, with the id the one signed.
    let body: Value = serde_json::from_slice(&request.body).expect("json body");
    assert_eq!(body["type"], "webhook.test");
    assert_eq!(body["id"], msg_id.as_str());
    assert!(msg_id.starts_with("evt-"));
    assert_eq!(body["data"]["webhookId"], id);
    assert!(
        body["createdAt"]
            .as_str()
            .expect("createdAt")
            .ends_with('Z')
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    assert!((now - ts.parse::<i64>().expect("ts")).abs() < 30);

    // Exactly one v1 entry, equal to an independent HMAC...
    assert_eq!(
        signature,
        independent_signature(secret, &msg_id, &ts, &request.body)
    );
    // ...and accepted by the official Standard Webhooks library with the whsec_ key.
    let wh = standardwebhooks::Webhook::new(&whsec(secret)).expect("official lib takes the key");
    let mut headers = http::HeaderMap::new();
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        headers.insert(name, request.headers[name].clone());
    }
    wh.verify(&request.body, &headers)
        .expect("official library verifies");
    // A tampered body does not verify.
    let mut tampered = request.body.to_vec();
    tampered.push(b' ');
    assert!(wh.verify(&tampered, &headers).is_err());
}

#[tokio::test]
async fn test_call_reports_failures_without_echoing_the_body_or_counting_them() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let id = customer.create_webhook_id(&receiver.url()).await;

    receiver.set(Respond::Status(500, "SECRET-INTERNAL-MARKER stack trace"));
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["success"], false);
    assert_eq!(result["statusCode"], 500);
    assert_eq!(
        result["message"],
        "Webhook endpoint returned non-2xx status code"
    );
    assert!(!result.to_string().contains("SECRET-INTERNAL-MARKER"));

    // Tests never change consecutiveFailures, and work on an inactive webhook.
    let (_, webhook) = customer.get(&format!("/webhooks/{id}")).await;
    assert_eq!(webhook["consecutiveFailures"], 0);
    customer
        .put(&format!("/webhooks/{id}"), json!({"active": false}))
        .await;
    receiver.set(Respond::Status(204, ""));
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["success"], true);
    assert_eq!(result["statusCode"], 204);
    assert_eq!(receiver.requests().len(), 2);

    // Subscribed to order.completed/order.failed only: the test ignores the filter (it did
    // arrive above). Every test is in the delivery log with its attempt.
    let rows: Vec<(String, i64, Option<i64>, Option<String>)> = db_rows(
        &app.data_dir,
        "SELECT d.status, d.attempt_count, a.status_code, a.failure FROM deliveries d \
         JOIN attempts a ON a.delivery_id = d.id JOIN events e ON e.seq = d.event_seq \
         WHERE d.webhook_id = ? AND e.type = 'webhook.test' ORDER BY a.id",
        [&id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    );
    assert_eq!(
        rows,
        vec![
            (
                "failed".to_owned(),
                1,
                Some(500),
                Some("http_status".to_owned())
            ),
            ("succeeded".to_owned(), 1, Some(204), None),
        ]
    );
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_at_the_configured_limit() {
    let app = TestApp::spawn_with(|c| c.delivery_timeout = Duration::from_millis(800)).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Hang);
    let id = customer.create_webhook_id(&receiver.url()).await;
    let started = Instant::now();
    let result = customer.test_webhook(&id).await;
    let took = started.elapsed();
    assert_eq!(result["success"], false);
    assert_eq!(result["statusCode"], Value::Null);
    assert_eq!(
        result["message"],
        "Webhook endpoint did not respond within 0.8 seconds"
    );
    assert!(
        took >= Duration::from_millis(750) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let ms = result["responseTime"].as_u64().expect("ms");
    assert!((750..3000).contains(&ms), "{ms}");
}

#[tokio::test]
async fn a_status_that_arrived_decides_even_when_the_body_stalls() {
    let app = TestApp::spawn_with(|c| c.delivery_timeout = Duration::from_millis(800)).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let id = customer.create_webhook_id(&receiver.url()).await;
    for (status, success) in [(200, true), (503, false)] {
        receiver.set(Respond::StallBody(status));
        let started = Instant::now();
        let result = customer.test_webhook(&id).await;
        assert_eq!(result["success"], success, "{result}");
        assert_eq!(result["statusCode"], status);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(750) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let target = TestReceiver::start().await;
    let receiver = TestReceiver::start().await;
    let id = customer.create_webhook_id(&receiver.url()).await;
    for location in [
        target.url(),
        "https://169.254.169.254/latest/meta-data/".to_owned(),
    ] {
        receiver.set(Respond::Redirect(location));
        let result = customer.test_webhook(&id).await;
        assert_eq!(result["success"], false);
        assert_eq!(result["statusCode"], 302);
    }
    assert!(target.requests().is_empty(), "the redirect was followed");
}

#[tokio::test]
async fn an_endless_body_is_cut_at_the_cap() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let id = customer.create_webhook_id(&receiver.url()).await;

    receiver.set(Respond::Endless(200));
    let started = Instant::now();
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["success"], true, "{result}");
    assert!(started.elapsed() < Duration::from_secs(5));

    receiver.set(Respond::Endless(500));
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["success"], false);
    assert_eq!(result["statusCode"], 500);

    // Exactly 64 KiB of each was kept.
    let rows: Vec<(i64, Option<String>)> = db_rows(
        &app.data_dir,
        "SELECT length(response_body), failure FROM attempts ORDER BY id",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    );
    assert_eq!(
        rows,
        vec![
            (65536, None),
            (65536, Some("response_too_large".to_owned()))
        ]
    );
}

#[tokio::test]
async fn transport_failures_have_clear_messages_and_null_status() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;

    // A certificate from a CA the service does not trust.
    let rogue = TestReceiver::start_with(rogue_pki(), KeepAlive::Yes).await;
    let id = customer.create_webhook_id(&rogue.url()).await;
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["statusCode"], Value::Null);
    assert!(
        result["message"].as_str().expect("m").contains("TLS"),
        "{result}"
    );
    assert!(rogue.requests().is_empty());

    // Nothing listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let id = customer
        .create_webhook_id(&format!("https://127.0.0.1:{port}/x"))
        .await;
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["success"], false);
    assert_eq!(result["statusCode"], Value::Null);
    assert_eq!(
        result["message"],
        "Could not connect to the webhook endpoint"
    );

    // A name that does not resolve.
    let id = customer
        .create_webhook_id("https://nowhere.example.com/x")
        .await;
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["statusCode"], Value::Null);
    assert_eq!(
        result["message"],
        "Could not resolve the webhook endpoint's host name"
    );
}

#[tokio::test]
async fn answers_that_are_not_http_or_too_large_fail_cleanly() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let mut huge_head = b"HTTP/1.1 200 OK\r\nx-padding: ".to_vec();
    huge_head.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    huge_head.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
    for answer in [
        b"this is not HTTP at all\r\n\r\n".to_vec(),
        b"HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
        // A header of 1 MiB: the client stops reading it and gives up.
        huge_head,
    ] {
        let port = raw_receiver(answer).await;
        let id = customer
            .create_webhook_id(&format!("https://127.0.0.1:{port}/x"))
            .await;
        let started = Instant::now();
        let result = customer.test_webhook(&id).await;
        assert_eq!(result["success"], false, "{result}");
        assert_eq!(result["statusCode"], Value::Null, "{result}");
        assert_eq!(
            result["message"], "Could not connect to the webhook endpoint",
            "{result}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Each attempt is in the log, as a failure without a status or a body.
    let rows: Vec<(Option<i64>, Option<String>, Option<i64>)> = db_rows(
        &app.data_dir,
        "SELECT status_code, failure, length(response_body) FROM attempts ORDER BY id",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    );
    assert_eq!(rows, vec![(None, Some("connect".to_owned()), None); 3]);
}

#[tokio::test]
async fn a_name_that_turns_private_after_creation_is_refused_at_connection_time() {
    // Loopback allowed (the receiver lives there); 10/8 and the rest are not.
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    // Every attempt opens a new connection (a kept-alive one stays with the address that
    // was checked when it was opened).
    let receiver = TestReceiver::start_with(pki(), KeepAlive::No).await;
    app.resolver.set("receiver.test", &["127.0.0.1"]);
    let url = format!("https://receiver.test:{}/hook", receiver.port);
    let id = customer.create_webhook_id(&url).await;

    // Resolves to the checked loopback address: delivered, TLS verified for the name.
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["success"], true, "{result}");
    assert_eq!(receiver.requests().len(), 1);

    // The same name now answers a private address, or a public and a private one.
    for answers in [
        &["10.1.2.3"][..],
        &["8.8.8.8", "10.1.2.3"],
        &["169.254.169.254"],
        &["::ffff:10.0.0.1"],
    ] {
        app.resolver.set("receiver.test", answers);
        let result = customer.test_webhook(&id).await;
        assert_eq!(result["success"], false, "{answers:?}");
        assert_eq!(result["statusCode"], Value::Null);
        assert_eq!(
            result["message"],
            "Webhook endpoint resolves to a private or reserved address; it was not contacted"
        );
    }
    assert_eq!(
        receiver.requests().len(),
        1,
        "a blocked attempt reached the receiver"
    );
}

#[tokio::test]
async fn an_ip_literal_outside_the_allow_list_is_refused_at_connection_time() {
    // Created while loopback was allowed, then the service restarts without the
    // allow-list: the literal is checked again before any connection.
    let receiver = TestReceiver::start().await;
    let open = TestApp::spawn().await;
    let customer = open.customer().await;
    let id = customer.create_webhook_id(&receiver.url()).await;
    let data_dir = open.data_dir.clone();
    let store_args = vignetim_webhooks::config::StoreArgs {
        database_url: None,
        data_dir,
        encryption_key: None,
    };
    let closed = TestApp::spawn_with(move |c| {
        c.allow_list = Default::default();
        c.store = store_args;
    })
    .await;
    let customer = customer.with_key(&customer.key);
    let customer = Customer {
        base: closed.base.clone(),
        ..customer
    };
    let result = customer.test_webhook(&id).await;
    assert_eq!(result["success"], false);
    assert_eq!(result["statusCode"], Value::Null);
    assert!(
        result["message"]
            .as_str()
            .expect("m")
            .contains("private or reserved")
    );
    assert!(receiver.requests().is_empty());
    drop(open);
}

#[tokio::test]
async fn test_call_for_a_missing_webhook_is_404() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let (status, body) = customer
        .post(
            "/webhooks/wh-00000000-0000-4000-8000-000000000000/test",
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}
