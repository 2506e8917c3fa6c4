//! Broker URLs: the options every backend shares, parsed once.
//!
//! `conveyor::open(url)` picks a backend by scheme and hands it a
//! [`BrokerUrl`]: the URL with the common options (`durability`,
//! `auto_create`) already parsed into [`BrokerOptions`], and the rest left
//! for the backend, which owns its own options and refuses the ones it does
//! not know (sqlx's drivers each parse their own URL the same way).

use crate::config::{BrokerOptions, Durability};
use crate::error::{Error, Result};
use std::time::Duration;

/// The options every backend's URL takes, parsed here into
/// [`BrokerOptions`].
pub const COMMON_OPTIONS: &[&str] = &["durability", "auto_create"];

/// A broker URL with its common options parsed.
///
/// ```
/// use conveyor_core::backend::BrokerUrl;
/// use conveyor_core::Durability;
/// let url = BrokerUrl::parse("mmap:///var/lib/q?durability=always&segment_bytes=4096")?;
/// assert_eq!(url.scheme(), "mmap");
/// assert_eq!(url.options().durability, Durability::Always);
/// assert_eq!(url.backend_options(), &[("segment_bytes".to_string(), "4096".to_string())]);
/// # Ok::<(), conveyor_core::Error>(())
/// ```
///
/// Its `Debug` and `Display` forms, and every error that names it, hide the
/// password (`redis://:***@host/`), as sqlx and reqwest do; only
/// [`BrokerUrl::as_str`] and [`BrokerUrl::url`] give it back, for
/// connecting.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    raw: String,
    url: url::Url,
    options: BrokerOptions,
    rest: Vec<(String, String)>,
}

impl BrokerUrl {
    /// Parse `raw` and its common query options.
    ///
    /// # Errors
    /// `InvalidArgument` naming the URL or the option at fault.
    pub fn parse(raw: &str) -> Result<Self> {
        let url = url::Url::parse(raw).map_err(|e| {
            Error::invalid(format!("broker URL `{}` is not a URL: {e}", redact(raw)))
        })?;
        let mut options = BrokerOptions::default();
        let mut rest = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in url.query_pairs() {
            if !seen.insert(k.clone()) {
                return Err(Error::invalid(format!(
                    "broker URL `{}`: option `{k}` is given more than once",
                    redact(raw)
                )));
            }
            match k.as_ref() {
                "durability" => options.durability = parse_durability(&v)?,
                "auto_create" => options.auto_create_topics = parse_bool("auto_create", &v)?,
                _ => rest.push((k.into_owned(), v.into_owned())),
            }
        }
        Ok(BrokerUrl {
            raw: raw.to_string(),
            url,
            options,
            rest,
        })
    }

    /// The scheme (`memory`, `mmap`, `redis`, ...).
    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    /// The URL as given, password included: for connecting, never for
    /// showing (use [`BrokerUrl::redacted`] or `Display`).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The URL with its password replaced by `***`: for messages and logs.
    pub fn redacted(&self) -> String {
        redact(&self.raw)
    }

    /// The parsed URL (host, path, credentials).
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// The common options.
    pub fn options(&self) -> &BrokerOptions {
        &self.options
    }

    /// The query options left for the backend, in order.
    pub fn backend_options(&self) -> &[(String, String)] {
        &self.rest
    }

    /// What follows `scheme://` up to the query, as written (for backends
    /// whose "host" is a path: `mmap:///abs/dir`, `mmap://relative/dir`).
    pub fn location(&self) -> &str {
        let after = self
            .raw
            .split_once("://")
            .map_or(self.raw.as_str(), |(_, rest)| rest);
        after.split(['?', '#']).next().unwrap_or_default()
    }

    /// The error for a backend option that `backend` does not know;
    /// `known` lists the ones it does (the common ones are added).
    pub fn unknown_option(&self, backend: &str, name: &str, known: &[&str]) -> Error {
        let mut all = COMMON_OPTIONS.to_vec();
        all.extend_from_slice(known);
        Error::invalid(format!(
            "broker URL option `{name}` is not known to the {backend} backend (known: {})",
            all.join(", ")
        ))
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUrl")
            .field("url", &self.redacted())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// `raw` with the password of its `user:password@` part replaced by `***`
/// (the user name stays: it helps and is no secret). Works on text that
/// does not parse as a URL too, so an error about a malformed URL does not
/// leak its password either; query options named `password` or ending in
/// `_key`/`secret` are hidden the same way.
///
/// ```
/// use conveyor_core::backend::redact_url;
/// assert_eq!(redact_url("redis://:s3cret@h:6379/?namespace=a"), "redis://:***@h:6379/?namespace=a");
/// assert_eq!(redact_url("postgres://app:pw@db/q"), "postgres://app:***@db/q");
/// assert_eq!(redact_url("postgres://db/q?password=pw"), "postgres://db/q?password=***");
/// assert_eq!(redact_url("mmap:///var/q"), "mmap:///var/q");
/// ```
pub fn redact(raw: &str) -> String {
    let (head, query) = match raw.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (raw, None),
    };
    let mut out = match password_span(head) {
        Some((from, to)) => format!("{}***{}", &head[..from], &head[to..]),
        None => head.to_string(),
    };
    if let Some(query) = query {
        out.push('?');
        let parts: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if is_secret_option(k) => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

/// The password of `raw`'s `user:password@` part, as written (still
/// percent-encoded), if it has one: what a backend scrubs from a driver's
/// error text. Works on text that does not parse as a URL.
///
/// ```
/// use conveyor_core::backend::url_password;
/// assert_eq!(url_password("postgres://app:s3cret@db/q"), Some("s3cret"));
/// assert_eq!(url_password("postgres://app@db/q"), None);
/// ```
pub fn url_password(raw: &str) -> Option<&str> {
    let head = raw.split(['?', '#']).next().unwrap_or_default();
    password_span(head)
        .map(|(from, to)| &head[from..to])
        .filter(|p| !p.is_empty())
}

/// Where the password of `head` (a URL up to its query) lies: after the
/// first `:` of the user info, which ends at the last `@` before the
/// first `/` after `scheme://`.
fn password_span(head: &str) -> Option<(usize, usize)> {
    let start = head.find("://")? + 3;
    let rest = &head[start..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let userinfo = authority.rsplit_once('@')?.0;
    let colon = userinfo.find(':')?;
    Some((start + colon + 1, start + userinfo.len()))
}

fn is_secret_option(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "password" || name == "pass" || name.ends_with("secret") || name.ends_with("_key")
}

/// Parse `none`, `always` or `interval:<ms>`.
///
/// # Errors
/// `InvalidArgument` naming the value.
pub fn parse_durability(v: &str) -> Result<Durability> {
    match v {
        "none" => Ok(Durability::None),
        "always" => Ok(Durability::Always),
        other => match other.strip_prefix("interval:") {
            Some(ms) => ms
                .trim_end_matches("ms")
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(|ms| Durability::Interval(Duration::from_millis(ms)))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "durability `{other}`: expected interval:<milliseconds above 0>"
                    ))
                }),
            None => Err(Error::invalid(format!(
                "durability `{other}`: expected none, always or interval:<ms>"
            ))),
        },
    }
}

/// Parse a boolean URL option (`true`/`1`/`yes`, `false`/`0`/`no`).
///
/// # Errors
/// `InvalidArgument` naming the option and value.
pub fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(Error::invalid(format!(
            "broker URL option {name}=`{other}`: expected true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn common_options_and_the_rest() {
        let p =
            BrokerUrl::parse("mmap:///tmp/q?durability=always&auto_create=true&segment_bytes=1024")
                .unwrap();
        assert_eq!(p.scheme(), "mmap");
        assert_eq!(p.options().durability, Durability::Always);
        assert!(p.options().auto_create_topics);
        assert_eq!(
            p.backend_options(),
            &[("segment_bytes".into(), "1024".into())]
        );
        assert_eq!(p.location(), "/tmp/q");
        assert_eq!(
            BrokerUrl::parse("mmap://rel/dir").unwrap().location(),
            "rel/dir"
        );
        let p = BrokerUrl::parse("memory://?durability=interval:50").unwrap();
        assert_eq!(
            p.options().durability,
            Durability::Interval(Duration::from_millis(50))
        );
        for bad in [
            "memory://?durability=sometimes",
            "memory://?durability=interval:0",
            "memory://?auto_create=maybe",
            "memory://?durability=none&durability=always",
            "postgres://h/db?schema=a&schema=b",
            "not a url",
        ] {
            assert_eq!(
                BrokerUrl::parse(bad).unwrap_err().kind(),
                ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn passwords_never_show() {
        let u = BrokerUrl::parse("redis://user:s3cr3t-pw@h:6379/?namespace=a").unwrap();
        assert_eq!(u.to_string(), "redis://user:***@h:6379/?namespace=a");
        assert!(!format!("{u:?}").contains("s3cr3t"), "{u:?}");
        assert_eq!(u.as_str(), "redis://user:s3cr3t-pw@h:6379/?namespace=a");
        for bad in [
            "postgres://u:pgs3cret@h/db?durability=sometimes",
            "postgres://u:pgs3cret@h/db?schema=a&schema=b",
            "postgres://u:pgs3cret@h:notaport/db",
            "redis://:pgs3cret@/x?password=pgs3cret",
        ] {
            let e = BrokerUrl::parse(bad).unwrap_err();
            assert!(!e.to_string().contains("pgs3cret"), "{e}");
        }
        assert_eq!(redact("a://u:p@h@x/y"), "a://u:***@x/y");
        assert_eq!(redact("a://h/p@q"), "a://h/p@q");
        assert_eq!(redact("no url:p@ss"), "no url:p@ss");
        assert_eq!(
            redact("rediss://h/?tls_key=k&ca=c"),
            "rediss://h/?tls_key=***&ca=c"
        );
    }
}
