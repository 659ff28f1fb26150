//! `vignetim-bench`: a reproducible delivery benchmark (not a test).
//!
//! It runs the service as a child process (this same executable, re-run as `serve`, so
//! the benchmark always measures the code it was built from), a fast local HTTPS
//! receiver (hyper + rustls, keep-alive, HTTP/1.1 and HTTP/2) and a load generator, all on
//! this machine, and prints a table and one `RESULT {json}` line per scenario.
//!
//! Scenarios: `api`, `publish`, `e2e`, `ceiling` (measured inside each e2e repetition, the
//! ratio's denominator, with a line of its own), `hang10`.
//! See BENCHMARKS.md for the method.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

/// The service's allocator (this executable is also the service under test, and the
/// ceiling's bare client must not be held down by a slower one: BENCHMARKS.md, step 15).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Figures whose lowest and highest repetitions are reported beside the median
/// (`ratio_min`, `ratio_max`, ...): the ratios the targets are set on.
const SPREAD: [&str; 2] = ["ratio", "healthy_ratio"];

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
const WEBHOOKS: usize = 10;

#[derive(Debug, Parser)]
#[command(
    name = "vignetim-bench",
    about = "Delivery benchmark for Vignetim Webhooks"
)]
struct Args {
    /// A short run (under 3 minutes): one repetition, shorter phases.
    #[arg(long)]
    quick: bool,
    /// Storage backend of the service under test.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Database URL for a server backend.
    #[arg(long)]
    database: Option<String>,
    /// Only these scenarios (comma-separated: api,publish,e2e,hang10). The ceiling is
    /// measured inside e2e, which prints its line too.
    #[arg(long, default_value = "api,publish,e2e,hang10")]
    scenarios: String,
    /// Repetitions of each scenario (medians are reported); default 3, 1 with --quick.
    #[arg(long)]
    repeat: Option<usize>,
    /// Measure e2e latency at this many deliveries per second instead of half the peak
    /// (for diagnosis).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Events in the e2e peak burst (each goes to 10 webhooks); default 3,000, 1,000 with
    /// --quick.
    #[arg(long)]
    e2e_events: Option<usize>,
    /// Events in the e2e warm-up burst, sent and recorded before the measured peak (0: the
    /// peak meets a cold service); default as many as the peak's.
    #[arg(long)]
    e2e_warmup_events: Option<usize>,
    /// Events in each hang10 burst (each goes to 9 healthy webhooks and the hanging one);
    /// default 3,000, 1,000 with --quick.
    #[arg(long)]
    hang_events: Option<usize>,
    /// Run the service under valgrind's callgrind and count the instructions it executes
    /// during each e2e peak (`service_instructions_per_delivery`); the profiles are left
    /// in this directory for `callgrind_annotate`. Repeatable counts to compare two builds
    /// by; the timings of such a run mean nothing (BENCHMARKS.md, "Counting instructions").
    #[arg(long, value_name = "DIR")]
    callgrind: Option<PathBuf>,
    /// Concurrent publishers in the e2e peak (under callgrind, 2 keep every delivery on
    /// the handover path, as at the native peak).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    publishers: u16,
}

fn main() -> ExitCode {
    // Re-run as the service under test.
    if std::env::args().nth(1).as_deref() == Some("serve") {
        return vignetim_webhooks::cli::main();
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Phase lengths.
struct Plan {
    latency_rate: Option<f64>,
    repeat: usize,
    api_secs: u64,
    publish_secs: u64,
    e2e_events: usize,
    /// Events in the e2e warm-up burst; as many as the peak's when not given.
    e2e_warmup_events: Option<usize>,
    latency_secs: u64,
    hang_events: usize,
    publishers: usize,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.backend != "sqlite" {
        bail!(
            "backend {:?} is not available yet (sqlite only)",
            args.backend
        );
    }
    let plan = if args.quick {
        Plan {
            latency_rate: args.latency_rate,
            repeat: args.repeat.unwrap_or(1),
            api_secs: 3,
            publish_secs: 3,
            e2e_events: args.e2e_events.unwrap_or(1_000),
            e2e_warmup_events: args.e2e_warmup_events,
            latency_secs: 5,
            hang_events: args.hang_events.unwrap_or(1_000),
            publishers: usize::from(args.publishers),
        }
    } else {
        Plan {
            latency_rate: args.latency_rate,
            repeat: args.repeat.unwrap_or(3),
            api_secs: 8,
            publish_secs: 8,
            e2e_events: args.e2e_events.unwrap_or(3_000),
            e2e_warmup_events: args.e2e_warmup_events,
            latency_secs: 15,
            hang_events: args.hang_events.unwrap_or(3_000),
            publishers: usize::from(args.publishers),
        }
    };
    let scenarios: Vec<&str> = args.scenarios.split(',').map(str::trim).collect();
    // Checked before anything runs: a typo should not cost the scenarios before it.
    for scenario in &scenarios {
        match *scenario {
            "api" | "publish" | "e2e" | "hang10" => {}
            "ceiling" => bail!("the ceiling is measured inside e2e: --scenarios e2e"),
            other => bail!("unknown scenario {other:?} (api, publish, e2e, hang10)"),
        }
    }
    let work = std::env::temp_dir().join(format!("vignetim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let pki = Pki::new()?;
    let ca_file = work.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem)?;
    let receiver = Receiver::start(&pki).await?;
    let callgrind = match &args.callgrind {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            Some(std::path::absolute(dir)?)
        }
        None => None,
    };
    println!(
        "vignetim-bench: {} cores ({}), backend {}, {} repetition(s)",
        num_cpus(),
        cpu_model(),
        args.backend,
        plan.repeat
    );
    if let Some(dir) = &callgrind {
        println!(
            "the service runs under callgrind (profiles in {}): compare \
             service_instructions_per_delivery; its timings mean nothing",
            dir.display()
        );
    }
    let ctx = Ctx {
        work: work.clone(),
        ca_file,
        receiver,
        database: args.database.clone(),
        callgrind,
    };
    let mut results: Vec<Value> = Vec::new();
    let mut peak_rss_kib = 0u64;
    for scenario in &scenarios {
        let mut runs: Vec<BTreeMap<String, f64>> = Vec::new();
        let mut scenario_rss_kib = 0u64;
        for _ in 0..plan.repeat {
            let (figures, rss) = match *scenario {
                "api" => scenario_api(&ctx, &plan).await?,
                "publish" => scenario_publish(&ctx, &plan).await?,
                "e2e" => scenario_e2e(&ctx, &plan).await?,
                "hang10" => scenario_hang10(&ctx, &plan).await?,
                other => bail!("unknown scenario {other:?}"),
            };
            peak_rss_kib = peak_rss_kib.max(rss);
            scenario_rss_kib = scenario_rss_kib.max(rss);
            runs.push(figures);
        }
        let mut line = summary(scenario, &args.backend, &runs);
        // The service's peak over this scenario's repetitions (the memory line: the run's).
        line.insert(
            "peak_rss_mib".into(),
            json!(round3(scenario_rss_kib as f64 / 1024.0)),
        );
        let mut lines = vec![line];
        // The ceiling is measured inside each e2e repetition (the ratio needs both from
        // the same run) and gets a line of its own, with the bare client's figures.
        if *scenario == "e2e" {
            lines.push(ceiling_summary(&args.backend, &runs));
        }
        for line in lines {
            print_table_row(&line);
            println!("RESULT {}", Value::Object(line.clone()));
            results.push(Value::Object(line));
        }
    }
    println!(
        "peak service RSS across the run: {:.1} MiB",
        peak_rss_kib as f64 / 1024.0
    );
    println!(
        "RESULT {}",
        json!({"scenario": "memory", "backend": args.backend, "peak_rss_mib": round3(peak_rss_kib as f64 / 1024.0)})
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// A scenario's result line: the median of each figure over the repetitions, and the
/// lowest and highest of the targets' ratios.
fn summary(
    scenario: &str,
    backend: &str,
    runs: &[BTreeMap<String, f64>],
) -> serde_json::Map<String, Value> {
    let mut line = serde_json::Map::new();
    line.insert("scenario".into(), json!(scenario));
    line.insert("backend".into(), json!(backend));
    line.insert("runs".into(), json!(runs.len()));
    let Some(first) = runs.first() else {
        return line;
    };
    for key in first.keys() {
        let mut values: Vec<f64> = runs.iter().filter_map(|r| r.get(key).copied()).collect();
        line.insert(key.clone(), json!(round3(median(&mut values))));
        // The targets' spread over the repetitions (`median` sorted them): on a noisy
        // host a median of three can sit anywhere in a wide range.
        if SPREAD.contains(&key.as_str()) && values.len() > 1 {
            line.insert(format!("{key}_min"), json!(round3(values[0])));
            line.insert(
                format!("{key}_max"),
                json!(round3(values[values.len() - 1])),
            );
        }
    }
    line
}

/// The `ceiling` line, from the `ceiling_` figures of the e2e repetitions: the bare
/// client's requests/s (`ceiling_per_s`), its lowest try, the CPU of the bare client
/// and the receiver per 1,000 requests, and, there being no service in between, the
/// peak RSS of the process that holds them.
fn ceiling_summary(
    backend: &str,
    e2e_runs: &[BTreeMap<String, f64>],
) -> serde_json::Map<String, Value> {
    let runs: Vec<BTreeMap<String, f64>> = e2e_runs
        .iter()
        .map(|run| {
            run.iter()
                .filter_map(|(key, value)| {
                    let name = match key.as_str() {
                        "ceiling_per_s" => "ceiling_per_s",
                        "ceiling_peak_rss_mib" => "peak_rss_mib",
                        other => other.strip_prefix("ceiling_")?,
                    };
                    Some((name.to_owned(), *value))
                })
                .collect()
        })
        .collect();
    summary("ceiling", backend, &runs)
}

struct Ctx {
    work: PathBuf,
    ca_file: PathBuf,
    receiver: Arc<Receiver>,
    database: Option<String>,
    /// Where the service's callgrind profiles go, when it runs under callgrind.
    callgrind: Option<PathBuf>,
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU's model name (`/proc/cpuinfo`): the shared host is not always the same kind of
/// machine, and runs on different kinds do not compare (BENCHMARKS.md, "The machine").
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_table_row(line: &serde_json::Map<String, Value>) {
    let figures: Vec<String> = line
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "scenario" | "backend"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "{:<10} {}",
        line["scenario"].as_str().unwrap_or("?"),
        figures.join("  ")
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------
// The service under test, as a child process.

struct Service {
    child: Child,
    base: String,
    /// Set-up calls and the completion checks.
    http: reqwest::Client,
    /// The publishers' client: hyper-util's, keep-alive, without reqwest's layers
    /// (redirects, retries, a URL parsed per request) and with the body written directly
    /// rather than built as a JSON value: the benchmark's own CPU during the e2e peak fell
    /// by about a tenth (BENCHMARKS.md, step 29), machine time the service gets back.
    publisher: PublishClient,
    events_uri: http::Uri,
    admin_bearer: http::HeaderValue,
    dir: PathBuf,
    /// Where its callgrind profiles go when it runs under callgrind (instruction counting
    /// off until a peak turns it on).
    callgrind: Option<PathBuf>,
}

type PublishClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

impl Service {
    async fn start(ctx: &Ctx, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = ctx.work.join(format!("svc-{}", uuid_like()));
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let exe = std::env::current_exe()?;
        let mut command = match &ctx.callgrind {
            // Counting starts at each e2e peak (`Service::start_counting`).
            Some(dir) => {
                let mut command = Command::new("valgrind");
                command
                    .args(["--tool=callgrind", "--instr-atstart=no"])
                    .arg(format!(
                        "--callgrind-out-file={}",
                        dir.join("callgrind.out.%p").display()
                    ))
                    .arg(exe);
                command
            }
            None => Command::new(exe),
        };
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("VIGNETIM_DATA_DIR", &dir)
            .env("VIGNETIM_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("VIGNETIM_ALLOW_PRIVATE_CIDRS", "127.0.0.0/8")
            .env("VIGNETIM_EXTRA_CA_FILE", &ctx.ca_file)
            .env("VIGNETIM_RATE_LIMIT_PER_SECOND", "1000000")
            .env("VIGNETIM_RATE_LIMIT_BURST", "1000000")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_SERVICE_LOG").unwrap_or_else(|_| "error".to_owned()),
            )
            .env_remove("VIGNETIM_ENCRYPTION_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        match &ctx.database {
            Some(url) => command.env("VIGNETIM_DATABASE_URL", url),
            None => command.env_remove("VIGNETIM_DATABASE_URL"),
        };
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let child = command.spawn().context(if ctx.callgrind.is_some() {
            "starting the service under valgrind (is valgrind installed?)"
        } else {
            "starting the service"
        })?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(256)
            .build()?;
        let base = format!("http://127.0.0.1:{port}");
        let publisher =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let service = Self {
            child,
            callgrind: ctx.callgrind.clone(),
            events_uri: format!("{base}/admin/events").parse()?,
            admin_bearer: format!("Bearer {ADMIN_TOKEN}").parse()?,
            base,
            http,
            publisher,
            dir,
        };
        // Under callgrind the service starts some fifty times slower.
        let tries = if ctx.callgrind.is_some() { 4_000 } else { 400 };
        for _ in 0..tries {
            if let Ok(r) = service
                .http
                .get(format!("{}/readyz", service.base))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(service);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("the service did not become ready")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Under callgrind, counts instructions from zero (until `stop_counting`).
    fn start_counting(&self) -> anyhow::Result<()> {
        if self.callgrind.is_some() {
            self.callgrind_control(&["--zero"])?;
            self.callgrind_control(&["--instr=on"])?;
        }
        Ok(())
    }

    /// Under callgrind, stops counting and returns the instructions counted since
    /// `start_counting`; without callgrind, `None`.
    fn stop_counting(&self) -> anyhow::Result<Option<f64>> {
        if self.callgrind.is_none() {
            return Ok(None);
        }
        self.callgrind_control(&["--instr=off"])?;
        self.callgrind_control(&["--dump"])?;
        Ok(Some(self.last_dump_total()?))
    }

    /// Runs `callgrind_control` with `args` on the service.
    fn callgrind_control(&self, args: &[&str]) -> anyhow::Result<()> {
        let status = Command::new("callgrind_control")
            .args(args)
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .status()
            .context("running callgrind_control")?;
        anyhow::ensure!(status.success(), "callgrind_control {args:?}: {status}");
        Ok(())
    }

    /// The instructions counted in the service's newest callgrind dump (its `totals:`
    /// line; the dumps are numbered `callgrind.out.<pid>.<n>`).
    fn last_dump_total(&self) -> anyhow::Result<f64> {
        let dir = self.callgrind.as_deref().context("not under callgrind")?;
        let prefix = format!("callgrind.out.{}.", self.pid());
        let newest = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| {
                let n: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, name))
            })
            .max()
            .context("no callgrind dump")?;
        let text = std::fs::read_to_string(dir.join(&newest.1))?;
        text.lines()
            .find_map(|l| l.strip_prefix("totals:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no totals in {}", newest.1))
    }

    /// User + system CPU seconds the service has used.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&self.pid().to_string())
    }

    /// Peak resident set size (VmHWM), KiB.
    fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(&self.pid().to_string())
    }

    async fn admin_post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("{path}: {status} {body}");
        }
        Ok(body)
    }

    /// A new organization with a sandbox key and `hooks` webhooks to the receiver's
    /// paths `/h/{first_hook + i}`. Returns (org id, key).
    async fn tenant(
        &self,
        receiver: &Receiver,
        first_hook: usize,
        hooks: usize,
    ) -> anyhow::Result<(String, String)> {
        let org = self
            .admin_post("/admin/organizations", json!({"name": "bench"}))
            .await?;
        let org = org["id"].as_str().context("org id")?.to_owned();
        let key = self
            .admin_post(
                &format!("/admin/organizations/{org}/api-keys"),
                json!({"environment": "sandbox"}),
            )
            .await?;
        let key = key["key"].as_str().context("key")?.to_owned();
        for i in 0..hooks {
            self.add_webhook(&key, receiver, first_hook + i).await?;
        }
        Ok((org, key))
    }

    /// A webhook subscribed to everything, to the receiver's path `/h/{hook}`.
    async fn add_webhook(&self, key: &str, receiver: &Receiver, hook: usize) -> anyhow::Result<()> {
        let url = format!("https://127.0.0.1:{}/h/{hook}", receiver.port);
        let response = self
            .http
            .post(format!("{}/webhooks", self.base))
            .bearer_auth(key)
            .json(&json!({"url": url, "events": ["*"]}))
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::CREATED {
            bail!("creating a webhook: {}", response.status());
        }
        Ok(())
    }

    /// Publishes one event whose data carries its publish time (`sentAt`, which the
    /// receiver reads for the latency).
    async fn publish(&self, org: &str, n: u64) -> anyhow::Result<()> {
        let sent_at = now_micros();
        let body = format!(
            r#"{{"organizationId":"{org}","environment":"sandbox","type":"order.completed","data":{{"sentAt":{sent_at},"n":{n},"orderId":"ord_{n:08}","amount":{{"value":4990,"currency":"EUR"}},"product":"Hungary Vignette 10 days","plate":"B-AB 1234"}}}}"#
        );
        let request = http::Request::post(self.events_uri.clone())
            .header(http::header::AUTHORIZATION, self.admin_bearer.clone())
            .header(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            )
            .body(Full::new(Bytes::from(body)))?;
        let response = self.publisher.request(request).await?;
        if response.status() != http::StatusCode::ACCEPTED {
            bail!("publish: {}", response.status());
        }
        let _ = response.into_body().collect().await?;
        Ok(())
    }

    /// The service's metrics, the Prometheus text.
    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Deliveries recorded as succeeded, from the service's own metrics (polled every
    /// 2 ms at the end of the peak: one line looked up, nothing else parsed).
    async fn succeeded(&self) -> anyhow::Result<u64> {
        let metrics = self.metrics().await?;
        Ok(sample(&metrics, r#"vignetim_deliveries{status="succeeded"}"#).map_or(0, |n| n as u64))
    }

    /// The deliveries the engine took on so far, by the way they came
    /// (`vignetim_deliveries_started_total`).
    async fn started(&self) -> anyhow::Result<Started> {
        let metrics = self.metrics().await?;
        let started = |via: &str| {
            sample(
                &metrics,
                &format!(r#"vignetim_deliveries_started_total{{via="{via}"}}"#),
            )
            .unwrap_or(0.0)
        };
        let claim = started("claim");
        Ok(Started {
            claim,
            all: started("publish") + claim + started("retry"),
        })
    }
}

/// Deliveries the engine took on: claimed from the database for their first attempt,
/// and in all.
#[derive(Default)]
struct Started {
    claim: f64,
    all: f64,
}

impl Started {
    /// The share of the deliveries taken on since `before` that were claimed from the
    /// database rather than taken from their publish: those that went the longer way.
    fn claimed_share_since(&self, before: &Started) -> f64 {
        let all = self.all - before.all;
        if all > 0.0 {
            (self.claim - before.claim) / all
        } else {
            0.0
        }
    }
}

/// The value of the sample `name` (with its labels, as written) in Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// User + system CPU seconds a process (`self`: this one) has used.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) are space separated.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size (VmHWM) of a process (`self`: this one), KiB.
fn peak_rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Starts this process's peak RSS afresh from its present RSS (Linux's `clear_refs`), so
/// that a phase's peak can be read; where it cannot, the peak read covers the whole run.
fn reset_own_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU seconds the whole machine has spent busy (user, system, interrupts and the time
/// the hypervisor took: every field of `/proc/stat`'s first line but idle and I/O wait).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    busy / 100.0
}

/// The CPU counters at a phase's start; [`Phase::end`] says what each spent since.
struct Phase {
    machine: f64,
    own: f64,
    service: f64,
}

/// CPU seconds spent during a phase: by this process (the load: receiver, bare client,
/// publishers), by the service, and by everything else on the machine (other programs
/// on the host and the kernel's own threads, the writeback of the service's files among
/// them). On the project's machine a short-lived Erlang VM starts once a minute (a check
/// of the local RabbitMQ) and can take half of the two cores for a few hundred
/// milliseconds; a phase it lands in reads slower, and `others` says so.
struct Spent {
    own: f64,
    service: f64,
    others: f64,
}

impl Phase {
    fn start(service: &Service) -> Self {
        Self {
            machine: machine_busy_seconds(),
            own: cpu_seconds("self"),
            service: service.cpu_seconds(),
        }
    }

    /// Each counter read once, so that the three add up to the machine's busy time.
    fn end(&self, service: &Service) -> Spent {
        let machine = machine_busy_seconds() - self.machine;
        let own = cpu_seconds("self") - self.own;
        let service = service.cpu_seconds() - self.service;
        Spent {
            own,
            service,
            others: (machine - own - service).max(0.0),
        }
    }
}

fn uuid_like() -> String {
    format!("{:x}{:x}", now_micros(), std::process::id())
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

// ---------------------------------------------------------------------------------
// Load generation helpers.

/// Runs `tasks` concurrent loops of `f` until `deadline`; returns the latencies (ms).
async fn closed_loop<F, Fut>(tasks: usize, duration: Duration, f: F) -> anyhow::Result<Vec<f64>>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let f = Arc::new(f);
    let end = Instant::now() + duration;
    let counter = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let f = Arc::clone(&f);
        let counter = Arc::clone(&counter);
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < end {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let start = Instant::now();
                f(n).await?;
                latencies.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await??);
    }
    Ok(all)
}

/// Publishes `events` as fast as `tasks` concurrent publishers can.
async fn publish_all(
    service: &Arc<Service>,
    org: &str,
    events: usize,
    tasks: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (service, next, org) = (Arc::clone(service), Arc::clone(&next), org.to_owned());
        handles.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events as u64 {
                    break;
                }
                service.publish(&org, n).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

/// Service CPU seconds per 1,000 units of work.
fn per_1000(cpu_s: f64, units: usize) -> f64 {
    cpu_s / units.max(1) as f64 * 1000.0
}

/// How often `wait_until` checks: fine enough not to add to a peak of about a second, as
/// the checks are cheap (the receiver's counters, or the service's counts read from its
/// indexes).
const CHECK_EVERY: Duration = Duration::from_millis(2);

async fn wait_until(
    deadline: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?}");
        }
        tokio::time::sleep(every).await;
    }
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------------
// Scenarios. Each returns its figures and the service's peak RSS (KiB).

async fn scenario_api(ctx: &Ctx, plan: &Plan) -> anyhow::Result<(BTreeMap<String, f64>, u64)> {
    let service = Arc::new(Service::start(ctx, &[]).await?);
    let (_, key) = service.tenant(&ctx.receiver, 0, WEBHOOKS).await?;
    let svc = Arc::clone(&service);
    let phase = Phase::start(&service);
    let started = Instant::now();
    let mut latencies = closed_loop(32, Duration::from_secs(plan.api_secs), move |_| {
        let (svc, key) = (Arc::clone(&svc), key.clone());
        async move {
            let r = svc
                .http
                .get(format!("{}/webhooks", svc.base))
                .bearer_auth(&key)
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("GET /webhooks: {}", r.status());
            }
            let _ = r.bytes().await?;
            Ok(())
        }
    })
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = phase.end(&service).service;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let mut figures = BTreeMap::new();
    figures.insert("requests_per_s".into(), latencies.len() as f64 / elapsed);
    figures.insert(
        "cpu_s_per_1000_requests".into(),
        per_1000(cpu, latencies.len()),
    );
    figures.insert("p50_ms".into(), percentile(&latencies, 50.0));
    figures.insert("p99_ms".into(), percentile(&latencies, 99.0));
    Ok((figures, service.peak_rss_kib()))
}

async fn scenario_publish(ctx: &Ctx, plan: &Plan) -> anyhow::Result<(BTreeMap<String, f64>, u64)> {
    let mut figures = BTreeMap::new();
    let mut rss = 0;
    for hooks in [1usize, 10] {
        // The receiver answers; the engine delivers meanwhile, as it would in production.
        let service = Arc::new(Service::start(ctx, &[]).await?);
        let (org, _) = service.tenant(&ctx.receiver, 0, hooks).await?;
        let svc = Arc::clone(&service);
        let phase = Phase::start(&service);
        let started = Instant::now();
        let latencies = closed_loop(32, Duration::from_secs(plan.publish_secs), move |n| {
            let (svc, org) = (Arc::clone(&svc), org.clone());
            async move { svc.publish(&org, n).await }
        })
        .await?;
        let per_s = latencies.len() as f64 / started.elapsed().as_secs_f64();
        let cpu = phase.end(&service).service;
        let suffix = format!("{hooks}_webhook{}", if hooks == 1 { "" } else { "s" });
        figures.insert(format!("events_per_s_{suffix}"), per_s);
        // Per event accepted; the engine's deliveries meanwhile are in it too.
        figures.insert(
            format!("cpu_s_per_1000_events_{suffix}"),
            per_1000(cpu, latencies.len()),
        );
        rss = rss.max(service.peak_rss_kib());
    }
    figures.insert("events_per_s".into(), figures["events_per_s_1_webhook"]);
    Ok((figures, rss))
}

/// Peak end-to-end throughput to 10 webhooks, the bare-client ceiling on the same
/// receiver in the same run, and latency at half the peak rate.
async fn scenario_e2e(ctx: &Ctx, plan: &Plan) -> anyhow::Result<(BTreeMap<String, f64>, u64)> {
    let receiver = &ctx.receiver;
    let service = Arc::new(Service::start(ctx, &[]).await?);
    let (org, _) = service.tenant(receiver, 0, WEBHOOKS).await?;
    let expected = (plan.e2e_events * WEBHOOKS) as u64;

    // Ceiling: a bare client, same receiver, same request count and concurrency, while
    // the service idles (measured after the peak, it would compete with the service's
    // last checkpoints and look lower). The best of a few tries: the bare client's
    // HTTP/2 connection task and the receiver's share this process's runtime, and in
    // some tries both land on one worker thread and the ceiling reads what one core can
    // do (about two thirds of the other tries); a ceiling caught that way would flatter
    // the ratio (BENCHMARKS.md, item 36). What the machine can do is the best try.
    let mut best: Option<Ceiling> = None;
    let mut lowest_per_s = f64::INFINITY;
    reset_own_peak_rss();
    for _ in 0..CEILING_TRIES {
        let connections_before = receiver.connections.load(Ordering::Relaxed);
        let phase = Phase::start(&service);
        let per_s = ceiling(receiver, expected, 16 * WEBHOOKS, &ctx.ca_file).await?;
        let spent = phase.end(&service);
        let connections = receiver.connections.load(Ordering::Relaxed) - connections_before;
        lowest_per_s = lowest_per_s.min(per_s);
        if best.as_ref().is_none_or(|b| per_s > b.per_s) {
            best = Some(Ceiling {
                per_s,
                spent,
                connections,
            });
        }
    }
    let Ceiling {
        per_s: ceiling_per_s,
        spent: ceiling_spent,
        connections: ceiling_connections,
    } = best.context("no ceiling try")?;
    // The bare client's and the receiver's memory (this process's) over the tries.
    let ceiling_rss_kib = peak_rss_kib("self");

    // Warm-up: a first burst meets a cold service, which faults in its memory, opens its
    // connection and learns each webhook's pace while the burst runs; a sustained rate
    // is a warm service's (BENCHMARKS.md, item 38). Its rate is reported as
    // `warmup_deliveries_per_s`. Then the service is left to finish its checkpoints.
    let warmup_events = plan.e2e_warmup_events.unwrap_or(plan.e2e_events);
    let warmup = if warmup_events > 0 {
        let warmup = burst(&service, receiver, &org, warmup_events, plan.publishers).await?;
        until_quiet(&service).await;
        Some(warmup)
    } else {
        None
    };

    // Peak: publish a burst, time until every delivery is received and recorded.
    let started_before = service.started().await?;
    service.start_counting()?;
    let peak = burst(&service, receiver, &org, plan.e2e_events, plan.publishers).await?;
    let instructions = service.stop_counting()?;
    // The TLS connections the service opened in both bursts: one, at the warm-up's start.
    let connections = peak.connections + warmup.as_ref().map_or(0, |w| w.connections);
    let (elapsed, peak) = (peak.elapsed, peak.spent);
    let deliveries_per_s = expected as f64 / elapsed;
    let claimed_share = service
        .started()
        .await?
        .claimed_share_since(&started_before);

    // Latency at half the peak rate.
    let rate = (plan.latency_rate.unwrap_or(deliveries_per_s / 2.0) / WEBHOOKS as f64).max(1.0);
    receiver.reset();
    receiver.record_latency.store(true, Ordering::Relaxed);
    let svc = Arc::clone(&service);
    let total = (rate * plan.latency_secs as f64) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let pacer = tokio::spawn({
        let org = org.clone();
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = Vec::new();
            for n in 0..total {
                tick.tick().await;
                let (svc, org) = (Arc::clone(&svc), org.clone());
                tasks.push(tokio::spawn(async move { svc.publish(&org, n).await }));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        }
    });
    pacer.await??;
    wait_until(Duration::from_secs(120), CHECK_EVERY, async || {
        receiver.total() >= total * WEBHOOKS as u64
    })
    .await?;
    receiver.record_latency.store(false, Ordering::Relaxed);
    let mut latencies = receiver.take_latencies();
    latencies.sort_by(|a, b| a.total_cmp(b));

    let mut figures = BTreeMap::new();
    figures.insert("deliveries_per_s".into(), deliveries_per_s);
    figures.insert("ceiling_per_s".into(), ceiling_per_s);
    figures.insert("ceiling_lowest_try_per_s".into(), lowest_per_s);
    figures.insert("ratio".into(), deliveries_per_s / ceiling_per_s);
    if let Some(warmup) = &warmup {
        figures.insert(
            "warmup_deliveries_per_s".into(),
            (warmup_events * WEBHOOKS) as f64 / warmup.elapsed,
        );
        figures.insert(
            "warmup_cpu_s_per_1000".into(),
            per_1000(warmup.spent.service, warmup_events * WEBHOOKS),
        );
    }
    // TLS connections the receiver accepted: the service's during the warm-up and the
    // peak, the bare client's during the ceiling (one each: HTTP/2 carries every request).
    figures.insert("connections".into(), connections as f64);
    figures.insert("ceiling_connections".into(), ceiling_connections as f64);
    figures.insert(
        "ceiling_peak_rss_mib".into(),
        ceiling_rss_kib as f64 / 1024.0,
    );
    figures.insert("half_load_deliveries_per_s".into(), rate * WEBHOOKS as f64);
    figures.insert("p50_ms".into(), percentile(&latencies, 50.0));
    figures.insert("p95_ms".into(), percentile(&latencies, 95.0));
    figures.insert("p99_ms".into(), percentile(&latencies, 99.0));
    figures.insert(
        "cpu_s_per_1000".into(),
        per_1000(peak.service, expected as usize),
    );
    // The peak's deliveries that spilled to the database and were claimed back (the
    // publishers outran the engine's room): they cost a claim each, and the share moves
    // from run to run (BENCHMARKS.md, step 31).
    figures.insert("claimed_share".into(), claimed_share);
    if let Some(instructions) = instructions {
        figures.insert(
            "service_instructions_per_delivery".into(),
            instructions / expected as f64,
        );
    }
    // The benchmark's own CPU, for the machine's whole account: during the peak its
    // receiver and publishers (and the completion checks) per 1,000 deliveries; during
    // the ceiling its bare client and receiver per 1,000 requests.
    figures.insert(
        "load_cpu_s_per_1000".into(),
        per_1000(peak.own, expected as usize),
    );
    figures.insert(
        "ceiling_cpu_s_per_1000".into(),
        per_1000(ceiling_spent.own, expected as usize),
    );
    // The host's share of each phase: the CPU seconds that neither the benchmark nor the
    // service spent, per second of the phase (0.5 would be one of two cores taken away).
    figures.insert("others_cores".into(), peak.others / elapsed);
    figures.insert(
        "ceiling_others_cores".into(),
        ceiling_spent.others * ceiling_per_s / expected as f64,
    );
    Ok((figures, service.peak_rss_kib()))
}

/// One e2e burst: its time, the CPU it took, and the TLS connections the receiver
/// accepted meanwhile.
struct Burst {
    elapsed: f64,
    spent: Spent,
    connections: u64,
}

/// Publishes `events` from `publishers` concurrent clients and waits until the receiver
/// has every delivery **and** the service reports every one recorded as succeeded.
async fn burst(
    service: &Arc<Service>,
    receiver: &Receiver,
    org: &str,
    events: usize,
    publishers: usize,
) -> anyhow::Result<Burst> {
    let expected = (events * WEBHOOKS) as u64;
    let succeeded_before = service.succeeded().await?;
    receiver.reset();
    let phase = Phase::start(service);
    let started = Instant::now();
    let connections_before = receiver.connections.load(Ordering::Relaxed);
    publish_all(service, org, events, publishers).await?;
    wait_until(Duration::from_secs(300), CHECK_EVERY, async || {
        receiver.total() >= expected
    })
    .await?;
    // Each check is a request to the service: under callgrind, fewer of them.
    let every = if service.callgrind.is_some() {
        Duration::from_millis(100)
    } else {
        CHECK_EVERY
    };
    wait_until(Duration::from_secs(300), every, async || {
        service.succeeded().await.unwrap_or(0) >= succeeded_before + expected
    })
    .await?;
    Ok(Burst {
        elapsed: started.elapsed().as_secs_f64(),
        connections: receiver.connections.load(Ordering::Relaxed) - connections_before,
        spent: phase.end(service),
    })
}

/// Waits (at most 5 s) until the service has used no CPU for 100 ms: its last
/// checkpoints after a burst are done.
async fn until_quiet(service: &Service) {
    let start = Instant::now();
    let mut last = service.cpu_seconds();
    while start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = service.cpu_seconds();
        if now - last < 0.005 {
            return;
        }
        last = now;
    }
}

/// Ceiling tries per e2e repetition; the best counts.
const CEILING_TRIES: usize = 3;

/// One try of the ceiling: requests/s, the CPU its phase spent, and the TLS connections
/// the receiver accepted.
struct Ceiling {
    per_s: f64,
    spent: Spent,
    connections: u64,
}

/// The receiver driven by a bare keep-alive HTTPS client: what the machine can do. It is
/// the client stack the service delivers with (hyper-util's pooled client over
/// hyper-rustls, HTTP/2 when offered), so the ratio measures the service, not a client.
async fn ceiling(
    receiver: &Receiver,
    requests: u64,
    concurrency: usize,
    ca_file: &Path,
) -> anyhow::Result<f64> {
    use hyper_util::client::legacy::Client;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)? {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: Client<_, Full<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let body = Bytes::from(vec![b'x'; 400]);
    let timestamp = now_micros() / 1_000_000;
    let port = receiver.port;
    // The service's header set, values of the same shapes and lengths: one message id
    // per 10 requests (an event's fan-out), a signature unique to each request. Nothing
    // is computed for them.
    let send = async move |client: &Client<_, Full<Bytes>>, n: u64, body: Bytes| {
        let request = http::Request::post(format!(
            "https://127.0.0.1:{port}/h/{}",
            n % WEBHOOKS as u64
        ))
        .header(
            "user-agent",
            vignetim_webhooks::delivery::client::USER_AGENT,
        )
        .header("content-type", "application/json")
        .header("webhook-id", format!("evt-{:036}", n / WEBHOOKS as u64))
        .header("webhook-timestamp", timestamp)
        .header("webhook-signature", format!("v1,{n:044}"))
        .body(Full::new(body))?;
        let response = client.request(request).await?;
        let _ = response.into_body().collect().await?;
        anyhow::Ok(())
    };
    receiver.reset();
    let started = Instant::now();
    // One connection first, then the concurrency, as the service connects
    // (`delivery::endpoints`): with all requests starting at once, each one found no
    // connection and made its own TLS handshake, up to 160 of them, before HTTP/2 kept
    // one (BENCHMARKS.md, step 27).
    send(&client, 0, body.clone()).await?;
    let next = Arc::new(AtomicU64::new(1));
    let mut handles = Vec::new();
    for _ in 0..concurrency {
        let (client, next, body) = (client.clone(), Arc::clone(&next), body.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    break;
                }
                send(&client, n, body.clone()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(requests as f64 / started.elapsed().as_secs_f64())
}

/// 10 % of the webhooks hang for the whole timeout: how much of their throughput do the
/// healthy 90 % keep? The two halves run in the order alone, with, with, alone, each on a
/// fresh service, so that the shared host's speed drifting during the scenario weighs on
/// both alike (with one pair, the half run second read 0.75–1.2 of the first in the same
/// build: BENCHMARKS.md, "hang10's method").
async fn scenario_hang10(ctx: &Ctx, plan: &Plan) -> anyhow::Result<(BTreeMap<String, f64>, u64)> {
    let receiver = &ctx.receiver;
    let healthy = WEBHOOKS - 1;
    let expected = (plan.hang_events * healthy) as u64;
    let (mut alone, mut with) = (0.0, 0.0);
    let (mut cpu_alone, mut cpu_with) = (0.0, 0.0);
    let (mut claimed_alone, mut claimed_with) = (0.0, 0.0);
    let mut rss = 0;
    for with_hanging in [false, true, true, false] {
        let service = Arc::new(Service::start(ctx, &[]).await?);
        // Hooks 0..9 are healthy; hook 100 hangs.
        let (org, key) = service.tenant(receiver, 0, healthy).await?;
        if with_hanging {
            receiver.set_hanging(100, true);
            service.add_webhook(&key, receiver, 100).await?;
        }
        receiver.reset();
        let phase = Phase::start(&service);
        let started = Instant::now();
        publish_all(&service, &org, plan.hang_events, 16).await?;
        wait_until(Duration::from_secs(300), CHECK_EVERY, async || {
            receiver.total_below(100) >= expected
        })
        .await?;
        let rate = expected as f64 / started.elapsed().as_secs_f64() / 2.0;
        // Per healthy delivery; the hanging webhook's share of the work is in it.
        let cpu = per_1000(phase.end(&service).service, expected as usize) / 2.0;
        let claimed = service
            .started()
            .await?
            .claimed_share_since(&Started::default())
            / 2.0;
        if with_hanging {
            with += rate;
            cpu_with += cpu;
            claimed_with += claimed;
        } else {
            alone += rate;
            cpu_alone += cpu;
            claimed_alone += claimed;
        }
        rss = rss.max(service.peak_rss_kib());
        receiver.set_hanging(100, false);
    }
    let mut figures = BTreeMap::new();
    figures.insert("healthy_per_s_alone".into(), alone);
    figures.insert("healthy_per_s_with_hanging".into(), with);
    figures.insert("healthy_ratio".into(), with / alone);
    figures.insert("cpu_s_per_1000_alone".into(), cpu_alone);
    figures.insert("cpu_s_per_1000_with_hanging".into(), cpu_with);
    figures.insert("claimed_share_alone".into(), claimed_alone);
    figures.insert("claimed_share_with_hanging".into(), claimed_with);
    Ok((figures, rss))
}

// ---------------------------------------------------------------------------------
// The receiver.

const HOOK_SLOTS: usize = 128;

struct Receiver {
    port: u16,
    counts: Vec<AtomicU64>,
    hanging: Vec<AtomicBool>,
    record_latency: AtomicBool,
    latencies: Mutex<Vec<f64>>,
    /// TLS connections accepted so far.
    connections: AtomicU64,
}

impl Receiver {
    async fn start(pki: &Pki) -> anyhow::Result<Arc<Self>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_slice(pki.leaf_pem.as_bytes())?];
        let key = PrivateKeyDer::from_pem_slice(pki.leaf_key_pem.as_bytes())?;
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let receiver = Arc::new(Self {
            port: listener.local_addr()?.port(),
            counts: (0..HOOK_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hanging: (0..HOOK_SLOTS).map(|_| AtomicBool::new(false)).collect(),
            record_latency: AtomicBool::new(false),
            latencies: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
        });
        let shared = Arc::clone(&receiver);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let (acceptor, shared) = (acceptor.clone(), Arc::clone(&shared));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    let service = hyper::service::service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { shared.handle(req).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        Ok(receiver)
    }

    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
        let hook: usize = req
            .uri()
            .path()
            .strip_prefix("/h/")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
            .min(HOOK_SLOTS - 1);
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if self.hanging[hook].load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if self.record_latency.load(Ordering::Relaxed)
            && let Some(sent_at) = sent_at(&body)
        {
            let ms = now_micros().saturating_sub(sent_at) as f64 / 1000.0;
            if let Ok(mut l) = self.latencies.lock() {
                l.push(ms);
            }
        }
        self.counts[hook].fetch_add(1, Ordering::Relaxed);
        Ok(hyper::Response::new(Full::new(Bytes::new())))
    }

    fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
        if let Ok(mut l) = self.latencies.lock() {
            l.clear();
        }
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn total_below(&self, hook: usize) -> u64 {
        self.counts[..hook]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn set_hanging(&self, hook: usize, hang: bool) {
        self.hanging[hook].store(hang, Ordering::Relaxed);
    }

    fn take_latencies(&self) -> Vec<f64> {
        self.latencies
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }
}

/// `"sentAt":<micros>` from a delivered body, without parsing the whole JSON.
fn sent_at(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("\"sentAt\":")? + 9;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------

/// A CA made for this run, and a leaf for 127.0.0.1 it signed.
struct Pki {
    ca_pem: String,
    leaf_pem: String,
    leaf_key_pem: String,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate()?;
        let leaf =
            CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&leaf_key, &issuer)?;
        Ok(Self {
            ca_pem: ca.pem(),
            leaf_pem: leaf.pem(),
            leaf_key_pem: leaf_key.serialize_pem(),
        })
    }
}
