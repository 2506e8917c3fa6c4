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
//! value is a JSON document whose compact form is exactly its bytes (it is
//! embedded as JSON, not as an escaped string), `text` for other UTF-8,
//! `base64` for the rest. A header is `[name, value]` (UTF-8) or `[name,
//! value, "base64"]`. `produce --json` ignores `topic`, `offset`,
//! `timestamp` and `attempt`, uses `partition` as an explicit partition,
//! and without `value_encoding` takes a string value as its text and any
//! other JSON value as its compact JSON.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use conveyor::{Message, Record};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The bytes as a JSON value and the name of its encoding.
fn encode(bytes: &[u8], allow_json: bool) -> (Value, &'static str) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return (Value::String(BASE64.encode(bytes)), "base64");
    };
    if allow_json {
        if let Ok(doc) = serde_json::from_str::<Value>(text) {
            // A string or null would read back as text or as empty.
            let plain = matches!(doc, Value::String(_) | Value::Null);
            if !plain && serde_json::to_string(&doc).is_ok_and(|compact| compact == text) {
                return (doc, "json");
            }
        }
    }
    (Value::String(text.to_string()), "text")
}

/// A message as one JSON object (see the module docs).
pub fn message_json(m: &Message) -> Value {
    let mut o = Map::new();
    o.insert("topic".into(), json!(m.topic));
    o.insert("partition".into(), json!(m.partition));
    o.insert("offset".into(), json!(m.offset));
    o.insert("timestamp".into(), json!(m.timestamp));
    o.insert("attempt".into(), json!(m.attempt));
    if let Some(k) = &m.key {
        let (key, encoding) = encode(k, false);
        o.insert("key".into(), key);
        o.insert("key_encoding".into(), json!(encoding));
    }
    let (value, encoding) = encode(&m.value, true);
    o.insert("value".into(), value);
    o.insert("value_encoding".into(), json!(encoding));
    let headers: Vec<Value> = m
        .headers
        .iter()
        .map(|h| match encode(&h.value, false) {
            (v, "text") => json!([h.name, v]),
            (v, encoding) => json!([h.name, v, encoding]),
        })
        .collect();
    o.insert("headers".into(), Value::Array(headers));
    if let Some(k) = &m.idempotency_key {
        o.insert("idempotency_key".into(), json!(k));
    }
    Value::Object(o)
}

/// A JSON line of `produce --json`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_encoding: Option<String>,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    value_encoding: Option<String>,
    #[serde(default)]
    headers: Value,
    #[serde(default)]
    partition: Option<u32>,
    #[serde(default)]
    idempotency_key: Option<String>,
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

/// Parse one `produce --json` line into a record.
pub fn parse_json_record(line: &str) -> Result<Record, String> {
    let r: JsonRecord = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let value = match (r.value, r.value_encoding.as_deref()) {
        (Value::Null, None) => Vec::new(),
        (Value::String(s), None | Some("text")) => s.into_bytes(),
        (Value::String(s), Some("base64")) => base64_bytes("value", &s)?,
        (doc, None | Some("json")) => doc.to_string().into_bytes(),
        (other, Some(e @ ("text" | "base64"))) => {
            return Err(format!(
                "value with encoding {e} must be a string, got {other}"
            ))
        }
        (_, Some(other)) => {
            return Err(format!(
                "unknown value_encoding `{other}` (expected text, json or base64)"
            ))
        }
    };
    let mut record = Record::new(value);
    if let Some(k) = r.key {
        record = record.with_key(text_or_base64(
            "key",
            Value::String(k),
            r.key_encoding.as_deref(),
        )?);
    }
    match r.headers {
        Value::Null => {}
        Value::Object(map) => {
            for (name, v) in map {
                let value = text_or_base64(&format!("header `{name}`"), v, None)?;
                record = record.with_header(name, value);
            }
        }
        Value::Array(items) => {
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
                    return Err(
                        "a header must be [name, value] or [name, value, encoding]".to_string()
                    );
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
                let value =
                    text_or_base64(&format!("header `{name}`"), value, encoding.as_deref())?;
                record = record.with_header(name, value);
            }
        }
        other => return Err(format!("headers must be an object or a list, got {other}")),
    }
    if let Some(p) = r.partition {
        record = record.with_partition(p);
    }
    if let Some(k) = r.idempotency_key {
        record = record.with_idempotency_key(k);
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
            (br#"{"b":1, "a":2}"#, "text"), // not compact: kept as text
            (b"42", "json"),
            (b"1e5", "text"),
            (br#""quoted""#, "text"),
            (b"null", "text"),
            (b"", "text"),
            (b"\xff\x00binary", "base64"),
        ];
        for (value, encoding) in cases {
            let m = message(
                Some(b"\x01key"),
                value,
                vec![Header::new("h", &b"\xfe"[..]), Header::new("t", "text")],
            );
            let line = message_json(&m);
            assert_eq!(line["value_encoding"], encoding, "{line}");
            let back = parse_json_record(&line.to_string()).unwrap();
            assert_eq!(&back.value[..], value, "{line}");
            assert_eq!(back.key.as_deref(), Some(&b"\x01key"[..]));
            assert_eq!(back.headers, m.headers);
            assert_eq!(back.partition, Some(0));
        }
        let doc = message_json(&message(None, br#"{"a":1}"#, vec![]));
        assert_eq!(doc["value"]["a"], 1, "embedded as JSON, not a string");
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
