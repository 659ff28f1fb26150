//! Storage: one trait, [`Store`], with one implementation per database.
//!
//! What it owns: every SQL statement of the service. What it must not do: make network
//! calls other than to its database, or hold a transaction open across anything slow.
//!
//! Tenancy is in the signatures: every method that touches customer data takes the
//! [`Tenant`] first and every statement filters on it, so another organization's (or
//! environment's) row is simply not found.

pub mod sqlite;

use async_trait::async_trait;

use crate::domain::apikey::Environment;
use crate::domain::ids::{ApiKeyId, DeliveryId, EventId, OrganizationId, WebhookId};
use crate::domain::time::EpochMillis;

/// Who a customer request acts for: one organization in one environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tenant {
    pub organization_id: OrganizationId,
    pub environment: Environment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    pub id: OrganizationId,
    pub name: String,
    pub created_at: EpochMillis,
}

/// An API key as stored: never the key itself, only its hash (passed separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub organization_id: OrganizationId,
    pub environment: Environment,
    pub name: Option<String>,
    pub created_at: EpochMillis,
}

/// A webhook as the API shows it. The sealed signing secrets are deliberately absent:
/// they are read only by [`Store::webhook_secrets`], so a list or get can never leak one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: WebhookId,
    pub url: String,
    /// The subscription as stored: `["*"]` or catalog type names.
    pub events: Vec<String>,
    pub description: Option<String>,
    pub active: bool,
    /// Why the platform (not the owner) turned the webhook off, e.g. `"gone"`.
    pub disabled_reason: Option<String>,
    /// Failed delivery attempts in a row; test calls never change it.
    pub consecutive_failures: i64,
    pub last_success_at: Option<EpochMillis>,
    pub created_at: EpochMillis,
    pub updated_at: EpochMillis,
}

/// What creating a webhook writes.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub id: WebhookId,
    pub url: String,
    pub events: Vec<String>,
    pub description: Option<String>,
    /// The signing secret, already sealed for this webhook's id.
    pub sealed_secret: Vec<u8>,
    pub created_at: EpochMillis,
}

/// A partial update: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct WebhookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    /// `Some(None)` clears the description.
    pub description: Option<Option<String>>,
    /// Turning a webhook on also clears `disabled_reason` and resets the failure count.
    pub active: Option<bool>,
    pub updated_at: EpochMillis,
}

/// The sealed secrets that sign a webhook's deliveries.
#[derive(Debug, Clone)]
pub struct SealedSecrets {
    pub current: Vec<u8>,
    /// The secret before the last rotation, still signing until `previous_expires_at`.
    pub previous: Option<(Vec<u8>, EpochMillis)>,
}

/// The terminal outcome of one delivery attempt, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub attempted_at: EpochMillis,
    pub response_time_ms: i64,
    pub status_code: Option<u16>,
    /// Failure class (`dns`, `connect`, `tls`, `timeout`, `http_status`,
    /// `blocked_address`, `response_too_large`), `None` on success.
    pub failure: Option<String>,
    /// At most 64 KiB of the response body, for the owner to read.
    pub response_body: Option<Vec<u8>>,
}

/// A test call, recorded in the delivery log as an event with one delivery and its one
/// attempt.
#[derive(Debug, Clone)]
pub struct TestDelivery {
    pub event_id: EventId,
    pub delivery_id: DeliveryId,
    pub webhook_id: WebhookId,
    pub payload: Vec<u8>,
    pub created_at: EpochMillis,
    pub succeeded: bool,
    pub attempt: AttemptRecord,
}

/// Storage failures. Only `LimitReached` and `NotFound` mean something to a caller; the
/// rest are internal and shown to clients as a generic 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the organization already has the maximum number of webhooks in this environment")]
    LimitReached,
    #[error("not found")]
    NotFound,
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything the service keeps. See the module docs for the tenancy rule.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;

    async fn create_organization(&self, org: &Organization) -> StoreResult<()>;
    async fn organization_exists(&self, id: OrganizationId) -> StoreResult<bool>;
    /// Stores a key's record and hash. `NotFound` if the organization does not exist.
    async fn create_api_key(&self, key: &ApiKeyRecord, key_hash: &[u8]) -> StoreResult<()>;
    async fn find_api_key(&self, key_hash: &[u8]) -> StoreResult<Option<ApiKeyRecord>>;

    /// Creates a webhook unless the tenant already has `limit`: the count and the insert
    /// happen in one transaction, so racing creates never exceed it (`LimitReached`).
    async fn create_webhook(
        &self,
        tenant: Tenant,
        webhook: &NewWebhook,
        limit: u32,
    ) -> StoreResult<Webhook>;
    /// Newest first.
    async fn list_webhooks(&self, tenant: Tenant) -> StoreResult<Vec<Webhook>>;
    async fn get_webhook(&self, tenant: Tenant, id: WebhookId) -> StoreResult<Option<Webhook>>;
    async fn update_webhook(
        &self,
        tenant: Tenant,
        id: WebhookId,
        patch: &WebhookPatch,
    ) -> StoreResult<Option<Webhook>>;
    /// Deletes the webhook (its sealed secrets are wiped) and cancels its pending and
    /// held deliveries. `false` if there was no such webhook.
    async fn delete_webhook(
        &self,
        tenant: Tenant,
        id: WebhookId,
        now: EpochMillis,
    ) -> StoreResult<bool>;
    async fn webhook_secrets(
        &self,
        tenant: Tenant,
        id: WebhookId,
    ) -> StoreResult<Option<SealedSecrets>>;

    /// Records a finished test call in the delivery log. Never touches the webhook's
    /// failure counter.
    async fn record_test_delivery(&self, tenant: Tenant, test: &TestDelivery) -> StoreResult<()>;
}
