//! The broker: connection, topics, reads, lag, idempotency, the wake-up
//! listener and retention.

use crate::conn::{during, reply, Conn, SCRIPTS};
use crate::keys::{self, Group, Part, Registry};
use crate::servers::Servers;
use crate::settings;
use crate::{RedisOptions, Topology};
use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::backend::{decode_headers, validate, StoredMessage, TopicCache};
use conveyor_core::{
    Broker, BrokerOptions, Capabilities, Consumer, DeliveryMode, DeliveryToken, Error, ErrorKind,
    GroupConfig, GroupDescription, GroupLag, IdempotencyStore, MemberDescription, Message,
    PartitionDescription, PartitionLag, Producer, Result, TopicConfig, TopicDescription,
};
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use redis::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a send trusts its cached copy of a topic's registry entry.
pub(crate) const TOPIC_CACHE: Duration = Duration::from_secs(1);
/// A waiting poll looks again at least this often (missed wake-ups,
/// redeliveries that came due, a lost pub/sub connection).
pub(crate) const FALLBACK_POLL: Duration = Duration::from_millis(250);
/// The wake-up listener stays subscribed this long after the last poll of
/// this process (a consumer between two polls keeps its subscription).
pub(crate) const LISTEN_LINGER: Duration = Duration::from_secs(5);
/// How many per-partition calls run at once for one admin operation.
const FAN_OUT: usize = 32;

/// A topic as registered: its id (in its partitions' keys) and config.
#[derive(Debug, Clone)]
pub(crate) struct TopicRow {
    pub id: u64,
    pub config: TopicConfig,
    /// The config exactly as stored (for compare-and-set updates).
    pub json: String,
}

/// A partition's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub log_start: u64,
    pub log_end: u64,
    pub bytes: u64,
}

/// State shared by the broker and its producers and consumers.
pub(crate) struct Inner {
    /// The main connection; `Conn::Closed` once the broker is closed
    /// (its sockets dropped, though handles may live on).
    conn: parking_lot::RwLock<Conn>,
    pub ns: String,
    pub options: BrokerOptions,
    pub op_timeout: Duration,
    pub registry: Registry,
    pub closed: AtomicBool,
    pub changed: watch::Sender<u64>,
    /// Tells the wake-up listener that a poll started (see [`listen`]).
    listen_wanted: Arc<tokio::sync::Notify>,
    /// Is the listener subscribed?
    listening: Arc<AtomicBool>,
    topics: TopicCache<TopicRow>,
    /// Members this broker's consumers are (left at close).
    /// Members this broker's consumers are, and the partitions each has
    /// leased from (its leases are released when it leaves).
    pub members: Mutex<std::collections::BTreeMap<(Arc<str>, u64), crate::consumer::Leased>>,
    pub round_robin: Mutex<HashMap<String, u32>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Connection details for the pub/sub listener, settings checks and
    /// cleanup.
    pub servers: Servers,
    /// "Redis at <servers>", for messages (no password).
    server_name: String,
    /// The server settings' verdict (see [`settings`]).
    settings: settings::Watch,
    /// How often the settings are read again.
    settings_every: Duration,
    /// Queue-mode acks in flight, merged per partition (see [`crate::acks`]).
    pub acks: crate::acks::AckMerge,
    /// Queue-mode partitions whose old-layout state this broker has
    /// converted (see [`crate::migrate`]).
    pub migrated: crate::migrate::Migrated,
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Closed, "the broker is closed"));
        }
        Ok(())
    }

    /// A connection handle (clones share the multiplexed socket).
    pub(crate) fn conn(&self) -> Conn {
        self.conn.read().clone()
    }

    /// Run one call of the public API with the broker's deadline (plus
    /// `extra`, a poll's own timeout): a server that stops answering is
    /// `Unavailable` after it, not a call that hangs forever. A full
    /// server is named in its error. (A lost connection makes the next
    /// send read the server's settings again: the connection counts its
    /// losses, whichever call met them; see `conn::Losses`.)
    pub(crate) async fn bounded<T>(
        &self,
        extra: Duration,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let got = conveyor_core::backend::within(
            self.op_timeout.saturating_add(extra),
            &self.server_name,
            call,
        )
        .await;
        got.map_err(|e| {
            if e.kind() != ErrorKind::Unavailable {
                return e;
            }
            if e.message().contains(crate::conn::FULL) {
                let named = e.message().replacen(
                    crate::conn::FULL,
                    &format!("{} is full", self.server_name),
                    1,
                );
                return Error::new(ErrorKind::Unavailable, named);
            }
            e
        })
    }

    /// May a send write now? Refused (`Unavailable`) while the server's
    /// settings cannot honour the broker's durability or allow eviction;
    /// read first if not known since the last lost connection.
    pub(crate) async fn settings_allow_send(&self) -> Result<()> {
        self.settings
            .allow_send(&self.servers, &self.conn(), self.op_timeout)
            .await
    }

    /// Wake-ups for a poll: the receiver fires on every append to the
    /// namespace (from any process) while the poll holds it. Starts the
    /// listener's subscription if it is not subscribed.
    pub(crate) fn wakeups(&self) -> watch::Receiver<u64> {
        let rx = self.changed.subscribe();
        if !self.listening.load(Ordering::Acquire) {
            self.listen_wanted.notify_one();
        }
        rx
    }

    /// Wake this process's waiting polls.
    pub(crate) fn wake(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn part(&self, topic_id: u64, partition: u32) -> Part {
        Part::new(&self.ns, topic_id, partition)
    }

    pub(crate) fn group_keys(&self, group: &str) -> Group {
        Group::new(&self.ns, group)
    }

    /// The topic's registry entry, or `None`.
    pub(crate) async fn topic(&self, name: &str) -> Result<Option<TopicRow>> {
        let what = format!("look up topic `{name}`");
        let mut c = self.conn();
        let id: Option<u64> = redis::cmd("HGET")
            .arg(&self.registry.topics)
            .arg(name)
            .query_async(&mut c)
            .await
            .map_err(during(&what))?;
        let Some(id) = id else { return Ok(None) };
        let json: Option<String> = redis::cmd("HGET")
            .arg(&self.registry.configs)
            .arg(id)
            .query_async(&mut c)
            .await
            .map_err(during(&what))?;
        // Deleted between the two reads: gone.
        let Some(json) = json else { return Ok(None) };
        let config = serde_json::from_str(&json)
            .map_err(|e| Error::internal(format!("{what}: stored config is unreadable: {e}")))?;
        Ok(Some(TopicRow { id, config, json }))
    }

    /// The topic's registry entry; `TopicNotFound` if there is none.
    pub(crate) async fn existing_topic(&self, name: &str) -> Result<TopicRow> {
        validate::topic_name(name)?;
        self.topic(name)
            .await?
            .ok_or_else(|| Error::topic_not_found(name))
    }

    /// The topic's entry for a send, cached for [`TOPIC_CACHE`].
    pub(crate) async fn topic_cached(&self, name: &str) -> Result<TopicRow> {
        if let Some(t) = self.topics.get(name) {
            return Ok(t);
        }
        let t = self.topic_or_create(name).await?;
        self.topics.put(name, &t);
        Ok(t)
    }

    /// The cached entry of a topic, if one was cached less than
    /// [`TOPIC_CACHE`] ago (no server call).
    pub(crate) fn cached_topic(&self, name: &str) -> Option<TopicRow> {
        self.topics.get(name)
    }

    /// Cache a topic's entry just read from the registry.
    pub(crate) fn cache_topic(&self, name: &str, t: &TopicRow) {
        self.topics.put(name, t);
    }

    /// Drop a topic from the send cache.
    pub(crate) fn forget_topic(&self, name: &str) {
        self.topics.forget(name);
    }

    /// The topic's entry, creating the topic if auto-create is on.
    pub(crate) async fn topic_or_create(&self, name: &str) -> Result<TopicRow> {
        validate::topic_name(name)?;
        if let Some(t) = self.topic(name).await? {
            return Ok(t);
        }
        if !self.options.auto_create_topics {
            return Err(Error::topic_not_found(name));
        }
        self.create_topic(name, TopicConfig::default(), true)
            .await?;
        self.existing_topic(name).await
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
        let json = serde_json::to_string(&config)
            .map_err(|e| Error::internal(format!("{what}: config to JSON: {e}")))?;
        let r = &self.registry;
        let created: redis::RedisResult<Vec<u64>> = SCRIPTS
            .topic_create
            .key(&r.topics)
            .key(&r.configs)
            .key(&r.seq)
            .arg(name)
            .arg(&json)
            .invoke_async(&mut self.conn())
            .await;
        let id = match created {
            Ok(v) => v.first().copied().unwrap_or_default(),
            Err(e) if e.code() == Some("EXISTS") => {
                if lenient {
                    return Ok(());
                }
                let existing: Option<TopicConfig> =
                    e.detail().and_then(|d| serde_json::from_str(d).ok());
                return Err(Error::new(
                    ErrorKind::TopicExists,
                    format!(
                        "topic `{name}` exists with another config ({} partitions, asked for {})",
                        existing.map_or_else(|| "?".to_string(), |c| c.partitions.to_string()),
                        config.partitions
                    ),
                ));
            }
            Err(e) => return Err(crate::conn::map_err(&what, e)),
        };
        // The partitions' meta hashes (each in its own slot). A retry of
        // the create, or the first send, finishes a create cut short here.
        self.init_partitions(id, 0..config.partitions, &what)
            .await?;
        tracing::debug!(
            topic = name,
            partitions = config.partitions,
            "topic created"
        );
        Ok(())
    }

    /// Create the meta hashes of partitions `range` of topic `id`.
    pub(crate) async fn init_partitions(
        &self,
        id: u64,
        range: std::ops::Range<u32>,
        what: &str,
    ) -> Result<()> {
        futures::stream::iter(range.map(|p| {
            let key = self.part(id, p).meta;
            let mut c = self.conn();
            async move {
                SCRIPTS
                    .partition_init
                    .key(key)
                    .invoke_async::<i64>(&mut c)
                    .await
                    .map_err(during(what))
            }
        }))
        .buffer_unordered(FAN_OUT)
        .try_collect::<Vec<_>>()
        .await?;
        Ok(())
    }

    pub(crate) async fn delete_topic(&self, name: &str) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        let what = format!("delete topic `{name}`");
        let r = &self.registry;
        let got: Vec<Value> = SCRIPTS
            .topic_delete
            .key(&r.topics)
            .key(&r.configs)
            .arg(name)
            .invoke_async(&mut self.conn())
            .await
            .map_err(during(&what))?;
        if got.is_empty() {
            return Err(Error::topic_not_found(name));
        }
        let id = reply::uint(&got[0])?;
        let config: Option<TopicConfig> = got
            .into_iter()
            .nth(1)
            .and_then(|v| reply::string(v).ok())
            .and_then(|j| serde_json::from_str(&j).ok());
        let partitions = config.map_or(0, |c| c.partitions);
        futures::stream::iter((0..partitions).map(|p| {
            let part = self.part(id, p);
            let mut c = self.conn();
            let what = &what;
            async move {
                let groups: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&part.groups)
                    .query_async(&mut c)
                    .await
                    .map_err(during(what))?;
                let mut del = redis::cmd("DEL");
                for g in &groups {
                    del.arg(&part.queue(g).all()[..]);
                }
                del.arg(&part.groups)
                    .arg(&part.log)
                    .arg(&part.idem)
                    .arg(&part.idem_times)
                    .arg(&part.meta);
                del.query_async::<i64>(&mut c).await.map_err(during(what))
            }
        }))
        .buffer_unordered(FAN_OUT)
        .try_collect::<Vec<_>>()
        .await?;
        self.finish_topic_change(name, &what).await
    }

    pub(crate) async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()> {
        self.check_open()?;
        validate::topic_name(name)?;
        validate::partition_count(name, partitions)?;
        let what = format!("add partitions to `{name}`");
        loop {
            let t = self.existing_topic(name).await?;
            if partitions < t.config.partitions {
                return Err(Error::invalid(format!(
                    "topic `{name}`: partitions can only grow ({} now, asked for {partitions})",
                    t.config.partitions
                )));
            }
            if partitions == t.config.partitions {
                return Ok(());
            }
            // New partitions first: a reader that sees the new count finds
            // them.
            self.init_partitions(t.id, t.config.partitions..partitions, &what)
                .await?;
            let mut config = t.config;
            config.partitions = partitions;
            let json = serde_json::to_string(&config)
                .map_err(|e| Error::internal(format!("{what}: config to JSON: {e}")))?;
            let done: i64 = SCRIPTS
                .topic_update
                .key(&self.registry.topics)
                .key(&self.registry.configs)
                .arg(name)
                .arg(t.id)
                .arg(&t.json)
                .arg(&json)
                .invoke_async(&mut self.conn())
                .await
                .map_err(during(&what))?;
            if done == 1 {
                break;
            }
        }
        self.finish_topic_change(name, &what).await
    }

    /// After a topic's partitions changed (delete, grow): the groups that
    /// read it are told to rebalance (their membership version moves), the
    /// send cache forgets the topic, and waiting polls look again.
    async fn finish_topic_change(&self, name: &str, what: &str) -> Result<()> {
        let mut c = self.conn();
        let groups: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.registry.groups)
            .query_async(&mut c)
            .await
            .map_err(during(what))?;
        for g in groups {
            let k = self.group_keys(&g);
            let reads: bool = redis::cmd("SISMEMBER")
                .arg(&k.topics)
                .arg(name)
                .query_async(&mut c)
                .await
                .map_err(during(what))?;
            if reads {
                SCRIPTS
                    .group_touch
                    .key(&k.meta)
                    .invoke_async::<i64>(&mut c)
                    .await
                    .map_err(during(what))?;
            }
        }
        self.forget_topic(name);
        self.wake();
        Ok(())
    }

    /// The topic's entry, checked to have `partition`.
    pub(crate) async fn partition_of(&self, topic: &str, partition: u32) -> Result<TopicRow> {
        let t = self.existing_topic(topic).await?;
        validate::partition(topic, partition, t.config.partitions)?;
        Ok(t)
    }

    /// A partition's bounds and up to `max` records from `from`.
    ///
    /// A pipeline of two plain reads (`HMGET` of the bounds, then
    /// `XRANGE`; both keys in one slot), without converting every entry
    /// to a Lua table and back, which cost four times the `XRANGE`
    /// itself. Not a `MULTI`/`EXEC`: Redis refuses every command queued in
    /// a transaction while it is over `maxmemory`, reads included, and
    /// reads must work on a full server. The pair is made a snapshot by
    /// hand: the bounds are read first, and entries appended between the
    /// two reads (at or past the `end` read) are dropped. No clamp of
    /// `from` to the log start is needed: retention removes the entries
    /// below the start in the script that moves it, so `XRANGE` from below
    /// the start begins at the start.
    pub(crate) async fn read(
        &self,
        topic: &str,
        topic_id: u64,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<(Bounds, Vec<StoredMessage>)> {
        let what = format!("read `{topic}`/{partition}");
        let part = self.part(topic_id, partition);
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(&part.meta)
            .arg("start")
            .arg("end")
            .arg("bytes");
        if max > 0 {
            pipe.cmd("XRANGE")
                .arg(&part.log)
                // "N" as a start is "N-0": offset N, whichever id form.
                .arg(from.min(1 << 53))
                .arg("+")
                .arg("COUNT")
                .arg(max.min(100_000));
        }
        let got: Vec<Value> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| crate::conn::map_err(&what, e))?;
        let mut it = got.into_iter();
        let m = reply::array(
            it.next()
                .ok_or_else(|| Error::internal(format!("{what}: short reply")))?,
        )?;
        if m.first().is_none_or(|v| *v == Value::Nil) {
            return Err(Error::topic_not_found(topic));
        }
        let field = |i: usize| match m.get(i) {
            None | Some(Value::Nil) => Ok(0),
            Some(v) => reply::uint(v),
        };
        let bounds = Bounds {
            log_start: field(0)?,
            log_end: field(1)?,
            bytes: field(2)?,
        };
        let mut entries = Vec::new();
        if let Some(v) = it.next() {
            let found = reply::array(v)?;
            entries.reserve_exact(found.len());
            for e in found {
                let (m, _) = decode_entry(e, &|| what.clone())?;
                if m.offset >= bounds.log_end {
                    break;
                }
                entries.push(m);
            }
        }
        Ok((bounds, entries))
    }

    /// A partition's bounds.
    pub(crate) async fn bounds(
        &self,
        topic: &str,
        topic_id: u64,
        partition: u32,
    ) -> Result<Bounds> {
        Ok(self.read(topic, topic_id, partition, 0, 0).await?.0)
    }

    /// The first offset whose timestamp is at least `timestamp` (the log
    /// end if none), never below the log start.
    pub(crate) async fn offset_for_timestamp(
        &self,
        topic: &str,
        topic_id: u64,
        partition: u32,
        timestamp: u64,
    ) -> Result<u64> {
        let part = self.part(topic_id, partition);
        SCRIPTS
            .find_time
            .key(&part.meta)
            .key(&part.log)
            .arg(timestamp)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| match e.code() {
                Some("NOTOPIC") => Error::topic_not_found(topic),
                _ => crate::conn::map_err(&format!("find a time in `{topic}`/{partition}"), e),
            })
    }

    /// Apply a topic's retention to every partition now.
    pub(crate) async fn enforce_retention(&self, name: &str, t: &TopicRow) -> Result<()> {
        let r = t.config.retention;
        let age = r.max_age.map_or(-1, |d| crate::millis(d) as i64);
        let bytes = r.max_bytes.map_or(-1, |b| b.min(i64::MAX as u64) as i64);
        let what = format!("retention of `{name}`");
        futures::stream::iter((0..t.config.partitions).map(|p| {
            let part = self.part(t.id, p);
            let mut c = self.conn();
            let what = &what;
            async move {
                loop {
                    let removed: u64 = SCRIPTS
                        .retain
                        .key(&part.meta)
                        .key(&part.log)
                        .arg(age)
                        .arg(bytes)
                        .arg(5000)
                        .invoke_async(&mut c)
                        .await
                        .map_err(during(what))?;
                    if removed < 5000 {
                        return Ok::<_, Error>(());
                    }
                }
            }
        }))
        .buffer_unordered(FAN_OUT)
        .try_collect::<Vec<_>>()
        .await?;
        Ok(())
    }

    pub(crate) async fn list_topics(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = redis::cmd("HKEYS")
            .arg(&self.registry.topics)
            .query_async(&mut self.conn())
            .await
            .map_err(during("list topics"))?;
        names.sort();
        Ok(names)
    }

    pub(crate) async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let t = self.existing_topic(name).await?;
        if t.config.retention.is_limited() {
            self.enforce_retention(name, &t).await?;
        }
        let partitions = futures::stream::iter((0..t.config.partitions).map(|p| {
            let id = t.id;
            async move {
                let b = self.bounds(name, id, p).await?;
                Ok::<_, Error>(PartitionDescription {
                    partition: p,
                    log_start: b.log_start,
                    log_end: b.log_end,
                    bytes: b.bytes,
                })
            }
        }))
        .buffered(FAN_OUT)
        .try_collect()
        .await?;
        Ok(TopicDescription {
            name: name.to_string(),
            config: t.config,
            partitions,
        })
    }

    /// The group's stored mode, config and generation; `GroupNotFound`.
    pub(crate) async fn group_meta(&self, group: &str) -> Result<(DeliveryMode, GroupConfig, u64)> {
        validate::group_name(group)?;
        let what = format!("group `{group}`");
        let k = self.group_keys(group);
        let (mode, config, generation): (Option<String>, Option<String>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(&k.meta)
                .arg("mode")
                .arg("config")
                .arg("gen")
                .query_async(&mut self.conn())
                .await
                .map_err(during(&what))?;
        let (Some(mode), Some(config)) = (mode, config) else {
            return Err(Error::group_not_found(group));
        };
        let config: GroupConfig = serde_json::from_str(&config)
            .map_err(|e| Error::internal(format!("{what}: stored config is unreadable: {e}")))?;
        Ok((DeliveryMode::parse(&mode)?, config, generation.unwrap_or(0)))
    }

    pub(crate) async fn group_lag(&self, group: &str) -> Result<GroupLag> {
        Ok(self.group_lag_leases(group).await?.0)
    }

    /// The group's lag, and (queue mode) each member's live leases.
    pub(crate) async fn group_lag_leases(
        &self,
        group: &str,
    ) -> Result<(GroupLag, HashMap<u64, u64>)> {
        let (mode, _, _) = self.group_meta(group).await?;
        let leases: Mutex<HashMap<u64, u64>> = Mutex::new(HashMap::new());
        let what = format!("lag of group `{group}`");
        let k = self.group_keys(group);
        let mut c = self.conn();
        let mut topics: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&k.topics)
            .query_async(&mut c)
            .await
            .map_err(during(&what))?;
        topics.sort();
        let mut partitions = Vec::new();
        for topic in topics {
            let Some(t) = self.topic(&topic).await? else {
                continue;
            };
            let commits: HashMap<String, u64> = if mode == DeliveryMode::Stream {
                redis::cmd("HGETALL")
                    .arg(&k.commits)
                    .query_async(&mut c)
                    .await
                    .map_err(during(&what))?
            } else {
                HashMap::new()
            };
            let rows: Vec<PartitionLag> =
                futures::stream::iter((0..t.config.partitions).map(|p| {
                    let topic = topic.clone();
                    let committed = commits.get(&keys::commit_field(t.id, p)).copied();
                    let id = t.id;
                    let what = &what;
                    let leases = &leases;
                    async move {
                        match mode {
                            DeliveryMode::Stream => {
                                let b = self.bounds(&topic, id, p).await?;
                                let committed = committed
                                    .unwrap_or(b.log_start)
                                    .clamp(b.log_start, b.log_end.max(b.log_start));
                                Ok::<_, Error>(PartitionLag {
                                    topic,
                                    partition: p,
                                    committed,
                                    log_end: b.log_end,
                                    lag: b.log_end.saturating_sub(committed),
                                    in_flight: 0,
                                    available: 0,
                                })
                            }
                            _ => {
                                let s = self.queue_state(group, id, p, None, what).await?;
                                let mut l = leases.lock();
                                for (m, n) in &s.per_member {
                                    *l.entry(*m).or_default() += n;
                                }
                                Ok(s.lag(topic, p))
                            }
                        }
                    }
                }))
                .buffered(FAN_OUT)
                .try_collect()
                .await?;
            partitions.extend(rows);
        }
        Ok((
            GroupLag {
                group: group.to_string(),
                mode,
                partitions,
            },
            leases.into_inner(),
        ))
    }

    /// A queue-mode group's standing in one partition; with `init`, the
    /// cursor to start at if the group has none there yet.
    pub(crate) async fn queue_state(
        &self,
        group: &str,
        topic_id: u64,
        partition: u32,
        init: Option<u64>,
        what: &str,
    ) -> Result<QueueState> {
        crate::migrate::queue_state(self, group, topic_id, partition).await?;
        let part = self.part(topic_id, partition);
        let q = part.queue(group);
        let v: Vec<i64> = SCRIPTS
            .queue_state
            .key(&part.meta)
            .key(&q.cursor)
            .key(&q.state)
            .key(&q.dead)
            .key(&part.groups)
            .arg(group)
            .arg(init.map_or_else(String::new, |o| o.to_string()))
            .invoke_async(&mut self.conn())
            .await
            .map_err(during(what))?;
        if v.len() < 8 {
            return Err(Error::internal(format!("{what}: short reply")));
        }
        let u = |i: usize| v[i].max(0) as u64;
        Ok(QueueState {
            log_start: u(0),
            log_end: u(1),
            cursor: (v[2] >= 0).then(|| u(2)),
            in_flight: u(3),
            ready: u(4),
            dead: u(5),
            lowest: (v[6] >= 0).then(|| u(6)),
            due: u(7),
            per_member: v[8..]
                .chunks(2)
                .filter(|c| c.len() == 2)
                .map(|c| (c[0].max(0) as u64, c[1].max(0) as u64))
                .collect(),
        })
    }

    pub(crate) async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let (lag, leases) = self.group_lag_leases(group).await?;
        let (_, config, generation) = self.group_meta(group).await?;
        let what = format!("describe group `{group}`");
        let k = self.group_keys(group);
        let mut c = self.conn();
        let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&k.members)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .map_err(during(&what))?;
        let subs: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&k.subs)
            .query_async(&mut c)
            .await
            .map_err(during(&what))?;
        let owners: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&k.owners)
            .query_async(&mut c)
            .await
            .map_err(during(&what))?;
        let now = server_ms(&mut c, &what).await?;
        let session = crate::millis(config.session_timeout) as f64;
        let mut out = Vec::new();
        for (id, deadline) in members {
            let topics: Vec<String> = subs
                .get(&id)
                .map(|s| s.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            let mut d = MemberDescription::new(id.clone(), topics);
            let mut assignment: Vec<(String, u32)> = owners
                .iter()
                .filter(|(_, v)| v.split(':').next() == Some(id.as_str()))
                .filter_map(|(tp, _)| {
                    let (t, p) = tp.rsplit_once('/')?;
                    Some((t.to_string(), p.parse().ok()?))
                })
                .collect();
            assignment.sort();
            d.assignment = assignment;
            d.leases = id
                .parse()
                .ok()
                .and_then(|m| leases.get(&m))
                .copied()
                .unwrap_or(0);
            d.idle_ms = (now as f64 - (deadline - session)).max(0.0) as u64;
            out.push(d);
        }
        let mut d = GroupDescription::new(group, lag);
        d.config = Some(config);
        d.generation = generation;
        d.members = out;
        d.members_visible = true;
        Ok(d)
    }

    pub(crate) async fn list_groups(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.registry.groups)
            .query_async(&mut self.conn())
            .await
            .map_err(during("list groups"))?;
        names.sort();
        Ok(names)
    }
}

/// A queue-mode group's standing in one partition.
#[derive(Debug, Clone)]
pub(crate) struct QueueState {
    pub log_start: u64,
    pub log_end: u64,
    pub cursor: Option<u64>,
    pub in_flight: u64,
    pub ready: u64,
    pub dead: u64,
    pub lowest: Option<u64>,
    /// Ready and due now (the rest of `ready` waits for its time).
    pub due: u64,
    /// Live leases per member.
    pub per_member: Vec<(u64, u64)>,
}

impl QueueState {
    fn lag(&self, topic: String, partition: u32) -> PartitionLag {
        let cursor = self
            .cursor
            .unwrap_or(self.log_start)
            .clamp(self.log_start, self.log_end.max(self.log_start));
        let fresh = self.log_end.saturating_sub(cursor);
        PartitionLag {
            topic,
            partition,
            committed: self.lowest.map_or(cursor, |l| l.min(cursor)),
            log_end: self.log_end,
            lag: self.in_flight + self.ready + self.dead + fresh,
            in_flight: self.in_flight,
            available: fresh + self.due,
        }
    }
}

/// The server's clock, ms since the epoch.
pub(crate) async fn server_ms(c: &mut Conn, what: &str) -> Result<u64> {
    let (s, us): (u64, u64) = redis::cmd("TIME")
        .query_async(c)
        .await
        .map_err(during(what))?;
    Ok(s * 1000 + us / 1000)
}

/// A stream entry as [`StoredMessage`], and the group it is addressed to.
pub(crate) fn decode_entry(
    entry: Value,
    at: &dyn Fn() -> String,
) -> Result<(StoredMessage, Option<String>)> {
    let mut parts = reply::array(entry)?.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(corrupt(at, "an entry without id or fields"));
    };
    decode_fields(id, fields, at)
}

/// A stream entry (its id and fields) as [`StoredMessage`], and the group
/// it is addressed to.
///
/// The id is "offset-append time" (the time in ms); entries written
/// before the id carried the time are "offset-1" with a field `t`, which
/// wins when present.
pub(crate) fn decode_fields(
    id: Value,
    fields: Value,
    at: &dyn Fn() -> String,
) -> Result<(StoredMessage, Option<String>)> {
    let id = reply::bytes(id)?;
    let (offset, timestamp) = std::str::from_utf8(&id)
        .ok()
        .and_then(|id| id.split_once('-'))
        .and_then(|(o, t)| Some((o.parse::<u64>().ok()?, t.parse::<u64>().ok()?)))
        .ok_or_else(|| corrupt(at, &format!("entry id `{}`", String::from_utf8_lossy(&id))))?;
    let fields = reply::array(fields)?;
    let mut m = StoredMessage {
        offset,
        timestamp,
        key: None,
        value: Bytes::new(),
        headers: Vec::new(),
        idempotency_key: None,
        deliver_at: None,
    };
    let mut group = None;
    let mut it = fields.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        let name = reply::bytes(name)?;
        let value = reply::bytes(value)?;
        let num = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| corrupt(at, "a number field"))
        };
        match name.as_slice() {
            b"t" => m.timestamp = num(&value)?,
            b"v" => m.value = Bytes::from(value),
            b"k" => m.key = Some(Bytes::from(value)),
            b"h" => m.headers = decode_headers(&value, &|| format!("{} @{offset}", at()))?,
            b"i" => {
                m.idempotency_key =
                    Some(String::from_utf8(value).map_err(|_| corrupt(at, "idempotency key"))?)
            }
            b"d" => m.deliver_at = Some(num(&value)?),
            b"g" => group = Some(String::from_utf8(value).map_err(|_| corrupt(at, "group"))?),
            _ => {}
        }
    }
    Ok((m, group))
}

fn corrupt(at: &dyn Fn() -> String, what: &str) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("{}: a stored record is damaged ({what})", at()),
    )
}

/// Conveyor on Redis Streams (see the crate docs).
#[derive(Clone)]
pub struct RedisBroker {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("namespace", &self.inner.ns)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    pub(crate) async fn open(
        topology: Topology,
        options: BrokerOptions,
        redis: RedisOptions,
    ) -> Result<RedisBroker> {
        crate::url::check_namespace(&redis.namespace)?;
        let servers = Servers::resolve(&topology).await?;
        let conn = servers.connect(redis.timeout).await?;
        // Eviction, persistence, credentials: refused now, not at the
        // first send.
        let watch = settings::Watch::new(options.durability);
        watch.check(&servers, &conn, redis.timeout, true).await?;
        let (changed, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            conn: parking_lot::RwLock::new(conn),
            registry: Registry::new(&redis.namespace),
            ns: redis.namespace,
            options,
            op_timeout: redis.timeout,
            closed: AtomicBool::new(false),
            changed,
            listen_wanted: Arc::new(tokio::sync::Notify::new()),
            listening: Arc::new(AtomicBool::new(false)),
            topics: TopicCache::new(TOPIC_CACHE),
            members: Mutex::new(std::collections::BTreeMap::new()),
            round_robin: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            server_name: format!("Redis at {}", servers.shown()),
            servers,
            settings: watch,
            settings_every: redis.settings_check,
            acks: Default::default(),
            migrated: Default::default(),
        });
        let listener = tokio::spawn(listen(Arc::downgrade(&inner)));
        let retention = tokio::spawn(retention(Arc::downgrade(&inner)));
        let sweep = tokio::spawn(crate::consumer::sweep(Arc::downgrade(&inner)));
        let check = tokio::spawn(watch_settings(Arc::downgrade(&inner)));
        inner
            .tasks
            .lock()
            .extend([listener, retention, sweep, check]);
        Ok(RedisBroker { inner })
    }

    /// The namespace this broker's keys live in.
    pub fn namespace(&self) -> &str {
        &self.inner.ns
    }

    /// Delete every key of this broker's namespace (tests and tools; every
    /// broker on the namespace stops working). On a cluster, every master
    /// is scanned.
    ///
    /// # Errors
    /// `Unavailable` if a server cannot be reached.
    ///
    /// # Cancel safety
    /// Not atomic: cancelled, some keys may remain; calling it again
    /// finishes the job.
    pub async fn drop_namespace(&self) -> Result<()> {
        self.inner
            .servers
            .drop_namespace(&self.inner.ns, self.inner.op_timeout)
            .await
    }
}

/// Read the server's settings every `settings_every` (see
/// [`settings`]): the verdict lets sends through or stops them.
async fn watch_settings(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => i.settings_every,
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(i) = inner.upgrade() else { return };
        if i.closed.load(Ordering::Acquire) {
            return;
        }
        let checked = conveyor_core::backend::within(
            i.op_timeout,
            "Redis (settings check)",
            i.settings.check(&i.servers, &i.conn(), i.op_timeout, false),
        )
        .await;
        if let Err(e) = checked {
            tracing::debug!(error = %e, "Redis settings check");
        }
    }
}

/// Forward the namespace's wake-ups (published by every append) to this
/// process's polls, subscribed only while it has polls in progress (and
/// [`LISTEN_LINGER`] after the last): a process that only produces never
/// receives the notifications of its own (and everyone's) appends. A
/// subscription that starts, or comes back after a lost connection, wakes
/// every poll (messages may have been missed meanwhile); polls also look
/// again every [`FALLBACK_POLL`].
async fn listen(inner: Weak<Inner>) {
    let (servers, channel, wanted, listening, limit) = match inner.upgrade() {
        Some(i) => (
            i.servers.clone(),
            keys::wake_channel(&i.ns),
            i.listen_wanted.clone(),
            i.listening.clone(),
            i.op_timeout,
        ),
        None => return,
    };
    // Some poll in progress? `None`: the broker is gone or closed.
    let polling = || {
        let i = inner.upgrade()?;
        if i.closed.load(Ordering::Acquire) {
            return None;
        }
        Some(i.changed.receiver_count() > 0)
    };
    loop {
        // Wait for a poll.
        loop {
            match polling() {
                None => return,
                Some(true) => break,
                Some(false) => {
                    let _ = tokio::time::timeout(FALLBACK_POLL, wanted.notified()).await;
                }
            }
        }
        // Bounded: a black-holed server must not hold the listener.
        let connected = tokio::time::timeout(limit, servers.pubsub())
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the pub/sub connection timed out",
                )))
            });
        match connected {
            Ok(mut ps) => {
                if ps.subscribe(&channel).await.is_ok() {
                    listening.store(true, Ordering::Release);
                    match inner.upgrade() {
                        Some(i) => i.wake(),
                        None => return,
                    }
                    let mut messages = ps.on_message();
                    let mut check = tokio::time::interval(FALLBACK_POLL);
                    let mut last_poll = Instant::now();
                    let lost = loop {
                        tokio::select! {
                            m = messages.next() => {
                                if m.is_none() {
                                    break true; // connection lost
                                }
                                match inner.upgrade() {
                                    Some(i) => i.wake(),
                                    None => return,
                                }
                            }
                            _ = check.tick() => match polling() {
                                None => return,
                                Some(true) => last_poll = Instant::now(),
                                Some(false) if last_poll.elapsed() >= LISTEN_LINGER => break false,
                                Some(false) => {}
                            },
                        }
                    };
                    listening.store(false, Ordering::Release);
                    if !lost {
                        // Unsubscribed for want of polls.
                        continue;
                    }
                }
            }
            Err(e) => tracing::debug!(
                error = %conveyor_core::backend::redact_url(&e.to_string()),
                "wake-up listener cannot connect"
            ),
        }
        match inner.upgrade() {
            Some(i) => i.wake(),
            None => return,
        }
        tokio::time::sleep(FALLBACK_POLL).await;
    }
}

/// Apply retention to every topic that has some, every [`FALLBACK_POLL`].
async fn retention(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(FALLBACK_POLL).await;
        let Some(i) = inner.upgrade() else { return };
        if i.closed.load(Ordering::Acquire) {
            return;
        }
        let names = match i.list_topics().await {
            Ok(n) => n,
            Err(_) => continue,
        };
        for name in names {
            if let Ok(Some(t)) = i.topic(&name).await {
                if t.config.retention.is_limited() {
                    if let Err(e) = i.enforce_retention(&name, &t).await {
                        tracing::debug!(topic = name, error = %e, "retention failed; will retry");
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::SERVER
    }

    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, self.inner.create_topic(name, config, false))
            .await
    }

    async fn delete_topic(&self, name: &str) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, self.inner.delete_topic(name))
            .await
    }

    async fn list_topics(&self) -> Result<Vec<String>> {
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, self.inner.list_topics())
            .await
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, self.inner.describe_topic(name))
            .await
    }

    async fn add_partitions(&self, name: &str, partitions: u32) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, self.inner.add_partitions(name, partitions))
            .await
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        self.inner.check_open()?;
        Ok(Arc::new(crate::produce::RedisProducer {
            inner: self.inner.clone(),
        }))
    }

    async fn consumer(
        &self,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<Arc<dyn Consumer>> {
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, async move {
                let c = crate::consumer::join(&self.inner, group, topics, config).await?;
                Ok(Arc::new(c) as Arc<dyn Consumer>)
            })
            .await
    }

    async fn alter_group(
        &self,
        group: &str,
        changes: conveyor_core::GroupChanges,
    ) -> Result<GroupConfig> {
        self.inner.check_open()?;
        self.inner
            .bounded(
                Duration::ZERO,
                crate::group_alter::alter_group(&self.inner, group, &changes),
            )
            .await
    }

    async fn list_groups(&self) -> Result<Vec<String>> {
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, self.inner.list_groups())
            .await
    }

    async fn group_lag(&self, group: &str) -> Result<GroupLag> {
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, self.inner.group_lag(group))
            .await
    }

    async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, self.inner.describe_group(group))
            .await
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Message>> {
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, async move {
                let t = self.inner.partition_of(topic, partition).await?;
                let (_, found) = self.inner.read(topic, t.id, partition, offset, max).await?;
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
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, async move {
                let t = self.inner.partition_of(topic, partition).await?;
                self.inner
                    .offset_for_timestamp(topic, t.id, partition, timestamp)
                    .await
            })
            .await
    }

    fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
        Arc::new(RedisIdempotency {
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
        let left = self
            .inner
            .bounded(Duration::ZERO, async move {
                let members: Vec<((Arc<str>, u64), crate::consumer::Leased)> =
                    std::mem::take(&mut *self.inner.members.lock())
                        .into_iter()
                        .collect();
                let mut first_err = None;
                for ((group, member), leased) in members {
                    let released =
                        crate::consumer::release_leases(&self.inner, &group, member, &leased).await;
                    if let Err(e) = released {
                        first_err.get_or_insert(e);
                    }
                    if let Err(e) = crate::consumer::leave(&self.inner, &group, member).await {
                        first_err.get_or_insert(e);
                    }
                }
                self.inner.wake();
                first_err.map_or(Ok(()), Err)
            })
            .await;
        // The sockets go now, though producers and consumers may live on
        // (their calls are `Closed`).
        *self.inner.conn.write() = Conn::Closed;
        self.inner.settings.close().await;
        left
    }

    async fn delete_group(&self, group: &str) -> Result<()> {
        self.inner
            .bounded(
                Duration::ZERO,
                crate::admin::delete_group(&self.inner, group),
            )
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, crate::admin::ping(&self.inner))
            .await
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().drain(..) {
            t.abort();
        }
    }
}

/// [`IdempotencyStore`] on `SET key 1 NX PX ttl`: exactly one caller sees
/// a key first within its TTL.
struct RedisIdempotency {
    inner: Arc<Inner>,
}

impl RedisIdempotency {
    fn key(&self, key: &str) -> String {
        format!("{{{}/i:{key}}}", self.inner.ns)
    }
}

#[async_trait]
impl IdempotencyStore for RedisIdempotency {
    async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.inner.check_open()?;
        validate::first_seen(key, ttl)?;
        self.inner
            .bounded(Duration::ZERO, async move {
                let set: Option<String> = redis::cmd("SET")
                    .arg(self.key(key))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(crate::millis(ttl).max(1))
                    .query_async(&mut self.inner.conn())
                    .await
                    .map_err(during(format!("idempotency key `{key}`")))?;
                Ok(set.is_some())
            })
            .await
    }

    async fn forget(&self, key: &str) -> Result<()> {
        self.inner.check_open()?;
        self.inner
            .bounded(Duration::ZERO, async move {
                redis::cmd("DEL")
                    .arg(self.key(key))
                    .query_async::<i64>(&mut self.inner.conn())
                    .await
                    .map_err(during(format!("forget idempotency key `{key}`")))?;
                Ok(())
            })
            .await
    }
}
