//! Where a runner sends permanent failures
//! ([`super::Runner::with_dead_letters`]): the DLQ record core's
//! [`crate::dlq`] builds for every backend, appended through the public
//! producer API before the message is settled. It does not decide what is
//! permanent, nor settle the message.

use crate::broker::{Broker, Consumer, Producer, ProducerExt};
use crate::config::{DlqPolicy, TopicConfig};
use crate::dlq::{dead_letter_record, DeadLetter};
use crate::error::{Error, ErrorKind, Result};
use crate::record::Message;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;

/// Where a runner sends permanent failures ([`Runner::with_dead_letters`]).
pub(super) struct DeadLetters {
    broker: Arc<dyn Broker>,
    policy: DlqPolicy,
    producer: tokio::sync::OnceCell<Arc<dyn Producer>>,
    /// DLQ topics known to exist.
    created: Mutex<HashSet<String>>,
}

impl DeadLetters {
    pub(super) fn new(broker: Arc<dyn Broker>, policy: DlqPolicy) -> Self {
        DeadLetters {
            broker,
            policy,
            producer: tokio::sync::OnceCell::new(),
            created: Mutex::new(HashSet::new()),
        }
    }

    /// Append `message`'s DLQ record (built as the brokers build theirs)
    /// to its DLQ topic, creating the topic if needed; the topic's name.
    /// The topic is the group's as stored now (`consumer`'s
    /// [`Consumer::group_config`], so an `alter_group` of the DLQ topic
    /// applies), or the policy given to the runner if it cannot say.
    pub(super) async fn send(
        &self,
        consumer: &dyn Consumer,
        message: &Message,
        reason: &str,
    ) -> Result<String> {
        let group = message.token().group().ok_or_else(|| {
            Error::invalid(format!(
                "{} was read without a group: it cannot be dead-lettered",
                message.position()
            ))
        })?;
        let policy = match consumer.group_config().await {
            Ok(config) => config.dlq,
            Err(e) if e.kind() == ErrorKind::Unsupported => self.policy.clone(),
            Err(e) => return Err(e),
        };
        let dlq = policy.topic_for(&message.topic, group);
        if !self.created.lock().contains(&dlq) {
            match self.broker.create_topic(&dlq, TopicConfig::new(1)).await {
                Ok(()) => {}
                // It exists (with other settings): use it as it is.
                Err(e) if e.kind() == ErrorKind::TopicExists => {}
                Err(e) => return Err(e),
            }
            self.created.lock().insert(dlq.clone());
        }
        let dead = DeadLetter {
            topic: &message.topic,
            partition: message.partition,
            offset: message.offset,
            group,
            attempts: message.attempt,
            error: Some(reason),
            failed_at: crate::now_ms(),
            idempotency_key: message.idempotency_key.as_deref(),
        };
        let record = dead_letter_record(
            message.key.clone(),
            message.value.clone(),
            &message.headers,
            &dead,
        );
        let producer = self
            .producer
            .get_or_try_init(|| self.broker.producer())
            .await?;
        producer.send(&dlq, record).await?;
        Ok(dlq)
    }
}
