//! Cases of the contract: persistence.
