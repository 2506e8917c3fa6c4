//! Topic administration: create (and auto-create), delete, grow.
//! Validation first, then storage, then state, persisted before return.

use super::*;

impl<S: LogStorage> Inner<S> {
    /// The topic's config, creating it if auto-create is on.
    pub(super) async fn topic_or_create(&self, topic: &str) -> Result<TopicConfig> {
        validate::topic_name(topic)?;
        match self.topic_config(topic) {
            Err(e) if e.kind() == ErrorKind::TopicNotFound && self.options.auto_create_topics => {
                self.ensure_topic(topic, TopicConfig::default()).await
            }
            other => other,
        }
    }

    /// Create the topic if missing; return its config either way.
    pub(super) async fn ensure_topic(
        &self,
        topic: &str,
        config: TopicConfig,
    ) -> Result<TopicConfig> {
        match self.create_topic(topic, config, true).await {
            Ok(()) => self.topic_config(topic),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
        lenient: bool,
    ) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        validate::topic_config(name, &config)?;
        let _admin = self.admin_lock.lock().await;
        if let Some(existing) = self.state.lock().topics.get(name) {
            if *existing == config || lenient {
                return Ok(());
            }
            return Err(Error::new(
                ErrorKind::TopicExists,
                format!(
                    "topic `{name}` exists with another config ({} partitions, asked for {})",
                    existing.partitions, config.partitions
                ),
            ));
        }
        self.storage
            .ensure_partitions(name, config.partitions)
            .await?;
        self.state.lock().topics.insert(name.to_string(), config);
        self.dedup.lock().remove(name);
        self.mark_dirty([StateKey::Topic(name.to_string())]);
        if let Err(e) = self.persist().await {
            // Not stored: not created (a retry writes it; the key stays
            // dirty and now persists as a delete).
            self.state.lock().topics.remove(name);
            return Err(e);
        }
        tracing::debug!(
            topic = name,
            partitions = config.partitions,
            "topic created"
        );
        Ok(())
    }

    pub(super) async fn delete_topic(&self, name: &str) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        let _admin = self.admin_lock.lock().await;
        let mut dirty = vec![StateKey::Topic(name.to_string())];
        {
            let mut state = self.state.lock();
            let config = state
                .topics
                .remove(name)
                .ok_or_else(|| Error::topic_not_found(name))?;
            let groups: Vec<String> = state.groups.keys().cloned().collect();
            for gname in groups {
                let g = state.groups.get_mut(&gname).expect("listed");
                let had = g.topics.remove(name);
                for p in 0..config.partitions {
                    let tp = TopicPartition::new(name, p);
                    g.stream.remove(&tp);
                    if let Some(table) = g.queue.remove(&tp) {
                        dirty.extend(persist::lease_table_deletes(&gname, &tp, &table));
                    }
                    g.owners.remove(&tp);
                    dirty.push(StateKey::Commit(gname.to_string(), tp.clone()));
                }
                if had {
                    dirty.push(StateKey::Group(gname.clone()));
                    state.rebalance(&gname);
                }
            }
        }
        self.dedup.lock().remove(name);
        self.mark_dirty(dirty);
        self.persist().await?;
        self.storage.drop_topic(name).await?;
        self.notify();
        Ok(())
    }

    pub(super) async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        validate::partition_count(name, partitions)?;
        let _admin = self.admin_lock.lock().await;
        let current = self.topic_config(name)?;
        if partitions < current.partitions {
            return Err(Error::invalid(format!(
                "topic `{name}`: partitions can only grow ({} now, asked for {partitions})",
                current.partitions
            )));
        }
        if partitions == current.partitions {
            return Ok(());
        }
        self.storage.ensure_partitions(name, partitions).await?;
        let mut dirty = vec![StateKey::Topic(name.to_string())];
        {
            let mut state = self.state.lock();
            if let Some(c) = state.topics.get_mut(name) {
                c.partitions = partitions;
            }
            let groups: Vec<String> = state
                .groups
                .iter()
                .filter(|(_, g)| g.members.values().any(|m| m.topics.contains(name)))
                .map(|(n, _)| n.clone())
                .collect();
            for g in groups {
                state.rebalance(&g);
                dirty.push(StateKey::Group(g.clone()));
            }
        }
        self.mark_dirty(dirty);
        self.persist().await?;
        self.notify();
        Ok(())
    }
}
