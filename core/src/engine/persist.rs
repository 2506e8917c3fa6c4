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

/// Rebuild the engine's state from every persisted entry: topics and
/// groups first, then what hangs off groups (commits, lease tables);
/// entries of groups that no longer exist are ignored, idempotency entries
/// already expired at `now` are dropped.
pub(super) fn restore(
    entries: Vec<(String, Bytes)>,
    now: u64,
) -> Result<(State, HashMap<String, u64>)> {
    let mut state = State::default();
    let mut idempotency = HashMap::new();
    let mut later = Vec::new();
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
                if let Some(g) = state.groups.get_mut(&group) {
                    let p: PersistedLeases = json(&text, &value)?;
                    g.queue.insert(tp, LeaseTable::restore(p));
                }
            }
            _ => {}
        }
    }
    Ok((state, idempotency))
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
                .and_then(|t| json(serde_json::to_vec(&t.persisted()))),
            StateKey::Commit(..) | StateKey::Leases(..) => None,
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
