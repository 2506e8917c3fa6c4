//! Real crashes on the segment log: the shared SIGKILL harness
//! (`conveyor_conformance::kill`, see its docs) with small segments
//! (16 KiB), so kills also land around segment rolls.

use conveyor_core::{Broker, BrokerOptions};
use conveyor_mmap::MmapOptions;
use std::sync::Arc;

conveyor_conformance::kill_suite!(|dir, durability| Box::pin(async move {
    let options = BrokerOptions::default().with_durability(durability);
    let mmap = MmapOptions::default().with_segment_bytes(16 * 1024);
    let broker = conveyor_mmap::open(&dir, options, mmap).await?;
    Ok(Arc::new(broker) as Arc<dyn Broker>)
}));
