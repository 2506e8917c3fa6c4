//! The store's file-system operations: opening for append, syncing files
//! and directories, atomic replacement, truncation of torn tails, the
//! `Corrupt` error that names a file and a byte position, and [`blocking`],
//! which keeps all of them off the async runtime's worker threads.
//!
//! This module holds no state of the store and knows no format; every other
//! module calls it, it calls none of them (dependencies point one way:
//! `lib` → `partition`/`state` → `segment`/`recovery` → `format`/`fs`).
//!
//! It also holds the test-only sync fault hook ([`fail_next_sync`]), the
//! seam through which tests make an `fdatasync` fail.

use conveyor_core::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An `Io` error maker naming what was done to which path.
pub(crate) fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::io(context, e)
}

/// `ErrorKind::Corrupt` naming the file and the byte position.
pub(crate) fn corrupt(path: &Path, pos: u64, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("{}: byte {pos}: {what}", path.display()),
    )
}

/// Open a file for appending (and reading), creating it if missing.
pub(crate) fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(io("open", path))
}

/// `fsync` a directory, so entries created, renamed or removed in it are
/// durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fault::check(dir).map_err(io("sync directory", dir))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

/// `fdatasync` a file (`path` names it in errors and for the fault hook).
pub(crate) fn sync_data(file: &File, path: &Path) -> Result<()> {
    fault::check(path)
        .and_then(|()| file.sync_data())
        .map_err(io("sync", path))
}

/// Replace `path` with `bytes` atomically: write a temporary file beside
/// it, sync it, rename it over `path`, sync the directory. After a crash
/// the file holds the old bytes or the new ones, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    fault::check(&tmp)
        .and_then(|()| f.sync_all())
        .map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Cut `path` to `len` bytes and sync it (a torn tail found at open).
pub(crate) fn truncate(path: &Path, len: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io("open", path))?;
    file.set_len(len)
        .and_then(|()| fault::check(path))
        .and_then(|()| file.sync_all())
        .map_err(io("truncate", path))
}

/// Remove a file; a missing one is fine.
pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("delete", path)(e)),
        _ => Ok(()),
    }
}

/// Remove a directory tree; a missing one is fine.
pub(crate) fn remove_dir_all(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("delete", dir)(e)),
        _ => Ok(()),
    }
}

/// Run blocking file-system work off the async worker threads (the
/// shared rule: [`conveyor_core::backend::blocking`]).
pub(crate) use conveyor_core::backend::blocking;

/// Make the next sync (`fdatasync`/`fsync`) of a file or directory under
/// `path` fail with an I/O error, once.
///
/// **A test hook, not part of the API** (re-exported `#[doc(hidden)]` as
/// `conveyor_mmap::testing::fail_next_sync`): it lets tests drive the
/// fail-stop path through the public API. Faults are keyed by path, so
/// tests in one process that use different directories do not see each
/// other's faults. When no fault is armed a sync pays one atomic load.
pub fn fail_next_sync(path: &Path) {
    fault::arm(path);
}

mod fault {
    use parking_lot::Mutex;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};

    static ARMED: AtomicBool = AtomicBool::new(false);
    static PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(super) fn arm(path: &Path) {
        PATHS.lock().push(path.to_path_buf());
        ARMED.store(true, Ordering::Release);
    }

    /// An injected error if a fault is armed for `path` (consuming it).
    pub(super) fn check(path: &Path) -> std::io::Result<()> {
        if !ARMED.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut paths = PATHS.lock();
        let Some(i) = paths.iter().position(|p| path.starts_with(p)) else {
            return Ok(());
        };
        paths.swap_remove(i);
        if paths.is_empty() {
            ARMED.store(false, Ordering::Release);
        }
        Err(std::io::Error::other("injected sync failure (test hook)"))
    }
}
