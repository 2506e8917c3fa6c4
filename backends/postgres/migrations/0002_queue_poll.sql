-- Conveyor's PostgreSQL schema, version 2: a queue-mode poll is one
-- statement (`queue_poll`), so the row lock on a partition's cursor is
-- held while the server runs it, never across a round trip to the
-- client; seeking by timestamp searches the offsets (timestamps never
-- decrease within a partition) instead of keeping a second index on
-- every record.

-- The poll that took a lease (the member's own poll number): a poll
-- dropped before its answer arrived gives back exactly what it took.
ALTER TABLE leases ADD COLUMN poll bigint;

-- Appends no longer write an index entry per record for timestamps.
DROP INDEX records_ts;

-- The first offset of (`p_topic`, `p_partition`) whose timestamp is at
-- least `p_ts`, at or above `p_from`, below `p_to` (`p_to` if none): a
-- binary search over the primary key, about 20 index lookups for a
-- million records.
CREATE FUNCTION offset_for_ts(p_topic bigint, p_partition integer, p_ts bigint,
                              p_from bigint, p_to bigint)
    RETURNS bigint
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
    lo bigint := p_from;
    hi bigint := p_to;
    mid bigint;
    t bigint;
BEGIN
    -- Invariant: every offset below `lo` is older than `p_ts`, and `hi`
    -- is the log end or at least as new.
    WHILE lo < hi LOOP
        mid := lo + (hi - lo) / 2;
        SELECT r.ts INTO t FROM records r
         WHERE r.topic_id = p_topic AND r.partition = p_partition AND r."offset" >= mid
         ORDER BY r."offset" LIMIT 1;
        IF NOT FOUND THEN
            RETURN p_to;
        ELSIF t >= p_ts THEN
            hi := mid;
        ELSE
            lo := mid + 1;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;

-- One queue-mode poll of `p_group` on `p_topics` for member `p_member`
-- (its poll number `p_poll`): up to `p_max` messages, redeliveries
-- first (nacked after their delay, expired below the delivery limit),
-- then fresh offsets taken from the partitions' cursors, starting at the
-- `p_rotate`-th partition. Delayed records are entered as not leased,
-- available at their delivery time. Returns one row per leased message,
-- with its record (`r_value` null: the record was removed by retention;
-- the caller settles such a lease).
--
-- Cursors are locked `SKIP LOCKED` first; a poll that took no cursor and
-- found one locked waits for it (holding no other cursor, so no two polls
-- wait for each other), rather than coming back empty while work waits.
-- Raises P0002 when the group does not exist.
CREATE FUNCTION queue_poll(p_group text, p_topics text[], p_max integer, p_member bigint,
                           p_poll bigint, p_rotate integer)
    RETURNS TABLE (r_topic text, r_partition integer, r_offset bigint, r_lease bigint,
                   r_attempts integer, r_ts bigint, r_key bytea, r_value bytea,
                   r_headers bytea, r_idem text, r_deliver_at bigint)
    LANGUAGE plpgsql
    AS $$
DECLARE
    t_now bigint := now_ms();
    g record;
    c record;
    taken integer := 0;
    got integer;
    names text[];
    ids bigint[];
    parts integer[];
    missing boolean[];
    skipped integer[] := '{}';
    locked boolean := false;
    n integer;
    i integer;
    k integer;
    pass integer;
    cur bigint;
    upto bigint;
    p_start bigint;
    p_end bigint;
BEGIN
    SELECT visibility_ms, max_deliveries INTO g FROM groups WHERE name = p_group;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'group `%` does not exist', p_group USING ERRCODE = 'P0002';
    END IF;

    -- 1. Redeliveries: nacked (after their delay), expired, delayed.
    RETURN QUERY
    WITH due AS (
        SELECT l.topic, l.partition, l."offset" FROM leases l
         WHERE l.group_name = p_group AND l.topic = ANY(p_topics)
           AND ((l.member_id IS NULL AND l.not_before <= t_now)
             OR (l.member_id IS NOT NULL AND l.deadline <= t_now AND l.attempts < g.max_deliveries))
         ORDER BY l.topic, l.partition, l."offset" LIMIT p_max FOR UPDATE SKIP LOCKED),
    u AS (
        UPDATE leases l SET member_id = p_member, lease_id = nextval('lease_ids'), poll = p_poll,
               deadline = t_now + g.visibility_ms, attempts = l.attempts + 1, not_before = 0
          FROM due
         WHERE l.group_name = p_group AND l.topic = due.topic AND l.partition = due.partition
           AND l."offset" = due."offset"
        RETURNING l.topic, l.partition, l."offset", l.lease_id, l.attempts)
    SELECT u.topic, u.partition, u."offset", u.lease_id, u.attempts,
           r.ts, r.key, r.value, r.headers, r.idem, r.deliver_at
      FROM u JOIN topics t ON t.name = u.topic
      LEFT JOIN records r ON r.topic_id = t.id AND r.partition = u.partition
                         AND r."offset" = u."offset";
    GET DIAGNOSTICS got = ROW_COUNT;
    taken := taken + got;
    IF taken >= p_max THEN
        RETURN;
    END IF;

    -- 2. Fresh offsets: the partitions with records past the cursor.
    SELECT array_agg(t.name ORDER BY t.name, p.partition),
           array_agg(t.id ORDER BY t.name, p.partition),
           array_agg(p.partition ORDER BY t.name, p.partition),
           array_agg(q.next IS NULL ORDER BY t.name, p.partition)
      INTO names, ids, parts, missing
      FROM topics t JOIN partitions p ON p.topic_id = t.id
      LEFT JOIN queue_cursors q ON q.group_name = p_group AND q.topic = t.name
                               AND q.partition = p.partition
     WHERE t.name = ANY(p_topics) AND greatest(coalesce(q.next, 0), p.log_start) < p.next_offset;
    n := coalesce(array_length(names, 1), 0);
    FOR pass IN 1..2 LOOP
        FOR k IN 0..n - 1 LOOP
            EXIT WHEN taken >= p_max;
            i := (p_rotate + k) % n + 1;
            IF pass = 1 THEN
                IF missing[i] THEN
                    INSERT INTO queue_cursors AS q (group_name, topic, partition, next)
                    SELECT p_group, names[i], parts[i], p.log_start FROM partitions p
                     WHERE p.topic_id = ids[i] AND p.partition = parts[i]
                    ON CONFLICT DO NOTHING;
                END IF;
                SELECT q.next INTO cur FROM queue_cursors q
                 WHERE q.group_name = p_group AND q.topic = names[i] AND q.partition = parts[i]
                   FOR UPDATE SKIP LOCKED;
                IF NOT FOUND THEN
                    skipped := skipped || i;
                    CONTINUE;
                END IF;
            ELSIF NOT locked AND i = ANY(skipped) THEN
                -- Wait for the cursor another poll holds (for as long as
                -- that poll's statement runs).
                SELECT q.next INTO cur FROM queue_cursors q
                 WHERE q.group_name = p_group AND q.topic = names[i] AND q.partition = parts[i]
                   FOR UPDATE;
            ELSE
                CONTINUE;
            END IF;
            locked := true;
            -- The partition as committed now (appends to it commit in
            -- offset order, so every record below its end is visible).
            SELECT p.log_start, p.next_offset INTO p_start, p_end FROM partitions p
             WHERE p.topic_id = ids[i] AND p.partition = parts[i];
            cur := greatest(cur, p_start);
            upto := least(p_end, cur + (p_max - taken));
            CONTINUE WHEN cur >= upto;
            -- Lease what is due now; delayed records wait, not leased,
            -- until their delivery time. No lease exists at or past a
            -- cursor (only this statement, holding the cursor, adds
            -- leases; a seek takes the cursor before it deletes them).
            RETURN QUERY
            WITH r AS MATERIALIZED (
                SELECT r."offset", r.ts, r.key, r.value, r.headers, r.idem, r.deliver_at,
                       CASE WHEN coalesce(r.deliver_at > t_now, false) THEN NULL
                            ELSE nextval('lease_ids') END AS lease
                  FROM records r
                 WHERE r.topic_id = ids[i] AND r.partition = parts[i]
                   AND r."offset" >= cur AND r."offset" < upto
                 ORDER BY r."offset"),
            ins AS (
                INSERT INTO leases (group_name, topic, partition, "offset", member_id, lease_id,
                                    poll, deadline, not_before, attempts)
                SELECT p_group, names[i], parts[i], r."offset",
                       CASE WHEN r.lease IS NULL THEN NULL ELSE p_member END,
                       r.lease,
                       CASE WHEN r.lease IS NULL THEN NULL ELSE p_poll END,
                       CASE WHEN r.lease IS NULL THEN NULL ELSE t_now + g.visibility_ms END,
                       CASE WHEN r.lease IS NULL THEN r.deliver_at ELSE 0 END,
                       CASE WHEN r.lease IS NULL THEN 0 ELSE 1 END
                  FROM r)
            SELECT names[i], parts[i], r."offset", r.lease, 1,
                   r.ts, r.key, r.value, r.headers, r.idem, r.deliver_at
              FROM r WHERE r.lease IS NOT NULL
             ORDER BY r."offset";
            GET DIAGNOSTICS got = ROW_COUNT;
            taken := taken + got;
            UPDATE queue_cursors q SET next = upto
             WHERE q.group_name = p_group AND q.topic = names[i] AND q.partition = parts[i];
        END LOOP;
        EXIT WHEN locked OR cardinality(skipped) = 0;
    END LOOP;
END
$$;
