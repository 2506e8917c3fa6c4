//! The on-disk byte layout of segments and of the state log: encoding, and
//! a decoder that accepts arbitrary bytes and never panics (it is fuzzed).
//!
//! This module owns the format; it does no I/O.
//!
//! # Segment files
//!
//! A partition directory holds segment files named by the offset of their
//! first record, zero-padded to 20 digits (`00000000000000001024.log`).
//! A segment is a sequence of batches, each written by one `append`:
//!
//! | bytes | field | |
//! |---|---|---|
//! | 4 | magic | `0x31425643` (`"CVB1"` little-endian): format version 1 |
//! | 4 | length | bytes of the whole batch, header included |
//! | 4 | crc | CRC32C of bytes `12..length` |
//! | 4 | count | records in the batch (at least 1) |
//! | 8 | base offset | offset of the first record |
//! | 8 | timestamp | append time, ms since the epoch (all records) |
//!
//! then `count` records, each:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | key length, or `u32::MAX` for no key |
//! | n | key |
//! | 4 | value length |
//! | n | value |
//! | 4 | idempotency key length, or `u32::MAX` for none |
//! | n | idempotency key (UTF-8) |
//! | 4 | header count |
//! | … | per header: name length (4), name (UTF-8), value length (4), value |
//!
//! All integers are little-endian. Record offsets are `base offset + i`.
//!
//! # State log
//!
//! `state.log` is a sequence of frames, each one atomic `put_state` call:
//! magic `0x31545343` (`"CST1"`), length (4, whole frame), CRC32C (4) of
//! bytes `12..length`, entry count (4), then per entry: key length (4),
//! key (UTF-8), kind (1: 0 delete, 1 put), and for puts value length (4)
//! and value.

use bytes::{BufMut, Bytes, BytesMut};
use conveyor_core::Header;

/// Magic number of a version-1 batch.
pub const BATCH_MAGIC: u32 = 0x3142_5643;
/// Size of a batch header.
pub const BATCH_HEADER: usize = 32;
/// Magic number of a version-1 state frame.
pub const STATE_MAGIC: u32 = 0x3154_5343;
/// Size of a state frame header.
pub const STATE_HEADER: usize = 16;
const NONE: u32 = u32::MAX;

/// One record of a batch, as stored: the engine's record, encoded as is
/// (no conversion on the append path).
pub type RecordData = conveyor_core::backend::StoredRecord;

/// A batch header, read without decoding records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Bytes of the whole batch.
    pub length: u32,
    /// Stored CRC32C.
    pub crc: u32,
    /// Records in the batch.
    pub count: u32,
    /// First offset.
    pub base_offset: u64,
    /// Append time.
    pub timestamp: u64,
}

impl BatchHeader {
    /// Offset after the batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset.saturating_add(self.count as u64)
    }
}

/// Why bytes are not a valid batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the header or the declared length: a torn write if
    /// at the end of a file.
    Incomplete,
    /// Wrong magic number (not a batch, or another format version).
    BadMagic,
    /// The length field is impossible.
    BadLength,
    /// The CRC does not match the bytes.
    BadChecksum,
    /// The CRC matched but the records do not parse (a writer bug).
    BadRecords,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecodeError::Incomplete => "incomplete batch",
            DecodeError::BadMagic => "bad magic number",
            DecodeError::BadLength => "impossible batch length",
            DecodeError::BadChecksum => "checksum mismatch",
            DecodeError::BadRecords => "records do not parse",
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

fn encoded_len(records: &[RecordData]) -> usize {
    BATCH_HEADER
        + records
            .iter()
            .map(|r| {
                16 + r.key.as_ref().map_or(0, |k| k.len())
                    + r.value.len()
                    + r.idempotency_key.as_ref().map_or(0, |k| k.len())
                    + r.headers
                        .iter()
                        .map(|h| 8 + h.name.len() + h.value.len())
                        .sum::<usize>()
            })
            .sum::<usize>()
}

/// Encode a batch. Fails only if it would exceed 4 GiB.
pub fn encode_batch(
    base_offset: u64,
    timestamp: u64,
    records: &[RecordData],
) -> Result<Vec<u8>, DecodeError> {
    let len = encoded_len(records);
    if len > u32::MAX as usize || records.is_empty() || records.len() > u32::MAX as usize {
        return Err(DecodeError::BadLength);
    }
    let mut b: Vec<u8> = Vec::with_capacity(len);
    b.put_u32_le(BATCH_MAGIC);
    b.put_u32_le(len as u32);
    b.put_u32_le(0); // crc, filled below
    b.put_u32_le(records.len() as u32);
    b.put_u64_le(base_offset);
    b.put_u64_le(timestamp);
    for r in records {
        match &r.key {
            Some(k) => {
                b.put_u32_le(k.len() as u32);
                b.put_slice(k);
            }
            None => b.put_u32_le(NONE),
        }
        b.put_u32_le(r.value.len() as u32);
        b.put_slice(&r.value);
        match &r.idempotency_key {
            Some(k) => {
                b.put_u32_le(k.len() as u32);
                b.put_slice(k.as_bytes());
            }
            None => b.put_u32_le(NONE),
        }
        b.put_u32_le(r.headers.len() as u32);
        for h in &r.headers {
            b.put_u32_le(h.name.len() as u32);
            b.put_slice(h.name.as_bytes());
            b.put_u32_le(h.value.len() as u32);
            b.put_slice(&h.value);
        }
    }
    let crc = crc32c::crc32c(&b[12..]);
    b[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// Read and check a batch header at the start of `bytes` (no CRC check).
pub fn read_header(bytes: &[u8]) -> Result<BatchHeader, DecodeError> {
    let magic = u32_at(bytes, 0).ok_or(DecodeError::Incomplete)?;
    if magic != BATCH_MAGIC {
        return Err(if bytes.len() < BATCH_HEADER {
            DecodeError::Incomplete
        } else {
            DecodeError::BadMagic
        });
    }
    if bytes.len() < BATCH_HEADER {
        return Err(DecodeError::Incomplete);
    }
    let header = BatchHeader {
        length: u32_at(bytes, 4).expect("checked"),
        crc: u32_at(bytes, 8).expect("checked"),
        count: u32_at(bytes, 12).expect("checked"),
        base_offset: u64_at(bytes, 16).expect("checked"),
        timestamp: u64_at(bytes, 24).expect("checked"),
    };
    if (header.length as usize) < BATCH_HEADER + 16 || header.count == 0 {
        return Err(DecodeError::BadLength);
    }
    if header.count as u64 > (header.length as u64 - BATCH_HEADER as u64) / 16 {
        return Err(DecodeError::BadLength);
    }
    if bytes.len() < header.length as usize {
        return Err(DecodeError::Incomplete);
    }
    Ok(header)
}

/// Check a whole batch at the start of `bytes`: header, length and CRC.
pub fn check_batch(bytes: &[u8]) -> Result<BatchHeader, DecodeError> {
    let header = read_header(bytes)?;
    let body = &bytes[12..header.length as usize];
    if crc32c::crc32c(body) != header.crc {
        return Err(DecodeError::BadChecksum);
    }
    Ok(header)
}

/// Decode the batch at the start of `data` (a shared buffer, e.g. a
/// mapped segment): header, CRC, then records whose keys, values and
/// header values are slices of `data` (no copy).
pub fn decode_batch(data: &Bytes) -> Result<(BatchHeader, Vec<RecordData>), DecodeError> {
    let header = check_batch(data)?;
    let end = header.length as usize;
    let mut at = BATCH_HEADER;
    let mut records = Vec::with_capacity(header.count.min(1 << 16) as usize);
    let take = |at: &mut usize, n: usize| -> Result<Bytes, DecodeError> {
        let stop = at.checked_add(n).ok_or(DecodeError::BadRecords)?;
        if stop > end {
            return Err(DecodeError::BadRecords);
        }
        let out = data.slice(*at..stop);
        *at = stop;
        Ok(out)
    };
    let len = |at: &mut usize| -> Result<u32, DecodeError> {
        let v = u32_at(&data[..end], *at).ok_or(DecodeError::BadRecords)?;
        *at += 4;
        Ok(v)
    };
    let text = |b: Bytes| String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadRecords);
    for _ in 0..header.count {
        let key = match len(&mut at)? {
            NONE => None,
            n => Some(take(&mut at, n as usize)?),
        };
        let n = len(&mut at)?;
        let value = take(&mut at, n as usize)?;
        let idempotency_key = match len(&mut at)? {
            NONE => None,
            n => Some(text(take(&mut at, n as usize)?)?),
        };
        let headers_n = len(&mut at)?;
        if headers_n as usize > (end - at) / 8 {
            return Err(DecodeError::BadRecords);
        }
        let mut headers = Vec::with_capacity(headers_n as usize);
        for _ in 0..headers_n {
            let n = len(&mut at)?;
            let name = text(take(&mut at, n as usize)?)?;
            let n = len(&mut at)?;
            headers.push(Header {
                name,
                value: take(&mut at, n as usize)?,
            });
        }
        records.push(RecordData {
            key,
            value,
            idempotency_key,
            headers,
            deliver_at: None,
        });
    }
    if at != end {
        return Err(DecodeError::BadRecords);
    }
    Ok((header, records))
}

/// Encode one state frame (one atomic `put_state`).
pub fn encode_state_frame(changes: &[(String, Option<Bytes>)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32_le(STATE_MAGIC);
    b.put_u32_le(0);
    b.put_u32_le(0);
    b.put_u32_le(changes.len() as u32);
    for (k, v) in changes {
        b.put_u32_le(k.len() as u32);
        b.put_slice(k.as_bytes());
        match v {
            Some(v) => {
                b.put_u8(1);
                b.put_u32_le(v.len() as u32);
                b.put_slice(v);
            }
            None => b.put_u8(0),
        }
    }
    let len = b.len() as u32;
    b[4..8].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&b[12..]);
    b[8..12].copy_from_slice(&crc.to_le_bytes());
    b.to_vec()
}

/// A state frame's changes, in order.
pub type StateChanges = Vec<(String, Option<Bytes>)>;

/// Decode the state frame at the start of `bytes`; returns its changes and
/// its length.
pub fn decode_state_frame(bytes: &[u8]) -> Result<(StateChanges, usize), DecodeError> {
    let magic = u32_at(bytes, 0).ok_or(DecodeError::Incomplete)?;
    if magic != STATE_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let length = u32_at(bytes, 4).ok_or(DecodeError::Incomplete)? as usize;
    if length < STATE_HEADER {
        return Err(DecodeError::BadLength);
    }
    if bytes.len() < length {
        return Err(DecodeError::Incomplete);
    }
    let crc = u32_at(bytes, 8).expect("checked");
    if crc32c::crc32c(&bytes[12..length]) != crc {
        return Err(DecodeError::BadChecksum);
    }
    let frame = &bytes[..length];
    let count = u32_at(frame, 12).expect("checked");
    let mut at = STATE_HEADER;
    let mut out = Vec::new();
    let take = |at: &mut usize, n: usize| -> Result<&[u8], DecodeError> {
        let stop = at.checked_add(n).ok_or(DecodeError::BadRecords)?;
        let s = frame.get(*at..stop).ok_or(DecodeError::BadRecords)?;
        *at = stop;
        Ok(s)
    };
    for _ in 0..count {
        let n = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4")) as usize;
        let key = std::str::from_utf8(take(&mut at, n)?)
            .map_err(|_| DecodeError::BadRecords)?
            .to_string();
        let kind = take(&mut at, 1)?[0];
        let value = match kind {
            0 => None,
            1 => {
                let n = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4")) as usize;
                Some(Bytes::copy_from_slice(take(&mut at, n)?))
            }
            _ => return Err(DecodeError::BadRecords),
        };
        out.push((key, value));
    }
    if at != length {
        return Err(DecodeError::BadRecords);
    }
    Ok((out, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<RecordData> {
        vec![
            RecordData {
                key: Some(Bytes::from_static(b"k")),
                value: Bytes::from_static(b""),
                idempotency_key: Some("evt-1".into()),
                headers: vec![
                    Header::new("a", Bytes::from_static(&[0, 255])),
                    Header::new("a", "2"),
                ],
                deliver_at: None,
            },
            RecordData {
                key: None,
                value: Bytes::from(vec![9u8; 1000]),
                idempotency_key: None,
                headers: vec![],
                deliver_at: None,
            },
        ]
    }

    #[test]
    fn batch_round_trip() {
        let enc = Bytes::from(encode_batch(42, 7, &sample()).unwrap());
        let (h, recs) = decode_batch(&enc).unwrap();
        assert_eq!((h.base_offset, h.timestamp, h.count), (42, 7, 2));
        assert_eq!(h.length as usize, enc.len());
        assert_eq!(recs, sample());
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_flip_is_caught() {
        let enc = encode_batch(0, 1, &sample()).unwrap();
        for cut in 0..enc.len() {
            let e = decode_batch(&Bytes::copy_from_slice(&enc[..cut])).unwrap_err();
            assert!(
                matches!(e, DecodeError::Incomplete | DecodeError::BadLength),
                "cut at {cut}: {e:?}"
            );
        }
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x40;
            assert!(decode_batch(&Bytes::from(bad)).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn state_frame_round_trip() {
        let changes = vec![
            ("t/orders".to_string(), Some(Bytes::from_static(b"{}"))),
            ("c/g/orders/0".to_string(), None),
        ];
        let enc = encode_state_frame(&changes);
        let (back, len) = decode_state_frame(&enc).unwrap();
        assert_eq!(back, changes);
        assert_eq!(len, enc.len());
    }
}
