//! `/admin`: platform calls (admin token) that make organizations and API keys.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Admin, ApiJson, path_id};
use crate::domain::apikey::{ApiKey, Environment};
use crate::domain::ids::{ApiKeyId, OrganizationId};
use crate::domain::time::{self, EpochMillis};
use crate::store::{ApiKeyRecord, Organization, Store, StoreError};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_organization))
        .routes(routes!(create_api_key))
}

const MAX_NAME_CHARS: usize = 200;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrganizationIn {
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrganizationOut {
    #[schema(value_type = String)]
    pub id: OrganizationId,
    pub name: String,
    #[serde(with = "time::rfc3339_millis")]
    #[schema(value_type = String)]
    pub created_at: EpochMillis,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyIn {
    /// `live` or `sandbox`.
    #[schema(value_type = String, example = "sandbox")]
    pub environment: Environment,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyOut {
    #[schema(value_type = String)]
    pub id: ApiKeyId,
    /// The key, shown this once; only its hash is stored.
    pub key: String,
    #[schema(value_type = String)]
    pub environment: Environment,
    pub name: Option<String>,
    #[serde(with = "time::rfc3339_millis")]
    #[schema(value_type = String)]
    pub created_at: EpochMillis,
}

/// Checks a display name: trimmed, non-empty, at most 200 characters.
pub fn parse_name(name: &str, field: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::validation(
            "invalid_name",
            format!("{field} must be 1 to {MAX_NAME_CHARS} characters"),
            field,
        ));
    }
    Ok(name.to_owned())
}

/// Creates an organization (also used by the `org create` sub-command).
pub async fn new_organization(store: &dyn Store, name: String) -> Result<Organization, StoreError> {
    let org = Organization {
        id: OrganizationId::new(),
        name,
        created_at: time::now_millis(),
    };
    store.create_organization(&org).await?;
    Ok(org)
}

/// Creates an API key (also used by the `key create` sub-command). The plaintext key is
/// returned once and never stored.
pub async fn new_api_key(
    store: &dyn Store,
    organization_id: OrganizationId,
    environment: Environment,
    name: Option<String>,
) -> Result<(ApiKeyRecord, ApiKey), StoreError> {
    let key = ApiKey::generate(environment);
    let record = ApiKeyRecord {
        id: ApiKeyId::new(),
        organization_id,
        environment,
        name,
        created_at: time::now_millis(),
    };
    store.create_api_key(&record, &key.hash()).await?;
    Ok((record, key))
}

/// Create an organization.
#[utoipa::path(post, path = "/admin/organizations", tag = "admin", request_body = OrganizationIn,
    security(("admin_token" = [])),
    responses((status = 201, body = OrganizationOut), (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn create_organization(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(input): ApiJson<OrganizationIn>,
) -> Result<(StatusCode, axum::Json<OrganizationOut>), ApiError> {
    let name = parse_name(&input.name, "name")?;
    let org = new_organization(state.store.as_ref(), name).await?;
    tracing::info!(organization = %org.id, "organization created");
    Ok((
        StatusCode::CREATED,
        axum::Json(OrganizationOut {
            id: org.id,
            name: org.name,
            created_at: org.created_at,
        }),
    ))
}

/// Create an API key for an organization and environment. The key is shown once.
#[utoipa::path(post, path = "/admin/organizations/{id}/api-keys", tag = "admin",
    request_body = ApiKeyIn, security(("admin_token" = [])),
    params(("id" = String, Path, description = "The organization ID")),
    responses((status = 201, body = ApiKeyOut), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn create_api_key(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
    ApiJson(input): ApiJson<ApiKeyIn>,
) -> Result<(StatusCode, axum::Json<ApiKeyOut>), ApiError> {
    const NOT_FOUND: &str = "no organization with this id";
    let organization_id = path_id(&id, NOT_FOUND)?;
    let name = input
        .name
        .as_deref()
        .map(|n| parse_name(n, "name"))
        .transpose()?;
    let (record, key) = new_api_key(
        state.store.as_ref(),
        organization_id,
        input.environment,
        name,
    )
    .await
    .map_err(|e| match e {
        StoreError::NotFound => ApiError::NotFound(NOT_FOUND),
        other => other.into(),
    })?;
    tracing::info!(organization = %organization_id, key = %record.id, "API key created");
    Ok((
        StatusCode::CREATED,
        axum::Json(ApiKeyOut {
            id: record.id,
            key: key.expose().to_owned(),
            environment: record.environment,
            name: record.name,
            created_at: record.created_at,
        }),
    ))
}
