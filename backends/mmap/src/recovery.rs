//! The one torn-tail rule, shared by segment recovery, the state log's
//! replay and `verify` (fjall's `RecoveryMode::TolerateCorruptTail`).
//!
//! A log file (a segment, `state.log`) is a sequence of self-checking
//! frames (batches, state frames). When one does not check, the rule is:
//! it is a **torn tail** (a write the crash cut short, to be cut off) only
//! if no valid frame starts anywhere after it in the file; otherwise the
//! file is damaged before its tail and that is `ErrorKind::Corrupt`, naming
//! the file and the byte position. The checksums do not cover the length
//! fields, so a damaged length can make a middle frame look incomplete: a
//! torn write leaves a prefix of the last frame only, never a valid frame
//! after it.
//!
//! This module decides; it does no I/O (callers read the file and cut it,
//! or, in `verify`, only report).

use crate::format::DecodeError;
use crate::fs::corrupt;
use conveyor_core::Result;
use std::path::Path;

/// How the frame at the start of a slice checked.
pub(crate) enum Frame {
    /// A valid frame of this many bytes (already taken in by the caller).
    Valid(usize),
    /// Not a valid frame.
    Bad(DecodeError),
}

/// What [`tolerate_torn_tail`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Bytes of valid frames from the start of the file.
    pub valid_len: u64,
    /// Where a torn tail starts (`valid_len`), if there is one.
    pub torn_at: Option<u64>,
}

/// Walk `data` (the whole file at `path`) frame by frame with `frame`,
/// which checks the frame at the start of its slice (at byte `pos`), takes
/// it in and returns [`Frame::Valid`] with its length, or [`Frame::Bad`];
/// it may also fail outright (a valid frame in the wrong place is
/// `Corrupt` whatever follows). A bad frame is a torn tail only if no
/// frame that `is_valid` accepts starts after it at one of `magics`;
/// otherwise the result is `Corrupt` at its position.
pub(crate) fn tolerate_torn_tail(
    path: &Path,
    data: &[u8],
    magics: &[u32],
    mut frame: impl FnMut(u64, &[u8]) -> Result<Frame>,
    is_valid: impl Fn(&[u8]) -> bool,
) -> Result<Scanned> {
    let mut pos = 0usize;
    while let Some(rest) = data.get(pos..).filter(|r| !r.is_empty()) {
        match frame(pos as u64, rest)? {
            Frame::Valid(len) => pos += len.max(1),
            Frame::Bad(e) => {
                if valid_frame_follows(rest, magics, &is_valid) {
                    return Err(corrupt(
                        path,
                        pos as u64,
                        format!("{e}, and data follows it"),
                    ));
                }
                return Ok(Scanned {
                    valid_len: pos as u64,
                    torn_at: Some(pos as u64),
                });
            }
        }
    }
    Ok(Scanned {
        valid_len: pos.min(data.len()) as u64,
        torn_at: None,
    })
}

/// Whether a frame that `is_valid` accepts starts after byte 0 of `rest`,
/// at one of `magics`. (Runs only on the error path.)
fn valid_frame_follows(rest: &[u8], magics: &[u32], is_valid: &impl Fn(&[u8]) -> bool) -> bool {
    (1..rest.len()).any(|i| {
        let Some(tail) = rest.get(i..) else {
            return false;
        };
        magics
            .iter()
            .any(|m| tail.starts_with(&m.to_le_bytes()) && is_valid(tail))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of this toy format: magic 7, one length byte, payload.
    fn toy(pos: u64, rest: &[u8]) -> Result<Frame> {
        let _ = pos;
        Ok(match toy_len(rest) {
            Some(n) => Frame::Valid(n),
            None => Frame::Bad(DecodeError::Incomplete),
        })
    }

    fn toy_len(rest: &[u8]) -> Option<usize> {
        match rest {
            [7, 0, 0, 0, n, ..] if rest.len() >= 5 + *n as usize && *n > 0 => Some(5 + *n as usize),
            _ => None,
        }
    }

    fn scan(data: &[u8]) -> Result<Scanned> {
        tolerate_torn_tail(Path::new("f"), data, &[7], toy, |r| toy_len(r).is_some())
    }

    #[test]
    fn clean_file_has_no_tail() {
        let data = [7, 0, 0, 0, 1, 9, 7, 0, 0, 0, 2, 9, 9];
        assert_eq!(
            scan(&data).unwrap(),
            Scanned {
                valid_len: 13,
                torn_at: None
            }
        );
        assert_eq!(scan(&[]).unwrap().valid_len, 0);
    }

    #[test]
    fn bad_last_frame_is_torn() {
        let data = [7, 0, 0, 0, 1, 9, 7, 0, 0, 0, 5, 9];
        assert_eq!(scan(&data).unwrap().torn_at, Some(6));
        // Garbage that is not a frame, with no valid frame after it.
        let data = [7, 0, 0, 0, 1, 9, 0, 0, 0, 0];
        assert_eq!(scan(&data).unwrap().torn_at, Some(6));
    }

    #[test]
    fn bad_frame_followed_by_a_valid_one_is_corrupt() {
        // The middle frame's length is damaged (says 9): a valid frame
        // follows, so it is not a torn tail.
        let data = [7, 0, 0, 0, 1, 9, 7, 0, 0, 0, 9, 9, 7, 0, 0, 0, 1, 9];
        let e = scan(&data).unwrap_err();
        assert_eq!(e.kind(), conveyor_core::ErrorKind::Corrupt);
        assert!(e.message().starts_with("f: byte 6: "), "{e}");
    }
}
