//! Crash safety and the operator CLI, against the real binary: `serve` runs as a child
//! process on a temporary data folder (real SQLite) and delivers to a real HTTPS
//! receiver; it is killed for real (SIGKILL, SIGTERM) and started again on the same data.
//! Unix only: the tests send signals.
#![cfg(unix)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_vignetim-webhooks");

/// A data folder and the test CA on disk: what every process of one test shares.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Self {
        install_crypto();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), &pki().ca_pem).expect("write the CA");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The binary with this site's environment and no `VIGNETIM_*` variable of ours.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command.args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("VIGNETIM_") {
                command.env_remove(name);
            }
        }
        command
            .env("VIGNETIM_DATA_DIR", self.path("data"))
            .env("VIGNETIM_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("VIGNETIM_ALLOW_PRIVATE_CIDRS", "127.0.0.0/8")
            .env("VIGNETIM_EXTRA_CA_FILE", self.path("ca.pem"))
            .env("VIGNETIM_DELIVERY_TIMEOUT", "2s")
            .env("VIGNETIM_RETRY_SCHEDULE", "200ms,200ms,200ms")
            .env("VIGNETIM_POLL_INTERVAL", "200ms")
            .env("VIGNETIM_LOG_FORMAT", "json")
            // One runtime thread: the crash and shutdown paths hold with it too.
            .env("VIGNETIM_WORKER_THREADS", "1")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null());
        command
    }

    /// Runs an operator sub-command to completion.
    fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run the CLI")
    }

    /// `serve` on a port of its choosing, once `/readyz` answers 200.
    async fn serve(&self) -> Serve {
        let mut child = self
            .command(&["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let logs = Arc::new(Mutex::new(String::new()));
        let streams = [
            Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("stdout")),
        ];
        let drains = streams
            .into_iter()
            .map(|stream| {
                let logs = Arc::clone(&logs);
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        logs.lock().expect("lock").push_str(&(line + "\n"));
                    }
                })
            })
            .collect();
        let mut serve = Serve {
            child,
            base: String::new(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            logs,
            drains,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let address = loop {
            if let Some(address) = serve.listening_address() {
                break address;
            }
            if let Some(status) = serve.child.try_wait().expect("try_wait") {
                panic!(
                    "serve exited ({status}) before listening:\n{}",
                    serve.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "serve did not listen:\n{}",
                serve.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        serve.base = format!("http://{address}");
        loop {
            if let Ok(r) = serve.http.get(serve.url("/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                break serve;
            }
            assert!(
                Instant::now() < deadline,
                "serve was not ready:\n{}",
                serve.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running `serve` child; killed (SIGKILL) when dropped, so a failing test leaves
/// nothing behind.
struct Serve {
    child: Child,
    base: String,
    http: reqwest::Client,
    logs: Arc<Mutex<String>>,
    drains: Vec<JoinHandle<()>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Serve {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Everything the process wrote so far (JSON log lines).
    fn logs(&self) -> String {
        self.logs.lock().expect("lock").clone()
    }

    /// The address from the `listening` log line.
    fn listening_address(&self) -> Option<String> {
        self.logs().lines().find_map(|line| {
            let entry: Value = serde_json::from_str(line).ok()?;
            (entry["fields"]["message"] == "listening")
                .then(|| entry["fields"]["address"].as_str().map(str::to_owned))
                .flatten()
        })
    }

    /// Sends `signal` (e.g. `-KILL`, `-TERM`) to the process.
    fn signal(&self, signal: &str) {
        signal_pid(self.child.id(), signal);
    }

    /// Waits for the process to exit (failing after `within`), then for its last log
    /// lines; returns how it exited.
    async fn exited(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "serve still runs after {within:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for drain in self.drains.drain(..) {
            drain.join().expect("log drain");
        }
        status
    }

    /// A new organization with a sandbox key, through the admin API.
    async fn customer(&self) -> Customer {
        let post = |path: String, body: Value| {
            self.http
                .post(self.url(&path))
                .bearer_auth(ADMIN_TOKEN)
                .json(&body)
                .send()
        };
        let (status, org) = read(
            post(
                "/admin/organizations".into(),
                json!({"name": "Acme Travel"}),
            )
            .await
            .expect("send"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{org}");
        let org = org["id"].as_str().expect("org id").to_owned();
        let (status, key) = read(
            post(
                format!("/admin/organizations/{org}/api-keys"),
                json!({"environment": "sandbox"}),
            )
            .await
            .expect("send"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        Customer {
            http: self.http.clone(),
            base: self.base.clone(),
            key: key["key"].as_str().expect("key").to_owned(),
            org,
        }
    }
}

fn signal_pid(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}: {status}");
}

/// `POST /admin/events` with the caller's id: whether it was acknowledged (202). A
/// transport error (the service is gone) is `Err`.
async fn publish(
    http: &reqwest::Client,
    base: &str,
    org: &str,
    id: &str,
) -> Result<bool, reqwest::Error> {
    let response = http
        .post(format!("{base}/admin/events"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "organizationId": org,
            "environment": "sandbox",
            "type": "order.completed",
            "data": {"orderId": id},
            "id": id,
        }))
        .send()
        .await?;
    // The status line comes after the commit: a 202 is a promise, whatever the body.
    Ok(response.status() == StatusCode::ACCEPTED)
}

/// How many requests the receiver got per `webhook-id`.
fn received_counts(receiver: &TestReceiver) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in receiver.requests() {
        let id = request.headers["webhook-id"]
            .to_str()
            .expect("ascii webhook-id")
            .to_owned();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Waits until the receiver got every id in `ids` at least once; `Err` with the ids
/// still missing after `within`.
async fn all_received(
    receiver: &TestReceiver,
    ids: &[String],
    within: Duration,
) -> Result<HashMap<String, usize>, Vec<String>> {
    let deadline = Instant::now() + within;
    loop {
        let counts = received_counts(receiver);
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(counts);
        }
        if Instant::now() >= deadline {
            return Err(missing);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An event acknowledged with 202 survives a SIGKILL at any moment: killed in the middle
/// of a concurrent burst of publishes (and of deliveries), then started again on the same
/// data, the service delivers every acknowledged event at least once, correctly signed;
/// and neither run logs the signing secret or the API key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_burst_loses_no_accepted_event() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 40;
    const KILL_AT: usize = 100;
    let started = Instant::now();
    let site = Site::new();
    let receiver = TestReceiver::start().await;
    let mut first = site.serve().await;
    let customer = first.customer().await;
    let created = customer.create_webhook(&receiver.url()).await;
    let secret = created["signingSecret"]
        .as_str()
        .expect("secret")
        .to_owned();

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let pid = first.child.id();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (http, base, org) = (first.http.clone(), first.base.clone(), customer.org.clone());
        let (acknowledged, count) = (Arc::clone(&acknowledged), Arc::clone(&count));
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_TASK {
                let id = format!("burst-{task}-{n}");
                match publish(&http, &base, &org, &id).await {
                    Ok(true) => {
                        acknowledged.lock().expect("lock").push(id);
                        // The publish that crosses the mark kills the service, while the
                        // other tasks have requests in flight.
                        if count.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AT {
                            signal_pid(pid, "-KILL");
                        }
                    }
                    // Refused or cut off: not acknowledged, so not promised. The service
                    // is gone; this task stops.
                    Ok(false) | Err(_) => return false,
                }
            }
            true
        }));
    }
    let mut cut_off = 0;
    for task in tasks {
        if !task.await.expect("publisher") {
            cut_off += 1;
        }
    }
    let status = first.exited(Duration::from_secs(10)).await;
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "not killed by SIGKILL: {status}");
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    let delivered_before_restart = received_counts(&receiver).len();
    assert!(acknowledged.len() >= KILL_AT, "{}", acknowledged.len());
    assert!(
        acknowledged.len() < TASKS * PER_TASK && cut_off > 0,
        "the kill was not mid-burst: {} acknowledged, {cut_off} publishers cut off",
        acknowledged.len()
    );

    let mut second = site.serve().await;
    let counts = match all_received(&receiver, &acknowledged, Duration::from_secs(20)).await {
        Ok(counts) => counts,
        Err(missing) => panic!(
            "{} of {} acknowledged events never arrived, e.g. {:?}\nlogs after restart:\n{}",
            missing.len(),
            acknowledged.len(),
            &missing[..missing.len().min(10)],
            second.logs()
        ),
    };
    for request in receiver.requests() {
        assert_signed_by(&request, &secret);
        let body: Value = serde_json::from_slice(&request.body).expect("json body");
        assert_eq!(
            body["id"],
            request.headers["webhook-id"].to_str().expect("id")
        );
        assert_eq!(body["data"]["orderId"], body["id"]);
        assert_eq!(body["type"], "order.completed");
    }
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    println!(
        "kill -9 mid-burst: {} acknowledged before the kill, {} delivered before the \
         restart, {} distinct received in all ({} acknowledged + {} unacknowledged \
         in flight at the kill), {} duplicate deliveries, {cut_off} of {TASKS} publishers \
         cut off, {:?}",
        acknowledged.len(),
        delivered_before_restart,
        counts.len(),
        acknowledged.len(),
        counts.len() - acknowledged.len(),
        duplicates,
        started.elapsed()
    );

    second.signal("-TERM");
    let status = second.exited(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}:\n{}", second.logs());
    for (run, logs) in [("first", first.logs()), ("second", second.logs())] {
        assert!(
            logs.contains("listening"),
            "{run} run logged nothing?\n{logs}"
        );
        for secret_text in [&secret[4..], &customer.key[9..], ADMIN_TOKEN] {
            assert!(
                !logs.contains(secret_text),
                "a secret reached the {run} run's logs:\n{logs}"
            );
        }
    }
}

/// `verify` checks a real delivery the way a receiver would: valid with the `whs_`
/// secret and with its `whsec_` form; invalid (exit 1) with a tampered body, another
/// webhook's secret, or a timestamp outside the tolerance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_verify_checks_a_real_delivery() {
    let site = Site::new();
    let receiver = TestReceiver::start().await;
    let serve = site.serve().await;
    let customer = serve.customer().await;
    let created = customer.create_webhook(&receiver.url()).await;
    let secret = created["signingSecret"].as_str().expect("secret");
    let published = publish(&serve.http, &serve.base, &customer.org, "verify-me-1")
        .await
        .expect("send");
    assert!(published);
    all_received(&receiver, &["verify-me-1".into()], Duration::from_secs(10))
        .await
        .expect("delivered");
    let request = receiver.requests().remove(0);
    let header = |name: &str| request.headers[name].to_str().expect("ascii").to_owned();
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    assert_eq!(id, "verify-me-1");

    let body_file = site.path("body.json");
    std::fs::write(&body_file, &request.body).expect("write body");
    let tampered_file = site.path("tampered.json");
    let text = String::from_utf8(request.body.to_vec()).expect("utf-8 body");
    assert!(text.contains(r#""orderId":"verify-me-1""#), "{text}");
    std::fs::write(
        &tampered_file,
        text.replace(r#""orderId":"verify-me-1""#, r#""orderId":"verify-me-2""#),
    )
    .expect("write tampered body");
    let verify = |secret: &str, body: &Path, extra: &[&str]| {
        let body = body.to_str().expect("utf-8 path");
        let mut args = vec![
            "verify",
            "--secret",
            secret,
            "--id",
            &id,
            "--timestamp",
            &timestamp,
            "--signature",
            &signature,
            "--body-file",
            body,
        ];
        args.extend_from_slice(extra);
        site.cli(&args)
    };
    let expect_valid = |out: Output, case: &str| {
        assert_eq!(
            (out.status.code(), stdout(&out).trim()),
            (Some(0), "valid"),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let expect_invalid = |out: Output, case: &str| {
        assert_eq!(out.status.code(), Some(1), "{case}: {}", stdout(&out));
        assert!(
            stdout(&out).starts_with("invalid:"),
            "{case}: stdout {:?}, stderr {:?}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
    };

    expect_valid(verify(secret, &body_file, &[]), "the whs_ secret");
    let key = hex::decode(&secret[4..]).expect("hex secret");
    let whsec = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    expect_valid(verify(&whsec, &body_file, &[]), "the whsec_ form");
    // The official library agrees with the CLI.
    assert_signed_by(&request, secret);

    expect_invalid(verify(secret, &tampered_file, &[]), "a tampered body");
    let other = customer.create_webhook(&receiver.url()).await;
    let other_secret = other["signingSecret"].as_str().expect("secret");
    assert_ne!(other_secret, secret);
    expect_invalid(verify(other_secret, &body_file, &[]), "another secret");
    let late = (timestamp.parse::<i64>().expect("timestamp") + 600).to_string();
    expect_invalid(
        verify(secret, &body_file, &["--now", &late]),
        "ten minutes later",
    );
    expect_valid(
        verify(secret, &body_file, &["--now", &late, "--tolerance", "15m"]),
        "ten minutes later with a 15 min tolerance",
    );
}

/// `event publish` writes to the data folder of a running service, which delivers the
/// event within its poll interval; publishing the same id again answers the same and
/// delivers nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_event_publish_is_delivered_by_a_running_service() {
    let site = Site::new();
    let receiver = TestReceiver::start().await;
    let serve = site.serve().await;
    let customer = serve.customer().await;
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    let publish = || {
        let out = site.cli(&[
            "event",
            "publish",
            "--org",
            &customer.org,
            "--environment",
            "sandbox",
            "--type",
            "order.completed",
            "--data",
            r#"{"orderId":"ord-cli-1"}"#,
            "--id",
            "cli-evt-1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).expect("json on stdout")
    };

    assert_eq!(publish(), json!({"id": "cli-evt-1", "deliveries": 1}));
    all_received(&receiver, &["cli-evt-1".into()], Duration::from_secs(10))
        .await
        .unwrap_or_else(|_| panic!("not delivered:\n{}", serve.logs()));
    let request = receiver.requests().remove(0);
    let body: Value = serde_json::from_slice(&request.body).expect("json body");
    assert_eq!(body["id"], "cli-evt-1");
    assert_eq!(body["type"], "order.completed");
    assert_eq!(body["data"], json!({"orderId": "ord-cli-1"}));

    assert_eq!(publish(), json!({"id": "cli-evt-1", "deliveries": 1}));
    // Five poll intervals: time enough for a second delivery, were there one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.requests().len(), 1);
    let (status, log) = customer
        .get(&format!("/webhooks/{webhook}/deliveries"))
        .await;
    assert_eq!(status, StatusCode::OK, "{log}");
    let deliveries = log["data"].as_array().expect("data");
    assert_eq!(deliveries.len(), 1, "{log}");
    assert_eq!(deliveries[0]["eventId"], "cli-evt-1");
    assert_eq!(deliveries[0]["status"], "succeeded", "{log}");
    assert_eq!(deliveries[0]["attemptCount"], 1, "{log}");
}

/// SIGTERM right after a batch of publishes: the service stops promptly and cleanly
/// (exit 0), and what it had sent it had recorded: after a restart every event has
/// arrived exactly once, none lost, none sent twice. (The receiver answers at once, so
/// attempts may or may not be in flight at the signal; the next test makes sure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_attempts_finish() {
    const EVENTS: usize = 20;
    let site = Site::new();
    let receiver = TestReceiver::start().await;
    let mut first = site.serve().await;
    let customer = first.customer().await;
    let secret = customer.create_webhook(&receiver.url()).await["signingSecret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let ids: Vec<String> = (0..EVENTS).map(|n| format!("term-{n}")).collect();
    for id in &ids {
        let accepted = publish(&first.http, &first.base, &customer.org, id)
            .await
            .expect("send");
        assert!(accepted, "{id} not accepted");
    }
    first.signal("-TERM");
    let stopping = Instant::now();
    let status = first.exited(Duration::from_secs(10)).await;
    let stopped_in = stopping.elapsed();
    assert!(status.success(), "{status}:\n{}", first.logs());
    assert!(first.logs().contains("shutting down"), "{}", first.logs());
    let before_restart = received_counts(&receiver).len();

    let mut second = site.serve().await;
    let counts = match all_received(&receiver, &ids, Duration::from_secs(15)).await {
        Ok(counts) => counts,
        Err(missing) => panic!("lost {missing:?}\nlogs after restart:\n{}", second.logs()),
    };
    println!(
        "SIGTERM: stopped in {stopped_in:?}; {before_restart} of {EVENTS} delivered before \
         the restart"
    );
    // Give the restarted service time to send anything it would send twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts_later = received_counts(&receiver);
    assert_eq!(counts, counts_later);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "sent again after a clean shutdown: {twice:?}"
    );
    assert_eq!(counts.len(), EVENTS, "{counts:?}");
    for request in receiver.requests() {
        assert_signed_by(&request, &secret);
    }
    second.signal("-TERM");
    assert!(second.exited(Duration::from_secs(10)).await.success());
}

/// SIGTERM while attempts certainly are in flight (the receiver never answers): the
/// service waits for them to end (the 2 s attempt timeout) before it exits 0, and records
/// them; after a restart, with the receiver answering, each event is delivered on its
/// second attempt, and the delivery log shows the timed-out first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_hanging_attempts_and_records_them() {
    let ids: Vec<String> = (0..3).map(|n| format!("hang-{n}")).collect();
    let site = Site::new();
    let receiver = TestReceiver::start().await;
    receiver.set(Respond::Hang);
    let mut first = site.serve().await;
    let customer = first.customer().await;
    let webhook = customer.create_webhook_id(&receiver.url()).await;
    let publishing = Instant::now();
    for id in &ids {
        let accepted = publish(&first.http, &first.base, &customer.org, id)
            .await
            .expect("send");
        assert!(accepted, "{id} not accepted");
    }
    all_received(&receiver, &ids, Duration::from_secs(5))
        .await
        .unwrap_or_else(|missing| panic!("never sent {missing:?}:\n{}", first.logs()));
    first.signal("-TERM");
    let status = first.exited(Duration::from_secs(10)).await;
    let stopped_after = publishing.elapsed();
    assert!(status.success(), "{status}:\n{}", first.logs());
    // Every attempt started after `publishing` and lasts its whole 2 s timeout.
    assert!(
        stopped_after >= Duration::from_millis(1900),
        "exited {stopped_after:?} after publishing: it did not wait for the attempts"
    );

    let hung = receiver.requests().len();
    receiver.set(Respond::Status(200, "ok"));
    let mut second = site.serve().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answered: Vec<String> = receiver.requests()[hung..]
            .iter()
            .map(|r| r.headers["webhook-id"].to_str().expect("id").to_owned())
            .collect();
        if ids.iter().all(|id| answered.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered after the restart: got {answered:?}\n{}",
            second.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let customer = Customer {
        http: second.http.clone(),
        base: second.base.clone(),
        ..customer
    };
    // The receiver has its requests a moment before the service records the outcome.
    let log = eventually(Duration::from_secs(5), || async {
        let (status, log) = customer
            .get(&format!("/webhooks/{webhook}/deliveries"))
            .await;
        assert_eq!(status, StatusCode::OK, "{log}");
        let data = log["data"].as_array().expect("data");
        (data.len() == ids.len() && data.iter().all(|d| d["status"] == "succeeded")).then_some(log)
    })
    .await;
    for delivery in log["data"].as_array().expect("data") {
        let id = delivery["id"].as_str().expect("delivery id");
        let (status, detail) = customer
            .get(&format!("/webhooks/{webhook}/deliveries/{id}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{detail}");
        assert_eq!(detail["status"], "succeeded", "{detail}");
        assert_eq!(detail["attemptCount"], 2, "{detail}");
        let attempts = detail["attempts"].as_array().expect("attempts");
        let outcomes: Vec<(Value, Value)> = attempts
            .iter()
            .map(|a| (a["statusCode"].clone(), a["failure"].clone()))
            .collect();
        assert!(
            outcomes.contains(&(Value::Null, json!("timeout")))
                && outcomes.contains(&(json!(200), Value::Null))
                && outcomes.len() == 2,
            "{detail}"
        );
    }
    println!("SIGTERM with 3 hanging attempts: exited {stopped_after:?} after publishing");
    second.signal("-TERM");
    assert!(second.exited(Duration::from_secs(10)).await.success());
}
