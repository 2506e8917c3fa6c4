//! Cases of the contract: retention.
