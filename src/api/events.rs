//! `POST /admin/events`: the platform publishes an event; it is durable once answered.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Admin, ApiJson};
use crate::delivery::worker::Handoff;
use crate::domain::apikey::Environment;
use crate::domain::event_type::{Catalog, TEST_EVENT_TYPE, event_payload, parse_event_id};
use crate::domain::ids::{EventId, OrganizationId};
use crate::domain::time::{self, EpochMillis};
use crate::store::{Handover, NewEvent, Published, Store, StoreError, Tenant};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(publish_event))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EventIn {
    #[schema(value_type = String)]
    pub organization_id: String,
    #[schema(value_type = String, example = "live")]
    pub environment: Environment,
    #[serde(rename = "type")]
    #[schema(example = "order.completed")]
    pub event_type: String,
    /// Any JSON value; delivered byte for byte as the payload's `data`.
    #[schema(value_type = Object)]
    pub data: Box<RawValue>,
    /// Optional idempotency id, `[A-Za-z0-9_-]{1,64}`; publishing it again returns the
    /// first result and delivers nothing again.
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventAcceptedOut {
    /// The event id, sent as `webhook-id` with every delivery of it.
    pub id: String,
    /// How many webhooks it was queued for (held ones included).
    pub deliveries: u64,
}

/// Why an event was refused, before anything was written.
#[derive(Debug)]
pub enum PublishError {
    Invalid(ApiError),
    Store(StoreError),
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Invalid(e) => e,
            PublishError::Store(StoreError::NotFound) => {
                ApiError::NotFound("no organization with this id")
            }
            PublishError::Store(e) => e.into(),
        }
    }
}

/// An event as a publisher gives it.
#[derive(Debug, Clone, Copy)]
pub struct PublishRequest<'a> {
    pub tenant: Tenant,
    pub event_type: &'a str,
    pub data: &'a RawValue,
    /// The caller's idempotency id, if any.
    pub id: Option<&'a str>,
}

/// Validates and stores an event with its deliveries (also the `event publish`
/// sub-command). The data is kept as the exact bytes given.
pub async fn publish(
    store: &dyn Store,
    catalog: &Catalog,
    max_data_bytes: usize,
    request: PublishRequest<'_>,
    handoff: Option<&Handoff>,
    now: EpochMillis,
) -> Result<Published, PublishError> {
    let PublishRequest {
        tenant,
        event_type,
        data,
        id,
    } = request;
    let invalid = |code, message: String, field: &str| {
        PublishError::Invalid(ApiError::validation(code, message, field))
    };
    if event_type == TEST_EVENT_TYPE || !catalog.contains(event_type) {
        return Err(invalid(
            "unknown_event_type",
            format!("{event_type:?} is not a publishable event type (see GET /event-types)"),
            "type",
        ));
    }
    if data.get().len() > max_data_bytes {
        return Err(PublishError::Invalid(ApiError::PayloadTooLarge(format!(
            "the event's data is larger than {max_data_bytes} bytes"
        ))));
    }
    let id = match id {
        Some(given) => parse_event_id(given).map_err(|m| invalid("invalid_event_id", m, "id"))?,
        None => EventId::new().to_string(),
    };
    let event = NewEvent {
        payload: event_payload(&id, event_type, now, data).into(),
        id,
        event_type: event_type.to_owned(),
        created_at: now,
    };
    // The running engine takes what it has room for straight from the publish; the
    // reservation gives the room back if the publish fails.
    let reservation = handoff.and_then(Handoff::reserve);
    let handover = reservation.clone().map(|r| -> Arc<dyn Handover> { r });
    let mut published = store
        .publish_event(tenant, &event, handover)
        .await
        .map_err(PublishError::Store)?;
    if let Some(handoff) = handoff {
        handoff.start(reservation, &mut published);
    }
    Ok(published)
}

/// Publish an event to the organization's subscribed webhooks.
#[utoipa::path(post, path = "/admin/events", tag = "admin", request_body = EventIn,
    security(("admin_token" = [])),
    responses((status = 202, body = EventAcceptedOut), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn publish_event(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(input): ApiJson<EventIn>,
) -> Result<(StatusCode, axum::Json<EventAcceptedOut>), ApiError> {
    let organization_id: OrganizationId = input
        .organization_id
        .parse()
        .map_err(|_| ApiError::NotFound("no organization with this id"))?;
    let tenant = Tenant {
        organization_id,
        environment: input.environment,
    };
    let published = publish(
        state.store.as_ref(),
        &state.settings.catalog,
        state.settings.max_event_data_bytes,
        PublishRequest {
            tenant,
            event_type: &input.event_type,
            data: &input.data,
            id: input.id.as_deref(),
        },
        Some(&state.handoff),
        time::now_millis(),
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(EventAcceptedOut {
            id: published.id,
            deliveries: published.deliveries,
        }),
    ))
}
