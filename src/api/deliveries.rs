//! The delivery log for owners: list, inspect, retry, recover.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, path_id};
use crate::domain::ids::{DeliveryId, WebhookId};
use crate::domain::time::{self, EpochMillis};
use crate::store::{
    AttemptRecord, DeliveryCursor, DeliveryStatus, DeliveryView, RetryOutcome, Tenant,
};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_deliveries))
        .routes(routes!(get_delivery))
        .routes(routes!(retry_delivery))
        .routes(routes!(recover_deliveries))
}

const WEBHOOK_NOT_FOUND: &str = "no webhook with this id";
const DELIVERY_NOT_FOUND: &str = "no delivery with this id for this webhook";
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 250;

/// One delivery of one event to one webhook.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryOut {
    #[schema(value_type = String, example = "dlv-5b7a2f8e-0c1d-4e2f-9a3b-4c5d6e7f8091")]
    pub id: DeliveryId,
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `succeeded`, `failed`, `held` or `cancelled`.
    #[schema(value_type = String)]
    pub status: DeliveryStatus,
    pub attempt_count: i64,
    #[serde(with = "time::rfc3339_millis::option")]
    #[schema(value_type = Option<String>)]
    pub next_attempt_at: Option<EpochMillis>,
    #[serde(with = "time::rfc3339_millis")]
    #[schema(value_type = String)]
    pub created_at: EpochMillis,
}

impl From<DeliveryView> for DeliveryOut {
    fn from(d: DeliveryView) -> Self {
        Self {
            id: d.id,
            event_id: d.event_id,
            event_type: d.event_type,
            status: d.status,
            attempt_count: d.attempt_count,
            next_attempt_at: d.next_attempt_at,
            created_at: d.created_at,
        }
    }
}

/// One attempt, as recorded.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptOut {
    #[serde(with = "time::rfc3339_millis")]
    #[schema(value_type = String)]
    pub attempted_at: EpochMillis,
    /// Whole milliseconds.
    pub response_time: i64,
    pub status_code: Option<u16>,
    /// `dns`, `connect`, `tls`, `timeout`, `http_status`, `blocked_address`,
    /// `response_too_large`; null on success.
    pub failure: Option<String>,
    /// At most 64 KiB of what the endpoint answered (invalid UTF-8 replaced).
    pub response_body: Option<String>,
}

impl From<AttemptRecord> for AttemptOut {
    fn from(a: AttemptRecord) -> Self {
        Self {
            attempted_at: a.attempted_at,
            response_time: a.response_time_ms,
            status_code: a.status_code,
            failure: a.failure,
            response_body: a
                .response_body
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryDetailOut {
    #[serde(flatten)]
    pub delivery: DeliveryOut,
    pub attempts: Vec<AttemptOut>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryListOut {
    pub data: Vec<DeliveryOut>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only deliveries with this status.
    pub status: Option<String>,
    /// From a previous page's `nextCursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 250 (default 50).
    pub limit: Option<u32>,
}

fn encode_cursor(d: &DeliveryView) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", d.created_at, d.id))
}

fn decode_cursor(text: &str) -> Result<DeliveryCursor, ApiError> {
    let invalid = || {
        ApiError::validation(
            "invalid_cursor",
            "cursor is not one this API gave out",
            "cursor",
        )
    };
    let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let (at, id) = raw.split_once(':').ok_or_else(invalid)?;
    Ok(DeliveryCursor {
        created_at: at.parse().map_err(|_| invalid())?,
        id: id.parse::<DeliveryId>().map_err(|_| invalid())?.to_string(),
    })
}

/// A webhook's deliveries, newest first.
#[utoipa::path(get, path = "/webhooks/{id}/deliveries", tag = "deliveries", security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID"), ListQuery),
    responses((status = 200, body = DeliveryListOut), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn list_deliveries(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<DeliveryListOut>, ApiError> {
    let webhook_id: WebhookId = path_id(&id, WEBHOOK_NOT_FOUND)?;
    let Query(query) =
        query.map_err(|e| ApiError::validation("invalid_query", e.body_text(), "query"))?;
    let status = query
        .status
        .as_deref()
        .map(|s| {
            DeliveryStatus::parse(s).ok_or_else(|| {
                ApiError::validation(
                    "invalid_status",
                    "status must be pending, succeeded, failed, held or cancelled",
                    "status",
                )
            })
        })
        .transpose()?;
    let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::validation(
            "invalid_limit",
            format!("limit must be 1 to {MAX_PAGE}"),
            "limit",
        ));
    }
    let mut page = state
        .store
        .list_deliveries(tenant, webhook_id, status, cursor.as_ref(), limit + 1)
        .await?
        .ok_or(ApiError::NotFound(WEBHOOK_NOT_FOUND))?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let next_cursor = if more {
        page.last().map(encode_cursor)
    } else {
        None
    };
    Ok(axum::Json(DeliveryListOut {
        data: page.into_iter().map(DeliveryOut::from).collect(),
        next_cursor,
    }))
}

/// One delivery with its attempts.
#[utoipa::path(get, path = "/webhooks/{id}/deliveries/{delivery_id}", tag = "deliveries",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID"),
        ("delivery_id" = String, Path, description = "The delivery ID")),
    responses((status = 200, body = DeliveryDetailOut), (status = 404, body = ErrorBody)))]
async fn get_delivery(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<axum::Json<DeliveryDetailOut>, ApiError> {
    let webhook_id: WebhookId = path_id(&id, WEBHOOK_NOT_FOUND)?;
    let delivery_id: DeliveryId = path_id(&delivery_id, DELIVERY_NOT_FOUND)?;
    let (delivery, attempts) = state
        .store
        .get_delivery(tenant, webhook_id, delivery_id)
        .await?
        .ok_or(ApiError::NotFound(DELIVERY_NOT_FOUND))?;
    Ok(axum::Json(DeliveryDetailOut {
        delivery: delivery.into(),
        attempts: attempts.into_iter().map(AttemptOut::from).collect(),
    }))
}

/// Send a delivery again now, whatever its status (also `failed`).
#[utoipa::path(post, path = "/webhooks/{id}/deliveries/{delivery_id}/retry", tag = "deliveries",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID"),
        ("delivery_id" = String, Path, description = "The delivery ID")),
    responses((status = 202, body = DeliveryOut), (status = 404, body = ErrorBody),
        (status = 409, description = "webhook_inactive or delivery_in_flight", body = ErrorBody)))]
async fn retry_delivery(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<(StatusCode, axum::Json<DeliveryOut>), ApiError> {
    let webhook_id: WebhookId = path_id(&id, WEBHOOK_NOT_FOUND)?;
    let delivery_id: DeliveryId = path_id(&delivery_id, DELIVERY_NOT_FOUND)?;
    match state
        .store
        .retry_delivery(tenant, webhook_id, delivery_id, time::now_millis())
        .await?
    {
        RetryOutcome::Queued(view) => {
            state.wakeup.wake();
            Ok((StatusCode::ACCEPTED, axum::Json(view.into())))
        }
        RetryOutcome::NotFound => Err(ApiError::NotFound(DELIVERY_NOT_FOUND)),
        RetryOutcome::WebhookInactive => Err(ApiError::Conflict {
            code: "webhook_inactive",
            message: "the webhook is inactive; re-enable it (PUT {\"active\": true}) to deliver",
        }),
        RetryOutcome::TestDelivery => Err(ApiError::Conflict {
            code: "test_delivery",
            message: "a test delivery is a record of a test call and is not sent again; send a new test",
        }),
        RetryOutcome::InFlight => Err(ApiError::Conflict {
            code: "delivery_in_flight",
            message: "an attempt of this delivery is in flight right now; try again shortly",
        }),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoverIn {
    /// RFC 3339: failed deliveries created at or after this instant are queued again.
    pub since: String,
    /// RFC 3339, exclusive; default: now.
    #[serde(default)]
    pub until: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecoverOut {
    /// How many failed deliveries were queued again.
    pub recovered: u64,
}

fn parse_instant(text: &str, field: &str) -> Result<EpochMillis, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::validation(
                "invalid_time",
                format!("{field} must be an RFC 3339 time, e.g. 2026-03-20T14:30:00.000Z"),
                field,
            )
        })
}

/// Queue again the failed deliveries of a time window (after an outage, say).
#[utoipa::path(post, path = "/webhooks/{id}/recover", tag = "deliveries", request_body = RecoverIn,
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID")),
    responses((status = 202, body = RecoverOut), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn recover_deliveries(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<RecoverIn>,
) -> Result<(StatusCode, axum::Json<RecoverOut>), ApiError> {
    let webhook_id: WebhookId = path_id(&id, WEBHOOK_NOT_FOUND)?;
    let now = time::now_millis();
    let since = parse_instant(&input.since, "since")?;
    let until = input
        .until
        .as_deref()
        .map(|u| parse_instant(u, "until"))
        .transpose()?
        .unwrap_or(now + 1);
    if since >= until {
        return Err(ApiError::validation(
            "invalid_time",
            "since must be before until",
            "since",
        ));
    }
    let recovered = state
        .store
        .recover_deliveries(tenant, webhook_id, since, until, now)
        .await?
        .ok_or(ApiError::NotFound(WEBHOOK_NOT_FOUND))?;
    if recovered > 0 {
        state.wakeup.wake();
    }
    Ok((StatusCode::ACCEPTED, axum::Json(RecoverOut { recovered })))
}
