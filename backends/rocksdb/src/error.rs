//! The one place RocksDB's errors become Conveyor's: a held `LOCK` file is
//! `Locked`, RocksDB's corruption reports are `Corrupt` (its message names
//! the file, e.g. `block checksum mismatch ... in /dir/000012.sst offset
//! 0`), everything else is `Io` naming what was being done. RocksDB's own
//! error stays attached as the source.

use conveyor_core::{Error, ErrorKind};
use std::path::Path;

/// Map a RocksDB error raised while doing `what` to the store at `path`.
pub(crate) fn from_rocksdb(path: &Path, what: &str, err: rocksdb::Error) -> Error {
    let text = err.to_string();
    let kind = match err.kind() {
        rocksdb::ErrorKind::Corruption => ErrorKind::Corrupt,
        rocksdb::ErrorKind::IOError if is_lock_error(&text) => ErrorKind::Locked,
        rocksdb::ErrorKind::ShutdownInProgress => ErrorKind::Closed,
        _ => ErrorKind::Io,
    };
    let message = match kind {
        ErrorKind::Locked => format!(
            "store {} is open in another process (or another broker of this one): {text}",
            path.display()
        ),
        ErrorKind::Corrupt => format!("store {}: {what}: {text}", path.display()),
        _ => format!("store {}: {what}", path.display()),
    };
    Error::new(kind, message).with_source(err)
}

/// RocksDB reports a held `LOCK` as an `IOError`: "While lock file:
/// <dir>/LOCK: Resource temporarily unavailable" from another process,
/// "lock hold by current process" from this one.
fn is_lock_error(text: &str) -> bool {
    text.contains("lock file") || text.contains("lock hold by current process")
}

/// `Closed` for a call on a closed store.
pub(crate) fn closed(path: &Path) -> Error {
    Error::new(
        ErrorKind::Closed,
        format!("store {} is closed", path.display()),
    )
}

/// `Corrupt` for damage RocksDB did not see but our layout did (a gap in
/// a partition, an undecodable value), naming the store and the spot.
pub(crate) fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("store {}: {what}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_messages_are_recognised() {
        assert!(is_lock_error(
            "IO error: While lock file: /tmp/x/LOCK: Resource temporarily unavailable"
        ));
        assert!(is_lock_error(
            "IO error: lock hold by current process, acquire time 1 acquiring thread 2: /tmp/x/LOCK: No locks available"
        ));
        assert!(!is_lock_error("IO error: No space left on device"));
    }
}
