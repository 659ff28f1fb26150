//! A SQLite VFS that is the platform's default VFS (`unix` on Linux) in every respect but
//! one: what a connection appends to its write-ahead log is handed to the operating system
//! once per transaction instead of twice per page.
//!
//! SQLite writes each WAL frame as two calls, its 24-byte header and then its page
//! (`walWriteOneFrame`), so a commit of 20 pages is 40 `pwrite` system calls. On a virtual
//! machine each costs a few microseconds: 6.5 µs per frame written that way against 1.2 µs
//! per frame written 20 at a time, measured on the project's machine, and the service's
//! writer spent about a quarter of its time there.
//!
//! The crate also has [`sync_main`], which syncs a connection's database file and WAL
//! through the files SQLite holds, for a checkpointer that wants the copies of its passes
//! on disk before it hands the rest to the writer.
//!
//! # What it does
//!
//! Only files SQLite opens as a WAL (`SQLITE_OPEN_WAL`) are wrapped; every other file is the
//! default VFS's own, untouched. A wrapped file keeps a buffer of frames appended one after
//! another:
//!
//! - a frame header that starts the buffer or follows it, and then its page, are buffered;
//! - the moment the page of a frame whose header marks a commit (a non-zero database size,
//!   bytes 4–8) has been added, the buffer is written, and that write's result is the
//!   result SQLite sees for the page: a failed write fails the commit;
//! - any other write (the WAL header, a frame rewritten in place, a header whose checksum is
//!   recomputed) and every other operation on the file (read, sync, truncate, size, lock,
//!   file control, close) first writes what is buffered.
//!
//! # Why the database stays correct
//!
//! SQLite writes a transaction's frames in one call of `walFrames`, the commit-marked frame
//! last, and only then publishes the commit by writing the wal-index header in shared
//! memory (through the *database* file, which this VFS does not wrap). So the buffer is
//! empty whenever a commit becomes visible to other connections: every committed frame is
//! in the file before any reader or checkpointer can look for it. Frames of a transaction
//! not yet committed (a cache spill) may wait in the buffer, where nobody else may read them:
//! readers and the checkpointer stop at the last committed frame, and the writer's own
//! reads of its WAL write the buffer first. After a rollback, the next transaction's frames
//! start below the buffer's end, which writes the stale ones first; SQLite overwrites them
//! next, as it would have without this VFS. A process crash loses only what SQLite itself
//! had not committed. The one exception SQLite makes to "commit frame last" is the
//! checksum rewrite after frames were overwritten within a transaction: it reads each frame
//! before rewriting its header (a read writes the buffer), and its last header, the
//! commit frame's, is commit-marked and so never waits in the buffer.

use std::ffi::{CStr, c_int, c_void};
use std::mem::size_of;
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

use libsqlite3_sys as ffi;

/// The VFS name to open connections with, once [`register`] has succeeded.
pub const NAME: &CStr = c"wal-coalesce";

/// A WAL frame's header: page number, database size (non-zero for a commit), salts,
/// checksums.
const FRAME_HEADER: usize = 24;
/// The most the default VFS writes in one call (`seekAndWriteFd` masks the length with
/// `0x1ffff`), rounded down to whole 4 KiB pages.
const MAX_WRITE: usize = 0x1ffff & !0xfff;
/// A transaction larger than this is written before its commit, in `MAX_WRITE` pieces.
const FLUSH_AT: usize = 1 << 20;

/// The default VFS this one wraps.
static BASE: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());
static REGISTERED: OnceLock<Result<(), c_int>> = OnceLock::new();

/// Registers the VFS with SQLite under [`NAME`] (not as the default). Idempotent; the
/// error is SQLite's result code.
pub fn register() -> Result<(), c_int> {
    *REGISTERED.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find` initialises SQLite if needed and returns the default
        // VFS, which lives as long as the process. The copy is leaked, so it outlives every
        // connection, as `sqlite3_vfs_register` requires.
        unsafe {
            let base = ffi::sqlite3_vfs_find(ptr::null());
            if base.is_null() {
                return Err(ffi::SQLITE_ERROR);
            }
            BASE.store(base, Ordering::Release);
            let mut vfs = *base;
            vfs.zName = NAME.as_ptr();
            vfs.pNext = ptr::null_mut();
            vfs.szOsFile = c_int::try_from(INNER_OFFSET)
                .ok()
                .and_then(|own| own.checked_add((*base).szOsFile))
                .ok_or(ffi::SQLITE_ERROR)?;
            vfs.xOpen = Some(x_open);
            let rc = ffi::sqlite3_vfs_register(Box::into_raw(Box::new(vfs)), 0);
            if rc == ffi::SQLITE_OK {
                Ok(())
            } else {
                Err(rc)
            }
        }
    })
}

/// Syncs the database file of `conn`'s main database and its WAL (when open) to disk,
/// through the files SQLite itself holds (`SQLITE_FCNTL_FILE_POINTER` and
/// `SQLITE_FCNTL_JOURNAL_POINTER`), as its own syncs do. A descriptor opened for the purpose
/// would not do: closing any descriptor of the database file drops every POSIX lock the
/// process holds on it, SQLite's included, and another process could then take the
/// database as unused. The error is SQLite's result code.
///
/// For a checkpointer: SQLite syncs the database file only when a checkpoint copies the
/// whole WAL, so what partial passes copied is written out by whichever sync comes next.
pub fn sync_main(conn: &rusqlite::Connection) -> Result<(), c_int> {
    for op in [
        ffi::SQLITE_FCNTL_FILE_POINTER,
        ffi::SQLITE_FCNTL_JOURNAL_POINTER,
    ] {
        let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
        // SAFETY: `conn` is a live connection used by this thread alone (`Connection` is
        // not `Sync`), and for these two opcodes SQLite writes one `sqlite3_file*` into the
        // pointer it is given: the pager's file, open while the connection is (the
        // database), or null or a file without methods when not open (the WAL before the
        // first read). The file's own `xSync` is what SQLite calls between its statements,
        // and it changes nothing SQLite relies on.
        let rc = unsafe {
            let rc = ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                op,
                (&raw mut file).cast(),
            );
            if rc != ffi::SQLITE_OK || file.is_null() || (*file).pMethods.is_null() {
                rc
            } else {
                match (*(*file).pMethods).xSync {
                    Some(sync) => sync(file, ffi::SQLITE_SYNC_NORMAL),
                    None => ffi::SQLITE_OK,
                }
            }
        };
        if rc != ffi::SQLITE_OK {
            return Err(rc);
        }
    }
    Ok(())
}

/// A wrapped WAL file. SQLite allocates `szOsFile` bytes for it: this struct, then (at
/// `INNER_OFFSET`) the default VFS's file.
#[repr(C)]
struct WalFile {
    /// First, so that SQLite's `sqlite3_file*` is this struct's address.
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    pending: Pending,
}

/// Frames appended one after another and not yet written.
struct Pending {
    bytes: Vec<u8>,
    /// The file offset of `bytes[0]`.
    start: i64,
    /// The buffer ends with a frame header, whose page comes next.
    header_last: bool,
    /// That header marks a commit.
    commit: bool,
}

impl Pending {
    /// Nothing buffered.
    const fn new() -> Self {
        Pending {
            bytes: Vec::new(),
            start: 0,
            header_last: false,
            commit: false,
        }
    }
}

const INNER_OFFSET: usize = size_of::<WalFile>().next_multiple_of(16);

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let base = BASE.load(Ordering::Acquire);
    // SAFETY: `register` stored the default VFS before registering this one, and SQLite
    // gives `file` `szOsFile` bytes (8-byte aligned, as any SQLite allocation): enough for
    // the default VFS's file at offset 0, or for a `WalFile` followed by it.
    unsafe {
        let Some(open) = (*base).xOpen else {
            return ffi::SQLITE_ERROR;
        };
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            return open(base, name, file, flags, out_flags);
        }
        let wal = file.cast::<WalFile>();
        let inner = file
            .cast::<u8>()
            .add(INNER_OFFSET)
            .cast::<ffi::sqlite3_file>();
        ptr::write(
            wal,
            WalFile {
                // SQLite calls no method of a file whose open failed (`pMethods` null).
                base: ffi::sqlite3_file {
                    pMethods: ptr::null(),
                },
                inner,
                pending: Pending::new(),
            },
        );
        let rc = open(base, name, inner, flags, out_flags);
        if rc == ffi::SQLITE_OK && !(*inner).pMethods.is_null() {
            (*wal).base.pMethods = &WAL_METHODS;
            ffi::SQLITE_OK
        } else {
            ptr::drop_in_place(wal);
            (*file).pMethods = ptr::null();
            if rc == ffi::SQLITE_OK {
                ffi::SQLITE_CANTOPEN
            } else {
                rc
            }
        }
    }
}

/// The wrapped file's parts.
///
/// # Safety
/// `file` is a file opened by `x_open` with `WAL_METHODS`, not closed, used by one thread
/// at a time (as SQLite uses a connection's files).
unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> (&'a mut Pending, *mut ffi::sqlite3_file) {
    // SAFETY: see the function's contract.
    unsafe {
        let wal = file.cast::<WalFile>();
        (&mut (*wal).pending, (*wal).inner)
    }
}

/// The default VFS's methods of the inner file.
///
/// # Safety
/// `inner` is an open file of the default VFS.
unsafe fn methods<'a>(inner: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    // SAFETY: see the function's contract: an open file's `pMethods` is set.
    unsafe { &*(*inner).pMethods }
}

/// Writes what is buffered; SQLite's result code.
///
/// # Safety
/// As for [`wal`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as for `wal`.
    unsafe {
        let (pending, inner) = wal(file);
        pending.header_last = false;
        pending.commit = false;
        let Some(write) = methods(inner).xWrite else {
            pending.bytes.clear();
            return ffi::SQLITE_IOERR_WRITE;
        };
        let mut rc = ffi::SQLITE_OK;
        let mut offset = pending.start;
        for chunk in pending.bytes.chunks(MAX_WRITE) {
            #[cfg(test)]
            tests::count_write();
            // Both fit: a chunk is at most MAX_WRITE long.
            let amount = c_int::try_from(chunk.len()).unwrap_or(c_int::MAX);
            rc = write(inner, chunk.as_ptr().cast(), amount, offset);
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += i64::from(amount);
        }
        pending.bytes.clear();
        rc
    }
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: SQLite passes a file opened by `x_open` and `amount` readable bytes at `data`.
    unsafe {
        let (pending, inner) = wal(file);
        if let Ok(len) = usize::try_from(amount)
            && len > 0
        {
            let bytes = std::slice::from_raw_parts(data.cast::<u8>(), len);
            let end = i64::try_from(pending.bytes.len())
                .ok()
                .and_then(|n| pending.start.checked_add(n));
            let follows = !pending.bytes.is_empty() && end == Some(offset);
            if len == FRAME_HEADER && !pending.header_last {
                let commit = bytes[4..8] != [0; 4];
                // A commit-marked header is buffered only after frames of its own
                // transaction; alone, it may be a rewritten checksum (see the module docs).
                if follows || (pending.bytes.is_empty() && !commit) {
                    if pending.bytes.is_empty() {
                        pending.start = offset;
                    }
                    pending.bytes.extend_from_slice(bytes);
                    pending.header_last = true;
                    pending.commit = commit;
                    return ffi::SQLITE_OK;
                }
            } else if follows && pending.header_last {
                pending.bytes.extend_from_slice(bytes);
                pending.header_last = false;
                if pending.commit || pending.bytes.len() >= FLUSH_AT {
                    return flush(file);
                }
                return ffi::SQLITE_OK;
            }
        }
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        match methods(inner).xWrite {
            Some(write) => write(inner, data, amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        }
    }
}

/// Defines a method that writes what is buffered, then calls the default VFS's.
macro_rules! flush_then {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: SQLite passes a file opened by `x_open`, and arguments as the
            // default VFS's method expects them.
            unsafe {
                let rc = flush(file);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                let (_, inner) = wal(file);
                match methods(inner).$method {
                    Some(method) => method(inner $(, $arg)*),
                    None => ffi::SQLITE_IOERR,
                }
            }
        }
    };
}

flush_then!(x_read, xRead, (data: *mut c_void, amount: c_int, offset: ffi::sqlite3_int64));
flush_then!(x_truncate, xTruncate, (size: ffi::sqlite3_int64));
flush_then!(sync_inner, xSync, (flags: c_int));

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    #[cfg(test)]
    tests::count_sync();
    // SAFETY: as for every `flush_then!` method.
    unsafe { sync_inner(file, flags) }
}
flush_then!(x_file_size, xFileSize, (size: *mut ffi::sqlite3_int64));
flush_then!(x_lock, xLock, (level: c_int));
flush_then!(x_unlock, xUnlock, (level: c_int));
flush_then!(x_check_reserved_lock, xCheckReservedLock, (out: *mut c_int));
flush_then!(x_file_control, xFileControl, (op: c_int, arg: *mut c_void));
flush_then!(x_shm_map, xShmMap, (page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void));
flush_then!(x_shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int));
flush_then!(x_shm_unmap, xShmUnmap, (delete: c_int));
flush_then!(x_fetch, xFetch, (offset: ffi::sqlite3_int64, amount: c_int, out: *mut *mut c_void));
flush_then!(x_unfetch, xUnfetch, (offset: ffi::sqlite3_int64, page: *mut c_void));

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file opened by `x_open` once and uses it no more: the
    // `WalFile` is dropped in place after the inner file is closed.
    unsafe {
        let flushed = flush(file);
        let (_, inner) = wal(file);
        let closed = match methods(inner).xClose {
            Some(close) => close(inner),
            None => ffi::SQLITE_OK,
        };
        ptr::drop_in_place(file.cast::<WalFile>());
        (*file).pMethods = ptr::null();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite passes a file opened by `x_open`.
    unsafe {
        let (_, inner) = wal(file);
        methods(inner)
            .xSectorSize
            .map_or(4096, |method| method(inner))
    }
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite passes a file opened by `x_open`.
    unsafe {
        let (_, inner) = wal(file);
        methods(inner)
            .xDeviceCharacteristics
            .map_or(0, |method| method(inner))
    }
}

unsafe extern "C" fn x_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite passes a file opened by `x_open`. (It keeps the wal-index through the
    // database file, never a WAL file; this is here for completeness.)
    unsafe {
        let _ = flush(file);
        let (_, inner) = wal(file);
        if let Some(method) = methods(inner).xShmBarrier {
            method(inner);
        }
    }
}

#[cfg(test)]
mod tests;
