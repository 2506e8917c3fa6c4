//! Group administration: delete a group (its offsets, lease tables and
//! config), refused while it has live members. Decided under the state
//! lock, persisted before return; the records are never touched.

use super::*;

impl<S: LogStorage> Inner<S> {
    pub(super) async fn delete_group(&self, group: &str) -> Result<()> {
        validate::group_name(group)?;
        let _admin = self.admin_lock.lock().await;
        let now = now_ms();
        let mut dirty = vec![StateKey::Group(group.to_string())];
        {
            let mut state = self.state.lock();
            let g = state
                .groups
                .get_mut(group)
                .ok_or_else(|| Error::group_not_found(group))?;
            // Members silent past their session timeout are gone already,
            // whether or not the sweeper has run.
            g.expire_members(now);
            if !g.members.is_empty() {
                let ids: Vec<String> = g.members.keys().map(u64::to_string).collect();
                return Err(Error::group_not_empty(group, &ids));
            }
            let g = state.groups.remove(group).expect("found above");
            for tp in g.stream.keys() {
                dirty.push(StateKey::Commit(group.to_string(), tp.clone()));
            }
            for (tp, table) in &g.queue {
                dirty.extend(persist::lease_table_deletes(group, tp, table));
            }
        }
        self.mark_dirty(dirty);
        self.persist().await?;
        self.notify();
        tracing::debug!(group, "group deleted");
        Ok(())
    }
}
