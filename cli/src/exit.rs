//! The exit status of a failed command, by what went wrong, so a script
//! can tell "unavailable, retry later" from "not found" or "bad input".
//! It owns the table of codes and the mapping from [`conveyor::ErrorKind`];
//! it does not decide which message is printed.

use conveyor::ErrorKind;

/// Why a command failed, as its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Anything not listed below: an internal error (a bug), a fenced or
    /// closed consumer, a lease lost.
    Failure = 1,
    /// The command line is wrong: an unknown flag, a bad value, no `--url`
    /// (clap's own usage errors exit 2 as well).
    Usage = 2,
    /// The topic or group does not exist.
    NotFound = 3,
    /// A conflict with what exists: a topic with another config, a group
    /// in the other mode, a group with active members.
    Conflict = 4,
    /// Input the broker refuses: an invalid name, URL or config (a path
    /// that holds no store), a partition out of range, a message too
    /// large, a malformed input line.
    Invalid = 5,
    /// The store is owned by another process (`Locked`) or was opened
    /// read-only.
    Locked = 6,
    /// The backend is not compiled into this `conveyor`, or lacks the
    /// feature.
    Unsupported = 7,
    /// Stored data is damaged (`verify`, or a read that found it).
    Corrupt = 8,
    /// An I/O error of the local file system or of stdin/stdout.
    Io = 74,
    /// The server is unreachable or cannot take the call now: retry later
    /// (EX_TEMPFAIL).
    Unavailable = 75,
    /// The server refused the credentials or the operation (EX_NOPERM).
    Denied = 77,
}

impl Exit {
    /// The exit code for an error of `kind`.
    pub fn of(kind: ErrorKind) -> Exit {
        match kind {
            ErrorKind::TopicNotFound | ErrorKind::GroupNotFound => Exit::NotFound,
            ErrorKind::TopicExists
            | ErrorKind::GroupModeMismatch
            | ErrorKind::GroupNotEmpty
            | ErrorKind::WrongMode => Exit::Conflict,
            ErrorKind::InvalidArgument
            | ErrorKind::PartitionOutOfRange
            | ErrorKind::MessageTooLarge => Exit::Invalid,
            ErrorKind::Locked | ErrorKind::ReadOnly => Exit::Locked,
            ErrorKind::Unsupported => Exit::Unsupported,
            ErrorKind::Corrupt => Exit::Corrupt,
            ErrorKind::Io => Exit::Io,
            ErrorKind::Unavailable => Exit::Unavailable,
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => Exit::Denied,
            _ => Exit::Failure,
        }
    }

    /// The process exit status.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The table for `--help` and the README.
pub const TABLE: &str = "Exit status:\n  \
    0   success\n  \
    1   other failure (an internal error, a fenced or closed consumer, a lost lease)\n  \
    2   usage: a bad flag or value, no --url\n  \
    3   not found: the topic or group does not exist\n  \
    4   conflict: a topic with another config, a group in the other mode or with active members\n  \
    5   invalid input: a bad name, URL or config (a path with no store), a partition out of \
    range, a message too large, a malformed input line\n  \
    6   locked: another process owns the store, or it was opened read-only\n  \
    7   unsupported: the backend is not compiled into this conveyor\n  \
    8   corrupt: stored data is damaged\n  \
    74  I/O error (local files, stdin, stdout)\n  \
    75  unavailable: the server cannot be reached now; retry later\n  \
    77  denied: the server refused the credentials or the operation";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_in_the_table_once() {
        let all = [
            Exit::Failure,
            Exit::Usage,
            Exit::NotFound,
            Exit::Conflict,
            Exit::Invalid,
            Exit::Locked,
            Exit::Unsupported,
            Exit::Corrupt,
            Exit::Io,
            Exit::Unavailable,
            Exit::Denied,
        ];
        for e in all {
            let row = format!("\n  {:<3} ", e.code());
            assert_eq!(TABLE.matches(&row).count(), 1, "{e:?} in {TABLE}");
        }
        assert_eq!(Exit::of(ErrorKind::Unavailable).code(), 75);
        assert_eq!(Exit::of(ErrorKind::TopicNotFound).code(), 3);
        assert_eq!(Exit::of(ErrorKind::Internal).code(), 1);
        assert_eq!(Exit::of(ErrorKind::GroupNotEmpty), Exit::Conflict);
    }
}
