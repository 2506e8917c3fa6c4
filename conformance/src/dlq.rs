//! Cases of the contract: dlq.
