//! Explicit changes of a group's settings ([`Broker::alter_group`]): the
//! stored config is replaced under the state lock and persisted; running
//! members read it at each lease, failure and heartbeat, so they follow.
//! Joining (which never changes the settings) lives in `membership`.
//!
//! [`Broker::alter_group`]: crate::Broker::alter_group

use super::*;
use crate::group_settings::GroupChanges;

impl<S: LogStorage> Inner<S> {
    pub(super) async fn alter_group(
        &self,
        group: &str,
        changes: &GroupChanges,
    ) -> Result<GroupConfig> {
        self.check_open()?;
        validate::group_name(group)?;
        let next = {
            let mut state = self.state.lock();
            let g = state
                .groups
                .get_mut(group)
                .ok_or_else(|| Error::group_not_found(group))?;
            let next = changes.apply(group, &g.config)?;
            g.config = next.clone();
            next
        };
        self.mark_dirty([StateKey::Group(group.to_string())]);
        self.persist().await?;
        self.notify();
        tracing::info!(group, ?changes, "group settings altered");
        Ok(next)
    }

    /// The group's stored settings.
    pub(super) fn group_settings(&self, group: &str) -> Result<GroupConfig> {
        self.check_open()?;
        self.state
            .lock()
            .groups
            .get(group)
            .map(|g| g.config.clone())
            .ok_or_else(|| Error::group_not_found(group))
    }
}
