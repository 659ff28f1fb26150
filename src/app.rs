//! Wiring: open the store, load the encryption key, build the client and the router,
//! bind, serve until told to stop.
//!
//! Tests start the real service with [`Application::build`] on port 0, exactly as
//! `serve` does.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::ratelimit::RateLimiter;
use crate::api::{self, ApiSettings, AppState, Shared};
use crate::config::{Config, StoreArgs};
use crate::delivery::GuardedClient;
use crate::delivery::client::ClientSettings;
use crate::delivery::worker::{Engine, EngineSettings, Handoff, Wakeup};
use crate::domain::sealing::EncryptionKey;
use crate::store::DeliveryPolicy;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use crate::telemetry::Metrics;

/// The database URL `args` point at.
pub fn database_url(args: &StoreArgs) -> String {
    args.database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("vignetim.db").display()))
}

/// Opens (and migrates) the store `args` point at.
pub async fn open_store(args: &StoreArgs) -> anyhow::Result<Arc<dyn Store>> {
    let url = database_url(args);
    if url.starts_with("sqlite:") {
        if args.database_url.is_none() {
            std::fs::create_dir_all(&args.data_dir).with_context(|| {
                format!(
                    "could not create the data folder {}",
                    args.data_dir.display()
                )
            })?;
        }
        let store = SqliteStore::open_url(&url)
            .await
            .with_context(|| format!("could not open the SQLite database {url}"))?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        bail!("PostgreSQL is not supported by this build yet; use a sqlite:// URL")
    } else {
        bail!("unsupported database URL (expected sqlite://…)")
    }
}

/// The key that seals signing secrets: configured, or (SQLite only) generated once into
/// the data folder with owner-only permissions.
pub fn load_encryption_key(args: &StoreArgs) -> anyhow::Result<EncryptionKey> {
    if let Some(text) = &args.encryption_key {
        return EncryptionKey::parse(text.expose())
            .map_err(|e| anyhow::anyhow!("VIGNETIM_ENCRYPTION_KEY: {e}"));
    }
    if !database_url(args).starts_with("sqlite:") {
        bail!("VIGNETIM_ENCRYPTION_KEY is required with a server database");
    }
    let path = args.data_dir.join("encryption.key");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("could not read {}", path.display()))?;
        return EncryptionKey::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("could not create {}", args.data_dir.display()))?;
    let key = EncryptionKey::generate();
    write_private_file(&path, key.to_hex().as_bytes())?;
    tracing::warn!(
        path = %path.display(),
        "generated a new encryption key for signing secrets; back it up with the database \
         (without it the stored secrets cannot be read), or set VIGNETIM_ENCRYPTION_KEY"
    );
    Ok(key)
}

fn write_private_file(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("could not create {}", path.display()))?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("could not write {}", path.display()))
}

/// A bound, ready-to-run service.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    engine: Engine,
}

impl Application {
    /// Opens everything and binds `config.listen` (port 0 picks a free port).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let store = open_store(&config.store).await?;
        let encryption_key = load_encryption_key(&config.store)?;
        let client = GuardedClient::new(ClientSettings {
            allow: config.allow_list.clone(),
            extra_roots_pem: config.extra_roots_pem.clone(),
            timeout: config.delivery_timeout,
            resolver: Arc::clone(&config.resolver),
        })?;
        if !config.allow_list.is_empty() {
            tracing::warn!(
                cidrs = ?config.allow_list.nets(),
                "VIGNETIM_ALLOW_PRIVATE_CIDRS opens the SSRF rules for these networks: \
                 development and tests only"
            );
        }
        if database_url(&config.store).starts_with("sqlite:") {
            // An embedded database has one process: leases left over are from a process
            // that is gone, so its deliveries go again now rather than after the lease.
            let released = store
                .release_all_leases(crate::domain::time::now_millis())
                .await?;
            if released > 0 {
                tracing::info!(deliveries = released, "released leases of a previous run");
            }
        }
        let wakeup = Wakeup::default();
        let handoff = Handoff::new(wakeup.clone());
        let metrics = Metrics::new();
        let encryption_key = Arc::new(encryption_key);
        let engine = Engine {
            store: Arc::clone(&store),
            client: client.clone(),
            key: Arc::clone(&encryption_key),
            settings: EngineSettings {
                policy: DeliveryPolicy {
                    schedule: config.retry_schedule.clone(),
                    disable_after: config.disable_after,
                },
                concurrency: config.delivery_concurrency.get(),
                per_webhook: config.webhook_concurrency.get(),
                poll_interval: config.poll_interval,
                lease: config.delivery_timeout + Duration::from_secs(5),
                // What the lease leaves over an attempt's timeout, less a second.
                queued_at_most: Duration::from_secs(4),
                retention: config.retention,
            },
            wakeup: wakeup.clone(),
            metrics: Arc::clone(&metrics),
            secrets: Default::default(),
            handoff: handoff.clone(),
        };
        let state = AppState::new(Shared {
            store,
            client,
            encryption_key,
            settings: Arc::new(ApiSettings {
                catalog: config.catalog.clone(),
                allow_list: config.allow_list.clone(),
                admin_token: config.admin_token.clone(),
                retention: config.retention,
                max_event_data_bytes: config.max_event_data_bytes,
            }),
            limiter: Arc::new(RateLimiter::new(
                config.rate_limit_per_second,
                config.rate_limit_burst,
            )),
            metrics,
            wakeup,
            handoff,
        });
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("could not listen on {}", config.listen))?;
        Ok(Self {
            listener,
            state,
            engine,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves the API and runs the delivery engine until `shutdown` is cancelled; then
    /// finishes in-flight requests and attempts.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let address = self.local_addr();
        let engine = tokio::spawn(self.engine.run(shutdown.clone()));
        let limiter = Arc::clone(&self.state.limiter);
        let sweeper_stop = shutdown.clone();
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = sweeper_stop.cancelled() => break,
                    _ = tick.tick() => limiter.forget_idle(),
                }
            }
        });
        tracing::info!(%address, "listening");
        let app = api::router(self.state);
        axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("the HTTP server failed")?;
        sweeper.abort();
        engine.await.context("the delivery engine failed")?;
        Ok(())
    }
}
