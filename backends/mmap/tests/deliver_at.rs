//! The delivery time of a record survives the segment format and a reopen
//! (contract §3, delayed delivery: "The delivery time survives restarts
//! like every other field"), through the storage API the engine uses.

use bytes::Bytes;
use conveyor_core::backend::{LogStorage, ReadRange, StoredRecord};
use conveyor_core::Header;
use conveyor_mmap::{MmapOptions, MmapStorage};

fn record(i: u64) -> StoredRecord {
    StoredRecord {
        key: Some(Bytes::from(format!("k{i}"))),
        value: Bytes::from(vec![i as u8; i as usize]),
        headers: vec![Header::new("h", "v")],
        idempotency_key: (i % 2 == 1).then(|| format!("evt-{i}")),
        // Every shape: none, zero, an ordinary time, the largest time.
        deliver_at: match i % 4 {
            0 => None,
            1 => Some(0),
            2 => Some(1_700_000_000_000 + i),
            _ => Some(u64::MAX),
        },
    }
}

#[tokio::test]
async fn deliver_at_round_trips_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let want: Vec<StoredRecord> = (0..12).map(record).collect();
    {
        // Small segments, so the records span several files.
        let storage =
            MmapStorage::open(dir.path(), MmapOptions::default().with_segment_bytes(200)).unwrap();
        storage.ensure_partitions("t", 1).await.unwrap();
        for chunk in want.chunks(3) {
            storage.append("t", 0, chunk.to_vec()).await.unwrap();
        }
        let back = storage.read("t", 0, ReadRange::from(0)).await.unwrap();
        let got: Vec<Option<u64>> = back.iter().map(|m| m.deliver_at).collect();
        assert_eq!(got, want.iter().map(|r| r.deliver_at).collect::<Vec<_>>());
        storage.close().await.unwrap();
    }
    let storage = MmapStorage::open(dir.path(), MmapOptions::default()).unwrap();
    storage.ensure_partitions("t", 1).await.unwrap();
    let back = storage.read("t", 0, ReadRange::from(0)).await.unwrap();
    assert_eq!(back.len(), want.len());
    for (m, r) in back.iter().zip(&want) {
        assert_eq!(m.deliver_at, r.deliver_at, "offset {}", m.offset);
        assert_eq!(
            (&m.key, &m.value, &m.headers, &m.idempotency_key),
            (&r.key, &r.value, &r.headers, &r.idempotency_key),
            "offset {}",
            m.offset
        );
    }
    storage.close().await.unwrap();
}
