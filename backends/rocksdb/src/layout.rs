//! The key and value layout of the store: how a record, a partition's
//! bounds and a topic's id become RocksDB keys and values, and back.
//!
//! This module owns bytes only; it opens nothing and knows no locks. The
//! layout is described for users in the crate docs (`# Key layout`); this
//! is its one implementation.

use bytes::{Buf, Bytes};
use conveyor_core::backend::{StoredMessage, StoredRecord};
use conveyor_core::{Error, ErrorKind, Header, Result};

/// Column family of the partition logs.
pub(crate) const CF_RECORDS: &str = "records";
/// Column family of the engine's state (group offsets, leases, dedup, topic configs).
pub(crate) const CF_STATE: &str = "state";
/// Column family of the storage's own metadata (topic ids, partition bounds).
pub(crate) const CF_META: &str = "meta";

/// Meta key holding the layout version.
pub(crate) const META_FORMAT: &[u8] = b"format";
/// The layout version this build writes and reads: magic + version.
pub(crate) const FORMAT: &[u8] = b"CVR1";
/// Meta key holding the next topic id to assign (u32 big-endian).
pub(crate) const META_NEXT_TOPIC_ID: &[u8] = b"next_topic_id";

/// A record's key: topic id, partition, offset, all big-endian, so one
/// partition is one ordered key range and offsets sort numerically.
pub(crate) fn record_key(topic_id: u32, partition: u32, offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&topic_id.to_be_bytes());
    k[4..8].copy_from_slice(&partition.to_be_bytes());
    k[8..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// The offset in a record key of the expected partition, or `None` if the
/// key is not one.
pub(crate) fn record_key_offset(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    (key.len() == 16).then(|| u64::from_be_bytes(tail))
}

/// Meta key mapping a topic name to its id: `t` + name.
pub(crate) fn topic_id_key(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + topic.len());
    k.push(b't');
    k.extend_from_slice(topic.as_bytes());
    k
}

/// Meta key of a partition's bounds: `p` + topic id + partition (big-endian).
pub(crate) fn partition_meta_key(topic_id: u32, partition: u32) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'p';
    k[1..5].copy_from_slice(&topic_id.to_be_bytes());
    k[5..].copy_from_slice(&partition.to_be_bytes());
    k
}

/// What a partition's meta value holds: written in the same batch as every
/// append and every retention step, so it is never behind the records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PartitionMeta {
    /// First retained offset.
    pub log_start: u64,
    /// Next offset.
    pub log_end: u64,
    /// Bytes of the retained records (keys + values as stored).
    pub bytes: u64,
    /// Timestamp of the last append (timestamps never go back).
    pub last_timestamp: u64,
}

impl PartitionMeta {
    pub(crate) fn encode(&self) -> [u8; 32] {
        let mut v = [0u8; 32];
        v[..8].copy_from_slice(&self.log_start.to_le_bytes());
        v[8..16].copy_from_slice(&self.log_end.to_le_bytes());
        v[16..24].copy_from_slice(&self.bytes.to_le_bytes());
        v[24..].copy_from_slice(&self.last_timestamp.to_le_bytes());
        v
    }

    pub(crate) fn decode(mut v: &[u8]) -> Option<PartitionMeta> {
        if v.len() != 32 {
            return None;
        }
        Some(PartitionMeta {
            log_start: v.get_u64_le(),
            log_end: v.get_u64_le(),
            bytes: v.get_u64_le(),
            last_timestamp: v.get_u64_le(),
        })
    }
}

const HAS_KEY: u8 = 1;
const HAS_IDEMPOTENCY_KEY: u8 = 2;
const HAS_DELIVER_AT: u8 = 4;
const RECORD_VERSION: u8 = 1;

/// Encode a record as a value: version byte, timestamp (u64 LE), flags,
/// then the optional delivery time (u64 LE), key and idempotency key
/// (u32 LE length + bytes), the header count (u32 LE) and each header
/// (name and value, u32 LE length + bytes), and the value to the end.
pub(crate) fn encode_record(r: &StoredRecord, timestamp: u64, out: &mut Vec<u8>) {
    fn field(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    out.clear();
    out.push(RECORD_VERSION);
    out.extend_from_slice(&timestamp.to_le_bytes());
    let mut flags = 0;
    if r.key.is_some() {
        flags |= HAS_KEY;
    }
    if r.idempotency_key.is_some() {
        flags |= HAS_IDEMPOTENCY_KEY;
    }
    if r.deliver_at.is_some() {
        flags |= HAS_DELIVER_AT;
    }
    out.push(flags);
    if let Some(at) = r.deliver_at {
        out.extend_from_slice(&at.to_le_bytes());
    }
    if let Some(k) = &r.key {
        field(out, k);
    }
    if let Some(k) = &r.idempotency_key {
        field(out, k.as_bytes());
    }
    out.extend_from_slice(&(r.headers.len() as u32).to_le_bytes());
    for h in &r.headers {
        field(out, h.name.as_bytes());
        field(out, &h.value);
    }
    out.extend_from_slice(&r.value);
}

/// The timestamp of an encoded record (cheap: no allocation).
pub(crate) fn record_timestamp(v: &[u8]) -> Option<u64> {
    match v.split_first() {
        Some((&RECORD_VERSION, rest)) => Some(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}

/// Decode a record value (one buffer; key, value and headers are slices
/// of it). `at` names the record in the `Corrupt` error.
pub(crate) fn decode_record(
    offset: u64,
    v: Bytes,
    at: impl Fn() -> String,
) -> Result<StoredMessage> {
    decode_inner(offset, v).ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: record undecodable (layout {})",
                at(),
                String::from_utf8_lossy(FORMAT)
            ),
        )
    })
}

fn decode_inner(offset: u64, mut v: Bytes) -> Option<StoredMessage> {
    fn take(v: &mut Bytes, n: usize) -> Option<Bytes> {
        (v.len() >= n).then(|| v.split_to(n))
    }
    fn u32_le(v: &mut Bytes) -> Option<u32> {
        (v.len() >= 4).then(|| v.get_u32_le())
    }
    fn u64_le(v: &mut Bytes) -> Option<u64> {
        (v.len() >= 8).then(|| v.get_u64_le())
    }
    fn field(v: &mut Bytes) -> Option<Bytes> {
        let n = u32_le(v)? as usize;
        take(v, n)
    }
    fn string(v: &mut Bytes) -> Option<String> {
        String::from_utf8(field(v)?.to_vec()).ok()
    }
    if take(&mut v, 1)?.first() != Some(&RECORD_VERSION) {
        return None;
    }
    let timestamp = u64_le(&mut v)?;
    let flags = take(&mut v, 1)?.first().copied()?;
    let deliver_at = if flags & HAS_DELIVER_AT != 0 {
        Some(u64_le(&mut v)?)
    } else {
        None
    };
    let key = if flags & HAS_KEY != 0 {
        Some(field(&mut v)?)
    } else {
        None
    };
    let idempotency_key = if flags & HAS_IDEMPOTENCY_KEY != 0 {
        Some(string(&mut v)?)
    } else {
        None
    };
    let count = u32_le(&mut v)? as usize;
    let mut headers = Vec::with_capacity(count.min(v.len() / 8));
    for _ in 0..count {
        let name = string(&mut v)?;
        let value = field(&mut v)?;
        headers.push(Header { name, value });
    }
    Some(StoredMessage {
        offset,
        timestamp,
        key,
        value: v,
        headers,
        idempotency_key,
        deliver_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_byte_for_byte() {
        let r = StoredRecord {
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from_static(b"value"),
            headers: vec![
                Header::new("a", Bytes::from_static(b"1")),
                Header::new("a", Bytes::new()),
            ],
            idempotency_key: Some("id-1".into()),
            deliver_at: Some(42),
        };
        let mut buf = Vec::new();
        encode_record(&r, 7, &mut buf);
        assert_eq!(record_timestamp(&buf), Some(7));
        let m = decode_record(3, Bytes::from(buf.clone()), String::new).unwrap();
        assert_eq!((m.offset, m.timestamp), (3, 7));
        assert_eq!((m.key, m.value, m.headers), (r.key, r.value, r.headers));
        assert_eq!(
            (m.idempotency_key, m.deliver_at),
            (r.idempotency_key, r.deliver_at)
        );
        // Every truncation is refused, never a panic.
        for n in 0..buf.len() - r_value_len() {
            assert!(decode_record(0, Bytes::copy_from_slice(&buf[..n]), String::new).is_err());
        }
    }

    fn r_value_len() -> usize {
        b"value".len()
    }

    #[test]
    fn keys_sort_by_offset_within_a_partition() {
        let a = record_key(1, 2, 255);
        let b = record_key(1, 2, 256);
        assert!(a < b);
        assert!(record_key(1, 2, u64::MAX) < record_key(1, 3, 0));
        assert_eq!(record_key_offset(&b), Some(256));
        let m = PartitionMeta {
            log_start: 1,
            log_end: 2,
            bytes: 3,
            last_timestamp: 4,
        };
        assert_eq!(PartitionMeta::decode(&m.encode()), Some(m));
    }
}
