//! Vignetim Webhooks: signed, durable webhook delivery for Vignetim's business customers.
//!
//! See ARCHITECTURE.md for the module map and the invariants.

pub mod api;
pub mod app;
pub mod batch;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod store;
pub mod telemetry;

pub use app::Application;
pub use config::Config;
