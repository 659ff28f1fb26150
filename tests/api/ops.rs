//! Health, readiness, metrics, the OpenAPI document, and the binary itself.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::spawn().await;
    let (status, body) = read(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = read(app.http.get(app.url("/readyz")).send().await.expect("send")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ready"})));
    let customer = app.customer().await;
    customer.get("/webhooks").await;
    customer
        .get("/webhooks/wh-00000000-0000-4000-8000-000000000000")
        .await;
    let text = app.metrics().await;
    assert!(
        text.contains(
            r#"vignetim_http_requests_total{method="GET",route="/webhooks",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"route="/webhooks/{id}",status="404""#),
        "{text}"
    );
    assert!(
        text.contains("vignetim_http_request_duration_seconds_bucket"),
        "{text}"
    );
    // Raw paths (ids) never become labels.
    assert!(!text.contains("wh-00000000"), "{text}");
}

/// The OpenAPI document is generated from the code; this snapshot shows every change to
/// the public contract in review. Regenerate with `UPDATE_SNAPSHOTS=1 cargo test`.
#[tokio::test]
async fn openapi_document_matches_the_snapshot() {
    let app = TestApp::spawn().await;
    let (status, doc) = read(
        app.http
            .get(app.url("/openapi.json"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/webhooks",
        "/webhooks/{id}",
        "/webhooks/{id}/test",
        "/admin/organizations",
        "/event-types",
    ] {
        assert!(doc["paths"].get(path).is_some(), "missing {path}");
    }
    let props = &doc["components"]["schemas"]["WebhookOut"]["properties"];
    for field in [
        "id",
        "url",
        "events",
        "description",
        "active",
        "consecutiveFailures",
        "createdAt",
        "updatedAt",
    ] {
        assert!(props.get(field).is_some(), "WebhookOut.{field}");
    }
    let snapshot_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots/openapi.json");
    let rendered = serde_json::to_string_pretty(&doc).expect("json") + "\n";
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(snapshot_path, &rendered).expect("write snapshot");
    }
    let snapshot =
        std::fs::read_to_string(snapshot_path).expect("snapshot exists (UPDATE_SNAPSHOTS=1)");
    let expected: Value = serde_json::from_str(&snapshot).expect("snapshot json");
    assert!(
        expected == doc,
        "OpenAPI document changed; review and rerun with UPDATE_SNAPSHOTS=1"
    );
}

/// The real binary: the CLI makes an organization and a key in a data folder, `serve`
/// runs on it with no other set-up, and nothing secret reaches the logs.
#[tokio::test]
async fn binary_cli_and_serve_keep_secrets_out_of_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let bin = env!("CARGO_BIN_EXE_vignetim-webhooks");
    let run = |args: &[&str]| -> Value {
        let out = Command::new(bin)
            .args(args)
            .env("VIGNETIM_DATA_DIR", &data)
            .env_remove("VIGNETIM_DATABASE_URL")
            .env_remove("VIGNETIM_ENCRYPTION_KEY")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let org = run(&["org", "create", "--name", "Acme Travel"]);
    let org_id = org["id"].as_str().expect("id");
    assert!(org_id.starts_with("org-"));
    let key = run(&["key", "create", "--org", org_id, "--environment", "live"]);
    let key_text = key["key"].as_str().expect("key").to_owned();
    assert!(key_text.starts_with("vgn_live_"));

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = Command::new(bin)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("VIGNETIM_DATA_DIR", &data)
        .env("VIGNETIM_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "debug")
        .env_remove("VIGNETIM_DATABASE_URL")
        .env_remove("VIGNETIM_ENCRYPTION_KEY")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let stdout = child.stdout.take().expect("stdout");
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    for stream in [
        Box::new(stderr) as Box<dyn std::io::Read + Send>,
        Box::new(stdout),
    ] {
        let logs = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                logs.lock().expect("lock").push_str(&(line + "\n"));
            }
        });
    }
    install_crypto();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == StatusCode::OK
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ready,
        "serve did not become ready: {}",
        logs.lock().expect("lock")
    );
    let customer = Customer {
        http: http.clone(),
        base: base.clone(),
        key: key_text.clone(),
        org: org_id.to_owned(),
    };
    let created = customer
        .create_webhook("https://yourapp.com/webhooks/vignetim")
        .await;
    let secret = created["signingSecret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let (status, _) = customer.get("/webhooks").await;
    assert_eq!(status, StatusCode::OK);
    let admin_key = read(
        http.post(format!("{base}/admin/organizations/{org_id}/api-keys"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"environment": "sandbox"}))
            .send()
            .await
            .expect("send"),
    )
    .await
    .1["key"]
        .as_str()
        .expect("key")
        .to_owned();

    // The encryption key was generated once, owner-only.
    let key_file = data.join("encryption.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // SIGTERM: a clean, prompt exit.
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = child.try_wait().expect("wait") {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = exited.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("serve did not stop on SIGTERM")
    });
    assert!(status.success(), "{status:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = logs.lock().expect("lock").clone();
    assert!(logs.contains("listening"), "{logs}");
    assert!(logs.contains("webhook created"), "{logs}");
    for secret_text in [&secret[4..], &key_text[9..], &admin_key[9..], ADMIN_TOKEN] {
        assert!(
            !logs.contains(secret_text),
            "a secret reached the logs: {logs}"
        );
    }
    let encryption_key = std::fs::read_to_string(&key_file).expect("key");
    assert!(!logs.contains(encryption_key.trim()));
}
