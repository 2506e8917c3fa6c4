//! One partition: its directory of segments, the append path (with segment
//! rolls and group-commit syncs), reads, time lookups, and retention with a
//! persisted log start.
//!
//! Owns the files under `topics/<topic>/<partition>/`; knows nothing of
//! groups or topics' configs beyond the retention it is handed.

use crate::format::{self, RecordData};
use crate::segment::{self, corrupt, Segment};
use crate::state::sync_file;
use conveyor_core::engine::{Appended, PartitionBounds, ReadRange, StoredMessage};
use conveyor_core::{Durability, Error, Result, Retention};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file holding the log start (8 bytes LE + CRC32C of them).
const START_FILE: &str = "start";

struct Inner {
    segments: BTreeMap<u64, Segment>,
    /// Append handle of the last segment.
    active: Arc<File>,
    log_start: u64,
    next_offset: u64,
    last_timestamp: u64,
    bytes: u64,
    /// Bytes written in this session (the group-commit sequence).
    written: u64,
    /// Sealed segments recently read, most recent last (at most
    /// `MAPPED_SEALED`); other sealed segments are unmapped after each
    /// operation, so reading through a long log keeps RSS bounded.
    recent: std::collections::VecDeque<u64>,
}

/// Sealed segments kept mapped per partition.
const MAPPED_SEALED: usize = 2;

impl Inner {
    /// Note that the segment at `base` was just read.
    fn touch(&mut self, base: u64) {
        self.recent.retain(|b| *b != base);
        self.recent.push_back(base);
        while self.recent.len() > MAPPED_SEALED {
            self.recent.pop_front();
        }
    }

    /// Unmap every sealed segment not read recently.
    fn trim_maps(&mut self) {
        let active = *self.segments.keys().next_back().expect("active segment");
        for (base, seg) in self.segments.iter_mut() {
            if *base != active && seg.is_mapped() && !self.recent.contains(base) {
                seg.unmap();
            }
        }
    }
}

pub(crate) struct Partition {
    dir: PathBuf,
    segment_bytes: u64,
    durability: Durability,
    inner: Mutex<Inner>,
    /// Bytes of `written` known to be synced; held while syncing.
    synced: tokio::sync::Mutex<u64>,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::io(context, e)
}

/// Open a file for appending (and reading), creating it if missing.
pub(crate) fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(io("open", path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

fn read_start(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(START_FILE);
    match std::fs::read(&path) {
        Ok(b) if b.len() == 12 => {
            let crc = u32::from_le_bytes(b[8..12].try_into().expect("4"));
            if crc32c::crc32c(&b[..8]) != crc {
                return Err(corrupt(&path, 0, "log start checksum mismatch"));
            }
            Ok(Some(u64::from_le_bytes(b[..8].try_into().expect("8"))))
        }
        Ok(_) => Err(corrupt(&path, 0, "log start file has the wrong size")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

fn write_start(dir: &Path, start: u64) -> Result<()> {
    let path = dir.join(START_FILE);
    let tmp = dir.join("start.tmp");
    let mut b = start.to_le_bytes().to_vec();
    b.extend_from_slice(&crc32c::crc32c(&start.to_le_bytes()).to_le_bytes());
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&b)
        .and_then(|()| f.sync_all())
        .map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
    sync_dir(dir)
}

impl Partition {
    /// Open (or create) the partition in `dir`, recovering its last segment.
    pub fn open(dir: PathBuf, segment_bytes: u64, durability: Durability) -> Result<Partition> {
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let mut bases: Vec<u64> = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("list", &dir))? {
            let entry = entry.map_err(io("list", &dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(base) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let stored_start = read_start(&dir)?;
        if bases.is_empty() {
            let base = stored_start.unwrap_or(0);
            let path = dir.join(segment::file_name(base));
            open_append(&path)?;
            sync_dir(&dir)?;
            bases.push(base);
        }
        let mut segments = BTreeMap::new();
        for (i, base) in bases.iter().enumerate() {
            let path = dir.join(segment::file_name(*base));
            if i + 1 < bases.len() {
                let len = std::fs::metadata(&path).map_err(io("stat", &path))?.len();
                segments.insert(*base, Segment::sealed(*base, path, len, bases[i + 1]));
            } else {
                let (seg, _torn) = segment::recover(*base, &path)?;
                segments.insert(*base, seg);
            }
        }
        let last_base = *bases.last().expect("at least one segment");
        let active = Arc::new(open_append(&dir.join(segment::file_name(last_base)))?);
        let next_offset = segments[&last_base].next_offset;
        let first_base = bases[0];
        let log_start = stored_start
            .unwrap_or(first_base)
            .max(first_base)
            .min(next_offset);
        let mut last_timestamp = segments[&last_base].max_timestamp;
        if last_timestamp == 0 && bases.len() > 1 {
            let prev = segments
                .get_mut(&bases[bases.len() - 2])
                .expect("previous segment");
            prev.ensure_indexed()?;
            last_timestamp = prev.max_timestamp;
        }
        let bytes = segments.values().map(|s| s.len).sum();
        Ok(Partition {
            dir,
            segment_bytes,
            durability,
            inner: Mutex::new(Inner {
                segments,
                active,
                log_start,
                next_offset,
                last_timestamp,
                bytes,
                written: 0,
                recent: std::collections::VecDeque::new(),
            }),
            synced: tokio::sync::Mutex::new(0),
        })
    }

    pub fn bounds(&self) -> PartitionBounds {
        let g = self.inner.lock();
        PartitionBounds {
            log_start: g.log_start,
            log_end: g.next_offset,
            bytes: g.bytes,
        }
    }

    /// Start a new segment at the log end. With `Always`, the old one is
    /// synced first so one sync of the active file covers every write.
    fn roll(&self, g: &mut Inner) -> Result<()> {
        if self.durability == Durability::Always {
            g.active.sync_data().map_err(io("sync", &self.dir))?;
        }
        let base = g.next_offset;
        let path = self.dir.join(segment::file_name(base));
        let file = open_append(&path)?;
        if self.durability == Durability::Always {
            sync_dir(&self.dir)?;
        }
        g.segments.insert(base, Segment::empty(base, path));
        g.active = Arc::new(file);
        Ok(())
    }

    /// Append a batch; returns where it landed and its group-commit sequence.
    pub fn append(&self, records: &[RecordData], now_ms: u64) -> Result<(Appended, u64)> {
        let mut g = self.inner.lock();
        let timestamp = now_ms.max(g.last_timestamp);
        let base = g.next_offset;
        let data = format::encode_batch(base, timestamp, records).map_err(|e| {
            Error::invalid(format!(
                "{}: a batch of {} records: {e}",
                self.dir.display(),
                records.len()
            ))
        })?;
        let header = format::read_header(&data)
            .map_err(|e| Error::internal(format!("a batch just encoded does not read: {e}")))?;
        let active_len = g.segments.values().next_back().map_or(0, |s| s.len);
        if active_len > 0 && active_len + data.len() as u64 > self.segment_bytes {
            self.roll(&mut g)?;
        }
        let (&active_base, _) = g.segments.iter().next_back().expect("active segment");
        let pos = g.segments[&active_base].len;
        if let Err(e) = (&*g.active).write_all(&data) {
            // Never leave part of a batch before the next one (full disk).
            let _ = g.active.set_len(pos);
            let path = self.dir.join(segment::file_name(active_base));
            return Err(Error::io(format!("append to {}", path.display()), e));
        }
        g.segments
            .get_mut(&active_base)
            .expect("active segment")
            .note_append(pos, &header);
        g.next_offset = header.next_offset();
        g.last_timestamp = timestamp;
        g.bytes += data.len() as u64;
        g.written += data.len() as u64;
        Ok((
            Appended {
                base_offset: base,
                timestamp,
            },
            g.written,
        ))
    }

    /// Sync until at least `seq` bytes of this session are durable. Callers
    /// waiting together share one `fdatasync` (group commit).
    pub async fn sync_to(&self, seq: u64) -> Result<()> {
        let mut synced = self.synced.lock().await;
        if *synced >= seq {
            return Ok(());
        }
        let (file, target) = {
            let g = self.inner.lock();
            (g.active.clone(), g.written)
        };
        sync_file(file, &self.dir).await?;
        *synced = target;
        Ok(())
    }

    /// Sync whatever was written (for `flush` and the interval flusher).
    pub async fn flush(&self) -> Result<()> {
        let written = self.inner.lock().written;
        self.sync_to(written).await
    }

    /// The same, from a plain thread.
    pub fn flush_blocking(&self) -> Result<()> {
        let mut synced = self.synced.blocking_lock();
        let (file, target) = {
            let g = self.inner.lock();
            (g.active.clone(), g.written)
        };
        if *synced >= target {
            return Ok(());
        }
        file.sync_data().map_err(io("sync", &self.dir))?;
        *synced = target;
        Ok(())
    }

    pub fn read(&self, range: ReadRange) -> Result<Vec<StoredMessage>> {
        let mut out = Vec::new();
        let mut value_bytes = 0usize;
        let mut at = range.from;
        let full = |out: &Vec<StoredMessage>, b: usize| range.is_full(out.len(), b);
        while !full(&out, value_bytes) {
            let (data, pos, path, seg_end) = {
                let mut g = self.inner.lock();
                at = at.max(g.log_start);
                if at >= g.next_offset {
                    break;
                }
                let Some((&base, seg)) = g.segments.range_mut(..=at).next_back() else {
                    break;
                };
                seg.ensure_indexed()?;
                if at >= seg.next_offset {
                    at = seg.next_offset;
                    continue;
                }
                let found = (
                    seg.bytes()?,
                    seg.position_for(at),
                    seg.path.clone(),
                    seg.next_offset,
                );
                g.touch(base);
                g.trim_maps();
                found
            };
            let mut p = pos as usize;
            while p < data.len() && !full(&out, value_bytes) {
                let (header, records) = format::decode_batch(&data.slice(p..))
                    .map_err(|e| corrupt(&path, p as u64, e))?;
                for (i, r) in records.into_iter().enumerate() {
                    let offset = header.base_offset + i as u64;
                    if offset < at || full(&out, value_bytes) {
                        continue;
                    }
                    value_bytes += r.value.len();
                    out.push(StoredMessage {
                        offset,
                        timestamp: header.timestamp,
                        key: r.key,
                        value: r.value,
                        headers: r.headers,
                        idempotency_key: r.idempotency_key,
                        deliver_at: r.deliver_at,
                    });
                }
                p += header.length as usize;
            }
            at = match out.last() {
                Some(m) if full(&out, value_bytes) => m.offset + 1,
                _ => seg_end,
            };
        }
        Ok(out)
    }

    /// First offset with timestamp >= `ts` at or above the log start, or
    /// the log end.
    fn offset_for_timestamp_locked(g: &mut Inner, ts: u64) -> Result<u64> {
        let log_start = g.log_start;
        for seg in g.segments.values_mut() {
            if seg.next_offset <= log_start || seg.len == 0 {
                continue;
            }
            seg.ensure_indexed()?;
            if seg.max_timestamp < ts {
                continue;
            }
            let data = seg.bytes()?;
            let mut p = seg.position_for_timestamp(ts) as usize;
            while p < data.len() {
                let h =
                    format::check_batch(&data[p..]).map_err(|e| corrupt(&seg.path, p as u64, e))?;
                if h.timestamp >= ts && h.next_offset() > log_start {
                    return Ok(h.base_offset.max(log_start));
                }
                p += h.length as usize;
            }
        }
        Ok(g.next_offset)
    }

    pub fn offset_for_timestamp(&self, ts: u64) -> Result<u64> {
        let mut g = self.inner.lock();
        let found = Self::offset_for_timestamp_locked(&mut g, ts);
        g.trim_maps();
        found
    }

    /// Move the log start per `retention`, delete segments wholly below it
    /// (mappings held by readers stay valid until dropped), persist it.
    pub fn enforce_retention(&self, retention: &Retention, now_ms: u64) -> Result<()> {
        let mut g = self.inner.lock();
        let mut start = g.log_start;
        if let Some(age) = retention.max_age {
            let cutoff = now_ms.saturating_sub(age.as_millis().min(u64::MAX as u128) as u64);
            let found = Self::offset_for_timestamp_locked(&mut g, cutoff);
            g.trim_maps();
            start = start.max(found?);
        }
        if let Some(max) = retention.max_bytes {
            let mut total = g.bytes;
            let sealed: Vec<(u64, u64)> = g
                .segments
                .values()
                .rev()
                .skip(1)
                .map(|s| (s.len, s.next_offset))
                .collect();
            for (len, next) in sealed.into_iter().rev() {
                if total <= max {
                    break;
                }
                total -= len;
                start = start.max(next);
            }
        }
        let active_base = *g.segments.keys().next_back().expect("active");
        let doomed: Vec<u64> = g
            .segments
            .iter()
            .filter(|(base, s)| **base != active_base && s.next_offset <= start)
            .map(|(b, _)| *b)
            .collect();
        if start == g.log_start && doomed.is_empty() {
            return Ok(());
        }
        if start != g.log_start {
            write_start(&self.dir, start)?;
            g.log_start = start;
        }
        for base in doomed {
            let seg = g.segments.remove(&base).expect("listed");
            g.bytes -= seg.len;
            let path = seg.path.clone();
            drop(seg); // unmap before unlink
            std::fs::remove_file(&path).map_err(io("delete", &path))?;
            tracing::debug!(path = %path.display(), "segment deleted by retention");
        }
        Ok(())
    }

    /// Idempotency keys of records at or after `since_ms`.
    pub fn idempotency_keys_since(&self, since_ms: u64) -> Result<Vec<(String, u64, u64)>> {
        let mut batches = Vec::new();
        {
            let mut g = self.inner.lock();
            for seg in g.segments.values_mut().rev() {
                if seg.len == 0 {
                    continue;
                }
                seg.ensure_indexed()?;
                if seg.max_timestamp < since_ms {
                    break;
                }
                batches.push((
                    seg.bytes()?,
                    seg.position_for_timestamp(since_ms),
                    seg.path.clone(),
                ));
            }
            g.trim_maps();
        }
        let mut out = Vec::new();
        for (data, pos, path) in batches {
            let mut p = pos as usize;
            while p < data.len() {
                let (h, records) = format::decode_batch(&data.slice(p..))
                    .map_err(|e| corrupt(&path, p as u64, e))?;
                if h.timestamp >= since_ms {
                    for (i, r) in records.into_iter().enumerate() {
                        if let Some(k) = r.idempotency_key {
                            out.push((k, h.base_offset + i as u64, h.timestamp));
                        }
                    }
                }
                p += h.length as usize;
            }
        }
        Ok(out)
    }
}
