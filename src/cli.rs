//! The command line: `serve`, `migrate`, `org create`, `key create`.
//!
//! Operator commands work on the database directly (no running server needed) and print
//! the same JSON as the matching admin API call.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::api::admin::{ApiKeyOut, OrganizationOut, new_api_key, new_organization};
use crate::app::{Application, open_store};
use crate::config::{Config, LogFormat, ServeArgs, StoreArgs};
use crate::domain::apikey::Environment;
use crate::domain::ids::OrganizationId;

#[derive(Debug, Parser)]
#[command(
    name = "vignetim-webhooks",
    version,
    about = "Vignetim Webhooks: signed, durable webhook delivery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the API (SQLite under ./data by default).
    Serve(Box<ServeArgs>),
    /// Create or upgrade the database schema, then exit.
    Migrate(StoreArgs),
    /// Organizations.
    Org {
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// API keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Events.
    Event {
        #[command(subcommand)]
        command: EventCommand,
    },
    /// Check a delivery's signature the way a receiver would. Exits 0 when valid, 1 when
    /// not (saying why).
    Verify(VerifyArgs),
}

#[derive(Debug, Subcommand)]
enum EventCommand {
    /// Publish an event (durable when this returns); prints `{id, deliveries}`. A running
    /// service picks it up within its poll interval.
    Publish {
        #[arg(long = "org")]
        organization: String,
        #[arg(long, default_value = "sandbox")]
        environment: Environment,
        /// The event type, e.g. `order.completed`.
        #[arg(long = "type")]
        event_type: String,
        /// The event's `data` as JSON; `-` reads it from standard input.
        #[arg(long)]
        data: String,
        /// Idempotency id, `[A-Za-z0-9_-]{1,64}`.
        #[arg(long)]
        id: Option<String>,
        #[arg(
            long,
            env = "VIGNETIM_EVENT_TYPES",
            default_value = "order.created,order.completed,order.failed,order.cancelled,order.refunded"
        )]
        event_types: String,
        #[arg(long, env = "VIGNETIM_MAX_EVENT_DATA_BYTES", default_value = "262144")]
        max_event_data_bytes: usize,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    /// The webhook's secret: `whs_…` (as shown by this service) or `whsec_…`.
    #[arg(long, env = "VIGNETIM_VERIFY_SECRET", hide_env_values = true)]
    secret: crate::config::SecretString,
    /// The `webhook-id` header.
    #[arg(long)]
    id: String,
    /// The `webhook-timestamp` header.
    #[arg(long)]
    timestamp: String,
    /// The `webhook-signature` header.
    #[arg(long)]
    signature: String,
    /// The body, exactly as received; standard input when absent.
    #[arg(long)]
    body_file: Option<std::path::PathBuf>,
    /// How far the timestamp may be from now.
    #[arg(long, default_value = "5m", value_parser = crate::config::parse_duration)]
    tolerance: std::time::Duration,
    /// Verify as of this Unix time (seconds) instead of now.
    #[arg(long)]
    now: Option<i64>,
}

#[derive(Debug, Subcommand)]
enum OrgCommand {
    /// Create an organization; prints it as JSON.
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create an API key; prints it (the key is shown this once) as JSON.
    Create {
        /// The organization id (`org-…`).
        #[arg(long = "org")]
        organization: String,
        /// `live` or `sandbox`.
        #[arg(long, default_value = "sandbox")]
        environment: Environment,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

impl clap::ValueEnum for Environment {
    fn value_variants<'a>() -> &'a [Self] {
        &[Environment::Live, Environment::Sandbox]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_json =
        matches!(&cli.command, Command::Serve(args) if args.log_format == LogFormat::Json);
    crate::telemetry::init_logging(log_json);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(args) = &cli.command
        && let Some(threads) = args.worker_threads
    {
        runtime.worker_threads(threads.get());
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Verify(args) => verify(args),
        Command::Event {
            command:
                EventCommand::Publish {
                    organization,
                    environment,
                    event_type,
                    data,
                    id,
                    event_types,
                    max_event_data_bytes,
                    store,
                },
        } => {
            let organization_id: OrganizationId = organization.parse().map_err(|_| {
                anyhow::anyhow!("--org {organization:?} is not an organization id (org-…)")
            })?;
            let catalog = crate::domain::event_type::Catalog::new(
                event_types.split(',').filter(|s| !s.trim().is_empty()),
            )
            .map_err(|e| anyhow::anyhow!("VIGNETIM_EVENT_TYPES: {e}"))?;
            let data = if data == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading --data from stdin")?
            } else {
                data
            };
            let data = serde_json::value::RawValue::from_string(data.trim().to_owned())
                .context("--data is not valid JSON")?;
            let store = open_store(&store).await?;
            let tenant = crate::store::Tenant {
                organization_id,
                environment,
            };
            let published = crate::api::events::publish(
                store.as_ref(),
                &catalog,
                max_event_data_bytes,
                crate::api::events::PublishRequest {
                    tenant,
                    event_type: &event_type,
                    data: &data,
                    id: id.as_deref(),
                },
                // No engine in this process: the serving one claims the deliveries.
                None,
                crate::domain::time::now_millis(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", crate::api::error::ApiError::from(e)))?;
            print_json(&crate::api::events::EventAcceptedOut {
                id: published.id,
                deliveries: published.deliveries,
            })
        }
        Command::Serve(args) => serve(*args).await,
        Command::Migrate(store) => {
            open_store(&store).await?;
            println!("database is up to date");
            Ok(())
        }
        Command::Org {
            command: OrgCommand::Create { name, store },
        } => {
            let name = crate::api::admin::parse_name(&name, "--name")
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let store = open_store(&store).await?;
            let org = new_organization(store.as_ref(), name).await?;
            print_json(&OrganizationOut {
                id: org.id,
                name: org.name,
                created_at: org.created_at,
            })
        }
        Command::Key {
            command:
                KeyCommand::Create {
                    organization,
                    environment,
                    name,
                    store,
                },
        } => {
            let organization_id: OrganizationId = organization.parse().map_err(|_| {
                anyhow::anyhow!("--org {organization:?} is not an organization id (org-…)")
            })?;
            let store = open_store(&store).await?;
            let (record, key) = new_api_key(store.as_ref(), organization_id, environment, name)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::NotFound => {
                        anyhow::anyhow!("no organization {organization_id}")
                    }
                    other => anyhow::Error::new(other),
                })?;
            print_json(&ApiKeyOut {
                id: record.id,
                key: key.expose().to_owned(),
                environment: record.environment,
                name: record.name,
                created_at: record.created_at,
            })
        }
    }
}

/// Prints what the matching admin API call would answer.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_args(args).map_err(|e| anyhow::anyhow!(e))?;
    let app = Application::build(config)
        .await
        .context("could not start")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    app.run(shutdown).await
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn stop_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    token.cancel();
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    use base64::Engine;
    let secret = args.secret.expose();
    let key: Vec<u8> = if let Some(parsed) = crate::domain::signing::SigningSecret::parse(secret) {
        parsed.as_bytes().to_vec()
    } else if let Some(b64) = secret.strip_prefix("whsec_") {
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .context("the whsec_ secret is not valid base64")?
    } else {
        anyhow::bail!("--secret must be whs_ + 64 hex digits, or whsec_ + base64");
    };
    let body = match &args.body_file {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .context("reading the body from stdin")?;
            buf
        }
    };
    let now = args
        .now
        .unwrap_or_else(|| crate::domain::time::now_millis().div_euclid(1000));
    let tolerance = i64::try_from(args.tolerance.as_secs()).unwrap_or(i64::MAX);
    match crate::domain::signing::verify(
        &key,
        &args.id,
        &args.timestamp,
        &args.signature,
        &body,
        now,
        tolerance,
    ) {
        Ok(()) => {
            println!("valid");
            Ok(())
        }
        Err(why) => {
            println!("invalid: {why}");
            std::process::exit(1);
        }
    }
}
