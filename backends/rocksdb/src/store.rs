//! [`RocksStorage`]: the database handle, the topic-id table, the
//! partition map and the [`LogStorage`] implementation over them.
//!
//! Owns the RocksDB instance (and so its `LOCK`), the flusher thread of
//! `Durability::Interval` and the writer thread (`writer.rs`); the
//! per-partition rules live in `partition.rs`, the bytes in `layout.rs`.
//! Every RocksDB call runs off the async workers: appends on the writer
//! thread (or in place on a thread that is no async worker), the rest
//! through [`blocking`].

use crate::error::{closed, corrupt, from_rocksdb};
use crate::layout::{
    partition_meta_key, record_key, topic_id_key, CF_META, CF_RECORDS, CF_STATE, FORMAT,
    META_FORMAT, META_NEXT_TOPIC_ID,
};
use crate::partition::{cf, meta_or_empty, Partition};
use crate::writer::Writer;
use crate::RocksOptions;
use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::backend::{blocking, may_block_in_place, spawn_interval_flusher};
use conveyor_core::backend::{
    Appended, LogStorage, PartitionBounds, PartitionMap, ReadRange, StoredMessage, StoredRecord,
};
use conveyor_core::{Capabilities, Durability, Error, ErrorKind, Receipt, Result, Retention};
use parking_lot::{Mutex, RwLock};
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, IteratorMode, Options,
    WriteBatch, WriteOptions, DB,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Shared {
    path: PathBuf,
    options: RocksOptions,
    db: RwLock<Option<Arc<DB>>>,
    partitions: PartitionMap<Partition>,
    /// Topic name → compact id, as persisted in the meta column family.
    /// Assignments happen under this lock.
    topic_ids: Mutex<HashMap<String, u32>>,
    closed: AtomicBool,
    /// Read-only: the secondary instance's own directory (removed at
    /// close).
    secondary: Option<PathBuf>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A read-only store dropped without `close` (a panic, an early
        // return) still removes its secondary instance's directory.
        if let Some(dir) = &self.secondary {
            if let Some(db) = self.db.get_mut().take() {
                drop(db);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Shared {
    /// The database's directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The open database (`Closed` after `close`).
    pub(crate) fn db(&self) -> Result<Arc<DB>> {
        self.db.read().clone().ok_or_else(|| closed(&self.path))
    }

    /// `ReadOnly` for a write to a store opened read-only.
    /// (`what` names the write; built only for the error.)
    fn writable(&self, what: impl FnOnce() -> String) -> Result<()> {
        match self.options.read_only {
            true => Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "{} in {}: the store was opened read-only (read_only=true)",
                    what(),
                    self.path.display()
                ),
            )),
            false => Ok(()),
        }
    }

    /// Whether every write is synced (`Durability::Always`).
    pub(crate) fn sync(&self) -> bool {
        self.options.durability == Durability::Always
    }
}

/// A RocksDB database in a directory, owned by this process while open.
pub struct RocksStorage {
    shared: Arc<Shared>,
    /// The writer thread (none for a read-only store): appends from async
    /// tasks, grouped into one `WriteBatch`.
    writer: Option<Writer>,
}

impl std::fmt::Debug for RocksStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStorage")
            .field("path", &self.shared.path)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Two cores here: a flush and a compaction may run beside the writers.
    o.increase_parallelism(2);
    o.set_max_background_jobs(2);
    o
}

fn records_options() -> Options {
    let mut o = Options::default();
    // LZ4: the one codec compiled in (see the crate docs).
    o.set_compression_type(DBCompressionType::Lz4);
    let mut table = BlockBasedOptions::default();
    table.set_block_size(32 * 1024);
    o.set_block_based_table_factory(&table);
    o
}

fn small_options() -> Options {
    let mut o = Options::default();
    o.set_compression_type(DBCompressionType::None);
    o
}

impl RocksStorage {
    /// Open (or create) the database in `path` (blocking: call it off the
    /// async runtime, as [`crate::open`] does). A second open of the same
    /// path is `ErrorKind::Locked`.
    ///
    /// # Errors
    /// `Locked`, `Corrupt` (RocksDB's report, naming the file; or a layout
    /// this build does not know), `Io`.
    pub fn open(path: impl AsRef<Path>, options: RocksOptions) -> Result<RocksStorage> {
        let path = path.as_ref().to_path_buf();
        let exists = path.join("CURRENT").is_file();
        if !exists && (options.read_only || !options.create) {
            return Err(Error::invalid(format!(
                "{}: no conveyor-rocksdb store here (no RocksDB CURRENT file); check the \
                 path, or pass create=true to create one",
                path.display()
            )));
        }
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_RECORDS, records_options()),
            ColumnFamilyDescriptor::new(CF_STATE, small_options()),
            ColumnFamilyDescriptor::new(CF_META, small_options()),
        ];
        let mut secondary = None;
        let db = if options.read_only {
            let dir = secondary_dir();
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            let mut o = db_options();
            o.create_if_missing(false);
            o.create_missing_column_families(false);
            // A secondary instance keeps every table file open.
            o.set_max_open_files(-1);
            let opened = DB::open_cf_descriptors_as_secondary(&o, &path, &dir, cfs);
            secondary = Some(dir.clone());
            opened.map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                from_rocksdb(&path, "open read-only", e)
            })?
        } else {
            std::fs::create_dir_all(&path)
                .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
            DB::open_cf_descriptors(&db_options(), &path, cfs)
                .map_err(|e| from_rocksdb(&path, "open", e))?
        };
        let meta = cf(&db, &path, CF_META)?;
        match db
            .get_cf(meta, META_FORMAT)
            .map_err(|e| from_rocksdb(&path, "read the layout version", e))?
        {
            None if options.read_only => {
                return Err(Error::invalid(format!(
                    "{}: not a conveyor-rocksdb store (no layout version)",
                    path.display()
                )))
            }
            None => {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                db.put_cf_opt(meta, META_FORMAT, FORMAT, &wo)
                    .map_err(|e| from_rocksdb(&path, "write the layout version", e))?;
            }
            Some(v) if v == FORMAT => {}
            Some(v) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "store {}: layout `{}` is not `{}`, the one this build reads",
                        path.display(),
                        String::from_utf8_lossy(&v),
                        String::from_utf8_lossy(FORMAT)
                    ),
                ))
            }
        }
        let topic_ids = read_topic_ids(&db, &path)?;
        let shared = Arc::new(Shared {
            path,
            options,
            db: RwLock::new(Some(Arc::new(db))),
            partitions: PartitionMap::default(),
            topic_ids: Mutex::new(topic_ids),
            closed: AtomicBool::new(false),
            secondary,
        });
        if options.read_only {
            spawn_interval_flusher("conveyor-rocksdb-follow", &shared, FOLLOW_EVERY, follow)?;
        } else if let Durability::Interval(every) = options.durability {
            spawn_interval_flusher("conveyor-rocksdb-flush", &shared, every, sync_wal)?;
        }
        let writer = match options.read_only {
            true => None,
            false => Some(Writer::start(&shared)?),
        };
        Ok(RocksStorage { shared, writer })
    }

    /// The database's directory.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>> {
        self.shared.partitions.get(topic, partition)
    }

    /// Run `f` with the database on the blocking pool.
    async fn with_db<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&DB, &Path) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.shared.db()?;
        let shared = self.shared.clone();
        blocking(move || f(&db, &shared.path)).await
    }
}

/// How often a read-only store catches up with the owner's writes.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// A fresh directory for a secondary instance's own files.
fn secondary_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "conveyor-rocksdb-secondary-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Topic name → id, from the meta column family.
fn read_topic_ids(db: &DB, path: &Path) -> Result<HashMap<String, u32>> {
    let meta = cf(db, path, CF_META)?;
    let mut topic_ids = HashMap::new();
    for item in db.iterator_cf(meta, IteratorMode::From(b"t", rocksdb::Direction::Forward)) {
        let (k, v) = item.map_err(|e| from_rocksdb(path, "read the topic ids", e))?;
        let Some(name) = k.strip_prefix(b"t") else {
            break;
        };
        let name = std::str::from_utf8(name)
            .map_err(|_| corrupt(path, "topic id entry with a non-UTF-8 name"))?;
        let id: [u8; 4] = v[..]
            .try_into()
            .map_err(|_| corrupt(path, format!("topic `{name}`: id undecodable")))?;
        topic_ids.insert(name.to_string(), u32::from_be_bytes(id));
    }
    Ok(topic_ids)
}

/// One tick of a read-only store: catch up with the owner's writes, then
/// publish each open partition's bounds as written (records and bounds
/// come in one `WriteBatch`, so what the bounds cover is readable).
/// `false` once the store is closed.
fn follow(shared: &Shared) -> bool {
    if shared.closed.load(Ordering::Acquire) {
        return false;
    }
    let Ok(db) = shared.db() else {
        return false;
    };
    let path = &shared.path;
    let result = db
        .try_catch_up_with_primary()
        .map_err(|e| from_rocksdb(path, "catch up with the owner", e))
        .and_then(|()| {
            let meta = cf(&db, path, CF_META)?;
            for part in shared.partitions.all() {
                let raw = db
                    .get_cf(meta, part.meta_key())
                    .map_err(|e| from_rocksdb(path, "read partition bounds", e))?;
                if let Some(raw) = raw {
                    part.publish(meta_or_empty(path, part.topic(), part.index(), Some(raw))?);
                }
            }
            Ok(())
        });
    if let Err(e) = result {
        tracing::warn!(error = %e, path = %path.display(), "read-only store could not catch up");
    }
    true
}

/// One tick of the interval flusher: sync the WAL; `false` once the store
/// is closed.
fn sync_wal(shared: &Shared) -> bool {
    if shared.closed.load(Ordering::Acquire) {
        return false;
    }
    let Ok(db) = shared.db() else {
        return false;
    };
    if let Err(e) = db.flush_wal(true) {
        tracing::warn!(error = %e, path = %shared.path.display(), "interval WAL sync failed");
    }
    true
}

/// The topic's id, assigned (and persisted, synced) on first use.
fn topic_id(shared: &Shared, db: &DB, topic: &str) -> Result<u32> {
    let mut ids = shared.topic_ids.lock();
    if let Some(id) = ids.get(topic) {
        return Ok(*id);
    }
    let path = &shared.path;
    shared.writable(|| format!("create topic `{topic}`"))?;
    let meta = cf(db, path, CF_META)?;
    let next = match db
        .get_cf(meta, META_NEXT_TOPIC_ID)
        .map_err(|e| from_rocksdb(path, "read the next topic id", e))?
    {
        None => 0,
        Some(v) => u32::from_be_bytes(
            v[..]
                .try_into()
                .map_err(|_| corrupt(path, "next topic id undecodable"))?,
        ),
    };
    let after = next.checked_add(1).ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            "topic ids exhausted (2^32 topics created)",
        )
    })?;
    let mut batch = WriteBatch::default();
    batch.put_cf(meta, topic_id_key(topic), next.to_be_bytes());
    batch.put_cf(meta, META_NEXT_TOPIC_ID, after.to_be_bytes());
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo)
        .map_err(|e| from_rocksdb(path, &format!("assign an id to topic `{topic}`"), e))?;
    ids.insert(topic.to_string(), next);
    Ok(next)
}

#[async_trait]
impl LogStorage for RocksStorage {
    fn capabilities(&self) -> Capabilities {
        Capabilities::EMBEDDED
    }

    async fn load_state(&self) -> Result<Vec<(String, Bytes)>> {
        self.with_db(|db, path| {
            let mut out = Vec::new();
            for item in db.iterator_cf(cf(db, path, CF_STATE)?, IteratorMode::Start) {
                let (k, v) = item.map_err(|e| from_rocksdb(path, "read the state", e))?;
                let k = String::from_utf8(k.into_vec())
                    .map_err(|_| corrupt(path, "state key is not UTF-8"))?;
                out.push((k, Bytes::from(v.into_vec())));
            }
            Ok(out)
        })
        .await
    }

    async fn put_state(&self, changes: Vec<(String, Option<Bytes>)>) -> Result<()> {
        self.shared.writable(|| "change the state".into())?;
        let sync = self.shared.sync();
        self.with_db(move |db, path| {
            let state = cf(db, path, CF_STATE)?;
            let mut batch = WriteBatch::default();
            for (k, v) in &changes {
                match v {
                    Some(v) => batch.put_cf(state, k, v),
                    None => batch.delete_cf(state, k),
                }
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(sync);
            db.write_opt(batch, &wo)
                .map_err(|e| from_rocksdb(path, "write state", e))
        })
        .await
    }

    async fn ensure_partitions(&self, topic: &str, partitions: u32) -> Result<()> {
        let have = self.shared.partitions.count(topic);
        if have >= partitions {
            return Ok(());
        }
        let shared = self.shared.clone();
        let name = topic.to_string();
        // One blocking call reads every missing partition's bounds.
        let prepared = self
            .with_db(move |db, path| {
                let id = topic_id(&shared, db, &name)?;
                let meta = cf(db, path, CF_META)?;
                let keys: Vec<_> = (have..partitions)
                    .map(|p| (meta, partition_meta_key(id, p)))
                    .collect();
                let metas = db.multi_get_cf(keys);
                (have..partitions)
                    .zip(metas)
                    .map(|(p, raw)| {
                        let raw = raw.map_err(|e| {
                            from_rocksdb(path, &format!("read topic `{name}` partition {p}"), e)
                        })?;
                        let m = meta_or_empty(path, &name, p, raw)?;
                        Ok(Some(Partition::new(&name, id, p, m)))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .await?;
        let slots = Mutex::new(prepared);
        self.shared
            .partitions
            .grow(topic, partitions, |p| {
                let part = p
                    .checked_sub(have)
                    .and_then(|i| slots.lock().get_mut(i as usize).and_then(Option::take));
                async move {
                    part.ok_or_else(|| {
                        Error::internal(format!("partition {p} opened twice concurrently"))
                    })
                }
            })
            .await
    }

    async fn drop_topic(&self, topic: &str) -> Result<()> {
        self.shared.writable(|| format!("drop topic `{topic}`"))?;
        self.shared.partitions.remove(topic);
        let shared = self.shared.clone();
        let topic = topic.to_string();
        self.with_db(move |db, path| {
            let mut ids = shared.topic_ids.lock();
            let Some(&id) = ids.get(&topic) else {
                return Ok(());
            };
            let end = id.checked_add(1);
            let mut batch = WriteBatch::default();
            let (records, meta) = (cf(db, path, CF_RECORDS)?, cf(db, path, CF_META)?);
            match end {
                Some(end) => {
                    batch.delete_range_cf(records, record_key(id, 0, 0), record_key(end, 0, 0));
                    batch.delete_range_cf(
                        meta,
                        partition_meta_key(id, 0),
                        partition_meta_key(end, 0),
                    );
                }
                None => {
                    let (from, to) = (record_key(id, 0, 0).to_vec(), vec![0xff; 17]);
                    batch.delete_range_cf(records, from, to);
                    let (from, to) = (partition_meta_key(id, 0).to_vec(), vec![0xff; 10]);
                    batch.delete_range_cf(meta, from, to);
                }
            }
            batch.delete_cf(meta, topic_id_key(&topic));
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo)
                .map_err(|e| from_rocksdb(path, &format!("drop topic `{topic}`"), e))?;
            ids.remove(&topic);
            Ok(())
        })
        .await
    }

    async fn append(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<StoredRecord>,
    ) -> Result<Appended> {
        self.shared
            .writable(|| format!("append to `{topic}` partition {partition}"))?;
        let part = self.partition(topic, partition)?;
        let sync = self.shared.sync();
        let now = conveyor_core::now_ms();
        // An unsynced append called from a thread that is no async worker
        // (a multi-thread runtime's `block_on` thread) is written right
        // here: no thread hop at all. Every other append goes to the
        // writer thread, which groups what is queued into one `WriteBatch`
        // (one sync under `Always`): never on an async worker, since even
        // an unsynced write can block (see `# Writes` in the crate docs).
        if !sync && may_block_in_place() {
            let db = self.shared.db()?;
            return part.append(&db, &self.shared.path, &records, now, false);
        }
        match &self.writer {
            Some(writer) => writer.append(&self.shared, part, records, now).await,
            None => Err(Error::internal("append to a store without a writer thread")),
        }
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        range: ReadRange,
    ) -> Result<Vec<StoredMessage>> {
        let part = self.partition(topic, partition)?;
        if part.bounds().log_end <= range.from {
            return Ok(Vec::new());
        }
        self.with_db(move |db, path| part.read(db, path, range))
            .await
    }

    fn bounds(&self, topic: &str, partition: u32) -> Result<PartitionBounds> {
        Ok(self.partition(topic, partition)?.bounds())
    }

    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64> {
        let part = self.partition(topic, partition)?;
        self.with_db(move |db, path| part.offset_for_timestamp(db, path, timestamp))
            .await
    }

    async fn enforce_retention(
        &self,
        topic: &str,
        partition: u32,
        retention: &Retention,
        now_ms: u64,
    ) -> Result<()> {
        // The owner enforces retention; a read-only engine never asks.
        self.shared
            .writable(|| format!("retention of `{topic}` partition {partition}"))?;
        let part = self.partition(topic, partition)?;
        let (retention, sync) = (*retention, self.shared.sync());
        self.with_db(move |db, path| part.enforce_retention(db, path, &retention, now_ms, sync))
            .await
    }

    async fn idempotency_keys_since(
        &self,
        topic: &str,
        since_ms: u64,
    ) -> Result<Vec<(String, Receipt)>> {
        let parts = self.shared.partitions.topic(topic);
        self.with_db(move |db, path| {
            let mut out = Vec::new();
            for (p, part) in parts.iter().enumerate() {
                for (key, offset, timestamp) in part.idempotency_keys_since(db, path, since_ms)? {
                    out.push((
                        key,
                        Receipt {
                            partition: p as u32,
                            offset,
                            timestamp,
                        },
                    ));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        if self.shared.options.read_only {
            return Ok(()); // nothing written here
        }
        self.with_db(|db, path| {
            db.flush_wal(true)
                .map_err(|e| from_rocksdb(path, "sync the WAL", e))
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let flushed = self.flush().await;
        self.shared.partitions.clear();
        let db = self.shared.db.write().take();
        if let Some(db) = db {
            // Wait out calls still holding the handle (a flusher tick, a
            // read in flight), then close it, releasing `LOCK`.
            blocking(move || {
                let mut db = db;
                for _ in 0..10_000 {
                    match Arc::try_unwrap(db) {
                        Ok(db) => {
                            drop(db);
                            return Ok(());
                        }
                        Err(still) => db = still,
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(Error::internal(
                    "RocksDB handle still in use 10 s after close; it closes when released",
                ))
            })
            .await?;
        }
        if let Some(dir) = &self.shared.secondary {
            let _ = std::fs::remove_dir_all(dir);
        }
        flushed
    }
}
