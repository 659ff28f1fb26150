//! Logs (tracing) and metrics (Prometheus text format).
//!
//! Metric labels are low-cardinality by construction: the matched route template (never
//! the raw path), the method and the status code.
//! Architecture invariant: no secret, signature, key or payload is ever a log field.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Installs the global log subscriber, writing to standard error (standard output is for
/// the CLI's JSON). `RUST_LOG` overrides the default filter, which keeps rustls quiet: a
/// customer's bad certificate is a delivery outcome, not a service error.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=off,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second initialisation (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success` or `failure`.
    pub outcome: &'static str,
    /// The failure class, or `none`.
    pub failure: &'static str,
}

/// How a delivery came to the engine: `publish` (handed over by its publish), `claim` (a
/// first attempt claimed from the database: its webhook's lane or the engine's budget was
/// full at publish, or another process published it or stopped before sending it), or
/// `retry` (a later attempt, always claimed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StartLabels {
    pub via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The service's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_latency: HistogramFamily<RouteLabels>,
    pub delivery_attempts: Family<AttemptLabels, Counter>,
    /// From an event's publication to a 2xx from the endpoint.
    pub publish_to_success: Histogram,
    /// Deliveries the engine took on, by how they came ([`StartLabels`]): a rising share
    /// of `claim` means publishes outrun delivery and their deliveries go the longer way,
    /// through the database.
    pub deliveries_started: Family<StartLabels, Counter>,
    /// Set from the store at each scrape.
    pub deliveries: Family<StatusLabels, Gauge>,
    pub deliveries_due: Gauge,
    /// The age of the oldest due delivery: alert on it (a stalled engine shows here).
    pub oldest_due_age: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("vignetim");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests by method, route template and status",
            http_requests.clone(),
        );
        let http_latency: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        registry.register(
            "http_request_duration_seconds",
            "API request latency by method and route template",
            http_latency.clone(),
        );
        let delivery_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts by outcome and failure class",
            delivery_attempts.clone(),
        );
        let publish_to_success = Histogram::new(exponential_buckets(0.001, 2.0, 24));
        registry.register(
            "delivery_publish_to_success_seconds",
            "Time from an event's publication to a 2xx from the endpoint",
            publish_to_success.clone(),
        );
        let deliveries_started = Family::<StartLabels, Counter>::default();
        registry.register(
            "deliveries_started",
            "Deliveries the engine took on: handed over at publish, claimed for a first attempt, or claimed for a retry",
            deliveries_started.clone(),
        );
        let deliveries = Family::<StatusLabels, Gauge>::default();
        registry.register("deliveries", "Deliveries by status", deliveries.clone());
        let deliveries_due = Gauge::default();
        registry.register(
            "deliveries_due",
            "Pending deliveries whose time has come",
            deliveries_due.clone(),
        );
        let oldest_due_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_due_delivery_age_seconds",
            "Age of the oldest due delivery (0 when none is due)",
            oldest_due_age.clone(),
        );
        Arc::new(Self {
            registry,
            http_requests,
            http_latency,
            delivery_attempts,
            publish_to_success,
            deliveries_started,
            deliveries,
            deliveries_due,
            oldest_due_age,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
