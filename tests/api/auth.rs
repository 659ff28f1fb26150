//! API keys, environments, tenancy, the admin token and rate limiting.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn missing_malformed_and_unknown_keys_are_401() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let unknown = format!("vgn_test_{}", "0".repeat(48));
    for key in [
        "",
        "nonsense",
        "vgn_test_123",
        unknown.as_str(),
        ADMIN_TOKEN,
    ] {
        let (status, body) = customer.with_key(key).get("/webhooks").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let response = app
        .http
        .get(app.url("/webhooks"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("x-ratelimit-limit"));
}

#[tokio::test]
async fn another_organizations_webhook_is_404_like_a_missing_one() {
    let app = TestApp::spawn().await;
    let owner = app.customer().await;
    let stranger = app.customer().await;
    let receiver = TestReceiver::start().await;
    let id = owner.create_webhook_id(&receiver.url()).await;
    let path = format!("/webhooks/{id}");
    let missing = "/webhooks/wh-00000000-0000-4000-8000-000000000000";
    for who in [&stranger] {
        let results = [
            who.get(&path).await,
            who.put(&path, json!({"description": "mine now"})).await,
            who.post(&format!("{path}/test"), json!({})).await,
            who.delete(&path).await,
        ];
        for (status, body) in results {
            assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
            let (_, missing_body) = who.get(missing).await;
            assert_eq!(body["error"]["code"], missing_body["error"]["code"]);
            assert_eq!(body["error"]["message"], missing_body["error"]["message"]);
        }
        let (_, list) = who.get("/webhooks").await;
        assert_eq!(list["data"], json!([]));
    }
    assert!(
        receiver.requests().is_empty(),
        "the stranger's test call reached the receiver"
    );
    // Untouched for its owner.
    let (status, body) = owner.get(&path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["description"], "Production order notifications");
    // Malformed ids are 404 too, not 400.
    for bad in [
        "/webhooks/nope",
        "/webhooks/wh-XYZ",
        "/webhooks/org-00000000-0000-4000-8000-000000000000",
    ] {
        assert_eq!(owner.get(bad).await.0, StatusCode::NOT_FOUND, "{bad}");
    }
}

#[tokio::test]
async fn sandbox_and_live_are_separate_worlds() {
    let app = TestApp::spawn().await;
    let org = app.create_org().await;
    let live = app.create_key(&org, "live").await;
    let sandbox = app.create_key(&org, "sandbox").await;
    assert!(live.starts_with("vgn_live_") && sandbox.starts_with("vgn_test_"));
    let customer = app.customer().await;
    let (live, sandbox) = (customer.with_key(&live), customer.with_key(&sandbox));
    let id = live.create_webhook_id("https://live.example.com/x").await;
    assert_eq!(
        sandbox.get(&format!("/webhooks/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(sandbox.get("/webhooks").await.1["data"], json!([]));
    // Each environment has its own limit of ten.
    for n in 0..10 {
        sandbox
            .create_webhook(&format!("https://s{n}.example.com/x"))
            .await;
    }
    live.create_webhook("https://live2.example.com/x").await;
}

#[tokio::test]
async fn admin_calls_need_the_admin_token() {
    let app = TestApp::spawn().await;
    let org = app.create_org().await;
    for token in [None, Some("wrong-token-wrong-token"), Some("")] {
        let mut request = app
            .http
            .post(app.url("/admin/organizations"))
            .json(&json!({"name": "x"}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let (status, body) = read(request.send().await.expect("send")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
    }
    // A customer key is not an admin token.
    let customer = app.customer().await;
    let (status, _) = customer
        .post("/admin/organizations", json!({"name": "x"}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Keys for a missing organization: 404; bad environment: 422.
    let missing = "org-00000000-0000-4000-8000-000000000000";
    let response = app
        .http
        .post(app.url(&format!("/admin/organizations/{missing}/api-keys")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"environment": "live"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = app
        .http
        .post(app.url(&format!("/admin/organizations/{org}/api-keys")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"environment": "production"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let response = app
        .http
        .post(app.url("/admin/organizations"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "   "}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // Without a configured token the admin API is closed.
    let closed = TestApp::spawn_with(|c| c.admin_token = None).await;
    let response = closed
        .http
        .post(closed.url("/admin/organizations"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn rate_limit_headers_on_every_response_and_429_past_the_burst() {
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_per_second = std::num::NonZeroU32::new(1).expect("nz");
        c.rate_limit_burst = std::num::NonZeroU32::new(3).expect("nz");
    })
    .await;
    let customer = app.customer().await;
    let other = app.customer().await;
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let response = customer
            .http
            .get(format!(
                "{}/webhooks/wh-00000000-0000-4000-8000-000000000000",
                customer.base
            ))
            .bearer_auth(&customer.key)
            .send()
            .await
            .expect("send");
        // Even a 404 carries the headers.
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()["x-ratelimit-limit"], "3");
        assert!(response.headers().contains_key("x-ratelimit-reset"));
        remaining.push(
            response.headers()["x-ratelimit-remaining"]
                .to_str()
                .expect("s")
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let response = customer
        .http
        .get(format!("{}/webhooks", customer.base))
        .bearer_auth(&customer.key)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("s")
        .parse()
        .expect("n");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(response.headers()["x-ratelimit-remaining"], "0");
    let (_, body) = read(response).await;
    assert_eq!(body["error"]["code"], "rate_limited");
    // Another key is not affected.
    assert_eq!(other.get("/webhooks").await.0, StatusCode::OK);
    // The bucket refills.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(customer.get("/webhooks").await.0, StatusCode::OK);
}
