//! Producing: routing with core's partitioner, one `append.lua` call per
//! partition of a batch (atomic and contiguous there), partitions of one
//! batch written concurrently.

use crate::broker::Inner;
use crate::conn::{reply, SCRIPTS};
use async_trait::async_trait;
use conveyor_core::backend::encode_headers;
use conveyor_core::{dlq, partitioner, Error, ErrorKind, Producer, Receipt, Record, Result};
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;
use std::time::Duration;

/// A producer: a handle on the broker's connection.
pub(crate) struct RedisProducer {
    pub(crate) inner: Arc<Inner>,
}

impl Inner {
    pub(crate) async fn send_batch(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<Receipt>> {
        self.check_open()?;
        // Before anything is written (an auto-created topic included).
        self.settings_allow_send().await?;
        // Delivery times are made relative to this moment, and the script
        // adds them to the server's clock.
        let sent_at = conveyor_core::now_ms();
        let mut t = self.topic_cached(topic).await?;
        if records
            .iter()
            .any(|r| r.partition.is_some_and(|p| p >= t.config.partitions))
        {
            // Another process may have added partitions since the cache.
            self.forget_topic(topic);
            t = self.topic_cached(topic).await?;
        }
        let by_partition = {
            let mut rr = self.round_robin.lock();
            let next = rr.entry(topic.to_string()).or_insert(0);
            partitioner::plan(topic, &records, &t.config, next)?
        };
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let window = crate::millis(t.config.dedup_window);
        let records = &records;
        let appended: Vec<(Vec<usize>, Vec<Receipt>)> =
            futures::stream::iter(by_partition.into_iter().map(|(partition, idx)| {
                let id = t.id;
                async move {
                    let batch: Vec<&Record> = idx.iter().map(|&i| &records[i]).collect();
                    let got = self
                        .append(topic, id, partition, &batch, window, sent_at)
                        .await?;
                    Ok::<_, Error>((idx, got))
                }
            }))
            .buffer_unordered(16)
            .try_collect()
            .await
            .inspect_err(|e| {
                if e.kind() == ErrorKind::TopicNotFound {
                    // Deleted (and maybe made again) since it was cached.
                    self.forget_topic(topic);
                }
            })?;
        let mut receipts: Vec<Option<Receipt>> = vec![None; records.len()];
        for (idx, got) in appended {
            for (i, r) in idx.into_iter().zip(got) {
                receipts[i] = Some(r);
            }
        }
        receipts
            .into_iter()
            .map(|r| {
                r.ok_or_else(|| Error::internal(format!("send to `{topic}`: a receipt is missing")))
            })
            .collect()
    }

    /// Append one record the broker built itself (a dead letter: the
    /// original's size plus the DLQ headers may pass `max_message_bytes`,
    /// as the contract allows).
    pub(crate) async fn append_unchecked(&self, topic: &str, record: Record) -> Result<Receipt> {
        self.settings_allow_send().await?;
        let t = self.topic_cached(topic).await?;
        let partition = {
            let mut rr = self.round_robin.lock();
            partitioner::route(
                &record,
                t.config.partitions,
                rr.entry(topic.to_string()).or_insert(0),
            )
        };
        let got = self
            .append(
                topic,
                t.id,
                partition,
                &[&record],
                crate::millis(t.config.dedup_window),
                conveyor_core::now_ms(),
            )
            .await?;
        got.into_iter()
            .next()
            .ok_or_else(|| Error::internal(format!("append to `{topic}`: no receipt")))
    }

    /// Append `records` to one partition in one script call.
    async fn append(
        &self,
        topic: &str,
        topic_id: u64,
        partition: u32,
        records: &[&Record],
        window_ms: u64,
        sent_at: u64,
    ) -> Result<Vec<Receipt>> {
        let what = format!("append to `{topic}`/{partition}");
        let part = self.part(topic_id, partition);
        let mut call = SCRIPTS.append.prepare_invoke();
        call.key(&part.meta)
            .key(&part.log)
            .key(&part.idem)
            .key(&part.idem_times)
            .arg(window_ms)
            .arg(crate::keys::wake_channel(&self.ns))
            .arg(topic_id)
            .arg(records.len());
        for r in records {
            let delay = r.deliver_at.map(|at| {
                (at as i128 - sent_at as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64
            });
            let plain = r.idempotency_key.as_deref().is_none_or(str::is_empty)
                && r.key.is_none()
                && delay.is_none()
                && r.headers.is_empty();
            if plain {
                // A value alone: two arguments, not nine (append.lua).
                call.arg("v").arg(r.value.as_ref());
                continue;
            }
            call.arg("f")
                .arg(r.idempotency_key.as_deref().unwrap_or(""))
                .arg(r.size())
                .arg(delay.map_or_else(String::new, |d| d.to_string()))
                .arg(dlq::addressed_to(&r.headers).unwrap_or(""))
                .arg(if r.key.is_some() { "1" } else { "0" })
                .arg(r.key.as_deref().unwrap_or(b""))
                .arg(r.value.as_ref())
                .arg(encode_headers(&r.headers));
        }
        let got: Vec<redis::Value> = match call.invoke_async(&mut self.conn()).await {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOTOPIC") => {
                // A create cut short before this partition's meta was
                // written: finish it if the topic is still registered
                // under this id, else the topic is gone.
                match self.topic(topic).await? {
                    Some(t) if t.id == topic_id && partition < t.config.partitions => {
                        self.init_partitions(topic_id, partition..partition + 1, &what)
                            .await?;
                        return Box::pin(
                            self.append(topic, topic_id, partition, records, window_ms, sent_at),
                        )
                        .await;
                    }
                    _ => return Err(Error::topic_not_found(topic)),
                }
            }
            Err(e) => return Err(crate::conn::map_err(&what, e)),
        };
        let keyed = records
            .iter()
            .any(|r| r.idempotency_key.as_deref().is_some_and(|k| !k.is_empty()));
        if !keyed {
            // No dedup: the records got consecutive offsets from the first
            // one, all with one timestamp (the script's compact reply).
            let mut it = got.iter();
            let (Some(first), Some(ts), None) = (it.next(), it.next(), it.next()) else {
                return Err(Error::internal(format!("{what}: bad receipts")));
            };
            let (first, timestamp) = (reply::uint(first)?, reply::uint(ts)?);
            return Ok((0..records.len() as u64)
                .map(|i| Receipt {
                    partition,
                    offset: first + i,
                    timestamp,
                })
                .collect());
        }
        got.into_iter()
            .map(|v| {
                let s = reply::string(v)?;
                let (o, ts) = s
                    .split_once(':')
                    .and_then(|(o, ts)| Some((o.parse().ok()?, ts.parse().ok()?)))
                    .ok_or_else(|| Error::internal(format!("{what}: bad receipt `{s}`")))?;
                Ok(Receipt {
                    partition,
                    offset: o,
                    timestamp: ts,
                })
            })
            .collect()
    }
}

#[async_trait]
impl Producer for RedisProducer {
    async fn send_batch(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Receipt>> {
        self.inner
            .bounded(Duration::ZERO, self.inner.send_batch(topic, records))
            .await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.check_open()
    }
}
