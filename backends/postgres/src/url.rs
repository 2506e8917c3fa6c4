//! The `postgres://` URL: a libpq-style connection URL plus Conveyor's
//! options: `schema` (where Conveyor's tables live, default `conveyor`),
//! `max_connections` (pool size, default 10), `timeout_ms` (how long a
//! call waits for the server, default 30,000), `migrate` (whether opening
//! migrates the schema), and the common `durability`/`auto_create`. The
//! connection options libpq names `sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey` and `application_name` are passed to the connection. Every
//! other query parameter is refused by name.

use crate::{migrate, open, PgOptions};
use conveyor_core::backend::{BrokerUrl, COMMON_URL_OPTIONS};
use conveyor_core::{Broker, Error, Result};
use std::sync::Arc;

/// The URL schemes this backend answers to.
pub const URL_SCHEMES: &[&str] = &["postgres", "postgresql"];

/// The options a `postgres://` URL may carry besides the common ones.
pub const URL_OPTIONS: &[&str] = &[
    "schema",
    "max_connections",
    "timeout_ms",
    "migrate",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
];

/// The options that belong to the connection (libpq's names), kept in the
/// connection URL.
const CONNECTION_OPTIONS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
];

/// Whether `k` is an option Conveyor reads from a `postgres://` URL (its
/// own or a common one), not one the connection passes to the driver.
pub(crate) fn is_conveyors_option(k: &str) -> bool {
    COMMON_URL_OPTIONS.contains(&k)
        || (URL_OPTIONS.contains(&k) && !CONNECTION_OPTIONS.contains(&k))
}

/// The values `sslmode` takes (libpq's, but `allow`, which sqlx lacks).
const SSL_MODES: &[&str] = &["disable", "prefer", "require", "verify-ca", "verify-full"];

/// Split a broker URL into the connection URL (without Conveyor's and the
/// common options) and [`PgOptions`].
///
/// # Errors
/// `InvalidArgument` for an unknown option or a bad value.
pub fn parse(url: &BrokerUrl) -> Result<(String, PgOptions)> {
    let mut pg = PgOptions::default();
    let mut connection = Vec::new();
    for (k, v) in url.backend_options() {
        pg = match k.as_str() {
            "sslmode" if !SSL_MODES.contains(&v.as_str()) => {
                return Err(Error::invalid(format!(
                    "broker URL `{}`: sslmode must be one of {}, not `{v}`",
                    url.redacted(),
                    SSL_MODES.join(", ")
                )))
            }
            k if CONNECTION_OPTIONS.contains(&k) => {
                connection.push((k.to_string(), v.clone()));
                pg
            }
            "migrate" => pg.with_migrate(match v.as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(Error::invalid(format!(
                        "broker URL `{}`: migrate must be true or false, not `{v}`",
                        url.redacted()
                    )))
                }
            }),
            "schema" => pg.with_schema(v.clone()),
            "max_connections" => pg.with_max_connections(v.parse().map_err(|_| {
                Error::invalid(format!(
                    "broker URL `{}`: max_connections must be a positive number, not `{v}`",
                    url.redacted()
                ))
            })?),
            "timeout_ms" => pg.with_timeout(std::time::Duration::from_millis(
                v.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    Error::invalid(format!(
                        "broker URL `{}`: timeout_ms must be a positive number of milliseconds, not `{v}`",
                        url.redacted()
                    ))
                })?,
            )),
            _ => return Err(url.unknown_option("postgres", k, URL_OPTIONS)),
        };
    }
    let mut conn = url.url().clone();
    conn.set_query(None);
    if !connection.is_empty() {
        conn.query_pairs_mut().extend_pairs(connection);
    }
    Ok((conn.to_string(), pg))
}

/// Run the migrations of the schema a `postgres://` URL names (see
/// [`migrate`](crate::migrate)).
///
/// # Errors
/// `InvalidArgument` for a bad URL or option; then the errors of
/// [`migrate`](crate::migrate).
///
/// # Cancel safety
/// Cancel safe: each migration runs in a transaction.
pub async fn migrate_url(url: &BrokerUrl) -> Result<()> {
    let (conn, pg) = parse(url)?;
    migrate(&conn, &pg).await
}

/// Open the broker a `postgres://` URL names.
///
/// # Errors
/// `InvalidArgument` for a bad URL or option; then the errors of [`open`].
///
/// # Cancel safety
/// Cancel safe: dropped, nothing is left but what the migrations created.
/// With `auto_create=true` and no `migrate=false`, opening migrates the
/// schema (development); otherwise it must have been migrated.
pub async fn open_url(url: &BrokerUrl) -> Result<Arc<dyn Broker>> {
    let (conn, pg) = parse(url)?;
    let broker = open(&conn, url.options().clone(), pg).await?;
    Ok(Arc::new(broker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_core::ErrorKind;

    #[test]
    fn options_are_taken_out_and_unknown_ones_refused() {
        let url = BrokerUrl::parse(
            "postgres://u@h:5/db?schema=app_1&max_connections=4&durability=none&timeout_ms=1500",
        )
        .unwrap();
        let (conn, pg) = parse(&url).unwrap();
        assert_eq!(conn, "postgres://u@h:5/db");
        assert_eq!(pg.schema, "app_1");
        assert_eq!(pg.max_connections, 4);
        assert_eq!(pg.timeout, std::time::Duration::from_millis(1500));
        let bad = BrokerUrl::parse("postgres://h/db?sslmodee=on").unwrap();
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("sslmodee"), "{e}");
        let bad = BrokerUrl::parse("postgres://h/db?max_connections=x").unwrap();
        assert_eq!(parse(&bad).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn tls_options_go_to_the_connection_and_migrate_to_the_options() {
        let url = BrokerUrl::parse(
            "postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/ca.pem&migrate=true&schema=s",
        )
        .unwrap();
        let (conn, pg) = parse(&url).unwrap();
        assert_eq!(
            conn,
            "postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=%2Fca.pem"
        );
        assert_eq!(pg.migrate, Some(true));
        assert_eq!(
            parse(&BrokerUrl::parse("postgres://h/db").unwrap())
                .unwrap()
                .1
                .migrate,
            None
        );
        for bad in ["sslmode=maybe", "migrate=yes"] {
            let bad = BrokerUrl::parse(&format!("postgres://u:pgs3cret@h/db?{bad}")).unwrap();
            let e = parse(&bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(!format!("{e} {e:?}").contains("pgs3cret"), "{e}");
        }
    }
}
