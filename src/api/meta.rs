//! Health, readiness, metrics and the event-type catalog.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::store::Tenant;

pub fn ops_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

pub fn customer_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_event_types))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusOut {
    pub status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = StatusOut)))]
async fn healthz() -> axum::Json<StatusOut> {
    axum::Json(StatusOut { status: "ok" })
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = StatusOut), (status = 503, body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> Result<axum::Json<StatusOut>, ApiError> {
    state
        .store
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(axum::Json(StatusOut { status: "ready" }))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // The delivery gauges are read from the store at each scrape, so they are right
    // whichever instance did the work.
    let now = crate::domain::time::now_millis();
    match state.store.delivery_stats(now).await {
        Ok(stats) => {
            for status in crate::store::DeliveryStatus::ALL {
                let count = stats
                    .by_status
                    .iter()
                    .find(|(s, _)| *s == status)
                    .map_or(0, |(_, n)| *n);
                state
                    .metrics
                    .deliveries
                    .get_or_create(&crate::telemetry::StatusLabels {
                        status: status.as_str(),
                    })
                    .set(count);
            }
            state.metrics.deliveries_due.set(stats.due);
            let age = stats
                .oldest_due_at
                .map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0);
            state.metrics.oldest_due_age.set(age);
        }
        Err(e) => tracing::error!(error = %super::error::error_chain(&e), "delivery stats failed"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventTypeOut {
    /// e.g. `order.completed`
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventTypeListOut {
    pub data: Vec<EventTypeOut>,
}

/// The event types webhooks can subscribe to.
#[utoipa::path(get, path = "/event-types", tag = "webhooks", security(("api_key" = [])),
    responses((status = 200, body = EventTypeListOut), (status = 401, body = ErrorBody)))]
async fn list_event_types(
    State(state): State<AppState>,
    _: Tenant,
) -> axum::Json<EventTypeListOut> {
    axum::Json(EventTypeListOut {
        data: state
            .settings
            .catalog
            .iter()
            .map(|t| EventTypeOut {
                name: t.as_str().to_owned(),
            })
            .collect(),
    })
}
