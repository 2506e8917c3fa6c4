//! Cases of the contract: stream.
