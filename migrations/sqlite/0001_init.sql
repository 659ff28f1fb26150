-- Vignetim Webhooks, initial schema (SQLite).
-- Every instant is INTEGER epoch milliseconds: text timestamps misorder in SQLite.

CREATE TABLE organizations (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    environment     TEXT NOT NULL CHECK (environment IN ('live', 'sandbox')),
    name            TEXT,
    -- SHA-256 of the key; the key itself is never stored.
    key_hash        BLOB NOT NULL UNIQUE,
    created_at      INTEGER NOT NULL
);

CREATE TABLE webhooks (
    id                         TEXT PRIMARY KEY,
    organization_id            TEXT NOT NULL REFERENCES organizations (id),
    environment                TEXT NOT NULL CHECK (environment IN ('live', 'sandbox')),
    url                        TEXT NOT NULL,
    -- JSON array: ["*"] or event type names.
    events                     TEXT NOT NULL,
    description                TEXT,
    active                     INTEGER NOT NULL DEFAULT 1,
    disabled_reason            TEXT,
    consecutive_failures       INTEGER NOT NULL DEFAULT 0,
    -- First failure since the last success: the disable-after clock lives here, not in memory.
    failing_since              INTEGER,
    last_success_at            INTEGER,
    -- Signing secrets, sealed with XChaCha20-Poly1305 (never in clear).
    secret                     BLOB NOT NULL,
    previous_secret            BLOB,
    previous_secret_expires_at INTEGER,
    created_at                 INTEGER NOT NULL,
    updated_at                 INTEGER NOT NULL,
    -- Deleted webhooks stay for the delivery log's retention, invisible to the API.
    deleted_at                 INTEGER
);
CREATE INDEX webhooks_by_tenant ON webhooks (organization_id, environment, created_at)
    WHERE deleted_at IS NULL;

CREATE TABLE events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The public id, sent as webhook-id; unique per organization and environment
    -- (idempotent publish; sandbox and live are separate worlds).
    id              TEXT NOT NULL,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    environment     TEXT NOT NULL,
    type            TEXT NOT NULL,
    -- The exact bytes delivered and signed.
    payload         BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    UNIQUE (organization_id, environment, id)
);
-- The retention purge walks events by age.
CREATE INDEX events_by_age ON events (created_at);

CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL,
    environment     TEXT NOT NULL,
    webhook_id      TEXT NOT NULL REFERENCES webhooks (id),
    event_seq       INTEGER NOT NULL REFERENCES events (seq),
    status          TEXT NOT NULL
        CHECK (status IN ('pending', 'succeeded', 'failed', 'held', 'cancelled')),
    attempt_count   INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    lease_until     INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX deliveries_by_webhook ON deliveries (webhook_id, created_at);
-- An event's deliveries (duplicate publishes count them; the purge and the foreign key
-- from deliveries to events would otherwise scan the table).
CREATE INDEX deliveries_by_event ON deliveries (event_seq);
-- Claims read it from the oldest end. It holds the webhook too, so that rows of webhooks
-- at their cap are passed over without reading the table. A leased delivery's
-- next_attempt_at is its lease's end: it is due again only if its attempt never reports.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at, webhook_id) WHERE status = 'pending';

CREATE TABLE attempts (
    -- No AUTOINCREMENT: it would write sqlite_sequence on every insert; ids are internal
    -- (they order a delivery's attempts made in the same millisecond).
    id               INTEGER PRIMARY KEY,
    delivery_id      TEXT NOT NULL REFERENCES deliveries (id),
    attempted_at     INTEGER NOT NULL,
    response_time_ms INTEGER NOT NULL,
    status_code      INTEGER,
    failure          TEXT,
    response_body    BLOB
);
CREATE INDEX attempts_by_delivery ON attempts (delivery_id, attempted_at);
