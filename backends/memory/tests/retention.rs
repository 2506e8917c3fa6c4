//! Retention edge cases of the memory storage, driven through
//! [`LogStorage`] with explicit clocks (no waiting).

use conveyor_core::backend::{LogStorage, StoredRecord};
use conveyor_core::{Result, Retention};
use conveyor_memory::MemoryStorage;
use std::time::Duration;

fn record(value: &'static str) -> StoredRecord {
    StoredRecord {
        key: None,
        value: value.into(),
        headers: Vec::new(),
        idempotency_key: None,
        deliver_at: None,
    }
}

/// An age whose milliseconds pass `u64::MAX` keeps everything: it must
/// saturate, not wrap. 2^64 + 1 ms wrapped by `as u64` is 1 ms, which
/// would delete every record older than 1 ms.
#[tokio::test]
async fn age_beyond_u64_millis_saturates() -> Result<()> {
    let storage = MemoryStorage::default();
    storage.ensure_partitions("t", 1).await?;
    let appended = storage.append("t", 0, vec![record("fresh")]).await?;
    let huge = Duration::new(18_446_744_073_709_551, 617_000_000);
    assert_eq!(huge.as_millis(), (1u128 << 64) + 1, "the age wraps to 1 ms");
    let retention = Retention::forever().with_max_age(huge);
    let later = appended.timestamp + 10_000;
    storage.enforce_retention("t", 0, &retention, later).await?;
    let b = storage.bounds("t", 0)?;
    assert_eq!(
        (b.log_start, b.log_end),
        (0, 1),
        "a 584-million-year age deleted a 10 s old record"
    );

    // The same storage still applies a small age normally.
    let small = Retention::forever().with_max_age(Duration::from_secs(1));
    storage.enforce_retention("t", 0, &small, later).await?;
    assert_eq!(storage.bounds("t", 0)?.log_start, 1);
    Ok(())
}
