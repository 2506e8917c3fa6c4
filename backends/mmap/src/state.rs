//! The state table: an append-only log of checksummed frames (one per
//! `put_state`), replayed at open, compacted when mostly dead.
//!
//! Owns `state.log` and nothing else; it does not interpret keys or values.

use crate::fail_stop::FailStop;
use crate::format;
use crate::fs;
use crate::recovery::{tolerate_torn_tail, Frame, Scanned};
use bytes::Bytes;
use conveyor_core::{Durability, Error, Result};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Compact once the file is this many times larger than the live data.
const COMPACT_FACTOR: u64 = 4;
/// ... and larger than this.
const COMPACT_MIN: u64 = 1 << 20;

struct Inner {
    file: Arc<File>,
    len: u64,
    entries: BTreeMap<String, Bytes>,
    live: u64,
}

impl Inner {
    fn wants_compaction(&self) -> bool {
        self.len > COMPACT_MIN && self.len > COMPACT_FACTOR * self.live
    }
}

pub(crate) struct StateLog {
    path: Arc<PathBuf>,
    inner: Arc<Mutex<Inner>>,
    durability: Durability,
    /// Serialises syncs and compactions.
    sync: tokio::sync::Mutex<()>,
    /// Tripped by a failed sync: puts are refused until reopened.
    failed: Arc<FailStop>,
}

fn entry_size(k: &str, v: &Bytes) -> u64 {
    (9 + k.len() + v.len()) as u64
}

/// The file of the state log in a store directory.
pub(crate) fn path_in(dir: &Path) -> PathBuf {
    dir.join("state.log")
}

/// State frames replayed from a file.
pub(crate) struct Replayed {
    /// The table: every key's latest value.
    pub entries: BTreeMap<String, Bytes>,
    /// Valid frames read.
    pub frames: u64,
    /// Where the valid frames end and whether a torn tail follows.
    pub scanned: Scanned,
}

/// Replay state frames from `data` (the file at `path`) into a table,
/// per the torn-tail rule. Touches no file.
pub(crate) fn replay(path: &Path, data: &[u8]) -> Result<Replayed> {
    let mut entries = BTreeMap::new();
    let mut frames = 0;
    let scanned = tolerate_torn_tail(
        path,
        data,
        &[format::STATE_MAGIC],
        |_, rest| {
            Ok(match format::decode_state_frame(rest) {
                Ok((changes, len)) => {
                    for (k, v) in changes {
                        match v {
                            Some(v) => entries.insert(k, v),
                            None => entries.remove(&k),
                        };
                    }
                    frames += 1;
                    Frame::Valid(len)
                }
                Err(e) => Frame::Bad(e),
            })
        },
        |rest| format::decode_state_frame(rest).is_ok(),
    )?;
    Ok(Replayed {
        entries,
        frames,
        scanned,
    })
}

/// The table in `dir`'s state log as of now, read once without changing
/// the file (blocking): up to the last complete frame, so a frame being
/// written by the store's owner (or a torn tail) is left out. No file is
/// an empty table.
pub(crate) fn snapshot(dir: &Path) -> Result<Vec<(String, Bytes)>> {
    let path = path_in(dir);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(fs::io("read", &path)(e)),
    };
    Ok(replay(&path, &data)?.entries.into_iter().collect())
}

impl StateLog {
    /// Replay `state.log` in `dir` (blocking): torn last frame cut, damage
    /// before it is `Corrupt`.
    pub fn open(dir: &Path, durability: Durability) -> Result<StateLog> {
        let path = path_in(dir);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(fs::io("read", &path)(e)),
        };
        let Replayed {
            entries, scanned, ..
        } = replay(&path, &data)?;
        if let Some(at) = scanned.torn_at {
            tracing::warn!(path = %path.display(), at, "cutting torn state frame");
            fs::truncate(&path, at)?;
        }
        let live = entries.iter().map(|(k, v)| entry_size(k, v)).sum();
        let file = Arc::new(fs::open_append(&path)?);
        Ok(StateLog {
            path: Arc::new(path),
            inner: Arc::new(Mutex::new(Inner {
                file,
                len: scanned.valid_len,
                entries,
                live,
            })),
            durability,
            sync: tokio::sync::Mutex::new(()),
            failed: Arc::new(FailStop::default()),
        })
    }

    pub fn entries(&self) -> Vec<(String, Bytes)> {
        self.inner
            .lock()
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Append one frame with all `changes`; durable per the durability.
    /// Refused once a sync of the state log failed (fail-stop).
    pub async fn put(&self, changes: Vec<(String, Option<Bytes>)>) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.failed.check()?;
        let frame = format::encode_state_frame(&changes)
            .map_err(|e| Error::invalid(format!("{}: state change: {e}", self.path.display())))?;
        let (file, compact) = {
            let mut inner = self.inner.lock();
            let before = inner.len;
            if let Err(e) = (&*inner.file).write_all(&frame) {
                // Never leave half a frame before the next one.
                let _ = inner.file.set_len(before);
                return Err(fs::io("write", &self.path)(e));
            }
            inner.len += frame.len() as u64;
            for (k, v) in changes {
                if let Some(old) = inner.entries.get(&k) {
                    inner.live -= entry_size(&k, old);
                }
                match v {
                    Some(v) => {
                        inner.live += entry_size(&k, &v);
                        inner.entries.insert(k, v);
                    }
                    None => {
                        inner.entries.remove(&k);
                    }
                }
            }
            (inner.file.clone(), inner.wants_compaction())
        };
        if self.durability == Durability::Always {
            let _g = self.sync.lock().await;
            self.sync_file(file).await?;
        }
        if compact {
            self.compact().await?;
        }
        Ok(())
    }

    /// `fdatasync` the state log off the runtime; a failure trips the
    /// fail-stop. Callers hold `self.sync`.
    async fn sync_file(&self, file: Arc<File>) -> Result<()> {
        self.failed.check()?;
        let path = self.path.clone();
        let result = fs::blocking(move || fs::sync_data(&file, &path)).await;
        self.failed.watch(&self.path, result)
    }

    /// Rewrite the live entries as one frame and swap it in atomically
    /// (`fs::write_atomic`), on the blocking pool. Rare, so it holds the
    /// table's lock throughout: no frame can slip in between (puts wait
    /// for it).
    async fn compact(&self) -> Result<()> {
        let _g = self.sync.lock().await;
        self.failed.check()?;
        let (inner, path) = (self.inner.clone(), self.path.clone());
        let result = fs::blocking(move || {
            let mut inner = inner.lock();
            if !inner.wants_compaction() {
                return Ok(());
            }
            let entries: Vec<(String, Option<Bytes>)> = inner
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect();
            let frame = format::encode_state_frame(&entries)
                .map_err(|e| Error::internal(format!("compact {}: {e}", path.display())))?;
            fs::write_atomic(&path, &frame)?;
            inner.file = Arc::new(fs::open_append(&path)?);
            inner.len = frame.len() as u64;
            tracing::debug!(path = %path.display(), bytes = inner.len, "state log compacted");
            Ok(())
        })
        .await;
        self.failed.watch(&self.path, result)
    }

    /// The same, from a plain thread (the interval flusher).
    pub fn flush_blocking(&self) -> Result<()> {
        let _g = self.sync.blocking_lock();
        self.failed.check()?;
        let file = self.inner.lock().file.clone();
        self.failed
            .watch(&self.path, fs::sync_data(&file, &self.path))
    }

    /// Sync the state log now.
    pub async fn flush(&self) -> Result<()> {
        let _g = self.sync.lock().await;
        let file = self.inner.lock().file.clone();
        self.sync_file(file).await
    }
}
