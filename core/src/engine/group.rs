//! Consumer-group state of the embedded engine: members, generation,
//! stream-mode owners and positions, and queue-mode lease tables.
//!
//! Pure and synchronous, called under the engine's state lock. It decides
//! who owns what and checks fencing; it never reads records or persists.

use super::lease::LeaseTable;
use crate::assignment::{assign, MemberSubscription};
use crate::broker::TopicPartition;
use crate::config::{DeliveryMode, GroupConfig};
use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A live member.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub topics: BTreeSet<String>,
    pub last_seen_ms: u64,
}

/// Owner of a stream-mode partition and the generation it got it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub member: u64,
    pub generation: u64,
}

/// A nacked stream-mode offset waiting to be redelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retry {
    pub attempt: u32,
    pub not_before_ms: u64,
}

/// Stream-mode state of one partition.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamPart {
    /// Next offset to read after a restart or reassignment.
    pub committed: Option<u64>,
    /// The owner's position (None: start from `committed`).
    pub position: Option<u64>,
    /// Nacked offsets and their next attempt number.
    pub retries: BTreeMap<u64, Retry>,
    /// Runs of records addressed to another group (redriven, contract §5)
    /// that this group passed unseen: start → end (exclusive). Kept in
    /// memory only; after a restart they are read and passed again.
    pub skipped: crate::dlq::PassedRuns,
}

impl StreamPart {
    /// Commit `next` (never backwards), then carry the commit over runs of
    /// records addressed to other groups that start where it ends: they
    /// are settled for this group without being delivered. Returns whether
    /// the committed offset moved.
    pub fn commit_through(&mut self, next: u64) -> bool {
        let before = self.committed;
        let at = self
            .skipped
            .carry(self.committed.map_or(next, |c| c.max(next)));
        self.committed = Some(at);
        self.committed != before
    }
}

/// What of a group is persisted besides offsets and lease tables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct GroupMeta {
    pub config: GroupConfig,
    pub topics: BTreeSet<String>,
}

/// A consumer group.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub name: String,
    pub config: GroupConfig,
    /// Topics the group has ever read (for lag).
    pub topics: BTreeSet<String>,
    pub generation: u64,
    pub members: BTreeMap<u64, Member>,
    pub owners: BTreeMap<TopicPartition, Owner>,
    pub stream: BTreeMap<TopicPartition, StreamPart>,
    pub queue: BTreeMap<TopicPartition, LeaseTable>,
}

impl Group {
    pub fn new(name: &str, config: GroupConfig) -> Self {
        Group {
            name: name.to_string(),
            config,
            topics: BTreeSet::new(),
            generation: 0,
            members: BTreeMap::new(),
            owners: BTreeMap::new(),
            stream: BTreeMap::new(),
            queue: BTreeMap::new(),
        }
    }

    pub fn meta(&self) -> GroupMeta {
        GroupMeta {
            config: self.config.clone(),
            topics: self.topics.clone(),
        }
    }

    pub fn mode(&self) -> DeliveryMode {
        self.config.mode
    }

    /// Remove members silent past the session timeout; true if any left.
    pub fn expire_members(&mut self, now_ms: u64) -> Vec<u64> {
        let timeout = super::millis(self.config.session_timeout);
        let gone: Vec<u64> = self
            .members
            .iter()
            .filter(|(_, m)| m.last_seen_ms.saturating_add(timeout) < now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.remove_member(*id, now_ms);
        }
        gone
    }

    /// Drop a member and release its leases; the caller rebalances.
    pub fn remove_member(&mut self, member: u64, now_ms: u64) -> bool {
        if self.members.remove(&member).is_none() {
            return false;
        }
        for table in self.queue.values_mut() {
            table.release_member(member, now_ms);
        }
        true
    }

    /// Recompute stream-mode ownership over `partitions` (all partitions of
    /// the topics members read) and bump the generation. Queue-mode groups
    /// have no assignment and stay at generation 0.
    pub fn rebalance(&mut self, partitions: &[TopicPartition]) {
        if self.mode() != DeliveryMode::Stream {
            return;
        }
        self.generation += 1;
        let current: BTreeMap<TopicPartition, u64> = self
            .owners
            .iter()
            .map(|(tp, o)| (tp.clone(), o.member))
            .collect();
        let subs: Vec<MemberSubscription<u64>> = self
            .members
            .iter()
            .map(|(id, m)| MemberSubscription {
                member: *id,
                topics: m.topics.clone(),
            })
            .collect();
        let next = assign(partitions, &current, &subs);
        let mut owners = BTreeMap::new();
        for (tp, member) in next {
            let owner = match self.owners.get(&tp) {
                Some(o) if o.member == member => *o,
                _ => {
                    self.stream.entry(tp.clone()).or_default().position = None;
                    Owner {
                        member,
                        generation: self.generation,
                    }
                }
            };
            owners.insert(tp, owner);
        }
        for tp in self.owners.keys() {
            if !owners.contains_key(tp) {
                if let Some(part) = self.stream.get_mut(tp) {
                    part.position = None;
                }
            }
        }
        tracing::debug!(group = %self.name, generation = self.generation, partitions = owners.len(), "rebalanced");
        self.owners = owners;
    }

    /// Partitions `member` owns now.
    pub fn owned_by(&self, member: u64) -> Vec<(TopicPartition, Owner)> {
        self.owners
            .iter()
            .filter(|(_, o)| o.member == member)
            .map(|(tp, o)| (tp.clone(), *o))
            .collect()
    }

    /// Check that `member` owns `tp` (and, with `generation`, got it in that
    /// generation): the fencing rule.
    pub fn check_owner(
        &self,
        member: u64,
        tp: &TopicPartition,
        generation: Option<u64>,
    ) -> Result<Owner> {
        if !self.members.contains_key(&member) {
            return Err(Error::new(
                ErrorKind::Fenced,
                format!(
                    "group `{}`: this member was removed from the group (session timeout or close); \
                     generation is now {}",
                    self.name, self.generation
                ),
            ));
        }
        match self.owners.get(tp) {
            Some(o) if o.member == member => match generation {
                Some(g) if g != o.generation => Err(Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "group `{}`: {tp} was delivered in generation {g} but was reassigned in \
                         generation {}",
                        self.name, o.generation
                    ),
                )),
                _ => Ok(*o),
            },
            _ => Err(Error::new(
                ErrorKind::Fenced,
                format!(
                    "group `{}`: {tp} is not assigned to this member in generation {}",
                    self.name, self.generation
                ),
            )),
        }
    }

    /// Check the group's mode for an operation.
    pub fn require_mode(&self, mode: DeliveryMode, op: &str) -> Result<()> {
        if self.mode() != mode {
            return Err(Error::wrong_mode(&self.name, op, mode));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(g: &mut Group, member: u64) -> Vec<TopicPartition> {
        g.owned_by(member).into_iter().map(|(tp, _)| tp).collect()
    }

    #[test]
    fn commit_carries_over_passed_runs_and_never_goes_back() {
        let mut part = StreamPart::default();
        for offset in [5, 6, 7, 8, 12] {
            part.skipped.pass(offset);
        }
        assert!(part.commit_through(5));
        assert_eq!(part.committed, Some(9), "over both adjacent runs");
        assert!(!part.commit_through(3), "never backwards");
        assert_eq!(part.committed, Some(9));
        assert!(part.commit_through(12));
        assert_eq!(part.committed, Some(13));
        assert!(part.skipped.is_empty());
    }

    #[test]
    fn check_owner_fences_other_members_and_old_generations() {
        let mut g = Group::new("g", GroupConfig::stream());
        let parts: Vec<TopicPartition> = (0..2).map(|p| TopicPartition::new("t", p)).collect();
        for m in [1, 2] {
            g.members.insert(
                m,
                Member {
                    topics: BTreeSet::from(["t".to_string()]),
                    last_seen_ms: 0,
                },
            );
        }
        g.rebalance(&parts);
        let mine = owned(&mut g, 1);
        assert_eq!(mine.len(), 1);
        let tp = mine[0].clone();
        let at = g.check_owner(1, &tp, None).expect("owner").generation;
        assert_eq!(
            g.check_owner(2, &tp, None).unwrap_err().kind(),
            ErrorKind::Fenced
        );
        assert_eq!(
            g.check_owner(1, &tp, Some(at + 1)).unwrap_err().kind(),
            ErrorKind::Fenced,
            "a delivery from another generation"
        );
        assert!(g.remove_member(1, 0));
        g.rebalance(&parts);
        assert_eq!(
            g.check_owner(1, &tp, Some(at)).unwrap_err().kind(),
            ErrorKind::Fenced
        );
        assert_eq!(owned(&mut g, 2).len(), 2);
    }
}
