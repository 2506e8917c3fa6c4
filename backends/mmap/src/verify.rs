//! `verify`: check a whole store, every batch of every segment and every
//! frame of the state log, without changing a byte of it.
//!
//! It reads files with plain `read` (no mapping), writes nothing, creates
//! nothing (not even `LOCK`), and cuts no torn tail: it reports one. It
//! uses the same rules as opening and reading (`recovery`, `segment`,
//! `state`), so what it calls damage is what the store would call damage.

use crate::format;
use crate::fs::{self, corrupt};
use crate::partition::read_start;
use crate::segment;
use crate::state;
use bytes::Bytes;
use conveyor_core::{Error, ErrorKind, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// What [`verify`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Partition directories.
    pub partitions: u64,
    /// Segment files.
    pub segments: u64,
    /// Batches, each checked (CRC, offsets, records).
    pub batches: u64,
    /// Records in them.
    pub records: u64,
    /// Bytes of valid batches.
    pub bytes: u64,
    /// Frames of `state.log`, each checked.
    pub state_frames: u64,
    /// Torn tails (file, byte position) the next open will cut: the end of
    /// a write a crash interrupted, not damage.
    pub torn_tails: Vec<(PathBuf, u64)>,
}

/// Check the store in `path` without modifying it: every batch's CRC,
/// header and records in every segment (sealed ones included, which an
/// open does not read), offsets running densely across segments, the
/// partitions' log start files, and every frame of `state.log`.
///
/// Blocking; it reads the whole store. It refuses with `ErrorKind::Locked`
/// while another process (or broker) has the store open, and holds a
/// shared lock on `LOCK` while it reads, so the store cannot be opened
/// for writing meanwhile (a store that was never opened has no `LOCK`;
/// then nothing is locked).
///
/// # Errors
///
/// `Corrupt` naming the file and byte position of the first damage found;
/// `Locked`; `InvalidArgument` if `path` holds no store; `Io`.
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport> {
    let root = path.as_ref();
    let topics = root.join("topics");
    let state_path = state::path_in(root);
    if !crate::holds_store(root) {
        return Err(Error::invalid(format!(
            "{}: not a conveyor-mmap store (no topics/ and no state.log)",
            root.display()
        )));
    }
    let _lock = lock_shared(root)?;
    let mut report = VerifyReport::default();

    match std::fs::read(&state_path) {
        Ok(data) => {
            let replayed = state::replay(&state_path, &data)?;
            report.state_frames = replayed.frames;
            if let Some(at) = replayed.scanned.torn_at {
                report.torn_tails.push((state_path.clone(), at));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fs::io("read", &state_path)(e)),
    }

    for topic in sorted_entries(&topics)? {
        for partition in sorted_entries(&topic)? {
            if partition.is_dir() {
                verify_partition(&partition, &mut report)?;
            }
        }
    }
    Ok(report)
}

/// A shared lock on `LOCK` if it exists; `Locked` if someone holds it.
fn lock_shared(root: &Path) -> Result<Option<File>> {
    let path = root.join("LOCK");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fs::io("open", &path)(e)),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::new(
            ErrorKind::Locked,
            format!(
                "store {} is open in another process (or broker): close it to verify it",
                root.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(fs::io("lock", &path)(e)),
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(fs::io("list", dir)(e)),
    };
    for entry in entries {
        out.push(entry.map_err(fs::io("list", dir))?.path());
    }
    out.sort();
    Ok(out)
}

fn verify_partition(dir: &Path, report: &mut VerifyReport) -> Result<()> {
    report.partitions += 1;
    read_start(dir)?;
    let mut bases: Vec<u64> = sorted_entries(dir)?
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    bases.sort_unstable();
    for (i, base) in bases.iter().enumerate() {
        let path = dir.join(segment::file_name(*base));
        let data = std::fs::read(&path).map_err(fs::io("read", &path))?;
        report.segments += 1;
        let (seg, scanned) = segment::scan(*base, &path, &data)?;
        let next_base = bases.get(i + 1).copied();
        if let Some(at) = scanned.torn_at {
            if next_base.is_some() {
                // A sealed segment is whole: a bad batch at its end is
                // damage, not a torn write.
                let why = data
                    .get(at as usize..)
                    .and_then(|rest| format::check_batch(rest).err())
                    .map_or_else(|| "bad batch".to_string(), |e| e.to_string());
                return Err(corrupt(&path, at, format!("{why} in a sealed segment")));
            }
            report.torn_tails.push((path.clone(), at));
        }
        if let Some(next) = next_base {
            if seg.next_offset != next {
                return Err(corrupt(
                    &path,
                    scanned.valid_len,
                    format!(
                        "segment ends at offset {} but the next segment starts at {next}",
                        seg.next_offset
                    ),
                ));
            }
        }
        // The records themselves parse (the scan checked CRCs and offsets).
        let valid = Bytes::from(data).slice(..scanned.valid_len as usize);
        let mut pos = 0usize;
        while pos < valid.len() {
            let (header, _) = format::decode_batch(&valid.slice(pos..))
                .map_err(|e| corrupt(&path, pos as u64, e))?;
            report.batches += 1;
            report.records += u64::from(header.count);
            pos += header.length as usize;
        }
        report.bytes += scanned.valid_len;
    }
    Ok(())
}
