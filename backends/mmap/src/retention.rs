//! Which records retention removes from the head of a partition: a pure
//! decision (iggy's `is_expired`), taken under the partition's lock and
//! carried out off it (the new log start persisted, then whole segments
//! below it unlinked, on the blocking pool).
//!
//! Knows segment spans and the retention config; reads no file (the one
//! lookup it needs, the first record at or after a time, is handed in).

use conveyor_core::{Result, Retention};

/// A segment as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentSpan {
    /// Offset of its first record.
    pub base: u64,
    /// Bytes it takes.
    pub len: u64,
    /// Offset after its last record.
    pub next_offset: u64,
}

/// What a retention pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetentionPlan {
    /// The log start after the pass (never below the current one).
    pub log_start: u64,
    /// Base offsets of the sealed segments wholly below it, to delete.
    pub doomed: Vec<u64>,
}

impl RetentionPlan {
    /// Whether the pass changes nothing.
    pub fn is_noop(&self, log_start: u64) -> bool {
        self.log_start == log_start && self.doomed.is_empty()
    }
}

/// Plan a retention pass at `now_ms` over `segments` (oldest first; the
/// last is the active segment, which is never deleted) of a partition
/// whose log start is `log_start`.
///
/// - By age: records older than `now_ms - max_age` go; the log start moves
///   to `first_at_or_after(cutoff)`, the first record with timestamp >=
///   the cutoff (or the log end), so a record exactly at the cutoff stays
///   and a zero age removes everything appended before `now_ms`.
/// - By bytes: the oldest sealed segments go while the partition is above
///   `max_bytes` (whole segments: the active one stays, however large).
/// - The log start only moves forward; doomed segments are the sealed
///   ones that end at or below it.
pub(crate) fn retention_plan(
    segments: &[SegmentSpan],
    log_start: u64,
    retention: &Retention,
    now_ms: u64,
    first_at_or_after: impl FnOnce(u64) -> Result<u64>,
) -> Result<RetentionPlan> {
    let mut start = log_start;
    if let Some(age) = retention.max_age {
        let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(age_ms);
        start = start.max(first_at_or_after(cutoff)?);
    }
    let sealed = segments.split_last().map_or(&[][..], |(_, sealed)| sealed);
    if let Some(max) = retention.max_bytes {
        let mut total: u64 = segments.iter().map(|s| s.len).sum();
        for s in sealed {
            if total <= max {
                break;
            }
            total -= s.len;
            start = start.max(s.next_offset);
        }
    }
    let doomed = sealed
        .iter()
        .filter(|s| s.next_offset <= start)
        .map(|s| s.base)
        .collect();
    Ok(RetentionPlan {
        log_start: start,
        doomed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Three segments of 100 bytes: offsets 0..10, 10..20, 20..25 (active).
    fn segments() -> Vec<SegmentSpan> {
        vec![
            SegmentSpan {
                base: 0,
                len: 100,
                next_offset: 10,
            },
            SegmentSpan {
                base: 10,
                len: 100,
                next_offset: 20,
            },
            SegmentSpan {
                base: 20,
                len: 100,
                next_offset: 25,
            },
        ]
    }

    /// Record `o` was appended at time `1000 + 10 * o`; the lookup finds
    /// the first record at or after a time (or the log end, 25).
    fn lookup(cutoff: u64) -> Result<u64> {
        Ok((0..25).find(|o| 1000 + 10 * o >= cutoff).unwrap_or(25))
    }

    fn by_age(ms: u64) -> Retention {
        Retention::default().with_max_age(Duration::from_millis(ms))
    }

    fn plan(segments: &[SegmentSpan], retention: &Retention, now: u64) -> RetentionPlan {
        retention_plan(segments, 0, retention, now, lookup).unwrap()
    }

    #[test]
    fn no_retention_keeps_everything() {
        let p = plan(&segments(), &Retention::default(), u64::MAX);
        assert_eq!((p.log_start, p.doomed), (0, vec![]));
        assert!(plan(&segments(), &Retention::default(), 0).is_noop(0));
    }

    #[test]
    fn zero_age_removes_everything_before_now_but_never_the_active_segment() {
        // now = time of offset 24 + 1: every record is older.
        let p = plan(&segments(), &by_age(0), 1000 + 10 * 24 + 1);
        assert_eq!(p.log_start, 25, "log start moves to the log end");
        assert_eq!(p.doomed, vec![0, 10], "the active segment stays");
    }

    #[test]
    fn a_record_exactly_at_the_cutoff_is_kept() {
        // cutoff = 1000 + 10 * 12 - 0: offset 12 is exactly at it.
        let p = plan(&segments(), &by_age(100), 1000 + 10 * 12 + 100);
        assert_eq!(p.log_start, 12);
        assert_eq!(p.doomed, vec![0], "segment 10..20 still holds 12..20");
        // One millisecond later, offset 12 is one millisecond too old.
        let p = plan(&segments(), &by_age(100), 1000 + 10 * 12 + 101);
        assert_eq!(p.log_start, 13);
    }

    #[test]
    fn age_longer_than_the_log_removes_nothing() {
        let p = plan(&segments(), &by_age(1_000_000), 2000);
        assert!(p.is_noop(0), "{p:?}");
        // A clock before the first record (now < max age): cutoff 0.
        let p = plan(&segments(), &by_age(5000), 10);
        assert!(p.is_noop(0), "{p:?}");
    }

    #[test]
    fn bytes_remove_whole_sealed_segments_oldest_first() {
        let bytes = |n| Retention::default().with_max_bytes(n);
        let p = plan(&segments(), &bytes(300), 0);
        assert!(p.is_noop(0), "at the limit exactly nothing goes");
        let p = plan(&segments(), &bytes(299), 0);
        assert_eq!((p.log_start, p.doomed), (10, vec![0]));
        let p = plan(&segments(), &bytes(0), 0);
        assert_eq!(
            (p.log_start, p.doomed),
            (20, vec![0, 10]),
            "the active segment stays even over the limit"
        );
    }

    #[test]
    fn empty_partition_changes_nothing() {
        let empty = [SegmentSpan {
            base: 7,
            len: 0,
            next_offset: 7,
        }];
        let lookup_end = |_| Ok(7);
        let r = Retention::default()
            .with_max_age(Duration::ZERO)
            .with_max_bytes(0);
        let p = retention_plan(&empty, 7, &r, 1_000_000, lookup_end).unwrap();
        assert!(p.is_noop(7), "{p:?}");
        let p = retention_plan(&[], 0, &r, 1_000_000, |_| Ok(0)).unwrap();
        assert!(p.is_noop(0), "{p:?}");
    }

    #[test]
    fn the_log_start_never_moves_back() {
        let p = retention_plan(&segments(), 15, &by_age(1_000_000), 2000, lookup).unwrap();
        assert_eq!((p.log_start, p.doomed), (15, vec![0]));
    }
}
