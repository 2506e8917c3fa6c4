//! `conveyor ping`: one round trip to the store, for a readiness probe. It
//! owns the command's output; the exit status of a failure is the error's
//! (75 when the server cannot be reached: retry later).

use crate::fail;
use crate::output::{out, out_json, CliResult, Format};
use conveyor::Broker;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

pub async fn run(broker: &Arc<dyn Broker>, format: Format) -> CliResult {
    let started = Instant::now();
    broker.ping().await.map_err(fail)?;
    let elapsed = started.elapsed();
    match format {
        Format::Json => out_json(&json!({
            "ok": true,
            "round_trip_us": u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        })),
        Format::Text => out(format!(
            "ok: the store answered in {:.1} ms",
            elapsed.as_secs_f64() * 1000.0
        )),
    }
}
