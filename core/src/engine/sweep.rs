//! The background sweep: session timeouts, expired leases and their DLQ
//! moves, retention. Also the one DLQ append every dead-letter path uses.

use super::*;

pub(super) async fn sweeper<S: LogStorage>(inner: Weak<Inner<S>>) {
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        ticks += 1;
        if let Err(e) = inner.sweep(ticks.is_multiple_of(20)).await {
            tracing::warn!(error = %e, "sweep failed");
        }
    }
}

impl<S: LogStorage> Inner<S> {
    /// Append a dead letter to the group's DLQ topic (created on demand).
    pub(super) async fn append_dead_letter(
        &self,
        group: &str,
        config: &GroupConfig,
        record: Record,
        dead: &DeadLetter<'_>,
    ) -> Result<()> {
        let dlq = config.dlq.topic_for(dead.topic, group);
        let dlq_config = self.ensure_topic(&dlq, TopicConfig::new(1)).await?;
        let partition = self.pick_partition(&dlq, &record, dlq_config.partitions);
        let stored = StoredRecord {
            key: record.key,
            value: record.value,
            headers: record.headers,
            idempotency_key: None,
            deliver_at: None,
        };
        self.append(&dlq, partition, vec![stored], &dlq_config)
            .await?;
        tracing::info!(group, topic = dead.topic, partition = dead.partition, offset = dead.offset, attempts = dead.attempts, dlq = %dlq, "dead-lettered");
        Ok(())
    }

    /// Move queue-mode messages whose last lease expired to the DLQ, then
    /// settle them. A failure leaves them to be tried again.
    pub(super) async fn dead_letter_expired(
        &self,
        group: &str,
        jobs: Vec<(TopicPartition, lease::Expired)>,
    ) -> Result<()> {
        let mut first_err = None;
        for (tp, job) in jobs {
            let result = self.dead_letter_one_expired(group, &tp, job).await;
            let mut state = self.state.lock();
            if let Some(table) = state
                .groups
                .get_mut(group)
                .and_then(|g| g.queue.get_mut(&tp))
            {
                match &result {
                    Ok(()) => table.settle(job.offset),
                    Err(_) => table.abort_dead_letter(job.offset),
                }
                self.mark_dirty(persist::lease_keys(group, &tp, table));
            }
            drop(state);
            if let Err(e) = result {
                tracing::warn!(group, %tp, offset = job.offset, error = %e, "dead-letter move failed; will retry");
                first_err.get_or_insert(e);
            }
        }
        self.persist().await?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) async fn dead_letter_one_expired(
        &self,
        group: &str,
        tp: &TopicPartition,
        job: lease::Expired,
    ) -> Result<()> {
        let config = match self.state.lock().groups.get(group) {
            Some(g) => g.config.clone(),
            None => return Ok(()),
        };
        let found = self
            .storage
            .read(
                &tp.topic,
                tp.partition,
                ReadRange::from(job.offset)
                    .with_max_records(1)
                    .with_max_bytes(1),
            )
            .await?;
        let Some(m) = found.into_iter().find(|m| m.offset == job.offset) else {
            return Ok(()); // removed by retention meanwhile
        };
        let dead = DeadLetter {
            topic: &tp.topic,
            partition: tp.partition,
            offset: job.offset,
            group,
            attempts: job.attempts,
            error: Some("visibility timeout expired"),
            failed_at: now_ms(),
            idempotency_key: m.idempotency_key.as_deref(),
        };
        let record = dead_letter_record(m.key, m.value, &m.headers, &dead);
        self.append_dead_letter(group, &config, record, &dead).await
    }

    /// Session timeouts, expired leases, and (with `retention`) retention.
    pub(super) async fn sweep(&self, retention: bool) -> Result<()> {
        self.check_open()?;
        let now = now_ms();
        let mut jobs: Vec<(String, Vec<(TopicPartition, lease::Expired)>)> = Vec::new();
        let mut rebalanced = false;
        {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let names: Vec<String> = state.groups.keys().cloned().collect();
            for name in names {
                let gone = state
                    .groups
                    .get_mut(&name)
                    .expect("listed")
                    .expire_members(now);
                if !gone.is_empty() {
                    tracing::debug!(group = %name, members = ?gone, "session timeout");
                    state.rebalance(&name);
                    rebalanced = true;
                }
                let g = state.groups.get_mut(&name).expect("listed");
                if g.mode() != DeliveryMode::Queue {
                    continue;
                }
                let max = g.config.dlq.max_deliveries;
                let mut group_jobs = Vec::new();
                for (tp, table) in g.queue.iter_mut() {
                    if table.has_expired(now) {
                        rebalanced = true; // something became available
                        for e in table.expire(now, max) {
                            group_jobs.push((tp.clone(), e));
                        }
                    }
                }
                if !group_jobs.is_empty() {
                    jobs.push((name, group_jobs));
                }
            }
        }
        if rebalanced {
            self.notify();
        }
        for (group, group_jobs) in jobs {
            self.dead_letter_expired(&group, group_jobs).await?;
        }
        if retention {
            let topics: Vec<(String, TopicConfig)> = self
                .state
                .lock()
                .topics
                .iter()
                .filter(|(_, c)| c.retention.is_limited())
                .map(|(n, c)| (n.clone(), *c))
                .collect();
            for (topic, config) in topics {
                for p in 0..config.partitions {
                    self.storage
                        .enforce_retention(&topic, p, &config.retention, now)
                        .await?;
                }
            }
        }
        Ok(())
    }
}
