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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
