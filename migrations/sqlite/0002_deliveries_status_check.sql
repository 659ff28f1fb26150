-- The deliveries' status CHECK as equalities joined by OR instead of an IN list. SQLite
-- evaluates an IN list of more than two values by filling a temporary b-tree, and a CHECK
-- is evaluated on every INSERT and every UPDATE of the row: twice per delivery, a tenth of
-- the writer's CPU at the benchmark's peak (BENCHMARKS.md, step 23). The rule is the same.
-- SQLite cannot change a CHECK in place, so the table is rebuilt with the same columns,
-- rowids and indexes (the migrator runs this with foreign keys off and checks them all
-- before it commits).
CREATE TABLE deliveries_new (
    id              TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL,
    environment     TEXT NOT NULL,
    webhook_id      TEXT NOT NULL REFERENCES webhooks (id),
    event_seq       INTEGER NOT NULL REFERENCES events (seq),
    status          TEXT NOT NULL
        CHECK (status = 'pending' OR status = 'succeeded' OR status = 'failed'
            OR status = 'held' OR status = 'cancelled'),
    attempt_count   INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    lease_until     INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
INSERT INTO deliveries_new (rowid, id, organization_id, environment, webhook_id, event_seq,
        status, attempt_count, next_attempt_at, lease_until, created_at, updated_at)
    SELECT rowid, id, organization_id, environment, webhook_id, event_seq,
        status, attempt_count, next_attempt_at, lease_until, created_at, updated_at
    FROM deliveries;
DROP TABLE deliveries;
ALTER TABLE deliveries_new RENAME TO deliveries;
CREATE INDEX deliveries_by_webhook ON deliveries (webhook_id, created_at);
-- An event's deliveries (duplicate publishes count them; the purge and the foreign key
-- from deliveries to events would otherwise scan the table).
CREATE INDEX deliveries_by_event ON deliveries (event_seq);
-- Claims read it from the oldest end. It holds the webhook too, so that rows of webhooks
-- at their cap are passed over without reading the table. A leased delivery's
-- next_attempt_at is its lease's end: it is due again only if its attempt never reports.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at, webhook_id) WHERE status = 'pending';
