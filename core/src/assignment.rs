//! Sticky, balanced assignment of partitions to stream-mode members.
//!
//! A pure function over the current owners and the live members, shared by
//! every backend (embedded engines call it under their state lock; server
//! backends under a server-side lock). It owns no state and does no I/O.
//!
//! Rules (contract §4a): each partition goes to at most one member;
//! partition counts differ by at most one between members subscribed to the
//! same topics; a joining member takes partitions only from those above
//! their share; a leaving member's partitions alone move.

use crate::broker::TopicPartition;
use std::collections::{BTreeMap, BTreeSet};

/// A live member and the topics it subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSubscription<M> {
    /// The member's id.
    pub member: M,
    /// Topics it reads.
    pub topics: BTreeSet<String>,
}

/// Assign `partitions` to `members`, keeping `current` owners where the
/// balance allows. Returns the new owner of every partition that has an
/// eligible member (a partition of a topic no member reads stays out).
///
/// ```
/// use conveyor_core::backend::{assign, MemberSubscription};
/// use conveyor_core::TopicPartition;
/// use std::collections::{BTreeMap, BTreeSet};
///
/// let topics: BTreeSet<String> = ["orders".to_string()].into();
/// let parts: Vec<_> = (0..4).map(|p| TopicPartition::new("orders", p)).collect();
/// let one = vec![MemberSubscription { member: 1u64, topics: topics.clone() }];
/// let first = assign(&parts, &BTreeMap::new(), &one);
/// assert!(first.values().all(|m| *m == 1));
///
/// let two = vec![one[0].clone(), MemberSubscription { member: 2u64, topics }];
/// let second = assign(&parts, &first, &two);
/// assert_eq!(second.values().filter(|m| **m == 2).count(), 2);
/// ```
pub fn assign<M: Ord + Clone>(
    partitions: &[TopicPartition],
    current: &BTreeMap<TopicPartition, M>,
    members: &[MemberSubscription<M>],
) -> BTreeMap<TopicPartition, M> {
    let mut result = BTreeMap::new();
    if members.is_empty() {
        return result;
    }
    let subs: BTreeMap<&M, &BTreeSet<String>> =
        members.iter().map(|m| (&m.member, &m.topics)).collect();
    let eligible: Vec<&TopicPartition> = partitions
        .iter()
        .filter(|tp| members.iter().any(|m| m.topics.contains(&tp.topic)))
        .collect();

    // Keep current owners that are alive and still subscribed.
    let mut held: BTreeMap<&M, Vec<&TopicPartition>> =
        members.iter().map(|m| (&m.member, Vec::new())).collect();
    let mut pool: Vec<&TopicPartition> = Vec::new();
    for tp in &eligible {
        match current.get(*tp) {
            Some(owner) if subs.get(owner).is_some_and(|t| t.contains(&tp.topic)) => {
                held.get_mut(owner).expect("owner is a member").push(tp)
            }
            _ => pool.push(tp),
        }
    }

    // Targets: floor(n/m) each, the remainder to the members holding most
    // now (so the fewest partitions move), ties by member id.
    let n = eligible.len();
    let m = members.len();
    let (base, extra) = (n / m, n % m);
    let mut order: Vec<&M> = held.keys().copied().collect();
    order.sort_by(|a, b| held[b].len().cmp(&held[a].len()).then_with(|| a.cmp(b)));
    let target: BTreeMap<&M, usize> = order
        .iter()
        .enumerate()
        .map(|(i, mem)| (*mem, base + usize::from(i < extra)))
        .collect();

    // Members above target release their highest partitions.
    for (mem, parts) in held.iter_mut() {
        parts.sort();
        while parts.len() > target[mem] {
            pool.push(parts.pop().expect("non-empty"));
        }
    }
    pool.sort();

    // Fill members below target, most-behind first, with partitions they read.
    let mut leftovers = Vec::new();
    for tp in pool {
        let taker = held
            .iter()
            .filter(|(mem, parts)| parts.len() < target[*mem] && subs[*mem].contains(&tp.topic))
            .max_by(|a, b| {
                let da = target[a.0] - a.1.len();
                let db = target[b.0] - b.1.len();
                da.cmp(&db).then_with(|| b.0.cmp(a.0))
            })
            .map(|(mem, _)| *mem);
        match taker {
            Some(mem) => held.get_mut(mem).expect("member").push(tp),
            None => leftovers.push(tp),
        }
    }
    // Subscriptions differ: give what is left to the least loaded reader.
    for tp in leftovers {
        if let Some(mem) = held
            .iter()
            .filter(|(mem, _)| subs[*mem].contains(&tp.topic))
            .min_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| a.0.cmp(b.0)))
            .map(|(mem, _)| *mem)
        {
            held.get_mut(mem).expect("member").push(tp);
        }
    }
    for (mem, parts) in held {
        for tp in parts {
            result.insert(tp.clone(), mem.clone());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(topic: &str, n: u32) -> Vec<TopicPartition> {
        (0..n).map(|p| TopicPartition::new(topic, p)).collect()
    }
    fn members(ids: &[u64], topics: &[&str]) -> Vec<MemberSubscription<u64>> {
        ids.iter()
            .map(|&member| MemberSubscription {
                member,
                topics: topics.iter().map(|t| t.to_string()).collect(),
            })
            .collect()
    }
    fn counts(a: &BTreeMap<TopicPartition, u64>) -> BTreeMap<u64, usize> {
        let mut c = BTreeMap::new();
        for m in a.values() {
            *c.entry(*m).or_insert(0) += 1;
        }
        c
    }

    #[test]
    fn balanced_and_sticky_through_joins_and_leaves() {
        let ps = parts("t", 10);
        let mut current = BTreeMap::new();
        let mut live: Vec<u64> = Vec::new();
        for id in 1..=4u64 {
            live.push(id);
            let next = assign(&ps, &current, &members(&live, &["t"]));
            assert_eq!(next.len(), 10);
            let c = counts(&next);
            let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
            assert!(max - min <= 1, "{c:?}");
            // Sticky: every partition that moved went to the new member.
            for (tp, owner) in &next {
                if let Some(old) = current.get(tp) {
                    assert!(old == owner || *owner == id, "{tp} moved {old}->{owner}");
                }
            }
            current = next;
        }
        // Member 2 leaves: only its partitions move.
        live.retain(|m| *m != 2);
        let next = assign(&ps, &current, &members(&live, &["t"]));
        for (tp, owner) in &current {
            if *owner != 2 {
                assert_eq!(next[tp], *owner);
            }
        }
        let c = counts(&next);
        assert!(c.values().max().unwrap() - c.values().min().unwrap() <= 1);
    }

    #[test]
    fn only_subscribed_topics_are_assigned() {
        let mut ps = parts("a", 2);
        ps.extend(parts("b", 2));
        let mut ms = members(&[1], &["a"]);
        ms.extend(members(&[2], &["a", "b"]));
        let out = assign(&ps, &BTreeMap::new(), &ms);
        assert_eq!(out.len(), 4);
        for (tp, m) in &out {
            if tp.topic == "b" {
                assert_eq!(*m, 2);
            }
        }
    }

    #[test]
    fn no_members_no_assignment() {
        assert!(assign::<u64>(&parts("t", 3), &BTreeMap::new(), &[]).is_empty());
    }
}
