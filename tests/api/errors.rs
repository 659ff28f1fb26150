//! One error shape for every failure, the framework's own included.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

fn assert_error_shape(body: &Value, code: &str, request_id: &str) {
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(!error["message"].as_str().expect("message").is_empty());
    assert_eq!(error["requestId"], request_id, "{body}");
    let keys: Vec<&String> = body.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["error"]);
}

async fn raw(
    app: &TestApp,
    key: &str,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, String, Value) {
    let mut request = app
        .http
        .request(method, app.url(path))
        .bearer_auth(key)
        .body(body);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.send().await.expect("send");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    assert!(request_id.starts_with("req_"), "{request_id}");
    let (status, body) = read(response).await;
    (status, request_id, body)
}

/// Method, path, content type, body, expected status, expected code.
type Case<'a> = (
    reqwest::Method,
    &'a str,
    Option<&'a str>,
    Vec<u8>,
    StatusCode,
    &'a str,
);

#[tokio::test]
async fn framework_and_body_errors_are_json_with_the_request_id() {
    let app = TestApp::spawn().await;
    let key = app.customer().await.key;
    let json = Some("application/json");
    let post = reqwest::Method::POST;
    let cases: Vec<Case> = vec![
        (
            reqwest::Method::GET,
            "/no/such/route",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            reqwest::Method::PATCH,
            "/webhooks",
            None,
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            post.clone(),
            "/webhooks",
            json,
            b"{\"url\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            post.clone(),
            "/webhooks",
            json,
            b"".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            post.clone(),
            "/webhooks",
            json,
            b"{} trailing".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            post.clone(),
            "/webhooks",
            json,
            br#"{"url":"https://a.example.com/","events":["*"],"secret":"x"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            post.clone(),
            "/webhooks",
            Some("text/plain"),
            br#"{"url":"https://a.example.com/","events":["*"]}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post.clone(),
            "/webhooks",
            None,
            br#"{"url":"https://a.example.com/","events":["*"]}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post.clone(),
            "/webhooks",
            json,
            vec![b' '; 1024 * 1024 + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (method, path, ct, body, status, code) in cases {
        let (got, request_id, error) = raw(&app, &key, method.clone(), path, ct, body).await;
        assert_eq!(got, status, "{method} {path}: {error}");
        assert_error_shape(&error, code, &request_id);
    }
    let (_, _, unknown) = raw(
        &app,
        &key,
        post,
        "/webhooks",
        json,
        br#"{"url":"https://a.example.com/","events":["*"],"secret":"x"}"#.to_vec(),
    )
    .await;
    assert_eq!(unknown["error"]["field"], "secret");
    // Nothing was created by any of it.
    let customer = app.customer().await.with_key(&key);
    assert_eq!(
        customer.get("/webhooks").await.1["data"],
        serde_json::json!([])
    );
}

#[tokio::test]
async fn customer_paths_authenticate_before_routing_errors() {
    let app = TestApp::spawn().await;
    let key = app.customer().await.key;
    for (method, path) in [
        (reqwest::Method::DELETE, "/webhooks"),
        (
            reqwest::Method::GET,
            "/webhooks/wh-00000000-0000-4000-8000-000000000000/nope",
        ),
    ] {
        // Without a key: 401, whatever the route would have said.
        let response = app
            .http
            .request(method.clone(), app.url(path))
            .send()
            .await
            .expect("send");
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        assert!(response.headers().contains_key("x-ratelimit-remaining"));
        // With one: the routing error, still with the rate-limit headers.
        let response = app
            .http
            .request(method.clone(), app.url(path))
            .bearer_auth(&key)
            .send()
            .await
            .expect("send");
        assert!(
            [StatusCode::METHOD_NOT_ALLOWED, StatusCode::NOT_FOUND].contains(&response.status()),
            "{method} {path}: {}",
            response.status()
        );
        assert!(response.headers().contains_key("x-ratelimit-remaining"));
    }
}

#[tokio::test]
async fn a_body_just_under_the_cap_is_read() {
    let app = TestApp::spawn().await;
    let key = app.customer().await.key;
    let mut body = br#"{"url":"https://a.example.com/","events":["*"],"description":"d"}"#.to_vec();
    let pad = 1024 * 1024 - body.len();
    body.extend(std::iter::repeat_n(b' ', pad));
    let (status, _, response) = raw(
        &app,
        &key,
        reqwest::Method::POST,
        "/webhooks",
        Some("application/json"),
        body,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{response}");
}

#[tokio::test]
async fn every_response_has_a_request_id() {
    let app = TestApp::spawn().await;
    let customer = app.customer().await;
    let mut seen = std::collections::HashSet::new();
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/webhooks",
        "/nope",
    ] {
        let response = app
            .http
            .get(app.url(path))
            .bearer_auth(&customer.key)
            .send()
            .await
            .expect("send");
        let id = response.headers()["x-request-id"]
            .to_str()
            .expect("id")
            .to_owned();
        assert!(seen.insert(id), "request ids repeat");
    }
}
