//! JSON payloads (cargo feature `json`, on by default): a [`Record`] from
//! any `Serialize` value, and a typed decode of a [`Message`] that checks
//! its content type.
//!
//! Only conveniences over the bytes: the delivery contract, the traits and
//! the backends know nothing of JSON, and a record built here is an
//! ordinary record with a `content-type: application/json` header.

use crate::error::{Error, Result};
use crate::record::{Message, Record};

/// The header naming a record's payload type.
pub const CONTENT_TYPE: &str = "content-type";
/// The [`CONTENT_TYPE`] of a record built by [`Record::json`].
pub const JSON_CONTENT_TYPE: &str = "application/json";

impl Record {
    /// A record whose value is `value` as JSON, with the header
    /// `content-type: application/json`.
    ///
    /// ```
    /// use conveyor::Record;
    /// #[derive(serde::Serialize)]
    /// struct Placed { order: u64 }
    /// let record = Record::json(&Placed { order: 42 })?.with_key("order-42");
    /// assert_eq!(&record.value[..], br#"{"order":42}"#);
    /// # Ok::<(), conveyor::Error>(())
    /// ```
    ///
    /// # Errors
    /// `InvalidArgument` if `value` cannot be written as JSON (a map with
    /// non-string keys, a `Serialize` impl that fails).
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Record> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            Error::invalid(format!(
                "record value: cannot write a `{}` as JSON: {e}",
                std::any::type_name::<T>()
            ))
        })?;
        Ok(Record::new(bytes).with_header(CONTENT_TYPE, JSON_CONTENT_TYPE))
    }
}

impl Message {
    /// The value, read as JSON into a `T`.
    ///
    /// A message with a `content-type` header must say JSON
    /// (`application/json`, or a `+json` type such as
    /// `application/cloudevents+json`; parameters like `; charset=utf-8`
    /// are allowed). A message without one is read as JSON (producers
    /// that set no headers).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> conveyor::Result<()> {
    /// use conveyor::prelude::*;
    /// use std::time::Duration;
    ///
    /// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    /// struct Placed { order: u64 }
    ///
    /// let broker = conveyor::open("memory://").await?;
    /// broker.create_topic("orders", TopicConfig::new(1)).await?;
    /// let producer = broker.producer().await?;
    /// producer.send("orders", Record::json(&Placed { order: 42 })?).await?;
    /// producer.send("orders", Record::new("hello").with_header("content-type", "text/plain")).await?;
    ///
    /// let consumer = broker.consumer("billing", &["orders"], GroupConfig::queue()).await?;
    /// let batch = consumer.poll(2, Duration::from_secs(1)).await?;
    /// assert_eq!(batch[0].header_str("content-type"), Some("application/json"));
    /// assert_eq!(batch[0].json::<Placed>()?, Placed { order: 42 });
    /// let e = batch[1].json::<Placed>().unwrap_err();
    /// assert_eq!(e.kind(), conveyor::ErrorKind::InvalidArgument);
    /// assert!(e.message().contains("content-type `text/plain`"), "{e}");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `InvalidArgument` naming the message's position and `T`: its
    /// content type is not JSON, or its value is not a JSON `T` (serde's
    /// reason, with line and column).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        if let Some(content_type) = self.header(CONTENT_TYPE) {
            let text = String::from_utf8_lossy(content_type);
            if !is_json(&text) {
                return Err(Error::invalid(format!(
                    "{}: content-type `{text}` is not JSON (expected `{JSON_CONTENT_TYPE}`)",
                    self.position()
                )));
            }
        }
        serde_json::from_slice(&self.value).map_err(|e| {
            Error::invalid(format!(
                "{}: value is not a JSON `{}`: {e}",
                self.position(),
                std::any::type_name::<T>()
            ))
        })
    }
}

/// `application/json`, `application/x+json`, with or without parameters,
/// in any case.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == JSON_CONTENT_TYPE
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/cloudevents+json",
        ] {
            assert!(is_json(yes), "{yes}");
        }
        for no in ["text/plain", "application/jsonx", "", "text/json+xml"] {
            assert!(!is_json(no), "{no}");
        }
    }
}
