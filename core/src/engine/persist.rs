//! Persisting group state: which state keys are dirty, their current
//! values, writing them through [`LogStorage::put_state`] before a call
//! returns, and reading them back at open. Owns the value encoding of each
//! [`StateKey`]; knows no delivery rule.

use super::*;

fn corrupt_state(key: &str, err: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("state entry `{key}` cannot be read: {err}"),
    )
}

fn decimal(key: &str, value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt_state(key, "not a decimal number"))
}

fn json<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| corrupt_state(key, e))
}

/// The engine's state as read back at open.
pub(super) struct Restored {
    pub state: State,
    pub idempotency: HashMap<String, u64>,
    /// Keys to write at the next persist: lease entries left stale (to
    /// delete) and tables read in an earlier format (to rewrite).
    pub rewrite: Vec<StateKey>,
}

/// Rebuild the engine's state from every persisted entry: topics and
/// groups first, then what hangs off groups (commits, lease tables);
/// entries of groups that no longer exist are ignored, idempotency entries
/// already expired at `now` are dropped.
pub(super) fn restore(entries: Vec<(String, Bytes)>, now: u64) -> Result<Restored> {
    let mut state = State::default();
    let mut idempotency = HashMap::new();
    let mut later = Vec::new();
    let mut lease_entries: BTreeMap<(String, TopicPartition), BTreeMap<u64, Vec<u8>>> =
        BTreeMap::new();
    let mut rewrite = Vec::new();
    for (text, value) in entries {
        let key: StateKey = text.parse().map_err(|e| corrupt_state(&text, e))?;
        match key {
            StateKey::Topic(topic) => {
                state.topics.insert(topic, json(&text, &value)?);
            }
            StateKey::Group(name) => {
                let meta: GroupMeta = json(&text, &value)?;
                let mut g = Group::new(&name, meta.config);
                g.topics = meta.topics;
                state.groups.insert(name, g);
            }
            StateKey::Idempotency(k) => {
                let expires = decimal(&text, &value)?;
                if expires > now {
                    idempotency.insert(k, expires);
                }
            }
            StateKey::Commit(..) | StateKey::Leases(..) => later.push((text, key, value)),
            StateKey::LeaseEntry(group, tp, offset) => {
                lease_entries
                    .entry((group, tp))
                    .or_default()
                    .insert(offset, value.to_vec());
            }
        }
    }
    for (text, key, value) in later {
        match key {
            StateKey::Commit(group, tp) => {
                if let Some(g) = state.groups.get_mut(&group) {
                    g.stream.entry(tp).or_default().committed = Some(decimal(&text, &value)?);
                }
            }
            StateKey::Leases(group, tp) => {
                let entries = lease_entries
                    .remove(&(group.clone(), tp.clone()))
                    .unwrap_or_default();
                let Some(g) = state.groups.get_mut(&group) else {
                    rewrite.push(StateKey::Leases(group.clone(), tp.clone()));
                    rewrite.extend(
                        entries
                            .into_keys()
                            .map(|o| StateKey::LeaseEntry(group.clone(), tp.clone(), o)),
                    );
                    continue;
                };
                let mut table = if value.first() == Some(&b'{') {
                    LeaseTable::restore_legacy(json::<PersistedLeases>(&text, &value)?)
                } else {
                    let (table, stale) = LeaseTable::restore(&value, entries)
                        .map_err(|e| corrupt_state(&text, e))?;
                    rewrite.extend(
                        stale
                            .into_iter()
                            .map(|o| StateKey::LeaseEntry(group.clone(), tp.clone(), o)),
                    );
                    table
                };
                rewrite.extend(lease_keys(&group, &tp, &mut table));
                g.queue.insert(tp, table);
            }
            _ => {}
        }
    }
    // Entries of a table without a header (its topic was deleted).
    for ((group, tp), entries) in lease_entries {
        rewrite.extend(
            entries
                .into_keys()
                .map(|o| StateKey::LeaseEntry(group.clone(), tp.clone(), o)),
        );
    }
    Ok(Restored {
        state,
        idempotency,
        rewrite,
    })
}

/// The state keys to write for what changed in `table` (the lease table
/// of `group` on `tp`) since they were last taken: its header if it moved,
/// and the entries that appeared, changed or went away. Called under the
/// state lock right after the change; the values are read at persist time.
pub(super) fn lease_keys(
    group: &str,
    tp: &TopicPartition,
    table: &mut LeaseTable,
) -> Vec<StateKey> {
    let changes = table.take_changes();
    let mut keys = Vec::with_capacity(changes.entries.len() + 1);
    if changes.header {
        keys.push(StateKey::Leases(group.to_string(), tp.clone()));
    }
    keys.extend(
        changes
            .entries
            .into_iter()
            .map(|o| StateKey::LeaseEntry(group.to_string(), tp.clone(), o)),
    );
    keys
}

/// The keys that delete a whole lease table: its header and every entry.
pub(super) fn lease_table_deletes(
    group: &str,
    tp: &TopicPartition,
    table: &LeaseTable,
) -> Vec<StateKey> {
    std::iter::once(StateKey::Leases(group.to_string(), tp.clone()))
        .chain(
            table
                .stored_entries()
                .map(|o| StateKey::LeaseEntry(group.to_string(), tp.clone(), o)),
        )
        .collect()
}

impl<S: LogStorage> Inner<S> {
    pub(super) fn mark_dirty(&self, keys: impl IntoIterator<Item = StateKey>) {
        if self.caps.persistent {
            self.dirty.lock().extend(keys);
        }
    }

    /// The current value of `key`, or `None` if it is gone (a delete).
    fn value_for(&self, state: &State, key: &StateKey) -> Option<Bytes> {
        let json = |v: serde_json::Result<Vec<u8>>| v.ok().map(Bytes::from);
        let live = |tp: &TopicPartition| state.topics.contains_key(&tp.topic);
        match key {
            StateKey::Topic(topic) => state
                .topics
                .get(topic)
                .and_then(|c| json(serde_json::to_vec(c))),
            StateKey::Group(group) => state
                .groups
                .get(group)
                .and_then(|g| json(serde_json::to_vec(&g.meta()))),
            StateKey::Idempotency(k) => self
                .idempotency
                .lock()
                .get(k)
                .map(|e| Bytes::from(e.to_string())),
            StateKey::Commit(group, tp) if live(tp) => state
                .groups
                .get(group)?
                .stream
                .get(tp)
                .and_then(|p| p.committed)
                .map(|o| Bytes::from(o.to_string())),
            StateKey::Leases(group, tp) if live(tp) => state
                .groups
                .get(group)?
                .queue
                .get(tp)
                .map(|t| Bytes::from(t.header_value())),
            StateKey::LeaseEntry(group, tp, offset) if live(tp) => state
                .groups
                .get(group)?
                .queue
                .get(tp)?
                .entry_value(*offset)
                .map(Bytes::from),
            StateKey::Commit(..) | StateKey::Leases(..) | StateKey::LeaseEntry(..) => None,
        }
    }

    /// Write every dirty state key, in its current value, before returning.
    /// On failure the keys stay dirty, so the next persist writes them.
    pub(super) async fn persist(&self) -> Result<()> {
        if !self.caps.persistent {
            return Ok(());
        }
        let _guard = self.persist_lock.lock().await;
        let keys = std::mem::take(&mut *self.dirty.lock());
        if keys.is_empty() {
            return Ok(());
        }
        let changes: Vec<(String, Option<Bytes>)> = {
            let state = self.state.lock();
            keys.iter()
                .map(|k| (k.to_string(), self.value_for(&state, k)))
                .collect()
        };
        if let Err(e) = self.storage.put_state(changes).await {
            self.dirty.lock().extend(keys);
            return Err(e);
        }
        Ok(())
    }
}
