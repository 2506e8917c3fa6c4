//! The `memory://` URL: the common options only.

use crate::open;
use conveyor_core::backend::BrokerUrl;
use conveyor_core::{Broker, Result};
use std::sync::Arc;

/// The URL schemes this backend answers to.
pub const URL_SCHEMES: &[&str] = &["memory"];

/// Open an in-memory broker from a `memory://` URL.
///
/// # Errors
/// `InvalidArgument` for an option other than the common ones.
///
/// # Cancel safety
/// Cancel safe.
pub async fn open_url(url: &BrokerUrl) -> Result<Arc<dyn Broker>> {
    if let Some((name, _)) = url.backend_options().first() {
        return Err(url.unknown_option("memory", name, &[]));
    }
    Ok(Arc::new(open(url.options().clone())))
}
