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

use std::sync::Arc;
use std::time::Duration;

use crate::domain::apikey::Environment;
use crate::domain::ids::{ApiKeyId, DeliveryId, EventId, OrganizationId, WebhookId};
use crate::domain::retry::RetrySchedule;
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
    /// Held deliveries created before this instant stay held when the webhook is
    /// re-enabled (they are past the delivery log's retention).
    pub resume_since: EpochMillis,
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    /// `Some(None)` clears the description.
    pub description: Option<Option<String>>,
    /// Turning a webhook off holds its pending deliveries; turning it on clears
    /// `disabled_reason`, resets the failure count and queues what was held.
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

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (or in flight).
    Pending,
    Succeeded,
    /// Every scheduled attempt failed.
    Failed,
    /// Kept while its webhook is inactive; queued again when it is re-enabled.
    Held,
    /// Its webhook was deleted before it could be delivered.
    Cancelled,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 5] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Succeeded,
        DeliveryStatus::Failed,
        DeliveryStatus::Held,
        DeliveryStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Held => "held",
            DeliveryStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// An event to publish: its payload is the exact bytes every delivery sends and signs.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The public id (`webhook-id`): the caller's, or a generated `evt-…`.
    pub id: String,
    pub event_type: String,
    /// The bytes delivered and signed, shared (not copied) with the deliveries handed
    /// to the engine.
    pub payload: bytes::Bytes,
    pub created_at: EpochMillis,
}

/// What publishing did.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    /// Deliveries queued (or held) for it.
    pub deliveries: u64,
    /// The id was already published: nothing new was queued.
    pub duplicate: bool,
    /// Deliveries the handover took, leased: the engine sends them without a claim.
    pub handed: Vec<ClaimedDelivery>,
}

/// The engine's side of a publish: which fresh deliveries it takes at once (see
/// [`Store::publish_event`]). Asked inside the publishing transaction, so it must answer
/// at once; asked again for the same deliveries if that transaction is run again (the
/// room held for the first answers is given back with the reservation).
pub trait Handover: Send + Sync {
    /// Whether the engine takes a fresh delivery to `webhook` now. A `true` holds room for
    /// it, which the publish's caller gives back if the publish fails.
    fn take(&self, webhook: WebhookId) -> bool;
    /// The lease the taken deliveries are written with.
    fn lease_until(&self) -> EpochMillis;
}

/// How many more deliveries a claim may give each webhook: the engine counts them, from
/// the claim until the response (not until the outcome is recorded, which would keep a
/// fast endpoint waiting on the database).
#[derive(Debug, Clone, Default)]
pub struct ClaimRoom {
    /// The room of a webhook with nothing in the engine.
    pub per_webhook: u32,
    /// The room of the webhooks with deliveries in the engine.
    pub left: std::collections::HashMap<WebhookId, u32>,
}

impl ClaimRoom {
    /// Nothing in the engine anywhere.
    pub fn empty(per_webhook: u32) -> Self {
        Self {
            per_webhook,
            left: Default::default(),
        }
    }

    /// Deliveries `webhook` may still be given.
    pub fn left(&self, webhook: &WebhookId) -> u32 {
        self.left.get(webhook).copied().unwrap_or(self.per_webhook)
    }
}

/// A delivery claimed, under lease, for one attempt: everything the attempt needs.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub delivery_id: DeliveryId,
    /// Where the store keeps it (see [`RowKey`]).
    pub row: RowKey,
    pub tenant: Tenant,
    pub webhook_id: WebhookId,
    pub url: String,
    pub secrets: SealedSecrets,
    pub event_id: String,
    pub event_created_at: EpochMillis,
    pub payload: bytes::Bytes,
    /// Attempts made before this one.
    pub attempts_made: u32,
    /// The lease this claim holds; the outcome is recorded only while it is current.
    pub lease_until: EpochMillis,
}

/// The store's own key for a delivery's row (SQLite's rowid), carried from the publish
/// or claim to the record of its attempt, so that the record finds the row without a
/// search of the id index (BENCHMARKS.md, step 34). It means nothing outside the store
/// that gave it, and the record still checks the delivery's id on the row it finds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowKey(pub(crate) i64);

/// The outcome of one attempt, to record.
#[derive(Debug, Clone)]
pub struct AttemptReport {
    pub delivery_id: DeliveryId,
    /// The claimed delivery's [`RowKey`].
    pub row: RowKey,
    pub webhook_id: WebhookId,
    pub attempt: AttemptRecord,
    pub succeeded: bool,
    /// The endpoint answered 410 Gone: disable the webhook at once.
    pub gone: bool,
    /// The endpoint's `Retry-After` (on 429 and 503).
    pub retry_after: Option<Duration>,
    /// Uniform in [0, 1): this attempt's jitter draw.
    pub jitter_draw: f64,
    /// The claim's lease: a report whose lease is no longer the delivery's (it expired and
    /// the delivery was claimed again) is kept in the log but changes nothing.
    pub lease_until: EpochMillis,
    /// Nothing was sent, and why: no attempt is recorded, nothing counts against the
    /// endpoint, and the delivery is due again (see `Unsent`).
    pub unsent: Option<Unsent>,
}

/// Why a claimed delivery was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    /// A fault of ours (a signing secret that cannot be opened): due again in a minute.
    InternalError,
    /// It waited too long for a place among its webhook's attempts (the webhook is slow),
    /// so its lease could not cover an attempt any more, or the service was shutting down
    /// while it waited: due again at once.
    WaitedTooLong,
}

/// What the store decides with when it records an attempt.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    pub schedule: RetrySchedule,
    /// Failing without a success this long disables the webhook.
    pub disable_after: Duration,
}

/// A delivery as its owner sees it in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryView {
    pub id: DeliveryId,
    pub event_id: String,
    pub event_type: String,
    pub status: DeliveryStatus,
    pub attempt_count: i64,
    pub next_attempt_at: Option<EpochMillis>,
    pub created_at: EpochMillis,
}

/// Keyset position in a webhook's delivery log (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryCursor {
    pub created_at: EpochMillis,
    pub id: String,
}

/// The answer to a manual retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    Queued(DeliveryView),
    NotFound,
    /// The webhook is paused or disabled: re-enable it first.
    WebhookInactive,
    /// An attempt is under way right now.
    InFlight,
    /// A test call's record: it is not sent again (send a new test instead).
    TestDelivery,
}

/// Counts for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    pub by_status: Vec<(DeliveryStatus, i64)>,
    /// Pending deliveries whose time has come.
    pub due: i64,
    pub oldest_due_at: Option<EpochMillis>,
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
    Database(#[from] rusqlite::Error),
    /// The database cannot be used: it could not be opened, or a thread that serves it
    /// could not start or has stopped.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything the service keeps. See the module docs for the tenancy rule.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;

    async fn create_organization(&self, org: &Organization) -> StoreResult<()>;
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

    /// Replaces the signing secret; the old one keeps signing until
    /// `previous_expires_at`.
    async fn rotate_secret(
        &self,
        tenant: Tenant,
        id: WebhookId,
        sealed_secret: &[u8],
        previous_expires_at: EpochMillis,
        now: EpochMillis,
    ) -> StoreResult<Option<Webhook>>;

    // ---- Events and deliveries ----

    /// In one transaction: the event and one delivery per subscribed webhook of the
    /// tenant (`held` for an inactive one). A public id already published by the
    /// organization in that environment returns the first result and queues nothing.
    ///
    /// With a `handover`, each delivery to an active webhook that it `take`s is written
    /// already leased and returned in [`Published::handed`]: the engine sends it without
    /// a claim. The rest are due at once, as without one.
    async fn publish_event(
        &self,
        tenant: Tenant,
        event: &NewEvent,
        handover: Option<Arc<dyn Handover>>,
    ) -> StoreResult<Published>;

    /// Claims up to `limit` due deliveries of active webhooks under a lease until
    /// `lease_until`, never giving a webhook more than its `room`.
    async fn claim_due(
        &self,
        now: EpochMillis,
        limit: u32,
        room: &ClaimRoom,
        lease_until: EpochMillis,
    ) -> StoreResult<Vec<ClaimedDelivery>>;

    /// The earliest `next_attempt_at` of a pending delivery (a leased delivery's is the
    /// end of its lease).
    async fn next_due_at(&self) -> StoreResult<Option<EpochMillis>>;

    /// Records attempts (in one transaction) and decides each delivery's next state and
    /// its webhook's counters by `policy`. Returns each delivery's new status.
    async fn record_attempts(
        &self,
        reports: &[AttemptReport],
        policy: &DeliveryPolicy,
        now: EpochMillis,
    ) -> StoreResult<Vec<DeliveryStatus>>;

    /// Ends every lease (at start-up of the only process using an embedded database:
    /// whatever was leased belonged to a process that is gone): those deliveries are due
    /// at `now`.
    async fn release_all_leases(&self, now: EpochMillis) -> StoreResult<u64>;

    /// A webhook's delivery log, newest first, `limit` after `cursor`. `None` if there is
    /// no such webhook.
    async fn list_deliveries(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        status: Option<DeliveryStatus>,
        cursor: Option<&DeliveryCursor>,
        limit: u32,
    ) -> StoreResult<Option<Vec<DeliveryView>>>;

    /// One delivery with its attempts, oldest attempt first.
    async fn get_delivery(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        delivery_id: DeliveryId,
    ) -> StoreResult<Option<(DeliveryView, Vec<AttemptRecord>)>>;

    /// Queues a delivery for an attempt now, whatever its status (also `failed`).
    async fn retry_delivery(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        delivery_id: DeliveryId,
        now: EpochMillis,
    ) -> StoreResult<RetryOutcome>;

    /// Queues again the failed deliveries created in `[since, until)`; returns how many
    /// (`None` if there is no such webhook). Held if the webhook is inactive.
    async fn recover_deliveries(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        since: EpochMillis,
        until: EpochMillis,
        now: EpochMillis,
    ) -> StoreResult<Option<u64>>;

    /// Deletes events (with their deliveries and attempts) created before `before`, and
    /// deleted webhooks gone since before it. Returns the events removed.
    async fn purge(&self, before: EpochMillis) -> StoreResult<u64>;

    async fn delivery_stats(&self, now: EpochMillis) -> StoreResult<DeliveryStats>;
}
