//! Cases of the contract: model.
