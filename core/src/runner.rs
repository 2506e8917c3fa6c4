//! The handler runner.
