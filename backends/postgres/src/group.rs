//! Group membership in the server: join, heartbeat, session expiry,
//! leave, and the stream-mode rebalance with core's sticky [`assign`],
//! each decided under the group row's lock (`SELECT .. FOR UPDATE`).

use crate::broker::{config_json, Inner};
use crate::consumer::PgConsumer;
use crate::error::during;
use conveyor_core::backend::{assign, validate, MemberSubscription};
use conveyor_core::{
    DeliveryMode, Error, ErrorKind, GroupConfig, JoinSettings, Result, StartFrom, TopicPartition,
};
use sqlx::{PgConnection, Row};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::millis;

/// Join `group` for `topics` (contract §4): create the group on first use
/// (its mode is fixed then), start topics new to it where its `start`
/// says, add the member and rebalance.
pub(crate) async fn join(
    inner: &Arc<Inner>,
    group: &str,
    topics: &[&str],
    config: GroupConfig,
) -> Result<PgConsumer> {
    validate::join(group, topics, &config)?;
    let mut names = BTreeSet::new();
    for t in topics {
        inner.topic_or_create(t).await?;
        names.insert(t.to_string());
    }
    let what = format!("join group `{group}`");
    let mut tx = crate::tx::Tx::begin(&inner.pool)
        .await
        .map_err(during(&what))?;
    // The creator's settings are stored; a later member never changes
    // them (contract §4): it must bring the same ones, or join with the
    // group's (`JoinSettings::UseExisting`).
    let mut stored_config = config.clone();
    stored_config.join = JoinSettings::MustMatch;
    let created = sqlx::query(
        "INSERT INTO groups (name, mode, config, session_ms, visibility_ms, max_deliveries)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
    )
    .bind(group)
    .bind(config.mode.name())
    .bind(config_json(&stored_config)?)
    .bind(millis(config.session_timeout))
    .bind(millis(config.visibility_timeout))
    .bind(config.dlq.max_deliveries.min(i32::MAX as u32) as i32)
    .execute(&mut *tx)
    .await
    .map_err(during(&what))?
    .rows_affected()
        == 1;
    let row = sqlx::query("SELECT mode, config FROM groups WHERE name = $1 FOR UPDATE")
        .bind(group)
        .fetch_one(&mut *tx)
        .await
        .map_err(during(&what))?;
    let mode = DeliveryMode::parse(row.get(0))?;
    if mode != config.mode {
        return Err(Error::new(
            ErrorKind::GroupModeMismatch,
            format!(
                "group `{group}` is a {mode:?}-mode group; cannot join it in {:?} mode",
                config.mode
            ),
        ));
    }
    let effective: GroupConfig = serde_json::from_value(row.get(1))
        .map_err(|e| Error::internal(format!("{what}: stored config is unreadable: {e}")))?;
    if !created {
        conveyor_core::group_settings::check_join(group, &effective, &config)?;
    }
    let list: Vec<String> = names.iter().cloned().collect();
    let found: Vec<String> = sqlx::query_scalar("SELECT name FROM topics WHERE name = ANY($1)")
        .bind(&list)
        .fetch_all(&mut *tx)
        .await
        .map_err(during(&what))?;
    if let Some(t) = list.iter().find(|t| !found.contains(t)) {
        return Err(Error::topic_not_found(t));
    }
    let new_topics: Vec<String> = sqlx::query_scalar(
        "INSERT INTO group_topics (group_name, topic) SELECT $1, unnest($2::text[])
         ON CONFLICT DO NOTHING RETURNING topic",
    )
    .bind(group)
    .bind(&list)
    .fetch_all(&mut *tx)
    .await
    .map_err(during(&what))?;
    if !new_topics.is_empty() {
        let latest = effective.start == StartFrom::Latest;
        let start = if latest {
            "p.next_offset"
        } else {
            "p.log_start"
        };
        let sql = match mode {
            DeliveryMode::Stream if latest => Some(format!(
                "INSERT INTO commits (group_name, topic, partition, committed)
                 SELECT $1, t.name, p.partition, {start} FROM topics t JOIN partitions p ON p.topic_id = t.id
                  WHERE t.name = ANY($2) ON CONFLICT DO NOTHING"
            )),
            DeliveryMode::Stream => None,
            _ => Some(format!(
                "INSERT INTO queue_cursors (group_name, topic, partition, next)
                 SELECT $1, t.name, p.partition, {start} FROM topics t JOIN partitions p ON p.topic_id = t.id
                  WHERE t.name = ANY($2) ON CONFLICT DO NOTHING"
            )),
        };
        if let Some(sql) = sql {
            sqlx::query(&sql)
                .bind(group)
                .bind(&new_topics)
                .execute(&mut *tx)
                .await
                .map_err(during(&what))?;
        }
    }
    let member: i64 = sqlx::query_scalar(
        "INSERT INTO members (group_name, member_id, topics, last_seen)
         VALUES ($1, nextval('member_ids'), $2, now_ms()) RETURNING member_id",
    )
    .bind(group)
    .bind(&list)
    .fetch_one(&mut *tx)
    .await
    .map_err(during(&what))?;
    rebalance(&mut tx, group).await?;
    // The handle exists before the commit: dropped from here on, it leaves.
    let consumer = PgConsumer::new(
        inner.clone(),
        group,
        member,
        names,
        mode,
        effective.session_timeout,
    );
    tx.commit().await.map_err(during(&what))?;
    inner.wake();
    tracing::debug!(group, member, ?topics, ?mode, "member joined");
    Ok(consumer)
}

/// Heartbeat of one member, and expiry of the silent ones; returns the
/// group's session timeout (as stored: the creator's, or `alter_group`'s). The fast path
/// is one statement (this member is fresh, nobody expired); otherwise the
/// group row is locked, silent members are removed (their leases
/// released), this member joins again if `rejoin` and it was removed, and
/// stream-mode groups rebalance.
pub(crate) async fn heartbeat(
    inner: &Inner,
    group: &str,
    member: i64,
    topics: &[String],
    rejoin: bool,
) -> Result<Duration> {
    let what = format!("heartbeat in group `{group}`");
    let row = sqlx::query(
        r#"WITH g AS (SELECT session_ms FROM groups WHERE name = $1),
                me AS (UPDATE members m SET last_seen = now_ms() FROM g
                        WHERE m.group_name = $1 AND m.member_id = $2
                          AND m.last_seen + g.session_ms >= now_ms() RETURNING 1)
           SELECT (SELECT count(*) FROM g), (SELECT count(*) FROM me), (SELECT session_ms FROM g),
                  (SELECT count(*) FROM members m, g WHERE m.group_name = $1 AND m.member_id <> $2
                      AND m.last_seen + g.session_ms < now_ms())"#,
    )
    .bind(group)
    .bind(member)
    .fetch_one(&inner.pool)
    .await
    .map_err(during(&what))?;
    let (exists, present, session, expired): (i64, i64, Option<i64>, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let session = Duration::from_millis(session.unwrap_or(0).max(0) as u64);
    if exists == 0 {
        return Err(Error::new(
            ErrorKind::GroupNotFound,
            format!("group `{group}` no longer exists"),
        ));
    }
    if present == 1 && expired == 0 {
        return Ok(session);
    }
    let mut tx = crate::tx::Tx::begin(&inner.pool)
        .await
        .map_err(during(&what))?;
    lock_group(&mut tx, group).await?;
    let gone: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM members m USING groups g WHERE g.name = m.group_name AND m.group_name = $1
           AND m.last_seen + g.session_ms < now_ms() RETURNING m.member_id",
    )
    .bind(group)
    .fetch_all(&mut *tx)
    .await
    .map_err(during(&what))?;
    let mut changed = !gone.is_empty();
    if changed {
        release_leases(&mut tx, group, &gone).await?;
        tracing::debug!(group, ?gone, "members expired (session timeout)");
    }
    let updated = sqlx::query(
        "UPDATE members SET last_seen = now_ms() WHERE group_name = $1 AND member_id = $2",
    )
    .bind(group)
    .bind(member)
    .execute(&mut *tx)
    .await
    .map_err(during(&what))?
    .rows_affected();
    if updated == 0 && rejoin {
        sqlx::query(
            "INSERT INTO members (group_name, member_id, topics, last_seen) VALUES ($1, $2, $3, now_ms())",
        )
        .bind(group)
        .bind(member)
        .bind(topics)
        .execute(&mut *tx)
        .await
        .map_err(during(&what))?;
        changed = true;
    }
    if changed {
        rebalance(&mut tx, group).await?;
    }
    tx.commit().await.map_err(during(&what))?;
    if changed {
        inner.wake();
    }
    Ok(session)
}

/// Leases of members that left become available now (attempts kept).
async fn release_leases(tx: &mut PgConnection, group: &str, members: &[i64]) -> Result<()> {
    sqlx::query(
        "UPDATE leases SET deadline = now_ms() WHERE group_name = $1 AND member_id = ANY($2)
           AND deadline > now_ms()",
    )
    .bind(group)
    .bind(members)
    .execute(&mut *tx)
    .await
    .map_err(during(format!("release leases in group `{group}`")))?;
    Ok(())
}

/// Remove a member at once (close, or its handle dropped) and rebalance.
pub(crate) async fn leave(inner: &Inner, group: &str, member: i64) -> Result<()> {
    let what = format!("leave group `{group}`");
    let mut tx = crate::tx::Tx::begin(&inner.pool)
        .await
        .map_err(during(&what))?;
    if !lock_group(&mut tx, group).await? {
        return Ok(());
    }
    let removed = sqlx::query("DELETE FROM members WHERE group_name = $1 AND member_id = $2")
        .bind(group)
        .bind(member)
        .execute(&mut *tx)
        .await
        .map_err(during(&what))?
        .rows_affected();
    if removed > 0 {
        release_leases(&mut tx, group, &[member]).await?;
        rebalance(&mut tx, group).await?;
    }
    tx.commit().await.map_err(during(&what))?;
    inner.wake();
    Ok(())
}

/// Lock the group row (every membership change of a group is decided
/// under it); false if the group does not exist.
async fn lock_group(tx: &mut PgConnection, group: &str) -> Result<bool> {
    let row = sqlx::query("SELECT 1 FROM groups WHERE name = $1 FOR UPDATE")
        .bind(group)
        .fetch_optional(&mut *tx)
        .await
        .map_err(during(format!("lock group `{group}`")))?;
    Ok(row.is_some())
}

/// Lock the group row, then [`rebalance`].
pub(crate) async fn lock_and_rebalance(tx: &mut PgConnection, group: &str) -> Result<()> {
    if lock_group(tx, group).await? {
        rebalance(tx, group).await?;
    }
    Ok(())
}

/// Stream mode: recompute ownership with core's sticky [`assign`] over the
/// partitions of the topics members read, bump the generation, and write
/// only the owners that changed (a partition that stays keeps the
/// generation it was got in). Queue-mode groups have no owners. The caller
/// holds the group row's lock.
pub(crate) async fn rebalance(tx: &mut PgConnection, group: &str) -> Result<()> {
    let what = format!("rebalance group `{group}`");
    let row = sqlx::query("SELECT mode, generation FROM groups WHERE name = $1")
        .bind(group)
        .fetch_one(&mut *tx)
        .await
        .map_err(during(&what))?;
    if DeliveryMode::parse(row.get(0))? != DeliveryMode::Stream {
        return Ok(());
    }
    let generation = row.get::<i64, _>(1) + 1;
    let members: Vec<MemberSubscription<i64>> =
        sqlx::query("SELECT member_id, topics FROM members WHERE group_name = $1")
            .bind(group)
            .fetch_all(&mut *tx)
            .await
            .map_err(during(&what))?
            .iter()
            .map(|r| MemberSubscription {
                member: r.get(0),
                topics: r.get::<Vec<String>, _>(1).into_iter().collect(),
            })
            .collect();
    let topics: Vec<String> = members
        .iter()
        .flat_map(|m| m.topics.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let partitions: Vec<TopicPartition> = sqlx::query(
        "SELECT t.name, p.partition FROM topics t JOIN partitions p ON p.topic_id = t.id
          WHERE t.name = ANY($1) ORDER BY t.name, p.partition",
    )
    .bind(&topics)
    .fetch_all(&mut *tx)
    .await
    .map_err(during(&what))?
    .iter()
    .map(|r| TopicPartition::new(r.get::<String, _>(0), r.get::<i32, _>(1) as u32))
    .collect();
    let current: BTreeMap<TopicPartition, (i64, i64)> = sqlx::query(
        "SELECT topic, partition, member_id, generation FROM owners WHERE group_name = $1",
    )
    .bind(group)
    .fetch_all(&mut *tx)
    .await
    .map_err(during(&what))?
    .iter()
    .map(|r| {
        (
            TopicPartition::new(r.get::<String, _>(0), r.get::<i32, _>(1) as u32),
            (r.get(2), r.get(3)),
        )
    })
    .collect();
    let owners: BTreeMap<TopicPartition, i64> = current
        .iter()
        .map(|(tp, (m, _))| (tp.clone(), *m))
        .collect();
    let next = assign(&partitions, &owners, &members);
    let (mut del_t, mut del_p) = (Vec::new(), Vec::new());
    for tp in current.keys() {
        if next.get(tp) != owners.get(tp) {
            del_t.push(tp.topic.clone());
            del_p.push(tp.partition as i32);
        }
    }
    let (mut ins_t, mut ins_p, mut ins_m) = (Vec::new(), Vec::new(), Vec::new());
    for (tp, m) in &next {
        if owners.get(tp) != Some(m) {
            ins_t.push(tp.topic.clone());
            ins_p.push(tp.partition as i32);
            ins_m.push(*m);
        }
    }
    sqlx::query("UPDATE groups SET generation = $2 WHERE name = $1")
        .bind(group)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(during(&what))?;
    sqlx::query(
        "DELETE FROM owners o USING unnest($2::text[], $3::int[]) AS d(topic, partition)
          WHERE o.group_name = $1 AND o.topic = d.topic AND o.partition = d.partition",
    )
    .bind(group)
    .bind(&del_t)
    .bind(&del_p)
    .execute(&mut *tx)
    .await
    .map_err(during(&what))?;
    sqlx::query(
        "INSERT INTO owners (group_name, topic, partition, member_id, generation)
         SELECT $1, i.topic, i.partition, i.member_id, $5
           FROM unnest($2::text[], $3::int[], $4::bigint[]) AS i(topic, partition, member_id)",
    )
    .bind(group)
    .bind(&ins_t)
    .bind(&ins_p)
    .bind(&ins_m)
    .bind(generation)
    .execute(&mut *tx)
    .await
    .map_err(during(&what))?;
    tracing::debug!(group, generation, moved = ins_t.len(), "rebalanced");
    Ok(())
}
