//! The state table: an append-only log of checksummed frames (one per
//! `put_state`), replayed at open, compacted when mostly dead.
//!
//! Owns `state.log` and nothing else; it does not interpret keys or values.

use crate::format;
use crate::partition::open_append;
use bytes::Bytes;
use conveyor_core::{Durability, Error, Result};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
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

pub(crate) struct StateLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    durability: Durability,
    /// Serialises syncs and compactions.
    sync: tokio::sync::Mutex<()>,
}

fn entry_size(k: &str, v: &Bytes) -> u64 {
    (9 + k.len() + v.len()) as u64
}

impl StateLog {
    /// Replay `state.log` in `dir`: torn last frame cut, damage before it
    /// is `Corrupt`.
    pub fn open(dir: &Path, durability: Durability) -> Result<StateLog> {
        let path = dir.join("state.log");
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let mut entries = BTreeMap::new();
        let mut pos = 0usize;
        while pos < data.len() {
            match format::decode_state_frame(&data[pos..]) {
                Ok((changes, len)) => {
                    for (k, v) in changes {
                        match v {
                            Some(v) => entries.insert(k, v),
                            None => entries.remove(&k),
                        };
                    }
                    pos += len;
                }
                Err(e) => {
                    // Torn only if no valid frame follows (the checksum
                    // does not cover the length: see segment::is_torn_tail).
                    let rest = &data[pos..];
                    let magic = format::STATE_MAGIC.to_le_bytes();
                    let torn = !(1..rest.len().saturating_sub(3)).any(|i| {
                        rest[i..i + 4] == magic && format::decode_state_frame(&rest[i..]).is_ok()
                    });
                    if !torn {
                        return Err(crate::segment::corrupt(
                            &path,
                            pos as u64,
                            format!("{e}, and data follows it"),
                        ));
                    }
                    tracing::warn!(path = %path.display(), at = pos, "cutting torn state frame");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                    f.set_len(pos as u64)
                        .and_then(|()| f.sync_all())
                        .map_err(|e| Error::io(format!("truncate {}", path.display()), e))?;
                    break;
                }
            }
        }
        let live = entries.iter().map(|(k, v)| entry_size(k, v)).sum();
        let file = Arc::new(open_append(&path)?);
        Ok(StateLog {
            path,
            inner: Mutex::new(Inner {
                file,
                len: pos as u64,
                entries,
                live,
            }),
            durability,
            sync: tokio::sync::Mutex::new(()),
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
    pub async fn put(&self, changes: Vec<(String, Option<Bytes>)>) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let frame = format::encode_state_frame(&changes)
            .map_err(|e| Error::invalid(format!("{}: state change: {e}", self.path.display())))?;
        let (file, compact) = {
            let mut inner = self.inner.lock();
            let before = inner.len;
            if let Err(e) = (&*inner.file).write_all(&frame) {
                // Never leave half a frame before the next one.
                let _ = inner.file.set_len(before);
                return Err(Error::io(format!("write {}", self.path.display()), e));
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
            let compact = inner.len > COMPACT_MIN && inner.len > COMPACT_FACTOR * inner.live;
            (inner.file.clone(), compact)
        };
        if self.durability == Durability::Always {
            let _g = self.sync.lock().await;
            sync_file(file, &self.path).await?;
        }
        if compact {
            self.compact().await?;
        }
        Ok(())
    }

    /// Rewrite the live entries as one frame and swap it in atomically
    /// (write a new file, sync, rename over, sync the directory). Rare, so
    /// it runs under the lock: no frame can slip in between.
    async fn compact(&self) -> Result<()> {
        let _g = self.sync.lock().await;
        let mut inner = self.inner.lock();
        if !(inner.len > COMPACT_MIN && inner.len > COMPACT_FACTOR * inner.live) {
            return Ok(());
        }
        let tmp = self.path.with_extension("log.compact");
        let entries: Vec<(String, Option<Bytes>)> = inner
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        let frame = format::encode_state_frame(&entries)
            .map_err(|e| Error::internal(format!("compact {}: {e}", self.path.display())))?;
        let swap = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&frame)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        swap().map_err(|e| Error::io(format!("compact {}", self.path.display()), e))?;
        inner.file = Arc::new(open_append(&self.path)?);
        inner.len = frame.len() as u64;
        tracing::debug!(path = %self.path.display(), bytes = inner.len, "state log compacted");
        Ok(())
    }

    /// Sync the state log now.
    pub async fn flush(&self) -> Result<()> {
        let _g = self.sync.lock().await;
        let file = self.inner.lock().file.clone();
        sync_file(file, &self.path).await
    }
}

/// `fdatasync` off the async runtime.
pub(crate) async fn sync_file(file: Arc<File>, path: &Path) -> Result<()> {
    let result = match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| Error::internal(format!("sync task: {e}")))?,
        Err(_) => file.sync_data(),
    };
    result.map_err(|e| Error::io(format!("sync {}", path.display()), e))
}
