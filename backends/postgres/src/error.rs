//! sqlx's errors as Conveyor's [`ErrorKind`]s, by whose fault they are:
//!
//! - the server could not be reached or is going away, a pool timed out
//!   waiting for a connection, a serialization failure or deadlock (the
//!   transaction was rolled back; running it again is safe): `Unavailable`,
//!   which callers retry;
//! - the server refused our credentials (SQLSTATE class 28):
//!   `Unauthenticated`; the role lacks a right (42501): `PermissionDenied`;
//! - a bad URL or option (unknown database 3D000, a TLS setup the server or
//!   its certificate does not match), data the database refuses (class 22,
//!   a constraint 23502/23514, a limit class 54): `InvalidArgument`;
//! - anything else: `Internal`, naming the operation and the SQLSTATE.
//!
//! The message says it once: the driver's error is not attached as the
//! source (its text already is in the message, and sqlx repeats it in its
//! own source chain). Neither ever holds a password: sqlx's errors do not
//! carry the connection URL, and `open` scrubs its messages besides.

use conveyor_core::{Error, ErrorKind};

/// SQLSTATE classes and codes that mean "try again": connection
/// exceptions (08), operator intervention (57P01 admin shutdown, 57P02
/// crash shutdown, 57P03 cannot connect now, 57014 a statement cancelled),
/// insufficient resources (53), serialization failure (40001), deadlock
/// (40P01) and a read-only server (25006: a standby, maybe being promoted).
fn transient_code(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "40001" | "40P01" | "25006"
        )
}

/// What to check when TLS fails.
const TLS_ADVICE: &str = " (check sslmode, sslrootcert, sslcert and sslkey against the \
                          server's certificate and settings)";

/// The kind of a database error by its SQLSTATE.
fn kind_of_code(code: &str) -> ErrorKind {
    if transient_code(code) {
        ErrorKind::Unavailable
    } else if code.starts_with("28") {
        ErrorKind::Unauthenticated
    } else if code == "42501" {
        ErrorKind::PermissionDenied
    } else if code.starts_with("22")
        || code.starts_with("54")
        || matches!(code, "3D000" | "3F000" | "42P01" | "23502" | "23514")
    {
        ErrorKind::InvalidArgument
    } else {
        ErrorKind::Internal
    }
}

/// What to fix, for a database error of `kind` (empty when the message
/// says enough).
fn advice(code: &str, kind: ErrorKind, message: &str) -> &'static str {
    match kind {
        ErrorKind::Unauthenticated if message.contains("no encryption") => {
            " (the server accepts this user only over TLS: add sslmode=require, or verify-full with sslrootcert)"
        }
        ErrorKind::Unauthenticated => " (check the user and password in the URL)",
        ErrorKind::PermissionDenied => {
            " (the role lacks a right Conveyor needs: see \"Server settings and rights\" in conveyor-postgres's docs for the GRANTs)"
        }
        _ if code == "3D000" => " (fix the database name in the URL)",
        _ if code == "42P01" || code == "3F000" => {
            " (the schema has no Conveyor tables: it was dropped, or never migrated; run `conveyor --url <url> migrate`)"
        }
        _ => "",
    }
}

/// Map a driver error met while doing `what`.
pub(crate) fn map(what: &str, e: sqlx::Error) -> Error {
    let (kind, detail) = match &e {
        // rustls reports a failed handshake (an unknown issuer, a name
        // mismatch, an expired certificate) as `InvalidData` I/O: the TLS
        // setup is wrong, not the network.
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => (
            ErrorKind::InvalidArgument,
            format!("TLS to PostgreSQL failed: {io}{TLS_ADVICE}"),
        ),
        sqlx::Error::Io(io) => (
            ErrorKind::Unavailable,
            format!("PostgreSQL unavailable: {io}"),
        ),
        sqlx::Error::PoolTimedOut => (
            ErrorKind::Unavailable,
            "PostgreSQL unavailable: no connection within the deadline (the server did not \
             answer, or every pooled connection was busy)"
                .to_string(),
        ),
        sqlx::Error::Protocol(p) => (
            ErrorKind::Unavailable,
            format!("PostgreSQL unavailable: the connection broke ({p})"),
        ),
        sqlx::Error::Tls(t) => (
            ErrorKind::InvalidArgument,
            format!("TLS to PostgreSQL failed: {t}{TLS_ADVICE}"),
        ),
        sqlx::Error::Configuration(c) => (
            ErrorKind::InvalidArgument,
            format!("bad connection setting: {c}"),
        ),
        sqlx::Error::PoolClosed => (ErrorKind::Closed, "the broker is closed".to_string()),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let kind = kind_of_code(&code);
            let message = db.message();
            let detail = match kind {
                ErrorKind::Unavailable => format!("PostgreSQL unavailable: {message}"),
                ErrorKind::Internal => format!("{message} (SQLSTATE {code})"),
                _ => format!("{message}{}", advice(&code, kind, message)),
            };
            (kind, detail)
        }
        other => (ErrorKind::Internal, other.to_string()),
    };
    Error::new(kind, format!("{what}: {detail}"))
}

/// `map` as a closure for `map_err`.
pub(crate) fn during(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let what = what.into();
    move |e| map(&what, e)
}

/// `e` with every occurrence of `secret` (a password) replaced, in its
/// message (a last guard: no driver text we put there should hold one).
pub(crate) fn scrub(e: Error, secret: Option<&str>) -> Error {
    match secret {
        Some(s) if !s.is_empty() && e.message().contains(s) => {
            Error::new(e.kind(), e.message().replace(s, "***"))
        }
        _ => e,
    }
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
        assert_eq!(e.chain().to_string().matches("refused").count(), 1, "{e}");
        let tls = std::io::Error::new(std::io::ErrorKind::InvalidData, "UnknownIssuer");
        let e = map("connect", sqlx::Error::Io(tls));
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("sslrootcert"), "{e}");
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

    #[test]
    fn sqlstates_say_whose_fault_it_is() {
        for (code, kind) in [
            ("28P01", ErrorKind::Unauthenticated),
            ("28000", ErrorKind::Unauthenticated),
            ("3D000", ErrorKind::InvalidArgument),
            ("42501", ErrorKind::PermissionDenied),
            ("08006", ErrorKind::Unavailable),
            ("57P01", ErrorKind::Unavailable),
            ("53300", ErrorKind::Unavailable),
            ("22003", ErrorKind::InvalidArgument),
            ("23514", ErrorKind::InvalidArgument),
            ("23505", ErrorKind::Internal),
            ("XX000", ErrorKind::Internal),
        ] {
            assert_eq!(kind_of_code(code), kind, "{code}");
        }
        assert!(advice(
            "28000",
            ErrorKind::Unauthenticated,
            "no pg_hba.conf entry, no encryption"
        )
        .contains("sslmode=require"));
    }

    #[test]
    fn scrub_hides_a_password() {
        let e = scrub(Error::invalid("at u:pgs3cret@h"), Some("pgs3cret"));
        assert_eq!(e.message(), "at u:***@h");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
}
