//! A group's settings belong to the group (contract §4): set by the member
//! that creates it, changed only by [`Broker::alter_group`], never by a
//! member that joins later. This module owns the rules every backend
//! applies: which fields are settings, how a joining member's settings
//! are checked against the stored ones ([`check_join`]), and what an
//! explicit change is ([`GroupChanges`]). It does not read or write
//! storage.
//!
//! [`Broker::alter_group`]: crate::Broker::alter_group

use crate::config::{DlqPolicy, GroupConfig, RetryBackoff};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a joining member's settings mean when its group already exists.
///
/// ```
/// use conveyor::{GroupConfig, JoinSettings};
/// // A tool that inspects or drains a group without knowing its settings:
/// let config = GroupConfig::queue().with_join_settings(JoinSettings::UseExisting);
/// assert_eq!(config.join, JoinSettings::UseExisting);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum JoinSettings {
    /// The member's settings must equal the group's stored ones; a member
    /// whose settings differ is refused with `InvalidArgument` naming each
    /// differing field, stored and given (default). A deploy that means to
    /// change them calls [`Broker::alter_group`](crate::Broker::alter_group)
    /// first.
    #[default]
    MustMatch,
    /// Join with whatever settings the group has; the member's settings
    /// are used only if it creates the group. For tools (`conveyor
    /// consume`, inspectors) and members that take their settings from
    /// the group ([`Consumer::group_config`](crate::Consumer::group_config)).
    UseExisting,
}

/// An explicit change of a group's settings, for
/// [`Broker::alter_group`](crate::Broker::alter_group): each `Some` field
/// replaces the stored value, the others stay. The mode and start of a
/// group cannot change.
///
/// ```
/// use conveyor::GroupChanges;
/// use std::time::Duration;
/// let changes = GroupChanges::new()
///     .with_visibility_timeout(Duration::from_secs(10))
///     .with_max_deliveries(3);
/// assert!(!changes.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupChanges {
    /// New visibility timeout (queue mode): leases taken from now on.
    pub visibility_timeout: Option<Duration>,
    /// New session timeout: members' next heartbeats.
    pub session_timeout: Option<Duration>,
    /// New dead-letter threshold: the next failure of any message.
    pub max_deliveries: Option<u32>,
    /// New DLQ topic: `Some(None)` goes back to `{topic}.{group}.dlq`.
    pub dlq_topic: Option<Option<String>>,
    /// New retry backoff: the next nack without its own delay.
    pub retry_backoff: Option<RetryBackoff>,
}

impl GroupChanges {
    /// No change.
    pub fn new() -> Self {
        GroupChanges::default()
    }
    /// Change the visibility timeout.
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = Some(timeout);
        self
    }
    /// Change the session timeout.
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = Some(timeout);
        self
    }
    /// Change the deliveries allowed before a message is dead-lettered.
    pub fn with_max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }
    /// Change the DLQ topic (`None`: the default `{topic}.{group}.dlq`).
    pub fn with_dlq_topic(mut self, topic: Option<String>) -> Self {
        self.dlq_topic = Some(topic);
        self
    }
    /// Change the retry backoff.
    pub fn with_retry_backoff(mut self, backoff: RetryBackoff) -> Self {
        self.retry_backoff = Some(backoff);
        self
    }
    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == GroupChanges::default()
    }

    /// `stored` with these changes applied, validated as a group config.
    ///
    /// # Errors
    /// `InvalidArgument` for an empty change, or a result that is not a
    /// valid group config (zero timeouts or `max_deliveries`, a bad DLQ
    /// topic name).
    pub fn apply(&self, group: &str, stored: &GroupConfig) -> Result<GroupConfig> {
        if self.is_empty() {
            return Err(Error::invalid(format!(
                "group `{group}`: alter_group needs at least one setting to change"
            )));
        }
        let mut next = stored.clone();
        if let Some(t) = self.visibility_timeout {
            next.visibility_timeout = t;
        }
        if let Some(t) = self.session_timeout {
            next.session_timeout = t;
        }
        if let Some(n) = self.max_deliveries {
            next.dlq.max_deliveries = n;
        }
        if let Some(topic) = &self.dlq_topic {
            next.dlq.topic = topic.clone();
        }
        if let Some(b) = self.retry_backoff {
            next.retry_backoff = b;
        }
        next.join = JoinSettings::MustMatch;
        crate::validate::group_config(group, &next)?;
        Ok(next)
    }
}

/// The settings fields where `given` differs from `stored`, each as
/// "`field` is X (given Y)". The mode is not compared (a different mode
/// is `GroupModeMismatch`), nor the start (it applies only when the group
/// is created), nor [`GroupConfig::join`].
pub fn differences(stored: &GroupConfig, given: &GroupConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, differ: bool, s: String, g: String| {
        if differ {
            out.push(format!("{name} is {s} (given {g})"));
        }
    };
    field(
        "visibility_timeout",
        stored.visibility_timeout != given.visibility_timeout,
        format!("{:?}", stored.visibility_timeout),
        format!("{:?}", given.visibility_timeout),
    );
    field(
        "session_timeout",
        stored.session_timeout != given.session_timeout,
        format!("{:?}", stored.session_timeout),
        format!("{:?}", given.session_timeout),
    );
    let DlqPolicy {
        max_deliveries,
        topic,
    } = &stored.dlq;
    field(
        "dlq.max_deliveries",
        *max_deliveries != given.dlq.max_deliveries,
        max_deliveries.to_string(),
        given.dlq.max_deliveries.to_string(),
    );
    let dlq_topic = |t: &Option<String>| t.clone().unwrap_or_else(|| "the default".into());
    field(
        "dlq.topic",
        *topic != given.dlq.topic,
        dlq_topic(topic),
        dlq_topic(&given.dlq.topic),
    );
    field(
        "retry_backoff",
        stored.retry_backoff != given.retry_backoff,
        format!("{:?}", stored.retry_backoff),
        format!("{:?}", given.retry_backoff),
    );
    out
}

/// Check a member joining existing `group` (stored settings `stored`)
/// with `given`: fine if they match or the member asked for
/// [`JoinSettings::UseExisting`]. The caller checks the mode first.
///
/// # Errors
/// `InvalidArgument` naming each differing field, stored and given, and
/// the two ways out.
pub fn check_join(group: &str, stored: &GroupConfig, given: &GroupConfig) -> Result<()> {
    if given.join == JoinSettings::UseExisting {
        return Ok(());
    }
    let diff = differences(stored, given);
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "group `{group}` exists with other settings: {}; a group's settings are changed only \
         by alter_group (`conveyor group alter`), not by a joining member: join with the \
         same settings, or with JoinSettings::UseExisting to take the group's",
        diff.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_differing_member_is_told_each_field_stored_and_given() {
        let stored = GroupConfig::queue()
            .with_visibility_timeout(Duration::from_secs(10))
            .with_dlq(DlqPolicy::new(3));
        assert!(check_join("billing", &stored, &stored.clone()).is_ok());
        let e = check_join("billing", &stored, &GroupConfig::queue()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        let m = e.to_string();
        assert!(m.contains("visibility_timeout is 10s (given 30s)"), "{m}");
        assert!(m.contains("dlq.max_deliveries is 3 (given 5)"), "{m}");
        assert!(!m.contains("session_timeout"), "{m}");
        let adopt = GroupConfig::queue().with_join_settings(JoinSettings::UseExisting);
        assert!(check_join("billing", &stored, &adopt).is_ok());
        // The start is a creation setting, not compared.
        let latest = stored.clone().with_start(crate::StartFrom::Latest);
        assert!(check_join("billing", &stored, &latest).is_ok());
    }

    #[test]
    fn changes_apply_only_what_they_name_and_are_validated() {
        let stored = GroupConfig::queue().with_dlq(DlqPolicy::new(3).with_topic("dead"));
        let next = GroupChanges::new()
            .with_visibility_timeout(Duration::from_secs(7))
            .apply("g", &stored)
            .unwrap();
        assert_eq!(next.visibility_timeout, Duration::from_secs(7));
        assert_eq!(next.dlq, stored.dlq);
        assert_eq!(next.mode, stored.mode);
        assert!(GroupChanges::new().apply("g", &stored).is_err());
        assert!(GroupChanges::new()
            .with_max_deliveries(0)
            .apply("g", &stored)
            .is_err());
        let back = GroupChanges::new()
            .with_dlq_topic(None)
            .apply("g", &stored)
            .unwrap();
        assert_eq!(back.dlq.topic, None);
    }
}
