//! The queue-mode lease table of one partition for one group.
//!
//! Owns which offsets are settled, leased (to whom, until when), delayed or
//! available, and how often each was delivered. Pure and synchronous: the
//! engine calls it under its state lock. It never reads records.
//!
//! Every operation costs O(log n) in the number of offsets the table
//! tracks, never O(n): leases are indexed by deadline, delays by wake-up
//! time, and redeliverable offsets are kept in their own set, so a poll or
//! an ack with 100,000 messages in flight costs what it costs with 100.
//!
//! # What is persisted, and how
//!
//! The table persists incrementally (contract §4b: attempt counts survive
//! restarts), as small state entries the engine writes through
//! [`LogStorage::put_state`](super::LogStorage::put_state):
//!
//! - a **header** (`q/{group}/{topic}/{partition}`): `"{floor} {next}"`,
//!   every offset below `floor` is settled, `next` is the first offset
//!   never delivered;
//! - one **entry** per offset in `floor..next` whose state is not the
//!   default (`l/{group}/{topic}/{partition}/{offset}`): `"s"` (settled
//!   above the floor), `"{attempts}"`, or `"{attempts} {not_before_ms}"`
//!   (delayed). An offset in `floor..next` with no entry was delivered once
//!   and is not settled.
//!
//! So the common case, fresh offsets leased in order and acked, writes only
//! the header; an ack out of order writes one entry; a redelivery one
//! entry. After each change [`LeaseTable::take_changes`] says what to
//! write: whether the header changed, and the offsets whose entry must be
//! written or deleted. Leases themselves are not persisted (their members
//! are gone after a restart): their messages become available again with
//! their attempt counts kept. Tables written by earlier versions (one JSON
//! value per table, [`PersistedLeases`]) are read and rewritten in this
//! form.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A lease held by a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub member: u64,
    pub id: u64,
    pub deadline_ms: u64,
}

/// Lease table of one partition.
///
/// Invariant: every offset in `floor..next` is either in `settled` or in
/// `attempts`, and each offset in `attempts` is in exactly one of
/// `inflight`, `dead_lettering`, `delayed` or `ready`.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseTable {
    /// Every offset below is settled.
    pub floor: u64,
    /// Next offset never delivered.
    pub next: u64,
    /// Settled offsets in `floor..next`.
    settled: BTreeSet<u64>,
    /// Deliveries so far of unsettled offsets in `floor..next`.
    attempts: BTreeMap<u64, u32>,
    /// Offsets leased now, and the same by deadline.
    inflight: BTreeMap<u64, Lease>,
    deadlines: BTreeSet<(u64, u64)>,
    /// Offsets not available before a time (ms), and the same by time.
    delayed: BTreeMap<u64, u64>,
    wakeups: BTreeSet<(u64, u64)>,
    /// Known offsets deliverable again now.
    ready: BTreeSet<u64>,
    /// Offsets being moved to the DLQ.
    dead_lettering: BTreeSet<u64>,
    /// Offsets that have a persisted entry (as of the last changes taken).
    stored: BTreeSet<u64>,
    /// Offsets whose persisted entry may differ from `stored` since the
    /// last [`LeaseTable::take_changes`].
    touched: BTreeSet<u64>,
    /// The header as of the last changes taken (`None`: never written).
    marked: Option<(u64, u64)>,
}

/// The JSON form of a whole table, written by earlier versions: read at
/// open, never written.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PersistedLeases {
    pub floor: u64,
    pub next: u64,
    pub settled: Vec<u64>,
    pub attempts: Vec<(u64, u32)>,
    pub delayed: Vec<(u64, u64)>,
}

/// A message whose lease ran out on its last allowed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired {
    pub offset: u64,
    pub attempts: u32,
}

/// What changed in a table since the last [`LeaseTable::take_changes`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// The header (`floor`, `next`) changed.
    pub header: bool,
    /// Offsets whose entry must be written (or deleted).
    pub entries: Vec<u64>,
}

/// A persisted header or entry that cannot be read.
fn bad(what: &str) -> Error {
    Error::new(ErrorKind::Corrupt, format!("lease table: {what}"))
}

impl LeaseTable {
    pub fn starting_at(offset: u64) -> Self {
        LeaseTable {
            floor: offset,
            next: offset,
            ..LeaseTable::default()
        }
    }

    // ----------------------------------------------------- persistence --

    /// The header value: `"{floor} {next}"`.
    pub fn header_value(&self) -> String {
        format!("{} {}", self.floor, self.next)
    }

    /// The entry value of `offset`, or `None` if it has the default state
    /// (delivered once, not settled) or lies outside `floor..next`.
    pub fn entry_value(&self, offset: u64) -> Option<String> {
        if offset < self.floor || offset >= self.next {
            return None;
        }
        if self.settled.contains(&offset) {
            return Some("s".to_string());
        }
        let attempts = self.attempts.get(&offset).copied().unwrap_or(1);
        match self.delayed.get(&offset) {
            Some(t) => Some(format!("{attempts} {t}")),
            None if attempts != 1 => Some(attempts.to_string()),
            None => None,
        }
    }

    /// What to write since the last call: the header if it changed, and
    /// the offsets whose entry appeared, changed or went away.
    pub fn take_changes(&mut self) -> Changes {
        let header = self.marked != Some((self.floor, self.next));
        self.marked = Some((self.floor, self.next));
        let mut entries = Vec::with_capacity(self.touched.len());
        for offset in std::mem::take(&mut self.touched) {
            if self.entry_value(offset).is_some() {
                self.stored.insert(offset);
                entries.push(offset);
            } else if self.stored.remove(&offset) {
                entries.push(offset);
            }
        }
        Changes { header, entries }
    }

    /// Every offset with a persisted entry, for deleting a whole table.
    pub fn stored_entries(&self) -> impl Iterator<Item = u64> + '_ {
        self.stored.union(&self.touched).copied()
    }

    /// Rebuild a table from its header and entries. Entries outside
    /// `floor..next` are stale (left by a table that was reset): their
    /// offsets are returned to be deleted.
    pub fn restore(header: &[u8], entries: BTreeMap<u64, Vec<u8>>) -> Result<(Self, Vec<u64>)> {
        let text = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
        let (floor, next) = text
            .split_once(' ')
            .and_then(|(f, n)| Some((f.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
            .ok_or_else(|| bad(&format!("header `{text}` is not `floor next`")))?;
        let mut t = LeaseTable::starting_at(floor);
        t.next = next.max(floor);
        t.marked = Some((t.floor, t.next));
        let mut stale = Vec::new();
        for (offset, value) in &entries {
            if *offset < t.floor || *offset >= t.next {
                stale.push(*offset);
                continue;
            }
            let text = std::str::from_utf8(value)
                .map_err(|_| bad(&format!("entry of offset {offset} is not text")))?;
            t.stored.insert(*offset);
            if text == "s" {
                t.settled.insert(*offset);
                continue;
            }
            let mut parts = text.split(' ');
            let attempts = parts
                .next()
                .and_then(|a| a.parse::<u32>().ok())
                .ok_or_else(|| bad(&format!("entry `{text}` of offset {offset}")))?;
            t.attempts.insert(*offset, attempts);
            if let Some(until) = parts.next() {
                let until = until
                    .parse::<u64>()
                    .map_err(|_| bad(&format!("entry `{text}` of offset {offset}")))?;
                t.delayed.insert(*offset, until);
                t.wakeups.insert((until, *offset));
            } else {
                t.ready.insert(*offset);
            }
        }
        // Offsets without an entry were delivered once and not settled.
        for offset in t.floor..t.next {
            if !entries.contains_key(&offset) {
                t.attempts.insert(offset, 1);
                t.ready.insert(offset);
            }
        }
        t.advance_floor();
        Ok((t, stale))
    }

    /// Read a table in the JSON form of earlier versions; every entry it
    /// needs in the current form is marked to be written.
    pub fn restore_legacy(p: PersistedLeases) -> Self {
        let mut t = LeaseTable::starting_at(p.floor);
        t.next = p.next.max(p.floor);
        for o in p.settled {
            if o >= t.floor && o < t.next {
                t.settled.insert(o);
            }
        }
        for (o, a) in p.attempts {
            if o >= t.floor && o < t.next && !t.settled.contains(&o) {
                t.attempts.insert(o, a);
            }
        }
        for (o, until) in p.delayed {
            if t.attempts.contains_key(&o) {
                t.delayed.insert(o, until);
                t.wakeups.insert((until, o));
            }
        }
        for o in t.floor..t.next {
            if !t.settled.contains(&o) {
                t.attempts.entry(o).or_insert(1);
                if !t.delayed.contains_key(&o) {
                    t.ready.insert(o);
                }
            }
        }
        t.advance_floor();
        t.touched = (t.floor..t.next).collect();
        t
    }

    // ------------------------------------------------------ operations --

    fn touch(&mut self, offset: u64) {
        self.touched.insert(offset);
    }

    /// Forget every per-offset state (not `stored`, `touched`, `marked`),
    /// marking every stored entry to be deleted.
    fn clear_to(&mut self, offset: u64) {
        let stored: Vec<u64> = self.stored.iter().copied().collect();
        self.touched.extend(stored);
        self.floor = offset;
        self.next = offset;
        self.settled.clear();
        self.attempts.clear();
        self.inflight.clear();
        self.deadlines.clear();
        self.delayed.clear();
        self.wakeups.clear();
        self.ready.clear();
        self.dead_lettering.clear();
    }

    /// Drop what retention removed below `log_start`; never move past `log_end`.
    pub fn normalize(&mut self, log_start: u64, log_end: u64) {
        if self.next > log_end {
            // The log was recreated shorter (topic deleted and made again).
            self.clear_to(log_start.min(log_end));
            return;
        }
        if self.floor < log_start {
            let below: Vec<u64> = self.stored.range(..log_start).copied().collect();
            self.touched.extend(below);
            self.floor = log_start;
            self.next = self.next.max(log_start);
            self.settled = self.settled.split_off(&log_start);
            self.attempts = self.attempts.split_off(&log_start);
            self.inflight = self.inflight.split_off(&log_start);
            self.deadlines.retain(|(_, o)| *o >= log_start);
            self.delayed = self.delayed.split_off(&log_start);
            self.wakeups.retain(|(_, o)| *o >= log_start);
            self.ready = self.ready.split_off(&log_start);
            self.dead_lettering = self.dead_lettering.split_off(&log_start);
        }
        self.advance_floor();
    }

    fn advance_floor(&mut self) {
        while self.floor < self.next && self.settled.remove(&self.floor) {
            if self.stored.contains(&self.floor) {
                self.touched.insert(self.floor); // its entry goes away
            }
            self.floor += 1;
        }
    }

    fn remove_lease(&mut self, offset: u64) -> Option<Lease> {
        let lease = self.inflight.remove(&offset)?;
        self.deadlines.remove(&(lease.deadline_ms, offset));
        Some(lease)
    }

    fn remove_delay(&mut self, offset: u64) {
        if let Some(until) = self.delayed.remove(&offset) {
            self.wakeups.remove(&(until, offset));
        }
    }

    fn set_delay(&mut self, offset: u64, until_ms: u64) {
        self.remove_delay(offset);
        self.ready.remove(&offset);
        self.delayed.insert(offset, until_ms);
        self.wakeups.insert((until_ms, offset));
    }

    /// The deliveries so far of an unsettled offset.
    pub fn attempts_of(&self, offset: u64) -> Option<u32> {
        self.attempts.get(&offset).copied()
    }

    /// How many leases `member` holds here (for describing; O(in flight)).
    pub fn leases_of(&self, member: u64) -> u64 {
        self.inflight
            .values()
            .filter(|l| l.member == member)
            .count() as u64
    }

    /// Whether some lease ran out by `now_ms`.
    pub fn has_expired(&self, now_ms: u64) -> bool {
        self.deadlines.first().is_some_and(|(d, _)| *d <= now_ms)
    }

    /// Expire leases whose deadline passed: those on their last allowed
    /// attempt are returned to be dead-lettered (and marked so), the others
    /// become available at once.
    pub fn expire(&mut self, now_ms: u64, max_deliveries: u32) -> Vec<Expired> {
        let mut dead = Vec::new();
        while let Some(&(deadline, offset)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.remove_lease(offset);
            let attempts = self.attempts.get(&offset).copied().unwrap_or(0);
            if attempts >= max_deliveries {
                self.dead_lettering.insert(offset);
                dead.push(Expired { offset, attempts });
            } else {
                self.ready.insert(offset);
            }
        }
        dead
    }

    /// Release every lease of `member` now (it left); they take the normal
    /// expiry path at the next sweep.
    pub fn release_member(&mut self, member: u64, now_ms: u64) {
        let mine: Vec<(u64, Lease)> = self
            .inflight
            .iter()
            .filter(|(_, l)| l.member == member && l.deadline_ms > now_ms)
            .map(|(o, l)| (*o, *l))
            .collect();
        for (offset, lease) in mine {
            self.deadlines.remove(&(lease.deadline_ms, offset));
            self.deadlines.insert((now_ms, offset));
            if let Some(l) = self.inflight.get_mut(&offset) {
                l.deadline_ms = now_ms;
            }
        }
    }

    /// Offsets deliverable now, lowest first: redeliveries, then fresh ones
    /// up to `log_end`; at most `max`. Changes no delivery state (delays
    /// that passed become ready): the caller reads them, then leases each
    /// that [`LeaseTable::can_lease`] still allows.
    pub fn available(&mut self, now_ms: u64, log_end: u64, max: usize) -> Vec<u64> {
        while let Some(&(until, offset)) = self.wakeups.first() {
            if until > now_ms {
                break;
            }
            self.wakeups.pop_first();
            self.delayed.remove(&offset);
            self.ready.insert(offset);
            // The entry keeps its old delay until the next change is
            // written; a restart then finds the delay passed.
        }
        let mut out: Vec<u64> = self.ready.iter().copied().take(max).collect();
        let fresh = log_end.saturating_sub(self.next);
        let want = (max - out.len()) as u64;
        out.extend(self.next..self.next + fresh.min(want));
        out
    }

    /// Whether `offset` can be leased now: not settled, leased or being
    /// dead-lettered; a known redelivery whose delay passed, or the next
    /// fresh offset. Checked again after the records were read, since
    /// another poll may have taken them meanwhile.
    pub fn can_lease(&self, offset: u64, now_ms: u64) -> bool {
        if offset < self.floor {
            return false;
        }
        if offset >= self.next {
            return offset == self.next;
        }
        self.ready.contains(&offset) || self.delayed.get(&offset).is_some_and(|t| *t <= now_ms)
    }

    /// Delayed delivery: `offset` (fresh or not) is not offered before
    /// `until_ms`. No attempt is counted.
    pub fn defer(&mut self, offset: u64, until_ms: u64) {
        if offset >= self.next {
            self.next = offset.saturating_add(1);
        }
        self.attempts.entry(offset).or_insert(0);
        self.set_delay(offset, until_ms);
        self.touch(offset);
    }

    /// Settle `offset` without delivering it (a record addressed to
    /// another group).
    pub fn skip(&mut self, offset: u64) {
        if offset >= self.next {
            self.next = offset.saturating_add(1);
        }
        self.settle(offset);
    }

    /// Undo [`LeaseTable::lease`] of a delivery the caller never received
    /// (a poll dropped or failed after leasing): the lease ends and the
    /// attempt count goes back to `attempts_before`, so the message is
    /// available again as if never taken.
    pub fn unlease(&mut self, offset: u64, lease_id: u64, attempts_before: u32) {
        if self.inflight.get(&offset).is_some_and(|l| l.id == lease_id) {
            self.remove_lease(offset);
            self.attempts.insert(offset, attempts_before);
            self.ready.insert(offset);
            self.touch(offset);
        }
    }

    /// Lease `offset` to `member`; returns the attempt number of this delivery.
    pub fn lease(&mut self, offset: u64, lease: Lease) -> u32 {
        if offset >= self.next {
            debug_assert_eq!(offset, self.next);
            self.next = offset.saturating_add(1);
        }
        self.remove_delay(offset);
        self.ready.remove(&offset);
        let attempt = self.attempts.entry(offset).or_insert(0);
        *attempt = attempt.saturating_add(1);
        let attempt = *attempt;
        self.inflight.insert(offset, lease);
        self.deadlines.insert((lease.deadline_ms, offset));
        if attempt != 1 {
            self.touch(offset);
        } else if self.stored.contains(&offset) {
            self.touch(offset); // was deferred: its entry goes away
        }
        attempt
    }

    fn check(&self, offset: u64, lease_id: u64, what: &str) -> Result<Lease> {
        match self.inflight.get(&offset) {
            Some(l) if l.id == lease_id => Ok(*l),
            _ => Err(Error::lease_lost(offset, what)),
        }
    }

    /// Settle a message whatever its lease (retention, DLQ move done).
    pub fn settle(&mut self, offset: u64) {
        self.remove_lease(offset);
        self.attempts.remove(&offset);
        self.remove_delay(offset);
        self.ready.remove(&offset);
        self.dead_lettering.remove(&offset);
        if offset >= self.floor && offset < self.next {
            self.settled.insert(offset);
            if offset != self.floor || self.stored.contains(&offset) {
                self.touch(offset);
            }
        }
        self.advance_floor();
    }

    /// Ack under a lease.
    #[cfg(test)]
    pub fn ack(&mut self, offset: u64, lease_id: u64, what: &str) -> Result<()> {
        if !self.try_ack(offset, lease_id) {
            return Err(Error::lease_lost(offset, what));
        }
        Ok(())
    }

    /// Ack under a lease if it is still held; whether it was.
    pub fn try_ack(&mut self, offset: u64, lease_id: u64) -> bool {
        if self.inflight.get(&offset).is_none_or(|l| l.id != lease_id) {
            return false;
        }
        self.settle(offset);
        true
    }

    /// Nack under a lease: returns the attempts made, and whether this was
    /// the last allowed one (then the offset is marked for dead-lettering).
    pub fn nack(
        &mut self,
        offset: u64,
        lease_id: u64,
        available_at_ms: u64,
        max_deliveries: u32,
        what: &str,
    ) -> Result<(u32, bool)> {
        self.check(offset, lease_id, what)?;
        self.remove_lease(offset);
        let attempts = self.attempts.get(&offset).copied().unwrap_or(1);
        if attempts >= max_deliveries {
            self.dead_lettering.insert(offset);
            return Ok((attempts, true));
        }
        self.set_delay(offset, available_at_ms);
        self.touch(offset);
        Ok((attempts, false))
    }

    /// Extend a lease to `deadline_ms`.
    pub fn extend(
        &mut self,
        offset: u64,
        lease_id: u64,
        deadline_ms: u64,
        what: &str,
    ) -> Result<()> {
        let old = self.check(offset, lease_id, what)?;
        self.deadlines.remove(&(old.deadline_ms, offset));
        self.deadlines.insert((deadline_ms, offset));
        if let Some(l) = self.inflight.get_mut(&offset) {
            l.deadline_ms = deadline_ms;
        }
        Ok(())
    }

    /// A dead-letter move failed: make the message available again.
    pub fn abort_dead_letter(&mut self, offset: u64) {
        if self.dead_lettering.remove(&offset) && self.attempts.contains_key(&offset) {
            self.ready.insert(offset);
        }
    }

    /// Earliest time something becomes available or expires.
    pub fn next_due(&self) -> Option<u64> {
        let lease = self.deadlines.first().map(|(d, _)| *d);
        let delay = self.wakeups.first().map(|(t, _)| *t);
        match (lease, delay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// (lag, in flight, available now) against `log_end`.
    pub fn lag(&self, log_end: u64, now_ms: u64) -> (u64, u64, u64) {
        let unsettled = log_end.saturating_sub(self.floor) - self.settled.len() as u64;
        let in_flight = self.inflight.len() as u64;
        let delayed = self.wakeups.range((now_ms.saturating_add(1), 0)..).count() as u64;
        let waiting = self.dead_lettering.len() as u64 + delayed;
        (
            unsettled,
            in_flight,
            unsettled.saturating_sub(in_flight + waiting),
        )
    }

    /// Move the cursor to `offset` for the whole group, dropping all state.
    pub fn reset(&mut self, offset: u64) {
        self.clear_to(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(member: u64, id: u64, deadline_ms: u64) -> Lease {
        Lease {
            member,
            id,
            deadline_ms,
        }
    }

    #[test]
    fn lease_ack_and_floor() {
        let mut t = LeaseTable::starting_at(0);
        assert_eq!(t.available(0, 3, 10), vec![0, 1, 2]);
        for o in 0..3 {
            assert_eq!(t.lease(o, lease(1, o + 100, 1000)), 1);
        }
        assert!(t.available(0, 3, 10).is_empty());
        t.ack(1, 101, "x").unwrap();
        assert_eq!(t.floor, 0);
        t.ack(0, 100, "x").unwrap();
        assert_eq!(t.floor, 2);
        assert_eq!(
            t.ack(0, 100, "x").unwrap_err().kind(),
            ErrorKind::LeaseExpired
        );
        assert_eq!(t.lag(3, 0), (1, 1, 0));
    }

    #[test]
    fn expiry_redelivers_then_dead_letters() {
        let mut t = LeaseTable::starting_at(0);
        assert_eq!(t.lease(0, lease(1, 1, 10)), 1);
        assert!(t.expire(10, 2).is_empty());
        assert_eq!(t.available(10, 1, 10), vec![0]);
        assert_eq!(t.lease(0, lease(2, 2, 20)), 2);
        assert_eq!(
            t.ack(0, 1, "x").unwrap_err().kind(),
            ErrorKind::LeaseExpired
        );
        let dead = t.expire(20, 2);
        assert_eq!(
            dead,
            vec![Expired {
                offset: 0,
                attempts: 2
            }]
        );
        assert!(t.available(30, 1, 10).is_empty());
        t.settle(0);
        assert_eq!(t.floor, 1);
    }

    #[test]
    fn unlease_restores_the_attempt_and_availability() {
        let mut t = LeaseTable::starting_at(0);
        assert!(t.can_lease(0, 0));
        assert!(!t.can_lease(1, 0), "fresh offsets are leased in order");
        assert_eq!(t.lease(0, lease(1, 7, 100)), 1);
        assert!(!t.can_lease(0, 0));
        t.unlease(0, 7, 0);
        assert!(t.inflight.is_empty());
        assert_eq!(t.available(0, 1, 10), vec![0]);
        assert!(t.can_lease(0, 0));
        assert_eq!(
            t.lease(0, lease(1, 8, 100)),
            1,
            "the dropped delivery did not count"
        );
        t.unlease(0, 7, 0); // a stale lease id changes nothing
        assert_eq!(t.inflight.get(&0).map(|l| l.id), Some(8));
    }

    #[test]
    fn deferred_and_skipped_offsets() {
        let mut t = LeaseTable::starting_at(0);
        t.defer(0, 50);
        t.skip(1);
        assert_eq!(t.next, 2);
        assert_eq!(t.available(49, 3, 10), vec![2]);
        assert_eq!(t.available(50, 3, 10), vec![0, 2]);
        assert_eq!(
            t.lease(0, lease(1, 1, 100)),
            1,
            "a deferral is not an attempt"
        );
        assert_eq!(t.lag(3, 60), (2, 1, 1));
        t.settle(0);
        assert_eq!(t.floor, 2, "the skipped offset is settled");
    }

    #[test]
    fn nack_delays_and_persisted_round_trip() {
        let mut store = Store::default();
        let mut t = LeaseTable::starting_at(5);
        t.lease(5, lease(1, 9, 100));
        let (attempts, last) = t.nack(5, 9, 50, 3, "x").unwrap();
        assert_eq!((attempts, last), (1, false));
        assert!(t.available(49, 6, 10).is_empty());
        assert_eq!(t.available(50, 6, 10), vec![5]);
        store.apply(&mut t);
        let back = store.restore();
        assert_eq!(back.attempts_of(5), Some(1));
        assert_eq!(observable(&back), observable(&t));
    }

    /// What the engine does with a table's changes: a map of header and
    /// entries, like the state store.
    #[derive(Default)]
    struct Store {
        header: Option<String>,
        entries: BTreeMap<u64, String>,
        writes: usize,
    }

    impl Store {
        fn apply(&mut self, t: &mut LeaseTable) -> Changes {
            let changes = t.take_changes();
            if changes.header {
                self.header = Some(t.header_value());
                self.writes += 1;
            }
            for o in &changes.entries {
                self.writes += 1;
                match t.entry_value(*o) {
                    Some(v) => self.entries.insert(*o, v),
                    None => self.entries.remove(o),
                };
            }
            changes
        }

        fn restore(&self) -> LeaseTable {
            let entries = self
                .entries
                .iter()
                .map(|(o, v)| (*o, v.clone().into_bytes()))
                .collect();
            let (t, stale) =
                LeaseTable::restore(self.header.as_deref().unwrap().as_bytes(), entries).unwrap();
            assert!(stale.is_empty(), "stale entries {stale:?}");
            t
        }
    }

    /// What survives a restart: floor, next, settled, attempts, delays.
    #[allow(clippy::type_complexity)]
    fn observable(t: &LeaseTable) -> (u64, u64, Vec<u64>, Vec<(u64, u32)>, Vec<(u64, u64)>) {
        (
            t.floor,
            t.next,
            t.settled.iter().copied().collect(),
            t.attempts.iter().map(|(o, a)| (*o, *a)).collect(),
            t.delayed.iter().map(|(o, d)| (*o, *d)).collect(),
        )
    }

    #[test]
    fn in_order_acks_write_only_the_header() {
        let mut store = Store::default();
        let mut t = LeaseTable::starting_at(0);
        store.apply(&mut t);
        for o in 0..100 {
            t.lease(o, lease(1, o, 1000));
        }
        let c = store.apply(&mut t);
        assert!(c.header && c.entries.is_empty(), "{c:?}");
        for o in 0..100 {
            t.ack(o, o, "x").unwrap();
            let c = store.apply(&mut t);
            assert_eq!(
                c,
                Changes {
                    header: true,
                    entries: vec![]
                }
            );
        }
        assert!(store.entries.is_empty());
        assert_eq!(store.header.as_deref(), Some("100 100"));
    }

    #[test]
    fn out_of_order_acks_write_one_entry_each_and_the_floor_deletes_them() {
        let mut store = Store::default();
        let mut t = LeaseTable::starting_at(0);
        for o in 0..10 {
            t.lease(o, lease(1, o, 1000));
        }
        store.apply(&mut t);
        for o in (1..10).rev() {
            t.ack(o, o, "x").unwrap();
            let c = store.apply(&mut t);
            assert_eq!(
                c,
                Changes {
                    header: false,
                    entries: vec![o]
                }
            );
        }
        assert_eq!(store.entries.len(), 9);
        assert_eq!(observable(&store.restore()), observable(&t));
        t.ack(0, 0, "x").unwrap();
        let c = store.apply(&mut t);
        assert!(c.header);
        assert_eq!(c.entries, (1..10).collect::<Vec<_>>());
        assert!(store.entries.is_empty(), "{:?}", store.entries);
        assert_eq!(observable(&store.restore()), observable(&t));
    }

    #[test]
    fn a_random_history_restores_to_the_same_table() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut store = Store::default();
        let mut t = LeaseTable::starting_at(0);
        let mut now = 0;
        let mut id = 0;
        let mut log_start = 0;
        for step in 0..5000 {
            now += rng.gen_range(0..5);
            let log_end = 200 + step / 10;
            match rng.gen_range(0..10) {
                0..=3 => {
                    for o in t.available(now, log_end, rng.gen_range(1..8)) {
                        if t.can_lease(o, now) {
                            id += 1;
                            t.lease(o, lease(1, id, now + rng.gen_range(1..50)));
                        }
                    }
                }
                4..=5 => {
                    let held: Vec<(u64, Lease)> =
                        t.inflight.iter().map(|(o, l)| (*o, *l)).collect();
                    if let Some((o, l)) = held.get(rng.gen_range(0..held.len().max(1))) {
                        t.ack(*o, l.id, "x").unwrap();
                    }
                }
                6 => {
                    let held: Vec<(u64, Lease)> =
                        t.inflight.iter().map(|(o, l)| (*o, *l)).collect();
                    if let Some((o, l)) = held.first() {
                        if let Ok((_, true)) = t.nack(*o, l.id, now + 20, 4, "x") {
                            t.settle(*o);
                        }
                    }
                }
                7 => {
                    for e in t.expire(now, 4) {
                        t.settle(e.offset);
                    }
                }
                8 => {
                    let o = t.next;
                    if o < log_end && rng.gen_bool(0.5) {
                        t.defer(o, now + 30);
                    } else if o < log_end {
                        t.skip(o);
                    }
                }
                _ => {
                    if rng.gen_bool(0.05) {
                        log_start = (log_start + 3).min(t.next);
                        t.normalize(log_start, log_end);
                    } else if rng.gen_bool(0.01) {
                        t.reset(t.floor.saturating_sub(5));
                    }
                }
            }
            store.apply(&mut t);
            if step % 97 == 0 {
                let mut back = store.restore();
                // A delay that passed is kept in its entry until the next
                // change; it delays nothing.
                back.available(now, 0, 0);
                t.available(now, 0, 0);
                assert_eq!(observable(&back), observable(&t), "seed {seed} step {step}");
            }
        }
    }

    #[test]
    fn legacy_json_tables_are_rewritten_as_entries() {
        let legacy = PersistedLeases {
            floor: 3,
            next: 8,
            settled: vec![5],
            attempts: vec![(3, 1), (4, 2), (6, 1), (7, 0)],
            delayed: vec![(6, 99), (7, 50)],
        };
        let mut t = LeaseTable::restore_legacy(legacy);
        let mut store = Store::default();
        store.apply(&mut t);
        let want: BTreeMap<u64, String> = [
            (4, "2".to_string()),
            (5, "s".to_string()),
            (6, "1 99".to_string()),
            (7, "0 50".to_string()),
        ]
        .into_iter()
        .collect();
        assert_eq!(store.entries, want);
        assert_eq!(store.header.as_deref(), Some("3 8"));
        assert_eq!(observable(&store.restore()), observable(&t));
        assert_eq!(t.available(60, 8, 10), vec![3, 4, 7]);
    }

    #[test]
    fn a_reset_deletes_every_entry_and_stale_ones_are_reported() {
        let mut store = Store::default();
        let mut t = LeaseTable::starting_at(0);
        for o in 0..5 {
            t.lease(o, lease(1, o, 1000));
        }
        t.ack(3, 3, "x").unwrap();
        store.apply(&mut t);
        assert_eq!(store.entries.len(), 1);
        t.reset(0);
        store.apply(&mut t);
        assert!(store.entries.is_empty());
        let (_, stale) = LeaseTable::restore(
            b"2 4",
            [(1, b"s".to_vec()), (7, b"2".to_vec())]
                .into_iter()
                .collect(),
        )
        .unwrap();
        assert_eq!(stale, vec![1, 7]);
        assert_eq!(
            LeaseTable::restore(b"nonsense", BTreeMap::new())
                .unwrap_err()
                .kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn cost_does_not_grow_with_the_number_in_flight() {
        // Structural: expiry, next_due and available look at what is due
        // or asked for, not at every lease.
        let mut t = LeaseTable::starting_at(0);
        for o in 0..100_000 {
            t.lease(o, lease(1, o, 1_000_000 + o));
        }
        assert!(t.expire(10, 5).is_empty());
        assert_eq!(t.next_due(), Some(1_000_000));
        assert!(!t.has_expired(999_999));
        assert_eq!(t.available(0, 100_010, 3), vec![100_000, 100_001, 100_002]);
        t.ack(50_000, 50_000, "x").unwrap();
        assert_eq!(t.lag(100_010, 0), (100_009, 99_999, 10));
    }
}
