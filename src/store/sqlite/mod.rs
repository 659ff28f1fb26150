//! The embedded SQLite store: zero set-up, one file under the data folder.
//!
//! SQLite allows one writer at a time. Rather than let connections fight for the write
//! lock (and surface `SQLITE_BUSY` to callers), all writes go to exactly one connection,
//! whose thread commits whatever is queued in one `BEGIN IMMEDIATE` transaction; reads use
//! a few read-only connections and see a consistent snapshot thanks to WAL (`conn`).
//! `busy_timeout` covers other processes (the CLI).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    ApiKeyRecord, AttemptRecord, AttemptReport, ClaimRoom, ClaimedDelivery, DeliveryCursor,
    DeliveryPolicy, DeliveryStats, DeliveryStatus, DeliveryView, Handover, NewEvent, NewWebhook,
    Organization, Published, RetryOutcome, SealedSecrets, Store, StoreError, StoreResult, Tenant,
    TestDelivery, Webhook, WebhookPatch,
};
use crate::domain::apikey::Environment;
use crate::domain::ids::{DeliveryId, WebhookId};
use crate::domain::time::EpochMillis;

mod conn;
mod queue;

/// Read-only connections.
const READERS: usize = 4;

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: conn::Writer,
    readers: conn::Readers,
}

const WEBHOOK_COLUMNS: &str = "id, url, events, description, active, disabled_reason, \
     consecutive_failures, last_success_at, created_at, updated_at";

impl SqliteStore {
    /// Opens (creating if missing) the database at a `sqlite:` URL (e.g.
    /// `sqlite://data/vignetim.db`) and applies migrations.
    pub async fn open_url(url: &str) -> StoreResult<Self> {
        let path = path_of_url(url)?;
        tokio::task::spawn_blocking(move || Self::open_path(&path))
            .await
            .map_err(|e| StoreError::Unavailable(format!("opening the database: {e}")))?
    }

    fn open_path(path: &Path) -> StoreResult<Self> {
        let writer = conn::Writer::spawn(path)?;
        let readers = conn::Readers::spawn(path, READERS)?;
        Ok(Self { writer, readers })
    }
}

/// `sqlite://path`, `sqlite:path` (a query string, as in `?mode=rwc`, is ignored).
fn path_of_url(url: &str) -> StoreResult<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| StoreError::Unavailable(format!("not a sqlite: URL: {url}")))?;
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() {
        return Err(StoreError::Unavailable(
            "the sqlite: URL names no file".to_owned(),
        ));
    }
    Ok(PathBuf::from(path))
}

fn fetch_webhook(conn: &Connection, tenant: Tenant, id: WebhookId) -> StoreResult<Option<Webhook>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks \
         WHERE organization_id = ? AND environment = ? AND id = ? AND deleted_at IS NULL"
    ))?;
    let mut rows = stmt.query(params![
        tenant.organization_id.to_string(),
        tenant.environment.as_str(),
        id.to_string()
    ])?;
    rows.next()?.map(webhook_from_row).transpose()
}

fn webhook_from_row(row: &Row) -> StoreResult<Webhook> {
    let id: String = row.get("id")?;
    let events: String = row.get("events")?;
    Ok(Webhook {
        id: id
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("webhook id {id:?}")))?,
        url: row.get("url")?,
        events: serde_json::from_str(&events)
            .map_err(|_| StoreError::Corrupt(format!("events of webhook {id}")))?,
        description: row.get("description")?,
        active: row.get("active")?,
        disabled_reason: row.get("disabled_reason")?,
        consecutive_failures: row.get("consecutive_failures")?,
        last_success_at: row.get("last_success_at")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn events_json(events: &[String]) -> String {
    // Serialising a Vec<String> cannot fail.
    serde_json::to_string(events).unwrap_or_else(|_| "[]".to_owned())
}

/// Holds a webhook's pending deliveries that are not in flight (an in-flight one is held
/// when its attempt is recorded).
pub(super) fn hold_pending(
    conn: &Connection,
    webhook_id: WebhookId,
    now: EpochMillis,
) -> StoreResult<()> {
    conn.prepare_cached(
        "UPDATE deliveries SET status = 'held', next_attempt_at = NULL, updated_at = ?1 \
         WHERE webhook_id = ?2 AND status = 'pending' \
           AND (lease_until IS NULL OR lease_until <= ?1)",
    )?
    .execute(params![now, webhook_id.to_string()])?;
    Ok(())
}

fn delivery_from_row(row: &Row) -> StoreResult<DeliveryView> {
    let id: String = row.get("id")?;
    let status: String = row.get("status")?;
    Ok(DeliveryView {
        id: id
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("delivery id {id:?}")))?,
        event_id: row.get("event_id")?,
        event_type: row.get("event_type")?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery status {status:?}")))?,
        attempt_count: row.get("attempt_count")?,
        next_attempt_at: row.get("next_attempt_at")?,
        created_at: row.get("created_at")?,
    })
}

const DELIVERY_VIEW: &str = "SELECT d.id, e.id AS event_id, e.type AS event_type, d.status, \
     d.attempt_count, d.next_attempt_at, d.created_at \
     FROM deliveries d JOIN events e ON e.seq = d.event_seq";

/// The tenant-checked webhook's `active` flag, or `None` if there is no such webhook.
fn webhook_active(conn: &Connection, tenant: Tenant, id: WebhookId) -> StoreResult<Option<bool>> {
    Ok(conn
        .prepare_cached(
            "SELECT active FROM webhooks \
             WHERE organization_id = ? AND environment = ? AND id = ? AND deleted_at IS NULL",
        )?
        .query_row(
            params![
                tenant.organization_id.to_string(),
                tenant.environment.as_str(),
                id.to_string()
            ],
            |r| r.get(0),
        )
        .optional()?)
}

/// `NotFound` unless the organization exists.
pub(super) fn require_organization(conn: &Connection, id: &str) -> StoreResult<()> {
    conn.prepare_cached("SELECT 1 FROM organizations WHERE id = ?")?
        .query_row([id], |_| Ok(()))
        .optional()?
        .ok_or(StoreError::NotFound)
}

/// Collects the rows of a query through a fallible converter.
fn collect<T>(
    mut rows: rusqlite::Rows<'_>,
    convert: impl Fn(&Row) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(convert(row)?);
    }
    Ok(out)
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        self.readers
            .run(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    async fn create_organization(&self, org: &Organization) -> StoreResult<()> {
        let org = org.clone();
        self.writer
            .run(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO organizations (id, name, created_at) VALUES (?, ?, ?)",
                )?
                .execute(params![org.id.to_string(), org.name, org.created_at])?;
                Ok(())
            })
            .await
    }

    async fn create_api_key(&self, key: &ApiKeyRecord, key_hash: &[u8]) -> StoreResult<()> {
        let (key, key_hash) = (key.clone(), key_hash.to_vec());
        self.writer
            .run(move |conn| {
                require_organization(conn, &key.organization_id.to_string())?;
                conn.prepare_cached(
                    "INSERT INTO api_keys (id, organization_id, environment, name, key_hash, \
                     created_at) VALUES (?, ?, ?, ?, ?, ?)",
                )?
                .execute(params![
                    key.id.to_string(),
                    key.organization_id.to_string(),
                    key.environment.as_str(),
                    key.name,
                    key_hash,
                    key.created_at
                ])?;
                Ok(())
            })
            .await
    }

    async fn find_api_key(&self, key_hash: &[u8]) -> StoreResult<Option<ApiKeyRecord>> {
        let key_hash = key_hash.to_vec();
        self.readers
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, organization_id, environment, name, created_at \
                     FROM api_keys WHERE key_hash = ?",
                )?;
                let mut rows = stmt.query([key_hash])?;
                let Some(row) = rows.next()? else {
                    return Ok(None);
                };
                let corrupt = |what: &str| StoreError::Corrupt(format!("api key {what}"));
                let id: String = row.get("id")?;
                let org: String = row.get("organization_id")?;
                let env: String = row.get("environment")?;
                Ok(Some(ApiKeyRecord {
                    id: id.parse().map_err(|_| corrupt("id"))?,
                    organization_id: org.parse().map_err(|_| corrupt("organization"))?,
                    environment: env
                        .parse::<Environment>()
                        .map_err(|_| corrupt("environment"))?,
                    name: row.get("name")?,
                    created_at: row.get("created_at")?,
                }))
            })
            .await
    }

    async fn create_webhook(
        &self,
        tenant: Tenant,
        webhook: &NewWebhook,
        limit: u32,
    ) -> StoreResult<Webhook> {
        let webhook = webhook.clone();
        self.writer
            .run(move |conn| {
                let count: i64 = conn
                    .prepare_cached(
                        "SELECT COUNT(*) FROM webhooks \
                         WHERE organization_id = ? AND environment = ? AND deleted_at IS NULL",
                    )?
                    .query_row(
                        params![
                            tenant.organization_id.to_string(),
                            tenant.environment.as_str()
                        ],
                        |r| r.get(0),
                    )?;
                if count >= i64::from(limit) {
                    return Err(StoreError::LimitReached);
                }
                conn.prepare_cached(
                    "INSERT INTO webhooks (id, organization_id, environment, url, events, \
                     description, active, secret, created_at, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                )?
                .execute(params![
                    webhook.id.to_string(),
                    tenant.organization_id.to_string(),
                    tenant.environment.as_str(),
                    webhook.url,
                    events_json(&webhook.events),
                    webhook.description,
                    webhook.sealed_secret,
                    webhook.created_at,
                    webhook.created_at
                ])?;
                fetch_webhook(conn, tenant, webhook.id)?.ok_or(StoreError::NotFound)
            })
            .await
    }

    async fn list_webhooks(&self, tenant: Tenant) -> StoreResult<Vec<Webhook>> {
        self.readers
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks \
                     WHERE organization_id = ? AND environment = ? AND deleted_at IS NULL \
                     ORDER BY created_at DESC, id DESC"
                ))?;
                let rows = stmt.query(params![
                    tenant.organization_id.to_string(),
                    tenant.environment.as_str()
                ])?;
                collect(rows, webhook_from_row)
            })
            .await
    }

    async fn get_webhook(&self, tenant: Tenant, id: WebhookId) -> StoreResult<Option<Webhook>> {
        self.readers
            .run(move |conn| fetch_webhook(conn, tenant, id))
            .await
    }

    async fn update_webhook(
        &self,
        tenant: Tenant,
        id: WebhookId,
        patch: &WebhookPatch,
    ) -> StoreResult<Option<Webhook>> {
        let patch = patch.clone();
        self.writer
            .run(move |conn| {
                let (set_description, description) = match &patch.description {
                    Some(d) => (true, d.clone()),
                    None => (false, None),
                };
                let changed = conn
                    .prepare_cached(
                        "UPDATE webhooks SET \
                           url = COALESCE(?1, url), \
                           events = COALESCE(?2, events), \
                           description = CASE WHEN ?3 THEN ?4 ELSE description END, \
                           active = COALESCE(?5, active), \
                           disabled_reason = CASE WHEN ?5 = 1 THEN NULL ELSE disabled_reason END, \
                           consecutive_failures = CASE WHEN ?5 = 1 AND active = 0 THEN 0 \
                                                       ELSE consecutive_failures END, \
                           failing_since = CASE WHEN ?5 = 1 AND active = 0 THEN NULL \
                                                ELSE failing_since END, \
                           updated_at = ?6 \
                         WHERE organization_id = ?7 AND environment = ?8 AND id = ?9 \
                           AND deleted_at IS NULL",
                    )?
                    .execute(params![
                        patch.url,
                        patch.events.as_deref().map(events_json),
                        set_description,
                        description,
                        patch.active,
                        patch.updated_at,
                        tenant.organization_id.to_string(),
                        tenant.environment.as_str(),
                        id.to_string()
                    ])?;
                if changed == 0 {
                    return Ok(None);
                }
                match patch.active {
                    Some(false) => hold_pending(conn, id, patch.updated_at)?,
                    Some(true) => {
                        conn.prepare_cached(
                            "UPDATE deliveries SET status = 'pending', next_attempt_at = ?1, \
                               lease_until = NULL, updated_at = ?1 \
                             WHERE webhook_id = ?2 AND status = 'held' AND created_at >= ?3",
                        )?
                        .execute(params![
                            patch.updated_at,
                            id.to_string(),
                            patch.resume_since
                        ])?;
                    }
                    None => {}
                }
                fetch_webhook(conn, tenant, id)
            })
            .await
    }

    async fn delete_webhook(
        &self,
        tenant: Tenant,
        id: WebhookId,
        now: EpochMillis,
    ) -> StoreResult<bool> {
        self.writer
            .run(move |conn| {
                let (org, env, id) = (
                    tenant.organization_id.to_string(),
                    tenant.environment.as_str(),
                    id.to_string(),
                );
                let changed = conn
                    .prepare_cached(
                        "UPDATE webhooks SET deleted_at = ?1, updated_at = ?1, active = 0, \
                           secret = X'', previous_secret = NULL, previous_secret_expires_at = NULL \
                         WHERE organization_id = ?2 AND environment = ?3 AND id = ?4 \
                           AND deleted_at IS NULL",
                    )?
                    .execute(params![now, org, env, id])?;
                if changed == 0 {
                    return Ok(false);
                }
                conn.prepare_cached(
                    "UPDATE deliveries SET status = 'cancelled', next_attempt_at = NULL, \
                       lease_until = NULL, updated_at = ?1 \
                     WHERE organization_id = ?2 AND environment = ?3 AND webhook_id = ?4 \
                       AND status IN ('pending', 'held')",
                )?
                .execute(params![now, org, env, id])?;
                Ok(true)
            })
            .await
    }

    async fn webhook_secrets(
        &self,
        tenant: Tenant,
        id: WebhookId,
    ) -> StoreResult<Option<SealedSecrets>> {
        self.readers
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT secret, previous_secret, previous_secret_expires_at FROM webhooks \
                     WHERE organization_id = ? AND environment = ? AND id = ? \
                       AND deleted_at IS NULL",
                )?;
                let mut rows = stmt.query(params![
                    tenant.organization_id.to_string(),
                    tenant.environment.as_str(),
                    id.to_string()
                ])?;
                Ok(rows
                    .next()?
                    .map(|row| queue::sealed_from_row(row, 0))
                    .transpose()?)
            })
            .await
    }

    async fn record_test_delivery(&self, tenant: Tenant, test: &TestDelivery) -> StoreResult<()> {
        let test = test.clone();
        self.writer
            .run(move |conn| {
                let org = tenant.organization_id.to_string();
                let env = tenant.environment.as_str();
                let event_seq: i64 = conn
                    .prepare_cached(
                        "INSERT INTO events (id, organization_id, environment, type, payload, \
                         created_at) VALUES (?, ?, ?, 'webhook.test', ?, ?) RETURNING seq",
                    )?
                    .query_row(
                        params![
                            test.event_id.to_string(),
                            org,
                            env,
                            test.payload,
                            test.created_at
                        ],
                        |r| r.get(0),
                    )?;
                let status = if test.succeeded {
                    "succeeded"
                } else {
                    "failed"
                };
                conn.prepare_cached(
                    "INSERT INTO deliveries (id, organization_id, environment, webhook_id, \
                     event_seq, status, attempt_count, created_at, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
                )?
                .execute(params![
                    test.delivery_id.to_string(),
                    org,
                    env,
                    test.webhook_id.to_string(),
                    event_seq,
                    status,
                    test.created_at,
                    test.attempt.attempted_at
                ])?;
                queue::insert_attempt(conn, test.delivery_id, &test.attempt)
            })
            .await
    }

    async fn rotate_secret(
        &self,
        tenant: Tenant,
        id: WebhookId,
        sealed_secret: &[u8],
        previous_expires_at: EpochMillis,
        now: EpochMillis,
    ) -> StoreResult<Option<Webhook>> {
        let sealed_secret = sealed_secret.to_vec();
        self.writer
            .run(move |conn| {
                let changed = conn
                    .prepare_cached(
                        "UPDATE webhooks SET previous_secret = secret, \
                           previous_secret_expires_at = ?1, secret = ?2, updated_at = ?3 \
                         WHERE organization_id = ?4 AND environment = ?5 AND id = ?6 \
                           AND deleted_at IS NULL",
                    )?
                    .execute(params![
                        previous_expires_at,
                        sealed_secret,
                        now,
                        tenant.organization_id.to_string(),
                        tenant.environment.as_str(),
                        id.to_string()
                    ])?;
                if changed == 0 {
                    return Ok(None);
                }
                fetch_webhook(conn, tenant, id)
            })
            .await
    }

    async fn publish_event(
        &self,
        tenant: Tenant,
        event: &NewEvent,
        handover: Option<Arc<dyn Handover>>,
    ) -> StoreResult<Published> {
        let event = event.clone();
        self.writer
            .run(move |conn| queue::publish(conn, tenant, &event, handover.as_deref()))
            .await
    }

    async fn claim_due(
        &self,
        now: EpochMillis,
        limit: u32,
        room: &ClaimRoom,
        lease_until: EpochMillis,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let asked = std::time::Instant::now();
        let room = room.clone();
        self.writer
            .run(move |conn| {
                // The writer may have kept us waiting: the lease runs from when the claim
                // is made.
                let waited = i64::try_from(asked.elapsed().as_millis()).unwrap_or(i64::MAX);
                queue::claim(conn, now + waited, limit, &room, lease_until + waited)
            })
            .await
    }

    async fn next_due_at(&self) -> StoreResult<Option<EpochMillis>> {
        self.readers
            .run(|conn| {
                Ok(conn
                    .prepare_cached(
                        "SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending'",
                    )?
                    .query_row([], |r| r.get(0))?)
            })
            .await
    }

    async fn record_attempts(
        &self,
        reports: &[AttemptReport],
        policy: &DeliveryPolicy,
        now: EpochMillis,
    ) -> StoreResult<Vec<DeliveryStatus>> {
        let (reports, policy) = (reports.to_vec(), policy.clone());
        self.writer
            .run(move |conn| queue::record(conn, &reports, &policy, now))
            .await
    }

    async fn release_all_leases(&self, now: EpochMillis) -> StoreResult<u64> {
        self.writer
            .run(move |conn| {
                let released = conn.execute(
                    "UPDATE deliveries SET lease_until = NULL, next_attempt_at = ?1 \
                     WHERE lease_until IS NOT NULL AND status = 'pending'",
                    [now],
                )?;
                Ok(released as u64)
            })
            .await
    }

    async fn list_deliveries(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        status: Option<DeliveryStatus>,
        cursor: Option<&DeliveryCursor>,
        limit: u32,
    ) -> StoreResult<Option<Vec<DeliveryView>>> {
        let cursor = cursor.cloned();
        self.readers
            .run(move |conn| {
                if webhook_active(conn, tenant, webhook_id)?.is_none() {
                    return Ok(None);
                }
                let mut stmt = conn.prepare_cached(&format!(
                    "{DELIVERY_VIEW} WHERE d.organization_id = ?1 AND d.environment = ?2 \
                       AND d.webhook_id = ?3 AND (?4 IS NULL OR d.status = ?4) \
                       AND (?5 IS NULL OR d.created_at < ?5 \
                            OR (d.created_at = ?5 AND d.id < ?6)) \
                     ORDER BY d.created_at DESC, d.id DESC LIMIT ?7"
                ))?;
                let rows = stmt.query(params![
                    tenant.organization_id.to_string(),
                    tenant.environment.as_str(),
                    webhook_id.to_string(),
                    status.map(DeliveryStatus::as_str),
                    cursor.as_ref().map(|c| c.created_at),
                    cursor.as_ref().map(|c| c.id.clone()),
                    i64::from(limit)
                ])?;
                collect(rows, delivery_from_row).map(Some)
            })
            .await
    }

    async fn get_delivery(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        delivery_id: DeliveryId,
    ) -> StoreResult<Option<(DeliveryView, Vec<AttemptRecord>)>> {
        self.readers
            .run(move |conn| {
                if webhook_active(conn, tenant, webhook_id)?.is_none() {
                    return Ok(None);
                }
                let mut stmt = conn.prepare_cached(&format!(
                    "{DELIVERY_VIEW} WHERE d.organization_id = ? AND d.environment = ? \
                       AND d.webhook_id = ? AND d.id = ?"
                ))?;
                let mut rows = stmt.query(params![
                    tenant.organization_id.to_string(),
                    tenant.environment.as_str(),
                    webhook_id.to_string(),
                    delivery_id.to_string()
                ])?;
                let Some(row) = rows.next()? else {
                    return Ok(None);
                };
                let view = delivery_from_row(row)?;
                let mut stmt = conn.prepare_cached(
                    "SELECT attempted_at, response_time_ms, status_code, failure, response_body \
                     FROM attempts WHERE delivery_id = ? ORDER BY attempted_at, id",
                )?;
                let rows = stmt.query([delivery_id.to_string()])?;
                let attempts = collect(rows, |r| {
                    let status: Option<i64> = r.get("status_code")?;
                    Ok(AttemptRecord {
                        attempted_at: r.get("attempted_at")?,
                        response_time_ms: r.get("response_time_ms")?,
                        status_code: status.and_then(|s| u16::try_from(s).ok()),
                        failure: r.get("failure")?,
                        response_body: r.get("response_body")?,
                    })
                })?;
                Ok(Some((view, attempts)))
            })
            .await
    }

    async fn retry_delivery(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        delivery_id: DeliveryId,
        now: EpochMillis,
    ) -> StoreResult<RetryOutcome> {
        self.writer
            .run(move |conn| {
                let Some(active) = webhook_active(conn, tenant, webhook_id)? else {
                    return Ok(RetryOutcome::NotFound);
                };
                let found: Option<(Option<i64>, String)> = conn
                    .prepare_cached(
                        "SELECT d.lease_until, e.type FROM deliveries d \
                         JOIN events e ON e.seq = d.event_seq \
                         WHERE d.id = ? AND d.webhook_id = ?",
                    )?
                    .query_row(
                        params![delivery_id.to_string(), webhook_id.to_string()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((lease, event_type)) = found else {
                    return Ok(RetryOutcome::NotFound);
                };
                if event_type == crate::domain::event_type::TEST_EVENT_TYPE {
                    return Ok(RetryOutcome::TestDelivery);
                }
                if !active {
                    return Ok(RetryOutcome::WebhookInactive);
                }
                if lease.is_some_and(|until| until > now) {
                    return Ok(RetryOutcome::InFlight);
                }
                conn.prepare_cached(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = ?1, \
                       lease_until = NULL, updated_at = ?1 WHERE id = ?2",
                )?
                .execute(params![now, delivery_id.to_string()])?;
                let mut stmt = conn.prepare_cached(&format!("{DELIVERY_VIEW} WHERE d.id = ?"))?;
                let mut rows = stmt.query([delivery_id.to_string()])?;
                let row = rows.next()?.ok_or(StoreError::NotFound)?;
                Ok(RetryOutcome::Queued(delivery_from_row(row)?))
            })
            .await
    }

    async fn recover_deliveries(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        since: EpochMillis,
        until: EpochMillis,
        now: EpochMillis,
    ) -> StoreResult<Option<u64>> {
        self.writer
            .run(move |conn| {
                let Some(active) = webhook_active(conn, tenant, webhook_id)? else {
                    return Ok(None);
                };
                let recovered = conn
                    .prepare_cached(
                        "UPDATE deliveries SET status = ?1, next_attempt_at = ?2, \
                           lease_until = NULL, updated_at = ?3 \
                         WHERE webhook_id = ?4 AND status = 'failed' \
                           AND created_at >= ?5 AND created_at < ?6 \
                           AND (SELECT type FROM events WHERE seq = deliveries.event_seq) \
                               != 'webhook.test'",
                    )?
                    .execute(params![
                        if active { "pending" } else { "held" },
                        active.then_some(now),
                        now,
                        webhook_id.to_string(),
                        since,
                        until
                    ])?;
                Ok(Some(recovered as u64))
            })
            .await
    }

    async fn purge(&self, before: EpochMillis) -> StoreResult<u64> {
        // In chunks, each its own job: after 30 days of traffic one purge transaction would
        // hold the only writer (and so every publish and record) for as long as it takes.
        const CHUNK: i64 = 500;
        let mut purged = 0u64;
        loop {
            let chunk = self
                .writer
                .run(move |conn| {
                    let seqs: Vec<i64> = conn
                        .prepare_cached(
                            "SELECT seq FROM events WHERE created_at < ? \
                             ORDER BY created_at LIMIT ?",
                        )?
                        .query_map(params![before, CHUNK], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                    for seq in &seqs {
                        for sql in [
                            "DELETE FROM attempts WHERE delivery_id IN \
                             (SELECT id FROM deliveries WHERE event_seq = ?)",
                            "DELETE FROM deliveries WHERE event_seq = ?",
                            "DELETE FROM events WHERE seq = ?",
                        ] {
                            conn.prepare_cached(sql)?.execute([seq])?;
                        }
                    }
                    Ok(seqs.len() as u64)
                })
                .await?;
            if chunk == 0 {
                break;
            }
            purged += chunk;
        }
        self.writer
            .run(move |conn| {
                conn.prepare_cached(
                    "DELETE FROM webhooks WHERE deleted_at < ? \
                       AND NOT EXISTS (SELECT 1 FROM deliveries WHERE webhook_id = webhooks.id)",
                )?
                .execute([before])?;
                Ok(())
            })
            .await?;
        Ok(purged)
    }

    async fn delivery_stats(&self, now: EpochMillis) -> StoreResult<DeliveryStats> {
        self.readers
            .run(move |conn| {
                // From indexes only, in one statement (one snapshot): a `GROUP BY` over
                // the table read every row at every scrape (migration 0003).
                const RARE: &str = "status <> 'pending' AND status <> 'succeeded'";
                let by_status = conn
                    .prepare_cached(&format!(
                        "SELECT (SELECT COUNT(*) FROM deliveries), \
                                (SELECT COUNT(*) FROM deliveries WHERE status = 'pending'), \
                                (SELECT COUNT(*) FROM deliveries WHERE {RARE} AND status = 'failed'), \
                                (SELECT COUNT(*) FROM deliveries WHERE {RARE} AND status = 'held'), \
                                (SELECT COUNT(*) FROM deliveries WHERE {RARE} AND status = 'cancelled')"
                    ))?
                    .query_row([], |r| {
                        let (total, pending, failed, held, cancelled): (i64, i64, i64, i64, i64) =
                            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
                        Ok(vec![
                            (DeliveryStatus::Pending, pending),
                            (
                                DeliveryStatus::Succeeded,
                                total - pending - failed - held - cancelled,
                            ),
                            (DeliveryStatus::Failed, failed),
                            (DeliveryStatus::Held, held),
                            (DeliveryStatus::Cancelled, cancelled),
                        ])
                    })?;
                let (due, oldest_due_at) = conn
                    .prepare_cached(
                        "SELECT COUNT(*), MIN(next_attempt_at) FROM deliveries \
                         WHERE status = 'pending' AND next_attempt_at <= ?1",
                    )?
                    .query_row([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(DeliveryStats {
                    by_status,
                    due,
                    oldest_due_at,
                })
            })
            .await
    }
}
