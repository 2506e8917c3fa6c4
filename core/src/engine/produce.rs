//! Producing: partition choice (one picker), idempotent dedup, and
//! appends grouped by partition (each group atomic, in input order).

use super::*;

impl<S: LogStorage> Inner<S> {
    /// Append to one partition, then wake pollers and apply retention.
    pub(super) async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<StoredRecord>,
        config: &TopicConfig,
    ) -> Result<Appended> {
        let appended = match self.storage.append(topic, partition, records).await {
            Ok(a) => a,
            // Closed while this send was on its way: the storage may have
            // dropped its partitions already (a send then finds no topic);
            // the honest answer is `Closed`.
            Err(e) if self.closed.load(Ordering::Acquire) => {
                tracing::debug!(topic, partition, error = %e, "append cut by close");
                return Err(Error::new(ErrorKind::Closed, "the broker is closed"));
            }
            Err(e) => return Err(e),
        };
        self.notify();
        if config.retention.is_limited() {
            // The records are stored: a retention failure must not turn the
            // send into an error (the sweeper tries again).
            if let Err(e) = self
                .storage
                .enforce_retention(topic, partition, &config.retention, now_ms())
                .await
            {
                tracing::warn!(topic, partition, error = %e, "retention failed after append");
            }
        }
        Ok(appended)
    }

    /// Partitions for a batch (contract §3): explicit, else Kafka's
    /// partitioner on the key, else murmur2 of the idempotency key (so a
    /// retry lands where the first try did), else round robin (the counter
    /// is taken once per batch).
    pub(super) fn pick_partitions(
        &self,
        topic: &str,
        records: &[Record],
        partitions: u32,
    ) -> Vec<u32> {
        let unrouted = records
            .iter()
            .filter(|r| r.partition.is_none() && r.key.is_none() && r.idempotency_key.is_none())
            .count() as u32;
        let mut next = if unrouted > 0 {
            let mut state = self.state.lock();
            // The topic's name is copied once, not on every batch.
            if !state.round_robin.contains_key(topic) {
                state.round_robin.insert(topic.to_string(), 0);
            }
            let counter = state.round_robin.get_mut(topic).expect("inserted above");
            let first = *counter;
            *counter = counter.wrapping_add(unrouted);
            first
        } else {
            0
        };
        records
            .iter()
            .map(|r| partitioner::route(r, partitions, &mut next))
            .collect()
    }

    /// The partition of one record (the same rule as a batch of one).
    pub(super) fn pick_partition(&self, topic: &str, record: &Record, partitions: u32) -> u32 {
        self.pick_partitions(topic, std::slice::from_ref(record), partitions)[0]
    }

    pub(super) async fn send_batch(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<Receipt>> {
        self.check_open()?;
        let config = self.topic_or_create(topic).await?;
        for record in &records {
            validate::record(topic, record, config.partitions, config.max_message_bytes)?;
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let targets = self.pick_partitions(topic, &records, config.partitions);
        if records.iter().all(|r| r.idempotency_key.is_none()) {
            let keep = vec![true; records.len()];
            let (appended, failed) = self
                .append_by_partition(topic, &config, records, &targets, &keep)
                .await;
            if let Some(e) = failed {
                return Err(e);
            }
            return appended
                .into_iter()
                .map(|r| {
                    r.ok_or_else(|| {
                        Error::internal(format!("topic `{topic}`: a record got no receipt"))
                    })
                })
                .collect();
        }

        // Idempotent produce: check, append and remember under the topic's
        // dedup lock, so concurrent duplicates append exactly once.
        let window = self
            .dedup
            .lock()
            .entry(topic.to_string())
            .or_default()
            .clone();
        let mut guard = window.lock().await;
        let now = now_ms();
        if guard.is_none() {
            let mut w = DedupWindow::default();
            let since = now.saturating_sub(millis(config.dedup_window));
            for (key, receipt) in self.storage.idempotency_keys_since(topic, since).await? {
                let expires = receipt
                    .timestamp
                    .saturating_add(millis(config.dedup_window));
                w.insert(key, receipt, expires);
            }
            *guard = Some(w);
        }
        let w = guard.as_mut().expect("loaded");
        w.prune(now);
        let mut first_of: HashMap<(u32, &str), usize> = HashMap::new();
        let mut known: Vec<Option<Receipt>> = vec![None; records.len()];
        let mut same_as: Vec<Option<usize>> = vec![None; records.len()];
        for (i, r) in records.iter().enumerate() {
            if let Some(k) = r.idempotency_key.as_deref() {
                if let Some(receipt) = w.get(targets[i], k, now) {
                    known[i] = Some(receipt);
                } else if let Some(&j) = first_of.get(&(targets[i], k)) {
                    same_as[i] = Some(j);
                } else {
                    first_of.insert((targets[i], k), i);
                }
            }
        }
        let keep: Vec<bool> = (0..records.len())
            .map(|i| known[i].is_none() && same_as[i].is_none())
            .collect();
        let keys: Vec<Option<String>> = records.iter().map(|r| r.idempotency_key.clone()).collect();
        let (appended, failed) = self
            .append_by_partition(topic, &config, records, &targets, &keep)
            .await;
        // Remember every key that was appended, even if another partition
        // failed: a retry of the batch must not append those again.
        let expires_in = millis(config.dedup_window);
        for (i, r) in appended.iter().enumerate() {
            if let (Some(r), Some(k)) = (r, &keys[i]) {
                w.insert(k.clone(), *r, r.timestamp.saturating_add(expires_in));
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let missing = || Error::internal(format!("topic `{topic}`: a record got no receipt"));
        (0..keep.len())
            .map(|i| match (known[i], same_as[i]) {
                (Some(r), _) => Ok(r),
                (None, Some(j)) => appended[j].ok_or_else(missing),
                (None, None) => appended[i].ok_or_else(missing),
            })
            .collect()
    }

    /// Append the kept records, grouped by partition (each group atomic, in
    /// input order); receipts by input index. Every partition's append runs
    /// to its end even if another fails, so the receipts say exactly what
    /// was stored; the first error comes back beside them.
    pub(super) async fn append_by_partition(
        &self,
        topic: &str,
        config: &TopicConfig,
        records: Vec<Record>,
        targets: &[u32],
        keep: &[bool],
    ) -> (Vec<Option<Receipt>>, Option<Error>) {
        let stored = |r: Record| StoredRecord {
            key: r.key,
            value: r.value,
            headers: r.headers,
            idempotency_key: r.idempotency_key,
            deliver_at: r.deliver_at,
        };
        // One partition (explicit, single-partition topic, one key): no grouping.
        if keep.iter().all(|k| *k) && targets.windows(2).all(|w| w[0] == w[1]) {
            let partition = targets[0];
            let n = records.len();
            let recs = records.into_iter().map(stored).collect();
            return match self.append(topic, partition, recs, config).await {
                Ok(a) => (
                    (0..n)
                        .map(|i| {
                            Some(Receipt {
                                partition,
                                offset: a.base_offset + i as u64,
                                timestamp: a.timestamp,
                            })
                        })
                        .collect(),
                    None,
                ),
                Err(e) => (vec![None; n], Some(e)),
            };
        }
        let mut by_partition: BTreeMap<u32, (Vec<usize>, Vec<StoredRecord>)> = BTreeMap::new();
        for (i, r) in records.into_iter().enumerate() {
            if !keep[i] {
                continue;
            }
            let entry = by_partition.entry(targets[i]).or_default();
            entry.0.push(i);
            entry.1.push(stored(r));
        }
        let appends = by_partition.into_iter().map(|(p, (idx, recs))| async move {
            (p, idx, self.append(topic, p, recs, config).await)
        });
        let done = futures::future::join_all(appends).await;
        let mut receipts = vec![None; keep.len()];
        let mut failed = None;
        for (partition, idx, result) in done {
            match result {
                Ok(a) => {
                    for (n, i) in idx.into_iter().enumerate() {
                        receipts[i] = Some(Receipt {
                            partition,
                            offset: a.base_offset + n as u64,
                            timestamp: a.timestamp,
                        });
                    }
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        (receipts, failed)
    }
}

/// A producer of an [`Engine`].
pub(super) struct EngineProducer<S: LogStorage> {
    pub(super) inner: Arc<Inner<S>>,
}

#[async_trait]
impl<S: LogStorage> Producer for EngineProducer<S> {
    async fn send_batch(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Receipt>> {
        self.inner.send_batch(topic, records).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.check_open()?;
        self.inner.storage.flush().await
    }
}
