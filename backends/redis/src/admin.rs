//! Group deletion and the readiness ping.
//!
//! A group's keys live in two places: its own slot (meta, members,
//! owners, commits; deleted by `group_delete.lua`, which refuses while a
//! member is live) and each partition it read in queue mode (cursor,
//! leases, dead letters waiting for their move; deleted next, partition by
//! partition). The registry entry goes last, so a delete cut midway leaves
//! the group listed and a second call finishes it.

use crate::broker::Inner;
use crate::conn::{during, reply, SCRIPTS};
use conveyor_core::backend::validate;
use conveyor_core::{Error, Result};

/// Delete `group` and everything it keeps, unless it has live members.
pub(crate) async fn delete_group(inner: &Inner, group: &str) -> Result<()> {
    inner.check_open()?;
    validate::group_name(group)?;
    let what = format!("delete group `{group}`");
    let k = inner.group_keys(group);
    let got: Vec<redis::Value> = SCRIPTS
        .group_delete
        .key(&k.meta)
        .key(&k.members)
        .key(&k.subs)
        .key(&k.topics)
        .key(&k.owners)
        .key(&k.commits)
        .invoke_async(&mut inner.conn())
        .await
        .map_err(during(&what))?;
    let mut got = got.into_iter().map(reply::string);
    let status = got
        .next()
        .ok_or_else(|| Error::internal(format!("{what}: empty reply")))??;
    let rest: Vec<String> = got.collect::<Result<_>>()?;
    let topics = match status.as_str() {
        "live" => return Err(Error::group_not_empty(group, &rest)),
        "deleted" => rest,
        // Listed without meta: a delete cut after its first step.
        _ if is_listed(inner, group, &what).await? => Vec::new(),
        _ => return Err(Error::group_not_found(group)),
    };
    let mut c = inner.conn();
    for topic in topics {
        let Some(t) = inner.topic(&topic).await? else {
            continue;
        };
        for p in 0..t.config.partitions {
            let part = inner.part(t.id, p);
            redis::cmd("DEL")
                .arg(&part.queue(group).all()[..])
                .query_async::<i64>(&mut c)
                .await
                .map_err(during(&what))?;
            redis::cmd("SREM")
                .arg(&part.groups)
                .arg(group)
                .query_async::<i64>(&mut c)
                .await
                .map_err(during(&what))?;
        }
    }
    redis::cmd("SREM")
        .arg(&inner.registry.groups)
        .arg(group)
        .query_async::<i64>(&mut c)
        .await
        .map_err(during(&what))?;
    // A member that joined meanwhile created the group again (and listed
    // it before our SREM): list it again.
    let again: bool = redis::cmd("EXISTS")
        .arg(&k.meta)
        .query_async(&mut c)
        .await
        .map_err(during(&what))?;
    if again {
        SCRIPTS
            .group_register
            .key(&inner.registry.groups)
            .arg(group)
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(during(&what))?;
    }
    inner.wake();
    Ok(())
}

async fn is_listed(inner: &Inner, group: &str, what: &str) -> Result<bool> {
    redis::cmd("SISMEMBER")
        .arg(&inner.registry.groups)
        .arg(group)
        .query_async(&mut inner.conn())
        .await
        .map_err(during(what))
}

/// `PING`; on a cluster the driver sends it to every master and needs
/// every answer.
pub(crate) async fn ping(inner: &Inner) -> Result<()> {
    inner.check_open()?;
    redis::cmd("PING")
        .query_async::<redis::Value>(&mut inner.conn())
        .await
        .map_err(during("ping"))?;
    Ok(())
}
