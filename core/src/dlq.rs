//! Dead letters: the record a failed message becomes, and redrive.
//!
//! Written once for every backend: [`dead_letter_record`] builds the DLQ
//! record with the contract's headers; [`redrive`] moves DLQ messages back
//! through the public [`Broker`] API (a queue-mode group on the DLQ topic,
//! appending before acking), so a crash may duplicate but never lose.

use crate::broker::{Broker, NackOptions, ProducerExt};
use crate::config::{GroupConfig, RetryBackoff};
use crate::describe::{GroupLag, PartitionLag, TopicDescription};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{Header, Record};
use bytes::Bytes;
use std::time::Duration;

/// Header prefix of the DLQ headers.
pub const DLQ_HEADER_PREFIX: &str = "conveyor.dlq.";
/// Original topic.
pub const HEADER_TOPIC: &str = "conveyor.dlq.topic";
/// Original partition.
pub const HEADER_PARTITION: &str = "conveyor.dlq.partition";
/// Original offset.
pub const HEADER_OFFSET: &str = "conveyor.dlq.offset";
/// The group that failed it.
pub const HEADER_GROUP: &str = "conveyor.dlq.group";
/// Deliveries made.
pub const HEADER_ATTEMPTS: &str = "conveyor.dlq.attempts";
/// Reason given to the last nack (empty if none).
pub const HEADER_ERROR: &str = "conveyor.dlq.error";
/// When it was dead-lettered, ms since the epoch.
pub const HEADER_FAILED_AT: &str = "conveyor.dlq.failed_at";
/// The producer's idempotency key of the failed message, if it had one.
/// Kept as a header, not as the DLQ record's own idempotency key: a
/// message dead-lettered again after a redrive must be appended again, not
/// deduplicated away.
pub const HEADER_IDEMPOTENCY_KEY: &str = "conveyor.dlq.idempotency_key";
/// Kept on redriven records for audit: the attempts made before redrive.
pub const HEADER_REDRIVE_ATTEMPTS: &str = "conveyor.redrive.attempts";
/// On redriven records: the one group the record is addressed to (the
/// group that dead-lettered it). Every other group of the topic settles
/// the record without delivering it (contract §5).
pub const HEADER_REDRIVE_GROUP: &str = "conveyor.redrive.group";
/// On redriven records: the producer's idempotency key of the original,
/// which consumers see as [`crate::Message::idempotency_key`] (so an
/// idempotent handler recognises the event), while the redriven record is
/// not deduplicated against the original (it would be dropped).
pub const HEADER_REDRIVE_IDEMPOTENCY_KEY: &str = "conveyor.redrive.idempotency_key";
/// The group redrive uses on a DLQ topic.
pub const REDRIVE_GROUP: &str = "conveyor.redrive";

/// Stream mode: the runs of records addressed to other groups (redriven,
/// contract §5) that a member passed unseen, as start → end (exclusive).
/// A commit that reaches a run's start is carried over it, so the group's
/// lag returns to 0 although it never saw those records. Every backend
/// whose stream-mode members pass such records keeps one per partition.
///
/// ```
/// use conveyor::dlq::PassedRuns;
/// let mut runs = PassedRuns::default();
/// for offset in [5, 6, 7, 12] {
///     runs.pass(offset);
/// }
/// assert_eq!(runs.carry(3), 3, "not reached: stays");
/// assert_eq!(runs.carry(5), 8, "over 5..8");
/// assert_eq!(runs.carry(12), 13);
/// assert!(runs.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassedRuns(std::collections::BTreeMap<u64, u64>);

impl PassedRuns {
    /// Record that `offset` was passed: it extends the run that ends at
    /// it, or starts a new one.
    pub fn pass(&mut self, offset: u64) {
        let next = offset.saturating_add(1);
        let start = match self.0.range(..=offset).next_back() {
            Some((s, end)) if *end == offset => *s,
            _ => offset,
        };
        self.0.insert(start, next);
    }

    /// Where a commit of `next` lands: carried over every run that starts
    /// where it (or the previous run) ends. Runs below the result are
    /// dropped.
    pub fn carry(&mut self, next: u64) -> u64 {
        let mut at = next;
        while let Some(end) = self.0.get(&at) {
            at = *end;
        }
        self.0 = self.0.split_off(&at);
        at
    }

    /// No runs are kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What failed: the message's origin and why.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Original topic.
    pub topic: &'a str,
    /// Original partition.
    pub partition: u32,
    /// Original offset.
    pub offset: u64,
    /// Group that gave up.
    pub group: &'a str,
    /// Deliveries made.
    pub attempts: u32,
    /// Reason of the last failure, if given.
    pub error: Option<&'a str>,
    /// Time of failure, ms since the epoch.
    pub failed_at: u64,
    /// The producer's idempotency key of the failed message, if any.
    pub idempotency_key: Option<&'a str>,
}

/// The DLQ record for a failed message: its key, value and headers plus the
/// `conveyor.dlq.*` headers.
pub fn dead_letter_record(
    key: Option<Bytes>,
    value: Bytes,
    headers: &[Header],
    dead: &DeadLetter<'_>,
) -> Record {
    // A redriven message that fails again: its redrive headers go (the DLQ
    // headers say the same, and a record in the DLQ addressed to a group
    // would be passed unseen by the redrive group); the producer's
    // idempotency key is carried on.
    let idempotency_key = dead
        .idempotency_key
        .or_else(|| carried_idempotency_key(headers))
        .map(str::to_string);
    let mut record = Record::new(value);
    record.key = key;
    record.headers = headers
        .iter()
        .filter(|h| !is_redrive_header(&h.name))
        .cloned()
        .collect();
    let mut push = |name: &str, v: String| record.headers.push(Header::new(name, v));
    push(HEADER_TOPIC, dead.topic.to_string());
    push(HEADER_PARTITION, dead.partition.to_string());
    push(HEADER_OFFSET, dead.offset.to_string());
    push(HEADER_GROUP, dead.group.to_string());
    push(HEADER_ATTEMPTS, dead.attempts.to_string());
    push(HEADER_ERROR, dead.error.unwrap_or("").to_string());
    push(HEADER_FAILED_AT, dead.failed_at.to_string());
    if let Some(k) = idempotency_key {
        push(HEADER_IDEMPOTENCY_KEY, k);
    }
    record
}

/// The record redrive appends for a DLQ message: DLQ headers removed,
/// `conveyor.redrive.attempts` added; returns it with its original topic.
pub fn redrive_record(
    key: Option<Bytes>,
    value: Bytes,
    headers: &[Header],
) -> Result<(String, Record)> {
    let find = |name: &str| {
        headers
            .iter()
            .rev()
            .find(|h| h.name == name)
            .and_then(|h| std::str::from_utf8(&h.value).ok())
    };
    let topic = find(HEADER_TOPIC)
        .ok_or_else(|| Error::invalid(format!("DLQ message has no `{HEADER_TOPIC}` header")))?
        .to_string();
    let group = find(HEADER_GROUP)
        .ok_or_else(|| Error::invalid(format!("DLQ message has no `{HEADER_GROUP}` header")))?
        .to_string();
    let attempts = find(HEADER_ATTEMPTS).unwrap_or("0").to_string();
    let mut record = Record::new(value);
    record.key = key;
    record.headers = headers
        .iter()
        .filter(|h| !h.name.starts_with(DLQ_HEADER_PREFIX) && !is_redrive_header(&h.name))
        .cloned()
        .collect();
    record
        .headers
        .push(Header::new(HEADER_REDRIVE_ATTEMPTS, attempts));
    record
        .headers
        .push(Header::new(HEADER_REDRIVE_GROUP, group));
    if let Some(k) = find(HEADER_IDEMPOTENCY_KEY) {
        record
            .headers
            .push(Header::new(HEADER_REDRIVE_IDEMPOTENCY_KEY, k.to_string()));
    }
    Ok((topic, record))
}

/// Whether `name` is one of the headers redrive adds (not counted against
/// `max_message_bytes`: a record that fit when first sent must be
/// redriven, contract §1, §5).
pub fn is_redrive_header(name: &str) -> bool {
    name == HEADER_REDRIVE_ATTEMPTS
        || name == HEADER_REDRIVE_GROUP
        || name == HEADER_REDRIVE_IDEMPOTENCY_KEY
}

/// The producer's idempotency key a DLQ record or a redriven record
/// carries in its headers (see [`HEADER_IDEMPOTENCY_KEY`],
/// [`HEADER_REDRIVE_IDEMPOTENCY_KEY`]).
pub fn carried_idempotency_key(headers: &[Header]) -> Option<&str> {
    headers
        .iter()
        .rev()
        .find(|h| h.name == HEADER_REDRIVE_IDEMPOTENCY_KEY || h.name == HEADER_IDEMPOTENCY_KEY)
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

/// The group a redriven record is addressed to, if it is one. Backends
/// settle such a record unseen for every other group.
pub fn addressed_to(headers: &[Header]) -> Option<&str> {
    headers
        .iter()
        .rev()
        .find(|h| h.name == HEADER_REDRIVE_GROUP)
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

/// Whether `group` should be handed a record with these headers: every
/// record, except redriven ones addressed to another group.
pub fn is_for_group(headers: &[Header], group: &str) -> bool {
    addressed_to(headers).is_none_or(|g| g == group)
}

/// Move up to `max` (all if `None`) messages of `dlq_topic` back to their
/// original topics, addressed to the group that dead-lettered each (see
/// [`HEADER_REDRIVE_GROUP`]): that group receives them again, the other
/// groups of the topic never do. Each is appended to its topic before it is acked in the
/// DLQ (group `conveyor.redrive`), so nothing is dropped; a crash between the
/// two may leave a duplicate. Messages that cannot be redriven (no origin
/// header, origin topic deleted) stop the redrive with an error and stay in
/// the DLQ.
///
/// A topic that is not a DLQ (a record at a partition's log start has no
/// [`HEADER_TOPIC`]) is refused before the redrive group is joined, so no
/// `conveyor.redrive` group is created on it; an empty topic redrives
/// nothing and creates nothing either.
pub async fn redrive<B: Broker + ?Sized>(
    broker: &B,
    dlq_topic: &str,
    max: Option<usize>,
) -> Result<usize> {
    if !holds_dead_letters(broker, dlq_topic, "redrive").await? {
        return Ok(0);
    }
    let consumer = join_redrive_group(broker, dlq_topic).await?;
    let producer = broker.producer().await?;
    let limit = max.unwrap_or(usize::MAX);
    let mut moved = 0usize;
    let result: Result<()> = async {
        while moved < limit {
            let want = (limit - moved).min(256);
            let batch = consumer.poll(want, Duration::from_millis(50)).await?;
            if batch.is_empty() {
                break;
            }
            for message in batch {
                let (topic, record) =
                    redrive_record(message.key.clone(), message.value.clone(), &message.headers)
                        .map_err(|e| {
                            Error::new(
                                e.kind(),
                                format!("redrive {}: {}", message.position(), e.message()),
                            )
                        })?;
                if let Err(e) = producer.send(&topic, record).await {
                    let _ = consumer
                        .nack(&message, NackOptions::new().with_delay(Duration::ZERO))
                        .await;
                    return Err(Error::new(
                        e.kind(),
                        format!(
                            "redrive {} to `{topic}`: {}",
                            message.position(),
                            e.message()
                        ),
                    ));
                }
                match consumer.ack(&message).await {
                    Ok(()) => moved += 1,
                    // Another redrive took it over: it was appended twice at worst.
                    Err(e) if e.kind() == ErrorKind::LeaseExpired => moved += 1,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
    .await;
    consumer.close().await?;
    result.map(|()| moved)
}

/// The `conveyor.redrive` group's member on `dlq_topic`: queue mode, so
/// each dead letter is settled once, by redrive or discard.
async fn join_redrive_group<B: Broker + ?Sized>(
    broker: &B,
    dlq_topic: &str,
) -> Result<std::sync::Arc<dyn crate::broker::Consumer>> {
    let config = GroupConfig::queue()
        .with_visibility_timeout(Duration::from_secs(60))
        .with_retry_backoff(RetryBackoff::none())
        .with_dlq(crate::config::DlqPolicy::new(u32::MAX));
    broker.consumer(REDRIVE_GROUP, &[dlq_topic], config).await
}

/// Whether `dlq_topic` holds any record, after checking it is a DLQ: the
/// record at each non-empty partition's log start must carry
/// [`HEADER_TOPIC`]. Checked with `fetch` (no group), so a refused topic
/// is left without a `conveyor.redrive` group.
async fn holds_dead_letters<B: Broker + ?Sized>(
    broker: &B,
    dlq_topic: &str,
    what: &str,
) -> Result<bool> {
    let d = broker.describe_topic(dlq_topic).await?;
    let mut any = false;
    for p in d.partitions.iter().filter(|p| p.log_end > p.log_start) {
        any = true;
        let first = broker.fetch(dlq_topic, p.partition, p.log_start, 1).await?;
        if let Some(m) = first.first().filter(|m| m.header(HEADER_TOPIC).is_none()) {
            return Err(not_a_dlq(dlq_topic, what, m.partition, m.offset));
        }
    }
    Ok(any)
}

fn not_a_dlq(dlq_topic: &str, what: &str, partition: u32, offset: u64) -> Error {
    Error::invalid(format!(
        "{what} `{dlq_topic}`: not a DLQ topic (its record {partition}@{offset} has no \
         `{HEADER_TOPIC}` header); {what} only takes a topic that failed messages were \
         dead-lettered to"
    ))
}

/// Discard every dead letter of `dlq_topic` still waiting for redrive:
/// each is settled in the `conveyor.redrive` group without being sent
/// anywhere, so a later redrive skips it and the DLQ's backlog (the
/// redrive group's lag on it) drops to 0. Returns how many were
/// discarded. The records stay in the DLQ topic until its retention
/// removes them (a log cannot drop records in the middle); `fetch` and
/// other groups still read them. Dead letters a concurrent redrive holds
/// are not discarded (they are being redriven).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> conveyor::Result<()> {
/// use conveyor::prelude::*;
/// use conveyor::{DlqPolicy, NackOptions};
/// use std::time::Duration;
///
/// let broker = conveyor::open("memory://").await?;
/// broker.create_topic("mail", TopicConfig::new(1)).await?;
/// broker.producer().await?.send("mail", Record::new("to: a@example.com")).await?;
/// let sender = broker
///     .consumer("sender", &["mail"], GroupConfig::queue().with_dlq(DlqPolicy::new(1)))
///     .await?;
/// let m = sender.poll(1, Duration::from_secs(1)).await?.remove(0);
/// sender.nack(&m, NackOptions::new().with_reason("bad address")).await?;
///
/// assert_eq!(broker.purge_dlq("mail.sender.dlq").await?, 1);
/// assert_eq!(broker.redrive("mail.sender.dlq", None).await?, 0, "nothing left to redrive");
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// `TopicNotFound`; `InvalidArgument` if `dlq_topic` is not a DLQ (then
/// no group is created on it).
pub async fn purge<B: Broker + ?Sized>(broker: &B, dlq_topic: &str) -> Result<usize> {
    if !holds_dead_letters(broker, dlq_topic, "purge").await? {
        return Ok(0);
    }
    let consumer = join_redrive_group(broker, dlq_topic).await?;
    let result: Result<usize> = async {
        let mut discarded = 0usize;
        loop {
            let batch = consumer.poll(256, Duration::from_millis(50)).await?;
            if batch.is_empty() {
                return Ok(discarded);
            }
            // Those whose lease was lost went to another redrive or purge.
            discarded += consumer.ack_batch(&batch).await?.acked;
        }
    }
    .await;
    consumer.close().await?;
    result
}

/// Discard one dead letter, the record at `offset` of `partition` of
/// `dlq_topic`: it is settled in the `conveyor.redrive` group without
/// being sent anywhere, so no redrive moves it (the other dead letters
/// stay waiting). Like [`purge`], the record stays in the topic until
/// retention removes it.
///
/// # Errors
/// `TopicNotFound`; `PartitionOutOfRange`; `InvalidArgument` if the
/// record is not a dead letter, is below the log start or past the log
/// end, or is not waiting (already redriven or discarded, or held by a
/// redrive running now).
pub async fn discard<B: Broker + ?Sized>(
    broker: &B,
    dlq_topic: &str,
    partition: u32,
    offset: u64,
) -> Result<()> {
    let d = broker.describe_topic(dlq_topic).await?;
    let Some(bounds) = d.partitions.iter().find(|p| p.partition == partition) else {
        return Err(Error::partition_out_of_range(
            dlq_topic,
            partition,
            d.config.partitions,
        ));
    };
    let at = format!("`{dlq_topic}` {partition}@{offset}");
    if offset < bounds.log_start || offset >= bounds.log_end {
        return Err(Error::invalid(format!(
            "discard {at}: no such record (the partition holds {}..{})",
            bounds.log_start, bounds.log_end
        )));
    }
    let record = broker.fetch(dlq_topic, partition, offset, 1).await?;
    match record.first() {
        Some(m) if m.offset == offset && m.header(HEADER_TOPIC).is_some() => {}
        Some(m) if m.offset == offset => {
            return Err(not_a_dlq(dlq_topic, "discard", partition, offset))
        }
        _ => {
            return Err(Error::invalid(format!(
                "discard {at}: no such record (removed by retention)"
            )))
        }
    }
    let consumer = join_redrive_group(broker, dlq_topic).await?;
    // Lease until the one wanted comes; the others are released when the
    // member leaves (their attempt count in this group is not used).
    let result: Result<bool> = async {
        loop {
            let batch = consumer.poll(256, Duration::from_millis(50)).await?;
            if batch.is_empty() {
                return Ok(false);
            }
            if let Some(m) = batch
                .iter()
                .find(|m| m.partition == partition && m.offset == offset)
            {
                consumer.ack(m).await?;
                return Ok(true);
            }
        }
    }
    .await;
    consumer.close().await?;
    if result? {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "discard {at}: not waiting (already redriven or discarded, or a redrive holds it now)"
        )))
    }
}

/// How many dead letters of `dlq` wait to be redriven (or discarded):
/// per partition, the lag of the redrive group ([`REDRIVE_GROUP`]) on
/// it, or every retained record of a partition it never read. `redrive`
/// is that group's lag, `None` if it does not exist yet.
pub fn waiting(dlq: &TopicDescription, redrive: Option<&GroupLag>) -> u64 {
    let mine: Vec<&PartitionLag> = redrive
        .map(|r| {
            r.partitions
                .iter()
                .filter(|p| p.topic == dlq.name)
                .collect()
        })
        .unwrap_or_default();
    if mine.is_empty() {
        return dlq.partitions.iter().map(|p| p.log_end - p.log_start).sum();
    }
    dlq.partitions
        .iter()
        .map(|p| {
            mine.iter()
                .find(|l| l.partition == p.partition)
                .map_or(p.log_end - p.log_start, |l| l.lag)
        })
        .sum()
}

/// [`waiting`] as the broker answers now: the dead letters of `dlq_topic`
/// that wait, 0 if the topic does not exist (nothing was dead-lettered
/// there yet).
///
/// # Errors
/// The common ones of `describe_topic` and `group_lag`.
///
/// # Cancel safety
/// Cancel safe: it only reads.
pub async fn depth<B: Broker + ?Sized>(broker: &B, dlq_topic: &str) -> Result<u64> {
    let described = match broker.describe_topic(dlq_topic).await {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::TopicNotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let redrive = match broker.group_lag(REDRIVE_GROUP).await {
        Ok(lag) => Some(lag),
        Err(e) if e.kind() == ErrorKind::GroupNotFound => None,
        Err(e) => return Err(e),
    };
    Ok(waiting(&described, redrive.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeliveryMode, TopicConfig};
    use crate::describe::PartitionDescription;

    #[test]
    fn dead_letter_then_redrive_restores_headers() {
        let headers = vec![Header::new("a", "1"), Header::new("a", "2")];
        let dead = DeadLetter {
            topic: "orders",
            partition: 3,
            offset: 17,
            group: "email",
            attempts: 5,
            error: Some("smtp 550"),
            failed_at: 1000,
            idempotency_key: Some("evt-1"),
        };
        let r = dead_letter_record(
            Some(Bytes::from_static(b"k")),
            Bytes::from_static(b"v"),
            &headers,
            &dead,
        );
        assert_eq!(r.headers.len(), 10);
        assert_eq!(carried_idempotency_key(&r.headers), Some("evt-1"));
        let (topic, back) = redrive_record(r.key.clone(), r.value.clone(), &r.headers).unwrap();
        assert_eq!(topic, "orders");
        assert_eq!(&back.headers[..2], &headers[..]);
        assert_eq!(back.headers[2], Header::new(HEADER_REDRIVE_ATTEMPTS, "5"));
        assert_eq!(back.headers[3], Header::new(HEADER_REDRIVE_GROUP, "email"));
        assert_eq!(back.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(addressed_to(&back.headers), Some("email"));
        assert_eq!(
            back.idempotency_key, None,
            "never deduplicated against the original"
        );
        assert_eq!(carried_idempotency_key(&back.headers), Some("evt-1"));
        assert!(is_for_group(&back.headers, "email"));
        assert!(!is_for_group(&back.headers, "sms"));
        assert!(
            is_for_group(&headers, "sms"),
            "ordinary records are for every group"
        );

        // Dead-lettered again and redriven again: one set of redrive headers,
        // none of them in the DLQ record (the redrive group must see it),
        // and the idempotency key carried even when the caller has none.
        let dead = DeadLetter {
            attempts: 2,
            idempotency_key: None,
            ..dead
        };
        let again = dead_letter_record(back.key.clone(), back.value.clone(), &back.headers, &dead);
        assert!(again.headers.iter().all(|h| !is_redrive_header(&h.name)));
        assert_eq!(addressed_to(&again.headers), None);
        assert_eq!(carried_idempotency_key(&again.headers), Some("evt-1"));
        let (_, twice) = redrive_record(again.key, again.value, &again.headers).unwrap();
        assert_eq!(twice.headers.len(), 5, "{:?}", twice.headers);
        assert_eq!(twice.headers[2], Header::new(HEADER_REDRIVE_ATTEMPTS, "2"));
    }

    #[test]
    fn waiting_is_the_redrive_groups_lag_or_everything() {
        let part = |partition, log_start, log_end| PartitionDescription {
            partition,
            log_start,
            log_end,
            bytes: 0,
        };
        let dlq = TopicDescription {
            name: "q.g.dlq".into(),
            config: TopicConfig::new(2),
            partitions: vec![part(0, 0, 10), part(1, 2, 5)],
        };
        assert_eq!(waiting(&dlq, None), 13);
        let lag = |topic: &str, partition, lag| PartitionLag {
            topic: topic.into(),
            partition,
            committed: 0,
            log_end: 0,
            lag,
            in_flight: 0,
            available: 0,
        };
        let redrive = GroupLag {
            group: REDRIVE_GROUP.into(),
            mode: DeliveryMode::Queue,
            partitions: vec![lag("q.g.dlq", 0, 4), lag("other.dlq", 1, 100)],
        };
        // Partition 1 was never redriven from: all 3 of its records wait.
        assert_eq!(waiting(&dlq, Some(&redrive)), 4 + 3);
    }
}
