//! `/webhooks`: the published webhook-management calls.
//!
//! Request types (`…In`, `…Patch`) are parsed into domain values before anything else
//! happens; response types (`…Out`) are the only shapes that leave.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, path_id};
use super::{AppState, MAX_WEBHOOKS};
use crate::delivery::test_call::{self, TestResult};
use crate::domain::event_type::Subscription;
use crate::domain::ids::WebhookId;
use crate::domain::signing::SigningSecret;
use crate::domain::time::{self, EpochMillis};
use crate::domain::url_policy::WebhookUrl;
use crate::store::{NewWebhook, Tenant, Webhook, WebhookPatch};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(get_webhook, update_webhook, delete_webhook))
        .routes(routes!(test_webhook))
        .routes(routes!(rotate_secret))
}

/// How long the previous secret keeps signing after a rotation.
pub const ROTATION_OVERLAP_MS: EpochMillis = 24 * 3600 * 1000;

const MAX_DESCRIPTION_CHARS: usize = 500;
const WEBHOOK_NOT_FOUND: &str = "no webhook with this id";

/// `POST /webhooks` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookIn {
    /// HTTPS endpoint URL to receive webhook deliveries.
    #[schema(example = "https://yourapp.com/webhooks/vignetim")]
    pub url: String,
    /// Event types to subscribe to, or `["*"]` for all.
    #[schema(example = json!(["order.completed", "order.failed"]))]
    pub events: Vec<String>,
    /// A human-readable description for this endpoint.
    #[serde(default)]
    pub description: Option<String>,
}

/// `PUT /webhooks/:id` body: every field optional; omitted = unchanged.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookPatchIn {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub url: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    pub events: Option<Option<Vec<String>>>,
    /// `null` clears the description.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    /// `false` pauses deliveries; `true` re-enables a paused or disabled webhook, clearing
    /// `disabledReason` and resetting `consecutiveFailures` (no change if already active).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<bool>)]
    pub active: Option<Option<bool>>,
}

/// Tells "absent" (outer `None`, via `default`) from "null" (`Some(None)`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A webhook as every call but create shows it. Never holds the signing secret.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookOut {
    #[schema(value_type = String, example = "wh-a1b2c3d4-e5f6-4890-abcd-ef1234567890")]
    pub id: WebhookId,
    pub url: String,
    pub events: Vec<String>,
    pub description: Option<String>,
    pub active: bool,
    /// Failed delivery attempts in a row (test calls excluded); a success resets it.
    pub consecutive_failures: i64,
    /// Why the platform turned the webhook off (e.g. `gone`); null when the owner did or it is active.
    pub disabled_reason: Option<String>,
    #[serde(with = "time::rfc3339_millis::option")]
    #[schema(value_type = Option<String>)]
    pub last_success_at: Option<EpochMillis>,
    #[serde(with = "time::rfc3339_millis")]
    #[schema(value_type = String, example = "2026-03-20T14:30:00.000Z")]
    pub created_at: EpochMillis,
    #[serde(with = "time::rfc3339_millis")]
    #[schema(value_type = String, example = "2026-03-20T14:30:00.000Z")]
    pub updated_at: EpochMillis,
}

impl From<Webhook> for WebhookOut {
    fn from(w: Webhook) -> Self {
        Self {
            id: w.id,
            url: w.url,
            events: w.events,
            description: w.description,
            active: w.active,
            consecutive_failures: w.consecutive_failures,
            disabled_reason: w.disabled_reason,
            last_success_at: w.last_success_at,
            created_at: w.created_at,
            updated_at: w.updated_at,
        }
    }
}

/// The create response: the webhook plus its signing secret, shown this once.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookCreatedOut {
    #[serde(flatten)]
    pub webhook: WebhookOut,
    /// `whs_` + 64 hex digits. Store it: it cannot be retrieved again.
    pub signing_secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookListOut {
    pub data: Vec<WebhookOut>,
}

fn parse_url(state: &AppState, raw: &str) -> Result<WebhookUrl, ApiError> {
    WebhookUrl::parse(raw, &state.settings.allow_list)
        .map_err(|e| ApiError::validation(e.code(), e.to_string(), "url"))
}

fn parse_events(state: &AppState, events: &[String]) -> Result<Vec<String>, ApiError> {
    Subscription::parse(events, &state.settings.catalog)
        .map(|s| s.to_names())
        .map_err(|(code, message)| ApiError::validation(code, message, "events"))
}

fn parse_description(description: Option<String>) -> Result<Option<String>, ApiError> {
    match description {
        Some(d) if d.chars().count() > MAX_DESCRIPTION_CHARS => Err(ApiError::validation(
            "invalid_description",
            format!("description is longer than {MAX_DESCRIPTION_CHARS} characters"),
            "description",
        )),
        other => Ok(other),
    }
}

fn not_null<T>(value: Option<Option<T>>, field: &str) -> Result<Option<T>, ApiError> {
    match value {
        Some(None) => Err(ApiError::validation(
            "invalid_field",
            format!("{field} cannot be null; omit it to leave it unchanged"),
            field,
        )),
        Some(Some(v)) => Ok(Some(v)),
        None => Ok(None),
    }
}

/// Create a webhook endpoint.
#[utoipa::path(post, path = "/webhooks", tag = "webhooks", request_body = WebhookIn,
    security(("api_key" = [])),
    responses(
        (status = 201, body = WebhookCreatedOut),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 422, description = "invalid_url, unsafe_url, unknown_event_type, webhook_limit_reached", body = ErrorBody),
    ))]
async fn create_webhook(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiJson(input): ApiJson<WebhookIn>,
) -> Result<Response, ApiError> {
    let url = parse_url(&state, &input.url)?;
    let events = parse_events(&state, &input.events)?;
    let description = parse_description(input.description)?;
    let id = WebhookId::new();
    let secret = SigningSecret::generate();
    let now = time::now_millis();
    let created = state
        .store
        .create_webhook(
            tenant,
            &NewWebhook {
                id,
                url: url.as_str().to_owned(),
                events,
                description,
                sealed_secret: state
                    .encryption_key
                    .seal(secret.as_bytes(), &id.to_string()),
                created_at: now,
            },
            MAX_WEBHOOKS,
        )
        .await?;
    tracing::info!(webhook = %id, organization = %tenant.organization_id, "webhook created");
    let body = WebhookCreatedOut {
        webhook: created.into(),
        signing_secret: secret.expose(),
    };
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// List webhook endpoints, newest first.
#[utoipa::path(get, path = "/webhooks", tag = "webhooks", security(("api_key" = [])),
    responses((status = 200, body = WebhookListOut), (status = 401, body = ErrorBody)))]
async fn list_webhooks(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<axum::Json<WebhookListOut>, ApiError> {
    let webhooks = state.store.list_webhooks(tenant).await?;
    Ok(axum::Json(WebhookListOut {
        data: webhooks.into_iter().map(WebhookOut::from).collect(),
    }))
}

/// Get one webhook endpoint.
#[utoipa::path(get, path = "/webhooks/{id}", tag = "webhooks", security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID")),
    responses((status = 200, body = WebhookOut), (status = 404, body = ErrorBody)))]
async fn get_webhook(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<axum::Json<WebhookOut>, ApiError> {
    let id = path_id(&id, WEBHOOK_NOT_FOUND)?;
    let webhook = state
        .store
        .get_webhook(tenant, id)
        .await?
        .ok_or(ApiError::NotFound(WEBHOOK_NOT_FOUND))?;
    Ok(axum::Json(webhook.into()))
}

/// Update a webhook endpoint. Only provided fields change.
#[utoipa::path(put, path = "/webhooks/{id}", tag = "webhooks", request_body = WebhookPatchIn,
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID")),
    responses((status = 200, body = WebhookOut), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn update_webhook(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<WebhookPatchIn>,
) -> Result<axum::Json<WebhookOut>, ApiError> {
    let id: WebhookId = path_id(&id, WEBHOOK_NOT_FOUND)?;
    let url = not_null(input.url, "url")?
        .map(|u| parse_url(&state, &u))
        .transpose()?;
    let events = not_null(input.events, "events")?
        .map(|e| parse_events(&state, &e))
        .transpose()?;
    let description = input.description.map(parse_description).transpose()?;
    let active = not_null(input.active, "active")?;
    let nothing_to_change =
        url.is_none() && events.is_none() && description.is_none() && active.is_none();
    let updated = if nothing_to_change {
        state.store.get_webhook(tenant, id).await?
    } else {
        let now = time::now_millis();
        let retention = i64::try_from(state.settings.retention.as_millis()).unwrap_or(i64::MAX);
        let patch = WebhookPatch {
            resume_since: now.saturating_sub(retention),
            url: url.map(|u| u.as_str().to_owned()),
            events,
            description,
            active,
            updated_at: now,
        };
        let updated = state.store.update_webhook(tenant, id, &patch).await?;
        if active == Some(true) {
            // What was held is pending again.
            state.wakeup.wake();
        }
        updated
    };
    let updated = updated.ok_or(ApiError::NotFound(WEBHOOK_NOT_FOUND))?;
    Ok(axum::Json(updated.into()))
}

/// Delete a webhook endpoint; its pending deliveries are cancelled.
#[utoipa::path(delete, path = "/webhooks/{id}", tag = "webhooks", security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
async fn delete_webhook(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: WebhookId = path_id(&id, WEBHOOK_NOT_FOUND)?;
    if state
        .store
        .delete_webhook(tenant, id, time::now_millis())
        .await?
    {
        tracing::info!(webhook = %id, organization = %tenant.organization_id, "webhook deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(WEBHOOK_NOT_FOUND))
    }
}

/// Send a signed `webhook.test` event now and report what the endpoint answered.
#[utoipa::path(post, path = "/webhooks/{id}/test", tag = "webhooks", security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID")),
    responses((status = 200, body = TestResult), (status = 404, body = ErrorBody)))]
async fn test_webhook(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<axum::Json<TestResult>, ApiError> {
    let id: WebhookId = path_id(&id, WEBHOOK_NOT_FOUND)?;
    let webhook = state
        .store
        .get_webhook(tenant, id)
        .await?
        .ok_or(ApiError::NotFound(WEBHOOK_NOT_FOUND))?;
    let sealed = state
        .store
        .webhook_secrets(tenant, id)
        .await?
        .ok_or(ApiError::NotFound(WEBHOOK_NOT_FOUND))?;
    let result = test_call::run(
        state.store.as_ref(),
        &state.client,
        &state.encryption_key,
        tenant,
        &webhook,
        &sealed,
        time::now_millis(),
    )
    .await?;
    Ok(axum::Json(result))
}

/// Replace the signing secret. The new one is shown once; the old one keeps signing
/// alongside it for 24 hours, so receivers can switch without losing a delivery.
#[utoipa::path(post, path = "/webhooks/{id}/rotate-secret", tag = "webhooks", security(("api_key" = [])),
    params(("id" = String, Path, description = "The webhook ID")),
    responses((status = 200, body = WebhookCreatedOut), (status = 404, body = ErrorBody)))]
async fn rotate_secret(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<axum::Json<WebhookCreatedOut>, ApiError> {
    let id: WebhookId = path_id(&id, WEBHOOK_NOT_FOUND)?;
    let secret = SigningSecret::generate();
    let now = time::now_millis();
    let webhook = state
        .store
        .rotate_secret(
            tenant,
            id,
            &state
                .encryption_key
                .seal(secret.as_bytes(), &id.to_string()),
            now + ROTATION_OVERLAP_MS,
            now,
        )
        .await?
        .ok_or(ApiError::NotFound(WEBHOOK_NOT_FOUND))?;
    tracing::info!(webhook = %id, organization = %tenant.organization_id, "signing secret rotated");
    Ok(axum::Json(WebhookCreatedOut {
        webhook: webhook.into(),
        signing_secret: secret.expose(),
    }))
}
