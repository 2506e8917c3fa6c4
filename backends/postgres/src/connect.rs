//! Reaching the server: the connection URL as sqlx's options (TLS and
//! `application_name` included), the deadline every connecting step runs
//! under, and keeping the URL's password out of every error. It does not
//! know about schemas or tables.

use crate::error::scrub;
use conveyor_core::backend::{redact_url, url_password};
use conveyor_core::{Error, ErrorKind, Result};
use sqlx::postgres::PgConnectOptions;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

/// The `application_name` the server shows for Conveyor's connections
/// when the URL does not name one.
const APPLICATION_NAME: &str = "conveyor";

/// A parsed connection URL and what must never be shown of it.
pub(crate) struct Target {
    pub options: PgConnectOptions,
    /// The URL with its password hidden, for messages.
    pub shown: String,
    /// The password (as written and percent-decoded), to scrub from any
    /// message.
    secrets: Vec<String>,
}

impl Target {
    /// Parse a libpq-style URL.
    ///
    /// # Errors
    /// `InvalidArgument` naming the URL (password hidden) and what is wrong.
    pub fn parse(url: &str) -> Result<Target> {
        let shown = redact_url(url);
        let secrets = url_password(url)
            .map(|p| {
                let decoded = percent_decode(p);
                if decoded == p {
                    vec![decoded]
                } else {
                    vec![p.to_string(), decoded]
                }
            })
            .unwrap_or_default();
        let target = Target {
            options: PgConnectOptions::new(),
            shown,
            secrets,
        };
        if let Some(k) = conveyor_option(url) {
            // The driver would ignore it: a schema given here would open
            // the default one instead, silently.
            let instead = match k {
                "durability" => "BrokerOptions::with_durability".to_string(),
                "auto_create" => "BrokerOptions::with_auto_create_topics".to_string(),
                "timeout_ms" => "PgOptions::with_timeout".to_string(),
                k => format!("PgOptions::with_{k}"),
            };
            return Err(Error::invalid(format!(
                "PostgreSQL connection URL `{}`: `{k}` is Conveyor's option, not the \
                 connection's; give it as `{instead}`, or open the whole URL with \
                 `conveyor_postgres::open_url` or `conveyor::open`",
                target.shown
            )));
        }
        let mut options = PgConnectOptions::from_str(url).map_err(|e| {
            target.hide(Error::invalid(format!(
                "PostgreSQL URL `{}` is not valid: {e}",
                target.shown
            )))
        })?;
        if options.get_application_name().is_none() {
            options = options.application_name(APPLICATION_NAME);
        }
        Ok(Target { options, ..target })
    }

    /// The options of a pool the application made (`open_on`): shown as
    /// `postgres://user@host:port/db`; sqlx never puts the password in
    /// its errors, so there is nothing to scrub.
    pub fn from_options(options: PgConnectOptions) -> Target {
        let shown = format!(
            "postgres://{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        Target {
            options,
            shown,
            secrets: Vec::new(),
        }
    }

    /// `e` with the password scrubbed from its message.
    pub fn hide(&self, e: Error) -> Error {
        self.secrets
            .iter()
            .fold(e, |e, secret| scrub(e, Some(secret)))
    }

    /// Run `step` (connecting, migrating, checking) within `limit`: a server
    /// that accepts the connection and never answers, or a black-holed
    /// address, is `Unavailable` at the deadline. The error names `what`
    /// and the URL (password hidden).
    pub async fn within<T>(
        &self,
        limit: Duration,
        what: &str,
        step: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, step).await {
            Ok(result) => result.map_err(|e| self.hide(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{what}: PostgreSQL at `{}` did not answer within {limit:?} (timeout_ms)",
                    self.shown
                ),
            )),
        }
    }
}

/// The first of Conveyor's own URL options (`schema`, `migrate`, ...) in a
/// connection URL's query, which the driver would not read.
fn conveyor_option(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k))
        .find(|k| crate::url::is_conveyors_option(k))
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_found_and_never_shown() {
        assert_eq!(
            url_password("postgres://u:pgs3cret@h:5/db"),
            Some("pgs3cret")
        );
        assert_eq!(url_password("postgres://u@h/db"), None);
        assert_eq!(url_password("postgres://h/db?x=a:b@c"), None);
        assert_eq!(percent_decode("p%40ss%2Fw"), "p@ss/w");
        let e = Target::parse("postgres://u:p%40ss@h:notaport/db")
            .err()
            .expect("a bad port");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let text = format!("{e} {e:?} {}", e.chain());
        assert!(!text.contains("p%40ss") && !text.contains("p@ss"), "{text}");
    }

    #[test]
    fn conveyors_own_options_in_a_connection_url_are_refused_not_ignored() {
        for (url, k, instead) in [
            (
                "postgres://u@h/db?schema=app",
                "schema",
                "PgOptions::with_schema",
            ),
            (
                "postgres://u:pw@h/db?sslmode=disable&timeout_ms=5",
                "timeout_ms",
                "PgOptions::with_timeout",
            ),
            (
                "postgres://u@h/db?durability=always",
                "durability",
                "BrokerOptions::with_durability",
            ),
        ] {
            let e = Target::parse(url).err().expect("refused");
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{url}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("`{k}`")) && text.contains(instead),
                "{text}"
            );
            assert!(!text.contains(":pw@"), "{text}");
        }
        // The connection's own options pass.
        Target::parse("postgres://u@h/db?sslmode=disable&application_name=x").unwrap();
    }

    #[test]
    fn connections_are_named_conveyor_unless_the_url_says() {
        let t = Target::parse("postgres://u@h/db").unwrap();
        assert_eq!(t.options.get_application_name(), Some("conveyor"));
        let t = Target::parse("postgres://u@h/db?application_name=app").unwrap();
        assert_eq!(t.options.get_application_name(), Some("app"));
    }
}
