//! Stream mode, what a member of a server backend keeps in its own process
//! for each partition it owns (as a Kafka consumer keeps its fetch
//! position): where it reads next, the nacked offsets waiting for their
//! retry, and the runs of records addressed to other groups it passed.
//! Ownership, generations and commits live in the server; this is the
//! rest, written once for every server backend.

use crate::backend::StoredMessage;
use crate::broker::TopicPartition;
use crate::dlq::{self, PassedRuns};
use crate::record::{DeliveryToken, Message};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A nacked offset waiting to be delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// The attempt number it will be delivered with.
    pub attempt: u32,
    /// Not before this time, ms since the epoch.
    pub not_before_ms: u64,
}

/// A member's state of one owned stream-mode partition.
#[derive(Debug, Default)]
pub struct MemberPartition {
    /// The generation the partition was got in (a change resets the rest).
    pub generation: u64,
    /// The next offset to read, once known.
    pub position: Option<u64>,
    /// Nacked offsets waiting for their retry.
    pub retries: BTreeMap<u64, Retry>,
    /// Records addressed to other groups that were passed unseen.
    pub skipped: PassedRuns,
}

impl MemberPartition {
    /// A fresh state for a partition got in `generation`.
    pub fn new(generation: u64) -> Self {
        MemberPartition {
            generation,
            ..MemberPartition::default()
        }
    }

    /// Forget everything if the partition was got again in another
    /// generation (its position then comes from the commit again).
    pub fn at_generation(&mut self, generation: u64) {
        if self.generation != generation {
            *self = MemberPartition::new(generation);
        }
    }

    /// When the message at `pos` may be delivered, if it waits for a retry
    /// that is not due at `now_ms`.
    pub fn retry_wait(&self, pos: u64, now_ms: u64) -> Option<u64> {
        self.retries
            .get(&pos)
            .filter(|r| r.not_before_ms > now_ms)
            .map(|r| r.not_before_ms)
    }

    /// Hand out `found` (read from the position, in offset order) to
    /// `group` in `generation`: the position moves past them, records
    /// addressed to other groups are passed (see [`PassedRuns`]), the rest
    /// go to `out` with their attempt numbers. Returns whether any was
    /// passed (the group's commit may then be carried over them).
    pub fn deliver(
        &mut self,
        group: &Arc<str>,
        tp: &TopicPartition,
        found: Vec<StoredMessage>,
        out: &mut Vec<Message>,
    ) -> bool {
        let Some(last) = found.last().map(|m| m.offset) else {
            return false;
        };
        self.position = Some(last.saturating_add(1));
        let mut passed = false;
        for m in found {
            if !dlq::is_for_group(&m.headers, group) {
                // Redriven to another group (contract §5): passed unseen,
                // committed over once reached.
                self.skipped.pass(m.offset);
                passed = true;
                continue;
            }
            let attempt = self.retries.get(&m.offset).map_or(1, |r| r.attempt);
            let token = DeliveryToken::stream(group.clone(), self.generation);
            out.push(Message::from_stored(
                tp.topic.clone(),
                tp.partition,
                m,
                attempt,
                token,
            ));
        }
        passed
    }

    /// `offset` was nacked: read again from it, not before `not_before_ms`,
    /// as attempt `attempt`.
    pub fn retry(&mut self, offset: u64, attempt: u32, not_before_ms: u64) {
        self.position = Some(offset);
        self.retries.insert(
            offset,
            Retry {
                attempt,
                not_before_ms,
            },
        );
    }

    /// A stream-mode nack of `m` (delivered in `generation`) that is not
    /// dead-lettered, in a member's map of partitions: the member reads
    /// it again from its offset, as the next attempt, once `delay` has
    /// passed; nothing changes if the partition is held in another
    /// generation now.
    pub fn nacked(
        parts: &mut HashMap<TopicPartition, MemberPartition>,
        tp: TopicPartition,
        generation: u64,
        m: &Message,
        delay: std::time::Duration,
    ) {
        let part = parts
            .entry(tp)
            .or_insert_with(|| MemberPartition::new(generation));
        if part.generation == generation {
            part.retry(
                m.offset,
                m.attempt.saturating_add(1),
                crate::deadline_ms(delay),
            );
        }
    }

    /// Where a commit of `next` for a message delivered in `generation`
    /// lands, in a member's map of partitions: carried over passed runs
    /// if the partition is still held in that generation, else `next`.
    pub fn carried(
        parts: &mut HashMap<TopicPartition, MemberPartition>,
        tp: &TopicPartition,
        generation: u64,
        next: u64,
    ) -> u64 {
        match parts.get_mut(tp) {
            Some(part) if part.generation == generation => part.carry(next),
            _ => next,
        }
    }

    /// Where a commit of `next` lands once carried over passed runs.
    pub fn carry(&mut self, next: u64) -> u64 {
        self.skipped.carry(next)
    }

    /// Everything below `to` is committed: its retries are dropped.
    pub fn committed(&mut self, to: u64) {
        self.retries = self.retries.split_off(&to);
    }

    /// Read next from `target` (a seek), with no retries pending.
    pub fn seek(&mut self, target: u64) {
        self.position = Some(target);
        self.retries.clear();
    }
}
