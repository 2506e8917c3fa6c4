//! Fail-stop after a failed sync (PostgreSQL's fsync lesson, redb's
//! `PreviousIo`).
//!
//! When `fdatasync` fails, Linux may already have dropped the dirty pages
//! it could not write and cleared the error: a retried sync can succeed
//! while the data is gone. So once a sync of a file fails, whatever owns
//! it (a partition, the state log) refuses every later write until the
//! store is reopened, which rereads what really is on disk. Reads go on.
//!
//! Owns one flag per owner; does no I/O.

use conveyor_core::{Error, ErrorKind, Result};
use std::path::Path;
use std::sync::OnceLock;

/// Set once a sync failed; then every write is refused.
#[derive(Debug, Default)]
pub(crate) struct FailStop(OnceLock<String>);

impl FailStop {
    /// `Ok` unless a sync failed before: then the fail-stop error.
    pub fn check(&self) -> Result<()> {
        match self.0.get() {
            None => Ok(()),
            Some(message) => Err(Error::new(ErrorKind::Io, message.clone())),
        }
    }

    /// Pass `result` of a sync of `file` through, tripping on an error.
    pub fn watch<T>(&self, file: &Path, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            let _ = self.0.set(format!(
                "a previous sync of {} failed ({}); writes are refused until the store is \
                 reopened (data not yet synced may be lost)",
                file.display(),
                e.chain()
            ));
        }
        result
    }
}
