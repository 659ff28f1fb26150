//! The embedded SQLite store: zero set-up, one file under the data folder.
//!
//! SQLite allows one writer at a time. Rather than let connections fight for the write
//! lock (and surface `SQLITE_BUSY` to callers), all writes go through a pool of exactly
//! one connection and begin with `BEGIN IMMEDIATE`; reads use a separate pool and see a
//! consistent snapshot thanks to WAL. `busy_timeout` covers other processes (the CLI).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::{
    ApiKeyRecord, AttemptRecord, AttemptReport, ClaimedDelivery, DeliveryCursor, DeliveryPolicy,
    DeliveryStats, DeliveryStatus, DeliveryView, NewEvent, NewWebhook, Organization, Published,
    RetryOutcome, SealedSecrets, Store, StoreError, StoreResult, Tenant, TestDelivery, Webhook,
    WebhookPatch,
};
use crate::domain::apikey::Environment;
use crate::domain::ids::{DeliveryId, WebhookId};
use crate::domain::time::EpochMillis;

mod queue;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    /// Exactly one connection: writes queue here instead of failing with SQLITE_BUSY.
    writer: SqlitePool,
    /// Concurrent readers (WAL gives each a consistent snapshot).
    readers: SqlitePool,
    /// Publishes go through one task that commits them in groups (see `queue`).
    publisher: queue::Publisher,
}

const WEBHOOK_COLUMNS: &str = "id, url, events, description, active, disabled_reason, \
     consecutive_failures, last_success_at, created_at, updated_at";

impl SqliteStore {
    /// Opens (creating if missing) the database at a `sqlite:` URL (e.g.
    /// `sqlite://data/vignetim.db`) and applies migrations.
    pub async fn open_url(url: &str) -> StoreResult<Self> {
        // sqlx leaves SQLite's defaults; these are ours, each for a measured reason
        // (BENCHMARKS.md): WAL with NORMAL sync (a commit survives a process crash, not a
        // power cut), statement journals in memory instead of temp files, a 16 MiB page
        // cache. Checkpoints: see `with_options`.
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("temp_store", "memory")
            .pragma("journal_size_limit", "67108864")
            .pragma("cache_size", "-16384");
        Self::with_options(options).await
    }

    async fn with_options(options: SqliteConnectOptions) -> StoreResult<Self> {
        // The writer never checkpoints in its commit path (an automatic checkpoint copies
        // the WAL and fsyncs while every write waits: the p99 spikes of the benchmark); a
        // background connection checkpoints instead, without blocking the writer. The
        // large automatic limit is only a backstop should that task fall behind.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone().pragma("wal_autocheckpoint", "100000"))
            .await?;
        MIGRATOR.run(&writer).await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        tokio::spawn(checkpoint_periodically(checkpointer));
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        let publisher = queue::Publisher::spawn(writer.clone());
        Ok(Self {
            writer,
            readers,
            publisher,
        })
    }

    /// Applies migrations only (the `migrate` sub-command); `open` does it too.
    pub async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    async fn begin_write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn fetch_webhook(
        &self,
        conn: &mut sqlx::SqliteConnection,
        tenant: Tenant,
        id: WebhookId,
    ) -> StoreResult<Option<Webhook>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks \
             WHERE organization_id = ? AND environment = ? AND id = ? AND deleted_at IS NULL"
        )))
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        row.as_ref().map(webhook_from_row).transpose()
    }
}

fn webhook_from_row(row: &SqliteRow) -> StoreResult<Webhook> {
    let id: String = row.try_get("id")?;
    let events: String = row.try_get("events")?;
    Ok(Webhook {
        id: id
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("webhook id {id:?}")))?,
        url: row.try_get("url")?,
        events: serde_json::from_str(&events)
            .map_err(|_| StoreError::Corrupt(format!("events of webhook {id}")))?,
        description: row.try_get("description")?,
        active: row.try_get("active")?,
        disabled_reason: row.try_get("disabled_reason")?,
        consecutive_failures: row.try_get("consecutive_failures")?,
        last_success_at: row.try_get("last_success_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn events_json(events: &[String]) -> String {
    // Serialising a Vec<String> cannot fail.
    serde_json::to_string(events).unwrap_or_else(|_| "[]".to_owned())
}

/// Copies the WAL back into the database twice a second, from its own connection, so
/// that the writer never does it while others wait (PASSIVE: it never blocks a writer).
async fn checkpoint_periodically(conn: SqlitePool) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&conn)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// Holds a webhook's pending deliveries that are not in flight (an in-flight one is held
/// when its attempt is recorded).
pub(super) async fn hold_pending(
    conn: &mut sqlx::SqliteConnection,
    webhook_id: WebhookId,
    now: EpochMillis,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE deliveries SET status = 'held', next_attempt_at = NULL, updated_at = ?1 \
         WHERE webhook_id = ?2 AND status = 'pending' \
           AND (lease_until IS NULL OR lease_until <= ?1)",
    )
    .bind(now)
    .bind(webhook_id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn delivery_from_row(row: &SqliteRow) -> StoreResult<DeliveryView> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    Ok(DeliveryView {
        id: id
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("delivery id {id:?}")))?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery status {status:?}")))?,
        attempt_count: row.try_get("attempt_count")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        created_at: row.try_get("created_at")?,
    })
}

const DELIVERY_VIEW: &str = "SELECT d.id, e.id AS event_id, e.type AS event_type, d.status, \
     d.attempt_count, d.next_attempt_at, d.created_at \
     FROM deliveries d JOIN events e ON e.seq = d.event_seq";

/// The tenant-checked webhook's `active` flag, or `None` if there is no such webhook.
async fn webhook_active(
    conn: &mut sqlx::SqliteConnection,
    tenant: Tenant,
    id: WebhookId,
) -> StoreResult<Option<bool>> {
    Ok(sqlx::query_scalar(
        "SELECT active FROM webhooks \
         WHERE organization_id = ? AND environment = ? AND id = ? AND deleted_at IS NULL",
    )
    .bind(tenant.organization_id.to_string())
    .bind(tenant.environment.as_str())
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await?)
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn create_organization(&self, org: &Organization) -> StoreResult<()> {
        sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES (?, ?, ?)")
            .bind(org.id.to_string())
            .bind(&org.name)
            .bind(org.created_at)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn create_api_key(&self, key: &ApiKeyRecord, key_hash: &[u8]) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let org = sqlx::query("SELECT 1 FROM organizations WHERE id = ?")
            .bind(key.organization_id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if org.is_none() {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "INSERT INTO api_keys (id, organization_id, environment, name, key_hash, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(key.id.to_string())
        .bind(key.organization_id.to_string())
        .bind(key.environment.as_str())
        .bind(&key.name)
        .bind(key_hash)
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_api_key(&self, key_hash: &[u8]) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query(
            "SELECT id, organization_id, environment, name, created_at \
             FROM api_keys WHERE key_hash = ?",
        )
        .bind(key_hash)
        .fetch_optional(&self.readers)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let corrupt = |what: &str| StoreError::Corrupt(format!("api key {what}"));
        let id: String = row.try_get("id")?;
        let org: String = row.try_get("organization_id")?;
        let env: String = row.try_get("environment")?;
        Ok(Some(ApiKeyRecord {
            id: id.parse().map_err(|_| corrupt("id"))?,
            organization_id: org.parse().map_err(|_| corrupt("organization"))?,
            environment: env
                .parse::<Environment>()
                .map_err(|_| corrupt("environment"))?,
            name: row.try_get("name")?,
            created_at: row.try_get("created_at")?,
        }))
    }

    async fn create_webhook(
        &self,
        tenant: Tenant,
        webhook: &NewWebhook,
        limit: u32,
    ) -> StoreResult<Webhook> {
        let mut tx = self.begin_write().await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM webhooks \
             WHERE organization_id = ? AND environment = ? AND deleted_at IS NULL",
        )
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if count >= i64::from(limit) {
            return Err(StoreError::LimitReached);
        }
        sqlx::query(
            "INSERT INTO webhooks (id, organization_id, environment, url, events, description, \
             active, secret, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
        )
        .bind(webhook.id.to_string())
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(&webhook.url)
        .bind(events_json(&webhook.events))
        .bind(&webhook.description)
        .bind(&webhook.sealed_secret)
        .bind(webhook.created_at)
        .bind(webhook.created_at)
        .execute(&mut *tx)
        .await?;
        let created = self
            .fetch_webhook(&mut tx, tenant, webhook.id)
            .await?
            .ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok(created)
    }

    async fn list_webhooks(&self, tenant: Tenant) -> StoreResult<Vec<Webhook>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks \
             WHERE organization_id = ? AND environment = ? AND deleted_at IS NULL \
             ORDER BY created_at DESC, id DESC"
        )))
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn get_webhook(&self, tenant: Tenant, id: WebhookId) -> StoreResult<Option<Webhook>> {
        let mut conn = self.readers.acquire().await?;
        self.fetch_webhook(&mut conn, tenant, id).await
    }

    async fn update_webhook(
        &self,
        tenant: Tenant,
        id: WebhookId,
        patch: &WebhookPatch,
    ) -> StoreResult<Option<Webhook>> {
        let mut tx = self.begin_write().await?;
        let (set_description, description) = match &patch.description {
            Some(d) => (true, d.clone()),
            None => (false, None),
        };
        let result = sqlx::query(
            "UPDATE webhooks SET \
               url = COALESCE(?1, url), \
               events = COALESCE(?2, events), \
               description = CASE WHEN ?3 THEN ?4 ELSE description END, \
               active = COALESCE(?5, active), \
               disabled_reason = CASE WHEN ?5 = 1 THEN NULL ELSE disabled_reason END, \
               consecutive_failures = CASE WHEN ?5 = 1 AND active = 0 THEN 0 \
                                           ELSE consecutive_failures END, \
               failing_since = CASE WHEN ?5 = 1 AND active = 0 THEN NULL ELSE failing_since END, \
               updated_at = ?6 \
             WHERE organization_id = ?7 AND environment = ?8 AND id = ?9 AND deleted_at IS NULL",
        )
        .bind(&patch.url)
        .bind(patch.events.as_deref().map(events_json))
        .bind(set_description)
        .bind(description)
        .bind(patch.active)
        .bind(patch.updated_at)
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 0 {
            return Ok(None);
        }
        match patch.active {
            Some(false) => hold_pending(&mut tx, id, patch.updated_at).await?,
            Some(true) => {
                sqlx::query(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = ?1, \
                       lease_until = NULL, updated_at = ?1 \
                     WHERE webhook_id = ?2 AND status = 'held' AND created_at >= ?3",
                )
                .bind(patch.updated_at)
                .bind(id.to_string())
                .bind(patch.resume_since)
                .execute(&mut *tx)
                .await?;
            }
            None => {}
        }
        let updated = self.fetch_webhook(&mut tx, tenant, id).await?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn delete_webhook(
        &self,
        tenant: Tenant,
        id: WebhookId,
        now: EpochMillis,
    ) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let result = sqlx::query(
            "UPDATE webhooks SET deleted_at = ?1, updated_at = ?1, active = 0, \
               secret = X'', previous_secret = NULL, previous_secret_expires_at = NULL \
             WHERE organization_id = ?2 AND environment = ?3 AND id = ?4 AND deleted_at IS NULL",
        )
        .bind(now)
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE deliveries SET status = 'cancelled', next_attempt_at = NULL, \
               lease_until = NULL, updated_at = ?1 \
             WHERE organization_id = ?2 AND environment = ?3 AND webhook_id = ?4 \
               AND status IN ('pending', 'held')",
        )
        .bind(now)
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn webhook_secrets(
        &self,
        tenant: Tenant,
        id: WebhookId,
    ) -> StoreResult<Option<SealedSecrets>> {
        let row = sqlx::query(
            "SELECT secret, previous_secret, previous_secret_expires_at FROM webhooks \
             WHERE organization_id = ? AND environment = ? AND id = ? AND deleted_at IS NULL",
        )
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(id.to_string())
        .fetch_optional(&self.readers)
        .await?;
        row.as_ref().map(queue::sealed_from_row).transpose()
    }

    async fn record_test_delivery(&self, tenant: Tenant, test: &TestDelivery) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let org = tenant.organization_id.to_string();
        let env = tenant.environment.as_str();
        let event_seq: i64 = sqlx::query_scalar(
            "INSERT INTO events (id, organization_id, environment, type, payload, created_at) \
             VALUES (?, ?, ?, 'webhook.test', ?, ?) RETURNING seq",
        )
        .bind(test.event_id.to_string())
        .bind(&org)
        .bind(env)
        .bind(&test.payload)
        .bind(test.created_at)
        .fetch_one(&mut *tx)
        .await?;
        let status = if test.succeeded {
            "succeeded"
        } else {
            "failed"
        };
        sqlx::query(
            "INSERT INTO deliveries (id, organization_id, environment, webhook_id, event_seq, \
             status, attempt_count, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
        )
        .bind(test.delivery_id.to_string())
        .bind(&org)
        .bind(env)
        .bind(test.webhook_id.to_string())
        .bind(event_seq)
        .bind(status)
        .bind(test.created_at)
        .bind(test.attempt.attempted_at)
        .execute(&mut *tx)
        .await?;
        queue::insert_attempts(&mut tx, &[(test.delivery_id, &test.attempt)]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotate_secret(
        &self,
        tenant: Tenant,
        id: WebhookId,
        sealed_secret: &[u8],
        previous_expires_at: EpochMillis,
        now: EpochMillis,
    ) -> StoreResult<Option<Webhook>> {
        let mut tx = self.begin_write().await?;
        let result = sqlx::query(
            "UPDATE webhooks SET previous_secret = secret, \
               previous_secret_expires_at = ?1, secret = ?2, updated_at = ?3 \
             WHERE organization_id = ?4 AND environment = ?5 AND id = ?6 AND deleted_at IS NULL",
        )
        .bind(previous_expires_at)
        .bind(sealed_secret)
        .bind(now)
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 0 {
            return Ok(None);
        }
        let webhook = self.fetch_webhook(&mut tx, tenant, id).await?;
        tx.commit().await?;
        Ok(webhook)
    }

    async fn publish_event(&self, tenant: Tenant, event: &NewEvent) -> StoreResult<Published> {
        queue::publish(&self.publisher, tenant, event.clone()).await
    }

    async fn claim_due(
        &self,
        now: EpochMillis,
        limit: u32,
        per_webhook: u32,
        lease_until: EpochMillis,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let asked = std::time::Instant::now();
        let mut tx = self.begin_write().await?;
        // The writer may have kept us waiting: the lease runs from when the claim is made.
        let waited = i64::try_from(asked.elapsed().as_millis()).unwrap_or(i64::MAX);
        let claimed = queue::claim(
            &mut tx,
            now + waited,
            limit,
            per_webhook,
            lease_until + waited,
        )
        .await?;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn next_due_at(&self) -> StoreResult<Option<EpochMillis>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(d.next_attempt_at) FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.status = 'pending' AND d.lease_until IS NULL \
               AND w.active = 1 AND w.deleted_at IS NULL",
        )
        .fetch_one(&self.readers)
        .await?)
    }

    async fn record_attempts(
        &self,
        reports: &[AttemptReport],
        policy: &DeliveryPolicy,
        now: EpochMillis,
    ) -> StoreResult<Vec<DeliveryStatus>> {
        let mut tx = self.begin_write().await?;
        let statuses = queue::record(&mut tx, reports, policy, now).await?;
        tx.commit().await?;
        Ok(statuses)
    }

    async fn release_all_leases(&self) -> StoreResult<u64> {
        let result =
            sqlx::query("UPDATE deliveries SET lease_until = NULL WHERE lease_until IS NOT NULL")
                .execute(&self.writer)
                .await?;
        Ok(result.rows_affected())
    }

    async fn list_deliveries(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        status: Option<DeliveryStatus>,
        cursor: Option<&DeliveryCursor>,
        limit: u32,
    ) -> StoreResult<Option<Vec<DeliveryView>>> {
        let mut conn = self.readers.acquire().await?;
        if webhook_active(&mut conn, tenant, webhook_id)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{DELIVERY_VIEW} WHERE d.organization_id = ?1 AND d.environment = ?2 \
               AND d.webhook_id = ?3 AND (?4 IS NULL OR d.status = ?4) \
               AND (?5 IS NULL OR d.created_at < ?5 OR (d.created_at = ?5 AND d.id < ?6)) \
             ORDER BY d.created_at DESC, d.id DESC LIMIT ?7"
        )))
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(webhook_id.to_string())
        .bind(status.map(DeliveryStatus::as_str))
        .bind(cursor.map(|c| c.created_at))
        .bind(cursor.map(|c| c.id.clone()))
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(delivery_from_row)
            .collect::<StoreResult<Vec<_>>>()
            .map(Some)
    }

    async fn get_delivery(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        delivery_id: DeliveryId,
    ) -> StoreResult<Option<(DeliveryView, Vec<AttemptRecord>)>> {
        let mut conn = self.readers.acquire().await?;
        if webhook_active(&mut conn, tenant, webhook_id)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{DELIVERY_VIEW} WHERE d.organization_id = ? AND d.environment = ? \
               AND d.webhook_id = ? AND d.id = ?"
        )))
        .bind(tenant.organization_id.to_string())
        .bind(tenant.environment.as_str())
        .bind(webhook_id.to_string())
        .bind(delivery_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let view = delivery_from_row(&row)?;
        let attempts = sqlx::query(
            "SELECT attempted_at, response_time_ms, status_code, failure, response_body \
             FROM attempts WHERE delivery_id = ? ORDER BY attempted_at, id",
        )
        .bind(delivery_id.to_string())
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| -> StoreResult<AttemptRecord> {
            let status: Option<i64> = r.try_get("status_code")?;
            Ok(AttemptRecord {
                attempted_at: r.try_get("attempted_at")?,
                response_time_ms: r.try_get("response_time_ms")?,
                status_code: status.and_then(|s| u16::try_from(s).ok()),
                failure: r.try_get("failure")?,
                response_body: r.try_get("response_body")?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
        Ok(Some((view, attempts)))
    }

    async fn retry_delivery(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        delivery_id: DeliveryId,
        now: EpochMillis,
    ) -> StoreResult<RetryOutcome> {
        let mut tx = self.begin_write().await?;
        let Some(active) = webhook_active(&mut tx, tenant, webhook_id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        let found: Option<(Option<i64>, String)> = sqlx::query_as(
            "SELECT d.lease_until, e.type FROM deliveries d JOIN events e ON e.seq = d.event_seq \
             WHERE d.id = ? AND d.webhook_id = ?",
        )
        .bind(delivery_id.to_string())
        .bind(webhook_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
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
        sqlx::query(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = ?1, lease_until = NULL, \
               updated_at = ?1 WHERE id = ?2",
        )
        .bind(now)
        .bind(delivery_id.to_string())
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{DELIVERY_VIEW} WHERE d.id = ?"
        )))
        .bind(delivery_id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        let view = delivery_from_row(&row)?;
        tx.commit().await?;
        Ok(RetryOutcome::Queued(view))
    }

    async fn recover_deliveries(
        &self,
        tenant: Tenant,
        webhook_id: WebhookId,
        since: EpochMillis,
        until: EpochMillis,
        now: EpochMillis,
    ) -> StoreResult<Option<u64>> {
        let mut tx = self.begin_write().await?;
        let Some(active) = webhook_active(&mut tx, tenant, webhook_id).await? else {
            return Ok(None);
        };
        let result = sqlx::query(
            "UPDATE deliveries SET status = ?1, next_attempt_at = ?2, lease_until = NULL, \
               updated_at = ?3 \
             WHERE webhook_id = ?4 AND status = 'failed' AND created_at >= ?5 AND created_at < ?6 \
               AND (SELECT type FROM events WHERE seq = deliveries.event_seq) != 'webhook.test'",
        )
        .bind(if active { "pending" } else { "held" })
        .bind(active.then_some(now))
        .bind(now)
        .bind(webhook_id.to_string())
        .bind(since)
        .bind(until)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(result.rows_affected()))
    }

    async fn purge(&self, before: EpochMillis) -> StoreResult<u64> {
        // In chunks, each its own short transaction: after 30 days of traffic one purge
        // transaction would hold the only writer (and so every publish and record) for as
        // long as it takes.
        const CHUNK: i64 = 500;
        let mut purged = 0u64;
        loop {
            let mut tx = self.begin_write().await?;
            let seqs: Vec<i64> = sqlx::query_scalar(
                "SELECT seq FROM events WHERE created_at < ? ORDER BY created_at LIMIT ?",
            )
            .bind(before)
            .bind(CHUNK)
            .fetch_all(&mut *tx)
            .await?;
            if seqs.is_empty() {
                tx.commit().await?;
                break;
            }
            for (table, column) in [
                (
                    "DELETE FROM attempts WHERE delivery_id IN \
                     (SELECT id FROM deliveries WHERE event_seq IN (",
                    "))",
                ),
                ("DELETE FROM deliveries WHERE event_seq IN (", ")"),
                ("DELETE FROM events WHERE seq IN (", ")"),
            ] {
                let mut q = sqlx::QueryBuilder::<Sqlite>::new(table);
                queue::push_list(&mut q, &seqs, |seq| *seq);
                q.push(column);
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            purged += seqs.len() as u64;
            // Let the publishers and the recorder have the writer between chunks.
            tokio::task::yield_now().await;
        }
        sqlx::query(
            "DELETE FROM webhooks WHERE deleted_at < ? \
               AND NOT EXISTS (SELECT 1 FROM deliveries WHERE webhook_id = webhooks.id)",
        )
        .bind(before)
        .execute(&self.writer)
        .await?;
        Ok(purged)
    }

    async fn delivery_stats(&self, now: EpochMillis) -> StoreResult<DeliveryStats> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM deliveries GROUP BY status")
                .fetch_all(&self.readers)
                .await?;
        let by_status = rows
            .into_iter()
            .filter_map(|(s, n)| DeliveryStatus::parse(&s).map(|s| (s, n)))
            .collect();
        let (due, oldest_due_at): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(next_attempt_at) FROM deliveries \
             WHERE status = 'pending' AND next_attempt_at <= ?1 \
               AND (lease_until IS NULL OR lease_until <= ?1)",
        )
        .bind(now)
        .fetch_one(&self.readers)
        .await?;
        Ok(DeliveryStats {
            by_status,
            due,
            oldest_due_at,
        })
    }
}
