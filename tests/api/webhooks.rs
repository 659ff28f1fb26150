//! The published webhook-management calls, to the letter of the page and the contract.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

fn is_rfc3339_millis(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && b[23] == b'Z'
        && s[20..23].bytes().all(|c| c.is_ascii_digit())
}

fn is_webhook_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("wh-") else {
        return false;
    };
    rest.len() == 36
        && rest
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c) || c == b'-')
        && &rest[14..15] == "4"
}

#[tokio::test]
async fn create_returns_the_published_shape_with_a_secret_shown_once() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let (status, body) = customer
        .post(
            "/webhooks",
            json!({
                "url": "https://yourapp.com/webhooks/vignetim",
                "events": ["order.completed", "order.failed"],
                "description": "Production order notifications"
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().expect("id");
    assert!(is_webhook_id(id), "{id}");
    assert_eq!(body["url"], "https://yourapp.com/webhooks/vignetim");
    assert_eq!(body["events"], json!(["order.completed", "order.failed"]));
    assert_eq!(body["description"], "Production order notifications");
    assert_eq!(body["active"], true);
    let secret = body["signingSecret"].as_str().expect("secret");
    assert!(secret.starts_with("whs_") && secret.len() == 68, "{secret}");
    assert!(
        secret[4..]
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    );
    assert!(is_rfc3339_millis(
        body["createdAt"].as_str().expect("createdAt")
    ));

    // Never again: not in the list, not in a get.
    let (status, list) = customer.get("/webhooks").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!list.to_string().contains(&secret[4..]));
    let item = &list["data"][0];
    assert_eq!(item["id"], id);
    assert!(item.get("signingSecret").is_none());
    assert_eq!(item["consecutiveFailures"], 0);
    assert!(is_rfc3339_millis(
        item["updatedAt"].as_str().expect("updatedAt")
    ));
    let (status, one) = customer.get(&format!("/webhooks/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&one, item);
    assert!(one.get("signingSecret").is_none());
}

#[tokio::test]
async fn list_is_newest_first_and_wildcard_is_accepted() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let (status, body) = customer
            .post(
                "/webhooks",
                json!({"url": format!("https://hooks{n}.example.com/in"), "events": ["*"]}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["events"], json!(["*"]));
        assert_eq!(body["description"], serde_json::Value::Null);
        ids.push(body["id"].as_str().expect("id").to_owned());
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let (_, list) = customer.get("/webhooks").await;
    let listed: Vec<&str> = list["data"]
        .as_array()
        .expect("array")
        .iter()
        .map(|w| w["id"].as_str().expect("id"))
        .collect();
    ids.reverse();
    assert_eq!(listed, ids);
}

#[tokio::test]
async fn put_changes_only_what_is_given() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let created = customer
        .create_webhook("https://yourapp.com/webhooks/vignetim")
        .await;
    let id = created["id"].as_str().expect("id");
    let path = format!("/webhooks/{id}");

    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (status, updated) = customer
        .put(
            &path,
            json!({"url": "https://yourapp.com/webhooks/vignetim-v2", "events": ["*"], "description": "Updated to receive all events"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["url"], "https://yourapp.com/webhooks/vignetim-v2");
    assert_eq!(updated["events"], json!(["*"]));
    assert_eq!(updated["description"], "Updated to receive all events");
    assert_eq!(updated["createdAt"], created["createdAt"]);
    assert_ne!(updated["updatedAt"], created["createdAt"]);
    assert!(updated.get("signingSecret").is_none());

    // Omitted fields stay; description null clears; active can be set.
    let (status, paused) = customer.put(&path, json!({"active": false})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(paused["active"], false);
    assert_eq!(paused["url"], "https://yourapp.com/webhooks/vignetim-v2");
    assert_eq!(paused["description"], "Updated to receive all events");
    let (_, cleared) = customer.put(&path, json!({"description": null})).await;
    assert_eq!(cleared["description"], serde_json::Value::Null);
    assert_eq!(cleared["active"], false);
    let (_, same) = customer.put(&path, json!({})).await;
    assert_eq!(same, cleared);
    let (_, fetched) = customer.get(&path).await;
    assert_eq!(fetched, cleared);
}

#[tokio::test]
async fn put_refuses_bad_values_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let created = customer
        .create_webhook("https://yourapp.com/webhooks/vignetim")
        .await;
    let id = created["id"].as_str().expect("id");
    let path = format!("/webhooks/{id}");
    let (_, before) = customer.get(&path).await;
    for (body, code, field) in [
        (json!({"url": null}), "invalid_field", "url"),
        (json!({"events": null}), "invalid_field", "events"),
        (json!({"active": null}), "invalid_field", "active"),
        (json!({"url": "http://yourapp.com/x"}), "unsafe_url", "url"),
        (
            json!({"url": "https://10.0.0.1/x", "description": "changed"}),
            "unsafe_url",
            "url",
        ),
        (
            json!({"events": ["order.shipped"], "description": "changed"}),
            "unknown_event_type",
            "events",
        ),
        (json!({"events": []}), "invalid_events", "events"),
        (json!({"active": "yes"}), "invalid_field", "active"),
    ] {
        let (status, error) = customer.put(&path, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {error}"
        );
        assert_eq!(error["error"]["code"], code, "{body}");
        assert_eq!(error["error"]["field"], field, "{body}");
    }
    let (status, error) = customer.put(&path, json!({"secret": "x"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["field"], "secret");
    let (_, after) = customer.get(&path).await;
    assert_eq!(after, before);
}

#[tokio::test]
async fn delete_answers_204_then_the_webhook_is_gone() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let created = customer
        .create_webhook("https://yourapp.com/webhooks/vignetim")
        .await;
    let path = format!("/webhooks/{}", created["id"].as_str().expect("id"));
    let response = customer
        .http
        .delete(format!("{}{}", customer.base, path))
        .bearer_auth(&customer.key)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.bytes().await.expect("body").is_empty());
    for (status, body) in [
        customer.get(&path).await,
        customer.delete(&path).await,
        customer.put(&path, json!({"active": true})).await,
    ] {
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (_, list) = customer.get("/webhooks").await;
    assert_eq!(list["data"], json!([]));
}

#[tokio::test]
async fn create_validates_every_field() {
    let app = TestApp::spawn_with(|c| c.allow_list = Default::default()).await;
    let customer = app.customer().await;
    let cases = [
        (
            json!({"url": "not a url", "events": ["*"]}),
            "invalid_url",
            Some("url"),
        ),
        (
            json!({"url": "http://yourapp.com/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://localhost/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://127.0.0.1/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://[::ffff:127.0.0.1]/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://2130706433/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://0x7f.1/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://169.254.169.254/latest/meta-data", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://192.168.1.10/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://172.16.0.1/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://100.64.0.1/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://[fd00::1]/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://user:pw@yourapp.com/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://intranet/hook", "events": ["*"]}),
            "unsafe_url",
            Some("url"),
        ),
        (
            json!({"url": "https://yourapp.com/hook", "events": []}),
            "invalid_events",
            Some("events"),
        ),
        (
            json!({"url": "https://yourapp.com/hook", "events": ["*", "order.failed"]}),
            "invalid_events",
            Some("events"),
        ),
        (
            json!({"url": "https://yourapp.com/hook", "events": ["order.shipped"]}),
            "unknown_event_type",
            Some("events"),
        ),
        (
            json!({"url": "https://yourapp.com/hook", "events": ["webhook.test"]}),
            "unknown_event_type",
            Some("events"),
        ),
        (
            json!({"url": "https://yourapp.com/hook", "events": ["*"], "description": "x".repeat(501)}),
            "invalid_description",
            Some("description"),
        ),
        (json!({"events": ["*"]}), "missing_field", Some("url")),
        (
            json!({"url": "https://yourapp.com/hook"}),
            "missing_field",
            Some("events"),
        ),
        (
            json!({"url": 42, "events": ["*"]}),
            "invalid_field",
            Some("url"),
        ),
        (
            json!({"url": "https://yourapp.com/hook", "events": "order.failed"}),
            "invalid_field",
            Some("events"),
        ),
        (
            json!({"url": "https://yourapp.com/hook", "events": [1]}),
            "invalid_field",
            Some("events[0]"),
        ),
        (json!([1, 2]), "invalid_field", None),
        (
            json!(["https://yourapp.com/hook", ["*"]]),
            "invalid_field",
            None,
        ),
        (json!("https://yourapp.com/hook"), "invalid_field", None),
    ];
    for (body, code, field) in cases {
        let (status, error) = customer.post("/webhooks", body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {error}"
        );
        assert_eq!(error["error"]["code"], code, "{body} -> {error}");
        match field {
            Some(f) => assert_eq!(error["error"]["field"], f, "{body}"),
            None => assert!(error["error"].get("field").is_none(), "{body}"),
        }
        assert!(
            !error["error"]["message"]
                .as_str()
                .expect("message")
                .is_empty()
        );
    }
    // The unsafe_url message says why.
    let (_, error) = customer
        .post(
            "/webhooks",
            json!({"url": "https://127.0.0.1/hook", "events": ["*"]}),
        )
        .await;
    assert!(
        error["error"]["message"]
            .as_str()
            .expect("m")
            .contains("loopback"),
        "{error}"
    );
    // Nothing was written.
    let (_, list) = customer.get("/webhooks").await;
    assert_eq!(list["data"], json!([]));
}

#[tokio::test]
async fn public_ip_literals_and_names_are_accepted() {
    let app = TestApp::spawn_with(|c| c.allow_list = Default::default()).await;
    let customer = app.customer().await;
    for url in [
        "https://8.8.8.8/hook",
        "https://[2606:4700:4700::1111]/hook",
        "https://hooks.yourapp.com:8443/v1/in?x=1",
        "https://bücher.example/hook",
    ] {
        let (status, body) = customer
            .post("/webhooks", json!({"url": url, "events": ["*"]}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{url}: {body}");
    }
}

#[tokio::test]
async fn loopback_is_refused_when_the_allow_list_is_unset() {
    let app = TestApp::spawn_with(|c| c.allow_list = Default::default()).await;
    let customer = app.customer().await;
    let receiver = TestReceiver::start().await;
    let (status, body) = customer
        .post("/webhooks", json!({"url": receiver.url(), "events": ["*"]}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "unsafe_url");
    // With the allow-list (the default TestApp) the same URL is accepted.
    let open = TestApp::spawn().await;
    open.customer().await.create_webhook(&receiver.url()).await;
}

#[tokio::test]
async fn twenty_racing_creates_make_exactly_ten() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let customer = customer.clone();
            tokio::spawn(async move {
                customer
                    .post(
                        "/webhooks",
                        json!({"url": format!("https://h{n}.example.com/x"), "events": ["*"]}),
                    )
                    .await
            })
        })
        .collect();
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        let (status, body) = task.await.expect("task");
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::UNPROCESSABLE_ENTITY => {
                assert_eq!(body["error"]["code"], "webhook_limit_reached");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((created, refused), (10, 10));
    let (_, list) = customer.get("/webhooks").await;
    assert_eq!(list["data"].as_array().expect("array").len(), 10);

    // Deleting one frees a place; the live environment has its own ten.
    let id = list["data"][0]["id"].as_str().expect("id").to_owned();
    assert_eq!(
        customer.delete(&format!("/webhooks/{id}")).await.0,
        StatusCode::NO_CONTENT
    );
    customer.create_webhook("https://again.example.com/x").await;
    let (status, _) = customer
        .post(
            "/webhooks",
            json!({"url": "https://one-more.example.com/x", "events": ["*"]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn event_types_lists_the_catalog() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let (status, body) = customer.get("/event-types").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = body["data"]
        .as_array()
        .expect("array")
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    assert!(
        names.contains(&"order.completed") && names.contains(&"order.failed"),
        "{names:?}"
    );
    assert!(!names.contains(&"webhook.test"));

    let custom = TestApp::spawn_with(|c| {
        c.catalog = vignetim_webhooks::domain::event_type::Catalog::new([
            "order.completed",
            "esim.activated",
        ])
        .expect("catalog")
    })
    .await;
    let customer = custom.customer().await;
    let (status, _) = customer
        .post(
            "/webhooks",
            json!({"url": "https://a.example.com/", "events": ["esim.activated"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = customer
        .post(
            "/webhooks",
            json!({"url": "https://a.example.com/", "events": ["order.failed"]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}
