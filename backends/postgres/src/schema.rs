//! The schema Conveyor's tables live in: which names are allowed (never a
//! system or shared schema), creating it (marked as Conveyor's),
//! migrations as a step of their own, the check at open that the schema is
//! migrated, and dropping it (only a schema Conveyor created). It does not
//! read or write the tables' rows.

use crate::connect::Target;
use crate::error::{during, map};
use crate::PgOptions;
use conveyor_core::{Error, ErrorKind, Result};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::PgPool;
use sqlx::{Connection, Executor, PgConnection};

/// The migrations (`migrations/`), embedded in the binary.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The comment a schema Conveyor created carries; [`drop_marked`] drops
/// only a schema that has it.
pub(crate) const MARKER: &str =
    "created by conveyor-postgres (conveyor_postgres::migrate); PgBroker::drop_schema may drop it";

/// Schemas Conveyor never uses: PostgreSQL's own, and `public`, which
/// belongs to every user of the database.
fn is_system(schema: &str) -> bool {
    matches!(schema, "public" | "information_schema") || schema.starts_with("pg_")
}

/// Check a schema name (it is spliced into `SET search_path`, so only a
/// plain identifier is allowed, and never a system or shared schema).
pub(crate) fn check_schema(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && !schema.starts_with(|c: char| c.is_ascii_digit())
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Err(Error::invalid(format!(
            "schema `{schema}`: use 1 to 63 lower-case letters, digits and `_`, not starting with a digit"
        )));
    }
    if is_system(schema) {
        return Err(Error::invalid(format!(
            "schema `{schema}` is a system or shared schema: give Conveyor a schema of its own \
             (`?schema=NAME`, e.g. `conveyor`)"
        )));
    }
    Ok(())
}

/// The command that migrates `schema` on the server at `shown`, for
/// messages.
fn migrate_command(shown: &str, schema: &str) -> String {
    let sep = if shown.contains('?') { '&' } else { '?' };
    format!(
        "`conveyor --url '{shown}{sep}schema={schema}' migrate` (or `conveyor_postgres::migrate`) \
         as the schema's owner, or open with migrate=true (development)"
    )
}

/// `migrate` (see the crate root).
pub(crate) async fn migrate(url: &str, pg: &PgOptions) -> Result<()> {
    check_schema(&pg.schema)?;
    let target = Target::parse(url)?;
    let what = format!("migrate schema `{}`", pg.schema);
    target
        .within(pg.timeout, &what, async {
            let mut conn = PgConnection::connect_with(&target.options)
                .await
                .map_err(during(format!(
                    "connect to PostgreSQL at `{}`",
                    target.shown
                )))?;
            let result = migrate_on(&mut conn, &pg.schema).await;
            let _ = conn.close().await;
            result
        })
        .await
}

/// Create `schema` if missing (marked) and run the migrations it lacks,
/// on `conn` (whose `search_path` it changes).
pub(crate) async fn migrate_on(conn: &mut PgConnection, schema: &str) -> Result<()> {
    create_marked(conn, schema).await?;
    if missing(&mut *conn, schema).await?.is_empty() {
        // Up to date: no DDL at all, so a role without DDL rights may
        // open with migrate=true once the owner has migrated.
        return Ok(());
    }
    let what = format!("migrate schema `{schema}`");
    conn.execute(format!("SET search_path TO \"{schema}\"").as_str())
        .await
        .map_err(during(&what))?;
    MIGRATOR.run_direct(conn).await.map_err(|e| match e {
        MigrateError::Execute(e) => map(&what, e),
        other => Error::new(ErrorKind::Internal, format!("{what}: {other}")),
    })?;
    tracing::info!(schema, "schema migrated");
    Ok(())
}

/// Create `schema` with its marker, in one transaction, unless it exists.
async fn create_marked(conn: &mut PgConnection, schema: &str) -> Result<()> {
    let what = format!("create schema `{schema}`");
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_namespace WHERE nspname = $1")
        .bind(schema)
        .fetch_optional(&mut *conn)
        .await
        .map_err(during(&what))?;
    if exists.is_some() {
        return Ok(());
    }
    let created = async {
        let mut tx = conn.begin().await?;
        tx.execute(format!("CREATE SCHEMA \"{schema}\"").as_str())
            .await?;
        tx.execute(format!("COMMENT ON SCHEMA \"{schema}\" IS '{MARKER}'").as_str())
            .await?;
        tx.commit().await
    }
    .await;
    match created {
        Ok(()) => {
            tracing::info!(schema, "schema created");
            Ok(())
        }
        // Another process created it meanwhile.
        Err(sqlx::Error::Database(d))
            if matches!(d.code().as_deref(), Some("23505") | Some("42P06")) =>
        {
            Ok(())
        }
        Err(e) => Err(map(&what, e)),
    }
}

/// The migrations `schema` lacks (all of them if it has none).
///
/// # Errors
/// `InvalidArgument` if the schema does not exist.
async fn missing(conn: &mut PgConnection, schema: &str) -> Result<Vec<i64>> {
    let what = format!("check schema `{schema}`");
    let has_table: Option<bool> = sqlx::query_scalar(
        "SELECT to_regclass(format('%I._sqlx_migrations', nspname)) IS NOT NULL
           FROM pg_namespace WHERE nspname = $1",
    )
    .bind(schema)
    .fetch_optional(&mut *conn)
    .await
    .map_err(during(&what))?;
    let applied: Vec<i64> = match has_table {
        None => {
            return Err(Error::invalid(format!(
                "schema `{schema}` does not exist in this database"
            )))
        }
        Some(false) => Vec::new(),
        Some(true) => sqlx::query_scalar(&format!(
            "SELECT version FROM \"{schema}\"._sqlx_migrations WHERE success"
        ))
        .fetch_all(&mut *conn)
        .await
        .map_err(during(&what))?,
    };
    Ok(MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// Check, at open without migration, that `schema` exists and has every
/// migration of this build.
///
/// # Errors
/// `InvalidArgument` naming the schema and the command to run.
pub(crate) async fn check_migrated(
    conn: &mut PgConnection,
    schema: &str,
    shown: &str,
) -> Result<()> {
    let fix = || migrate_command(shown, schema);
    match missing(conn, schema).await {
        Ok(m) if m.is_empty() => Ok(()),
        Ok(m) if m.len() == MIGRATOR.iter().count() => Err(Error::invalid(format!(
            "schema `{schema}` has no Conveyor tables: create them with {}",
            fix()
        ))),
        Ok(m) => Err(Error::invalid(format!(
            "schema `{schema}` lacks migrations {m:?} of this version of Conveyor: run {}",
            fix()
        ))),
        Err(e) if e.kind() == ErrorKind::InvalidArgument => Err(Error::invalid(format!(
            "{}: create it with {}",
            e.message(),
            fix()
        ))),
        Err(e) => Err(e),
    }
}

/// Drop `schema` if Conveyor created it (it carries [`MARKER`]); a missing
/// schema is fine.
///
/// # Errors
/// `InvalidArgument` for a schema Conveyor did not create (it is left).
pub(crate) async fn drop_marked(pool: &PgPool, schema: &str) -> Result<()> {
    let what = format!("drop schema `{schema}`");
    check_schema(schema)?;
    let comment: Option<Option<String>> = sqlx::query_scalar(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1",
    )
    .bind(schema)
    .fetch_optional(pool)
    .await
    .map_err(during(&what))?;
    match comment {
        None => Ok(()),
        Some(Some(c)) if c == MARKER => {
            pool.execute(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE").as_str())
                .await
                .map_err(during(&what))?;
            Ok(())
        }
        Some(_) => Err(Error::invalid(format!(
            "{what}: Conveyor did not create this schema, so it does not drop it (drop it \
             yourself if you mean to)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers_and_not_system_ones() {
        for ok in ["conveyor", "app_1", "_x", "public_app", "pgx"] {
            assert!(check_schema(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "A", "a-b", "a\"; drop", &"x".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad}");
        }
        for system in [
            "public",
            "information_schema",
            "pg_catalog",
            "pg_toast",
            "pg_temp_1",
        ] {
            let e = check_schema(system).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.message().contains("system or shared"), "{e}");
        }
    }

    #[test]
    fn the_fix_names_the_command() {
        let m = migrate_command("postgres://u:***@h/db", "app");
        assert!(
            m.contains("conveyor --url 'postgres://u:***@h/db?schema=app' migrate"),
            "{m}"
        );
    }
}
