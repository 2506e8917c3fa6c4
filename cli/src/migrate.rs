//! `conveyor migrate`: create a PostgreSQL schema and its tables, or bring
//! them to this version, as a step of its own, run by the schema's owner
//! before applications whose role has no DDL rights open it. Other
//! backends need no such step; this command opens no broker.

use crate::fail;
#[cfg(feature = "postgres")]
use crate::output::{out, out_json};
use crate::output::{CliError, CliResult, Format};

/// Migrate the schema `url` names (`?schema=`, default `conveyor`).
pub(crate) async fn run(url: &str, format: Format) -> CliResult {
    let parsed = conveyor::BrokerUrl::parse(url).map_err(fail)?;
    match parsed.scheme() {
        "postgres" | "postgresql" => match crate::not_compiled_in(url) {
            Some(e) => Err(e),
            None => postgres(&parsed, format).await,
        },
        other => Err(CliError::usage(format!(
            "`migrate` is for postgres:// URLs: {other}:// stores need no migration step \
             (`topic create` creates them)"
        ))),
    }
}

#[cfg(feature = "postgres")]
async fn postgres(url: &conveyor::BrokerUrl, format: Format) -> CliResult {
    let (_, options) = conveyor::postgres::parse_url(url).map_err(fail)?;
    conveyor::postgres::migrate_url(url).await.map_err(fail)?;
    match format {
        Format::Json => out_json(&serde_json::json!({
            "schema": options.schema,
            "migrated": true,
        })),
        Format::Text => out(format!("schema `{}` is migrated", options.schema)),
    }
}

#[cfg(not(feature = "postgres"))]
async fn postgres(_: &conveyor::BrokerUrl, _: Format) -> CliResult {
    // `run` returned `not_compiled_in` before calling this.
    Err(CliError::new(
        crate::exit::Exit::Unsupported,
        "postgres:// is not compiled into this `conveyor`",
    ))
}
