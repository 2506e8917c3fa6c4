//! # conveyor-redis
//!
//! Conveyor on Redis Streams: one queue shared by many processes and
//! machines, on a standalone Redis server or a Redis Cluster. Open it with
//! `conveyor::open("redis://host:6379/?namespace=NAME")` (feature `redis`
//! of the facade), `redis+cluster://host:7000/?namespace=NAME` for a
//! cluster (one node is enough; the others are discovered), or [`open`].
//!
//! Needs Redis 7.0 or later (the scripts declare Redis 7 script flags).
//!
//! Every rule of the delivery contract (`docs/semantics.md`) holds in the
//! server: each step that writes is one Lua script (`lua/*.lua`, each with
//! a KEYS/ARGV header), which Redis runs atomically, on the server's clock
//! (`TIME`). A read (`fetch`, a partition's bounds) is a pipeline of
//! `HMGET` (the bounds) then `XRANGE` on the partition's slot, entries at
//! or past the end read first dropped: a snapshot without the script's
//! conversion of every entry to Lua and back, and without `MULTI`/`EXEC`,
//! which a full server refuses (see "Server settings").
//! Members of a group may live in different processes and machines.
//!
//! ## URL options
//!
//! | option | default | what |
//! |---|---|---|
//! | scheme `redis://`, `rediss://` | | a standalone server; `rediss` is TLS |
//! | scheme `redis+cluster://`, `rediss+cluster://` | | a Redis Cluster, from one of its nodes |
//! | `user:password@` | none | the server's credentials (never shown in errors, logs or `Debug`) |
//! | `namespace` | `conveyor` | the prefix of every key (`[A-Za-z0-9._-]`, 1 to 100) |
//! | `timeout_ms` | 30000 | how long any call waits for the server, `open` included |
//! | `settings_check_ms` | 1000 | how often the server's settings are read again while running |
//! | `nodes` | none | more cluster seed nodes, `host:port,host:port` |
//! | `tls_ca` | the system's roots | PEM file of the CA that signed the server's certificate (redis-cli's `--cacert`) |
//! | `tls_cert`, `tls_key` | none | a client certificate and its key, PEM (redis-cli's `--cert`, `--key`), for `tls-auth-clients yes` |
//! | `durability`, `auto_create` | `none`, on | the common options |
//!
//! ## Key layout
//!
//! Every key starts with a hash tag, so that all keys one script touches
//! share one slot on a cluster, while partitions and groups spread over the
//! shards:
//!
//! | keys | what |
//! |---|---|
//! | `{ns/m}:topics`, `:configs`, `:seq`, `:groups` | the namespace's registry: topic name → id, id → config (JSON), the id counter, the groups |
//! | `{ns/t<id>.<p>}:log` | partition `p` of topic `id`: a stream whose entry id for offset N is `N-T`, T the append time in ms (fields `s` size, `v` value, `k` key, `h` headers, `i` idempotency key, `d` delivery time, `g` addressed group; a record of a value alone, without key, headers, idempotency key, delivery time or group, has only `v`: its size is the value's). Entries written before the time moved into the id are `N-1` with the time in a field `t`; both forms are read |
//! | `{ns/t<id>.<p>}:m` | its bounds: `end` (the next offset), `start`, `bytes`, `lastts` |
//! | `{ns/t<id>.<p>}:idem`, `:idemt` | the dedup window: idempotency key → `offset:time`, and key → time |
//! | `{ns/t<id>.<p>}:q:<group>:c`, `:s`, `:d` | a queue-mode group in that partition: its cursor; its state, one sorted-set member per message leased (`offset:attempts:member:poll` → deadline) or waiting to be offered again (`offset:attempts` → when); dead letters waiting for their move. (Earlier versions kept leases, ready, attempts and tokens in four keys `:l`, `:r`, `:a`, `:t`; a broker converts them on first touch, see `queue_migrate.lua`.) |
//! | `{ns/g.<group>}:meta`, `:mem`, `:sub`, `:topics`, `:own`, `:commits` | a group: mode, config, generation and membership version; members (id → session deadline); their topics; topics read; owners (`topic/p` → `member:generation`); committed offsets (`topic id/p` → offset) |
//! | `{ns/i:<key>}` | the idempotency store (`SET NX PX`) |
//!
//! Topics get a fresh numeric id at creation, so a topic deleted and
//! created again never sees the old one's records or commits.
//!
//! ## How the rules hold
//!
//! - **Appends** (`append.lua`): the partition's `end` counter gives dense
//!   offsets; a batch to one partition is one script (atomic, contiguous);
//!   the dedup window lives in the same slot and is checked in the same
//!   script, so concurrent sends of one key append once. Every append
//!   publishes on the namespace's channel; a broker subscribes to it (one
//!   pub/sub connection) while it has polls in progress, and for 5 s after
//!   the last, and wakes its waiting polls (within milliseconds; a 250 ms
//!   fallback poll covers a lost connection and the moment of subscribing).
//!   A process that only produces does not receive the notifications.
//! - **Groups**: members heartbeat on the server's clock (`heartbeat.lua`),
//!   which also removes members silent for the session timeout. Every
//!   membership change bumps the group's membership version; a member that
//!   sees the version differ from the one the owners were computed for
//!   computes the owners with core's sticky `assign` and installs them with
//!   a compare-and-set on the version (`rebalance.lua`), bumping the
//!   generation. A commit (`commit.lua`) lands only if its member still
//!   owns the partition in the generation it got it in (fencing).
//! - **Stream mode** keeps the member's position and nack retries in its
//!   process, as a Kafka consumer keeps its fetch position; ownership,
//!   generations and commits live in Redis. A member heartbeats at most
//!   every quarter of the session timeout (as the PostgreSQL backend
//!   does). In between, a poll sends its reads, planned from the last
//!   heartbeat's owners, together with one `HMGET` of the group's
//!   generation and membership versions: the owners change only in a
//!   rebalance, which raises the generation, and everything that calls for
//!   one moves the membership version first, so versions as the heartbeat
//!   left them mean the same owners, and the reads are delivered. Versions
//!   that moved (or a heartbeat that is due) send the heartbeat: the reads
//!   are delivered only if it finds the same partitions in the same
//!   generations (generations only grow, so the reads fell between two
//!   views that agree), else read again.
//! - **Queue mode** uses Conveyor's own lease structures, not Redis's
//!   consumer groups (`XREADGROUP`/PEL/`XAUTOCLAIM`): the contract needs a
//!   nack with a delay, `extend`, attempt counts that survive everything,
//!   delayed delivery and records addressed to one group, none of which
//!   the PEL has (its delivery counter is raised by `XCLAIM`, a delay needs
//!   a second structure anyway). A poll (`queue_poll.lua`) releases expired
//!   leases, takes due redeliveries, then fresh records from the group's
//!   cursor, and leases them with a token; acks, nacks and extends
//!   (`queue_settle.lua`) check the token, so a message whose lease expired
//!   and was re-leased cannot be settled by its old holder. A message's
//!   whole queue state (attempts, holder, deadline or time it is offered
//!   again) is one member of one sorted set, so a lease is checked by the
//!   member's presence and settled by removing it, and an expired lease is
//!   simply a member whose time has come. An ack is a `ZREM` of its
//!   lease's member (it settles only if the lease holds, and says whether
//!   it did), all the acks of a batch in one pipeline, and single acks of
//!   one partition and group that are in flight at the same time in one
//!   broker share one round trip (`acks.rs`); each lease is still checked
//!   on the server.
//! - **Dead letters** span two slots (the failing group's partition, the
//!   DLQ topic's partition): the failing message first waits in the
//!   group's dead-letter hash (not offered, not settled), is then
//!   appended to the DLQ topic, then settled. A mover that dies between
//!   the steps is replaced after its claim lapses; a duplicate in the DLQ
//!   is possible, a loss is not.
//! - **Retention** (`retain.lua`) trims the stream's head with
//!   `XTRIM MINID` and moves the log start. It does not wait for queue-mode
//!   leases: a leased record that retention removes is settled unseen (its
//!   lease can no longer be acked; the next poll drops it).
//! - **Scripts fail without rollback**, so each validates everything before
//!   its first write, and every script but `append.lua` is safe to run
//!   twice. An append that timed out may have happened; retrying it
//!   appends again unless the records carry idempotency keys.
//!
//! ## Durability
//!
//! Redis promises what its persistence settings promise, and [`open`]
//! checks them (`CONFIG GET`, on every master of a cluster), then the
//! broker checks them again while it runs (see "Server settings"):
//!
//! | durability | needs | what it means |
//! |---|---|---|
//! | `none` | nothing | acknowledged writes are in the server's memory; a server restart without persistence loses them |
//! | `interval(d)` | `appendonly yes` with `appendfsync always`, or `everysec` and d >= 1 s | the AOF is fsynced at least every d |
//! | `always` | `appendonly yes` with `appendfsync always` | each write is in the fsynced AOF before Redis answers |
//!
//! A durability the server cannot honour is refused at open with
//! `Unsupported`, naming the setting. Replication (`WAIT`) is not used,
//! and neither is `WAITAOF` (Redis 7.2+, which could make `always` work
//! with `appendfsync everysec`): the target is Redis 7.0, which lacks it,
//! so nothing here requires a newer server.
//!
//! ## Server settings
//!
//! The server's settings are part of the contract. What each must be, and
//! what happens when it is not:
//!
//! | setting | must be | at open | while running |
//! |---|---|---|---|
//! | `maxmemory-policy` | `noeviction` (every master) | anything else is refused, `Unsupported`, naming the policy and the fix (`CONFIG SET maxmemory-policy noeviction`, and redis.conf): an evicting server drops acknowledged records, committed offsets and the topic registry without an error | sends fail `Unavailable` naming the setting until it is restored |
//! | `appendonly`, `appendfsync` | per durability (table above; nothing for `none`) | refused, `Unsupported`, naming both values | sends fail `Unavailable` naming them until restored |
//! | `maxmemory` | any; a full server is a normal state | | sends (and new idempotency keys, topic creation) fail `Unavailable`: "Redis at ... is full: maxmemory reached ..."; everything else keeps working (below) |
//! | credentials (`requirepass`, ACL users) | the URL's user and password | wrong or missing: `Unauthenticated` at open | an ACL that forbids a command or key: `PermissionDenied` |
//! | TLS (`tls-port`) | `rediss://`, and the server's certificate signed by `tls_ca` (or a system root) for the host in the URL | an untrusted certificate: `Unauthenticated`, naming TLS; an unreadable file: `InvalidArgument` | |
//!
//! **How the settings are read.** `CONFIG GET maxmemory-policy appendonly
//! appendfsync` on every master (a cluster's masters are found with
//! `CLUSTER NODES`). Where `CONFIG` is disabled or renamed (managed
//! services) or forbidden by ACL, `INFO memory` (`maxmemory_policy`) and
//! `INFO persistence` (`aof_enabled`) are read instead; `INFO` does not
//! show `appendfsync`, so there only durability `none` can be verified,
//! and `always`/`interval` are refused as unverifiable.
//!
//! **While running.** A broker reads the settings again every
//! `settings_check_ms` (default 1 s), and before the next send after any
//! `Unavailable` (a lost connection: the server may have restarted with
//! other settings). While they are wrong, sends fail `Unavailable` (retry
//! later) instead of issuing receipts the server cannot honour; reads,
//! acks and commits go on. The window is honest but not zero: a setting
//! changed on the server (`CONFIG SET appendonly no`) is noticed at the
//! next check, so sends acknowledged within one check interval after the
//! change (up to 1 s by default) had the old guarantee only until the
//! change; a send already past its check when a connection is lost and
//! re-established may land on the new server before the check. Lower
//! `settings_check_ms` narrows the window at the cost of one `CONFIG GET`
//! per master per interval.
//!
//! **A full server** (`noeviction` and `maxmemory` reached). Redis 7.0
//! refuses, under OOM: every command flagged `denyoom` (`SET`, `SADD`,
//! `HSET`, `HINCRBY`, `ZADD`, `XADD`, ...; `DEL`, `UNLINK`, `PUBLISH` and
//! reads are allowed); *every* command queued inside `MULTI` (so a
//! `MULTI`/`EXEC` of reads fails with `EXECABORT`); a script without a
//! shebang whose first write is a `denyoom` command; and a script whose
//! `#!lua` shebang lacks both `allow-oom` and `no-writes`, before it
//! runs. So reads are plain pipelines; the scripts that read, settle or
//! keep membership (`queue_poll`, `queue_settle`, `queue_state`,
//! `queue_dead`, `queue_seek`, `commit`, `commit_init`, `join`,
//! `group_register`, `group_alter`, `group_touch`, `heartbeat`, `rebalance`, `leave`,
//! `retain`, `topic_delete`) declare `#!lua flags=allow-oom` (their writes are
//! small, and settling and retention free memory), `find_time` declares
//! `no-writes`, and `append.lua` declares `#!lua` with no flag, so a full
//! server refuses an append before any of it runs. Fetch, describe, lag,
//! polls in both modes, ack, nack, extend, commit, join, heartbeat and
//! leave work on a full server; sends fail `Unavailable` until memory is
//! freed (retention, deleted topics) or `maxmemory` raised.
//!
//! ## Errors
//!
//! A lost connection, a timeout, a full server, settings that no longer
//! honour the durability, `LOADING`, `BUSY`, `TRYAGAIN` and cluster
//! redirections that fail are `ErrorKind::Unavailable` (retriable); the
//! connection is re-established by the next call. Refused credentials
//! (`WRONGPASS`, `NOAUTH`) and an untrusted TLS certificate are
//! `Unauthenticated`, an ACL refusal (`NOPERM`) is `PermissionDenied`:
//! neither is retried. Every call has a deadline (`timeout_ms`, default
//! 30 s), `open` included (connecting, authenticating and reading the
//! settings together). No message, source or `Debug` output contains a
//! password. `close()` drops the broker's connections at once, even while
//! producers and consumers are still held (their calls are then
//! `Closed`).
//!
//! ## Measured
//!
//! Criterion benches (the former `benches/throughput.rs`, whose workloads
//! are now the comparison's `produce/*` and `read/*`: `scripts/bench-report
//! --backends redis`, figures in `docs/benchmarks.md`; and
//! `bench/benches/queue.rs`), release build, on the development machine: 2
//! cores shared with other builds (load average 1.5–4 during the runs;
//! figures move by ±20% from one run to the next), Redis 7.0.15 on the
//! same machine without persistence (`save ""`, `appendonly no`),
//! durability `none`, 100-byte values; one partition for appends and
//! reads, 4 partitions and 4 consumers for queue mode. The 3-master
//! cluster is three local `redis-server --cluster-enabled yes` (no
//! replicas, no persistence) on the same 2 cores. The raw baselines run
//! in the same process and run, over the `redis` crate's multiplexed
//! connection (its cluster connection on a cluster):
//!
//! - `append/raw_redis_xadd/100`: `XADD key * v <100 bytes>`, 100 per
//!   pipeline, each pipeline awaited;
//! - `queue_ack/raw_redis_xreadgroup/single`: 4 streams, one Redis
//!   consumer group, 4 consumers taking turns over the streams with
//!   `XREADGROUP ... COUNT 100` and one awaited `XACK` per entry.
//!
//! ```text
//! CONVEYOR_BENCH_URL='redis://127.0.0.1:6379/?namespace=bench' cargo bench --features redis --bench throughput   # (removed; see above)
//! CONVEYOR_BENCH_URL='redis+cluster://127.0.0.1:17100/?namespace=bench' cargo bench --features redis --bench throughput -- append   # (removed)
//! CONVEYOR_BENCH_URL='redis://127.0.0.1:6379/?namespace=bench' cargo bench -p conveyor-bench --features redis --bench queue -- 'queue_ack/(redis|raw)'
//! ```
//!
//! | figure | standalone | 3-master cluster | target |
//! |---|---|---|---|
//! | produce, `send_batch` of 100 (3 runs) | 242 K / 268 K / 267 K msg/s | 259 K / 250 K / 258 K msg/s | ≥ 200 K |
//! | raw pipelined `XADD`, 100 per round trip (same runs) | 528 K / 514 K / 535 K msg/s | 454 K / 418 K / 464 K msg/s | |
//! | produce / raw | 46% / 52% / 50% | 57% / 60% / 56% | ≥ 50% |
//! | produce, batch of 100 sent from a spawned task | 278 K msg/s | 252 K msg/s | |
//! | produce, batch of 1 / of 1,000 | 12.9 K / 310 K msg/s | 10.5 K / 330 K msg/s | |
//! | read (`fetch` of 10,000 from offset 0, 1 M records) | 303 K msg/s (292 K in another run) | 333 K msg/s | ≥ 300 K |
//! | queue mode, single acks, each awaited | 29.4 K / 28.6 K msg/s | 24.5 K msg/s | ≥ 40 K |
//! | raw `XREADGROUP` + `XACK` | 50.1 K / 49.8 K msg/s | 50.9 K msg/s | (≈ 63 K in the issue) |
//! | queue mode, `ack_batch` of 100 | 84.6 K msg/s | 88.7 K msg/s | |
//! | queue mode, a poll's 100 acks concurrent | 59.7 K msg/s | 49.6 K msg/s | |
//! | produce → consume latency (stream mode) | 0.46–0.63 ms | 0.60 ms | |
//!
//! The latency is no regression: the code before these changes measured
//! 0.53–0.63 ms in the same hour (0.23 ms earlier, on a quieter host).
//!
//! Before these changes (same machine and benches): produce batch 100
//! 141–165 K msg/s (25% of raw), read 143–175 K msg/s, single acks 20.9 K
//! msg/s, `ack_batch` 64 K msg/s. What changed, each found by measuring
//! (`INFO commandstats`, the server's CPU time per call, `perf` on
//! `redis-server` and on the bench):
//!
//! - **`append.lua` spent more time formatting numbers than appending.**
//!   A Lua number passed to `redis.call` or concatenated is formatted with
//!   a floating-point printf (`%.17g`, `%.14g`: 17% of the server's
//!   samples), four times per record. Numbers now go through
//!   `string.format('%d')`, and the common record (no key, idempotency
//!   key, delay or group) calls `XADD` without building a table. Server
//!   time per batch of 100: ~300 µs → ~200 µs (a bare Lua loop of 100
//!   `XADD`s of the same four fields costs ~160 µs).
//! - **Every process received every append's notification.** The wake-up
//!   listener was always subscribed, so a process that only produces woke
//!   a worker thread per append for a pub/sub message nobody waited for;
//!   for batches sent from `block_on` that cost up to 40% (batch 100:
//!   ~540 µs with the listener, ~300–430 µs without, same build). The
//!   listener now subscribes only while the process has polls in progress.
//! - **Reads converted every entry to Lua and back.** `read.lua`'s
//!   `XRANGE` of 10,000 entries cost 23 ms of server time against 4 ms for
//!   the bare `XRANGE`; reads were then a `MULTI`/`EXEC` of `HMGET` and
//!   `XRANGE` (now a plain pipeline of the two, so that a full server
//!   still answers them; not measured again since). What is left is mostly the client: `perf` puts ~25% of the
//!   bench's samples in the `redis` crate's reply parser and ~25% in
//!   malloc/free (ten values per entry).
//! - **A queue-mode ack was three round trips** (two `HGET`s of the topic
//!   registry, then the script). It takes the topic's id from the
//!   broker's one-second topic cache now; an ack that settles nothing looks
//!   the topic up again, so a deleted topic is still `TopicNotFound`.
//!   `queue_poll.lua` writes a poll's leases with one `HINCRBY` of the
//!   token counter and one `ZADD`/`HSET` per 100 (three calls per message
//!   before), and formats its numbers as `append.lua` does.
//!
//! What is missed, and why:
//!
//! - **Produce vs raw, standalone: 46–52%, on the 50% line.** The script's
//!   100 `redis.call("XADD", ...)` with four fields cost ~2 µs per record
//!   on the server against ~0.6 µs per pipelined one-field `XADD`; what the
//!   script adds (dense offsets, the dedup window, the partition's bounds,
//!   the wake-up) must happen atomically with the appends, so it stays a
//!   script. On the cluster the ratio is 56–60% (the raw baseline pays
//!   the cluster client's routing too).
//! - **Single acks: 29 K msg/s, 27% under the 40 K target** (59% of the
//!   raw loop measured here). An ack is one round trip now (`queue_settle.lua`,
//!   ~5 µs on the server), but each poll of 100 is one `queue_poll.lua` of
//!   ~1 ms (≈ 10 µs per message: the entries converted into Lua and back,
//!   an `HINCRBY` of the attempt count per message, the lease zset and
//!   hashes scanned linearly while they are small listpacks), and the
//!   single-threaded server answers none of the other consumers' acks
//!   meanwhile; `XREADGROUP` does its bookkeeping in C at about 1 µs per
//!   entry. Getting closer means fewer structures per lease (deadline,
//!   token and attempts in one place) or a poll that returns less; that
//!   changes the lease layout every queue script shares and was not done
//!   here. On the cluster single acks are slower still (24.5 K): the 4
//!   partitions share 3 masters on the same 2 cores, and the cluster
//!   client adds a hop per call.
//!
//!   Tried and not kept (no gain in seven paired runs; main measured
//!   33.9–38.4 K msg/s in that hour, still under 40 K): an index of the
//!   offsets that carry a delivery time or an addressed group, so a poll
//!   leases a fresh range without reading the entries in Lua and the
//!   client fetches them with one `XRANGE`; attempts in bulk; a shorter
//!   ack. A poll of 100 stayed ~0.6 ms of server time, and an ack script
//!   runs at ~50 K calls/s under `redis-benchmark` (4 clients) whatever
//!   its body, against ~100 K/s for `XACK`: what is left is the cost of
//!   calling a script at all, and per-message Lua work in the poll. The
//!   likely next step is an ack of plain commands (the token in the lease
//!   zset's member, so one `ZREM` checks and settles), a change of the
//!   lease layout.
//! - **Read, standalone: 292–303 K msg/s, on the 300 K line**; the rest is
//!   the client's parsing and allocation (above).
//!
//! ### Second round: queue settling and wake-ups (branch `redis-speed`)
//!
//! Setup: a private `redis-server` 7.0.15 on loopback (`save ""`,
//! `appendonly no`, defaults otherwise), durability `none`, 100-byte
//! values, polls of up to 100, 4 consumers in one process (tasks sharing
//! the broker's multiplexed connection), 1 or 4 partitions; release
//! build; the 2 cores shared with another engineer's test runs (load
//! average 1.5–9: figures move by ±20% between runs, so old and new ran
//! interleaved, each beside its raw baseline in the same minute).
//! `bench/benches/queue.rs` (criterion, 10 samples of 3 s; medians), and
//! `bench/examples/redis_latency.rs` (1,000 records/s for 3 s, one
//! stream-mode consumer, one partition):
//!
//! ```text
//! CONVEYOR_BENCH_URL='redis://127.0.0.1:PORT/?namespace=x' cargo bench -p conveyor-bench --features redis --bench queue -- 'queue_ack/(redis|raw)'
//! CONVEYOR_BENCH_URL='redis://127.0.0.1:PORT/?namespace=x' cargo run --release -p conveyor-bench --features redis --example redis_latency -- 1000 3 1
//! ```
//!
//! | workload (msg/s) | before | after | raw | after / raw | target |
//! |---|---|---|---|---|---|
//! | single acks, 1 partition (4 runs) | 32.7 / 32.5 / 29.7 / 33.1 K | 35.1 / 35.3 / 30.6 / 34.3 K | 72.9 / 74.2 / 51.0 / 63.6 K (`XREADGROUP` + `XACK` each) | 48% / 48% / 60% / 54% | ≥ 70% |
//! | single acks, 4 partitions (2 runs) | 28.2 / 23.8 K | 29.5 / 29.3 K | 57.4 / 65.1 K | 51% / 45% | ≥ 70% |
//! | `ack_batch` per poll of 100, 1 partition (2 runs) | 83.2 / 83.0 K | 109.5 / 113.1 K | 404 / 424 K (one `XACK` per read) | 27% / 27% | ≥ 40% |
//! | `ack_batch` per poll of 100, 4 partitions (4 runs) | 83.7 / 83.9 / 62.3 / 82.6 K | 98.6 / 123.0 / 75.7 / 95.6 K | 434 / 429 / 330 / 447 K | 23% / 29% / 23% / 21% | ≥ 40% |
//! | a poll's 100 acks concurrent, 4 partitions (2 runs) | 81.1 / 53.5 K | 81.4 / 82.7 K | | | |
//!
//! | send → poll latency, 1,000/s | before | after | raw `XREAD BLOCK` (same runs) | target |
//! |---|---|---|---|---|
//! | p50 | 234–319 µs (6 runs) | 153 / 158 µs (quiet), 205 / 222 µs (busy) | 40–73 µs | ≤ 2× raw |
//! | p99 | 385–2,199 µs | 350–1,154 µs (one run 2,217) | 99–1,241 µs | ≤ 2× raw |
//!
//! The comparison's own queue workloads (`conveyor-bench --backends redis
//! --workload queue`, 4 partitions, now beside a raw `XREADGROUP` +
//! `XACK` baseline), after, one run: `queue/single_ack` 32.7 K msg/s, 47%
//! of raw (69.4 K); `queue/batch_ack` 87.6 K msg/s, 20% of raw (428 K).
//!
//! Where the server's time went (`INFO commandstats` on the private
//! server, `CONFIG RESETSTAT` before each case; the calls inside scripts
//! are counted too):
//!
//! - Before, single acks on one partition, 108,942 messages: 111,095
//!   `EVALSHA` (one per ack, one per poll), 14.7 µs of script time per
//!   message; inside them, per message, an `HINCRBY` (attempts, 1.8 µs),
//!   two `HDEL`s, an `HGET`, a `ZSCORE`, a `ZREM` and a `TIME`. The raw
//!   loop: 31.6 µs per `XREADGROUP` of 100, 0.44 µs per `XACK`, 1.2 µs of
//!   server time per message in all.
//! - After, same case, 115,652 messages: 60,710 `EVALSHA` (concurrent
//!   acks merged, about two per call), 13.7 µs per message; per 100 leased:
//!   one `HMGET` and one `HSET` of the attempts, one `ZADD`, one `HSET` of
//!   the tokens; per 100 acked: one `HMGET`, one `ZMSCORE`, one `ZREM`, two
//!   `HDEL`s.
//! - `ack_batch` on one partition, per message: 15.5 µs of script time
//!   before, 14.0 µs after. About half of a poll's ~0.6 ms is the calls
//!   (`XRANGE` into Lua ~45 µs per 100; a 100-field `HSET` 50–70 µs, as
//!   the lease hashes and zset sit near the 128-entry listpack limit where
//!   every insert scans), the rest the conversion of entries into Lua and
//!   back. `XREADGROUP` does the same bookkeeping in C for ~80 µs per 100.
//!
//! What changed:
//!
//! - **Acks settle in bulk** (`queue_settle.lua` "ack"): one `HMGET` of the
//!   tokens and one `ZMSCORE` check up to 100 leases, then one `ZREM` and
//!   two `HDEL`s settle those that hold; no `TIME` (an ack needs no
//!   clock). An offset given twice in one call settles once.
//! - **Concurrent single acks share a call** (`acks.rs`): the first ack of
//!   a partition goes out at once; those that arrive meanwhile (any
//!   consumer of the broker, same group) go out together when it returns.
//!   A single awaited ack is not delayed when nothing else is in flight;
//!   on 4 partitions with one consumer each little merges (paired runs
//!   with merging switched off, then on: 1 partition 31.1 → 33.0 K msg/s,
//!   4 partitions 31.9 → 29.6–30.9 K, near the noise).
//! - **A poll writes attempts with one `HMGET` and one `HSET` per 100**
//!   (an `HINCRBY` per message before).
//! - **A stream-mode poll is one round trip, not four**: the heartbeat and
//!   the reads go out together (see "How the rules hold"), and the topic's
//!   id comes from the broker's topic cache (two `HGET`s of the registry
//!   per poll before; a stale id finds no partition and is looked up
//!   again). Commits take the id from the cache the same way.
//!
//! What is missed, and why:
//!
//! - **Single acks: 45–60% of raw, target 70%.** The clients are idle
//!   most of the time (`perf` on the bench: ~30% of samples in the
//!   scheduler waiting for replies); each ack waits for the server, and
//!   the server runs one consumer's poll script (~0.6 ms for 100) while
//!   the other consumers' acks queue behind it. Closing the gap needs a
//!   cheaper poll: fewer structures per lease (deadline, token and
//!   attempts in one place, e.g. the token in the lease zset's member), a
//!   change to the lease layout every queue script shares, not attempted
//!   in this round.
//! - **`ack_batch`: 21–29% of raw, target 40%.** Same cause: ~14 µs of
//!   server time per message against ~1 µs for `XREADGROUP` + `XACK`;
//!   the script calls are now few per 100, what is left is per-entry work
//!   in Lua and the listpack-sized lease structures.
//! - **Latency: p50 ~3.5× raw, target 2×.** A poll now costs one round
//!   trip after its wake-up, but the wake-up itself is a hop raw `XREAD
//!   BLOCK` does not have (the append's `PUBLISH`, the listener's
//!   connection, then the poll's round trip), and the append is a script
//!   (~30–60 µs) where raw sends one `XADD`.
//! - **Produce and read** (targets 70% and 80% of raw) were not worked on
//!   in this round; see the first round above.
//!
//! ### Third round: one structure per lease (branch `redis-queue`)
//!
//! Same setup (a private `redis-server` 7.0.15, `save ""`, `appendonly
//! no`; 2 shared cores, load average 5–7 during the runs, so old and new
//! builds ran interleaved, each beside its raw baseline in the same run).
//! `conveyor-bench --backends redis --workload queue` (4 partitions, 4
//! consumers, polls of 100; raw: `XREADGROUP COUNT 100` + `XACK`):
//!
//! | workload | before (6 runs) | after (6 runs, interleaved with before) | before / raw | after / raw | target |
//! |---|---|---|---|---|---|
//! | `queue/single_ack` | 30.0 / 26.7 / 31.3 / 15.4 / 30.5 / 19.3 K msg/s | 44.0 / 57.7 / 45.6 / 39.6 / 24.6 / 24.9 K msg/s | 25 / 23 / 29 / 26 / 25 / 41% (median 26%) | 61 / 61 / 45 / 32 / 21 / 51% (median 48%) | ≥ 70% |
//! | `queue/batch_ack` | 66.2 / 64.6 / 63.2 / 32.2 / 70.1 / 96.4 K | 110 / 115 / 94.1 / 79.5 / 121 / 121 K | 21 / 24 / 18 / 16 / 19 / 23% (median 20%) | 33 / 34 / 31 / 31 / 32 / 34% (median 32.5%) | ≥ 40% |
//!
//! (The raw loop itself moved between 47 K and 125 K msg/s for single
//! acks over the hour, with the host's load; compare within a run.)
//!
//! What changed: a message's whole queue-mode state is one member of one
//! sorted set (see "Key layout"; leases, ready, attempts and tokens were
//! four structures); an ack is a `ZREM` of that member (~0.4 µs on the
//! server; the ack script cost ~5–25 µs, most of it the cost of running a
//! script at all); the poll's reply is one flat list, and its leases go
//! straight into the reply and one `ZADD` per 100. Server time of a poll
//! of 100 (60 polls, median, on an otherwise idle private server): ~590
//! µs before, ~305 µs after; `XREADGROUP COUNT 100` ~125 µs.
//!
//! Where a poll's ~305 µs go (the same script with parts removed):
//! `XRANGE` of 100 ~35 µs plus ~80 µs to convert its reply into Lua; the
//! per-entry loop (offset, the `g`/`d` fields) ~60 µs; the `ZADD` of 100
//! leases ~50–90 µs (each member a string of ~40 bytes); the reply's
//! conversion back ~60–120 µs. What is still missed, and why: both
//! targets, because the poll converts every record into Lua and back
//! (~2 µs a message) where `XREADGROUP` writes its PEL in C (~1.2 µs a
//! message); the rest of the single-ack gap is the client (`perf`: ~45%
//! of the bench's samples in the scheduler and socket writes, one per
//! awaited ack, as in the raw loop). The next step is a poll that does
//! not carry the records through Lua: an index of the offsets that carry
//! a delivery time or an addressed group (written by `append.lua`), so a
//! poll leases a fresh range without reading its entries, and the client
//! reads them with `XRANGE` (tried in the first round with the old
//! four-structure layout, without gain then: the lease writes dominated).
//!
//! ### Fourth round: stream mode and produce (branch `redis-speed2`)
//!
//! Same setup (a private `redis-server` 7.0.15, `save ""`, `appendonly
//! no`; 2 cores shared with other builds and benches, load average 2.5–5,
//! so builds ran interleaved, each beside its raw baseline in the same
//! run; raw swung 500–860 K msg/s for pipelined `XADD` between runs).
//! `conveyor-bench --backends redis --workload latency --workload read
//! --workload produce/batch_100 --warm-up 0.5 --measurement 2
//! --latency-seconds 3`, and `redis_latency 1000 3 3`; "after" is the
//! last commit of the round:
//!
//! | workload | before (base build, 4 runs) | after (3 runs) | raw in the after runs | after / raw | target |
//! |---|---|---|---|---|---|
//! | `read/from_start` (polls of 1,000, commit each) | 252 / 346 / 357 / 336 K (45–59%) | 544 / 515 / 536 K | 706 / 752 / 724 K | 77% / 68% / 74% | ≥ 80% |
//! | `read/deep` | 271 / 356 / 289 / 274 K (39–52%) | 532 / 537 / 534 K | 772 / 528 / 660 K | 69% / 102% / 81% | ≥ 80% |
//! | `produce/batch_100` | 330 / 357 / 364 / 350 K (41–72%) | 333 / 303 / 432 K | 507 / 803 / 805 K | 66% / 38% / 54% | ≥ 70% |
//!
//! Latency p50 (send → poll, 1,000/s), the bench's workload, 3 runs each
//! interleaved: before 375 / 326 / 307 µs (raw `XREAD BLOCK` 126 / 127 /
//! 98 µs: 3.0× / 2.6× / 3.1×), after the heartbeat change 245 / 288 / 249
//! µs (raw 110 / 100 / 94 µs: 2.2× / 2.9× / 2.6×); p99 2.7–4.4 ms before,
//! 1.3–3.0 ms after (raw 0.2–1.2 ms). `redis_latency 1000 3 3`, 6 rounds
//! each, before: p50 148–291 µs (median 185), after: 131–241 µs (median
//! 189); raw swung 32–105 µs between rounds, so the per-round ratios
//! (1.3–6.3×) say more about the machine than the build.
//!
//! What changed:
//!
//! - **A waiting stream-mode poll no longer runs the heartbeat script on
//!   every wake-up** (it did `beat(true, true)` each attempt): see "How the
//!   rules hold". `INFO commandstats` over 2,000 latency records:
//!   `EVALSHA` 6,389 → 3,525 (what is left is the 2,000 appends and the
//!   commits), `HGET` 9,053 → 3,063.
//! - **A stream-mode ack is two round trips, not four**: the topic's id
//!   comes from the broker's cache (the two `HGET`s of the registry gone;
//!   a stale id finds no bounds and is looked up again), then the bounds,
//!   then `commit.lua`. So `commit_batch` costs two round trips per
//!   partition per poll. The bounds
//!   (partition slot) and the commit (group slot) cannot be one script on
//!   a cluster.
//! - **An append without idempotency keys answers {first offset,
//!   timestamp}** instead of one `"offset:timestamp"` string per record.
//! - **A record of a value alone is stored as `t` and `v`** (no `s`, no
//!   empty `h`): 7 bulk strings per entry in an `XRANGE` reply instead of
//!   11. `perf` on the read bench put most of the client's time in the
//!   `redis` crate's reply parser and malloc; this is what lifted reads
//!   from ~50% to ~75% of raw (raw stores one field).
//! - **Then as `v` alone, the time in the entry id** (`N-<ms>`): 5 bulk
//!   strings per entry, as raw's; reads 68% → 85% of raw. An append
//!   passes such a record as two arguments (`v`, value) instead of nine:
//!   produce 61% → 81% of raw. Up to four ack pipelines of a partition in
//!   flight instead of one: ack each 58–63% → 91–106% of raw
//!   (`docs/performance-notes.md`, the server-speed round).
//!
//! What is missed, and why:
//!
//! - **Latency, p50 ~2.2–2.9× raw in the bench (target 2×).** A modest
//!   gain: the heartbeat ran concurrently with the read before, so
//!   dropping it saved server and client time, not a round trip. What
//!   remains is structural: the append is a
//!   script (~20 µs of server time where raw's `XADD` is ~4 µs), its
//!   `PUBLISH` reaches a listener connection and a task, and the poll then
//!   pays one round trip for `XRANGE`, where raw's `XREAD BLOCK` gets the
//!   entry in the reply that wakes it. Meeting 2× needs the wait itself
//!   to carry the records (a poll blocked in `XREAD BLOCK` on its owned
//!   partitions' logs on a connection of its own, cancelled on a local
//!   wake-up), not attempted here.
//! - **Produce, 38–66% of raw (target 70%); no clear gain.** `append.lua` costs ~158 µs of server time
//!   per 100 records run alone (measured before the two-field change; a
//!   bare Lua loop of 100 `XADD`s: ~128 µs);
//!   in the bench, with the client on the same two cores, `INFO
//!   commandstats` reads ~338 µs per call. What the script adds beyond the
//!   `XADD`s is small; the gap is the per-`redis.call` cost against
//!   pipelined `XADD`s, and the noise of the shared machine.
//! - **Reads, 68–102% of raw (median ~75%)**: at the 80% line; what is
//!   left is the extra `t` field per entry and the `Message` built per
//!   entry (topic name and delivery token).
//! - **Queue mode** (item 4 of the issue) was not worked on in this round.

#![deny(missing_docs)]

mod acks;
mod admin;
mod broker;
mod conn;
mod consumer;
mod group_alter;
mod keys;
mod migrate;
mod produce;
mod servers;
mod settings;
mod url;

pub use broker::RedisBroker;
/// The `redis` crate this backend is built on (for raw baselines and
/// applications' own commands next to Conveyor's).
pub use redis;
pub use url::{open_url, parse, URL_OPTIONS, URL_SCHEMES};

use conveyor_core::{BrokerOptions, Result};
use std::path::PathBuf;
use std::time::Duration;

/// Options of the Redis backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// The prefix of every key (default `conveyor`): apps sharing a server
    /// never see each other's topics and groups.
    pub namespace: String,
    /// How long a call waits for the server before it is `Unavailable`
    /// (default 30 s); [`open`] included.
    pub timeout: Duration,
    /// How often a running broker reads the server's settings again
    /// (`maxmemory-policy`, `appendonly`, `appendfsync`; default 1 s):
    /// a change that breaks the broker's durability or allows eviction
    /// stops sends within about this long (see "Server settings").
    pub settings_check: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            namespace: "conveyor".to_string(),
            timeout: Duration::from_secs(30),
            settings_check: Duration::from_secs(1),
        }
    }
}

impl RedisOptions {
    /// Set the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Set the per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Set how often the server's settings are checked while running
    /// (at least 10 ms).
    pub fn with_settings_check(mut self, every: Duration) -> Self {
        self.settings_check = every.max(Duration::from_millis(10));
        self
    }
}

/// TLS material for `rediss://` servers, as PEM files (redis-cli's
/// `--cacert`, `--cert`, `--key`). Without a CA file the system's trusted
/// roots verify the server; the server's certificate is always verified
/// (there is no insecure mode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsFiles {
    /// The CA certificate(s) that signed the server's certificate
    /// (URL option `tls_ca`).
    pub ca_file: Option<PathBuf>,
    /// A client certificate, for a server that checks clients
    /// (`tls-auth-clients yes`; URL option `tls_cert`).
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (URL option `tls_key`).
    pub key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// Set the CA file.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Set the client certificate and its key.
    pub fn with_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.cert_file = Some(cert_file.into());
        self.key_file = Some(key_file.into());
        self
    }
}

/// Where the servers are: one standalone server, or seed nodes of a
/// cluster; `rediss://` URLs connect over TLS (see [`TlsFiles`]). Its
/// `Debug` output shows the URLs without their passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct Topology {
    seeds: Vec<String>,
    cluster: bool,
    tls: TlsFiles,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seeds: Vec<String> = self
            .seeds
            .iter()
            .map(|s| conveyor_core::backend::redact_url(s))
            .collect();
        f.debug_struct("Topology")
            .field("seeds", &seeds)
            .field("cluster", &self.cluster)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Topology {
    /// One standalone server (`redis://host:port/db`, or `rediss://` for
    /// TLS).
    pub fn single(url: impl Into<String>) -> Self {
        Topology {
            seeds: vec![url.into()],
            cluster: false,
            tls: TlsFiles::default(),
        }
    }

    /// A Redis Cluster, from one or more of its nodes (`redis://host:port`
    /// or `rediss://host:port`).
    pub fn cluster(seeds: Vec<String>) -> Self {
        Topology {
            seeds,
            cluster: true,
            tls: TlsFiles::default(),
        }
    }

    /// Use these TLS files (for `rediss://` URLs).
    pub fn with_tls(mut self, tls: TlsFiles) -> Self {
        self.tls = tls;
        self
    }

    /// The URLs given.
    pub fn seeds(&self) -> &[String] {
        &self.seeds
    }

    /// Is it a cluster?
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The TLS files.
    pub fn tls(&self) -> &TlsFiles {
        &self.tls
    }
}

/// Open Conveyor on Redis.
///
/// Waits at most `redis.timeout` in all (connecting, authenticating,
/// reading the server's settings).
///
/// # Errors
/// `InvalidArgument` for a bad URL, namespace or TLS file; `Unavailable`
/// if the server cannot be reached or does not answer within the
/// timeout; `Unauthenticated` if it refuses the credentials (wrong or
/// missing password) or the TLS handshake fails (an untrusted server
/// certificate); `PermissionDenied` if the user's ACL forbids what
/// Conveyor needs; `Unsupported` if the server may evict keys
/// (`maxmemory-policy` other than `noeviction`) or `options.durability`
/// needs persistence settings the server does not have.
///
/// # Cancel safety
/// Cancel safe: dropped, nothing is left behind.
pub async fn open(
    topology: Topology,
    options: BrokerOptions,
    redis: RedisOptions,
) -> Result<RedisBroker> {
    let limit = redis.timeout;
    let shown = topology
        .seeds()
        .iter()
        .map(|s| conveyor_core::backend::redact_url(s))
        .collect::<Vec<_>>()
        .join(",");
    conveyor_core::backend::within(
        limit,
        &format!("Redis at {shown} (open)"),
        RedisBroker::open(topology, options, redis),
    )
    .await
}

/// Milliseconds of a duration, capped at 2^50 (about 35,000 years): Lua
/// numbers are doubles, exact only below 2^53, and server times are added
/// to them.
pub(crate) fn millis(d: Duration) -> u64 {
    d.as_millis().min(1u128 << 50) as u64
}
