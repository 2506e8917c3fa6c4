//! The `postgres://` URL: a libpq-style connection URL plus Conveyor's
//! options: `schema` (where Conveyor's tables live, default `conveyor`),
//! `max_connections` (pool size, default 10), `timeout_ms` (how long a
//! call waits for the server, default 30,000), and the common
//! `durability`/`auto_create_topics`. Every other query parameter is
//! refused by name.

use crate::{open, PgOptions};
use conveyor_core::backend::BrokerUrl;
use conveyor_core::{Broker, Error, Result};
use std::sync::Arc;

/// The URL schemes this backend answers to.
pub const URL_SCHEMES: &[&str] = &["postgres", "postgresql"];

/// The options a `postgres://` URL may carry besides the common ones.
pub const URL_OPTIONS: &[&str] = &["schema", "max_connections", "timeout_ms"];

/// Split a broker URL into the connection URL (without Conveyor's and the
/// common options) and [`PgOptions`].
///
/// # Errors
/// `InvalidArgument` for an unknown option or a bad value.
pub fn parse(url: &BrokerUrl) -> Result<(String, PgOptions)> {
    let mut pg = PgOptions::default();
    for (k, v) in url.backend_options() {
        pg = match k.as_str() {
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
    Ok((conn.to_string(), pg))
}

/// Open the broker a `postgres://` URL names.
///
/// # Errors
/// `InvalidArgument` for a bad URL or option; then the errors of [`open`].
///
/// # Cancel safety
/// Cancel safe: dropped, nothing is left but what the migrations created.
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
}
