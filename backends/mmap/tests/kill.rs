//! Real crashes: a child process writes to a store with
//! `Durability::Always` and is killed with SIGKILL at a random moment;
//! the parent reopens the store and checks every acknowledgement the child
//! printed before it died (contract §3 durability, §7 persistence).
//!
//! The child is this test binary run again (`std::env::current_exe()`)
//! with `CONVEYOR_KILL_CHILD=<dir>` set, filtered to the one test
//! [`kill_child`], which does nothing in a normal run. The child prints
//! one line per acknowledgement, after the call returned and flushed:
//! `@@ R <partition> <offset>` per produce receipt (the value encodes the
//! partition and offset, so every stored record can be checked),
//! `@@ K <partition> <offset> <value>` per keyed receipt, and
//! `@@ C <group> <partition> <offset>` per commit.
//!
//! The parent checks, after every kill: the store opens (torn tails cut);
//! every partition's offsets are dense from 0 and every record holds the
//! value and key written at its offset; every printed receipt is there;
//! every group's committed offset is at least the highest commit printed,
//! and never lower than the parent saw after the previous kill.
//!
//! The kill delays (20–300 ms after the child starts) come from a seed
//! printed at the start; `CONVEYOR_KILL_SEED=<n>` replays one, and
//! `CONVEYOR_KILL_ROUNDS=<n>` changes the number of kills (20).
// Test code: a failed unwrap is a failed test, with its line.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use conveyor_core::prelude::*;
use conveyor_core::{
    Broker, BrokerOptions, Durability, ErrorKind, GroupConfig, Record, TopicConfig,
};
use conveyor_mmap::{MmapBroker, MmapOptions, MmapStorage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "CONVEYOR_KILL_CHILD";
const MODE_ENV: &str = "CONVEYOR_KILL_MODE";
const CHILD_SEED_ENV: &str = "CONVEYOR_KILL_CHILD_SEED";
const TOPIC: &str = "kill";
const KEYED: &str = "keyed";
const PARTITIONS: u32 = 3;
/// Small segments, so kills also land around segment rolls.
const SEGMENT_BYTES: u64 = 16 * 1024;

/// The record the child writes at `offset` of `partition` of [`TOPIC`].
fn record_at(partition: u32, offset: u64) -> Record {
    let pad = (offset % 7) as usize * 13;
    let mut value = format!("p{partition}:o{offset}:").into_bytes();
    value.extend((0..pad).map(|i| (i as u64 ^ offset) as u8));
    let mut r = Record::new(value).with_partition(partition);
    if offset.is_multiple_of(2) {
        r = r.with_key(format!("k{}", offset % 11));
    }
    if offset.is_multiple_of(5) {
        r = r.with_header("seq", offset.to_string());
    }
    r
}

fn topic_config() -> TopicConfig {
    TopicConfig::new(PARTITIONS)
}

async fn open_store(dir: &Path, durability: Durability) -> conveyor_core::Result<MmapBroker> {
    conveyor_mmap::open(
        dir,
        BrokerOptions::default().with_durability(durability),
        MmapOptions::default().with_segment_bytes(SEGMENT_BYTES),
    )
    .await
}

// ---------------------------------------------------------------- child --

/// Write lines to stdout in one `write` (atomic on a pipe below 4 KiB),
/// flushed before returning.
fn emit(lines: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(lines.as_bytes()).expect("stdout");
    out.flush().expect("stdout");
}

/// The child side: does nothing unless run by a parent with
/// `CONVEYOR_KILL_CHILD` set; then writes until it is killed (or gives up
/// after 30 s, so an orphan never lingers).
#[test]
fn kill_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mode = std::env::var(MODE_ENV).unwrap_or_default();
    let seed: u64 = std::env::var(CHILD_SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let work = child(Path::new(&dir), &mode, seed);
        if tokio::time::timeout(Duration::from_secs(30), work)
            .await
            .is_err()
        {
            emit("@@ X child was not killed within 30 s\n");
        }
    });
}

async fn child(dir: &Path, mode: &str, seed: u64) {
    // The parent has closed the store before starting this child, but a
    // process the parent forks at that moment (the other test's child)
    // holds a copy of its lock's descriptor until it execs: wait for the
    // lock to be free rather than fail.
    let deadline = Instant::now() + Duration::from_secs(5);
    let broker = loop {
        match open_store(dir, Durability::Always).await {
            Ok(b) => break b,
            Err(e) if e.kind() == ErrorKind::Locked && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => return emit(&format!("@@ X open: {e}\n")),
        }
    };
    broker.create_topic(TOPIC, topic_config()).await.unwrap();
    broker.create_topic(KEYED, topic_config()).await.unwrap();
    emit("@@ READY\n");
    let broker = std::sync::Arc::new(broker);
    let mut tasks = Vec::new();
    let producing: Vec<u32> = if mode == "groups" {
        vec![0]
    } else {
        (0..PARTITIONS).collect()
    };
    for p in producing {
        tasks.push(tokio::spawn(produce(broker.clone(), p, seed ^ p as u64)));
    }
    if mode == "groups" {
        // Two competing members (rebalances, fencing) and a group that
        // commits every message.
        tasks.push(tokio::spawn(commit_polled(broker.clone(), "g2")));
        tasks.push(tokio::spawn(commit_polled(broker.clone(), "g2")));
        tasks.push(tokio::spawn(commit_each(broker.clone(), "g3")));
    } else {
        tasks.push(tokio::spawn(produce_keyed(broker.clone(), seed)));
        tasks.push(tokio::spawn(commit_polled(broker.clone(), "g")));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Append batches of mixed sizes to one partition, checking each receipt.
async fn produce(broker: std::sync::Arc<MmapBroker>, partition: u32, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let producer = broker.producer().await.unwrap();
    let mut next =
        broker.describe_topic(TOPIC).await.unwrap().partitions[partition as usize].log_end;
    loop {
        let n = [1u64, 1, 1, 2, 3, 7, 20, 60][rng.gen_range(0..8)];
        let batch: Vec<Record> = (next..next + n).map(|o| record_at(partition, o)).collect();
        let receipts = match producer.send_batch(TOPIC, batch).await {
            Ok(r) => r,
            Err(e) => return emit(&format!("@@ X send: {e}\n")),
        };
        let mut lines = String::new();
        for (i, r) in receipts.iter().enumerate() {
            if (r.partition, r.offset) != (partition, next + i as u64) {
                lines.push_str(&format!(
                    "@@ X receipt {}/{} where {partition}/{} was expected\n",
                    r.partition,
                    r.offset,
                    next + i as u64
                ));
            }
            lines.push_str(&format!("@@ R {} {}\n", r.partition, r.offset));
        }
        emit(&lines);
        next += n;
    }
}

/// Keyed records without a partition (the partitioner picks), values
/// unique to this child.
async fn produce_keyed(broker: std::sync::Arc<MmapBroker>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31));
    let producer = broker.producer().await.unwrap();
    let mut id = 0u64;
    loop {
        let n = rng.gen_range(1..=4);
        let batch: Vec<Record> = (id..id + n)
            .map(|i| Record::new(format!("{seed:x}-{i}")).with_key(format!("user-{}", i % 13)))
            .collect();
        let receipts = match producer.send_batch(KEYED, batch).await {
            Ok(r) => r,
            Err(e) => return emit(&format!("@@ X send keyed: {e}\n")),
        };
        let mut lines = String::new();
        for (i, r) in receipts.iter().enumerate() {
            lines.push_str(&format!(
                "@@ K {} {} {seed:x}-{}\n",
                r.partition,
                r.offset,
                id + i as u64
            ));
        }
        emit(&lines);
        id += n;
    }
}

/// A stream-mode member that checks what it reads and commits per poll.
async fn commit_polled(broker: std::sync::Arc<MmapBroker>, group: &'static str) {
    let config = GroupConfig::stream().with_session_timeout(Duration::from_secs(2));
    let consumer = broker.consumer(group, &[TOPIC], config).await.unwrap();
    loop {
        let messages = match consumer.poll(50, Duration::from_millis(20)).await {
            Ok(m) => m,
            Err(e) => return emit(&format!("@@ X poll: {e}\n")),
        };
        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        for m in &messages {
            if m.value != record_at(m.partition, m.offset).value {
                emit(&format!(
                    "@@ X {group} read a wrong value at {}\n",
                    m.position()
                ));
            }
            next.insert(m.partition, m.offset + 1);
        }
        for (p, offset) in next {
            match consumer.commit(TOPIC, p, offset).await {
                Ok(()) => emit(&format!("@@ C {group} {p} {offset}\n")),
                Err(e) if e.kind() == ErrorKind::Fenced => {}
                Err(e) => return emit(&format!("@@ X commit: {e}\n")),
            }
        }
    }
}

/// A stream-mode member committing every message on its own.
async fn commit_each(broker: std::sync::Arc<MmapBroker>, group: &'static str) {
    let config = GroupConfig::stream().with_session_timeout(Duration::from_secs(2));
    let consumer = broker.consumer(group, &[TOPIC], config).await.unwrap();
    loop {
        let messages = match consumer.poll(10, Duration::from_millis(20)).await {
            Ok(m) => m,
            Err(e) => return emit(&format!("@@ X poll: {e}\n")),
        };
        for m in &messages {
            match consumer.commit_message(m).await {
                Ok(()) => emit(&format!("@@ C {group} {} {}\n", m.partition, m.offset + 1)),
                Err(e) if e.kind() == ErrorKind::Fenced => {}
                Err(e) => return emit(&format!("@@ X commit: {e}\n")),
            }
        }
    }
}

// --------------------------------------------------------------- parent --

/// What the children acknowledged, over all rounds.
#[derive(Default)]
struct Acknowledged {
    /// Highest printed receipt offset per partition of [`TOPIC`].
    receipts: BTreeMap<u32, u64>,
    /// Keyed receipts: (partition, offset) -> value.
    keyed: BTreeMap<(u32, u64), String>,
    /// Highest printed commit per (group, partition).
    commits: BTreeMap<(String, u32), u64>,
    /// Committed offsets the parent read after the previous kill.
    seen_committed: BTreeMap<(String, u32), u64>,
    lines: usize,
}

impl Acknowledged {
    fn take(&mut self, line: &str, round: usize) {
        let Some((_, line)) = line.split_once("@@ ") else {
            return;
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| s.parse::<u64>().expect("a number");
        match f.first() {
            Some(&"R") => {
                let e = self.receipts.entry(num(f[1]) as u32).or_default();
                *e = (*e).max(num(f[2]));
            }
            Some(&"K") => {
                self.keyed
                    .insert((num(f[1]) as u32, num(f[2])), f[3].to_string());
            }
            Some(&"C") => {
                let e = self
                    .commits
                    .entry((f[1].to_string(), num(f[2]) as u32))
                    .or_default();
                *e = (*e).max(num(f[3]));
            }
            Some(&"X") => panic!("round {round}: the child reported: {line}"),
            _ => return,
        }
        self.lines += 1;
    }
}

/// Run one child until killed `delay` after it started; returns its
/// output lines. In `check_lock` rounds, first waits for the child to own
/// the store and checks a second open from this process is `Locked`.
fn run_child(dir: &Path, mode: &str, seed: u64, delay: Duration, check_lock: bool) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "kill_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(CHILD_ENV, dir)
        .env(MODE_ENV, mode)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let started = Instant::now();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut lines = Vec::new();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                // A line cut by the kill (no newline) is not an
                // acknowledgement.
                Ok(_) if buf.last() != Some(&b'\n') => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    let _ = tx.send(line.clone());
                    lines.push(line);
                }
            }
        }
        lines
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    if check_lock {
        // Wait for the child to own the store (an event, not a sleep).
        let ready = rx
            .iter()
            .any(|l| l.contains("@@ READY") || l.contains("@@ X"));
        assert!(ready, "the child ended before opening the store");
        let err = MmapStorage::open(dir, MmapOptions::default())
            .expect_err("the store is owned by the child");
        assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    }
    // The random moment is the point of this test: this sleep is the kill.
    if let Some(left) = delay.checked_sub(started.elapsed()) {
        std::thread::sleep(left);
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    let lines = reader.join().unwrap();
    let errors = errors.join().unwrap();
    if status.success() {
        let said: Vec<&String> = lines.iter().filter(|l| !l.contains("@@ R")).collect();
        panic!("the child exited before it was killed:\n{said:?}\n{errors}");
    }
    lines
}

async fn read_partition(broker: &MmapBroker, topic: &str, p: u32) -> Vec<conveyor_core::Message> {
    let mut out: Vec<conveyor_core::Message> = Vec::new();
    loop {
        let from = out.last().map_or(0, |m| m.offset + 1);
        let page = broker.fetch(topic, p, from, 2000).await.expect("fetch");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// Reopen after a kill and check everything acknowledged so far.
async fn check_store(dir: &Path, acked: &mut Acknowledged, groups: &[&str], round: usize) {
    let at = format!("after kill {round}");
    let broker = open_store(dir, Durability::None)
        .await
        .unwrap_or_else(|e| panic!("{at}: reopen failed: {e}"));
    let topics = broker.list_topics().await.unwrap();
    if topics.iter().any(|t| t == TOPIC) {
        for p in 0..PARTITIONS {
            let records = read_partition(&broker, TOPIC, p).await;
            for (i, m) in records.iter().enumerate() {
                assert_eq!(m.offset, i as u64, "{at}: {TOPIC}/{p}: offsets not dense");
                let want = record_at(p, m.offset);
                assert_eq!(
                    (&m.key, &m.value, &m.headers),
                    (&want.key, &want.value, &want.headers),
                    "{at}: {TOPIC}/{p} offset {}: wrong record",
                    m.offset
                );
            }
            let end = broker.describe_topic(TOPIC).await.unwrap().partitions[p as usize].log_end;
            assert_eq!(end, records.len() as u64, "{at}: {TOPIC}/{p} log end");
            if let Some(max) = acked.receipts.get(&p) {
                assert!(
                    end > *max,
                    "{at}: {TOPIC}/{p}: receipt for offset {max} was printed, log ends at {end}"
                );
            }
        }
    } else {
        assert!(acked.lines == 0, "{at}: topic lost after acknowledgements");
    }
    for ((p, offset), value) in &acked.keyed {
        let m = broker.fetch(KEYED, *p, *offset, 1).await.unwrap();
        assert_eq!(
            m.first().map(|m| (m.offset, m.value.clone())),
            Some((*offset, Bytes::from(value.clone()))),
            "{at}: keyed receipt {p}/{offset} printed"
        );
    }
    for group in groups {
        let lag = match broker.group_lag(group).await {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::GroupNotFound => {
                assert!(
                    !acked.commits.keys().any(|(g, _)| g == group),
                    "{at}: group {group} lost after commits were printed"
                );
                continue;
            }
            Err(e) => panic!("{at}: group lag: {e}"),
        };
        for part in lag.partitions.iter().filter(|l| l.topic == TOPIC) {
            let key = (group.to_string(), part.partition);
            let printed = acked.commits.get(&key).copied().unwrap_or(0);
            assert!(
                part.committed >= printed,
                "{at}: group {group} partition {}: committed {} but {printed} was acknowledged",
                part.partition,
                part.committed
            );
            let before = acked.seen_committed.get(&key).copied().unwrap_or(0);
            assert!(
                part.committed >= before,
                "{at}: group {group} partition {}: committed went back from {before} to {}",
                part.partition,
                part.committed
            );
            assert!(
                part.committed <= part.log_end,
                "{at}: committed past the log end"
            );
            acked.seen_committed.insert(key, part.committed);
        }
    }
    broker.close().await.unwrap();
}

fn seed() -> u64 {
    std::env::var("CONVEYOR_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen())
}

fn rounds() -> usize {
    std::env::var("CONVEYOR_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

fn kill_repeatedly(mode: &str, groups: &[&str], prepare: impl FnOnce(&Path)) {
    if std::env::var(CHILD_ENV).is_ok() {
        return; // in a child: only `kill_child` runs
    }
    let seed = seed();
    eprintln!("{mode}: seed {seed} (replay with CONVEYOR_KILL_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut acked = Acknowledged::default();
    let started = Instant::now();
    for round in 0..rounds() {
        let delay = Duration::from_millis(rng.gen_range(20..=300));
        let lines = run_child(dir.path(), mode, rng.gen(), delay, round == 0);
        for line in &lines {
            acked.take(line, round);
        }
        rt.block_on(check_store(dir.path(), &mut acked, groups, round));
    }
    eprintln!(
        "{mode}: {} kills, {} acknowledgements checked ({} receipts high-water {:?}, commits {:?}) in {:?}",
        rounds(),
        acked.lines,
        acked.keyed.len(),
        acked.receipts,
        acked.commits,
        started.elapsed()
    );
    assert!(acked.lines > 0, "no child acknowledged anything");
}

/// SIGKILL during produce (mixed batch sizes, three partitions, keyed
/// records) and stream-mode commits: every receipt printed is stored with
/// its value, offsets stay dense, commits never go back.
#[test]
fn sigkill_keeps_every_acknowledged_record_and_commit() {
    kill_repeatedly("produce", &["g"], |_| {});
}

/// SIGKILL while two groups commit (two competing members in one, commits
/// per message in the other) on a prefilled topic: a committed offset
/// printed before the kill is never lower after reopen.
#[test]
fn sigkill_never_loses_a_committed_offset() {
    kill_repeatedly("groups", &["g2", "g3"], |dir| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let broker = open_store(dir, Durability::None).await.unwrap();
            broker.create_topic(TOPIC, topic_config()).await.unwrap();
            broker.create_topic(KEYED, topic_config()).await.unwrap();
            let producer = broker.producer().await.unwrap();
            for p in 0..PARTITIONS {
                for chunk in (0..600u64).collect::<Vec<_>>().chunks(100) {
                    producer
                        .send_batch(TOPIC, chunk.iter().map(|o| record_at(p, *o)).collect())
                        .await
                        .unwrap();
                }
            }
            broker.close().await.unwrap();
        });
    });
}
