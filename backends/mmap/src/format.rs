//! The on-disk byte layout of segments and of the state log: encoding, and
//! a decoder that accepts arbitrary bytes and never panics (it is fuzzed,
//! and the module denies `clippy::indexing_slicing`: every read is a
//! checked `get`).
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
//! | 4 | magic | `0x32425643` (`"CVB2"` little-endian): format version 2, written now; `0x31425643` (`"CVB1"`): version 1, still read |
//! | 4 | length | bytes of the whole batch, header included |
//! | 4 | crc | CRC32C of bytes `12..length` |
//! | 4 | count | records in the batch (at least 1) |
//! | 8 | base offset | offset of the first record |
//! | 8 | timestamp | append time, ms since the epoch (all records) |
//!
//! then `count` records, each:
//!
//! | bytes | field | versions |
//! |---|---|---|
//! | 4 | key length, or `u32::MAX` for no key | 1, 2 |
//! | n | key | 1, 2 |
//! | 4 | value length | 1, 2 |
//! | n | value | 1, 2 |
//! | 4 | idempotency key length, or `u32::MAX` for none | 1, 2 |
//! | n | idempotency key (UTF-8) | 1, 2 |
//! | 4 | header count | 1, 2 |
//! | … | per header: name length (4), name (UTF-8), value length (4), value | 1, 2 |
//! | 1 | delivery time present: 0 no, 1 yes | 2 |
//! | 0 or 8 | delivery time, ms since the epoch (only if present) | 2 |
//!
//! A version-1 record has no delivery time (it reads back as `None`). One
//! segment may hold batches of both versions (a store written by version 1
//! and appended to by version 2); each batch says which it is.
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

/// Magic number of a version-1 batch (`"CVB1"`): read, no longer written.
pub const BATCH_MAGIC_V1: u32 = 0x3142_5643;
/// Magic number of a version-2 batch (`"CVB2"`): records carry a delivery
/// time.
pub const BATCH_MAGIC_V2: u32 = 0x3242_5643;
/// Magic number of the batches written now.
pub const BATCH_MAGIC: u32 = BATCH_MAGIC_V2;
/// Every batch magic the decoder accepts, oldest first.
pub const BATCH_MAGICS: [u32; 2] = [BATCH_MAGIC_V1, BATCH_MAGIC_V2];
/// Size of a batch header.
pub const BATCH_HEADER: usize = 32;
/// Magic number of a version-1 state frame.
pub const STATE_MAGIC: u32 = 0x3154_5343;
/// Size of a state frame header.
pub const STATE_HEADER: usize = 16;
const NONE: u32 = u32::MAX;
/// Bytes of the CRC's field and what precedes it: the CRC covers the rest.
const CRC_END: usize = 12;

/// One record of a batch, as stored: the engine's record, encoded as is
/// (no conversion on the append path).
pub type RecordData = conveyor_core::backend::StoredRecord;

/// A batch header, read without decoding records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Format version of the batch (1 or 2), from its magic number.
    pub version: u8,
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
    /// Wrong magic number (not a batch, or an unknown format version).
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

impl std::error::Error for DecodeError {}

/// Why records cannot be encoded as one batch or frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoding would pass the 4 GiB a length field can say (or a
    /// field's own 4 GiB).
    TooLarge {
        /// Bytes the encoding would take.
        bytes: usize,
    },
    /// A batch needs at least one record.
    Empty,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::TooLarge { bytes } => {
                write!(f, "{bytes} bytes do not fit in one batch (4 GiB at most)")
            }
            EncodeError::Empty => f.write_str("a batch needs at least one record"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// `N` bytes of `b` at `at`, if there are that many.
fn array_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    array_at(b, at).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    array_at(b, at).map(u64::from_le_bytes)
}

/// Write the length and the CRC of a batch or frame encoded in `b` (whose
/// length and CRC fields hold placeholders).
fn seal(b: &mut [u8]) {
    let len = (b.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c(b.get(CRC_END..).unwrap_or_default()).to_le_bytes();
    if let Some(field) = b.get_mut(4..8) {
        field.copy_from_slice(&len);
    }
    if let Some(field) = b.get_mut(8..CRC_END) {
        field.copy_from_slice(&crc);
    }
}

/// Smallest encoded record of a batch version (all lengths and counts,
/// nothing else).
fn min_record(version: u8) -> u64 {
    if version == 1 {
        16
    } else {
        17
    }
}

fn encoded_len(records: &[RecordData]) -> usize {
    BATCH_HEADER
        + records
            .iter()
            .map(|r| {
                min_record(2) as usize
                    + r.key.as_ref().map_or(0, |k| k.len())
                    + r.value.len()
                    + r.idempotency_key.as_ref().map_or(0, |k| k.len())
                    + r.headers
                        .iter()
                        .map(|h| 8 + h.name.len() + h.value.len())
                        .sum::<usize>()
                    + r.deliver_at.map_or(0, |_| 8)
            })
            .sum::<usize>()
}

/// Encode a batch (version 2). Fails if it has no records or would pass
/// 4 GiB.
pub fn encode_batch(
    base_offset: u64,
    timestamp: u64,
    records: &[RecordData],
) -> Result<Vec<u8>, EncodeError> {
    if records.is_empty() {
        return Err(EncodeError::Empty);
    }
    let len = encoded_len(records);
    if len > u32::MAX as usize {
        return Err(EncodeError::TooLarge { bytes: len });
    }
    let mut b: Vec<u8> = Vec::with_capacity(len);
    b.put_u32_le(BATCH_MAGIC_V2);
    b.put_u32_le(0); // length, filled by `seal`
    b.put_u32_le(0); // crc, filled by `seal`
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
        match r.deliver_at {
            Some(at) => {
                b.put_u8(1);
                b.put_u64_le(at);
            }
            None => b.put_u8(0),
        }
    }
    seal(&mut b);
    Ok(b)
}

/// Read and check a batch header at the start of `bytes` (no CRC check).
pub fn read_header(bytes: &[u8]) -> Result<BatchHeader, DecodeError> {
    let magic = u32_at(bytes, 0).ok_or(DecodeError::Incomplete)?;
    let version = match magic {
        BATCH_MAGIC_V1 => 1,
        BATCH_MAGIC_V2 => 2,
        _ if bytes.len() < BATCH_HEADER => return Err(DecodeError::Incomplete),
        _ => return Err(DecodeError::BadMagic),
    };
    let field32 = |at| u32_at(bytes, at).ok_or(DecodeError::Incomplete);
    let field64 = |at| u64_at(bytes, at).ok_or(DecodeError::Incomplete);
    let header = BatchHeader {
        version,
        length: field32(4)?,
        crc: field32(8)?,
        count: field32(12)?,
        base_offset: field64(16)?,
        timestamp: field64(24)?,
    };
    let room = (header.length as u64).checked_sub(BATCH_HEADER as u64);
    match room {
        Some(room) if header.count != 0 && header.count as u64 <= room / min_record(version) => {}
        _ => return Err(DecodeError::BadLength),
    }
    if bytes.len() < header.length as usize {
        return Err(DecodeError::Incomplete);
    }
    Ok(header)
}

/// Check a whole batch at the start of `bytes`: header, length and CRC.
pub fn check_batch(bytes: &[u8]) -> Result<BatchHeader, DecodeError> {
    let header = read_header(bytes)?;
    let body = bytes
        .get(CRC_END..header.length as usize)
        .ok_or(DecodeError::Incomplete)?;
    if crc32c::crc32c(body) != header.crc {
        return Err(DecodeError::BadChecksum);
    }
    Ok(header)
}

/// Decode the batch at the start of `data` (a shared buffer, e.g. a
/// mapped segment): header, CRC, then records whose keys, values and
/// header values are slices of `data` (no copy). Reads both versions.
pub fn decode_batch(data: &Bytes) -> Result<(BatchHeader, Vec<RecordData>), DecodeError> {
    decode_batch_from(data, 0, usize::MAX)
}

/// [`decode_batch`] for at most `max` records from offset `from` on (the
/// first returned is at `max(from, base_offset)`): the CRC still covers
/// the whole batch, the records before are stepped over (their lengths
/// checked, nothing allocated) and those after are not looked at. A small
/// read from a large batch then costs what it returns, not the batch.
pub fn decode_batch_from(
    data: &Bytes,
    from: u64,
    max: usize,
) -> Result<(BatchHeader, Vec<RecordData>), DecodeError> {
    let header = check_batch(data)?;
    let skip = usize::try_from(from.saturating_sub(header.base_offset)).unwrap_or(usize::MAX);
    let end = header.length as usize;
    let batch = data.get(..end).ok_or(DecodeError::Incomplete)?;
    let mut at = BATCH_HEADER;
    let stop = skip.saturating_add(max);
    let wanted = (header.count as usize).min(stop).saturating_sub(skip);
    let mut records = Vec::with_capacity(wanted.min(1 << 16));
    let take = |at: &mut usize, n: usize| -> Result<Bytes, DecodeError> {
        let stop = at.checked_add(n).ok_or(DecodeError::BadRecords)?;
        if stop > end {
            return Err(DecodeError::BadRecords);
        }
        let out = data.slice(*at..stop);
        *at = stop;
        Ok(out)
    };
    let fixed = |at: &mut usize| -> Result<[u8; 1], DecodeError> {
        let v = array_at(batch, *at).ok_or(DecodeError::BadRecords)?;
        *at += 1;
        Ok(v)
    };
    let len = |at: &mut usize| -> Result<u32, DecodeError> {
        let v = u32_at(batch, *at).ok_or(DecodeError::BadRecords)?;
        *at += 4;
        Ok(v)
    };
    let text = |b: Bytes| String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadRecords);
    let step = |at: &mut usize, n: usize| -> Result<(), DecodeError> {
        let stop = at.checked_add(n).ok_or(DecodeError::BadRecords)?;
        if stop > end {
            return Err(DecodeError::BadRecords);
        }
        *at = stop;
        Ok(())
    };
    for i in 0..header.count as usize {
        if i >= stop {
            return Ok((header, records)); // the rest is not wanted; the CRC covered it
        }
        if i < skip {
            // Step over: key, value, idempotency key, headers, delivery time.
            for optional in [true, false, true] {
                match len(&mut at)? {
                    NONE if optional => {}
                    n => step(&mut at, n as usize)?,
                }
            }
            let headers_n = len(&mut at)?;
            if headers_n as usize > end.saturating_sub(at) / 8 {
                return Err(DecodeError::BadRecords);
            }
            for _ in 0..headers_n {
                let n = len(&mut at)?;
                step(&mut at, n as usize)?;
                let n = len(&mut at)?;
                step(&mut at, n as usize)?;
            }
            if header.version != 1 {
                match fixed(&mut at)? {
                    [0] => {}
                    [1] => step(&mut at, 8)?,
                    _ => return Err(DecodeError::BadRecords),
                }
            }
            continue;
        }
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
        if headers_n as usize > end.saturating_sub(at) / 8 {
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
        let deliver_at = if header.version == 1 {
            None
        } else {
            match fixed(&mut at)? {
                [0] => None,
                [1] => {
                    let v = u64_at(batch, at).ok_or(DecodeError::BadRecords)?;
                    at += 8;
                    Some(v)
                }
                _ => return Err(DecodeError::BadRecords),
            }
        };
        records.push(RecordData {
            key,
            value,
            idempotency_key,
            headers,
            deliver_at,
        });
    }
    if at != end {
        return Err(DecodeError::BadRecords);
    }
    Ok((header, records))
}

/// Encode one state frame (one atomic `put_state`). Fails only past 4 GiB.
pub fn encode_state_frame(changes: &[(String, Option<Bytes>)]) -> Result<Vec<u8>, EncodeError> {
    let len = STATE_HEADER
        + changes
            .iter()
            .map(|(k, v)| 5 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
            .sum::<usize>();
    if len > u32::MAX as usize {
        return Err(EncodeError::TooLarge { bytes: len });
    }
    let mut b = BytesMut::with_capacity(len);
    b.put_u32_le(STATE_MAGIC);
    b.put_u32_le(0); // length, filled by `seal`
    b.put_u32_le(0); // crc, filled by `seal`
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
    seal(&mut b);
    Ok(b.to_vec())
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
    let frame = bytes.get(..length).ok_or(DecodeError::Incomplete)?;
    let crc = u32_at(frame, 8).ok_or(DecodeError::Incomplete)?;
    if crc32c::crc32c(frame.get(CRC_END..).unwrap_or_default()) != crc {
        return Err(DecodeError::BadChecksum);
    }
    let count = u32_at(frame, 12).ok_or(DecodeError::Incomplete)?;
    let mut at = STATE_HEADER;
    let mut out = Vec::new();
    let take = |at: &mut usize, n: usize| -> Result<&[u8], DecodeError> {
        let stop = at.checked_add(n).ok_or(DecodeError::BadRecords)?;
        let s = frame.get(*at..stop).ok_or(DecodeError::BadRecords)?;
        *at = stop;
        Ok(s)
    };
    let len = |at: &mut usize| -> Result<usize, DecodeError> {
        let v = u32_at(frame, *at).ok_or(DecodeError::BadRecords)?;
        *at += 4;
        Ok(v as usize)
    };
    for _ in 0..count {
        let n = len(&mut at)?;
        let key = std::str::from_utf8(take(&mut at, n)?)
            .map_err(|_| DecodeError::BadRecords)?
            .to_string();
        let value = match take(&mut at, 1)? {
            [0] => None,
            [1] => {
                let n = len(&mut at)?;
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
#[allow(clippy::indexing_slicing)]
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
                deliver_at: Some(1_700_000_123_456),
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
    fn a_range_of_a_batch_decodes_as_that_slice_of_the_whole() {
        let mut records = Vec::new();
        for _ in 0..4 {
            records.extend(sample());
        }
        let enc = Bytes::from(encode_batch(100, 7, &records).unwrap());
        for from in [0, 99, 100, 101, 103, 107, 108, 500] {
            for max in [0, 1, 2, 3, 8, usize::MAX] {
                let (h, got) = decode_batch_from(&enc, from, max).unwrap();
                assert_eq!(h.count, 8);
                let skip = (from.saturating_sub(100) as usize).min(8);
                let want: Vec<RecordData> = records.iter().skip(skip).take(max).cloned().collect();
                assert_eq!(got, want, "from {from} max {max}");
            }
        }
    }

    #[test]
    fn empty_batch_is_an_encode_error() {
        assert_eq!(encode_batch(0, 0, &[]), Err(EncodeError::Empty));
    }

    /// A segment written by version 1 (from the committed fixture) still
    /// decodes: version 1, no delivery times.
    #[test]
    fn version_1_batches_decode() {
        let seg = Bytes::from_static(include_bytes!(
            "../tests/fixtures/v1/topics/orders/0/00000000000000000000.log"
        ));
        let mut pos = 0;
        let mut records = 0;
        while pos < seg.len() {
            let (h, recs) = decode_batch(&seg.slice(pos..)).unwrap();
            assert_eq!(h.version, 1);
            assert_eq!(h.base_offset, records as u64);
            assert!(recs.iter().all(|r| r.deliver_at.is_none()));
            records += recs.len();
            pos += h.length as usize;
        }
        assert_eq!(records, 6);
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
        let enc = encode_state_frame(&changes).unwrap();
        let (back, len) = decode_state_frame(&enc).unwrap();
        assert_eq!(back, changes);
        assert_eq!(len, enc.len());
    }
}
