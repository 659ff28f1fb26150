//! SQLite connections, each owned by one thread, and how async code reaches them.
//!
//! SQLite is a library, not a server: every call blocks the thread that makes it. Each
//! connection lives on its own thread and takes work as closures, so that a whole
//! transaction (a batch of publishes, a claim, a batch of attempts) is one hand-off
//! between threads, not one per statement. The first engine, which went to the connection
//! thread once per statement, spent more than half of its CPU switching threads
//! (BENCHMARKS.md).
//!
//! - [`Writer`]: the one connection that writes. It runs whatever jobs are queued in one
//!   `BEGIN IMMEDIATE` transaction and answers every job after the commit: a publish is
//!   acknowledged only once it is durable, and a claim is committed before anything is
//!   sent. A failing job fails alone: when one fails, the transaction is rolled back and
//!   its jobs run again, each in a savepoint of its own (so a job must be safe to run
//!   twice). Savepoints for every job made SQLite copy every page a job touched first into
//!   its statement journal, about 4 % of the service's CPU at the benchmark's peak.
//! - [`Readers`]: a few read-only connections sharing one queue (WAL gives each a
//!   consistent snapshot while the writer works).
//! - A checkpointer thread copies the WAL into the database twice a second, so the writer
//!   never does it while others wait.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::store::{StoreError, StoreResult};

/// Jobs committed together at most.
const GROUP_MAX: usize = 512;
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 128;
/// The schema, in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../migrations/sqlite/0002_deliveries_status_check.sql"),
    include_str!("../../../migrations/sqlite/0003_deliveries_by_rare_status.sql"),
];

/// A job for the writer: it runs (twice if another job of its transaction failed), then
/// answers its caller once.
trait WriteWork: Send {
    /// Runs the job's statements; whether they succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the result once the transaction's fate is known (`Some`: the commit failed).
    fn answer(self: Box<Self>, commit_failed: Option<&rusqlite::Error>);
}

type WriteJob = Box<dyn WriteWork>;

struct Job<T, F> {
    work: F,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> WriteWork for Job<T, F>
where
    T: Send,
    F: FnMut(&Connection) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        // A run that panics leaves no result (not an earlier run's).
        self.result = None;
        let result = (self.work)(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, commit_failed: Option<&rusqlite::Error>) {
        let result = match (commit_failed, self.result) {
            (Some(e), _) => Err(StoreError::from(copy_error(e))),
            (None, Some(result)) => result,
            // Never ran to the end (it panicked): the caller's reply is dropped instead.
            (None, None) => return,
        };
        let _ = self.reply.send(result);
    }
}

type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// Opens a connection with the settings every connection shares, each for a measured
/// reason (BENCHMARKS.md): NORMAL sync under WAL (a commit survives a process crash, not
/// a power cut), statement journals in memory instead of temp files, a 16 MiB page cache.
fn open(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    // SQLite's own VFS, except that each transaction's WAL frames go to the OS in one
    // write instead of two per page (the `wal-coalesce` crate; BENCHMARKS.md, step 29).
    wal_coalesce::register()
        .map_err(|code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None))?;
    let conn = Connection::open_with_flags_and_vfs(path, flags, wal_coalesce::NAME)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; \
         PRAGMA cache_size = -16384;",
    )?;
    Ok(conn)
}

/// Opens the database file: WAL on, migrations applied. Returns the writer's connection.
fn open_writer(path: &Path) -> StoreResult<Connection> {
    let conn = open(path, false)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "the database refused WAL mode (journal mode {mode})"
        )));
    }
    // The writer never checkpoints in its commit path (an automatic checkpoint copies the
    // WAL and fsyncs while every write waits: the p99 spikes of the benchmark); the
    // checkpointer does. The large limit is only a backstop should it fall behind.
    conn.execute_batch(
        "PRAGMA wal_autocheckpoint = 100000; PRAGMA journal_size_limit = 67108864;",
    )?;
    migrate(&conn)?;
    Ok(conn)
}

/// Applies the migrations the database has not seen, each in its own transaction.
///
/// A migration may rebuild a table (SQLite cannot change a constraint in place), and
/// dropping the old table would trip the foreign keys that point at it. So migrations run
/// with foreign keys off (which can only be switched outside a transaction), and every
/// foreign key of the database is checked before each one commits.
fn migrate(conn: &Connection) -> StoreResult<()> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {applied}, newer than this build knows ({})",
            MIGRATIONS.len()
        )));
    }
    conn.execute_batch("PRAGMA foreign_keys = OFF")?;
    let migrated = MIGRATIONS
        .iter()
        .enumerate()
        .skip(applied)
        .try_for_each(|(i, sql)| apply(conn, sql, i + 1));
    conn.execute_batch("PRAGMA foreign_keys = ON")?;
    migrated
}

/// One migration, as schema version `version`, in a transaction of its own: committed
/// whole, or rolled back.
fn apply(conn: &Connection, sql: &str, version: usize) -> StoreResult<()> {
    let applied = (|| {
        // `user_version` cannot be bound; it is our own number.
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {version};"
        ))?;
        let broken: i64 =
            conn.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })?;
        if broken > 0 {
            return Err(StoreError::Corrupt(format!(
                "migration {version} would leave {broken} rows with a dangling foreign key"
            )));
        }
        conn.execute_batch("COMMIT")?;
        Ok(())
    })();
    if applied.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    applied
}

/// The writing connection's thread, and the checkpointer's. See the module docs.
#[derive(Clone)]
pub(super) struct Writer {
    jobs: mpsc::Sender<WriteJob>,
    /// Stops the checkpointer when the last handle is dropped.
    _checkpointer: Arc<mpsc::Sender<()>>,
}

impl Writer {
    /// Opens the database (WAL on, migrations applied) and starts its writer and
    /// checkpointer threads.
    pub(super) fn spawn(path: &Path) -> StoreResult<Self> {
        let conn = open_writer(path)?;
        let caught_up = Arc::new(AtomicBool::new(false));
        let checkpointer = spawn_checkpointer(path, Arc::clone(&caught_up))?;
        let (jobs, rx) = mpsc::channel::<WriteJob>();
        spawn_thread("sqlite-writer".to_owned(), move || {
            run_writer(&conn, &rx, &caught_up)
        })?;
        Ok(Self {
            jobs,
            _checkpointer: Arc::new(checkpointer),
        })
    }

    /// Runs `job` in the next write transaction and returns its result once that
    /// transaction has committed (or the job's error, its changes rolled back).
    pub(super) async fn run<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: WriteJob = Box::new(Job {
            work,
            result: None,
            reply,
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Unavailable("the SQLite writer has stopped".to_owned()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the SQLite writer dropped a job".to_owned()))?
    }
}

fn run_writer(conn: &Connection, rx: &mpsc::Receiver<WriteJob>, caught_up: &AtomicBool) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(GROUP_MAX);
    // Ends when every `Writer` handle is gone (the store was dropped).
    while let Ok(first) = rx.recv() {
        if caught_up.swap(false, Ordering::Relaxed) {
            // The checkpointer has copied most of the WAL; copying the few frames
            // written since lets the next transaction start the WAL over from its
            // beginning (see `spawn_checkpointer`).
            let started = std::time::Instant::now();
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "WAL catch-up checkpoint failed");
            }
            tracing::trace!(
                us = started.elapsed().as_micros() as u64,
                "catch-up checkpoint"
            );
        }
        // Whatever queued up while the last transaction committed goes into this one.
        batch.push(first);
        while batch.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let began = std::time::Instant::now();
        let jobs = batch.len();
        // Usually every job succeeds: all of them in one transaction, no savepoints.
        let mut outcome = exec_cached(conn, "BEGIN IMMEDIATE")
            .map(|()| batch.iter_mut().all(|job| run_job(conn, job.as_mut())));
        if matches!(outcome, Ok(false)) {
            // One failed: start again, each job in a savepoint, so that it fails alone.
            let _ = conn.execute_batch("ROLLBACK");
            outcome = exec_cached(conn, "BEGIN IMMEDIATE").and_then(|()| {
                for job in &mut batch {
                    exec_cached(conn, "SAVEPOINT job")?;
                    if !run_job(conn, job.as_mut()) {
                        exec_cached(conn, "ROLLBACK TO job")?;
                    }
                    exec_cached(conn, "RELEASE job")?;
                }
                Ok(true)
            });
        }
        let ran = began.elapsed();
        let outcome = outcome.and_then(|_| exec_cached(conn, "COMMIT"));
        tracing::trace!(
            jobs,
            run_us = ran.as_micros() as u64,
            total_us = began.elapsed().as_micros() as u64,
            "write group"
        );
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "a write transaction failed; rolling it back");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for job in batch.drain(..) {
            job.answer(outcome.as_ref().err());
        }
    }
}

/// Runs one job; one that panics (a bug) counts as failed, and its caller gets an error.
fn run_job(conn: &Connection, job: &mut dyn WriteWork) -> bool {
    surviving_panic("a write job (its changes are rolled back)", || {
        job.run(conn)
    })
    .unwrap_or(false)
}

/// Starts a named thread for a connection.
fn spawn_thread(name: String, body: impl FnOnce() + Send + 'static) -> StoreResult<()> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(body)
        .map(drop)
        .map_err(|e| StoreError::Unavailable(format!("could not start {name}: {e}")))
}

/// Runs a job so that a panic in it (a bug) fails the job, not the connection's thread.
fn surviving_panic<R>(what: &str, job: impl FnOnce() -> R) -> Option<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
        .inspect_err(|_| tracing::error!("{what} panicked"))
        .ok()
}

/// Runs a statement without parameters, prepared once.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// `rusqlite::Error` is not `Clone`; a failed commit is reported to each of its jobs.
fn copy_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

/// Read-only connections, each on its own thread, taking jobs from one queue.
#[derive(Clone)]
pub(super) struct Readers {
    jobs: mpsc::Sender<ReadJob>,
}

impl Readers {
    pub(super) fn spawn(path: &Path, count: usize) -> StoreResult<Self> {
        let (jobs, rx) = mpsc::channel::<ReadJob>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..count {
            let conn = open(path, true)?;
            let rx = Arc::clone(&rx);
            spawn_thread(format!("sqlite-reader-{i}"), move || {
                loop {
                    // The lock is held only while waiting for the next job.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => break,
                    };
                    match job {
                        // A job that panics (a bug) loses its reply, not the reader.
                        Ok(job) => {
                            let _ = surviving_panic("a read job", || job(&conn));
                        }
                        Err(_) => break, // the store was dropped
                    }
                }
            })?;
        }
        Ok(Self { jobs })
    }

    /// Runs `job` on the next free read connection.
    pub(super) async fn run<T, F>(&self, job: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = reply.send(job(conn));
            }))
            .map_err(|_| StoreError::Unavailable("the SQLite readers have stopped".to_owned()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("an SQLite reader dropped a job".to_owned()))?
    }
}

/// Checkpoint passes in a row at most, and the new frames (pages written) below which a
/// pass is the last: see `spawn_checkpointer`.
const MAX_PASSES: usize = 5;
const FEW_NEW_FRAMES: i64 = 256;

/// Starts the checkpointer thread; it stops when the returned handle is dropped.
///
/// Every half second it copies the WAL into the database with PASSIVE checkpoints, which
/// never block the writer: one, and when it found frames, more right after it until one
/// finds few new frames (at most five in all); then it syncs the database file and the
/// WAL. That alone is not enough under steady load: the WAL can only start over from its
/// beginning when a write begins with every frame copied, and frames keep arriving while
/// the checkpoint runs, so the WAL would grow without end (seen: 366 MB in a minute, and
/// commits stalling for 100 ms as the file grew). So after each round it asks the writer
/// to copy the few frames written meanwhile, between two transactions.
fn spawn_checkpointer(path: &Path, caught_up: Arc<AtomicBool>) -> StoreResult<mpsc::Sender<()>> {
    let conn = open(path, false)?;
    let (stop, stopped) = mpsc::channel::<()>();
    spawn_thread("sqlite-checkpointer".to_owned(), move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(Duration::from_millis(500))
        {
            let started = std::time::Instant::now();
            // (busy, frames in the WAL, frames copied)
            let pass = || {
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                })
            };
            // More passes at once copy what was written during the last one, until a
            // pass finds only a few new frames: the writer's catch-up copies and syncs
            // what is left while every write waits (about 10 ms, median, after one pass
            // at step 25; 13 ms after three or four at 8,000 deliveries/s, when the WAL
            // grows by 13,000 frames a round, until the syncs below: BENCHMARKS.md, steps
            // 25 and 30).
            let mut result = pass();
            let mut passes = 1;
            while passes < MAX_PASSES {
                let Ok((before, _)) = result else { break };
                if before == 0 {
                    break;
                }
                result = pass();
                passes += 1;
                // The frames this pass found beyond the last one's (the WAL only grows
                // between the writer's catch-ups, which wait for this loop).
                if matches!(result, Ok((after, _)) if after - before < FEW_NEW_FRAMES) {
                    break;
                }
            }
            match result {
                Ok((frames, copied)) => {
                    tracing::trace!(
                        us = started.elapsed().as_micros() as u64,
                        passes,
                        frames,
                        copied,
                        "checkpoint"
                    );
                    if frames > 0 {
                        // The passes copied pages into the database without syncing it
                        // (SQLite syncs it only when a pass copies the whole WAL, which
                        // under load only the catch-up does), and frames came into the
                        // WAL after the last pass synced it. Synced here, off the
                        // writer's path, the catch-up's two syncs, while every write
                        // waits, have only its own few pages left to write (with them
                        // all it took 14–18 ms, median, at 8,000 deliveries/s; 4.6 ms
                        // after: BENCHMARKS.md, step 30).
                        if let Err(code) = wal_coalesce::sync_main(&conn) {
                            tracing::warn!(code, "syncing the database files failed");
                        }
                        caught_up.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
            }
        }
    })?;
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(conn: &Connection, name: &str) -> StoreResult<i64> {
        Ok(conn.query_row(
            "SELECT COUNT(*) FROM organizations WHERE name = ?",
            [name],
            |r| r.get(0),
        )?)
    }

    fn insert(conn: &Connection, name: &str) -> StoreResult<()> {
        conn.execute(
            "INSERT INTO organizations (id, name, created_at) VALUES (?, ?, 0)",
            [format!("org-{name}"), name.to_owned()],
        )?;
        Ok(())
    }

    #[test]
    fn the_status_check_migration_keeps_every_row_and_the_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        // A database at schema version 1, with a delivery and its attempt.
        {
            let conn = open(&path, false).expect("open");
            apply(&conn, MIGRATIONS[0], 1).expect("version 1");
            conn.execute_batch(
                "INSERT INTO organizations VALUES ('org-a', 'a', 0);
                 INSERT INTO webhooks (id, organization_id, environment, url, events, secret,
                     created_at, updated_at)
                     VALUES ('wh-a', 'org-a', 'live', 'https://a.example/', '[\"*\"]', x'00', 0, 0);
                 INSERT INTO events (seq, id, organization_id, environment, type, payload, created_at)
                     VALUES (7, 'evt-a', 'org-a', 'live', 't', x'7b7d', 0);
                 INSERT INTO deliveries (rowid, id, organization_id, environment, webhook_id,
                     event_seq, status, next_attempt_at, created_at, updated_at)
                     VALUES (42, 'dlv-a', 'org-a', 'live', 'wh-a', 7, 'pending', 5, 1, 2);
                 INSERT INTO attempts (delivery_id, attempted_at, response_time_ms)
                     VALUES ('dlv-a', 3, 4);",
            )
            .expect("rows");
        }
        let conn = open_writer(&path).expect("migrated");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        let row: (i64, String, i64) = conn
            .query_row(
                "SELECT rowid, status, next_attempt_at FROM deliveries \
                 INDEXED BY deliveries_due WHERE next_attempt_at = 5 AND status = 'pending'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("the delivery, through its due index");
        assert_eq!(row, (42, "pending".to_owned(), 5));
        // The same rules: an unknown status and a dangling reference are refused.
        assert!(
            conn.execute(
                "UPDATE deliveries SET status = 'lost' WHERE id = 'dlv-a'",
                []
            )
            .is_err()
        );
        assert!(
            conn.execute(
                "INSERT INTO attempts (delivery_id, attempted_at, response_time_ms) \
                 VALUES ('dlv-none', 0, 0)",
                [],
            )
            .is_err()
        );
        conn.execute(
            "UPDATE deliveries SET status = 'held' WHERE id = 'dlv-a'",
            [],
        )
        .expect("a known status");
        // And no temporary b-tree per row for the check any more.
        let mut explain = conn
            .prepare("EXPLAIN UPDATE deliveries SET status = ?1 WHERE id = ?2")
            .expect("explain");
        let opcodes: Vec<String> = explain
            .query_map(["held", "dlv-a"], |r| r.get(1))
            .expect("opcodes")
            .collect::<Result<_, _>>()
            .expect("opcodes");
        assert!(
            !opcodes.iter().any(|op| op == "OpenEphemeral"),
            "{opcodes:?}"
        );
    }

    #[test]
    fn a_migration_leaving_a_dangling_foreign_key_is_rolled_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = open(&dir.path().join("t.db"), false).expect("open");
        apply(&conn, MIGRATIONS[0], 1).expect("version 1");
        let bad = "INSERT INTO api_keys (id, organization_id, environment, key_hash, created_at) \
                   VALUES ('key-a', 'org-none', 'live', x'01', 0)";
        conn.execute_batch("PRAGMA foreign_keys = OFF")
            .expect("off");
        let error = apply(&conn, bad, 2).expect_err("dangling");
        assert!(error.to_string().contains("dangling"), "{error}");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 1);
    }

    #[tokio::test]
    async fn a_failing_or_panicking_job_rolls_back_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let writer = Writer::spawn(&path).expect("writer");
        let readers = Readers::spawn(&path, 1).expect("readers");
        // The first job holds the writer while the others queue up, so that they share
        // one transaction.
        let (_, kept, failed, panicked) = tokio::join!(
            writer.run(|_| {
                std::thread::sleep(Duration::from_millis(100));
                Ok(())
            }),
            // Run twice when it shares its transaction with the failures: its effects and
            // its answer are those of one run.
            writer.run(|c| {
                insert(c, "kept")?;
                count(c, "kept")
            }),
            writer.run(|c| {
                insert(c, "failed")?;
                Err::<(), _>(StoreError::NotFound)
            }),
            writer.run(|c| {
                insert(c, "panicked")?;
                if count(c, "panicked")? == 1 {
                    panic!("a bug in a job");
                }
                Ok(())
            }),
        );
        assert_eq!(kept.expect("kept"), 1);
        assert!(matches!(failed, Err(StoreError::NotFound)));
        assert!(panicked.is_err());
        for (name, expected) in [("kept", 1), ("failed", 0), ("panicked", 0)] {
            let n = readers.run(move |c| count(c, name)).await.expect("count");
            assert_eq!(n, expected, "{name}");
        }
        // The writer lives on.
        writer.run(|c| insert(c, "after")).await.expect("after");
    }
}
