//! `conveyor verify`: check every batch and state frame of an embedded
//! (`mmap://`) store without opening it for writing
//! ([`conveyor::mmap::verify`]). Exit 0 with the counts (a line of text,
//! or one JSON document); damage is an error line naming the file and
//! byte position, and exit 8 (corrupt).

use crate::output::{out, out_json, CliError, CliResult, Format};
use serde_json::json;
use std::path::PathBuf;

/// Arguments of `verify` (the store is `--url mmap:///dir`).
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {}

/// The directory of an `mmap://` URL (query options ignored).
fn store_dir(url: Option<&str>) -> Result<PathBuf, String> {
    let url = url.ok_or_else(|| {
        "no store URL: pass --url mmap:///path/to/store (or set CONVEYOR_URL)".to_string()
    })?;
    let path = url
        .strip_prefix("mmap://")
        .ok_or_else(|| format!("verify checks embedded stores: `{url}` is not an mmap:// URL"))?;
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!(
            "`{url}` names no directory: use mmap:///absolute/dir"
        ));
    }
    Ok(PathBuf::from(path))
}

pub async fn run(url: Option<&str>, _args: VerifyArgs, format: Format) -> CliResult {
    let dir = store_dir(url).map_err(CliError::usage)?;
    let shown = dir.display().to_string();
    let report = tokio::task::spawn_blocking(move || conveyor::mmap::verify(dir))
        .await
        .map_err(|e| format!("verify task: {e}"))?
        .map_err(crate::fail)?;
    if format == Format::Json {
        return out_json(&json!({
            "store": shown,
            "ok": true,
            "partitions": report.partitions,
            "segments": report.segments,
            "batches": report.batches,
            "records": report.records,
            "bytes": report.bytes,
            "state_frames": report.state_frames,
            "torn_tails": report.torn_tails.iter().map(|(file, at)| json!({
                "file": file.display().to_string(),
                "at_byte": at,
            })).collect::<Vec<_>>(),
        }));
    }
    out(format!(
        "{shown}: ok: {} partitions, {} segments, {} batches, {} records, {} bytes; \
         state.log: {} frames",
        report.partitions,
        report.segments,
        report.batches,
        report.records,
        report.bytes,
        report.state_frames
    ))?;
    for (file, at) in &report.torn_tails {
        out(format!(
            "{}: torn tail at byte {at} (an interrupted write; the next open cuts it)",
            file.display()
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_dir_takes_mmap_urls_only() {
        assert_eq!(
            store_dir(Some("mmap:///var/q?segment_bytes=10")),
            Ok(PathBuf::from("/var/q"))
        );
        assert!(store_dir(Some("memory://")).is_err());
        assert!(store_dir(Some("mmap://")).is_err());
        assert!(store_dir(None).is_err());
    }
}
