-- Conveyor's PostgreSQL schema, version 1. Runs inside the URL's schema
-- (`search_path` is set on every connection), so two apps on one database
-- never see each other. Times are milliseconds since the Unix epoch on the
-- server's clock (`now_ms()`: `clock_timestamp()`, not `now()`, which is
-- frozen at the start of a transaction).

CREATE FUNCTION now_ms() RETURNS bigint
    LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

-- Topics: the config as JSON (TopicConfig), the partition count as a column.
CREATE TABLE topics (
    name text PRIMARY KEY,
    id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    partitions integer NOT NULL,
    config jsonb NOT NULL,
    retention_ms bigint,
    retention_bytes bigint
);

-- One row per partition. Appends lock it (`UPDATE .. RETURNING`) until
-- their transaction commits: appends to a partition are serialised, so
-- offsets are dense and commit in offset order (no late lower offsets).
CREATE TABLE partitions (
    topic_id bigint NOT NULL REFERENCES topics (id) ON DELETE CASCADE,
    partition integer NOT NULL,
    next_offset bigint NOT NULL DEFAULT 0,
    log_start bigint NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0,
    last_ts bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (topic_id, partition)
);

-- The log. `headers` is Conveyor's own encoding (see src/codec.rs).
CREATE TABLE records (
    topic_id bigint NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    ts bigint NOT NULL,
    key bytea,
    value bytea NOT NULL,
    headers bytea NOT NULL,
    idem text,
    deliver_at bigint,
    size bigint NOT NULL,
    PRIMARY KEY (topic_id, partition, "offset")
);
-- The dedup window is read from the records themselves.
CREATE INDEX records_idem ON records (topic_id, partition, idem) WHERE idem IS NOT NULL;
-- Seek by timestamp (timestamps never decrease within a partition).
CREATE INDEX records_ts ON records (topic_id, partition, ts);

-- Consumer groups. `config` is the GroupConfig as JSON; the columns the
-- statements need are copied out of it.
CREATE TABLE groups (
    name text PRIMARY KEY,
    mode text NOT NULL,
    config jsonb NOT NULL,
    session_ms bigint NOT NULL,
    visibility_ms bigint NOT NULL,
    max_deliveries integer NOT NULL,
    generation bigint NOT NULL DEFAULT 0
);

-- Topics a group has ever read (for lag).
CREATE TABLE group_topics (
    group_name text NOT NULL REFERENCES groups (name) ON DELETE CASCADE,
    topic text NOT NULL,
    PRIMARY KEY (group_name, topic)
);

CREATE SEQUENCE member_ids;
CREATE SEQUENCE lease_ids;

CREATE TABLE members (
    group_name text NOT NULL REFERENCES groups (name) ON DELETE CASCADE,
    member_id bigint NOT NULL,
    topics text[] NOT NULL,
    last_seen bigint NOT NULL,
    PRIMARY KEY (group_name, member_id)
);

-- Stream mode: who owns a partition, and the generation it got it in.
CREATE TABLE owners (
    group_name text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    member_id bigint NOT NULL,
    generation bigint NOT NULL,
    PRIMARY KEY (group_name, topic, partition)
);

-- Stream mode: the committed offset (next to read).
CREATE TABLE commits (
    group_name text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    committed bigint NOT NULL,
    PRIMARY KEY (group_name, topic, partition)
);

-- Queue mode: the next offset never offered to the group, per partition.
CREATE TABLE queue_cursors (
    group_name text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    next bigint NOT NULL,
    PRIMARY KEY (group_name, topic, partition)
);

-- Queue mode: every offset below the cursor that is not settled. A row
-- with a member is leased until `deadline`; a row without one is available
-- from `not_before` (a nack delay, a delivery time). Acked rows are
-- deleted.
CREATE TABLE leases (
    group_name text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    member_id bigint,
    lease_id bigint,
    deadline bigint,
    not_before bigint NOT NULL DEFAULT 0,
    attempts integer NOT NULL,
    PRIMARY KEY (group_name, topic, partition, "offset")
);

-- IdempotencyStore (contract §8).
CREATE TABLE idempotency (
    key text PRIMARY KEY,
    expires_at bigint NOT NULL
);

-- Wake waiting consumers: one notification per inserting statement, on
-- the channel `conveyor.<schema>` (delivered at commit; identical
-- notifications of one transaction are folded into one).
CREATE FUNCTION notify_append() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify('conveyor.' || TG_TABLE_SCHEMA, 'append');
    RETURN NULL;
END
$$;

CREATE TRIGGER records_notify AFTER INSERT ON records
    FOR EACH STATEMENT EXECUTE FUNCTION notify_append();
