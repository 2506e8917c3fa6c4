//! Cases of the contract: errors.
