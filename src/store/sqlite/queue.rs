//! The hot path of the SQLite store: publishing, claiming and recording.
//!
//! Each runs as one job on the writer's thread (`conn`), so a claim of 256 deliveries or a
//! batch of 512 attempts is one hand-off between threads however many statements it
//! takes; the statements are prepared once and cached, and the writer commits many jobs
//! together.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{hold_pending, require_organization};
use crate::domain::event_type::Subscription;
use crate::domain::ids::{DeliveryId, WebhookId};
use crate::domain::retry::should_disable;
use crate::domain::time::EpochMillis;
use crate::store::{
    AttemptRecord, AttemptReport, ClaimRoom, ClaimedDelivery, DeliveryPolicy, DeliveryStatus,
    Handover, NewEvent, Published, RowKey, SealedSecrets, StoreError, StoreResult, Tenant, Unsent,
};

/// When a delivery could not be attempted through a fault of ours, it is tried again
/// after this long.
const INTERNAL_ERROR_RETRY_MS: i64 = 60_000;

/// Publishes one event: the event, then one delivery per subscribed webhook (held for an
/// inactive one; leased and returned for the engine when the handover takes it). An id
/// the tenant already published returns the first result and queues nothing.
pub(super) fn publish(
    conn: &Connection,
    tenant: Tenant,
    event: &NewEvent,
    handover: Option<&dyn Handover>,
) -> StoreResult<Published> {
    let org = tenant.organization_id.to_string();
    let env = tenant.environment.as_str();
    require_organization(conn, &org)?;
    let seq: Option<i64> = conn
        .prepare_cached(
            "INSERT INTO events (id, organization_id, environment, type, payload, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (organization_id, environment, id) DO NOTHING RETURNING seq",
        )?
        .query_row(
            params![
                event.id,
                org,
                env,
                event.event_type,
                event.payload.as_ref(),
                event.created_at
            ],
            |r| r.get(0),
        )
        .optional()?;
    let Some(seq) = seq else {
        let deliveries: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM deliveries d JOIN events e ON e.seq = d.event_seq \
                 WHERE e.organization_id = ? AND e.environment = ? AND e.id = ?",
            )?
            .query_row(params![org, env, event.id], |r| r.get(0))?;
        return Ok(Published {
            id: event.id.clone(),
            deliveries: u64::try_from(deliveries).unwrap_or(0),
            duplicate: true,
            handed: Vec::new(),
        });
    };

    // Read by position (a lookup by name compares the names each time: half a percent of
    // the service at the benchmark's peak): id 0, events 1, active 2, url 3, secrets 4–6.
    let mut webhooks = conn.prepare_cached(
        "SELECT id, events, active, url, secret, previous_secret, previous_secret_expires_at \
         FROM webhooks WHERE organization_id = ? AND environment = ? AND deleted_at IS NULL",
    )?;
    let mut rows = webhooks.query(params![org, env])?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO deliveries (id, organization_id, environment, webhook_id, event_seq, \
         status, attempt_count, next_attempt_at, lease_until, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
    )?;
    // The engine's handover, and the lease the deliveries it takes are written with.
    let handover = handover.map(|h| (h, h.lease_until()));
    let mut handed = Vec::new();
    let mut deliveries = 0u64;
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let events: String = row.get(1)?;
        let active: bool = row.get(2)?;
        let corrupt = || StoreError::Corrupt(format!("webhook {id}"));
        let names: Vec<String> = serde_json::from_str(&events).map_err(|_| corrupt())?;
        if !Subscription::from_stored(names).matches(&event.event_type) {
            continue;
        }
        let delivery_id = DeliveryId::new();
        // Taken by the engine: written under its lease, due again only when that ends
        // (as a claim leaves it), and sent without a claim.
        let taken = match handover {
            Some((handover, lease_until)) if active => {
                let webhook_id: WebhookId = id.parse().map_err(|_| corrupt())?;
                handover
                    .take(webhook_id)
                    .then_some((webhook_id, lease_until))
            }
            _ => None,
        };
        let lease = taken.map(|(_, lease)| lease);
        insert.execute(params![
            delivery_id.to_string(),
            org,
            env,
            id,
            seq,
            if active { "pending" } else { "held" },
            // Due now, never (held), or when the engine's lease ends.
            lease.or(active.then_some(event.created_at)),
            lease,
            event.created_at,
            event.created_at
        ])?;
        deliveries += 1;
        if let Some((webhook_id, lease_until)) = taken {
            handed.push(ClaimedDelivery {
                delivery_id,
                row: RowKey(conn.last_insert_rowid()),
                tenant,
                webhook_id,
                url: row.get(3)?,
                secrets: sealed_from_row(row, 4)?,
                event_id: event.id.clone(),
                event_created_at: event.created_at,
                payload: event.payload.clone(),
                attempts_made: 0,
                lease_until,
            });
        }
    }
    Ok(Published {
        id: event.id.clone(),
        deliveries,
        duplicate: false,
        handed,
    })
}

const INSERT_ATTEMPT: &str = "INSERT INTO attempts (delivery_id, attempted_at, \
     response_time_ms, status_code, failure, response_body) VALUES (?, ?, ?, ?, ?, ?)";

/// Inserts one attempt row.
pub(super) fn insert_attempt(
    conn: &Connection,
    delivery_id: DeliveryId,
    a: &AttemptRecord,
) -> StoreResult<()> {
    let mut insert = conn.prepare_cached(INSERT_ATTEMPT)?;
    insert_attempt_with(&mut insert, &delivery_id.to_string(), a)
}

/// Inserts one attempt row with a statement prepared once for a batch (looking it up in
/// the statement cache and formatting the id again for each row showed in the profile).
fn insert_attempt_with(
    insert: &mut rusqlite::Statement<'_>,
    delivery_id: &str,
    a: &AttemptRecord,
) -> StoreResult<()> {
    insert.execute(params![
        delivery_id,
        a.attempted_at,
        a.response_time_ms,
        a.status_code.map(i64::from),
        a.failure,
        a.response_body
    ])?;
    Ok(())
}

/// The sealed secrets of a row that has `secret`, `previous_secret` and
/// `previous_secret_expires_at` in this order, the first at `column`.
pub(super) fn sealed_from_row(row: &Row, column: usize) -> rusqlite::Result<SealedSecrets> {
    let previous: Option<Vec<u8>> = row.get(column + 1)?;
    let expires: Option<i64> = row.get(column + 2)?;
    Ok(SealedSecrets {
        current: row.get(column)?,
        previous: previous.zip(expires),
    })
}

/// Claims due deliveries of active webhooks under a lease, giving no webhook more than
/// its room (a hanging endpoint's backlog never takes the places of healthy endpoints).
pub(super) fn claim(
    conn: &Connection,
    now: EpochMillis,
    limit: u32,
    room: &ClaimRoom,
    lease_until: EpochMillis,
) -> StoreResult<Vec<ClaimedDelivery>> {
    let cap = i64::from(room.per_webhook);
    let mut room: HashMap<String, i64> = room
        .left
        .keys()
        .map(|w| (w.to_string(), i64::from(room.left(w))))
        .collect();
    let full: Vec<&String> = room
        .iter()
        .filter(|(_, left)| **left <= 0)
        .map(|(w, _)| w)
        .collect();
    let full = serde_json::to_string(&full).unwrap_or_else(|_| "[]".to_owned());
    // First the candidates, oldest first, from the due index alone (it holds the webhook):
    // rows of webhooks already at their cap are passed over without reading the table
    // (the JSON array keeps the statement the same, so it stays prepared). One pass: a
    // webhook that fills up during it may leave places unused, which the next claim fills
    // (it excludes that webhook from the start), so no backlog can starve another
    // webhook; a second pass here, when every webhook with due work is full, would read
    // the whole backlog for nothing (seen: most of the writer's time under a backlog).
    // The LIMIT is a literal: SQLite prepares a statement again whenever a bound LIMIT
    // changes (seen as 10 % of the writer's time).
    // Only active webhooks' rows are candidates: a pending row of an inactive one (its
    // lease ran out) must not take the places of others claim after claim.
    let mut candidates = conn.prepare_cached(
        "SELECT d.rowid, d.webhook_id FROM deliveries d \
         JOIN webhooks w ON w.id = d.webhook_id \
         WHERE d.status = 'pending' AND d.next_attempt_at <= ?1 \
           AND d.webhook_id NOT IN (SELECT value FROM json_each(?2)) \
           AND w.active = 1 AND w.deleted_at IS NULL \
         ORDER BY d.next_attempt_at LIMIT 256",
    )?;
    let mut picked: Vec<(i64, String)> = Vec::new();
    let mut rows = candidates.query(params![now, full])?;
    // Rows passed over in a row since the last pick: past a few dozen, the webhooks due
    // here have all filled up during this pass, and reading on would mostly read theirs
    // (the next claim skips them in the index).
    let mut passed_over = 0;
    while picked.len() < limit as usize && passed_over < 32 {
        let Some(row) = rows.next()? else { break };
        let webhook: String = row.get(1)?;
        let left = room.entry(webhook.clone()).or_insert(cap);
        if *left > 0 {
            *left -= 1;
            picked.push((row.get(0)?, webhook));
            passed_over = 0;
        } else {
            passed_over += 1;
        }
    }
    drop(rows);
    // Then what the attempts need, for the picked rows (of active webhooks: the same
    // transaction's candidates): each row's own columns, and each event and each webhook
    // once per claim, shared by their deliveries (a claim takes many deliveries of a few
    // events and fewer webhooks; joined to every row, they were read again for each:
    // BENCHMARKS.md, step 33). Columns are read by position: a lookup by name compares
    // the names each time.
    let mut detail = conn.prepare_cached(
        "SELECT id, organization_id, environment, attempt_count, event_seq \
         FROM deliveries WHERE rowid = ?1",
    )?;
    let mut event_detail =
        conn.prepare_cached("SELECT id, created_at, payload FROM events WHERE seq = ?1")?;
    let mut webhook_detail = conn.prepare_cached(
        "SELECT url, secret, previous_secret, previous_secret_expires_at \
         FROM webhooks WHERE id = ?1",
    )?;
    let mut events: HashMap<i64, Option<ClaimedEvent>> = HashMap::new();
    let mut endpoints: HashMap<&str, Option<Endpoint>> = HashMap::new();
    let mut claimed: Vec<ClaimedDelivery> = Vec::with_capacity(picked.len());
    let mut leased: Vec<i64> = Vec::with_capacity(picked.len());
    for (rowid, webhook) in &picked {
        let Some(row) = detail
            .query_row([rowid], |r| {
                Ok(DeliveryRow {
                    id: r.get(0)?,
                    organization_id: r.get(1)?,
                    environment: r.get(2)?,
                    attempt_count: r.get(3)?,
                    event_seq: r.get(4)?,
                })
            })
            .optional()?
        else {
            continue;
        };
        let event = match events.entry(row.event_seq) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(
                event_detail
                    .query_row([row.event_seq], |r| {
                        Ok(ClaimedEvent {
                            id: r.get(0)?,
                            created_at: r.get(1)?,
                            payload: bytes::Bytes::from(r.get::<_, Vec<u8>>(2)?),
                        })
                    })
                    .optional()?,
            ),
        };
        let endpoint = match endpoints.entry(webhook.as_str()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(
                webhook_detail
                    .query_row([webhook], |r| {
                        Ok(Endpoint {
                            url: r.get(0)?,
                            secrets: sealed_from_row(r, 1)?,
                        })
                    })
                    .optional()?,
            ),
        };
        // Both exist (foreign keys); without them there is nothing to send.
        let (Some(event), Some(endpoint)) = (event.as_ref(), endpoint.as_ref()) else {
            continue;
        };
        claimed.push(claimed_delivery(
            row,
            *rowid,
            webhook,
            event,
            endpoint,
            lease_until,
        )?);
        leased.push(*rowid);
    }
    // A leased delivery is due again when its lease ends: if its attempt never reports,
    // the next claim takes it then, and until then it is not in the way of the claims
    // (they read the due index from its oldest end).
    // By rowid, as the candidates were read: no search of the id index per row.
    let mut lease = conn.prepare_cached(
        "UPDATE deliveries SET lease_until = ?1, next_attempt_at = ?1 WHERE rowid = ?2",
    )?;
    for rowid in leased {
        lease.execute(params![lease_until, rowid])?;
    }
    Ok(claimed)
}

/// A claimed delivery's own columns.
struct DeliveryRow {
    id: String,
    organization_id: String,
    environment: String,
    attempt_count: i64,
    event_seq: i64,
}

/// What a claim reads once per event.
struct ClaimedEvent {
    id: String,
    created_at: EpochMillis,
    payload: bytes::Bytes,
}

/// What a claim reads once per webhook.
struct Endpoint {
    url: String,
    secrets: SealedSecrets,
}

fn claimed_delivery(
    row: DeliveryRow,
    rowid: i64,
    webhook: &str,
    event: &ClaimedEvent,
    endpoint: &Endpoint,
    lease_until: EpochMillis,
) -> StoreResult<ClaimedDelivery> {
    let id = row.id;
    let corrupt = |what: &str| StoreError::Corrupt(format!("delivery {id}: {what}"));
    Ok(ClaimedDelivery {
        delivery_id: id.parse().map_err(|_| corrupt("id"))?,
        row: RowKey(rowid),
        tenant: Tenant {
            organization_id: row
                .organization_id
                .parse()
                .map_err(|_| corrupt("organization"))?,
            environment: row
                .environment
                .parse()
                .map_err(|_| corrupt("environment"))?,
        },
        webhook_id: webhook.parse().map_err(|_| corrupt("webhook"))?,
        url: endpoint.url.clone(),
        secrets: endpoint.secrets.clone(),
        event_id: event.id.clone(),
        event_created_at: event.created_at,
        payload: event.payload.clone(),
        attempts_made: u32::try_from(row.attempt_count).unwrap_or(0),
        lease_until,
    })
}

/// The `UPDATE` that makes a delivery succeeded (its attempt counted, its lease and due
/// time cleared, `?1` the time), for the rows `condition` picks: one `SET` for both ways
/// `record` finds a succeeded delivery.
macro_rules! succeed_where {
    ($condition:literal) => {
        concat!(
            "UPDATE deliveries SET status = 'succeeded', attempt_count = attempt_count + 1, \
               lease_until = NULL, next_attempt_at = NULL, updated_at = ?1 WHERE ",
            $condition
        )
    };
}

/// Records a batch of attempts and decides what comes next for each delivery and its
/// webhook: successes (the common case) in a few cached statements, failures one by one
/// on the careful path.
pub(super) fn record(
    conn: &Connection,
    reports: &[AttemptReport],
    policy: &DeliveryPolicy,
    now: EpochMillis,
) -> StoreResult<Vec<DeliveryStatus>> {
    let ids: Vec<String> = reports.iter().map(|r| r.delivery_id.to_string()).collect();
    // What was decided for each report, and whether its delivery still exists.
    let mut decided: Vec<Option<DeliveryStatus>> = vec![None; reports.len()];
    let mut exists = vec![false; reports.len()];
    // Whether the report's lease is still the delivery's: one whose lease expired and was
    // claimed again is stale; its attempt is logged, but it decides nothing.
    let mut current = vec![false; reports.len()];
    // Where a stale or vanished delivery stands (one can vanish while in flight, purged
    // past the retention: its report is dropped rather than failing the whole batch).
    let mut standing: Vec<Option<DeliveryStatus>> = vec![None; reports.len()];

    // Successes (the common case) in one statement each: the delivery is done if the
    // lease is still this attempt's. Found by its row key, without a search of the id
    // index, and the id checked on the row (a key that no longer holds the delivery
    // finds nothing, and the report takes the careful path below).
    let mut succeed = conn.prepare_cached(succeed_where!(
        "rowid = ?4 AND id = ?2 AND status = 'pending' AND lease_until = ?3"
    ))?;
    let mut lookup =
        conn.prepare_cached("SELECT status, lease_until FROM deliveries WHERE id = ?")?;
    for (i, r) in reports.iter().enumerate() {
        if r.succeeded
            && r.unsent.is_none()
            && succeed.execute(params![now, ids[i], r.lease_until, r.row.0])? == 1
        {
            exists[i] = true;
            current[i] = true;
            decided[i] = Some(DeliveryStatus::Succeeded);
            continue;
        }
        let found: Option<(String, Option<i64>)> = lookup
            .query_row([&ids[i]], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        if let Some((status, lease)) = found {
            exists[i] = true;
            current[i] = status == "pending" && lease == Some(r.lease_until);
            standing[i] = DeliveryStatus::parse(&status);
            // A current success whose row key missed (the rows were renumbered, as a
            // VACUUM may do): done all the same, found by its id.
            if current[i]
                && r.succeeded
                && r.unsent.is_none()
                && conn
                    .prepare_cached(succeed_where!("id = ?2"))?
                    .execute(params![now, ids[i]])?
                    == 1
            {
                decided[i] = Some(DeliveryStatus::Succeeded);
            }
        }
    }
    // Every attempt that was sent, stale ones included.
    let mut insert = conn.prepare_cached(INSERT_ATTEMPT)?;
    for (i, r) in reports.iter().enumerate() {
        if exists[i] && r.unsent.is_none() {
            insert_attempt_with(&mut insert, &ids[i], &r.attempt)?;
        }
    }
    // Not sent: due again (a minute later for our own faults), counting nothing against
    // the endpoint.
    for (i, r) in reports.iter().enumerate() {
        let Some(unsent) = r.unsent.filter(|_| current[i]) else {
            continue;
        };
        let due = match unsent {
            Unsent::InternalError => now + INTERNAL_ERROR_RETRY_MS,
            Unsent::WaitedTooLong => now,
        };
        conn.prepare_cached(
            "UPDATE deliveries SET lease_until = NULL, next_attempt_at = ?1, \
               updated_at = ?2 WHERE id = ?3",
        )?
        .execute(params![due, now, ids[i]])?;
        decided[i] = Some(DeliveryStatus::Pending);
    }
    // The last success per webhook in this batch stops its failure clock; failures before
    // it do not count towards `consecutive_failures` (a success came after them).
    let mut last_success: HashMap<WebhookId, usize> = HashMap::new();
    for (i, r) in reports.iter().enumerate() {
        if decided[i] == Some(DeliveryStatus::Succeeded) {
            last_success.insert(r.webhook_id, i);
        }
    }
    let mut clock = conn.prepare_cached(
        "UPDATE webhooks SET consecutive_failures = 0, failing_since = NULL, \
           last_success_at = ?1 WHERE id = ?2",
    )?;
    for webhook in last_success.keys() {
        clock.execute(params![now, webhook.to_string()])?;
    }
    // Failures, one by one on the careful path.
    for (i, r) in reports.iter().enumerate() {
        if current[i] && r.unsent.is_none() && !r.succeeded {
            let counts = last_success.get(&r.webhook_id).is_none_or(|&s| s < i);
            decided[i] = Some(record_failure(conn, r, counts, policy, now)?);
        }
    }
    Ok(decided
        .into_iter()
        .zip(standing)
        .map(|(decided, standing)| decided.or(standing).unwrap_or(DeliveryStatus::Cancelled))
        .collect())
}

/// One failed attempt: count it (unless a later success in the batch reset the count),
/// disable the webhook if it is gone or has failed for too long, and schedule the next
/// attempt, hold, or give up.
fn record_failure(
    conn: &Connection,
    report: &AttemptReport,
    counts: bool,
    policy: &DeliveryPolicy,
    now: EpochMillis,
) -> StoreResult<DeliveryStatus> {
    let delivery_id = report.delivery_id.to_string();
    let webhook_id = report.webhook_id.to_string();
    let attempts: i64 = conn
        .prepare_cached(
            "UPDATE deliveries SET attempt_count = attempt_count + 1, lease_until = NULL, \
               updated_at = ?1 WHERE id = ?2 RETURNING attempt_count",
        )?
        .query_row(params![now, delivery_id], |r| r.get(0))?;
    let (active, failing_since, deleted_at): (bool, Option<i64>, Option<i64>) = conn
        .prepare_cached("SELECT active, failing_since, deleted_at FROM webhooks WHERE id = ?")?
        .query_row([&webhook_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?
        .ok_or_else(|| StoreError::Corrupt(format!("webhook {webhook_id}")))?;
    let failing_since = failing_since.unwrap_or(report.attempt.attempted_at);
    if counts {
        conn.prepare_cached(
            "UPDATE webhooks SET consecutive_failures = consecutive_failures + 1, \
               failing_since = ?1 WHERE id = ?2",
        )?
        .execute(params![failing_since, webhook_id])?;
    }
    let disable_reason = if report.gone {
        Some("gone")
    } else if counts && should_disable(failing_since, now, policy.disable_after) {
        Some("failing")
    } else {
        None
    };
    let status = if deleted_at.is_some() {
        DeliveryStatus::Cancelled
    } else if let Some(reason) = disable_reason.filter(|_| active) {
        conn.prepare_cached(
            "UPDATE webhooks SET active = 0, disabled_reason = ?1, updated_at = ?2 WHERE id = ?3",
        )?
        .execute(params![reason, now, webhook_id])?;
        hold_pending(conn, report.webhook_id, now)?;
        DeliveryStatus::Held
    } else if !active {
        DeliveryStatus::Held
    } else {
        let made = u32::try_from(attempts).unwrap_or(u32::MAX);
        match policy
            .schedule
            .next(made, now, report.retry_after, report.jitter_draw)
        {
            Some(at) => {
                conn.prepare_cached("UPDATE deliveries SET next_attempt_at = ? WHERE id = ?")?
                    .execute(params![at, delivery_id])?;
                DeliveryStatus::Pending
            }
            None => DeliveryStatus::Failed,
        }
    };
    if status != DeliveryStatus::Pending {
        conn.prepare_cached(
            "UPDATE deliveries SET status = ?, next_attempt_at = NULL WHERE id = ?",
        )?
        .execute(params![status.as_str(), delivery_id])?;
    }
    Ok(status)
}
