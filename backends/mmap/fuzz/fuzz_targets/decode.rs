//! Fuzz target: conveyor-mmap's decoders on arbitrary bytes.
//!
//! Feeds the input to `decode_batch` (as a segment would hand it: a shared
//! buffer; both batch versions, `"CVB1"` and `"CVB2"` with delivery
//! times), `read_header`, `check_batch` and `decode_state_frame`, and
//! walks it as a segment and as a state log the way recovery does (batch
//! after batch while they decode). Any panic, overflow or out-of-bounds read is a
//! bug: the decoder must return `Ok` or `Err` for every input.
#![no_main]

use bytes::Bytes;
use conveyor_mmap::format::{check_batch, decode_batch, decode_state_frame, read_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let shared = Bytes::copy_from_slice(data);
    let _ = read_header(data);
    let _ = check_batch(data);
    if let Ok((header, records)) = decode_batch(&shared) {
        assert_eq!(header.count as usize, records.len());
        assert!(header.length as usize <= data.len());
        assert!(header.version == 1 || header.version == 2);
        if header.version == 1 {
            assert!(records.iter().all(|r| r.deliver_at.is_none()));
        }
    }
    // Walk as a segment: batch after batch.
    let mut pos = 0usize;
    while pos < data.len() {
        match decode_batch(&shared.slice(pos..)) {
            Ok((header, _)) => pos += header.length as usize,
            Err(_) => break,
        }
    }
    // Walk as a state log: frame after frame.
    let mut pos = 0usize;
    while pos < data.len() {
        match decode_state_frame(&data[pos..]) {
            Ok((_, len)) => {
                assert!(len > 0 && pos + len <= data.len());
                pos += len;
            }
            Err(_) => break,
        }
    }
});
