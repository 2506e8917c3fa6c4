//! The consumer-side idempotency store of the embedded engine: a local
//! table, persisted with the group state.

use super::*;

impl<S: LogStorage> Inner<S> {
    pub(super) async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool> {
        crate::validate::first_seen(key, ttl)?;
        self.check_writable(&format!("record idempotency key `{key}`"))?;
        let now = now_ms();
        let fresh = {
            let mut map = self.idempotency.lock();
            if map.len() > 4096 && map.len().is_power_of_two() {
                map.retain(|_, exp| *exp > now);
            }
            match map.get(key) {
                Some(exp) if *exp > now => false,
                _ => {
                    map.insert(key.to_string(), now.saturating_add(millis(ttl)));
                    true
                }
            }
        };
        if fresh {
            self.mark_dirty([StateKey::Idempotency(key.to_string())]);
            self.persist().await?;
        }
        Ok(fresh)
    }

    pub(super) async fn forget(&self, key: &str) -> Result<()> {
        self.check_writable(&format!("forget idempotency key `{key}`"))?;
        self.idempotency.lock().remove(key);
        self.mark_dirty([StateKey::Idempotency(key.to_string())]);
        self.persist().await
    }
}

/// The idempotency store of an [`Engine`]: a local table, persisted with
/// the group state.
pub(super) struct EngineIdempotency<S: LogStorage> {
    pub(super) inner: Arc<Inner<S>>,
}

#[async_trait]
impl<S: LogStorage> IdempotencyStore for EngineIdempotency<S> {
    async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.inner.first_seen(key, ttl).await
    }

    async fn forget(&self, key: &str) -> Result<()> {
        self.inner.forget(key).await
    }
}
