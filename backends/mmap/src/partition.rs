//! One partition: its directory of segments, the append path (with segment
//! rolls and group-commit syncs), reads, time lookups, and retention with a
//! persisted log start.
//!
//! Owns the files under `topics/<topic>/<partition>/`; knows nothing of
//! groups or topics' configs beyond the retention it is handed.

use crate::fail_stop::FailStop;
use crate::format::{self, RecordData};
use crate::fs::{self, corrupt, io};
use crate::retention::{retention_plan, SegmentSpan};
use crate::segment::{self, Segment};
use conveyor_core::backend::{Appended, PartitionBounds, ReadRange, StoredMessage};
use conveyor_core::{Durability, Error, Result, Retention};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file holding the log start (8 bytes LE + CRC32C of them).
pub(crate) const START_FILE: &str = "start";

struct Inner {
    segments: BTreeMap<u64, Segment>,
    /// Append handle of the last segment (`None` when opened read-only).
    active: Option<Arc<File>>,
    /// Segments sealed by a roll whose last writes are not synced yet, and
    /// whether the directory (their successor's entry) is: the next sync
    /// covers them, off the runtime (a roll itself never syncs).
    unsynced_sealed: Vec<(Arc<File>, PathBuf)>,
    dir_unsynced: bool,
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
        let Some(&active) = self.segments.keys().next_back() else {
            return;
        };
        for (base, seg) in self.segments.iter_mut() {
            if *base != active && seg.is_mapped() && !self.recent.contains(base) {
                seg.unmap();
            }
        }
    }
}

pub(crate) struct Partition {
    dir: PathBuf,
    /// Opened with [`Partition::open_read_only`]: another process owns the
    /// files and appends to them; this one only reads, following the tail.
    read_only: bool,
    segment_bytes: u64,
    durability: Durability,
    inner: Mutex<Inner>,
    /// Bytes of `written` known to be synced; held while syncing.
    synced: tokio::sync::Mutex<u64>,
    /// Tripped by a failed sync: appends are refused until reopened.
    failed: FailStop,
    /// One retention pass at a time (a pass drops the partition's lock
    /// while it persists the log start and deletes files).
    retention: tokio::sync::Mutex<()>,
}

/// The files one sync makes durable, taken under the partition's lock and
/// synced off it.
struct SyncJob {
    sealed: Vec<(Arc<File>, PathBuf)>,
    dir: Option<PathBuf>,
    active: Option<Arc<File>>,
    active_path: PathBuf,
    /// `written` when the job was taken.
    target: u64,
}

impl SyncJob {
    /// Blocking: sealed segments first, then the directory, then the
    /// active segment.
    fn run(self) -> Result<u64> {
        for (file, path) in &self.sealed {
            fs::sync_data(file, path)?;
        }
        if let Some(dir) = &self.dir {
            fs::sync_dir(dir)?;
        }
        if let Some(active) = &self.active {
            fs::sync_data(active, &self.active_path)?;
        }
        Ok(self.target)
    }
}

pub(crate) fn read_start(dir: &Path) -> Result<Option<u64>> {
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

/// Persist the log start (blocking: write, sync, rename, sync directory).
fn write_start(dir: &Path, start: u64) -> Result<()> {
    let mut b = start.to_le_bytes().to_vec();
    b.extend_from_slice(&crc32c::crc32c(&start.to_le_bytes()).to_le_bytes());
    fs::write_atomic(&dir.join(START_FILE), &b)
}

/// The base offsets of the segment files in `dir`, sorted (blocking).
fn segment_bases(dir: &Path) -> Result<Vec<u64>> {
    let mut bases: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(base) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// The segments at `bases`: sealed ones trusted to their file length, the
/// last one read by `last` (recovered, or scanned read-only).
fn segments_of(
    dir: &Path,
    bases: &[u64],
    last: impl FnOnce(u64, &Path) -> Result<Segment>,
) -> Result<BTreeMap<u64, Segment>> {
    let mut segments = BTreeMap::new();
    let Some((&last_base, sealed)) = bases.split_last() else {
        return Ok(segments);
    };
    for (i, base) in sealed.iter().enumerate() {
        let path = dir.join(segment::file_name(*base));
        let len = std::fs::metadata(&path).map_err(io("stat", &path))?.len();
        segments.insert(*base, Segment::sealed(*base, path, len, bases[i + 1]));
    }
    let path = dir.join(segment::file_name(last_base));
    segments.insert(last_base, last(last_base, &path)?);
    Ok(segments)
}

impl Partition {
    /// Open (or create) the partition in `dir`, recovering its last segment
    /// (blocking: run it on the blocking pool).
    pub fn open(dir: PathBuf, segment_bytes: u64, durability: Durability) -> Result<Partition> {
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let mut bases = segment_bases(&dir)?;
        let stored_start = read_start(&dir)?;
        if bases.is_empty() {
            let base = stored_start.unwrap_or(0);
            let path = dir.join(segment::file_name(base));
            fs::open_append(&path)?;
            fs::sync_dir(&dir)?;
            bases.push(base);
        }
        let segments = segments_of(&dir, &bases, |base, path| {
            segment::recover(base, path).map(|(seg, _torn)| seg)
        })?;
        let last_base = *bases.last().expect("at least one segment");
        let active_path = dir.join(segment::file_name(last_base));
        let active = Some(Arc::new(fs::open_append(&active_path)?));
        Self::assemble(
            dir,
            segment_bytes,
            durability,
            segments,
            active,
            stored_start,
            false,
        )
    }

    /// Open the partition in `dir` of a store another process may own and
    /// be writing, without changing a byte (blocking). The last segment
    /// is read to its last complete, checked batch: a batch being written
    /// (or a torn tail) is not cut, only not counted. A missing directory
    /// is an empty partition. Later reads follow the tail
    /// ([`Partition::follow_tail`]).
    pub fn open_read_only(dir: PathBuf, segment_bytes: u64) -> Result<Partition> {
        let bases = match dir.is_dir() {
            true => segment_bases(&dir)?,
            false => Vec::new(),
        };
        let stored_start = read_start(&dir)?;
        let mut segments = segments_of(&dir, &bases, |base, path| {
            let data = std::fs::read(path).map_err(io("read", path))?;
            segment::scan(base, path, &data).map(|(seg, _torn)| seg)
        })?;
        if segments.is_empty() {
            let base = stored_start.unwrap_or(0);
            segments.insert(
                base,
                Segment::empty(base, dir.join(segment::file_name(base))),
            );
        }
        Self::assemble(
            dir,
            segment_bytes,
            Durability::None,
            segments,
            None,
            stored_start,
            true,
        )
    }

    fn assemble(
        dir: PathBuf,
        segment_bytes: u64,
        durability: Durability,
        mut segments: BTreeMap<u64, Segment>,
        active: Option<Arc<File>>,
        stored_start: Option<u64>,
        read_only: bool,
    ) -> Result<Partition> {
        let bases: Vec<u64> = segments.keys().copied().collect();
        let (Some(&first_base), Some(&last_base)) = (bases.first(), bases.last()) else {
            return Err(Error::internal(format!(
                "{}: a partition without segments",
                dir.display()
            )));
        };
        let next_offset = segments[&last_base].next_offset;
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
            read_only,
            segment_bytes,
            durability,
            inner: Mutex::new(Inner {
                segments,
                active,
                unsynced_sealed: Vec::new(),
                dir_unsynced: false,
                log_start,
                next_offset,
                last_timestamp,
                bytes,
                written: 0,
                recent: std::collections::VecDeque::new(),
            }),
            synced: tokio::sync::Mutex::new(0),
            failed: FailStop::default(),
            retention: tokio::sync::Mutex::new(()),
        })
    }

    /// Read-only partitions: take in the batches the owning process has
    /// completed since the last look (the active segment's new bytes, each
    /// batch checked; a batch still being written is left for next time),
    /// follow its segment rolls, and its log start moved by retention.
    /// A no-op on a partition this process owns.
    fn follow_tail(&self, g: &mut Inner) -> Result<()> {
        if !self.read_only {
            return Ok(());
        }
        if let Some(start) = read_start(&self.dir)? {
            g.log_start = g.log_start.max(start.min(g.next_offset));
        }
        loop {
            let Some((_, seg)) = g.segments.iter_mut().next_back() else {
                return Ok(());
            };
            let grown = segment::read_from(&seg.path, seg.len)?;
            let mut p = 0usize;
            while let Some(rest) = grown.get(p..).filter(|r| !r.is_empty()) {
                match format::check_batch(rest) {
                    Ok(h) if h.base_offset == seg.next_offset => {
                        let pos = seg.len;
                        seg.note_append(pos, &h);
                        g.bytes += h.length as u64;
                        g.last_timestamp = g.last_timestamp.max(h.timestamp);
                        p += h.length as usize;
                    }
                    _ => break,
                }
            }
            g.next_offset = seg.next_offset;
            // A roll: the owner starts the next segment at our log end.
            let next = self.dir.join(segment::file_name(seg.next_offset));
            if p < grown.len() || seg.next_offset == seg.base || !next.exists() {
                return Ok(());
            }
            let base = seg.next_offset;
            g.segments.insert(base, Segment::empty(base, next));
        }
    }

    pub fn bounds(&self) -> Result<PartitionBounds> {
        let mut g = self.inner.lock();
        self.follow_tail(&mut g)?;
        Ok(PartitionBounds {
            log_start: g.log_start,
            log_end: g.next_offset,
            bytes: g.bytes,
        })
    }

    /// Start a new segment at the log end. Nothing is synced here (this
    /// runs on the append path): with `Always` or `Interval`, the old
    /// segment and the directory entry of the new one join the next sync
    /// ([`SyncJob`]), which `Always` runs before `append` returns. (With
    /// `None` nothing is tracked, so no file handles pile up between
    /// flushes; the old segment is left to the page cache, as before.)
    fn roll(&self, g: &mut Inner) -> Result<()> {
        let base = g.next_offset;
        let path = self.dir.join(segment::file_name(base));
        let file = fs::open_append(&path)?;
        let sealed_path = g
            .segments
            .values()
            .next_back()
            .map_or_else(|| self.dir.clone(), |s| s.path.clone());
        let sealed = g.active.replace(Arc::new(file));
        if let Some(sealed) = sealed.filter(|_| self.durability != Durability::None) {
            g.unsynced_sealed.push((sealed, sealed_path));
            g.dir_unsynced = true;
        }
        g.segments.insert(base, Segment::empty(base, path));
        Ok(())
    }

    /// Append a batch; returns where it landed and its group-commit sequence.
    /// Refused once a sync of this partition failed (fail-stop).
    pub fn append(&self, records: &[RecordData], now_ms: u64) -> Result<(Appended, u64)> {
        self.failed.check()?;
        let mut g = self.inner.lock();
        if g.active.is_none() {
            return Err(crate::read_only_error(&format!(
                "append to {}",
                self.dir.display()
            )));
        }
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
        let active = g
            .active
            .clone()
            .ok_or_else(|| Error::internal(format!("{}: no append handle", self.dir.display())))?;
        if let Err(e) = (&*active).write_all(&data) {
            // Never leave part of a batch before the next one (full disk).
            let _ = active.set_len(pos);
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

    /// What a sync now must cover (under the partition's lock).
    fn sync_job(&self) -> SyncJob {
        let mut g = self.inner.lock();
        let active_path = g
            .segments
            .values()
            .next_back()
            .map_or_else(|| self.dir.clone(), |s| s.path.clone());
        SyncJob {
            sealed: std::mem::take(&mut g.unsynced_sealed),
            dir: std::mem::take(&mut g.dir_unsynced).then(|| self.dir.clone()),
            active: g.active.clone(),
            active_path,
            target: g.written,
        }
    }

    /// Sync until at least `seq` bytes of this session are durable, on the
    /// blocking pool. Callers waiting together share one `fdatasync` (group
    /// commit). A failed sync trips the fail-stop, and is never retried:
    /// every later call fails too.
    pub async fn sync_to(&self, seq: u64) -> Result<()> {
        let mut synced = self.synced.lock().await;
        if *synced >= seq {
            return Ok(());
        }
        self.failed.check()?;
        let job = self.sync_job();
        let path = job.active_path.clone();
        let result = fs::blocking(move || job.run()).await;
        *synced = self.failed.watch(&path, result)?;
        Ok(())
    }

    /// Sync whatever was written (for `flush` and `close`).
    pub async fn flush(&self) -> Result<()> {
        let written = self.inner.lock().written;
        self.sync_to(written).await
    }

    /// The same, from a plain thread (the interval flusher).
    pub fn flush_blocking(&self) -> Result<()> {
        let mut synced = self.synced.blocking_lock();
        if *synced >= self.inner.lock().written {
            return Ok(());
        }
        self.failed.check()?;
        let job = self.sync_job();
        let path = job.active_path.clone();
        *synced = self.failed.watch(&path, job.run())?;
        Ok(())
    }

    pub fn read(&self, range: ReadRange) -> Result<Vec<StoredMessage>> {
        // Sized up front: growing a large result vector by doubling costs
        // reallocations and fresh page faults on every read (measured).
        let mut out = Vec::with_capacity(range.max_records.min(4096));
        let mut value_bytes = 0usize;
        let mut at = range.from;
        let full = |out: &Vec<StoredMessage>, b: usize| range.is_full(out.len(), b);
        self.follow_tail(&mut self.inner.lock())?;
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
                let room = range.max_records.saturating_sub(out.len());
                let (header, records) = format::decode_batch_from(&data.slice(p..), at, room)
                    .map_err(|e| corrupt(&path, p as u64, e))?;
                let first = header.base_offset.max(at);
                for (i, r) in records.into_iter().enumerate() {
                    let offset = first + i as u64;
                    if full(&out, value_bytes) {
                        break;
                    }
                    value_bytes += r.value.len();
                    out.push(StoredMessage::from_record(offset, header.timestamp, r));
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
        self.follow_tail(&mut g)?;
        let found = Self::offset_for_timestamp_locked(&mut g, ts);
        g.trim_maps();
        found
    }

    /// Move the log start per `retention` ([`retention_plan`], decided
    /// under the lock), then off the lock and the runtime: persist it and
    /// delete the segments wholly below it (their mappings are dropped
    /// first; `Bytes` held by readers stay valid until dropped).
    pub async fn enforce_retention(&self, retention: &Retention, now_ms: u64) -> Result<()> {
        let _one_pass = self.retention.lock().await;
        let (plan, current) = {
            let mut g = self.inner.lock();
            let spans: Vec<SegmentSpan> = g
                .segments
                .values()
                .map(|s| SegmentSpan {
                    base: s.base,
                    len: s.len,
                    next_offset: s.next_offset,
                })
                .collect();
            let log_start = g.log_start;
            let plan = retention_plan(&spans, log_start, retention, now_ms, |cutoff| {
                Self::offset_for_timestamp_locked(&mut g, cutoff)
            });
            g.trim_maps();
            (plan?, log_start)
        };
        if plan.is_noop(current) {
            return Ok(());
        }
        if plan.log_start != current {
            let (dir, start) = (self.dir.clone(), plan.log_start);
            fs::blocking(move || write_start(&dir, start)).await?;
        }
        let doomed: Vec<PathBuf> = {
            let mut g = self.inner.lock();
            g.log_start = g.log_start.max(plan.log_start);
            let active = g.segments.keys().next_back().copied();
            let mut paths = Vec::new();
            for base in plan.doomed {
                if Some(base) == active {
                    continue;
                }
                if let Some(seg) = g.segments.remove(&base) {
                    g.bytes -= seg.len;
                    g.recent.retain(|b| *b != base);
                    paths.push(seg.path.clone());
                    // `seg` drops here: unmapped before the unlink below.
                }
            }
            paths
        };
        fs::blocking(move || {
            for path in &doomed {
                fs::remove_file(path)?;
                tracing::debug!(path = %path.display(), "segment deleted by retention");
            }
            Ok(())
        })
        .await
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
