//! Cases of the contract: queue.
