//! The conformance suite against the in-memory backend wrapped by
//! `conveyor_core::observe`, as `conveyor::open` returns every broker: the
//! wrapper that records metrics and spans changes no behaviour.

use conveyor_conformance::Reopening;
use conveyor_core::Broker;
use std::sync::Arc;

conveyor_conformance::suite!(|| async {
    Reopening::new(
        |options| async move {
            let broker = Arc::new(conveyor_memory::open(options)) as Arc<dyn Broker>;
            Ok(conveyor_core::observe::observe(broker, "memory"))
        },
        (),
    )
});
