//! Real databases in temporary folders, opened through the VFS; the checks are SQLite's
//! own (its recovery of a copied WAL, `integrity_check`) and a count of the writes the
//! default VFS was asked to make.

use std::cell::Cell;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};

thread_local! {
    /// Writes of buffered frames made on this thread (each test's connections are its own).
    static WRITES: Cell<u64> = const { Cell::new(0) };
}

pub(crate) fn count_write() {
    WRITES.with(|w| w.set(w.get() + 1));
}

fn writes() -> u64 {
    WRITES.with(Cell::get)
}

fn open(path: &Path) -> Connection {
    super::register().expect("register");
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        super::NAME,
    )
    .expect("open");
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .expect("wal");
    assert_eq!(mode, "wal");
    // No automatic checkpoint: the WAL holds every commit, and the copies below need it.
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0; \
         CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, k TEXT, v BLOB); \
         CREATE INDEX IF NOT EXISTS t_k ON t (k);",
    )
    .expect("schema");
    conn
}

/// Inserts `n` rows whose keys scatter over the index, in one transaction.
fn insert(conn: &Connection, from: i64, n: i64, size: usize) {
    let tx = conn.unchecked_transaction().expect("begin");
    for i in from..from + n {
        tx.execute(
            "INSERT INTO t (id, k, v) VALUES (?, ?, ?)",
            params![
                i,
                format!("{:08x}", (i * 2_654_435_761) % 4_294_967_291),
                vec![7u8; size]
            ],
        )
        .expect("insert");
    }
    tx.commit().expect("commit");
}

fn count(conn: &Connection) -> i64 {
    conn.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
        .expect("count")
}

/// What a crash would leave: the database and its WAL as they are on disk now, opened
/// afresh with the default VFS, which recovers the WAL (checking every frame's checksum
/// and taking only committed transactions).
fn recovered(dir: &Path) -> Connection {
    let copy = dir.join("copy");
    std::fs::create_dir_all(&copy).expect("mkdir");
    for name in ["db", "db-wal"] {
        std::fs::copy(dir.join(name), copy.join(name)).expect("copy");
    }
    let conn = Connection::open(copy.join("db")).expect("open copy");
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity");
    assert_eq!(ok, "ok");
    conn
}

#[test]
fn each_commit_is_one_write_and_survives_as_sqlite_recovers_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = open(&dir.path().join("db"));
    let before = writes();
    for round in 0..100 {
        insert(&conn, round * 50, 50, 100);
    }
    let made = writes() - before;
    // Each commit dirties several pages of the table and the scattered index; without the
    // VFS that is two writes per page. With it, one per commit.
    assert!((100..=102).contains(&made), "{made} writes for 100 commits");
    let copy = recovered(dir.path());
    assert_eq!(count(&copy), 5_000);
}

#[test]
fn every_commit_is_in_the_file_before_another_connection_can_see_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = open(&dir.path().join("db"));
    let reader = open(&dir.path().join("db"));
    for round in 0..50 {
        insert(&writer, round * 20, 20, 300);
        assert_eq!(count(&reader), (round + 1) * 20);
        let sum: i64 = reader
            .query_row("SELECT SUM(length(v)) FROM t WHERE k >= ''", [], |r| {
                r.get(0)
            })
            .expect("read through the index");
        assert_eq!(sum, (round + 1) * 20 * 300);
    }
}

#[test]
fn transactions_larger_than_the_cache_spill_roll_back_and_commit_correctly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = open(&dir.path().join("db"));
    // A cache of 20 pages: a transaction of 2,000 rows of 1 KiB spills frames to the WAL
    // before its commit, and rewrites pages it spilled (SQLite then recomputes checksums).
    conn.execute_batch("PRAGMA cache_size = 20").expect("cache");
    insert(&conn, 0, 100, 1_000);
    {
        let tx = conn.unchecked_transaction().expect("begin");
        for i in 1_000..3_000 {
            tx.execute(
                "INSERT INTO t (id, k, v) VALUES (?, ?, ?)",
                params![i, format!("{i:08}"), vec![1u8; 1_000]],
            )
            .expect("insert");
        }
        tx.rollback().expect("rollback");
    }
    assert_eq!(count(&conn), 100);
    insert(&conn, 10_000, 2_000, 1_000);
    conn.execute("UPDATE t SET v = zeroblob(900) WHERE id % 3 = 0", [])
        .expect("update");
    assert_eq!(count(&conn), 2_100);
    let copy = recovered(dir.path());
    assert_eq!(count(&copy), 2_100);
    let updated: i64 = copy
        .query_row("SELECT COUNT(*) FROM t WHERE length(v) = 900", [], |r| {
            r.get(0)
        })
        .expect("updated");
    assert_eq!(
        updated,
        (0..100)
            .chain(10_000..12_000)
            .filter(|i| i % 3 == 0)
            .count() as i64
    );
}

#[test]
fn checkpoints_and_a_restarted_wal_keep_every_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = open(&dir.path().join("db"));
    for round in 0..30 {
        insert(&conn, round * 10, 10, 500);
        if round % 7 == 6 {
            // RESTART: the next commit writes the WAL from its start again.
            conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                .expect("checkpoint");
        }
        if round == 20 {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .expect("checkpoint");
        }
    }
    let copy = recovered(dir.path());
    assert_eq!(count(&copy), 300);
    drop(copy);
    drop(conn);
    // Closed: SQLite checkpoints and removes the WAL; the database alone has everything.
    let reopened = open(&dir.path().join("db"));
    assert_eq!(count(&reopened), 300);
}

#[test]
fn files_other_than_the_wal_are_the_default_vfs_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A rollback journal (no WAL): nothing is wrapped, nothing buffered.
    super::register().expect("register");
    let conn = Connection::open_with_flags_and_vfs(
        dir.path().join("db"),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        super::NAME,
    )
    .expect("open");
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB)")
        .expect("schema");
    let before = writes();
    insert(&conn, 0, 100, 100);
    assert_eq!(writes(), before);
    assert_eq!(count(&conn), 100);
}
