//! Joining groups (members, new topics' start positions, rebalance) and
//! group lag.

use super::*;
use crate::config::JoinSettings;

impl<S: LogStorage> Inner<S> {
    pub(super) async fn join(
        self: &Arc<Self>,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<Arc<dyn Consumer>> {
        self.check_open()?;
        validate::join(group, topics, &config)?;
        let mut names = BTreeSet::new();
        for t in topics {
            self.topic_or_create(t).await?;
            names.insert(t.to_string());
        }
        let now = now_ms();
        let mut dirty = vec![StateKey::Group(group.to_string())];
        let member = {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            // A topic may have been deleted since the check.
            if let Some(t) = names.iter().find(|t| !state.topics.contains_key(*t)) {
                return Err(Error::topic_not_found(t));
            }
            if let Some(g) = state.groups.get(group) {
                if g.config.mode != config.mode {
                    return Err(Error::new(
                        ErrorKind::GroupModeMismatch,
                        format!(
                            "group `{group}` is a {:?}-mode group; cannot join it in {:?} mode",
                            g.config.mode, config.mode
                        ),
                    ));
                }
                // The group's settings are its own: a member never changes
                // them, and one whose settings differ is told.
                crate::group_settings::check_join(group, &g.config, &config)?;
            }
            let g = state.groups.entry(group.to_string()).or_insert_with(|| {
                let mut stored = config.clone();
                stored.join = JoinSettings::MustMatch;
                Group::new(group, stored)
            });
            let start = g.config.start;
            // A topic new to the group starts where the group's `start` says.
            let new_topics: Vec<String> = names.difference(&g.topics).cloned().collect();
            for t in &new_topics {
                g.topics.insert(t.clone());
                for p in 0..state.topics[t].partitions {
                    let tp = TopicPartition::new(t.clone(), p);
                    let b = self.bounds(&tp)?;
                    let at = match start {
                        StartFrom::Latest => b.log_end,
                        StartFrom::Earliest => b.log_start,
                    };
                    match g.mode() {
                        DeliveryMode::Stream => {
                            if start == StartFrom::Latest {
                                g.stream.entry(tp.clone()).or_default().committed = Some(at);
                                dirty.push(StateKey::Commit(group.to_string(), tp.clone()));
                            }
                        }
                        DeliveryMode::Queue => {
                            let table = g
                                .queue
                                .entry(tp.clone())
                                .or_insert_with(|| LeaseTable::starting_at(at));
                            dirty.extend(persist::lease_keys(group, &tp, table));
                        }
                    }
                }
            }
            let id = state.next_member;
            state.next_member += 1;
            let g = state.groups.get_mut(group).expect("inserted");
            g.members.insert(
                id,
                Member {
                    topics: names.clone(),
                    last_seen_ms: now,
                },
            );
            state.rebalance(group);
            id
        };
        self.mark_dirty(dirty);
        // The member's handle exists before the await: if persisting fails
        // or the call is dropped, dropping it makes the member leave.
        let consumer = Arc::new(consumer::EngineConsumer::new(
            self.clone(),
            group,
            member,
            names,
            config.mode,
        ));
        self.persist().await?;
        self.notify();
        tracing::debug!(group, member, ?topics, mode = ?config.mode, "member joined");
        Ok(consumer)
    }

    pub(super) fn group_lag(&self, group: &str) -> Result<GroupLag> {
        validate::group_name(group)?;
        let now = now_ms();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let g = state.groups.get_mut(group).ok_or_else(|| {
            Error::new(
                ErrorKind::GroupNotFound,
                format!("group `{group}` does not exist"),
            )
        })?;
        let mut partitions = Vec::new();
        for topic in g.topics.clone() {
            let Some(config) = state.topics.get(&topic) else {
                continue;
            };
            for p in 0..config.partitions {
                let tp = TopicPartition::new(topic.clone(), p);
                let b = self.storage.bounds(&tp.topic, tp.partition)?;
                let lag = match g.mode() {
                    DeliveryMode::Stream => {
                        let committed = g
                            .stream
                            .get(&tp)
                            .and_then(|s| s.committed)
                            .unwrap_or(b.log_start)
                            .clamp(b.log_start, b.log_end.max(b.log_start));
                        PartitionLag {
                            topic: tp.topic.clone(),
                            partition: p,
                            committed,
                            log_end: b.log_end,
                            lag: b.log_end.saturating_sub(committed),
                            in_flight: 0,
                            available: 0,
                        }
                    }
                    DeliveryMode::Queue => {
                        let table = g
                            .queue
                            .entry(tp.clone())
                            .or_insert_with(|| LeaseTable::starting_at(b.log_start));
                        table.normalize(b.log_start, b.log_end);
                        let (lag, in_flight, available) = table.lag(b.log_end, now);
                        PartitionLag {
                            topic: tp.topic.clone(),
                            partition: p,
                            committed: table.floor,
                            log_end: b.log_end,
                            lag,
                            in_flight,
                            available,
                        }
                    }
                };
                partitions.push(lag);
            }
        }
        Ok(GroupLag {
            group: group.to_string(),
            mode: g.mode(),
            partitions,
        })
    }
}
