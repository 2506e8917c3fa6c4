//! Cases of the contract: idempotency.
