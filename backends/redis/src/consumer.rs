//! Group members: joining and leaving, heartbeats and the rebalance
//! (core's sticky `assign`, installed with a compare-and-set), stream mode
//! (position and retries in the process; owners, generations and commits
//! in Redis) and queue mode (leases in Redis, nothing in the process).

use crate::broker::{decode_fields, Bounds, Inner, TopicRow, FALLBACK_POLL};
use crate::conn::{during, map_err, reply, SCRIPTS};
use crate::keys::{self, commit_field, owner_field};
use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::backend::{assign, poll_until, validate, MemberPartition, MemberSubscription};
use conveyor_core::dlq::{self, DeadLetter};
use conveyor_core::{
    BatchAck, Consumer, DeliveryMode, DeliveryToken, Error, ErrorKind, GroupConfig, Message,
    NackOptions, NackOutcome, Result, SeekTo, StartFrom, TopicConfig, TopicPartition,
    MAX_REDELIVERY_DELAY,
};
use parking_lot::Mutex;
use redis::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::millis;
use conveyor_core::now_ms;

/// The most messages one poll returns (a larger `max` is clamped).
const MAX_POLL: usize = 100_000;
/// How long a member's claim on a dead-letter move lasts before another
/// member may take it over.
const DEAD_CLAIM: Duration = Duration::from_secs(30);
/// How often the sweep looks for dead letters nobody polls for.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// `queue_poll.lua` on one partition's group state, its keys given.
fn poll_call(part: &keys::Part, q: &keys::Queue) -> redis::ScriptInvocation<'static> {
    let mut call = SCRIPTS.queue_poll.prepare_invoke();
    call.key(&part.meta)
        .key(&part.log)
        .key(&q.cursor)
        .key(&q.leases)
        .key(&q.ready)
        .key(&q.attempts)
        .key(&q.tokens)
        .key(&q.dead)
        .key(&part.groups);
    call
}

/// `queue_settle.lua` on one partition's group state, its keys and the
/// action's arguments given (the items or member follow).
pub(crate) fn settle_call(
    q: &keys::Queue,
    action: &str,
    ms: u64,
    max_deliveries: u32,
    reason: &str,
) -> redis::ScriptInvocation<'static> {
    let mut call = SCRIPTS.queue_settle.prepare_invoke();
    call.key(&q.leases)
        .key(&q.ready)
        .key(&q.attempts)
        .key(&q.tokens)
        .key(&q.dead)
        .arg(action)
        .arg(ms)
        .arg(max_deliveries)
        .arg(reason);
    call
}

/// Queue mode: the partitions (topic id, partition) a member has leased
/// from, shared between the member and its broker (which releases them if
/// it closes first).
pub(crate) type Leased = Arc<Mutex<BTreeSet<(u64, u32)>>>;

/// Every live lease `member` holds in the partitions `leased` expires now
/// (it is leaving): the messages are offered again at once, attempts kept.
pub(crate) async fn release_leases(
    inner: &Inner,
    group: &str,
    member: u64,
    leased: &Leased,
) -> Result<()> {
    let touched: Vec<(u64, u32)> = leased.lock().iter().copied().collect();
    for (id, p) in touched {
        let part = inner.part(id, p);
        let q = part.queue(group);
        settle_call(&q, "release", 0, 0, "")
            .arg(member)
            .invoke_async::<Vec<i64>>(&mut inner.conn())
            .await
            .map_err(during(format!("group `{group}`: release leases")))?;
    }
    inner.wake();
    Ok(())
}

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
    let got: Vec<Value> = SCRIPTS
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
        .invoke_async(&mut inner.conn())
        .await
        .map_err(|e| match (e.code(), e.detail()) {
            (Some("MODE"), Some(mode)) => Error::new(
                ErrorKind::GroupModeMismatch,
                format!(
                    "group `{group}` is a {mode}-mode group; cannot join it in {} mode",
                    config.mode.name()
                ),
            ),
            _ => map_err(&what, e),
        })?;
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

    // ---------------------------------------------------------------
    // Stream mode
    // ---------------------------------------------------------------

    /// One stream-mode attempt. Cancel safe: all reads happen before any
    /// position moves; the positions move under the lock with no await.
    ///
    /// The heartbeat and the reads go out together (one round trip, not
    /// two), the reads planned from the last heartbeat's view; what they
    /// read is delivered only if the new heartbeat finds the same owned
    /// partitions in the same generations (a generation only grows, so
    /// nothing moved between the two heartbeats, and the reads lie between
    /// them). Otherwise the reads are dropped and done again under the new
    /// view.
    async fn poll_stream(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        let last = {
            let v = self.view.lock();
            v.1.map(|_| v.0.owned.clone())
        };
        let (view, reads) = match last {
            Some(last) => {
                let (view, reads) =
                    futures::join!(self.beat(true, true), self.stream_reads(&last, max));
                let view = view?;
                if same_owned(&view.owned, &last) {
                    (view, Some(reads?))
                } else {
                    (view, None)
                }
            }
            None => (self.beat(true, true).await?, None),
        };
        let reads = match reads {
            Some(reads) => reads,
            None => self.stream_reads(&view.owned, max).await?,
        };
        self.stream_deliver(reads).await
    }

    /// The reads of one stream-mode attempt over `owned` (no position
    /// moves): what each partition returned, and when to try again.
    async fn stream_reads(
        &self,
        owned: &[(TopicPartition, u64)],
        max: usize,
    ) -> Result<StreamReads> {
        let owned = self.rotated(owned.to_vec());
        let now = now_ms();
        let mut due = None;
        // Committed offsets of partitions without a position yet.
        let unknown: Vec<(TopicPartition, u64)> = {
            let parts = self.parts.lock();
            owned
                .iter()
                .filter(|(tp, g)| {
                    parts
                        .get(tp)
                        .is_none_or(|p| p.generation != *g || p.position.is_none())
                })
                .cloned()
                .collect()
        };
        // Topic ids from the broker's topic cache (two round trips saved
        // per poll); a stale id (topic deleted, or deleted and created
        // again) finds no partition below and is looked up again.
        let mut rows: HashMap<String, TopicRow> = HashMap::new();
        for (tp, _) in &owned {
            if !rows.contains_key(&tp.topic) {
                let row = match self.inner.cached_topic(&tp.topic) {
                    Some(t) => Some(t),
                    None => self
                        .inner
                        .topic(&tp.topic)
                        .await?
                        .inspect(|t| self.inner.cache_topic(&tp.topic, t)),
                };
                match row {
                    Some(t) => {
                        rows.insert(tp.topic.clone(), t);
                    }
                    None => continue,
                }
            }
        }
        let mut committed: HashMap<TopicPartition, Option<u64>> = HashMap::new();
        if !unknown.is_empty() {
            let k = self.inner.group_keys(self.group());
            for (tp, _) in &unknown {
                let Some(t) = rows.get(&tp.topic) else {
                    continue;
                };
                let c: Option<u64> = redis::cmd("HGET")
                    .arg(&k.commits)
                    .arg(commit_field(t.id, tp.partition))
                    .query_async(&mut self.inner.conn())
                    .await
                    .map_err(during(format!(
                        "group `{}`: read the commit of {tp}",
                        self.group
                    )))?;
                committed.insert(tp.clone(), c);
            }
        }
        let mut plan = Vec::new();
        {
            let mut parts = self.parts.lock();
            let keep: BTreeSet<&TopicPartition> = owned.iter().map(|(tp, _)| tp).collect();
            parts.retain(|tp, _| keep.contains(tp));
            for (tp, generation) in &owned {
                let part = parts.entry(tp.clone()).or_default();
                part.at_generation(*generation);
                let pos = match part.position {
                    Some(p) => p,
                    None => match committed.get(tp) {
                        Some(c) => c.unwrap_or(0),
                        None => continue, // read meanwhile: next time
                    },
                };
                part.position = Some(pos);
                if let Some(at) = part.retry_wait(pos, now) {
                    due = Some(due.map_or(at, |d: u64| d.min(at)));
                    continue;
                }
                plan.push((tp.clone(), *generation, pos));
            }
        }
        let mut reads = Vec::new();
        let mut planned = 0usize;
        for (tp, generation, pos) in plan {
            if planned >= max {
                break;
            }
            let Some(t) = rows.get(&tp.topic) else {
                continue;
            };
            let (bounds, found) = match self
                .inner
                .read(&tp.topic, t.id, tp.partition, pos, max - planned)
                .await
            {
                Ok(got) => got,
                Err(e) if e.kind() == ErrorKind::TopicNotFound => {
                    // Deleted since it was cached: looked up again next time.
                    self.inner.forget_topic(&tp.topic);
                    due = Some(now);
                    continue;
                }
                Err(e) => return Err(e),
            };
            planned += found.len();
            reads.push((tp, generation, pos, bounds, found, t.id));
        }
        Ok(StreamReads {
            now,
            due,
            planned,
            reads,
        })
    }

    /// Deliver what [`Self::stream_reads`] read: positions move under the
    /// lock (reads of a partition whose position or generation moved
    /// meanwhile are dropped), then the group's commit is carried over
    /// passed runs.
    async fn stream_deliver(&self, r: StreamReads) -> Result<(Vec<Message>, Option<u64>)> {
        let StreamReads {
            now,
            mut due,
            planned,
            reads,
        } = r;
        let mut out = Vec::with_capacity(planned);
        let mut commits = Vec::new();
        {
            let mut parts = self.parts.lock();
            for (tp, generation, pos, bounds, found, id) in reads {
                let Some(part) = parts.get_mut(&tp) else {
                    continue;
                };
                if part.generation != generation || part.position != Some(pos) {
                    continue; // a seek, nack or rebalance moved it meanwhile
                }
                // Below the log start (retention): continue at the start.
                if found.is_empty() {
                    if pos < bounds.log_start {
                        part.position = Some(bounds.log_start);
                        due = Some(now);
                    }
                    continue;
                }
                if part.deliver(&self.group, &tp, found, &mut out) {
                    due = Some(now);
                    commits.push((tp, id, generation));
                }
            }
        }
        for (tp, id, generation) in commits {
            // Carry the group's commit over passed runs it has reached.
            let k = self.inner.group_keys(self.group());
            let c: Option<u64> = redis::cmd("HGET")
                .arg(&k.commits)
                .arg(commit_field(id, tp.partition))
                .query_async(&mut self.inner.conn())
                .await
                .map_err(during(format!(
                    "group `{}`: read the commit of {tp}",
                    self.group
                )))?;
            let base = c.unwrap_or(0);
            let to = match self.parts.lock().get_mut(&tp) {
                Some(p) if p.generation == generation => p.carry(base),
                _ => continue,
            };
            if to > base {
                match self
                    .commit_offset(&tp, id, to, Some(generation), true)
                    .await
                {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Fenced => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok((out, due))
    }

    /// Commit `offset` for `tp` if this member owns it (in `generation`,
    /// if given): one script, fenced. `cumulative` never moves the commit
    /// back.
    async fn commit_offset(
        &self,
        tp: &TopicPartition,
        topic_id: u64,
        offset: u64,
        generation: Option<u64>,
        cumulative: bool,
    ) -> Result<()> {
        let what = format!("group `{}`: commit {tp}", self.group);
        let k = self.inner.group_keys(self.group());
        let got: Vec<Value> = SCRIPTS
            .commit
            .key(&k.owners)
            .key(&k.commits)
            .arg(owner_field(&tp.topic, tp.partition))
            .arg(commit_field(topic_id, tp.partition))
            .arg(format!("{}:{}", self.member, generation.unwrap_or(0)))
            .arg(offset)
            .arg(if cumulative { "1" } else { "0" })
            .arg(if generation.is_some() { "1" } else { "0" })
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(during(&what))?;
        if got.first().map(reply::int).transpose()? == Some(1) {
            return Ok(());
        }
        let owner = got
            .into_iter()
            .nth(1)
            .map(reply::string)
            .transpose()?
            .unwrap_or_default();
        Err(self.fenced(tp, generation, &owner))
    }

    fn fenced(&self, tp: &TopicPartition, generation: Option<u64>, owner: &str) -> Error {
        let current = self.view.lock().0.generation;
        let (who, at) = owner.split_once(':').unwrap_or(("", ""));
        if who == self.member.to_string() {
            if let Some(g) = generation {
                return Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "group `{}`: {tp} was delivered in generation {g} but was reassigned in \
                         generation {at}",
                        self.group
                    ),
                );
            }
        }
        Error::new(
            ErrorKind::Fenced,
            format!(
                "group `{}`: {tp} is not assigned to this member (generation {current})",
                self.group
            ),
        )
    }

    /// Stream mode: this member owns `tp` (in `generation`, if given);
    /// returns the generation it owns it in.
    async fn check_owner(&self, tp: &TopicPartition, generation: Option<u64>) -> Result<u64> {
        let k = self.inner.group_keys(self.group());
        let owner: Option<String> = redis::cmd("HGET")
            .arg(&k.owners)
            .arg(owner_field(&tp.topic, tp.partition))
            .query_async(&mut self.inner.conn())
            .await
            .map_err(during(format!(
                "group `{}`: check the owner of {tp}",
                self.group
            )))?;
        let owner = owner.unwrap_or_default();
        let parsed = owner
            .split_once(':')
            .and_then(|(m, g)| Some((m.parse::<u64>().ok()?, g.parse::<u64>().ok()?)));
        match (parsed, generation) {
            (Some((m, at)), Some(g)) if m == self.member && at == g => Ok(g),
            (Some((m, at)), None) if m == self.member => Ok(at),
            _ => Err(self.fenced(tp, generation, &owner)),
        }
    }

    /// Stream-mode ack: commit the offset after `m` (carried over passed
    /// runs), fenced by the generation `m` was delivered in.
    async fn ack_stream(&self, m: &Message) -> Result<()> {
        let token = m.delivery(self.group())?;
        let generation = token.generation();
        let (tp, t) = self.subscribed(&m.topic, m.partition).await?;
        let b = self.inner.bounds(&m.topic, t.id, m.partition).await?;
        let next = next_offset(m, &b, &self.what(m))?;
        self.beat(false, false).await?;
        let to = {
            let mut parts = self.parts.lock();
            match parts.get_mut(&tp) {
                Some(part) if part.generation == generation => part.carry(next),
                _ => next,
            }
        };
        self.commit_offset(&tp, t.id, to, Some(generation), true)
            .await?;
        if let Some(part) = self.parts.lock().get_mut(&tp) {
            part.committed(to);
        }
        Ok(())
    }

    // ---------------------------------------------------------------
    // Queue mode
    // ---------------------------------------------------------------

    /// One queue-mode attempt: one `queue_poll.lua` per partition (rotated
    /// so partitions take turns) until `max` messages are leased.
    async fn poll_queue(&self, max: usize) -> Result<(Vec<Message>, Option<u64>)> {
        let view = self.beat(true, false).await?;
        let mut parts = Vec::new();
        for topic in &self.topic_list {
            // The topic cache saves two round trips per topic per poll; a
            // stale entry (topic deleted or grown) is found by the script
            // (NOTOPIC, below) or within the cache's second.
            let row = match self.inner.cached_topic(topic) {
                Some(t) => Some(t),
                None => self.inner.topic(topic).await?.inspect(|t| {
                    self.inner.cache_topic(topic, t);
                }),
            };
            if let Some(t) = row {
                parts.extend((0..t.config.partitions).map(|p| (topic.clone(), t.id, p)));
            }
        }
        let parts = self.rotated(parts);
        let mut out = Vec::new();
        let mut due: Option<u64> = None;
        for (topic, id, p) in parts {
            if out.len() >= max {
                break;
            }
            let poll = self.polls.fetch_add(1, Ordering::Relaxed);
            let tag = format!("{}:{poll}", self.member);
            // Dropped before the reply arrives (a cancelled poll), the
            // leases the script took are given back (see GiveBack).
            let mut guard = GiveBack {
                inner: Some(self.inner.clone()),
                group: self.group.clone(),
                topic_id: id,
                partition: p,
                tag: tag.clone(),
            };
            let what = format!("group `{}`: poll `{topic}`/{p}", self.group);
            let part = self.inner.part(id, p);
            let q = part.queue(self.group());
            let got: redis::RedisResult<Vec<Value>> = poll_call(&part, &q)
                .arg(self.group())
                .arg(max - out.len())
                .arg(millis(view.visibility))
                .arg(view.max_deliveries)
                .arg("")
                .arg(&tag)
                .invoke_async(&mut self.inner.conn())
                .await;
            let got = match got {
                Ok(got) => got,
                Err(e) if e.code() == Some("NOTOPIC") => {
                    // Deleted since it was cached: nothing was leased.
                    guard.inner = None;
                    self.inner.forget_topic(&topic);
                    continue;
                }
                Err(e) => return Err(map_err(&what, e)),
            };
            guard.inner = None;
            self.leased.lock().insert((id, p));
            let mut it = got.into_iter();
            let messages = reply::array(it.next().unwrap_or_default())?;
            let dead = reply::uint(&it.next().unwrap_or_default())?;
            let wait = reply::int(&it.next().unwrap_or(Value::Int(-1)))?;
            if wait >= 0 {
                let at = now_ms().saturating_add(wait as u64);
                due = Some(due.map_or(at, |d| d.min(at)));
            }
            for m in messages {
                let mut f = reply::array(m)?.into_iter();
                let (Some(o), Some(a), Some(tok), Some(fields)) =
                    (f.next(), f.next(), f.next(), f.next())
                else {
                    return Err(Error::internal(format!("{what}: short reply")));
                };
                let offset = reply::uint(&o)?;
                let attempt = reply::uint(&a)?.min(u32::MAX as u64) as u32;
                let tok = reply::bytes(tok)?;
                let (stored, _) = decode_fields(offset, fields, &|| format!("`{topic}`/{p}"))?;
                let token = DeliveryToken::queue(self.group.clone(), Bytes::from(tok));
                out.push(Message::from_stored(
                    topic.clone(),
                    p,
                    stored,
                    attempt,
                    token,
                ));
            }
            if dead > 0 {
                move_dead_letters(&self.inner, self.group(), &topic, id, p).await?;
            }
        }
        Ok((out, due))
    }

    /// The lease token `m` was delivered with (`counter:member`).
    fn lease_of(&self, m: &Message) -> Result<String> {
        let token = m.delivery(self.group())?;
        std::str::from_utf8(token.lease())
            .ok()
            .filter(|t| t.contains(':'))
            .map(str::to_string)
            .ok_or_else(|| Error::invalid(format!("{}: not a lease of this backend", self.what(m))))
    }

    async fn release_leases(&self) -> Result<()> {
        release_leases(&self.inner, &self.group, self.member, &self.leased).await
    }

    /// `queue_settle.lua` for messages of one partition; one code each
    /// (0 lease lost, 1 done, 2 dead-lettered: waiting for the move).
    async fn settle(
        &self,
        topic_id: u64,
        partition: u32,
        (action, ms, reason): (&str, u64, &str),
        items: &[(u64, String)],
        what: &str,
    ) -> Result<Vec<i64>> {
        let part = self.inner.part(topic_id, partition);
        let q = part.queue(self.group());
        let max_deliveries = self.beat(false, false).await?.max_deliveries;
        let mut call = settle_call(&q, action, ms, max_deliveries, reason);
        for (o, tok) in items {
            call.arg(*o).arg(tok);
        }
        call.invoke_async(&mut self.inner.conn())
            .await
            .map_err(during(what))
    }

    /// Ack `items` (offset, lease token) of one partition: one code each
    /// (1 settled, else the lease is lost). The topic's id comes from the
    /// cache; when something did not settle, the id is looked up again and
    /// the ack retried under a new one (a topic deleted meanwhile is
    /// `TopicNotFound`).
    async fn ack_leases(
        &self,
        topic: &str,
        partition: u32,
        items: &[(u64, String)],
        what: &str,
    ) -> Result<Vec<i64>> {
        let (_, t) = self.subscribed_cached(topic, partition).await?;
        let codes = self
            .settle(t.id, partition, ("ack", 0, ""), items, what)
            .await?;
        if codes.iter().all(|c| *c == 1) {
            return Ok(codes);
        }
        match self.subscribed_fresh(topic, partition, t.id).await? {
            Some(t) => {
                self.settle(t.id, partition, ("ack", 0, ""), items, what)
                    .await
            }
            None => Ok(codes),
        }
    }

    /// A single ack: merged with the other acks of its partition in
    /// flight from this broker (one script call for all, see
    /// [`crate::acks`]); as [`Self::ack_leases`], a lease found lost under
    /// the cached topic id is tried again under a fresh one.
    async fn ack_queue(&self, m: &Message) -> Result<()> {
        let lease = self.lease_of(m)?;
        let what = self.what(m);
        let (_, t) = self.subscribed_cached(&m.topic, m.partition).await?;
        self.beat(false, false).await?;
        let code = crate::acks::ack(
            &self.inner,
            &self.group,
            t.id,
            m.partition,
            m.offset,
            lease.clone(),
            &what,
        )
        .await?;
        let code = match code {
            1 => 1,
            _ => match self.subscribed_fresh(&m.topic, m.partition, t.id).await? {
                Some(t) => self
                    .settle(
                        t.id,
                        m.partition,
                        ("ack", 0, ""),
                        &[(m.offset, lease)],
                        &what,
                    )
                    .await?
                    .first()
                    .copied()
                    .unwrap_or(0),
                None => code,
            },
        };
        match code {
            1 => Ok(()),
            _ => Err(lease_lost(m.offset, &what)),
        }
    }
}

/// What one stream-mode attempt read, before any position moves: the
/// time it planned at, when to try again, how many messages, and per
/// partition (partition, generation, position read from, bounds, messages,
/// topic id).
struct StreamReads {
    now: u64,
    due: Option<u64>,
    planned: usize,
    #[allow(clippy::type_complexity)]
    reads: Vec<(
        TopicPartition,
        u64,
        u64,
        Bounds,
        Vec<conveyor_core::backend::StoredMessage>,
        u64,
    )>,
}

/// The same partitions in the same generations, in any order.
fn same_owned(a: &[(TopicPartition, u64)], b: &[(TopicPartition, u64)]) -> bool {
    let set = |v: &[(TopicPartition, u64)]| v.iter().cloned().collect::<BTreeSet<_>>();
    a.len() == b.len() && set(a) == set(b)
}

/// A queue-mode poll script in flight. Dropped while armed (the poll was
/// cancelled before its reply arrived), it gives back, in the background,
/// the leases that script took: they are found by the poll's tag in their
/// tokens, their attempts are restored and they are offered again at once.
/// The give-back goes out on the same multiplexed connection after the
/// poll, so the server runs it after the poll if the poll ran at all.
struct GiveBack {
    inner: Option<Arc<Inner>>,
    group: Arc<str>,
    topic_id: u64,
    partition: u32,
    tag: String,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (group, id, p, tag) = (
            self.group.clone(),
            self.topic_id,
            self.partition,
            std::mem::take(&mut self.tag),
        );
        rt.spawn(async move {
            let part = inner.part(id, p);
            let q = part.queue(&group);
            let done = settle_call(&q, "giveback", 0, 0, "")
                .arg(&tag)
                .invoke_async::<Vec<i64>>(&mut inner.conn())
                .await;
            match done {
                Ok(_) => inner.wake(),
                Err(e) => tracing::warn!(group = %group, error = %e, "could not give back the leases of a dropped poll; they return when they expire"),
            }
        });
    }
}

/// Move the dead letters waiting in one partition of a queue-mode group
/// to its DLQ topic: claim them (so two members never move the same one
/// at once), append each, then settle it. A crash between append and
/// settle leaves a duplicate in the DLQ after the claim lapses, never a
/// loss.
async fn move_dead_letters(
    inner: &Inner,
    group: &str,
    topic: &str,
    topic_id: u64,
    partition: u32,
) -> Result<usize> {
    let what = format!("group `{group}`: dead-letter from `{topic}`/{partition}");
    let part = inner.part(topic_id, partition);
    let q = part.queue(group);
    let claimed: Vec<Value> = SCRIPTS
        .queue_dead
        .key(&q.dead)
        .key(&q.attempts)
        .arg("claim")
        .arg(100)
        .arg(millis(DEAD_CLAIM))
        .invoke_async(&mut inner.conn())
        .await
        .map_err(during(&what))?;
    if claimed.is_empty() {
        return Ok(0);
    }
    let config = inner.group_meta(group).await?.1;
    let mut done = Vec::new();
    let mut it = claimed.into_iter();
    while let (Some(o), Some(a), Some(e)) = (it.next(), it.next(), it.next()) {
        let offset = reply::uint(&o)?;
        let attempts = reply::uint(&a)?.min(u32::MAX as u64) as u32;
        let error = reply::string(e)?;
        let (_, found) = inner.read(topic, topic_id, partition, offset, 1).await?;
        match found.into_iter().next() {
            Some(stored) if stored.offset == offset => {
                let dead = DeadLetter {
                    topic,
                    partition,
                    offset,
                    group,
                    attempts,
                    error: (!error.is_empty()).then_some(error.as_str()),
                    failed_at: now_ms(),
                    idempotency_key: stored.idempotency_key.as_deref(),
                };
                dead_letter(
                    inner,
                    &config,
                    &dead,
                    stored.key,
                    stored.value,
                    &stored.headers,
                )
                .await?;
            }
            // Removed by retention meanwhile: nothing left to move.
            _ => {}
        }
        done.push(offset);
    }
    let mut call = SCRIPTS.queue_dead.prepare_invoke();
    call.key(&q.dead).key(&q.attempts).arg("done");
    for o in &done {
        call.arg(*o);
    }
    call.invoke_async::<i64>(&mut inner.conn())
        .await
        .map_err(during(&what))?;
    Ok(done.len())
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

/// Move dead letters of expired last-attempt leases even when nobody
/// polls: for every queue-mode group this broker has members in, each
/// partition is polled for nothing (which expires leases) and its waiting
/// moves are made.
pub(crate) async fn sweep(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(i) = inner.upgrade() else { return };
        if i.closed.load(Ordering::Acquire) {
            return;
        }
        let groups: BTreeSet<Arc<str>> = i.members.lock().keys().map(|(g, _)| g.clone()).collect();
        for g in groups {
            if let Err(e) = sweep_group(&i, &g).await {
                tracing::debug!(group = %g, error = %e, "dead-letter sweep failed; will retry");
            }
        }
    }
}

async fn sweep_group(inner: &Inner, group: &str) -> Result<()> {
    let (mode, config, _) = inner.group_meta(group).await?;
    if mode != DeliveryMode::Queue {
        return Ok(());
    }
    let k = inner.group_keys(group);
    let topics: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&k.topics)
        .query_async(&mut inner.conn())
        .await
        .map_err(during(format!("sweep group `{group}`")))?;
    for topic in topics {
        let Some(t) = inner.topic(&topic).await? else {
            continue;
        };
        for p in 0..t.config.partitions {
            let part = inner.part(t.id, p);
            let q = part.queue(group);
            let got: Vec<Value> = poll_call(&part, &q)
                .arg(group)
                .arg(0)
                .arg(millis(config.visibility_timeout))
                .arg(config.dlq.max_deliveries)
                .arg("")
                .arg(0)
                .invoke_async(&mut inner.conn())
                .await
                .map_err(during(format!("sweep group `{group}`")))?;
            if got.get(1).map(reply::uint).transpose()?.unwrap_or(0) > 0 {
                move_dead_letters(inner, group, &topic, t.id, p).await?;
            }
        }
    }
    Ok(())
}

fn lease_lost(offset: u64, what: &str) -> Error {
    Error::new(
        ErrorKind::LeaseExpired,
        format!(
            "{what}: the lease on offset {offset} is no longer held (it expired and was \
             released or re-leased, or the message was already settled)"
        ),
    )
}

/// Stream mode: the offset after `m`, which must not pass the log end.
fn next_offset(m: &Message, b: &Bounds, what: &str) -> Result<u64> {
    match m.offset.checked_add(1) {
        Some(next) if next <= b.log_end => Ok(next),
        _ => Err(Error::invalid(format!(
            "{what}: offset {} is at or past the log end ({})",
            m.offset, b.log_end
        ))),
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
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
                let mut outcome = BatchAck::default();
                if self.mode == DeliveryMode::Stream {
                    for (i, m) in messages.iter().enumerate() {
                        match self.ack_stream(m).await {
                            Ok(()) => outcome.acked += 1,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::Closed | ErrorKind::Unavailable
                                ) =>
                            {
                                return Err(e)
                            }
                            Err(e) => outcome.failed.push((i, e)),
                        }
                    }
                    return Ok(outcome);
                }
                // One script per partition.
                let mut by_part: BTreeMap<(String, u32), Vec<(usize, u64, String)>> =
                    BTreeMap::new();
                for (i, m) in messages.iter().enumerate() {
                    match self.lease_of(m) {
                        Ok(lease) if self.topics.contains(&m.topic) => by_part
                            .entry((m.topic.clone(), m.partition))
                            .or_default()
                            .push((i, m.offset, lease)),
                        Ok(_) => outcome.failed.push((
                            i,
                            Error::invalid(format!(
                                "group `{}`: this consumer does not read topic `{}`",
                                self.group, m.topic
                            )),
                        )),
                        Err(e) => outcome.failed.push((i, e)),
                    }
                }
                for ((topic, p), items) in by_part {
                    let what = format!("group `{}`: ack a batch in `{topic}`/{p}", self.group);
                    let pairs: Vec<(u64, String)> =
                        items.iter().map(|(_, o, l)| (*o, l.clone())).collect();
                    let codes = match self.ack_leases(&topic, p, &pairs, &what).await {
                        Ok(codes) => codes,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::Closed | ErrorKind::Unavailable) =>
                        {
                            return Err(e)
                        }
                        Err(e) => {
                            for (i, _, _) in items {
                                outcome
                                    .failed
                                    .push((i, Error::new(e.kind(), e.message().to_string())));
                            }
                            continue;
                        }
                    };
                    for ((i, o, _), code) in items.into_iter().zip(codes) {
                        if code == 1 {
                            outcome.acked += 1;
                        } else {
                            outcome.failed.push((
                                i,
                                lease_lost(
                                    o,
                                    &format!("group `{}`: `{topic}`/{p}@{o}", self.group),
                                ),
                            ));
                        }
                    }
                }
                outcome.failed.sort_by_key(|(i, _)| *i);
                Ok(outcome)
            })
            .await
    }

    async fn nack(&self, m: &Message, options: NackOptions) -> Result<NackOutcome> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                let token = m.delivery(self.group())?;
                let what = self.what(m);
                let (tp, t) = self.subscribed(&m.topic, m.partition).await?;
                match self.mode {
                    DeliveryMode::Stream => {
                        let b = self.inner.bounds(&m.topic, t.id, m.partition).await?;
                        next_offset(m, &b, &what)?;
                        self.beat(false, false).await?;
                        let generation = token.generation();
                        self.check_owner(&tp, Some(generation)).await?;
                        let config = self.group_config().await?;
                        if m.attempt >= config.dlq.max_deliveries {
                            let dead = DeadLetter {
                                topic: &m.topic,
                                partition: m.partition,
                                offset: m.offset,
                                group: self.group(),
                                attempts: m.attempt,
                                error: options.reason.as_deref(),
                                failed_at: now_ms(),
                                idempotency_key: m.idempotency_key.as_deref(),
                            };
                            dead_letter(
                                &self.inner,
                                &config,
                                &dead,
                                m.key.clone(),
                                m.value.clone(),
                                &m.headers,
                            )
                            .await?;
                            let to = {
                                let mut parts = self.parts.lock();
                                match parts.get_mut(&tp) {
                                    Some(part) if part.generation == generation => {
                                        part.carry(m.offset + 1)
                                    }
                                    _ => m.offset + 1,
                                }
                            };
                            self.commit_offset(&tp, t.id, to, Some(generation), true)
                                .await?;
                            if let Some(part) = self.parts.lock().get_mut(&tp) {
                                part.retries.remove(&m.offset);
                                part.committed(to);
                                if part.position.is_some_and(|p| p <= m.offset) {
                                    part.position = Some(to);
                                }
                            }
                            return Ok(NackOutcome::DeadLettered);
                        }
                        let delay = options.delay_or(config.retry_backoff.delay_after(m.attempt));
                        let mut parts = self.parts.lock();
                        let part = parts.entry(tp).or_insert_with(|| Part::new(generation));
                        if part.generation == generation {
                            part.retry(
                                m.offset,
                                m.attempt.saturating_add(1),
                                conveyor_core::deadline_ms(delay),
                            );
                        }
                        drop(parts);
                        self.inner.wake();
                        Ok(NackOutcome::Redeliver)
                    }
                    _ => {
                        let lease = self.lease_of(m)?;
                        let config = self.group_config().await?;
                        let delay = options.delay_or(config.retry_backoff.delay_after(m.attempt));
                        let codes = self
                            .settle(
                                t.id,
                                m.partition,
                                (
                                    "nack",
                                    millis(delay.min(MAX_REDELIVERY_DELAY)),
                                    options.reason.as_deref().unwrap_or(""),
                                ),
                                &[(m.offset, lease)],
                                &what,
                            )
                            .await?;
                        match codes.first() {
                            Some(1) => {
                                self.inner.wake();
                                Ok(NackOutcome::Redeliver)
                            }
                            Some(2) => {
                                move_dead_letters(
                                    &self.inner,
                                    self.group(),
                                    &m.topic,
                                    t.id,
                                    m.partition,
                                )
                                .await?;
                                Ok(NackOutcome::DeadLettered)
                            }
                            _ => Err(lease_lost(m.offset, &what)),
                        }
                    }
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
                let lease = self.lease_of(m)?;
                let what = self.what(m);
                let (_, t) = self.subscribed(&m.topic, m.partition).await?;
                let codes = self
                    .settle(
                        t.id,
                        m.partition,
                        ("extend", millis(by.min(MAX_REDELIVERY_DELAY)), ""),
                        &[(m.offset, lease)],
                        &what,
                    )
                    .await?;
                match codes.first() {
                    Some(1) => Ok(()),
                    _ => Err(lease_lost(m.offset, &what)),
                }
            })
            .await
    }

    async fn commit(&self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        self.inner
            .bounded(Duration::ZERO, async move {
                self.check_open()?;
                // The topic's id from the cache (two round trips saved); a
                // stale one (topic deleted, or deleted and created again)
                // finds no bounds, and the registry is read again.
                let (tp, mut t) = self.subscribed_cached(topic, partition).await?;
                if self.mode != DeliveryMode::Stream {
                    return Err(Error::wrong_mode(
                        &self.group,
                        "commit",
                        DeliveryMode::Stream,
                    ));
                }
                self.beat(false, false).await?;
                let b = match self.inner.bounds(topic, t.id, partition).await {
                    Ok(b) => b,
                    Err(e) if e.kind() == ErrorKind::TopicNotFound => {
                        self.inner.forget_topic(topic);
                        t = self.subscribed(topic, partition).await?.1;
                        self.inner.cache_topic(topic, &t);
                        self.inner.bounds(topic, t.id, partition).await?
                    }
                    Err(e) => return Err(e),
                };
                if offset > b.log_end {
                    // Fencing first, as the embedded engine does.
                    self.check_owner(&tp, None).await?;
                    return Err(Error::invalid(format!(
                        "group `{}`: cannot commit offset {offset} for {tp}: log end is {}",
                        self.group, b.log_end
                    )));
                }
                self.commit_offset(&tp, t.id, offset, None, false).await?;
                if let Some(part) = self.parts.lock().get_mut(&tp) {
                    part.committed(offset);
                }
                Ok(())
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
                    DeliveryMode::Stream => {
                        let generation = self.check_owner(&tp, None).await?;
                        let mut parts = self.parts.lock();
                        let part = parts.entry(tp).or_default();
                        part.at_generation(generation);
                        part.seek(target);
                    }
                    _ => {
                        let part = self.inner.part(t.id, partition);
                        let q = part.queue(self.group());
                        SCRIPTS
                            .queue_seek
                            .key(&q.cursor)
                            .key(&q.leases)
                            .key(&q.ready)
                            .key(&q.attempts)
                            .key(&q.tokens)
                            .key(&q.dead)
                            .key(&part.groups)
                            .arg(self.group())
                            .arg(target)
                            .invoke_async::<i64>(&mut self.inner.conn())
                            .await
                            .map_err(during(format!("group `{}`: seek {tp}", self.group)))?;
                    }
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
                    _ => {
                        let mut out = Vec::new();
                        for topic in &self.topic_list {
                            if let Some(t) = self.inner.topic(topic).await? {
                                out.extend(
                                    (0..t.config.partitions)
                                        .map(|p| TopicPartition::new(topic.clone(), p)),
                                );
                            }
                        }
                        Ok(out)
                    }
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
