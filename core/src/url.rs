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
#[derive(Debug, Clone, PartialEq, Eq)]
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
        let url = url::Url::parse(raw)
            .map_err(|e| Error::invalid(format!("broker URL `{raw}` is not a URL: {e}")))?;
        let mut options = BrokerOptions::default();
        let mut rest = Vec::new();
        for (k, v) in url.query_pairs() {
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

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.raw
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
        let mut all = vec!["durability", "auto_create"];
        all.extend_from_slice(known);
        Error::invalid(format!(
            "broker URL option `{name}` is not known to the {backend} backend (known: {})",
            all.join(", ")
        ))
    }
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
            "not a url",
        ] {
            assert_eq!(
                BrokerUrl::parse(bad).unwrap_err().kind(),
                ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
    }
}
