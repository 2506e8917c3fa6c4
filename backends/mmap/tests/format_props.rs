//! Property tests of the on-disk format ([`conveyor_mmap::format`]).
//!
//! Round trips: any batch of 1..50 records (keys, values, headers with
//! duplicate names, idempotency keys, delivery times, all optional parts
//! present or not)
//! and any state frame decode to exactly what was encoded. Robustness: the
//! decoders (`decode_batch`, `check_batch`, `read_header`,
//! `decode_state_frame`) return `Ok` or `Err` on arbitrary bytes, on valid
//! encodings with bytes flipped, inserted or cut, and never panic. The
//! same decoders are fuzzed by `backends/mmap/fuzz`.

use bytes::Bytes;
use conveyor_core::Header;
use conveyor_mmap::format::{
    check_batch, decode_batch, decode_state_frame, encode_batch, encode_state_frame, read_header,
    DecodeError, EncodeError, RecordData, BATCH_HEADER, BATCH_MAGIC_V1, BATCH_MAGIC_V2,
    STATE_HEADER, STATE_MAGIC,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn bytes_up_to(n: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=n).prop_map(Bytes::from)
}

fn header() -> impl Strategy<Value = Header> {
    // Few distinct names, so duplicates (which must keep their order) are
    // common.
    (
        prop_oneof![
            Just("a".to_string()),
            Just("trace-id".to_string()),
            Just(String::new()),
            ".{0,12}"
        ],
        bytes_up_to(24),
    )
        .prop_map(|(name, value)| Header { name, value })
}

fn record() -> impl Strategy<Value = RecordData> {
    (
        proptest::option::of(bytes_up_to(40)),
        prop_oneof![bytes_up_to(64), bytes_up_to(2048)],
        proptest::option::of(".{0,24}"),
        vec(header(), 0..5),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(key, value, idempotency_key, headers, deliver_at)| RecordData {
                key,
                value,
                idempotency_key,
                headers,
                deliver_at,
            },
        )
}

fn batch() -> impl Strategy<Value = (u64, u64, Vec<RecordData>)> {
    (any::<u64>(), any::<u64>(), vec(record(), 1..50))
}

fn state_changes() -> impl Strategy<Value = Vec<(String, Option<Bytes>)>> {
    vec((".{0,32}", proptest::option::of(bytes_up_to(64))), 0..20)
}

/// Run every decoder on `bytes`; they may fail, never panic. Returns
/// whether `decode_batch` accepted them, checking that an accepted batch
/// is self-consistent.
fn decode_everything(bytes: &[u8]) -> bool {
    let shared = Bytes::copy_from_slice(bytes);
    let _ = read_header(bytes);
    let _ = check_batch(bytes);
    if let Ok((changes, len)) = decode_state_frame(bytes) {
        assert!(len >= STATE_HEADER && len <= bytes.len());
        assert!(changes.len() <= len);
    }
    match decode_batch(&shared) {
        Ok((h, records)) => {
            assert_eq!(h.count as usize, records.len());
            assert!(h.length as usize <= bytes.len());
            assert_eq!(read_header(bytes), Ok(h));
            true
        }
        Err(_) => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any batch decodes to exactly the records, offsets and timestamp
    /// encoded, and its header agrees with `read_header` and `check_batch`.
    #[test]
    fn batch_round_trip((base, timestamp, records) in batch()) {
        let enc = encode_batch(base, timestamp, &records).expect("small batch encodes");
        let shared = Bytes::from(enc.clone());
        let (h, back) = decode_batch(&shared).expect("decodes");
        prop_assert_eq!(h.base_offset, base);
        prop_assert_eq!(h.timestamp, timestamp);
        prop_assert_eq!(h.count as usize, records.len());
        prop_assert_eq!(h.length as usize, enc.len());
        prop_assert_eq!(h.next_offset(), base.saturating_add(records.len() as u64));
        prop_assert_eq!(read_header(&enc), Ok(h));
        prop_assert_eq!(check_batch(&enc), Ok(h));
        prop_assert_eq!(&back, &records);
    }

    /// A version-1 batch (written by the tests' own v1 encoder, as stores
    /// written before delivery times hold them) decodes to its records
    /// with no delivery time; its header says version 1.
    #[test]
    fn version_1_batch_decodes((base, timestamp, records) in batch()) {
        let records: Vec<RecordData> = records
            .into_iter()
            .map(|r| RecordData { deliver_at: None, ..r })
            .collect();
        let enc = encode_v1(base, timestamp, &records);
        let (h, back) = decode_batch(&Bytes::from(enc.clone())).expect("v1 decodes");
        prop_assert_eq!(h.version, 1);
        prop_assert_eq!(h.length as usize, enc.len());
        prop_assert_eq!((h.base_offset, h.timestamp), (base, timestamp));
        prop_assert_eq!(back, records);
    }

    /// A batch followed by other bytes (the next batch of a segment)
    /// decodes the same: the decoder reads exactly `length` bytes.
    #[test]
    fn batch_in_a_segment_decodes_alone(
        (base, timestamp, records) in batch(),
        trailing in vec(any::<u8>(), 0..64),
    ) {
        let enc = encode_batch(base, timestamp, &records).expect("encodes");
        let mut segment = enc.clone();
        segment.extend_from_slice(&trailing);
        let (h, back) = decode_batch(&Bytes::from(segment)).expect("decodes");
        prop_assert_eq!(h.length as usize, enc.len());
        prop_assert_eq!(back, records);
    }

    /// Every strict prefix of a batch is refused as `Incomplete` (or
    /// `BadLength` when too short to hold a length): a torn write is
    /// always recognisable as one.
    #[test]
    fn every_prefix_of_a_batch_is_incomplete(
        (base, timestamp, records) in (any::<u64>(), any::<u64>(), vec(record(), 1..6)),
    ) {
        let enc = encode_batch(base, timestamp, &records).expect("encodes");
        for cut in 0..enc.len() {
            let e = decode_batch(&Bytes::copy_from_slice(&enc[..cut]))
                .expect_err("a prefix is not a batch");
            prop_assert!(
                matches!(e, DecodeError::Incomplete | DecodeError::BadLength),
                "cut at {}: {:?}", cut, e
            );
        }
    }

    /// Any state frame decodes to its changes, in order, and its length.
    #[test]
    fn state_frame_round_trip(changes in state_changes(), trailing in vec(any::<u8>(), 0..32)) {
        let enc = encode_state_frame(&changes).expect("small frame encodes");
        let (back, len) = decode_state_frame(&enc).expect("decodes");
        prop_assert_eq!(len, enc.len());
        prop_assert_eq!(&back, &changes);
        let mut followed = enc.clone();
        followed.extend_from_slice(&trailing);
        let (back, len) = decode_state_frame(&followed).expect("decodes when followed");
        prop_assert_eq!(len, enc.len());
        prop_assert_eq!(back, changes);
    }

    /// Every strict prefix of a state frame is refused.
    #[test]
    fn every_prefix_of_a_state_frame_is_refused(changes in state_changes()) {
        let enc = encode_state_frame(&changes).expect("small frame encodes");
        for cut in 0..enc.len() {
            prop_assert!(decode_state_frame(&enc[..cut]).is_err(), "cut at {}", cut);
        }
    }

    /// Arbitrary bytes: every decoder returns, none panics.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    /// Arbitrary bytes behind a valid magic number and a plausible length
    /// (so the decoders get past their first checks): none panics.
    #[test]
    fn arbitrary_bytes_behind_a_magic_never_panic(
        magic in prop_oneof![Just(BATCH_MAGIC_V1), Just(BATCH_MAGIC_V2), Just(STATE_MAGIC)],
        body in vec(any::<u8>(), 0..512),
        length_matches in any::<bool>(),
    ) {
        let mut bytes = Vec::with_capacity(body.len() + 8);
        bytes.extend_from_slice(&magic.to_le_bytes());
        let len = if length_matches { body.len() as u32 + 8 } else { body.len() as u32 / 2 + 8 };
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&body);
        if bytes.len() >= 12 {
            // A correct CRC, so the record parsers themselves are reached.
            let end = (len as usize).clamp(12, bytes.len());
            let crc = crc32c(&bytes[12..end]);
            bytes[8..12].copy_from_slice(&crc.to_le_bytes());
        }
        decode_everything(&bytes);
    }

    /// A valid batch with bytes flipped: refused (the CRC covers every
    /// byte after it; magic and length are checked), never a panic.
    #[test]
    fn mutated_batch_is_refused_without_panic(
        (base, timestamp, records) in (any::<u64>(), any::<u64>(), vec(record(), 1..8)),
        flips in vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let mut enc = encode_batch(base, timestamp, &records).expect("encodes");
        for (at, xor) in &flips {
            let i = at.index(enc.len());
            enc[i] ^= xor;
        }
        // Several flips could in theory cancel out; a flipped batch equal
        // to the original decodes, anything else must not.
        let original = encode_batch(base, timestamp, &records).expect("encodes");
        let accepted = decode_everything(&enc);
        prop_assert_eq!(accepted, enc == original);
    }

    /// A valid batch with its body re-checksummed after mutation (a writer
    /// bug rather than disk damage): the record parser alone must refuse
    /// or accept it, never panic, never read outside the batch.
    #[test]
    fn mutated_batch_with_fixed_crc_never_panics(
        (base, timestamp, records) in (any::<u64>(), any::<u64>(), vec(record(), 1..8)),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        insert in vec(any::<u8>(), 0..8),
    ) {
        let mut enc = encode_batch(base, timestamp, &records).expect("encodes");
        let body = enc.len() - BATCH_HEADER;
        for (at, v) in &flips {
            let i = BATCH_HEADER + at.index(body);
            enc[i] = *v;
        }
        let at = BATCH_HEADER + cut.index(body);
        enc.splice(at..at, insert.iter().copied());
        let len = enc.len() as u32;
        enc[4..8].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c(&enc[12..]);
        enc[8..12].copy_from_slice(&crc.to_le_bytes());
        decode_everything(&enc);
    }

    /// The same for state frames: flipped bytes are refused; re-checksummed
    /// mutations parse or fail, never panic.
    #[test]
    fn mutated_state_frame_never_panics(
        changes in state_changes(),
        flips in vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        fix_crc in any::<bool>(),
    ) {
        let original = encode_state_frame(&changes).expect("small frame encodes");
        let mut enc = original.clone();
        for (at, xor) in &flips {
            let i = at.index(enc.len());
            enc[i] ^= xor;
        }
        if fix_crc && enc.len() >= 12 {
            let crc = crc32c(&enc[12..]);
            enc[8..12].copy_from_slice(&crc.to_le_bytes());
        }
        let result = decode_state_frame(&enc);
        if !fix_crc && enc != original {
            prop_assert!(result.is_err(), "a damaged frame was accepted");
        }
        decode_everything(&enc);
    }
}

/// The version-1 batch layout, encoded independently of the crate (the
/// layout table of `format` before version 2).
fn encode_v1(base: u64, timestamp: u64, records: &[RecordData]) -> Vec<u8> {
    let mut b = Vec::new();
    let put32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
    put32(&mut b, BATCH_MAGIC_V1);
    put32(&mut b, 0);
    put32(&mut b, 0);
    put32(&mut b, records.len() as u32);
    b.extend_from_slice(&base.to_le_bytes());
    b.extend_from_slice(&timestamp.to_le_bytes());
    for r in records {
        match &r.key {
            Some(k) => {
                put32(&mut b, k.len() as u32);
                b.extend_from_slice(k);
            }
            None => put32(&mut b, u32::MAX),
        }
        put32(&mut b, r.value.len() as u32);
        b.extend_from_slice(&r.value);
        match &r.idempotency_key {
            Some(k) => {
                put32(&mut b, k.len() as u32);
                b.extend_from_slice(k.as_bytes());
            }
            None => put32(&mut b, u32::MAX),
        }
        put32(&mut b, r.headers.len() as u32);
        for h in &r.headers {
            put32(&mut b, h.name.len() as u32);
            b.extend_from_slice(h.name.as_bytes());
            put32(&mut b, h.value.len() as u32);
            b.extend_from_slice(&h.value);
        }
    }
    let len = b.len() as u32;
    b[4..8].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c(&b[12..]);
    b[8..12].copy_from_slice(&crc.to_le_bytes());
    b
}

/// CRC32C (Castagnoli), bitwise: the tests' own, independent of the crate
/// under test.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn own_crc32c_matches_the_standard_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn empty_batch_and_oversize_fields_are_refused() {
    assert_eq!(encode_batch(0, 0, &[]), Err(EncodeError::Empty));
    // A header claiming more records than could fit in its length.
    let mut enc = encode_batch(
        0,
        0,
        &[RecordData {
            key: None,
            value: Bytes::new(),
            idempotency_key: None,
            headers: vec![],
            deliver_at: None,
        }],
    )
    .unwrap();
    enc[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(read_header(&enc), Err(DecodeError::BadLength));
    // Lengths near u32::MAX inside a correctly checksummed body.
    for field in [0usize, 4, 8, 12] {
        let mut enc = encode_batch(
            0,
            0,
            &[RecordData {
                key: Some(Bytes::from_static(b"k")),
                value: Bytes::from_static(b"v"),
                idempotency_key: Some("i".into()),
                headers: vec![Header::new("h", "x")],
                deliver_at: None,
            }],
        )
        .unwrap();
        let at = BATCH_HEADER
            + match field {
                0 => 0,
                4 => 4 + 1,
                8 => 4 + 1 + 4 + 1,
                _ => 4 + 1 + 4 + 1 + 4 + 1,
            };
        enc[at..at + 4].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        let crc = crc32c(&enc[12..]);
        enc[8..12].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_batch(&Bytes::from(enc)).map(|_| ()),
            Err(DecodeError::BadRecords),
            "field at {field}"
        );
    }
}
