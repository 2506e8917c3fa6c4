//! The JSON line of a message: what `consume --format json` writes and
//! `produce --json` reads, so `conveyor consume ... --format json |
//! conveyor produce other --json` copies records byte for byte.
//!
//! ```text
//! {"topic":"orders","partition":0,"offset":7,"timestamp":1714564800000,"attempt":1,
//!  "key":"order-42","key_encoding":"text",
//!  "value":{"event":"placed"},"value_encoding":"json",
//!  "headers":[["source","web"],["sig","3q2+7w==","base64"]],
//!  "idempotency_key":"order-42-placed"}
//! ```
//!
//! Bytes are written losslessly, with an explicit encoding: `json` when the
//! value is one JSON document on one line without surrounding whitespace
//! (other than a string or `null`): it is embedded as the very bytes
//! stored, keys in their order, spaces kept, never re-serialised; `text`
//! for other UTF-8, `base64` for the rest. A header is `[name, value]`
//! (UTF-8) or `[name, value, "base64"]`. `deliver_at` (ms since the epoch)
//! is there for a delayed record. `produce --json` ignores `topic`,
//! `offset`, `timestamp` and `attempt`, uses `partition` as an explicit
//! partition, and stores a value as the user wrote it: without
//! `value_encoding` a string value as its text and any other JSON value as
//! its exact JSON text (only checked to be JSON).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use conveyor::{Message, Record};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

/// Bytes as they appear in a JSON line.
#[derive(Serialize)]
#[serde(untagged)]
enum Encoded {
    /// A JSON document, embedded as its own bytes.
    Json(Box<RawValue>),
    /// Text, or the base64 of binary bytes.
    Text(String),
}

/// Whether `text` can be embedded as it is: one JSON document (checked by
/// the caller) that stays one line, keeps its exact bytes and reads back
/// as the same bytes (not a string, which reads back as its text; not
/// `null`, which reads back as empty).
fn embeddable(text: &str) -> bool {
    let json_space = [' ', '\t', '\n', '\r'];
    !text.is_empty()
        && text.trim_matches(json_space) == text
        && !text.contains(['\n', '\r'])
        && !text.starts_with('"')
        && text != "null"
}

/// Bytes as a JSON string and the name of its encoding: `text` for
/// UTF-8, else `base64` (keys and header values).
fn encode_text(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), "text"),
        Err(_) => (BASE64.encode(bytes), "base64"),
    }
}

/// A value as it appears in the line and the name of its encoding: a JSON
/// document as its own bytes when [`embeddable`], else as
/// [`encode_text`].
fn encode_value(bytes: &[u8]) -> (Encoded, &'static str) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if embeddable(text) {
            if let Ok(raw) = RawValue::from_string(text.to_string()) {
                return (Encoded::Json(raw), "json");
            }
        }
    }
    let (text, encoding) = encode_text(bytes);
    (Encoded::Text(text), encoding)
}

/// A message as one JSON line (see the module docs). `extra` holds what a
/// command adds after the message's own fields (`dlq list`: its state).
#[derive(Serialize)]
pub struct MessageLine<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    timestamp: u64,
    attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    value: Encoded,
    value_encoding: &'static str,
    headers: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deliver_at: Option<u64>,
    /// Fields a command adds.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl fmt::Display for MessageLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&line)
    }
}

/// A message as one JSON line (see the module docs).
pub fn message_json(m: &Message) -> MessageLine<'_> {
    let (key, key_encoding) = match m.key.as_deref().map(encode_text) {
        Some((key, encoding)) => (Some(key), Some(encoding)),
        None => (None, None),
    };
    let (value, value_encoding) = encode_value(&m.value);
    let headers = m
        .headers
        .iter()
        .map(|h| match encode_text(&h.value) {
            (v, "text") => json!([h.name, v]),
            (v, encoding) => json!([h.name, v, encoding]),
        })
        .collect();
    MessageLine {
        topic: &m.topic,
        partition: m.partition,
        offset: m.offset,
        timestamp: m.timestamp,
        attempt: m.attempt,
        key,
        key_encoding,
        value,
        value_encoding,
        headers,
        idempotency_key: m.idempotency_key.as_deref(),
        deliver_at: m.deliver_at,
        extra: Map::new(),
    }
}

/// A JSON line of `produce --json`. The value and headers are kept as the
/// text the user wrote, so nothing is reordered.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_encoding: Option<String>,
    #[serde(default)]
    value: Option<Box<RawValue>>,
    #[serde(default)]
    value_encoding: Option<String>,
    #[serde(default)]
    headers: Option<Box<RawValue>>,
    #[serde(default)]
    partition: Option<u32>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    deliver_at: Option<u64>,
    // What `consume --format json` writes besides; ignored.
    #[serde(default, rename = "topic")]
    _topic: Value,
    #[serde(default, rename = "offset")]
    _offset: Value,
    #[serde(default, rename = "timestamp")]
    _timestamp: Value,
    #[serde(default, rename = "attempt")]
    _attempt: Value,
}

/// A JSON object's members in the order written (a `Value` object would
/// sort them; headers are ordered).
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Ordered, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Ordered(members))
            }
        }
        d.deserialize_map(Members)
    }
}

/// Decode base64 text for `what`.
pub fn base64_bytes(what: &str, s: &str) -> Result<Vec<u8>, String> {
    BASE64
        .decode(s.trim())
        .map_err(|e| format!("{what} is not valid base64: {e}"))
}

fn text_or_base64(what: &str, v: Value, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    match (v, encoding) {
        (Value::String(s), None | Some("text")) => Ok(s.into_bytes()),
        (Value::String(s), Some("base64")) => base64_bytes(what, &s),
        (_, Some(other)) if other != "text" && other != "base64" => Err(format!(
            "{what}: unknown encoding `{other}` (expected text or base64)"
        )),
        (other, _) => Err(format!("{what} must be a string, got {other}")),
    }
}

/// The bytes of a `value` as written, by its `value_encoding`.
fn value_bytes(value: Option<Box<RawValue>>, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    if let Some(other) = encoding.filter(|e| !matches!(*e, "text" | "json" | "base64")) {
        return Err(format!(
            "unknown value_encoding `{other}` (expected text, json or base64)"
        ));
    }
    // Absent or null: an empty value.
    let Some(raw) = value else {
        return Ok(Vec::new());
    };
    let text = raw.get();
    let string = || serde_json::from_str::<String>(text).ok();
    match encoding {
        // The JSON document itself, byte for byte as the user wrote it.
        Some("json") => Ok(text.as_bytes().to_vec()),
        None if !text.starts_with('"') => Ok(text.as_bytes().to_vec()),
        None | Some("text") => string()
            .map(String::into_bytes)
            .ok_or_else(|| format!("value with encoding text must be a string, got {text}")),
        _ => match string() {
            Some(s) => base64_bytes("value", &s),
            None => Err(format!(
                "value with encoding base64 must be a string, got {text}"
            )),
        },
    }
}

/// The headers of a line: `[[name, value(, encoding)], ...]` or `{name:
/// value, ...}`, in the order written.
fn headers(raw: Option<Box<RawValue>>) -> Result<Vec<(String, Vec<u8>)>, String> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let text = raw.get();
    let mut out = Vec::new();
    if text.starts_with('{') {
        let Ordered(members) = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (name, v) in members {
            let value = text_or_base64(&format!("header `{name}`"), v, None)?;
            out.push((name, value));
        }
        return Ok(out);
    }
    let items = match serde_json::from_str::<Value>(text).map_err(|e| e.to_string())? {
        Value::Null => return Ok(out),
        Value::Array(items) => items,
        other => return Err(format!("headers must be an object or a list, got {other}")),
    };
    for item in items {
        let Value::Array(parts) = item else {
            return Err(format!(
                "a header must be [name, value] or [name, value, encoding], got {item}"
            ));
        };
        let mut parts = parts.into_iter();
        let (Some(Value::String(name)), Some(value), encoding, None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("a header must be [name, value] or [name, value, encoding]".to_string());
        };
        let encoding = match encoding {
            None => None,
            Some(Value::String(e)) => Some(e),
            Some(other) => {
                return Err(format!(
                    "header `{name}`: encoding must be a string, got {other}"
                ))
            }
        };
        let value = text_or_base64(&format!("header `{name}`"), value, encoding.as_deref())?;
        out.push((name, value));
    }
    Ok(out)
}

/// Parse one `produce --json` line into a record.
pub fn parse_json_record(line: &str) -> Result<Record, String> {
    let r: JsonRecord = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let mut record = Record::new(value_bytes(r.value, r.value_encoding.as_deref())?);
    if let Some(k) = r.key {
        record = record.with_key(text_or_base64(
            "key",
            Value::String(k),
            r.key_encoding.as_deref(),
        )?);
    }
    for (name, value) in headers(r.headers)? {
        record = record.with_header(name, value);
    }
    if let Some(p) = r.partition {
        record = record.with_partition(p);
    }
    if let Some(k) = r.idempotency_key {
        record = record.with_idempotency_key(k);
    }
    if let Some(at) = r.deliver_at {
        let at = UNIX_EPOCH
            .checked_add(Duration::from_millis(at))
            .ok_or_else(|| format!("deliver_at {at} is out of range"))?;
        record = record.with_deliver_at(at);
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor::prelude::*;
    use conveyor::Header;

    /// A message as a broker hands it back (`Message` cannot be built by hand).
    fn message(key: Option<&[u8]>, value: &[u8], headers: Vec<Header>) -> Message {
        let mut record = Record::new(value.to_vec());
        if let Some(k) = key {
            record = record.with_key(k.to_vec());
        }
        for h in headers {
            record = record.with_header(h.name, h.value);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let broker = conveyor::open("memory://?auto_create=true").await.unwrap();
            let r = broker
                .producer()
                .await
                .unwrap()
                .send("t", record)
                .await
                .unwrap();
            broker.fetch("t", 0, r.offset, 1).await.unwrap().remove(0)
        })
    }

    #[test]
    fn every_value_round_trips_through_produce_json() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"plain text", "text"),
            (br#"{"a":1,"b":[true,null]}"#, "json"),
            // Unsorted keys and inner spaces: embedded as they are.
            (br#"{"b":1, "a":2}"#, "json"),
            (br#"{"event":"placed","amount":10}"#, "json"),
            (b"[3, 1,2]", "json"),
            (b"42", "json"),
            (b"1e5", "json"),
            (b"123456789012345678901234567890", "json"),
            // Whitespace around or a line break inside: kept as text.
            (b" {\"a\":1}", "text"),
            (b"{\"a\":1}\n", "text"),
            (b"{\n  \"a\": 1\n}", "text"),
            (br#""quoted""#, "text"),
            (b"null", "text"),
            (b"", "text"),
            (b"{not json", "text"),
            (b"\xff\x00binary", "base64"),
        ];
        for (value, encoding) in cases {
            let m = message(
                Some(b"\x01key"),
                value,
                vec![Header::new("h", &b"\xfe"[..]), Header::new("t", "text")],
            );
            let line = message_json(&m).to_string();
            assert!(!line.contains('\n'), "{line}");
            let doc: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(doc["value_encoding"], encoding, "{line}");
            if encoding == "json" {
                let text = std::str::from_utf8(value).unwrap();
                assert!(line.contains(&format!("\"value\":{text},")), "{line}");
            }
            let back = parse_json_record(&line).unwrap();
            assert_eq!(&back.value[..], value, "{line}");
            assert_eq!(back.key.as_deref(), Some(&b"\x01key"[..]));
            assert_eq!(back.headers, m.headers);
            assert_eq!(back.partition, Some(0));
        }
    }

    #[test]
    fn produce_json_stores_the_value_as_written() {
        for (line, stored) in [
            (
                r#"{"value":{"event":"placed","amount":10}}"#,
                &br#"{"event":"placed","amount":10}"#[..],
            ),
            (
                r#"{"value": {"z": 1,  "a": [2, 1]} }"#,
                br#"{"z": 1,  "a": [2, 1]}"#,
            ),
            (r#"{"value":1.50}"#, b"1.50"),
            (r#"{"value":"text"}"#, b"text"),
            (
                r#"{"value":"\"q\"","value_encoding":"json"}"#,
                br#""\"q\"""#,
            ),
            (r#"{"value":null}"#, b""),
            (r#"{}"#, b""),
        ] {
            let r = parse_json_record(line).unwrap();
            assert_eq!(&r.value[..], stored, "{line}");
        }
        // Headers in the order written, as an object too.
        let r = parse_json_record(r#"{"headers":{"z":"1","a":"2"}}"#).unwrap();
        let names: Vec<&str> = r.headers.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["z", "a"]);
        let r = parse_json_record(r#"{"value":"x","deliver_at":1714564800000}"#).unwrap();
        assert_eq!(r.deliver_at, Some(1_714_564_800_000));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        for (line, says) in [
            (r#"{"value":"!!","value_encoding":"base64"}"#, "base64"),
            (r#"{"value":"x","value_encoding":"rot13"}"#, "rot13"),
            (r#"{"value":1,"value_encoding":"text"}"#, "must be a string"),
            (r#"{"vaule":"typo"}"#, "vaule"),
            (r#"{"headers":[["h"]]}"#, "[name, value]"),
        ] {
            let err = parse_json_record(line).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
    }
}
