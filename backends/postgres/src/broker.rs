//! The broker: connection pool, topic administration, lag, fetch, the
//! notification listener and the idempotency store.

use crate::connect::Target;
use crate::error::during;
use crate::queries::{self, existing_topic, topic_config, TopicRow};
use crate::{check_schema, PgOptions};
use async_trait::async_trait;
use conveyor_core::backend::{validate, Merge, TopicCache};
use conveyor_core::{
    Broker, BrokerOptions, Capabilities, Consumer, DeliveryMode, DeliveryToken, Durability, Error,
    ErrorKind, GroupConfig, GroupDescription, GroupLag, IdempotencyStore, MemberDescription,
    Message, PartitionDescription, PartitionLag, Producer, Result, TopicConfig, TopicDescription,
};
use parking_lot::Mutex;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Row};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a waiting poll sleeps at most between looks when no
/// notification comes (a lost notification costs at most this).
pub(crate) const FALLBACK_POLL: Duration = Duration::from_millis(250);

/// How long a send trusts a topic's cached row.
pub(crate) const TOPIC_CACHE: Duration = Duration::from_secs(1);

/// State shared by the broker, its producers and consumers.
pub(crate) struct Inner {
    pub pool: PgPool,
    pub schema: String,
    pub options: BrokerOptions,
    pub closed: AtomicBool,
    /// Bumped whenever a notification arrives (or the listener
    /// reconnects, when some may have been lost).
    pub changed: watch::Sender<u64>,
    pub round_robin: Mutex<HashMap<String, u32>>,
    /// How long a call may wait for the server (see [`PgOptions::timeout`]).
    pub op_timeout: Duration,
    /// Members joined through this broker and not yet gone: closing the
    /// broker makes them leave (their partitions and leases go to others
    /// at once, as when an embedded broker's process ends).
    pub members: Mutex<std::collections::BTreeSet<(Arc<str>, i64)>>,
    /// Concurrent sends per (topic id, partition), merged (see
    /// `produce::Lane`).
    pub lanes: Mutex<HashMap<(i64, u32), crate::produce::Lane>>,
    /// Queue-mode acks in flight per group, merged into one statement
    /// (see `consumer::ack_leases`).
    pub acks: Arc<Merge<Arc<str>, crate::consumer::AckItem, bool>>,
    /// Connections kept out of the pool for per-message statements (see
    /// `spare`).
    pub spare: Arc<crate::spare::Spare>,
    /// Topics as last read, for sends (see [`Inner::topic_cached`]).
    topics: TopicCache<TopicRow>,
    /// Wakes the relay of staged records (`transactional::relay`).
    pub relay_wake: Arc<tokio::sync::Notify>,
    /// The statements run on the caller's connection (`transactional`).
    pub tx_sql: crate::transactional::Statements,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Closed, "the broker is closed"));
        }
        Ok(())
    }

    /// Run one call of the public API with the broker's deadline (plus
    /// `extra`, a poll's own timeout): a server that stops answering (a
    /// network partition, a black-holed connection) is `Unavailable` after
    /// it, not a call that hangs forever. A call cut there rolls back what
    /// it had not committed.
    pub(crate) async fn bounded<T>(
        &self,
        extra: Duration,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        conveyor_core::backend::within(self.op_timeout.saturating_add(extra), "PostgreSQL", call)
            .await
    }

    /// A connection for one statement outside a transaction (see
    /// `spare`): give it back by dropping it, after
    /// [`crate::spare::Conn::checked`] on the statement's result.
    /// `what` names the call for an error (made only then).
    pub(crate) async fn conn(&self, what: impl FnOnce() -> String) -> Result<crate::spare::Conn> {
        self.spare
            .get(&self.pool)
            .await
            .map_err(|e| crate::error::during(what())(e))
    }

    /// Wake this process's waiting polls (other processes are woken by
    /// the server's notifications).
    pub(crate) fn wake(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The topic's row for a send, from a cache kept for
    /// [`TOPIC_CACHE`] (a send then costs one round trip). A topic deleted
    /// meanwhile fails the append, which forgets it; partitions added by
    /// another process are seen within [`TOPIC_CACHE`] (an explicit
    /// partition beyond the cached count looks again before refusing).
    pub(crate) async fn topic_cached(&self, name: &str) -> Result<TopicRow> {
        if let Some(t) = self.topics.get(name) {
            return Ok(t);
        }
        let t = self.topic_or_create(name).await?;
        self.topics.put(name, &t);
        Ok(t)
    }

    /// Drop a topic from the send cache.
    pub(crate) fn forget_topic(&self, name: &str) {
        self.topics.forget(name);
    }

    /// The topic's row, creating the topic if auto-create is on.
    pub(crate) async fn topic_or_create(&self, name: &str) -> Result<TopicRow> {
        validate::topic_name(name)?;
        if let Some(t) = queries::topic(&self.pool, name).await? {
            return Ok(t);
        }
        if !self.options.auto_create_topics {
            return Err(Error::topic_not_found(name));
        }
        self.create_topic(name, TopicConfig::default(), true)
            .await?;
        existing_topic(&self.pool, name).await
    }

    /// Create a topic; with `lenient`, an existing one with another
    /// config is fine (auto-create, DLQ topics).
    pub(crate) async fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
        lenient: bool,
    ) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        validate::topic_config(name, &config)?;
        let what = format!("create topic `{name}`");
        let mut tx = crate::tx::Tx::begin(&self.pool)
            .await
            .map_err(during(&what))?;
        create_topic_in(&mut tx, name, &config, lenient).await?;
        tx.commit().await.map_err(during(&what))
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        let what = format!("delete topic `{name}`");
        let mut tx = crate::tx::Tx::begin(&self.pool)
            .await
            .map_err(during(&what))?;
        let row = sqlx::query("DELETE FROM topics WHERE name = $1 RETURNING id")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(during(&what))?
            .ok_or_else(|| Error::topic_not_found(name))?;
        let id: i64 = row.get(0);
        for table in ["records", "staged"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE topic_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(during(&what))?;
        }
        for table in ["owners", "commits", "queue_cursors", "leases"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE topic = $1"))
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(during(&what))?;
        }
        let groups: Vec<String> =
            sqlx::query_scalar("DELETE FROM group_topics WHERE topic = $1 RETURNING group_name")
                .bind(name)
                .fetch_all(&mut *tx)
                .await
                .map_err(during(&what))?;
        self.finish_topic_change(tx, name, &groups, &what).await
    }

    async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        validate::partition_count(name, partitions)?;
        let what = format!("add partitions to `{name}`");
        let mut tx = crate::tx::Tx::begin(&self.pool)
            .await
            .map_err(during(&what))?;
        let row = sqlx::query("SELECT id, config FROM topics WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(during(&what))?
            .ok_or_else(|| Error::topic_not_found(name))?;
        let id: i64 = row.get(0);
        let mut config = topic_config(name, row.get(1))?;
        if partitions < config.partitions {
            return Err(Error::invalid(format!(
                "topic `{name}`: partitions can only grow ({} now, asked for {partitions})",
                config.partitions
            )));
        }
        if partitions == config.partitions {
            return Ok(());
        }
        let before = config.partitions;
        config.partitions = partitions;
        sqlx::query("UPDATE topics SET partitions = $2, config = $3 WHERE id = $1")
            .bind(id)
            .bind(partitions as i32)
            .bind(config_json(&config)?)
            .execute(&mut *tx)
            .await
            .map_err(during(&what))?;
        sqlx::query(
            "INSERT INTO partitions (topic_id, partition) SELECT $1, generate_series($2::int, $3::int - 1)",
        )
        .bind(id)
        .bind(before as i32)
        .bind(partitions as i32)
        .execute(&mut *tx)
        .await
        .map_err(during(&what))?;
        let groups: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT group_name FROM members WHERE $1 = ANY(topics)")
                .bind(name)
                .fetch_all(&mut *tx)
                .await
                .map_err(during(&what))?;
        self.finish_topic_change(tx, name, &groups, &what).await
    }

    /// The end of a change to a topic's partitions (delete, grow): the
    /// groups that read it rebalance in the same transaction, then the send
    /// cache forgets the topic and waiting polls look again.
    async fn finish_topic_change(
        &self,
        mut tx: crate::tx::Tx,
        name: &str,
        groups: &[String],
        what: &str,
    ) -> Result<()> {
        for g in groups {
            crate::group::lock_and_rebalance(&mut tx, g).await?;
        }
        tx.commit().await.map_err(during(what))?;
        self.forget_topic(name);
        self.wake();
        Ok(())
    }

    /// The topic's row, checked to have `partition` (reads outside groups).
    async fn partition_of(&self, topic: &str, partition: u32) -> Result<TopicRow> {
        validate::topic_name(topic)?;
        let t = existing_topic(&self.pool, topic).await?;
        validate::partition(topic, partition, t.config.partitions)?;
        Ok(t)
    }

    pub(crate) async fn group_lag(&self, group: &str) -> Result<GroupLag> {
        self.check_open()?;
        validate::group_name(group)?;
        let what = format!("lag of group `{group}`");
        let mode: Option<String> = sqlx::query_scalar("SELECT mode FROM groups WHERE name = $1")
            .bind(group)
            .fetch_optional(&self.pool)
            .await
            .map_err(during(&what))?;
        let mode = DeliveryMode::parse(&mode.ok_or_else(|| Error::group_not_found(group))?)?;
        let rows = sqlx::query(
            r#"SELECT gt.topic, p.partition, p.log_start, p.next_offset, c.committed, q.next,
                      (SELECT min(l."offset") FROM leases l WHERE l.group_name = gt.group_name
                         AND l.topic = gt.topic AND l.partition = p.partition AND l."offset" >= p.log_start),
                      (SELECT count(*) FROM leases l WHERE l.group_name = gt.group_name
                         AND l.topic = gt.topic AND l.partition = p.partition AND l."offset" >= p.log_start),
                      (SELECT count(*) FROM leases l WHERE l.group_name = gt.group_name
                         AND l.topic = gt.topic AND l.partition = p.partition AND l."offset" >= p.log_start
                         AND l.member_id IS NOT NULL AND l.deadline > now_ms()),
                      (SELECT count(*) FROM leases l WHERE l.group_name = gt.group_name
                         AND l.topic = gt.topic AND l.partition = p.partition AND l."offset" >= p.log_start
                         AND (l.member_id IS NULL OR l.deadline <= now_ms()) AND l.not_before > now_ms())
                 FROM group_topics gt
                 JOIN topics t ON t.name = gt.topic
                 JOIN partitions p ON p.topic_id = t.id
                 LEFT JOIN commits c ON c.group_name = gt.group_name AND c.topic = gt.topic AND c.partition = p.partition
                 LEFT JOIN queue_cursors q ON q.group_name = gt.group_name AND q.topic = gt.topic AND q.partition = p.partition
                WHERE gt.group_name = $1
                ORDER BY gt.topic, p.partition"#,
        )
        .bind(group)
        .fetch_all(&self.pool)
        .await
        .map_err(during(&what))?;
        let partitions = rows
            .iter()
            .map(|r| {
                let topic: String = r.get(0);
                let partition = r.get::<i32, _>(1) as u32;
                let log_start = r.get::<i64, _>(2) as u64;
                let log_end = r.get::<i64, _>(3) as u64;
                match mode {
                    DeliveryMode::Stream => {
                        let committed = r
                            .get::<Option<i64>, _>(4)
                            .map_or(log_start, |c| c as u64)
                            .clamp(log_start, log_end.max(log_start));
                        PartitionLag {
                            topic,
                            partition,
                            committed,
                            log_end,
                            lag: log_end.saturating_sub(committed),
                            in_flight: 0,
                            available: 0,
                        }
                    }
                    DeliveryMode::Queue => {
                        let cursor = r
                            .get::<Option<i64>, _>(5)
                            .map_or(log_start, |c| c as u64)
                            .clamp(log_start, log_end.max(log_start));
                        let lowest = r.get::<Option<i64>, _>(6).map(|o| o as u64);
                        let rows = r.get::<i64, _>(7) as u64;
                        let in_flight = r.get::<i64, _>(8) as u64;
                        let waiting = r.get::<i64, _>(9) as u64;
                        let lag = rows + log_end.saturating_sub(cursor);
                        PartitionLag {
                            topic,
                            partition,
                            committed: lowest.map_or(cursor, |l| l.min(cursor)),
                            log_end,
                            lag,
                            in_flight,
                            available: lag.saturating_sub(in_flight + waiting),
                        }
                    }
                }
            })
            .collect();
        Ok(GroupLag {
            group: group.to_string(),
            mode,
            partitions,
        })
    }
}

/// Insert a topic and its partition rows in the caller's transaction.
pub(crate) async fn create_topic_in(
    conn: &mut sqlx::PgConnection,
    name: &str,
    config: &TopicConfig,
    lenient: bool,
) -> Result<()> {
    let what = format!("create topic `{name}`");
    let tx = conn;
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO topics (name, partitions, config, retention_ms, retention_bytes)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING RETURNING id",
    )
    .bind(name)
    .bind(config.partitions as i32)
    .bind(config_json(config)?)
    .bind(config.retention.max_age.map(crate::millis))
    .bind(
        config
            .retention
            .max_bytes
            .map(|b| b.min(i64::MAX as u64) as i64),
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(during(&what))?;
    match id {
        Some(id) => {
            sqlx::query(
                "INSERT INTO partitions (topic_id, partition) SELECT $1, generate_series(0, $2::int - 1)",
            )
            .bind(id)
            .bind(config.partitions as i32)
            .execute(&mut *tx)
            .await
            .map_err(during(&what))?;
            tracing::debug!(
                topic = name,
                partitions = config.partitions,
                "topic created"
            );
            Ok(())
        }
        None => {
            let existing = existing_topic(&mut *tx, name).await?;
            if existing.config == *config || lenient {
                return Ok(());
            }
            Err(Error::new(
                ErrorKind::TopicExists,
                format!(
                    "topic `{name}` exists with another config ({} partitions, asked for {})",
                    existing.config.partitions, config.partitions
                ),
            ))
        }
    }
}

pub(crate) fn config_json<T: serde::Serialize>(config: &T) -> Result<serde_json::Value> {
    serde_json::to_value(config).map_err(|e| Error::internal(format!("config to JSON: {e}")))
}

/// Conveyor on PostgreSQL (see the crate docs).
#[derive(Clone)]
pub struct PgBroker {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for PgBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBroker")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

impl PgBroker {
    pub(crate) async fn open(url: &str, options: BrokerOptions, pg: PgOptions) -> Result<PgBroker> {
        let target = Target::parse(url)?;
        Self::open_target(target, options, pg).await
    }

    /// Open a broker on the database `pool` connects to (see
    /// [`crate::open_on`]).
    pub(crate) async fn open_on(
        pool: &PgPool,
        options: BrokerOptions,
        pg: PgOptions,
    ) -> Result<PgBroker> {
        let target = Target::from_options((*pool.connect_options()).clone());
        Self::open_target(target, options, pg).await
    }

    async fn open_target(
        target: Target,
        options: BrokerOptions,
        pg: PgOptions,
    ) -> Result<PgBroker> {
        check_schema(&pg.schema)?;
        if pg.max_connections == 0 {
            return Err(Error::invalid("max_connections must be at least 1"));
        }
        let what = format!("open schema `{}`", pg.schema);
        // Every step of opening (connecting, TLS, authenticating,
        // migrating, checking) under the broker's deadline.
        let pool = target
            .within(pg.timeout, &what, Self::connect(&target, &options, &pg))
            .await?;
        let schema = pg.schema.clone();
        let (changed, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            pool,
            schema,
            options,
            closed: AtomicBool::new(false),
            changed,
            round_robin: Mutex::new(HashMap::new()),
            op_timeout: pg.timeout,
            members: Mutex::new(std::collections::BTreeSet::new()),
            lanes: Mutex::new(HashMap::new()),
            // At most half the pool, and never all of it (transactions take
            // theirs from the pool).
            spare: crate::spare::Spare::new((pg.max_connections as usize - 1) / 2),
            acks: Arc::new(Merge::new(
                crate::consumer::ACK_MERGE_MAX,
                crate::consumer::ACK_CALLS,
            )),
            topics: TopicCache::new(TOPIC_CACHE),
            relay_wake: Arc::new(tokio::sync::Notify::new()),
            tx_sql: crate::transactional::Statements::new(&pg.schema),
            tasks: Mutex::new(Vec::new()),
        });
        let listener = tokio::spawn(listen(Arc::downgrade(&inner)));
        let retention = tokio::spawn(crate::retention::run(Arc::downgrade(&inner)));
        let sweep = tokio::spawn(crate::consumer::sweep(Arc::downgrade(&inner)));
        let relay = tokio::spawn(crate::transactional::relay(Arc::downgrade(&inner)));
        inner
            .tasks
            .lock()
            .extend([listener, retention, sweep, relay]);
        Ok(PgBroker { inner })
    }

    /// Migrate if asked, connect the pool and check the schema.
    async fn connect(target: &Target, options: &BrokerOptions, pg: &PgOptions) -> Result<PgPool> {
        let schema = pg.schema.clone();
        let connecting = || format!("connect to PostgreSQL at `{}`", target.shown);
        // One plain connection first: its error says what is wrong (a
        // refused connection, credentials, TLS), where the pool would only
        // time out retrying. It migrates if asked, then checks the schema.
        let mut conn = sqlx::PgConnection::connect_with(&target.options)
            .await
            .map_err(during(connecting()))?;
        let ready = async {
            if pg.migrate.unwrap_or(options.auto_create_topics) {
                crate::schema::migrate_on(&mut conn, &schema).await?;
            }
            crate::schema::check_migrated(&mut conn, &schema, &target.shown).await
        }
        .await;
        let _ = conn.close().await;
        ready?;
        let sync = options.durability == Durability::Always;
        let set = format!(
            "SET search_path TO \"{schema}\"; SET synchronous_commit TO {}",
            if sync { "on" } else { "off" }
        );
        let pool = PgPoolOptions::new()
            .max_connections(pg.max_connections)
            // No ping before every checkout: a connection that died is
            // found by its first statement, which fails `Unavailable`
            // (retriable), and the pool replaces it.
            .test_before_acquire(false)
            .acquire_timeout(pg.timeout.min(Duration::from_secs(5)))
            .after_connect(move |conn, _| {
                let set = set.clone();
                Box::pin(async move {
                    conn.execute(set.as_str()).await?;
                    Ok(())
                })
            })
            .connect_with(target.options.clone())
            .await
            .map_err(during(connecting()))?;
        Ok(pool)
    }

    /// The broker's connection pool (its connections use the broker's
    /// schema and durability), for an application's own statements next
    /// to Conveyor's, such as reading what a consumer wrote in the same
    /// database.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema this broker's tables live in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// Drop the schema and everything in it (tests and tools; every
    /// broker on the schema stops working), if Conveyor created it
    /// ([`migrate`](crate::migrate) marks a schema it creates); a schema
    /// that existed before is left as it is.
    ///
    /// # Errors
    /// `InvalidArgument` for a schema Conveyor did not create;
    /// `PermissionDenied` if the role may not drop it; `Unavailable` if the
    /// server cannot be reached.
    ///
    /// # Cancel safety
    /// Cancel safe: the drop is one statement.
    pub async fn drop_schema(&self) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async {
                crate::schema::drop_marked(&self.inner.pool, &self.inner.schema).await
            })
            .await
    }
}

/// Forward the server's notifications for this schema to waiting polls;
/// reconnect after a lost connection (waking everyone, since
/// notifications may have been missed meanwhile).
async fn listen(inner: Weak<Inner>) {
    let channel = match inner.upgrade() {
        Some(i) => format!("conveyor.{}", i.schema),
        None => return,
    };
    loop {
        let pool = match inner.upgrade() {
            Some(i) if !i.closed.load(Ordering::Acquire) => i.pool.clone(),
            _ => return,
        };
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(_) => {
                drop(pool);
                tokio::time::sleep(FALLBACK_POLL).await;
                continue;
            }
        };
        drop(pool);
        if listener.listen(&channel).await.is_err() {
            tokio::time::sleep(FALLBACK_POLL).await;
            continue;
        }
        if let Some(i) = inner.upgrade() {
            i.wake();
            i.relay_wake.notify_one();
        }
        loop {
            match listener.try_recv().await {
                // A transaction that staged records committed: relay them.
                Ok(Some(n)) if n.payload() == "staged" => match inner.upgrade() {
                    Some(i) => i.relay_wake.notify_one(),
                    None => return,
                },
                Ok(Some(_)) => match inner.upgrade() {
                    Some(i) => i.wake(),
                    None => return,
                },
                // The connection was lost; `try_recv` reconnects next time.
                Ok(None) => match inner.upgrade() {
                    Some(i) => {
                        i.wake();
                        i.relay_wake.notify_one();
                    }
                    None => return,
                },
                Err(_) => break,
            }
        }
        tokio::time::sleep(FALLBACK_POLL).await;
    }
}

#[async_trait]
impl Broker for PgBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::SERVER
    }

    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.create_topic(name, config, false).await
            })
            .await
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.delete_topic(name).await
            })
            .await
    }

    async fn list_topics(&self) -> Result<Vec<String>> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                sqlx::query_scalar("SELECT name FROM topics ORDER BY name")
                    .fetch_all(&self.inner.pool)
                    .await
                    .map_err(during("list topics"))
            })
            .await
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        self.inner.bounded(Duration::ZERO, async move {
            self.inner.check_open()?;
            validate::topic_name(name)?;
            let t = existing_topic(&self.inner.pool, name).await?;
            if t.config.retention.is_limited() {
                crate::retention::enforce(&self.inner, name, t.id, &t.config).await?;
            }
            let rows = sqlx::query(
                "SELECT partition, log_start, next_offset, bytes FROM partitions WHERE topic_id = $1 ORDER BY partition",
            )
            .bind(t.id)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(during(format!("describe topic `{name}`")))?;
            Ok(TopicDescription {
                name: name.to_string(),
                config: t.config,
                partitions: rows
                    .iter()
                    .map(|r| PartitionDescription {
                        partition: r.get::<i32, _>(0) as u32,
                        log_start: r.get::<i64, _>(1) as u64,
                        log_end: r.get::<i64, _>(2) as u64,
                        bytes: r.get::<i64, _>(3) as u64,
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.add_partitions(name, partitions).await
            })
            .await
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                Ok(Arc::new(crate::produce::PgProducer {
                    inner: self.inner.clone(),
                }) as Arc<dyn Producer>)
            })
            .await
    }

    async fn consumer(
        &self,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<Arc<dyn Consumer>> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                let c = crate::group::join(&self.inner, group, topics, config).await?;
                Ok(Arc::new(c) as Arc<dyn Consumer>)
            })
            .await
    }

    async fn alter_group(
        &self,
        group: &str,
        changes: conveyor_core::GroupChanges,
    ) -> Result<GroupConfig> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                crate::group_alter::alter_group(&self.inner, group, &changes).await
            })
            .await
    }

    async fn list_groups(&self) -> Result<Vec<String>> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                sqlx::query_scalar("SELECT name FROM groups ORDER BY name")
                    .fetch_all(&self.inner.pool)
                    .await
                    .map_err(during("list groups"))
            })
            .await
    }

    async fn group_lag(&self, group: &str) -> Result<GroupLag> {
        self.inner
            .bounded(
                Duration::ZERO,
                async move { self.inner.group_lag(group).await },
            )
            .await
    }

    async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        self.inner.bounded(Duration::ZERO, async move {
            let lag = self.inner.group_lag(group).await?;
            let what = format!("describe group `{group}`");
            let g = sqlx::query("SELECT config, generation FROM groups WHERE name = $1")
                .bind(group)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(during(&what))?
                .ok_or_else(|| Error::group_not_found(group))?;
            let config: GroupConfig = serde_json::from_value(g.get(0))
                .map_err(|e| Error::internal(format!("{what}: stored config is unreadable: {e}")))?;
            let members = sqlx::query(
                r#"SELECT m.member_id, m.topics, now_ms() - m.last_seen,
                          coalesce((SELECT array_agg(o.topic ORDER BY o.topic, o.partition) FROM owners o
                                     WHERE o.group_name = m.group_name AND o.member_id = m.member_id), '{}'),
                          coalesce((SELECT array_agg(o.partition ORDER BY o.topic, o.partition) FROM owners o
                                     WHERE o.group_name = m.group_name AND o.member_id = m.member_id), '{}'),
                          (SELECT count(*) FROM leases l WHERE l.group_name = m.group_name
                             AND l.member_id = m.member_id AND l.deadline > now_ms())
                     FROM members m WHERE m.group_name = $1 ORDER BY m.member_id"#,
            )
            .bind(group)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(during(&what))?
            .iter()
            .map(|r| {
                let topics: Vec<String> = r.get(3);
                let partitions: Vec<i32> = r.get(4);
                let mut d = MemberDescription::new(r.get::<i64, _>(0).to_string(), r.get(1));
                d.assignment = topics
                    .into_iter()
                    .zip(partitions)
                    .map(|(t, p)| (t, p as u32))
                    .collect();
                d.leases = r.get::<i64, _>(5) as u64;
                d.idle_ms = r.get::<i64, _>(2).max(0) as u64;
                d
            })
            .collect();
            let mut d = GroupDescription::new(group, lag);
            d.config = Some(config);
            d.generation = g.get::<i64, _>(1) as u64;
            d.members = members;
            d.members_visible = true;
            Ok(d)
        })
        .await
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Message>> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                let t = self.inner.partition_of(topic, partition).await?;
                let found =
                    queries::read(&self.inner.pool, topic, t.id, partition, offset, max).await?;
                Ok(found
                    .into_iter()
                    .map(|m| Message::from_stored(topic, partition, m, 1, DeliveryToken::default()))
                    .collect())
            })
            .await
    }

    async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                let t = self.inner.partition_of(topic, partition).await?;
                offset_for_timestamp(&self.inner.pool, topic, t.id, partition, timestamp).await
            })
            .await
    }

    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
        Arc::new(PgIdempotency {
            inner: self.inner.clone(),
        })
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        let members: Vec<(Arc<str>, i64)> = std::mem::take(&mut *self.inner.members.lock())
            .into_iter()
            .collect();
        // Members leave within the deadline, then the pool closes, all in a
        // task of its own: a `close` cut at its deadline or dropped still
        // lets the members go and every connection close.
        let inner = self.inner.clone();
        let closing = tokio::spawn(async move {
            let left = inner
                .bounded(Duration::ZERO, async {
                    let mut first_err = None;
                    for (group, member) in members {
                        if let Err(e) = crate::group::leave(&inner, &group, member).await {
                            first_err.get_or_insert(e);
                        }
                    }
                    first_err.map_or(Ok(()), Err)
                })
                .await;
            inner.wake();
            inner.spare.close();
            // The idle connections close now; the ones callers still hold
            // (a poll waiting out its timeout) when they come back (see
            // `close_pool`), without `close` waiting for other calls.
            tokio::spawn(close_pool(inner.pool.clone()));
            left
        });
        closing
            .await
            .map_err(|e| Error::internal(format!("close the broker: {e}")))?
    }

    async fn delete_group(&self, group: &str) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                crate::admin::delete_group(&self.inner, group).await
            })
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                crate::admin::ping(&self.inner).await
            })
            .await
    }
}

/// Close `pool` and every connection it has, however long its users hold
/// them. sqlx's `PgPool::close` closes the idle connections and returns
/// without waiting for the checked-out ones; a checked-out connection is
/// closed when it comes back, unless it was on its way back (past the
/// pool's closed check, pinging) while the pool closed: then it lands in
/// the idle queue of the closed pool and stays open for as long as
/// anything holds the pool (seen under load: a closed broker kept one or
/// two connections whose handles lived). So close again until no
/// connection is left: a waiting poll may hold one until its own timeout
/// (`size`, not `num_idle`, which `close` does not update).
async fn close_pool(pool: PgPool) {
    pool.close().await;
    let mut pause = Duration::from_millis(5);
    let started = std::time::Instant::now();
    while pool.size() > 0 && started.elapsed() < CLOSE_POOL_PATIENCE {
        tokio::time::sleep(pause).await;
        pool.close().await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    if pool.size() > 0 {
        tracing::warn!(
            connections = pool.size(),
            "PostgreSQL connections still checked out {CLOSE_POOL_PATIENCE:?} after close"
        );
    }
}

/// How long a closed broker's pool waits for connections its callers
/// still hold (every call ends within its own deadline well before).
const CLOSE_POOL_PATIENCE: Duration = Duration::from_secs(3600);

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().drain(..) {
            t.abort();
        }
    }
}

/// The first offset whose timestamp is at least `timestamp` (the log end
/// if none), never below the log start.
pub(crate) async fn offset_for_timestamp<'e, E: sqlx::PgExecutor<'e>>(
    ex: E,
    topic: &str,
    topic_id: i64,
    partition: u32,
    timestamp: u64,
) -> Result<u64> {
    // A binary search over the offsets (`offset_for_ts`, migration 2):
    // timestamps never decrease within a partition.
    let found: i64 = sqlx::query_scalar(
        r#"SELECT offset_for_ts($1, $2, $3, p.log_start, p.next_offset)
             FROM partitions p WHERE p.topic_id = $1 AND p.partition = $2"#,
    )
    .bind(topic_id)
    .bind(partition as i32)
    .bind(timestamp.min(i64::MAX as u64) as i64)
    .fetch_optional(ex)
    .await
    .map_err(during(format!("find a timestamp in `{topic}`/{partition}")))?
    .ok_or_else(|| Error::topic_not_found(topic))?;
    Ok(found as u64)
}

/// [`IdempotencyStore`] on the `idempotency` table: `INSERT .. ON
/// CONFLICT` that replaces only an expired key, so exactly one caller sees
/// a key first within its TTL.
struct PgIdempotency {
    inner: Arc<Inner>,
}

#[async_trait]
impl IdempotencyStore for PgIdempotency {
    async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                validate::first_seen(key, ttl)?;
                let ttl = crate::millis(ttl);
                let row = sqlx::query(
                    "INSERT INTO idempotency (key, expires_at) VALUES ($1, now_ms() + $2)
                 ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
                 WHERE idempotency.expires_at <= now_ms()
                 RETURNING 1",
                )
                .bind(key)
                .bind(ttl)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(during(format!("idempotency key `{key}`")))?;
                Ok(row.is_some())
            })
            .await
    }

    async fn forget(&self, key: &str) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.inner.check_open()?;
                sqlx::query("DELETE FROM idempotency WHERE key = $1")
                    .bind(key)
                    .execute(&self.inner.pool)
                    .await
                    .map_err(during(format!("forget idempotency key `{key}`")))?;
                Ok(())
            })
            .await
    }
}
