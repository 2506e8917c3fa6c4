//! Cases of the contract: lag.
