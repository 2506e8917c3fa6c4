//! The queue-mode lease table of one partition for one group.
//!
//! Owns which offsets are settled, leased (to whom, until when), delayed or
//! available, and how often each was delivered. Pure and synchronous: the
//! engine calls it under its state lock and persists [`PersistedLeases`]
//! afterwards. It never reads records.

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
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseTable {
    /// Every offset below is settled.
    pub floor: u64,
    /// Next offset never delivered.
    pub next: u64,
    /// Settled offsets in `floor..next`.
    pub settled: BTreeSet<u64>,
    /// Deliveries so far of unsettled offsets in `floor..next`.
    pub attempts: BTreeMap<u64, u32>,
    /// Offsets not available before this time (ms).
    pub delayed: BTreeMap<u64, u64>,
    /// Offsets leased now.
    pub inflight: BTreeMap<u64, Lease>,
    /// Offsets being moved to the DLQ.
    pub dead_lettering: BTreeSet<u64>,
}

/// What survives a restart: settled set, attempts and delays. Leases do
/// not (their members are gone); their messages become available again
/// with their attempt counts kept.
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

impl LeaseTable {
    pub fn starting_at(offset: u64) -> Self {
        LeaseTable {
            floor: offset,
            next: offset,
            ..LeaseTable::default()
        }
    }

    pub fn persisted(&self) -> PersistedLeases {
        PersistedLeases {
            floor: self.floor,
            next: self.next,
            settled: self.settled.iter().copied().collect(),
            attempts: self.attempts.iter().map(|(o, a)| (*o, *a)).collect(),
            delayed: self.delayed.iter().map(|(o, t)| (*o, *t)).collect(),
        }
    }

    pub fn restore(p: PersistedLeases) -> Self {
        LeaseTable {
            floor: p.floor,
            next: p.next.max(p.floor),
            settled: p.settled.into_iter().collect(),
            attempts: p.attempts.into_iter().collect(),
            delayed: p.delayed.into_iter().collect(),
            ..LeaseTable::default()
        }
    }

    /// Drop what retention removed below `log_start`; never move past `log_end`.
    pub fn normalize(&mut self, log_start: u64, log_end: u64) {
        if self.floor < log_start {
            self.floor = log_start;
            self.next = self.next.max(log_start);
            self.settled = self.settled.split_off(&log_start);
            self.attempts = self.attempts.split_off(&log_start);
            self.delayed = self.delayed.split_off(&log_start);
            self.inflight = self.inflight.split_off(&log_start);
            self.dead_lettering = self.dead_lettering.split_off(&log_start);
        }
        if self.next > log_end {
            // The log was recreated shorter (topic deleted and made again).
            *self = LeaseTable::starting_at(log_start.min(log_end));
        }
        self.advance_floor();
    }

    fn advance_floor(&mut self) {
        while self.floor < self.next && self.settled.remove(&self.floor) {
            self.floor += 1;
        }
    }

    /// Expire leases whose deadline passed: those on their last allowed
    /// attempt are returned to be dead-lettered (and marked so), the others
    /// become available at once.
    pub fn expire(&mut self, now_ms: u64, max_deliveries: u32) -> Vec<Expired> {
        let expired: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, l)| l.deadline_ms <= now_ms)
            .map(|(o, _)| *o)
            .collect();
        let mut dead = Vec::new();
        for offset in expired {
            self.inflight.remove(&offset);
            let attempts = self.attempts.get(&offset).copied().unwrap_or(0);
            if attempts >= max_deliveries {
                self.dead_lettering.insert(offset);
                dead.push(Expired { offset, attempts });
            }
        }
        dead
    }

    /// Release every lease of `member` now (it left); they take the normal
    /// expiry path at the next sweep.
    pub fn release_member(&mut self, member: u64, now_ms: u64) {
        for lease in self.inflight.values_mut() {
            if lease.member == member {
                lease.deadline_ms = lease.deadline_ms.min(now_ms);
            }
        }
    }

    /// Offsets deliverable now, lowest first: redeliveries, then fresh ones
    /// up to `log_end`; at most `max`. Changes nothing: the caller reads
    /// them, then leases each that [`LeaseTable::can_lease`] still allows.
    pub fn available(&self, now_ms: u64, log_end: u64, max: usize) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .attempts
            .keys()
            .copied()
            .filter(|o| {
                !self.inflight.contains_key(o)
                    && !self.dead_lettering.contains(o)
                    && self.delayed.get(o).is_none_or(|t| *t <= now_ms)
            })
            .take(max)
            .collect();
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
        if offset < self.floor
            || self.settled.contains(&offset)
            || self.inflight.contains_key(&offset)
            || self.dead_lettering.contains(&offset)
        {
            return false;
        }
        if offset >= self.next {
            return offset == self.next;
        }
        self.attempts.contains_key(&offset)
            && self.delayed.get(&offset).is_none_or(|t| *t <= now_ms)
    }

    /// Delayed delivery: `offset` (fresh or not) is not offered before
    /// `until_ms`. No attempt is counted.
    pub fn defer(&mut self, offset: u64, until_ms: u64) {
        if offset >= self.next {
            self.next = offset.saturating_add(1);
        }
        self.attempts.entry(offset).or_insert(0);
        self.delayed.insert(offset, until_ms);
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
            self.inflight.remove(&offset);
            self.attempts.insert(offset, attempts_before);
        }
    }

    /// Lease `offset` to `member`; returns the attempt number of this delivery.
    pub fn lease(&mut self, offset: u64, lease: Lease) -> u32 {
        if offset >= self.next {
            debug_assert_eq!(offset, self.next);
            self.next = offset.saturating_add(1);
        }
        self.delayed.remove(&offset);
        let attempt = self.attempts.entry(offset).or_insert(0);
        *attempt = attempt.saturating_add(1);
        self.inflight.insert(offset, lease);
        *attempt
    }

    fn check(&self, offset: u64, lease_id: u64, what: &str) -> Result<Lease> {
        match self.inflight.get(&offset) {
            Some(l) if l.id == lease_id => Ok(*l),
            _ => Err(Error::new(
                ErrorKind::LeaseExpired,
                format!(
                    "{what}: the lease on offset {offset} is no longer held (it expired and was \
                     released or re-leased, or the message was already settled)"
                ),
            )),
        }
    }

    /// Settle a message whatever its lease (retention, DLQ move done).
    pub fn settle(&mut self, offset: u64) {
        self.inflight.remove(&offset);
        self.attempts.remove(&offset);
        self.delayed.remove(&offset);
        self.dead_lettering.remove(&offset);
        if offset >= self.floor && offset < self.next {
            self.settled.insert(offset);
        }
        self.advance_floor();
    }

    /// Ack under a lease.
    pub fn ack(&mut self, offset: u64, lease_id: u64, what: &str) -> Result<()> {
        self.check(offset, lease_id, what)?;
        self.settle(offset);
        Ok(())
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
        self.inflight.remove(&offset);
        let attempts = self.attempts.get(&offset).copied().unwrap_or(1);
        if attempts >= max_deliveries {
            self.dead_lettering.insert(offset);
            return Ok((attempts, true));
        }
        self.delayed.insert(offset, available_at_ms);
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
        self.check(offset, lease_id, what)?;
        if let Some(l) = self.inflight.get_mut(&offset) {
            l.deadline_ms = deadline_ms;
        }
        Ok(())
    }

    /// A dead-letter move failed: make the message available again.
    pub fn abort_dead_letter(&mut self, offset: u64) {
        self.dead_lettering.remove(&offset);
    }

    /// Earliest time something becomes available or expires.
    pub fn next_due(&self) -> Option<u64> {
        let lease = self.inflight.values().map(|l| l.deadline_ms).min();
        let delay = self
            .delayed
            .iter()
            .filter(|(o, _)| !self.inflight.contains_key(o))
            .map(|(_, t)| *t)
            .min();
        match (lease, delay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// (lag, in flight, available now) against `log_end`.
    pub fn lag(&self, log_end: u64, now_ms: u64) -> (u64, u64, u64) {
        let unsettled = log_end.saturating_sub(self.floor) - self.settled.len() as u64;
        let in_flight = self.inflight.len() as u64;
        let waiting = self
            .attempts
            .keys()
            .filter(|o| {
                !self.inflight.contains_key(o)
                    && (self.dead_lettering.contains(o)
                        || self.delayed.get(o).is_some_and(|t| *t > now_ms))
            })
            .count() as u64;
        (
            unsettled,
            in_flight,
            unsettled.saturating_sub(in_flight + waiting),
        )
    }

    /// Move the cursor to `offset` for the whole group, dropping all state.
    pub fn reset(&mut self, offset: u64) {
        *self = LeaseTable::starting_at(offset);
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
        let mut t = LeaseTable::starting_at(5);
        t.lease(5, lease(1, 9, 100));
        let (attempts, last) = t.nack(5, 9, 50, 3, "x").unwrap();
        assert_eq!((attempts, last), (1, false));
        assert!(t.available(49, 6, 10).is_empty());
        assert_eq!(t.available(50, 6, 10), vec![5]);
        let back = LeaseTable::restore(t.persisted());
        assert_eq!(back.persisted(), t.persisted());
        assert_eq!(back.attempts.get(&5), Some(&1));
    }
}
