//! Real databases in temporary folders, opened through the VFS; the checks are SQLite's
//! own (its recovery of a copied WAL, `integrity_check`) and a count of the writes the
//! default VFS was asked to make. The `rules` tests drive the buffering rules directly,
//! over a fake file that logs what reaches it and can fail a write, which SQLite cannot be
//! made to do on demand.

use std::cell::Cell;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};

thread_local! {
    /// Writes of buffered frames made on this thread (each test's connections are its own).
    static WRITES: Cell<u64> = const { Cell::new(0) };
    /// Syncs of a WAL file asked of this VFS on this thread.
    static SYNCS: Cell<u64> = const { Cell::new(0) };
}

pub(crate) fn count_write() {
    WRITES.set(WRITES.get() + 1);
}

pub(crate) fn count_sync() {
    SYNCS.set(SYNCS.get() + 1);
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
    let before = WRITES.get();
    for round in 0..100 {
        insert(&conn, round * 50, 50, 100);
    }
    let made = WRITES.get() - before;
    // Each commit dirties several pages of the table and the scattered index; without the
    // VFS that is two writes per page. With it, one per commit.
    assert!((100..=102).contains(&made), "{made} writes for 100 commits");
    let copy = recovered(dir.path());
    assert_eq!(count(&copy), 5_000);
}

#[test]
fn sync_main_syncs_the_wal_through_sqlites_own_file_and_leaves_the_database_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = open(&dir.path().join("db"));
    // A connection that has not read yet: its WAL is not open, and is skipped.
    let idle = Connection::open_with_flags_and_vfs(
        dir.path().join("db"),
        OpenFlags::SQLITE_OPEN_READ_WRITE,
        super::NAME,
    )
    .expect("open");
    super::sync_main(&idle).expect("sync without a WAL open");
    // With `synchronous = NORMAL` commits do not sync the WAL; `sync_main` does, once,
    // through the file SQLite opened with this VFS (the database file is the default
    // VFS's, not counted here).
    insert(&conn, 0, 200, 100);
    let before = SYNCS.get();
    super::sync_main(&conn).expect("sync");
    assert_eq!(SYNCS.get() - before, 1);
    insert(&conn, 200, 200, 100);
    let (_, _, copied): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("checkpoint");
    assert!(copied > 0);
    super::sync_main(&conn).expect("sync after a checkpoint");
    assert_eq!(count(&recovered(dir.path())), 400);
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
    let before = WRITES.get();
    insert(&conn, 0, 100, 100);
    assert_eq!(WRITES.get(), before);
    assert_eq!(count(&conn), 100);
}

/// The buffering rules alone, against a fake file underneath that logs what reaches it
/// (and can fail): what SQLite cannot be made to do on demand, such as a failing write.
mod rules {
    use std::cell::{Cell, RefCell};
    use std::ffi::{c_int, c_void};

    use libsqlite3_sys as ffi;

    use crate::{Pending, WAL_METHODS, WalFile, x_read, x_write};

    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        Write { offset: i64, len: usize },
        Read { offset: i64 },
    }

    thread_local! {
        static CALLS: RefCell<Vec<Call>> = const { RefCell::new(Vec::new()) };
        static FAIL: Cell<bool> = const { Cell::new(false) };
    }

    unsafe extern "C" fn fake_write(
        _: *mut ffi::sqlite3_file,
        _: *const c_void,
        amount: c_int,
        offset: ffi::sqlite3_int64,
    ) -> c_int {
        let len = usize::try_from(amount).expect("a length");
        CALLS.with_borrow_mut(|calls| calls.push(Call::Write { offset, len }));
        if FAIL.get() {
            ffi::SQLITE_IOERR_WRITE
        } else {
            ffi::SQLITE_OK
        }
    }

    unsafe extern "C" fn fake_read(
        _: *mut ffi::sqlite3_file,
        _: *mut c_void,
        _: c_int,
        offset: ffi::sqlite3_int64,
    ) -> c_int {
        CALLS.with_borrow_mut(|calls| calls.push(Call::Read { offset }));
        ffi::SQLITE_OK
    }

    static FAKE: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
        iVersion: 1,
        xClose: None,
        xRead: Some(fake_read),
        xWrite: Some(fake_write),
        xTruncate: None,
        xSync: None,
        xFileSize: None,
        xLock: None,
        xUnlock: None,
        xCheckReservedLock: None,
        xFileControl: None,
        xSectorSize: None,
        xDeviceCharacteristics: None,
        xShmMap: None,
        xShmLock: None,
        xShmBarrier: None,
        xShmUnmap: None,
        xFetch: None,
        xUnfetch: None,
    };

    const PAGE: usize = 4096;
    const FRAME: i64 = 24 + PAGE as i64;

    /// A wrapped WAL file over the fake one; `calls` empties the log.
    struct Wal {
        file: Box<WalFile>,
        _inner: Box<ffi::sqlite3_file>,
    }

    impl Wal {
        fn new() -> Self {
            CALLS.with_borrow_mut(Vec::clear);
            FAIL.set(false);
            let mut inner = Box::new(ffi::sqlite3_file { pMethods: &FAKE });
            let file = Box::new(WalFile {
                base: ffi::sqlite3_file {
                    pMethods: &WAL_METHODS,
                },
                inner: &raw mut *inner,
                pending: Pending::new(),
            });
            Self {
                file,
                _inner: inner,
            }
        }

        fn ptr(&mut self) -> *mut ffi::sqlite3_file {
            (&raw mut *self.file).cast()
        }

        fn write(&mut self, bytes: &[u8], offset: i64) -> c_int {
            let len = c_int::try_from(bytes.len()).expect("a length");
            // SAFETY: a `WalFile` over a live fake file, and `len` bytes at `bytes`.
            unsafe { x_write(self.ptr(), bytes.as_ptr().cast(), len, offset) }
        }

        /// Frame `n` (from 1) of a WAL of 4 KiB pages, as SQLite writes it: its header
        /// (a commit's holds the database size), then its page. The page's result.
        fn frame(&mut self, n: i64, commit: bool) -> c_int {
            let at = 32 + (n - 1) * FRAME;
            let mut header = [0u8; 24];
            if commit {
                header[4..8].copy_from_slice(&7u32.to_be_bytes());
            }
            assert_eq!(self.write(&header, at), ffi::SQLITE_OK);
            self.write(&[1u8; PAGE], at + 24)
        }

        fn read(&mut self, offset: i64) -> c_int {
            let mut buf = [0u8; 8];
            // SAFETY: as for `write`, with 8 writable bytes.
            unsafe { x_read(self.ptr(), buf.as_mut_ptr().cast(), 8, offset) }
        }

        fn calls(&self) -> Vec<Call> {
            CALLS.with_borrow_mut(std::mem::take)
        }
    }

    #[test]
    fn a_transaction_goes_out_in_one_write_when_its_commit_frame_is_complete() {
        let mut wal = Wal::new();
        assert_eq!(wal.frame(1, false), ffi::SQLITE_OK);
        assert_eq!(wal.frame(2, false), ffi::SQLITE_OK);
        assert_eq!(wal.calls(), [], "nothing written before the commit");
        assert_eq!(wal.frame(3, true), ffi::SQLITE_OK);
        assert_eq!(
            wal.calls(),
            [Call::Write {
                offset: 32,
                len: 3 * FRAME as usize
            }]
        );
        assert!(wal.file.pending.bytes.is_empty());
    }

    #[test]
    fn a_failed_write_is_the_commits_error_and_leaves_nothing_behind() {
        let mut wal = Wal::new();
        assert_eq!(wal.frame(1, false), ffi::SQLITE_OK);
        FAIL.set(true);
        assert_eq!(wal.frame(2, true), ffi::SQLITE_IOERR_WRITE);
        FAIL.set(false);
        assert!(wal.file.pending.bytes.is_empty());
        // SQLite rolls back and writes the transaction again from the same frame.
        wal.calls();
        assert_eq!(wal.frame(1, false), ffi::SQLITE_OK);
        assert_eq!(wal.frame(2, true), ffi::SQLITE_OK);
        assert_eq!(
            wal.calls(),
            [Call::Write {
                offset: 32,
                len: 2 * FRAME as usize
            }]
        );
    }

    #[test]
    fn any_other_call_writes_what_is_buffered_first() {
        let mut wal = Wal::new();
        assert_eq!(wal.frame(1, false), ffi::SQLITE_OK);
        assert_eq!(wal.read(32 + 24), ffi::SQLITE_OK);
        assert_eq!(
            wal.calls(),
            [
                Call::Write {
                    offset: 32,
                    len: FRAME as usize
                },
                Call::Read { offset: 56 }
            ]
        );
        // A write elsewhere (a page rewritten in place) follows what is buffered.
        assert_eq!(wal.frame(2, false), ffi::SQLITE_OK);
        assert_eq!(wal.write(&[2u8; PAGE], 56), ffi::SQLITE_OK);
        assert_eq!(
            wal.calls(),
            [
                Call::Write {
                    offset: 32 + FRAME,
                    len: FRAME as usize
                },
                Call::Write {
                    offset: 56,
                    len: PAGE
                }
            ]
        );
    }

    #[test]
    fn a_commit_marked_header_alone_is_never_held() {
        // As SQLite rewrites a commit frame's checksum: the header alone, then nothing
        // more on this file before the commit is published.
        let mut wal = Wal::new();
        let mut header = [0u8; 24];
        header[4..8].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(wal.write(&header, 32 + 4 * FRAME), ffi::SQLITE_OK);
        assert_eq!(
            wal.calls(),
            [Call::Write {
                offset: 32 + 4 * FRAME,
                len: 24
            }]
        );
    }

    #[test]
    fn a_large_transaction_goes_in_pieces_the_default_vfs_takes() {
        let mut wal = Wal::new();
        for n in 1..40 {
            assert_eq!(wal.frame(n, false), ffi::SQLITE_OK);
        }
        assert_eq!(wal.frame(40, true), ffi::SQLITE_OK);
        let calls = wal.calls();
        let mut next = 32;
        for call in &calls {
            let Call::Write { offset, len } = *call else {
                panic!("{call:?}");
            };
            assert_eq!(offset, next, "contiguous");
            assert!(len <= 0x1ffff, "{len} bytes in one call");
            next += i64::try_from(len).expect("a length");
        }
        assert_eq!(next, 32 + 40 * FRAME);
        assert_eq!(calls.len(), 2);
    }
}
