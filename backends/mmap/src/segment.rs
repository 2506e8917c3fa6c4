//! One segment file: its bounds, its sparse offset/time index, its read
//! mapping, and recovery of its tail.
//!
//! A segment knows nothing of partitions or retention; it reads and checks
//! batches of its own file. Writing is done by the partition, which owns
//! the file handle for appends.

use crate::format::{self, BatchHeader};
use crate::fs::{self, corrupt};
use crate::recovery::{tolerate_torn_tail, Frame, Scanned};
use bytes::Bytes;
use conveyor_core::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes between two entries of the sparse index.
pub(crate) const INDEX_INTERVAL: u64 = 4096;

/// An index entry: the batch at `pos` starts at `offset` with `timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub offset: u64,
    pub pos: u64,
    pub timestamp: u64,
}

/// A read-only mapping shared by the `Bytes` handed to consumers.
struct MapOwner(Arc<Mmap>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The file name of the segment starting at `base`.
pub(crate) fn file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// A segment file.
pub(crate) struct Segment {
    pub base: u64,
    pub path: PathBuf,
    /// Bytes of complete batches (the file's valid length).
    pub len: u64,
    /// Offset after the last record.
    pub next_offset: u64,
    /// Timestamp of the last batch (0 if empty or not indexed yet).
    pub max_timestamp: u64,
    /// Sparse index; complete once `indexed`.
    pub index: Vec<IndexEntry>,
    /// Whether `index`, `max_timestamp` and `next_offset` cover the file.
    pub indexed: bool,
    /// Position of the last index entry.
    last_indexed_pos: u64,
    map: Option<Arc<Mmap>>,
}

impl Segment {
    /// A new empty segment (the file exists and is empty).
    pub fn empty(base: u64, path: PathBuf) -> Self {
        Segment {
            base,
            path,
            len: 0,
            next_offset: base,
            max_timestamp: 0,
            index: Vec::new(),
            indexed: true,
            last_indexed_pos: 0,
            map: None,
        }
    }

    /// A sealed segment seen at open: trusted up to its file length and
    /// indexed lazily; `next_offset` is the next segment's base.
    pub fn sealed(base: u64, path: PathBuf, len: u64, next_offset: u64) -> Self {
        Segment {
            base,
            path,
            len,
            next_offset,
            max_timestamp: 0,
            index: Vec::new(),
            indexed: false,
            last_indexed_pos: 0,
            map: None,
        }
    }

    /// Note a batch appended at `pos`.
    pub fn note_append(&mut self, pos: u64, header: &BatchHeader) {
        if self.index.is_empty() || pos - self.last_indexed_pos >= INDEX_INTERVAL {
            self.index.push(IndexEntry {
                offset: header.base_offset,
                pos,
                timestamp: header.timestamp,
            });
            self.last_indexed_pos = pos;
        }
        self.len = pos + header.length as u64;
        self.next_offset = header.next_offset();
        self.max_timestamp = self.max_timestamp.max(header.timestamp);
    }

    /// A mapping covering at least `self.len` bytes.
    pub fn mapping(&mut self) -> Result<Arc<Mmap>> {
        if let Some(m) = &self.map {
            if m.len() as u64 >= self.len {
                return Ok(m.clone());
            }
        }
        if self.len == 0 {
            // An empty file cannot be mapped; nothing to read anyway.
            return Err(Error::internal(format!(
                "{}: mapping an empty segment",
                self.path.display()
            )));
        }
        let file = File::open(&self.path)
            .map_err(|e| Error::io(format!("open {}", self.path.display()), e))?;
        // SAFETY: the store's directory is locked by its one owning process
        // (this one, or another when this store was opened read-only),
        // which only appends to segment files and never truncates one below
        // a complete batch: truncation happens at its open (cutting only a
        // torn tail, which no reader counts: it fails its checksum) and
        // after a failed write back to the length before that write. The
        // map is no longer than the complete, checked batches this process
        // has counted (`self.len`), so every mapped page stays backed by
        // the file: no SIGBUS. Retention and topic deletion unlink files,
        // which leaves existing mappings valid. Another program modifying
        // the files breaks the store's ownership contract.
        #[expect(unsafe_code, reason = "the one mapping of the crate; see SAFETY above")]
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(self.len as usize)
                .map(&file)
        }
        .map_err(|e| Error::io(format!("mmap {}", self.path.display()), e))?;
        let map = Arc::new(map);
        self.map = Some(map.clone());
        Ok(map)
    }

    /// Drop this segment's mapping (messages already handed out keep their
    /// own reference until dropped).
    pub fn unmap(&mut self) {
        self.map = None;
    }

    /// Whether the segment is mapped now.
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }

    /// The segment's bytes as shared `Bytes` (zero copy), up to `len`.
    pub fn bytes(&mut self) -> Result<Bytes> {
        if self.len == 0 {
            return Ok(Bytes::new());
        }
        let map = self.mapping()?;
        let len = self.len as usize;
        Ok(Bytes::from_owner(MapOwner(map)).slice(..len))
    }

    /// Build the index by walking batch headers (checksums are checked on
    /// read). Damage is `Corrupt` with file and position.
    pub fn ensure_indexed(&mut self) -> Result<()> {
        if self.indexed {
            return Ok(());
        }
        let data = self.bytes()?;
        let mut pos = 0u64;
        let mut expected = self.base;
        let mut index = Vec::new();
        let mut last_indexed = 0u64;
        let mut max_ts = 0;
        while pos < self.len {
            let header = format::read_header(&data[pos as usize..])
                .map_err(|e| corrupt(&self.path, pos, e))?;
            if header.base_offset != expected {
                return Err(corrupt(
                    &self.path,
                    pos,
                    format!(
                        "batch starts at offset {} where {expected} was expected",
                        header.base_offset
                    ),
                ));
            }
            if index.is_empty() || pos - last_indexed >= INDEX_INTERVAL {
                index.push(IndexEntry {
                    offset: header.base_offset,
                    pos,
                    timestamp: header.timestamp,
                });
                last_indexed = pos;
            }
            max_ts = max_ts.max(header.timestamp);
            expected = header.next_offset();
            pos += header.length as u64;
        }
        if expected != self.next_offset {
            return Err(corrupt(
                &self.path,
                pos,
                format!(
                    "segment ends at offset {expected} but the next segment starts at {}",
                    self.next_offset
                ),
            ));
        }
        self.index = index;
        self.last_indexed_pos = last_indexed;
        self.max_timestamp = max_ts;
        self.indexed = true;
        Ok(())
    }

    /// Position of the batch containing `offset` or the nearest indexed
    /// batch before it.
    pub fn position_for(&self, offset: u64) -> u64 {
        let i = self.index.partition_point(|e| e.offset <= offset);
        if i == 0 {
            0
        } else {
            self.index[i - 1].pos
        }
    }

    /// Position of an indexed batch at or before the first batch with
    /// timestamp >= `timestamp`.
    pub fn position_for_timestamp(&self, timestamp: u64) -> u64 {
        let i = self.index.partition_point(|e| e.timestamp < timestamp);
        if i == 0 {
            0
        } else {
            self.index[i - 1].pos
        }
    }
}

/// Scan a segment file from the start, checking every batch: the recovery
/// of the active segment at open (blocking; runs on the blocking pool).
/// Returns the segment (with its index) and where a torn tail was cut off,
/// per the one torn-tail rule ([`tolerate_torn_tail`]).
pub(crate) fn recover(base: u64, path: &Path) -> Result<(Segment, Option<u64>)> {
    let data = std::fs::read(path).map_err(fs::io("read", path))?;
    let (segment, scanned) = scan(base, path, &data)?;
    if let Some(at) = scanned.torn_at {
        let dropped = data.len() as u64 - at;
        tracing::warn!(path = %path.display(), at, dropped, "cutting torn tail");
        fs::truncate(path, at)?;
    }
    Ok((segment, scanned.torn_at))
}

/// The bytes of the file at `path` from byte `from` to its end, now
/// (blocking; a read-only store's look at what the owner appended).
pub(crate) fn read_from(path: &Path, from: u64) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match File::open(path) {
        Ok(f) => f,
        // Deleted by the owner's retention or topic deletion: nothing new.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(fs::io("open", path)(e)),
    };
    let mut out = Vec::new();
    file.seek(SeekFrom::Start(from))
        .and_then(|_| file.read_to_end(&mut out))
        .map_err(fs::io("read", path))?;
    Ok(out)
}

/// Check every batch of a segment's bytes (starting at offset `base`) and
/// index them, without touching the file: batches must check and follow
/// each other's offsets; a bad last batch is a torn tail.
pub(crate) fn scan(base: u64, path: &Path, data: &[u8]) -> Result<(Segment, Scanned)> {
    let mut segment = Segment::empty(base, path.to_path_buf());
    let scanned = tolerate_torn_tail(
        path,
        data,
        &format::BATCH_MAGICS,
        |pos, rest| match format::check_batch(rest) {
            Ok(header) if header.base_offset == segment.next_offset => {
                segment.note_append(pos, &header);
                Ok(Frame::Valid(header.length as usize))
            }
            Ok(header) => Err(corrupt(
                path,
                pos,
                format!(
                    "batch starts at offset {} where {} was expected",
                    header.base_offset, segment.next_offset
                ),
            )),
            Err(e) => Ok(Frame::Bad(e)),
        },
        |rest| format::check_batch(rest).is_ok(),
    )?;
    Ok((segment, scanned))
}
