//! The HTTP API: routes, middleware, extractors, one module per resource.
//!
//! What it owns: turning requests into domain values and store calls, and results into
//! JSON. What it must not do: issue SQL (it calls the [`Store`](crate::store::Store)
//! trait), or make outbound HTTP (only `delivery` does).

pub mod admin;
pub mod deliveries;
pub mod error;
pub mod events;
pub mod extract;
pub mod meta;
pub mod ratelimit;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::delivery::GuardedClient;
use crate::domain::apikey::ApiKey;
use crate::domain::event_type::Catalog;
use crate::domain::sealing::EncryptionKey;
use crate::domain::url_policy::AllowList;
use crate::store::{Store, Tenant};
use crate::telemetry::{HttpLabels, Metrics, RouteLabels};
use error::{ApiError, REQUEST_ID};
use ratelimit::{Bucket, RateLimiter};

/// Management request bodies are capped at 1 MiB.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// At most this many webhooks per organization and environment.
pub const MAX_WEBHOOKS: u32 = 10;

/// What the API needs from the configuration, checked once at start.
pub struct ApiSettings {
    pub catalog: Catalog,
    pub allow_list: AllowList,
    pub admin_token: Option<crate::config::SecretString>,
    /// How long the delivery log is kept; held deliveries older than this stay held.
    pub retention: std::time::Duration,
    /// The largest event `data` accepted, in bytes.
    pub max_event_data_bytes: usize,
}

/// Shared by every handler. axum clones it for every extractor and middleware of every
/// request, so it is one `Arc` (a clone of the fields was a dozen reference counts each
/// time: about 1 % of the service at the benchmark's peak).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub client: GuardedClient,
    pub encryption_key: Arc<EncryptionKey>,
    pub settings: Arc<ApiSettings>,
    pub limiter: Arc<RateLimiter>,
    pub metrics: Arc<Metrics>,
    /// Wakes the delivery engine when there is new work.
    pub wakeup: crate::delivery::worker::Wakeup,
    /// Takes a publish's deliveries straight to the engine (no claim needed).
    pub handoff: crate::delivery::worker::Handoff,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Vignetim Webhooks API",
        description = "Manage webhook endpoints that receive Vignetim order events."
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route, grouped by who calls it. Returns the router and its OpenAPI document.
pub fn router(state: AppState) -> Router {
    // Customers (API key): the published webhook-management page, and the catalog.
    let (customer, customer_doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(webhooks::routes())
        .merge(deliveries::routes())
        .merge(meta::customer_routes())
        .split_for_parts();
    // The platform (admin token): organizations and API keys.
    let (admin, admin_doc) = admin::routes().merge(events::routes()).split_for_parts();
    // Event bodies may be larger than management bodies: their own cap, with room for
    // the envelope around `data`.
    let event_body_cap = state
        .settings
        .max_event_data_bytes
        .saturating_add(64 * 1024)
        .max(MAX_BODY_BYTES);
    // Operators and monitors (no auth): health, readiness, metrics.
    let (ops, ops_doc) = meta::ops_routes().split_for_parts();

    let mut doc = customer_doc;
    doc.merge(admin_doc);
    doc.merge(ops_doc);
    let doc = Arc::new(doc);

    Router::new()
        .merge(customer)
        .merge(admin.layer(DefaultBodyLimit::max(event_body_cap)))
        .merge(ops)
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = Arc::clone(&doc);
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::NotFound("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

/// What every request goes through, outermost first: [`request_id`], [`record_metrics`],
/// [`authenticate`]. One middleware layer calling the three in turn: three `from_fn`
/// layers cost a boxed service clone and a boxed future each per request, about 2 % of the
/// service's CPU at the benchmark's peak (BENCHMARKS.md, step 29).
async fn edge(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    request_id(request, async |request| {
        record_metrics(&state, request, async |request| {
            authenticate(&state, peer, request, next).await
        })
        .await
    })
    .await
}

/// Gives each request an id, visible to every handler (errors quote it), to every log
/// line of the request (its span), and returned in `X-Request-Id`.
async fn request_id(request: Request, inner: impl AsyncFnOnce(Request) -> Response) -> Response {
    use tracing::Instrument;
    let id = crate::domain::ids::new_request_id();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path()
    );
    let mut response = REQUEST_ID
        .scope(id.clone(), inner(request).instrument(span))
        .await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn record_metrics(
    state: &AppState,
    request: Request,
    inner: impl AsyncFnOnce(Request) -> Response,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = inner(request).await;
    let status = response.status().as_u16();
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method: method.clone(),
            route: route.clone(),
            status,
        })
        .inc();
    state
        .metrics
        .http_latency
        .get_or_create(&RouteLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Whether a path belongs to the customer API (API key, rate limit).
fn is_customer_path(path: &str) -> bool {
    path == "/webhooks" || path.starts_with("/webhooks/") || path == "/event-types"
}

/// Authenticates a customer request by its API key, applies the key's rate limit, and
/// hands the handler its [`Tenant`]. It runs for every customer-API path, matched or not
/// (so a wrong method or sub-path without a key is a 401, not a 405 or 404), and every
/// such response gets the `X-RateLimit-*` headers; requests without a valid key draw
/// from a per-address bucket. Other paths (admin, operations) pass through.
async fn authenticate(
    state: &AppState,
    peer: SocketAddr,
    mut request: Request,
    next: Next,
) -> Response {
    if !is_customer_path(request.uri().path()) {
        return next.run(request).await;
    }
    let key = extract::bearer(request.headers()).and_then(ApiKey::parse);
    let record = match key {
        Some(key) => match state.store.find_api_key(&key.hash()).await {
            Ok(found) => found.filter(|r| r.environment == key.environment()),
            Err(e) => return ApiError::from(e).into_response(),
        },
        None => None,
    };
    let bucket = match &record {
        Some(r) => Bucket::Key(r.id),
        None => Bucket::Anonymous(peer.ip()),
    };
    let decision = state.limiter.check(&bucket);
    let mut response = if !decision.allowed {
        ApiError::RateLimited {
            retry_after_s: decision.reset_s.max(1),
        }
        .into_response()
    } else if let Some(record) = record {
        request.extensions_mut().insert(Tenant {
            organization_id: record.organization_id,
            environment: record.environment,
        });
        next.run(request).await
    } else {
        ApiError::Unauthorized("missing or invalid API key").into_response()
    };
    decision.write_headers(response.headers_mut());
    response
}
