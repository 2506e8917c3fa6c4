//! Group members: what stream and queue mode share. Joining and leaving,
//! heartbeats and the rebalance (core's sticky `assign`, installed with a
//! compare-and-set), the member handle and its [`Consumer`] impl, which
//! hands each call to its mode: [`stream`] (position and retries in the
//! process; owners, generations and commits in Redis) or [`queue`] (leases
//! in Redis, nothing in the process). Neither mode's state lives here.

mod queue;
mod stream;

pub(crate) use queue::{release_leases, sweep, Leased};

use crate::broker::{Inner, TopicRow, FALLBACK_POLL};
use crate::conn::{during, map_err, reply, SCRIPTS};
use crate::keys::{commit_field, owner_field};
use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::backend::{assign, poll_until, validate, MemberPartition, MemberSubscription};
use conveyor_core::dlq::{self, DeadLetter};
use conveyor_core::{
    BatchAck, Consumer, DeliveryMode, Error, ErrorKind, GroupConfig, JoinSettings, Message,
    NackOptions, NackOutcome, Result, SeekTo, StartFrom, TopicConfig, TopicPartition,
};
use parking_lot::Mutex;
use redis::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::millis;
use conveyor_core::now_ms;

/// The most messages one poll returns (a larger `max` is clamped).
const MAX_POLL: usize = 100_000;

/// This member's state of one owned stream-mode partition.
type Part = MemberPartition;

/// What a heartbeat tells a member.
#[derive(Debug, Clone, Default)]
struct View {
    generation: u64,
    session: Duration,
    visibility: Duration,
    max_deliveries: u32,
    /// Partitions this member owns, with the generation it got each in.
    owned: Vec<(TopicPartition, u64)>,
}

/// Join `group` for `topics` (contract §4): create the group on first use
/// (mode and start fixed then), start topics new to it where its start
/// says, add the member and rebalance.
pub(crate) async fn join(
    inner: &Arc<Inner>,
    group: &str,
    topics: &[&str],
    config: GroupConfig,
) -> Result<RedisConsumer> {
    validate::join(group, topics, &config)?;
    let mut names = BTreeSet::new();
    for t in topics {
        inner.topic_or_create(t).await?;
        names.insert(t.to_string());
    }
    let what = format!("join group `{group}`");
    let k = inner.group_keys(group);
    let list: Vec<String> = names.iter().cloned().collect();
    let config_json = serde_json::to_string(&config)
        .map_err(|e| Error::internal(format!("{what}: config to JSON: {e}")))?;
    let start = match config.start {
        StartFrom::Latest => "latest",
        _ => "earliest",
    };
    // The group's settings are its own (contract §4): the script refuses
    // a member whose config differs ("SETTINGS"); the fields are compared
    // here, and a config that differs only in its JSON's spelling (another
    // version's) joins with the group's.
    let mut join = match config.join {
        JoinSettings::MustMatch => "match",
        JoinSettings::UseExisting => "existing",
    };
    let got: Vec<Value> = loop {
        let joined = SCRIPTS
            .join
            .key(&k.meta)
            .key(&k.members)
            .key(&k.subs)
            .key(&k.topics)
            .arg(config.mode.name())
            .arg(start)
            .arg(millis(config.session_timeout))
            .arg(millis(config.visibility_timeout))
            .arg(config.dlq.max_deliveries)
            .arg(&config_json)
            .arg(list.join(","))
            .arg(new_member_id())
            .arg(join)
            .invoke_async(&mut inner.conn())
            .await;
        match joined {
            Ok(got) => break got,
            Err(e) => match (e.code(), e.detail()) {
                (Some("MODE"), Some(mode)) => {
                    return Err(Error::new(
                        ErrorKind::GroupModeMismatch,
                        format!(
                            "group `{group}` is a {mode}-mode group; cannot join it in {} mode",
                            config.mode.name()
                        ),
                    ))
                }
                (Some("SETTINGS"), Some(stored)) if join == "match" => {
                    let stored: GroupConfig = serde_json::from_str(stored).map_err(|e| {
                        Error::internal(format!("{what}: stored config is unreadable: {e}"))
                    })?;
                    conveyor_core::group_settings::check_join(group, &stored, &config)?;
                    join = "existing";
                }
                _ => return Err(map_err(&what, e)),
            },
        }
    };
    let mut it = got.into_iter();
    let member = reply::uint(&it.next().unwrap_or_default())?;
    let stored_start = reply::string(it.next().unwrap_or_default())?;
    let new_topics: Vec<String> = it.map(reply::string).collect::<Result<_>>()?;
    // The handle exists from here on: dropped, it leaves.
    let consumer = RedisConsumer::new(inner.clone(), group, member, names, config.mode);
    SCRIPTS
        .group_register
        .key(&inner.registry.groups)
        .arg(group)
        .invoke_async::<i64>(&mut inner.conn())
        .await
        .map_err(during(&what))?;
    if stored_start == "latest" {
        for topic in &new_topics {
            let t = inner.existing_topic(topic).await?;
            for p in 0..t.config.partitions {
                let end = inner.bounds(topic, t.id, p).await?.log_end;
                match config.mode {
                    DeliveryMode::Stream => {
                        SCRIPTS
                            .commit_init
                            .key(&k.commits)
                            .arg(commit_field(t.id, p))
                            .arg(end)
                            .invoke_async::<i64>(&mut inner.conn())
                            .await
                            .map_err(during(&what))?;
                    }
                    _ => {
                        inner.queue_state(group, t.id, p, Some(end), &what).await?;
                    }
                }
            }
        }
    }
    consumer.beat(false, true).await?;
    inner.wake();
    tracing::debug!(group, member, ?topics, mode = ?config.mode, "member joined");
    Ok(consumer)
}

/// A random member id below 2^53 (exact in Lua's doubles), chosen by the
/// client so that a retried join is the same join.
fn new_member_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u32(std::process::id());
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    (h.finish() & ((1 << 53) - 1)).max(1)
}

/// Remove a member at once (close, or its handle dropped); the others
/// rebalance at their next heartbeat (the membership version moved).
pub(crate) async fn leave(inner: &Inner, group: &str, member: u64) -> Result<()> {
    let k = inner.group_keys(group);
    SCRIPTS
        .leave
        .key(&k.meta)
        .key(&k.members)
        .key(&k.subs)
        .arg(member)
        .invoke_async::<i64>(&mut inner.conn())
        .await
        .map_err(during(format!("leave group `{group}`")))?;
    inner.wake();
    Ok(())
}

/// Stream mode: compute the owners with core's sticky [`assign`] from the
/// members and owners as read, and install them if membership did not
/// change meanwhile (compare-and-set on the membership version). Returns
/// whether this call installed them.
async fn rebalance(inner: &Inner, group: &str) -> Result<bool> {
    let what = format!("rebalance group `{group}`");
    let k = inner.group_keys(group);
    let mut c = inner.conn();
    let (mv, done): (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(&k.meta)
        .arg("mv")
        .arg("done_mv")
        .query_async(&mut c)
        .await
        .map_err(during(&what))?;
    let Some(mv) = mv else { return Ok(false) };
    if done.as_deref() == Some(mv.as_str()) {
        return Ok(false);
    }
    let subs: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&k.subs)
        .query_async(&mut c)
        .await
        .map_err(during(&what))?;
    let owners_raw: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&k.owners)
        .query_async(&mut c)
        .await
        .map_err(during(&what))?;
    let members: Vec<MemberSubscription<u64>> = subs
        .iter()
        .filter_map(|(m, t)| {
            Some(MemberSubscription {
                member: m.parse().ok()?,
                topics: t
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect();
    let topics: BTreeSet<String> = members
        .iter()
        .flat_map(|m| m.topics.iter().cloned())
        .collect();
    let mut partitions = Vec::new();
    for t in &topics {
        if let Some(row) = inner.topic(t).await? {
            partitions
                .extend((0..row.config.partitions).map(|p| TopicPartition::new(t.clone(), p)));
        }
    }
    let current: BTreeMap<TopicPartition, u64> = owners_raw
        .iter()
        .filter_map(|(tp, v)| {
            let (t, p) = tp.rsplit_once('/')?;
            let m = v.split(':').next()?.parse().ok()?;
            Some((TopicPartition::new(t, p.parse().ok()?), m))
        })
        .collect();
    let next = assign(&partitions, &current, &members);
    let mut call = SCRIPTS.rebalance.prepare_invoke();
    call.key(&k.meta)
        .key(&k.owners)
        .arg(&mv)
        .arg(partitions.len());
    for (tp, m) in &next {
        call.arg(owner_field(&tp.topic, tp.partition)).arg(*m);
    }
    let generation: u64 = call.invoke_async(&mut c).await.map_err(during(&what))?;
    if generation > 0 {
        tracing::debug!(group, generation, "rebalanced");
        inner.wake();
    }
    Ok(generation > 0)
}

/// A consumer-group member on Redis.
pub(crate) struct RedisConsumer {
    inner: Arc<Inner>,
    group: Arc<str>,
    member: u64,
    topics: BTreeSet<String>,
    topic_list: Vec<String>,
    mode: DeliveryMode,
    closed: AtomicBool,
    rotate: AtomicUsize,
    parts: Mutex<HashMap<TopicPartition, Part>>,
    /// Queue mode: partitions (topic id, partition) this member has leased
    /// from (their leases are released when it leaves).
    leased: Leased,
    /// Numbers this member's queue-mode polls (lease tokens carry it).
    polls: std::sync::atomic::AtomicU64,
    /// The last heartbeat's view, and when that heartbeat began.
    view: Mutex<(View, Option<Instant>)>,
}

impl RedisConsumer {
    fn new(
        inner: Arc<Inner>,
        group: &str,
        member: u64,
        topics: BTreeSet<String>,
        mode: DeliveryMode,
    ) -> Self {
        let leased = Leased::default();
        inner
            .members
            .lock()
            .insert((group.into(), member), leased.clone());
        RedisConsumer {
            inner,
            group: group.into(),
            member,
            topic_list: topics.iter().cloned().collect(),
            topics,
            mode,
            closed: AtomicBool::new(false),
            rotate: AtomicUsize::new(0),
            parts: Mutex::new(HashMap::new()),
            leased,
            polls: std::sync::atomic::AtomicU64::new(0),
            view: Mutex::new((View::default(), None)),
        }
    }

    fn group(&self) -> &str {
        &self.group
    }

    fn check_open(&self) -> Result<()> {
        self.inner.check_open()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("group `{}`: this consumer is closed", self.group),
            ));
        }
        Ok(())
    }

    fn what(&self, m: &Message) -> String {
        format!("group `{}`: {}", self.group, m.position())
    }

    /// Heartbeat on the server's clock and learn the group's state. With
    /// `force` false, a heartbeat younger than a quarter of the session
    /// timeout is reused (a member that beat that recently cannot have
    /// been removed). A member that finds the owners out of date (the
    /// membership version moved) rebalances. `rejoin`: a member removed
    /// for silence joins again; otherwise that is `Fenced`.
    async fn beat(&self, rejoin: bool, force: bool) -> Result<View> {
        {
            let v = self.view.lock();
            if let (false, Some(at)) = (force, v.1) {
                if at.elapsed() < v.0.session / 4 {
                    return Ok(v.0.clone());
                }
            }
        }
        let k = self.inner.group_keys(self.group());
        let what = format!("heartbeat in group `{}`", self.group);
        for _ in 0..8 {
            let started = Instant::now();
            let got: Vec<Value> = SCRIPTS
                .heartbeat
                .key(&k.meta)
                .key(&k.members)
                .key(&k.subs)
                .key(&k.owners)
                .arg(self.member)
                .arg(if rejoin { "1" } else { "0" })
                .arg(self.topic_list.join(","))
                .invoke_async(&mut self.inner.conn())
                .await
                .map_err(|e| match e.code() {
                    Some("NOGROUP") => Error::new(
                        ErrorKind::GroupNotFound,
                        format!("group `{}` no longer exists", self.group),
                    ),
                    _ => map_err(&what, e),
                })?;
            if got.len() < 8 {
                return Err(Error::internal(format!("{what}: short reply")));
            }
            let n = |i: usize| reply::uint(&got[i]);
            if n(0)? == 0 {
                return Err(Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "group `{}`: this member was removed from the group (session timeout or \
                         close); generation is now {}",
                        self.group,
                        n(1)?
                    ),
                ));
            }
            if self.mode == DeliveryMode::Stream && n(2)? != n(3)? {
                rebalance(&self.inner, self.group()).await?;
                continue;
            }
            let owned = got[8..]
                .iter()
                .filter_map(|v| {
                    let s = reply::string(v.clone()).ok()?;
                    let (tp, gen) = s.rsplit_once(':')?;
                    let (t, p) = tp.rsplit_once('/')?;
                    Some((TopicPartition::new(t, p.parse().ok()?), gen.parse().ok()?))
                })
                .collect();
            let view = View {
                generation: n(1)?,
                session: Duration::from_millis(n(4)?),
                visibility: Duration::from_millis(n(5)?),
                max_deliveries: n(6)?.min(u32::MAX as u64) as u32,
                owned,
            };
            *self.view.lock() = (view.clone(), Some(started));
            return Ok(view);
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!("{what}: membership kept changing; retry"),
        ))
    }

    /// The last heartbeat's view while it is younger than a quarter of
    /// the session timeout (a member that beat that recently cannot have
    /// been removed for silence), else `None`.
    fn fresh_view(&self) -> Option<View> {
        let v = self.view.lock();
        match v.1 {
            Some(at) if at.elapsed() < v.0.session / 4 => Some(v.0.clone()),
            _ => None,
        }
    }

    /// Did the group move since a view of `generation` was taken? One
    /// `HMGET` of the group's generation and membership versions, far
    /// cheaper than the heartbeat script: the owners change only in a
    /// rebalance, which raises the generation, and every change that calls
    /// for one (join, leave, expiry, a topic that grew or went) moves the
    /// membership version first. A group that is gone counts as moved
    /// (the heartbeat then says so).
    async fn group_moved(&self, generation: u64) -> Result<bool> {
        let k = self.inner.group_keys(self.group());
        let (gen, mv, done): (Option<u64>, Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(&k.meta)
            .arg("gen")
            .arg("mv")
            .arg("done_mv")
            .query_async(&mut self.inner.conn())
            .await
            .map_err(during(format!(
                "group `{}`: read its generation",
                self.group
            )))?;
        Ok(mv.is_none() || mv != done || gen.unwrap_or(0) != generation)
    }

    fn rotated<T>(&self, mut items: Vec<T>) -> Vec<T> {
        if !items.is_empty() {
            let start = self.rotate.fetch_add(1, Ordering::Relaxed) % items.len();
            items.rotate_left(start);
        }
        items
    }

    /// The topic is read by this consumer and the partition exists: its
    /// registry entry.
    async fn subscribed(&self, topic: &str, partition: u32) -> Result<(TopicPartition, TopicRow)> {
        let t = self.inner.existing_topic(topic).await?;
        validate::partition(topic, partition, t.config.partitions)?;
        if !self.topics.contains(topic) {
            return Err(Error::invalid(format!(
                "group `{}`: this consumer does not read topic `{topic}`",
                self.group
            )));
        }
        Ok((TopicPartition::new(topic, partition), t))
    }

    /// [`Self::subscribed`] from the broker's topic cache when it holds
    /// the topic (the entry sends use, at most `TOPIC_CACHE` old): an
    /// ack is then one script call, not three round trips. A cached id may
    /// be stale (the topic deleted, or deleted and created again): callers
    /// whose script then finds nothing to settle ask again with
    /// [`Self::subscribed_fresh`], so that such an ack still answers
    /// `TopicNotFound` (or lease lost) as without the cache.
    async fn subscribed_cached(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(TopicPartition, TopicRow)> {
        if self.topics.contains(topic) {
            if let Some(t) = self.inner.cached_topic(topic) {
                if partition < t.config.partitions {
                    return Ok((TopicPartition::new(topic, partition), t));
                }
            }
        }
        let (tp, t) = self.subscribed(topic, partition).await?;
        self.inner.cache_topic(topic, &t);
        Ok((tp, t))
    }

    /// [`Self::subscribed`] from the registry, refreshing the cache: the
    /// entry when its id differs from `cached` (the settle should be tried
    /// again under it), `None` when it is the same.
    async fn subscribed_fresh(
        &self,
        topic: &str,
        partition: u32,
        cached: u64,
    ) -> Result<Option<TopicRow>> {
        self.inner.forget_topic(topic);
        let (_, t) = self.subscribed(topic, partition).await?;
        self.inner.cache_topic(topic, &t);
        Ok((t.id != cached).then_some(t))
    }

    async fn group_config(&self) -> Result<GroupConfig> {
        Ok(self.inner.group_meta(self.group()).await?.1)
    }
}

/// Append a failed message's dead letter to the group's DLQ topic
/// (created on demand with one partition).
async fn dead_letter(
    inner: &Inner,
    config: &GroupConfig,
    dead: &DeadLetter<'_>,
    key: Option<Bytes>,
    value: Bytes,
    headers: &[conveyor_core::Header],
) -> Result<()> {
    let (group, topic, partition, offset, attempts) = (
        dead.group,
        dead.topic,
        dead.partition,
        dead.offset,
        dead.attempts,
    );
    let record = dlq::dead_letter_record(key, value, headers, dead);
    let dlq_topic = config.dlq.topic_for(topic, group);
    inner
        .create_topic(&dlq_topic, TopicConfig::new(1), true)
        .await?;
    inner.append_unchecked(&dlq_topic, record).await?;
    tracing::info!(group, topic, partition, offset, attempts, dlq = %dlq_topic, "dead-lettered");
    Ok(())
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn group_config(&self) -> Result<GroupConfig> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                RedisConsumer::group_config(self).await
            })
            .await
    }

    async fn poll(&self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        self.inner
            .bounded(timeout, async move {
                self.check_open()?;
                if max == 0 {
                    return Ok(Vec::new());
                }
                // A poll returns at most this many: the count reaches Lua
                // (doubles) and `XRANGE ... COUNT`, and a reply of
                // millions of messages is no use to anyone.
                let max = max.min(MAX_POLL);
                poll_until(
                    self.inner.wakeups(),
                    timeout,
                    || (self.view.lock().0.session / 4).min(FALLBACK_POLL),
                    || async {
                        match self.mode {
                            DeliveryMode::Stream => self.poll_stream(max).await,
                            _ => self.poll_queue(max).await,
                        }
                    },
                    || self.check_open(),
                )
                .await
            })
            .await
    }

    async fn ack(&self, m: &Message) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                match self.mode {
                    DeliveryMode::Stream => self.ack_stream(m).await,
                    _ => self.ack_queue(m).await,
                }
            })
            .await
    }

    async fn ack_batch(&self, messages: &[Message]) -> Result<BatchAck> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                match self.mode {
                    DeliveryMode::Stream => self.ack_batch_stream(messages).await,
                    _ => self.ack_batch_queue(messages).await,
                }
            })
            .await
    }

    async fn nack(&self, m: &Message, options: NackOptions) -> Result<NackOutcome> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                m.delivery(self.group())?;
                let (tp, t) = self.subscribed(&m.topic, m.partition).await?;
                match self.mode {
                    DeliveryMode::Stream => self.nack_stream(m, options, tp, t).await,
                    _ => self.nack_queue(m, options, t).await,
                }
            })
            .await
    }

    async fn extend(&self, m: &Message, by: Duration) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                if self.mode == DeliveryMode::Stream {
                    m.delivery(self.group())?;
                    return Err(Error::wrong_mode(
                        &self.group,
                        "extend",
                        DeliveryMode::Queue,
                    ));
                }
                self.extend_queue(m, by).await
            })
            .await
    }

    async fn commit(&self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                self.commit_stream(topic, partition, offset).await
            })
            .await
    }

    async fn seek(&self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                let (tp, t) = self.subscribed(topic, partition).await?;
                let b = self.inner.bounds(topic, t.id, partition).await?;
                let target = match to {
                    SeekTo::Beginning => b.log_start,
                    SeekTo::End => b.log_end,
                    SeekTo::Offset(n) => n,
                    SeekTo::Timestamp(ts) => {
                        self.inner
                            .offset_for_timestamp(topic, t.id, partition, ts)
                            .await?
                    }
                }
                .clamp(b.log_start, b.log_end.max(b.log_start));
                self.beat(true, true).await?;
                match self.mode {
                    DeliveryMode::Stream => self.seek_stream(tp, target).await?,
                    _ => self.seek_queue(&tp, t.id, target).await?,
                }
                self.inner.wake();
                Ok(())
            })
            .await
    }

    async fn assignment(&self) -> Result<Vec<TopicPartition>> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                let view = self.beat(true, true).await?;
                match self.mode {
                    DeliveryMode::Stream => {
                        let mut owned: Vec<TopicPartition> =
                            view.owned.into_iter().map(|(tp, _)| tp).collect();
                        owned.sort();
                        Ok(owned)
                    }
                    _ => self.queue_partitions().await,
                }
            })
            .await
    }

    async fn generation(&self) -> Result<u64> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                Ok(self.beat(true, true).await?.generation)
            })
            .await
    }

    async fn close(&self) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                if self.closed.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                self.inner
                    .members
                    .lock()
                    .remove(&(self.group.clone(), self.member));
                if self.inner.check_open().is_err() {
                    return Ok(());
                }
                let released = self.release_leases().await;
                leave(&self.inner, &self.group, self.member).await?;
                released
            })
            .await
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner
            .members
            .lock()
            .remove(&(self.group.clone(), self.member));
        if self.inner.check_open().is_err() {
            return;
        }
        // Leave in the background (a dropped handle leaves its group and
        // gives its leases back).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let leaving = RedisConsumer {
                inner: self.inner.clone(),
                group: self.group.clone(),
                member: self.member,
                topics: BTreeSet::new(),
                topic_list: Vec::new(),
                mode: self.mode,
                closed: AtomicBool::new(true),
                rotate: AtomicUsize::new(0),
                parts: Mutex::new(HashMap::new()),
                leased: self.leased.clone(),
                polls: std::sync::atomic::AtomicU64::new(0),
                view: Mutex::new((View::default(), None)),
            };
            rt.spawn(async move {
                if let Err(e) = leaving.release_leases().await {
                    tracing::debug!(group = %leaving.group, error = %e, "release on drop failed");
                }
                if let Err(e) = leave(&leaving.inner, &leaving.group, leaving.member).await {
                    tracing::debug!(group = %leaving.group, error = %e, "leave on drop failed");
                }
            });
        }
    }
}
