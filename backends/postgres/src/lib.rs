//! # conveyor-postgres
//!
//! Conveyor on PostgreSQL: one queue shared by many processes on many
//! machines, with the database as the only thing they share. Every rule of
//! the contract (`docs/semantics.md`) is decided by the server, in one
//! statement or one transaction per step: offsets, dedup, group membership
//! and generations, stream-mode ownership and commits, queue-mode leases,
//! dead-lettering. Times are the server's clock (`clock_timestamp()`).
//!
//! ```no_run
//! # async fn demo() -> conveyor_core::Result<()> {
//! use conveyor_core::{BrokerOptions, prelude::*};
//! let url = "postgres://postgres@127.0.0.1/test";
//! let pg = conveyor_postgres::PgOptions::default().with_schema("orders_app");
//! // Once, as the schema's owner (or `conveyor --url ... migrate`):
//! conveyor_postgres::migrate(url, &pg).await?;
//! // Then, as the application, with DML rights only:
//! let broker = conveyor_postgres::open(url, BrokerOptions::default(), pg).await?;
//! broker.create_topic("orders", TopicConfig::new(4)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Or through the facade: `conveyor::open("postgres://user@host/db?schema=orders_app")`
//! (feature `postgres`).
//!
//! # URL options
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `schema` | `conveyor` | the schema of Conveyor's tables; never `public`, `information_schema` or `pg_*` |
//! | `migrate` | `true` with `auto_create=true`, else `false` | whether opening creates the schema and runs the migrations (needs DDL rights) |
//! | `max_connections` | 10 | pool size (plus one connection for notifications) |
//! | `timeout_ms` | 30000 | the deadline of every call, `open` and `migrate` included |
//! | `sslmode` | `prefer` | `disable`, `prefer`, `require` (encrypted, certificate not checked), `verify-ca` (signed by a trusted CA), `verify-full` (and issued for the host) |
//! | `sslrootcert` | the system's roots | PEM file of the CA(s) `verify-ca`/`verify-full` trust |
//! | `sslcert`, `sslkey` | none | PEM client certificate and key, for `cert` authentication |
//! | `application_name` | `conveyor` | what `pg_stat_activity` shows for the broker's connections |
//! | `durability` | `none` | `none`, `always`, `interval:<ms>`: see "Durability" |
//! | `auto_create` | `false` | create topics on first send; also migrates the schema at open unless `migrate=false` (development) |
//!
//! Any other option is refused by name (`InvalidArgument`). The TLS and
//! `application_name` options are libpq's names and meanings (libpq's
//! `allow` mode is not supported); TLS is rustls.
//!
//! # Layout
//!
//! The tables live in the URL's `schema` (default `conveyor`), created and
//! migrated by [`migrate`] (`migrations/`, embedded in the binary with
//! `sqlx::migrate!`; no live database is needed to build). Two apps, or two
//! tests, with different schemas never see each other. Opening never
//! creates anything unless asked (see "Server settings and rights").
//!
//! - `topics`, `partitions` (one row per partition: `next_offset`,
//!   `log_start`, bytes, last timestamp), `records` (primary key topic id,
//!   partition, offset).
//! - `groups`, `group_topics`, `members` (heartbeat time), `owners`
//!   (stream mode: member and generation per partition), `commits`
//!   (stream mode), `queue_cursors` and `leases` (queue mode),
//!   `idempotency` (the consumer-side [`IdempotencyStore`]).
//! - `staged`: records sent inside an application's transaction
//!   ([`PgBroker::send_in`]), waiting for the relay to append them.
//!
//! # How the rules hold in the server
//!
//! - **Dense offsets, no late lower offsets (§3).** An append to a
//!   partition updates its `partitions` row (`next_offset = next_offset +
//!   n`), which locks the row until the transaction commits; the records go
//!   in with the same statement (`UNNEST` of arrays, one round trip per
//!   partition). The next append to that partition waits for the lock, so
//!   offsets are assigned and become visible in order. A sequence would not
//!   do: sequence values commit out of order. Multi-partition batches lock
//!   partitions in ascending order, so two batches cannot deadlock.
//! - **Concurrent sends share a transaction.** Sends to one partition
//!   that arrive while an append to it is in flight wait in that
//!   partition's lane in this process; when the append returns, one
//!   statement appends all of them (each send's records contiguous and
//!   atomic, receipts split back). Under `always` that is one WAL flush for
//!   all of them, the main lever for throughput (figures below). If the
//!   database refuses the merged statement for its data (a constraint, a
//!   value out of range), each send is appended again on its own, so one
//!   caller's bad record never fails another caller's send.
//! - **Idempotent produce.** Records with an idempotency key go in a
//!   transaction that locks the partition row first, then looks the keys up
//!   among the partition's records younger than the dedup window (a partial
//!   index on `(topic, partition, idem)`), then appends what is new.
//! - **Groups.** Members heartbeat with every call; a member whose
//!   `last_seen` is older than the session timeout (server clock) is
//!   removed by the next call of any member, under the group row's lock,
//!   and the group is rebalanced there with core's sticky [`assign`]
//!   (stream mode: bump the generation, move only what must move). A
//!   commit is one `INSERT .. ON CONFLICT` whose `WHERE EXISTS` checks,
//!   with a share lock, that this member still owns the partition in the
//!   generation the message was delivered in: a fenced member's commit
//!   changes nothing and is `Fenced`.
//! - **Queue mode.** A poll is one statement, `queue_poll(...)` (a
//!   PL/pgSQL function, `migrations/0002_queue_poll.sql`), so no lock is
//!   ever held across a round trip to the client. It re-leases due rows of
//!   `leases` (nacked after their delay, expired below the delivery limit)
//!   with `FOR UPDATE SKIP LOCKED`, then takes fresh offsets from the
//!   partitions' cursors: a cursor row is locked `SKIP LOCKED` first, and a
//!   poll that took no cursor and found one taken waits for it (holding no
//!   other cursor, so two polls never wait for each other) instead of
//!   coming back empty while records wait. The cursor moves by up to the
//!   poll's `max`, one lease row is written per record (delayed records as
//!   not leased, available at their delivery time), and the records come
//!   back in the same answer. Only this statement, holding the cursor, adds
//!   leases, and a queue seek takes the cursor before it deletes them, so
//!   no lease exists past a cursor. An ack deletes the row if it still
//!   carries the lease id it was delivered with; the acks of concurrent
//!   consumers of one process share a statement (up to four statements of
//!   a group in flight, then merged: core's `Merge`). A poll dropped before
//!   its answer arrived gives back exactly the leases it took (each lease
//!   row carries the member's poll number), on the same connection after
//!   the poll's statement finished. Expired leases on their last attempt
//!   are dead-lettered by an idle poll and by each broker's sweep, in the
//!   same transaction as the DLQ append.
//! - **In the application's transaction** (docs/semantics.md §10).
//!   [`PgBroker::send_in`] inserts the records into `staged` in the
//!   caller's transaction: no lock, no offset, so a transaction held open
//!   holds up nobody, and a rollback leaves nothing. Its commit notifies
//!   `conveyor.<schema>` (`staged`), which wakes the relay of every broker
//!   open on the schema (and each looks every 250 ms): per partition, one
//!   statement, `relay_staged(...)` (`migrations/0003_staged.sql`), locks
//!   the partition row as an append does, deletes the committed staged
//!   rows of up to 1,000 transactions and appends them in (transaction,
//!   staging) order, so each is appended once and offsets stay dense and
//!   commit in order. [`PgBroker::ack_in`] is one statement in the
//!   caller's transaction: a queue-mode lease `DELETE`, or a stream-mode
//!   commit fenced by the delivery's generation (share lock on the owner
//!   row until the caller's transaction ends) that never moves a commit
//!   already past the message. These statements name the schema, so the
//!   caller's `search_path` does not matter; [`open_on`] builds a broker
//!   on the database an application's pool connects to, and
//!   [`Transactional`] is the runner's handler that works in a
//!   transaction.
//! - **Seeking by timestamp** is a binary search over the offsets
//!   (`offset_for_ts`, about 20 index probes for a million records):
//!   timestamps never decrease within a partition, so appends keep no second
//!   index per record.
//! - **Connections.** The statements every message pays for (a queue poll,
//!   an ack, a stream read and its commit, an append) run on connections
//!   kept out of sqlx's pool (up to half of it): taking one is a mutex and
//!   a `Vec`, where a round trip through the pool cost 40–70 µs more per
//!   statement than a one-row `DELETE` itself (14.6 µs). Transactions take
//!   their connection from the pool.
//! - **Waking up.** An insert into `records` notifies
//!   `conveyor.<schema>` (a statement trigger); each broker listens with one
//!   `PgListener` connection and wakes its waiting polls. A lost
//!   notification costs at most the fallback poll interval (250 ms).
//!
//! # Durability
//!
//! - `always`: `synchronous_commit = on` (PostgreSQL's default): `send`
//!   returns after the commit's WAL record is flushed (and replicated, if
//!   the server is configured for synchronous replication).
//! - `none` and `interval(d)`: the broker's connections run with
//!   `synchronous_commit = off`. PostgreSQL then flushes the WAL in the
//!   background, every `wal_writer_delay` (200 ms by default; `d` is not
//!   used). **If the server crashes, the last few hundred milliseconds of
//!   commits can be lost**, although consumers may already have read them;
//!   the lost offsets are then assigned again to new records. A crash of
//!   the client process loses nothing either way.
//!
//! # Retention
//!
//! Each open broker checks topics with a retention limit every 250 ms (and
//! `describe_topic` checks at once): it moves the partition's log start
//! first (a short update of one row), then deletes the records below it in
//! chunks of 5,000 rows per statement, so no statement holds locks for
//! long and producers only wait for the one-row update. Deleted rows are
//! reclaimed by autovacuum; the table is never rewritten.
//!
//! # Failures
//!
//! - Every call has a deadline ([`PgOptions::timeout`], `?timeout_ms=`,
//!   default 30 s; a poll gets its own timeout on top), `open` and
//!   [`migrate`] included (connecting, TLS, authenticating, migrating): a
//!   server that stops answering, a server that accepts the connection and
//!   never answers, or a connection whose packets are dropped, makes the
//!   call fail with `ErrorKind::Unavailable` instead of hanging.
//! - `close` makes the group members of this broker leave, then closes the
//!   connection pool in a task of its own: every connection goes, even if
//!   the call is cut at its deadline, while producers and consumers of the
//!   broker are still held (they then fail with `Closed`).
//! - A transaction abandoned unfinished (its call was dropped or hit the
//!   deadline) closes its connection, so the server rolls it back at once
//!   and releases its row locks; nothing half-done is ever committed.
//! - After the server comes back, calls work again; a dead pooled
//!   connection fails one call with `Unavailable` and is replaced.
//!
//! # Measured
//!
//! Release build, this 2-core machine, PostgreSQL 15 on the same machine,
//! 100-byte values, one partition, sends of one record
//! (`cargo run --release -p conveyor-postgres --example produce_load --
//! always|none`, 3 s per row):
//!
//! | durability | producers | before merging sends | merged |
//! |---|---|---|---|
//! | `always` | 1 | 986 msg/s | 1,903 msg/s |
//! | `always` | 4 | 787 msg/s | 3,830 msg/s |
//! | `always` | 16 | 963 msg/s | 13,936 msg/s |
//! | `none` | 1 | 1,283 msg/s | 2,923 msg/s |
//! | `none` | 16 | 2,071 msg/s | 18,190 msg/s |
//!
//! ("before": one statement per send and a topic lookup and connection
//! ping per send; the single-producer gain is the topic cache and no
//! ping.) The test suite checks that sends queued behind an append share
//! one transaction (`tests/server.rs`, through `xmin`).
//!
//! # Server settings and rights
//!
//! **Migrations are their own step.** [`migrate`] (or `conveyor --url
//! 'postgres://owner@host/db?schema=NAME' migrate`) creates the schema if
//! it is missing, marks it as Conveyor's (a `COMMENT ON SCHEMA`), and runs
//! the migrations it lacks; running it again changes nothing. It needs a
//! role that may create the schema (`CREATE` on the database) or owns it.
//! [`open`] then only checks that the schema has every migration of this
//! build; a schema that is missing or behind fails with `InvalidArgument`
//! naming the schema and the command to run, and nothing is created (a
//! read with a mistyped schema creates nothing). For development,
//! `migrate=true` (or `auto_create=true`, unless `migrate=false`) makes
//! `open` migrate first, as the owner would. A schema that already holds
//! every migration is opened without any DDL, so a least-privilege role
//! may keep `migrate=true`.
//!
//! **Rights of the application's role**, after the owner migrated
//! (exactly what `tests/chaos.rs` grants a fresh role, which then produces
//! and consumes in stream and queue mode, and cannot create a table):
//!
//! ```sql
//! GRANT USAGE ON SCHEMA app TO app_role;
//! GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA app TO app_role;
//! GRANT USAGE ON ALL SEQUENCES IN SCHEMA app TO app_role;
//! GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA app TO app_role;
//! ```
//!
//! (`EXECUTE` is PostgreSQL's default for `PUBLIC`; grant it if your
//! database revoked that. Rerun the `ALL TABLES`/`ALL SEQUENCES` grants
//! after a migration that adds tables, or set `ALTER DEFAULT PRIVILEGES`
//! for the owner.) A missing right is `PermissionDenied` naming the
//! statement's object; the role never needs `CREATE`, `TRUNCATE` or
//! ownership. [`PgBroker::drop_schema`] needs ownership, and drops only a
//! schema [`migrate`] created.
//!
//! **Schemas.** `public`, `information_schema` and `pg_*` are refused
//! (`InvalidArgument`): Conveyor's tables, functions and trigger never go
//! into a schema other users share, and `drop_schema` can never drop one.
//!
//! **TLS.** Without `sslmode`, the connection is encrypted if the server
//! offers TLS (`prefer`, libpq's default; before TLS support, Conveyor's
//! connections were always plain). On a loopback or otherwise trusted
//! network, `sslmode=disable` saves the encryption's cost (the figures
//! under "Measured" were taken without TLS).
//! `sslmode=require` encrypts without checking the certificate;
//! `verify-ca`/`verify-full` check it against `sslrootcert` (else the
//! system's roots), `verify-full` also the host name. A certificate that
//! does not verify, or a server without TLS under `require`, fails with
//! `InvalidArgument` ("TLS to PostgreSQL failed: ...", naming the options
//! to check); a `hostssl`-only `pg_hba.conf` rule met with
//! `sslmode=disable` is `Unauthenticated`, saying TLS is required.
//!
//! **Durability** needs `synchronous_commit`: the broker sets it on its
//! own connections (`on` for `always`, `off` otherwise; any role may set
//! it), so the server's default does not matter. With synchronous
//! replication configured on the server, `always` also waits for the
//! standby.
//!
//! **Authentication.** Any method PostgreSQL offers over TCP that sqlx
//! speaks (`scram-sha-256`, `md5`, `password`, `trust`, `cert` with
//! `sslcert`/`sslkey`). Wrong credentials or an unknown role are
//! `Unauthenticated`; an unknown database is `InvalidArgument`. No error
//! message, source chain, `Debug` output or log line holds the password:
//! URLs are shown with it hidden, and messages are scrubbed of it.
//!
//! # Errors
//!
//! `error.rs` maps sqlx's errors by whose fault they are, each said once
//! (the driver's error is in the message, not repeated as a source):
//!
//! | what | SQLSTATE / driver error | kind |
//! |---|---|---|
//! | connection lost or refused, server shutting down or out of resources, a pool or call deadline, serialization failure, deadlock, statement cancelled, read-only standby | I/O, protocol, `08xxx`, `53xxx`, `57P01`–`57P03`, `57014`, `40001`, `40P01`, `25006` | `Unavailable` (retriable: nothing was committed, or the call is safe to repeat) |
//! | credentials refused | `28xxx` | `Unauthenticated` |
//! | missing right | `42501` | `PermissionDenied` |
//! | unknown database, schema without tables, data the database refuses, a bad connection option or TLS setup | `3D000`, `3F000`, `42P01`, `22xxx`, `23502`, `23514`, `54xxx`, TLS, configuration | `InvalidArgument` |
//! | anything else | | `Internal`, naming the operation and the SQLSTATE |
//!
//! A send merged with others (see above) that the database refuses for
//! its data is appended again on its own, so only the faulty send fails.
#![deny(missing_docs)]

mod admin;
mod broker;
mod connect;
mod consumer;
mod error;
mod group;
mod group_alter;
mod produce;
mod queries;
mod retention;
mod schema;
mod spare;
mod transactional;
mod tx;
mod url;

pub use broker::PgBroker;
/// The sqlx this crate is built with: use its `PgPool`, `PgConnection`
/// and `Transaction` with [`PgBroker::send_in`] and [`PgBroker::ack_in`],
/// so the versions match.
pub use sqlx;
pub use transactional::{PgTransaction, Staged, Transactional, TxHandler};
pub use url::{migrate_url, open_url, parse as parse_url, URL_OPTIONS, URL_SCHEMES};

#[cfg(doc)]
use conveyor_core::{backend::assign, IdempotencyStore};
use conveyor_core::{BrokerOptions, Result};
pub(crate) use schema::check_schema;

/// Where and how to connect, besides the connection URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// The schema holding Conveyor's tables: lower case letters, digits
    /// and `_`, not starting with a digit, at most 63 characters, and not a
    /// system or shared schema (`public`, `information_schema`, `pg_*`).
    /// Default `conveyor`.
    pub schema: String,
    /// Connections in the pool (default 10), plus one for notifications.
    pub max_connections: u32,
    /// How long a call may wait for the server before it fails with
    /// `ErrorKind::Unavailable` (default 30 s; a poll may wait this long on
    /// top of its own timeout). Without it, a connection whose packets are
    /// dropped (a network partition) would hang a call until TCP gives up.
    pub timeout: std::time::Duration,
    /// Whether `open` creates the schema and runs the migrations (needs
    /// DDL rights): `Some(true)` always, `Some(false)` never (the schema
    /// must have been migrated, see [`migrate`]), `None` (the default) only
    /// when the broker options auto-create topics (development). URL
    /// option `migrate=true|false`.
    pub migrate: Option<bool>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: "conveyor".to_string(),
            max_connections: 10,
            timeout: std::time::Duration::from_secs(30),
            migrate: None,
        }
    }
}

impl PgOptions {
    /// Use `schema` for Conveyor's tables.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Pool size.
    pub fn with_max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// The deadline of each call (see [`PgOptions::timeout`]).
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether `open` migrates the schema (see [`PgOptions::migrate`]).
    pub fn with_migrate(mut self, migrate: bool) -> Self {
        self.migrate = Some(migrate);
        self
    }
}

/// The local clock in ms since the epoch (only to convert a producer's
/// delivery times onto the server's clock, and for DLQ `failed_at`).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds for SQL, capped at 100 years (so `now_ms() + d` never
/// overflows a bigint).
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    d.as_millis().min(100 * 365 * 24 * 3600 * 1000) as i64
}

/// Connect to the database at `url` (a libpq-style URL; its query may
/// carry `sslmode`, `sslrootcert`, `sslcert`, `sslkey` and
/// `application_name`), check that the schema is migrated (or migrate it,
/// with [`PgOptions::migrate`]), and start the notification listener and
/// the retention task. Without migration, opening creates nothing.
/// Conveyor's own options (`schema`, `migrate`, `max_connections`,
/// `timeout_ms`, `durability`, `auto_create`) go in `pg` and `options`,
/// not in this URL: there they are refused, not ignored ([`open_url`] and
/// `conveyor::open` take a whole broker URL).
///
/// # Errors
/// `InvalidArgument` for a bad URL or schema, a Conveyor option in the
/// connection URL, a schema that is missing or
/// not migrated (the message names the schema and the command to run), a
/// TLS setup that does not match the server; `Unauthenticated` if the
/// server refuses the credentials; `PermissionDenied` if the role lacks a
/// right (see "Server settings and rights"); `Unavailable` if the server
/// cannot be reached or does not answer within [`PgOptions::timeout`].
/// No message holds the URL's password.
///
/// # Cancel safety
/// Cancel safe: dropped, nothing is left but what the migrations created
/// (they run in transactions).
pub async fn open(url: &str, options: BrokerOptions, pg: PgOptions) -> Result<PgBroker> {
    PgBroker::open(url, options, pg).await
}

/// Open a broker on the database an application's own pool connects to:
/// same server, database, credentials and TLS settings as `pool`, with
/// connections of its own (up to [`PgOptions::max_connections`], using
/// the broker's schema and durability; the application's connections are
/// never changed). Then [`PgBroker::send_in`] and [`PgBroker::ack_in`]
/// work in transactions of `pool`. Otherwise as [`open`].
///
/// # Errors
/// As [`open`] (messages show the pool's user, host and database).
///
/// # Cancel safety
/// As [`open`].
pub async fn open_on(
    pool: &sqlx::PgPool,
    options: BrokerOptions,
    pg: PgOptions,
) -> Result<PgBroker> {
    PgBroker::open_on(pool, options, pg).await
}

/// Create the schema (marked as Conveyor's, so [`PgBroker::drop_schema`]
/// may drop it) if it is missing, and bring its tables to this version:
/// the step to run, as a role with the rights to create (the schema's
/// owner), before applications open the schema without DDL rights. Running
/// it again changes nothing. The CLI runs it as `conveyor --url ... migrate`.
///
/// # Errors
/// As [`open`]; `PermissionDenied` if the role may not create the schema or
/// its tables.
///
/// # Cancel safety
/// Cancel safe: each migration runs in a transaction; dropped, the schema
/// may exist with the migrations that finished.
pub async fn migrate(url: &str, pg: &PgOptions) -> Result<()> {
    schema::migrate(url, pg).await
}
