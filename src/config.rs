//! Configuration: defaults, then `VIGNETIM_*` environment variables, then flags (clap
//! layers the last two). Everything is parsed and checked once, at start.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::delivery::{Resolver, SystemResolver};
use crate::domain::event_type::Catalog;
use crate::domain::retry::RetrySchedule;
pub use crate::domain::time::parse_duration;
use crate::domain::url_policy::AllowList;

/// A secret setting (admin token, encryption key). `Debug` never shows it, so a logged
/// or printed configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The one way to read the value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretString(redacted)")
    }
}

impl std::str::FromStr for SecretString {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Where the data lives; shared by every sub-command that opens the store.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Database URL: `sqlite://path/to.db` (default: `<data-dir>/vignetim.db`).
    #[arg(long = "database", env = "VIGNETIM_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Folder for the embedded database and the generated encryption key.
    #[arg(long, env = "VIGNETIM_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// 32-byte key (64 hex digits or base64) that seals signing secrets at rest. With
    /// SQLite and no key, one is generated into `<data-dir>/encryption.key`.
    #[arg(long, env = "VIGNETIM_ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<SecretString>,
}

/// Flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Address the API listens on.
    #[arg(long, env = "VIGNETIM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Bearer token for the `/admin` calls; without it they answer 401.
    #[arg(long, env = "VIGNETIM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,
    /// DEVELOPMENT AND TESTS ONLY: comma-separated CIDRs allowed despite the SSRF rules
    /// (e.g. `127.0.0.0/8`), at create/update and at connection time.
    #[arg(long, env = "VIGNETIM_ALLOW_PRIVATE_CIDRS", default_value = "")]
    pub allow_private_cidrs: String,
    /// DEVELOPMENT AND TESTS ONLY: extra trusted root certificate(s), PEM, for a local
    /// HTTPS receiver.
    #[arg(long, env = "VIGNETIM_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,
    /// Time limit of one delivery attempt (and of a test call), e.g. `10s`, `500ms`.
    #[arg(long, env = "VIGNETIM_DELIVERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub delivery_timeout: Duration,
    /// Delays between delivery attempts, e.g. `5s,5m,30m,2h,5h,10h,10h` (8 attempts).
    #[arg(long, env = "VIGNETIM_RETRY_SCHEDULE", default_value = "5s,5m,30m,2h,5h,10h,10h", value_parser = RetrySchedule::parse)]
    pub retry_schedule: RetrySchedule,
    /// A webhook failing without a success for this long is disabled.
    #[arg(long, env = "VIGNETIM_DISABLE_AFTER", default_value = "5d", value_parser = parse_duration)]
    pub disable_after: Duration,
    /// How long events, deliveries and attempts are kept (and held ones can be resumed).
    #[arg(long, env = "VIGNETIM_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub retention: Duration,
    /// The largest event `data` accepted, in bytes.
    #[arg(long, env = "VIGNETIM_MAX_EVENT_DATA_BYTES", default_value = "262144")]
    pub max_event_data_bytes: usize,
    /// Delivery attempts in flight at once, in all.
    #[arg(long, env = "VIGNETIM_DELIVERY_CONCURRENCY", default_value = "256")]
    pub delivery_concurrency: NonZeroU32,
    /// Delivery attempts in flight at once to one webhook.
    #[arg(long, env = "VIGNETIM_WEBHOOK_CONCURRENCY", default_value = "16")]
    pub webhook_concurrency: NonZeroU32,
    /// How often the engine looks for due work when nothing wakes it.
    #[arg(long, env = "VIGNETIM_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Sustained API requests per second per key.
    #[arg(long, env = "VIGNETIM_RATE_LIMIT_PER_SECOND", default_value = "20")]
    pub rate_limit_per_second: NonZeroU32,
    /// Requests a key may make in a burst (the bucket size, `X-RateLimit-Limit`).
    #[arg(long, env = "VIGNETIM_RATE_LIMIT_BURST", default_value = "100")]
    pub rate_limit_burst: NonZeroU32,
    /// The event type catalog, comma-separated.
    #[arg(
        long,
        env = "VIGNETIM_EVENT_TYPES",
        default_value = "order.created,order.completed,order.failed,order.cancelled,order.refunded"
    )]
    pub event_types: String,
    /// Log format on standard error: `text` or `json` (one object per line).
    #[arg(long, env = "VIGNETIM_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Threads of the async runtime (API and delivery engine). Default: one per CPU.
    #[arg(long, env = "VIGNETIM_WORKER_THREADS")]
    pub worker_threads: Option<NonZeroUsize>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The checked configuration the service runs with.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreArgs,
    pub admin_token: Option<SecretString>,
    pub allow_list: AllowList,
    /// PEM bytes of extra trusted roots, read at start.
    pub extra_roots_pem: Option<Vec<u8>>,
    pub delivery_timeout: Duration,
    pub rate_limit_per_second: NonZeroU32,
    pub rate_limit_burst: NonZeroU32,
    pub catalog: Catalog,
    pub retry_schedule: RetrySchedule,
    pub disable_after: Duration,
    pub retention: Duration,
    pub max_event_data_bytes: usize,
    pub delivery_concurrency: NonZeroU32,
    pub webhook_concurrency: NonZeroU32,
    pub poll_interval: Duration,
    /// How delivery resolves host names; tests inject their own.
    pub resolver: Arc<dyn Resolver>,
}

impl Config {
    /// Checks `serve`'s flags; every error names the setting at fault.
    pub fn from_args(args: ServeArgs) -> Result<Self, String> {
        let allow_list = AllowList::parse(&args.allow_private_cidrs)
            .map_err(|e| format!("VIGNETIM_ALLOW_PRIVATE_CIDRS: {e}"))?;
        let extra_roots_pem = args
            .extra_ca_file
            .as_ref()
            .map(|path| {
                std::fs::read(path)
                    .map_err(|e| format!("VIGNETIM_EXTRA_CA_FILE {}: {e}", path.display()))
            })
            .transpose()?;
        let catalog = Catalog::new(args.event_types.split(',').filter(|s| !s.trim().is_empty()))
            .map_err(|e| format!("VIGNETIM_EVENT_TYPES: {e}"))?;
        if args
            .admin_token
            .as_ref()
            .is_some_and(|t| t.expose().len() < 16)
        {
            return Err("VIGNETIM_ADMIN_TOKEN must be at least 16 characters".to_owned());
        }
        Ok(Self {
            listen: args.listen,
            store: args.store,
            admin_token: args.admin_token,
            allow_list,
            extra_roots_pem,
            delivery_timeout: args.delivery_timeout,
            rate_limit_per_second: args.rate_limit_per_second,
            rate_limit_burst: args.rate_limit_burst,
            catalog,
            retry_schedule: args.retry_schedule,
            disable_after: args.disable_after,
            retention: args.retention,
            max_event_data_bytes: args.max_event_data_bytes,
            delivery_concurrency: args.delivery_concurrency,
            webhook_concurrency: args.webhook_concurrency,
            poll_interval: args.poll_interval,
            resolver: Arc::new(SystemResolver),
        })
    }

    /// Defaults for a service whose data lives in `data_dir` (what `serve` with no flags
    /// and no environment would run with).
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        let nz = |n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            store: StoreArgs {
                database_url: None,
                data_dir,
                encryption_key: None,
            },
            admin_token: None,
            allow_list: AllowList::default(),
            extra_roots_pem: None,
            delivery_timeout: Duration::from_secs(10),
            rate_limit_per_second: nz(20),
            rate_limit_burst: nz(100),
            catalog: Catalog::default(),
            retry_schedule: RetrySchedule::default(),
            disable_after: Duration::from_secs(5 * 86_400),
            retention: Duration::from_secs(30 * 86_400),
            max_event_data_bytes: 256 * 1024,
            delivery_concurrency: nz(256),
            webhook_concurrency: nz(16),
            poll_interval: Duration::from_secs(1),
            resolver: Arc::new(SystemResolver),
        }
    }
}
