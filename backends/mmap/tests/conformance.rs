//! The conformance suite against the segment log, in a temporary directory.
//!
//! Opening again after a close reopens the same directory, so the
//! persistence cases run. Segments are small (256 KiB) so retention by
//! bytes has whole segments to delete.

use conveyor_conformance::Reopening;
use conveyor_core::Broker;
use conveyor_mmap::MmapOptions;
use std::sync::Arc;

conveyor_conformance::suite!(|| async {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().to_path_buf();
    Reopening::new(
        move |options| {
            let path = path.clone();
            async move {
                let mmap = MmapOptions::default().with_segment_bytes(256 * 1024);
                let broker = conveyor_mmap::open(&path, options, mmap).await?;
                Ok(Arc::new(broker) as Arc<dyn Broker>)
            }
        },
        dir,
    )
});
