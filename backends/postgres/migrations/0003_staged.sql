-- Conveyor's PostgreSQL schema, version 3: sends inside the caller's
-- transaction (`PgBroker::send_in`). Such a send inserts its records into
-- `staged` in the caller's transaction and takes no lock and no offset;
-- once that transaction commits, a relay of any open broker on the schema
-- moves them into the log (`relay_staged`: one statement that locks the
-- partition row for as long as the move takes, deletes the staged rows and
-- appends them, so each staged record is appended exactly once). A
-- rollback leaves no row, no offset and no lock behind; a transaction left
-- open holds up nobody else's send.

CREATE TABLE staged (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic_id bigint NOT NULL,
    partition integer NOT NULL,
    key bytea,
    value bytea NOT NULL,
    headers bytea NOT NULL,
    idem text,
    deliver_at bigint,
    size bigint NOT NULL,
    -- When `send_in` was called, on the producer's clock: a delivery time
    -- is moved onto the server's clock against it, as `APPEND` does.
    sent_at bigint NOT NULL,
    -- The topic's dedup window when staged (for records with `idem`).
    dedup_ms bigint NOT NULL,
    -- The staging transaction: its records move together.
    tx xid8 NOT NULL DEFAULT pg_current_xact_id()
);
-- The relay takes a partition's staged rows by transaction, then in
-- staging order.
CREATE INDEX staged_partition ON staged (topic_id, partition, tx, id);

-- Wake the relays: one notification per inserting statement, delivered
-- when the caller's transaction commits (never for a rollback).
CREATE FUNCTION notify_staged() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify('conveyor.' || TG_TABLE_SCHEMA, 'staged');
    RETURN NULL;
END
$$;

CREATE TRIGGER staged_notify AFTER INSERT ON staged
    FOR EACH STATEMENT EXECUTE FUNCTION notify_staged();

-- Move the committed staged records of up to `p_max` transactions of
-- (`p_topic`, `p_partition`) into the log, each transaction's records
-- together and in staging order; returns how many staged rows were
-- taken. The partition row is locked first, so relays of one
-- partition (from any broker) and ordinary appends to it take turns, and
-- the rows are read after the lock: a row is moved by exactly one relay.
-- A record whose idempotency key was appended to the partition within
-- its dedup window, or earlier in the same move, is dropped (contract
-- §3). A partition that no longer exists (its topic was deleted) has its
-- staged rows dropped.
CREATE FUNCTION relay_staged(p_topic bigint, p_partition integer, p_max integer)
    RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    moved integer;
BEGIN
    PERFORM 1 FROM partitions WHERE topic_id = p_topic AND partition = p_partition FOR UPDATE;
    IF NOT FOUND THEN
        DELETE FROM staged WHERE topic_id = p_topic AND partition = p_partition;
        GET DIAGNOSTICS moved = ROW_COUNT;
        RETURN moved;
    END IF;
    WITH taken AS MATERIALIZED (
        DELETE FROM staged s
         WHERE s.topic_id = p_topic AND s.partition = p_partition
           AND s.tx IN (SELECT DISTINCT tx FROM staged
                         WHERE topic_id = p_topic AND partition = p_partition
                         ORDER BY tx LIMIT p_max)
        RETURNING s.tx, s.id, s.key, s.value, s.headers, s.idem, s.deliver_at, s.size, s.sent_at,
                  s.dedup_ms),
    fresh AS MATERIALIZED (
        SELECT t.*, row_number() OVER (ORDER BY t.tx, t.id) AS i
          FROM taken t
         WHERE t.idem IS NULL
            OR (NOT EXISTS (SELECT 1 FROM records r
                             WHERE r.topic_id = p_topic AND r.partition = p_partition
                               AND r.idem = t.idem AND r.ts >= now_ms() - t.dedup_ms)
                AND NOT EXISTS (SELECT 1 FROM taken u
                                WHERE u.idem = t.idem AND (u.tx, u.id) < (t.tx, t.id)))),
    n AS (SELECT count(*) AS cnt, coalesce(sum(f.size), 0) AS total FROM fresh f),
    p AS (
        UPDATE partitions q
           SET next_offset = q.next_offset + n.cnt,
               last_ts = greatest(q.last_ts, now_ms()),
               bytes = q.bytes + n.total
          FROM n
         WHERE q.topic_id = p_topic AND q.partition = p_partition AND n.cnt > 0
        RETURNING q.next_offset - n.cnt AS base, q.last_ts AS ts),
    ins AS (
        INSERT INTO records (topic_id, partition, "offset", ts, key, value, headers, idem,
                             deliver_at, size)
        SELECT p_topic, p_partition, p.base + f.i - 1, p.ts, f.key, f.value, f.headers, f.idem,
               f.deliver_at + (p.ts - f.sent_at), f.size
          FROM p, fresh f)
    SELECT count(*) INTO moved FROM taken;
    RETURN moved;
END
$$;
