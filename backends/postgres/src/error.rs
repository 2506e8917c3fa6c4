//! sqlx's errors as Conveyor's [`ErrorKind`]s: a lost or refused
//! connection, a pool that timed out waiting for one, a server shutting
//! down, and a serialization failure or deadlock (the transaction was
//! rolled back; running it again is safe) are `Unavailable`, which callers
//! retry; anything else is `Internal` naming the operation.

use conveyor_core::{Error, ErrorKind};

/// SQLSTATE classes and codes that mean "try again": connection
/// exceptions (08), operator intervention (57P01 admin shutdown, 57P02
/// crash shutdown, 57P03 cannot connect now), insufficient resources
/// (53), serialization failure (40001) and deadlock (40P01).
fn transient_code(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
}

/// Map a driver error met while doing `what`.
pub(crate) fn map(what: &str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => ErrorKind::Unavailable,
        sqlx::Error::PoolClosed => ErrorKind::Closed,
        sqlx::Error::Database(db) => match db.code() {
            Some(code) if transient_code(&code) => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        },
        _ => ErrorKind::Internal,
    };
    let message = match kind {
        ErrorKind::Unavailable => format!("{what}: PostgreSQL unavailable: {e}"),
        ErrorKind::Closed => format!("{what}: the broker is closed"),
        _ => format!("{what}: {e}"),
    };
    Error::new(kind, message).with_source(e)
}

/// `map` as a closure for `map_err`.
pub(crate) fn during(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let what = what.into();
    move |e| map(&what, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_retriable_and_others_are_not() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = map("send to `t`", sqlx::Error::Io(io));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retriable());
        assert!(e.message().contains("send to `t`"), "{e}");
        assert_eq!(
            map("x", sqlx::Error::PoolTimedOut).kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(map("x", sqlx::Error::PoolClosed).kind(), ErrorKind::Closed);
        assert_eq!(
            map("x", sqlx::Error::RowNotFound).kind(),
            ErrorKind::Internal
        );
        assert!(transient_code("08006") && transient_code("40P01") && transient_code("57P01"));
        assert!(!transient_code("23505") && !transient_code("42P01"));
    }
}
