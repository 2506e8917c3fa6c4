//! The conformance suite against the in-memory backend.
//!
//! The memory backend is not persistent: while a broker is open the case
//! gets it back, and once closed a fresh, empty one (there is nothing to
//! reopen). Its capabilities say `persistent: false`, so the persistence
//! cases skip.

use conveyor_conformance::Reopening;
use conveyor_core::Broker;
use std::sync::Arc;

conveyor_conformance::suite!(|| async {
    Reopening::new(
        |options| async move { Ok(Arc::new(conveyor_memory::open(options)) as Arc<dyn Broker>) },
        (),
    )
});
