//! §4, a group's settings: they belong to the group. The member that
//! creates it sets them; a later member never changes them (one whose
//! settings differ is refused and told which, unless it joins with
//! `JoinSettings::UseExisting`); `alter_group` changes them and running
//! members follow; describe, lag and tools that join with the group's
//! settings change nothing.
//!
//! `§N` names a section of `docs/semantics.md`;
//! quoted text is the rule a case checks. Each case's doc comment starts
//! with the sections it checks.

use crate::{expect_kind, poll_exactly, poll_n, unique, Backend, Ctx, WAIT};
use conveyor_core::prelude::*;
use conveyor_core::{
    Consumer, DlqPolicy, ErrorKind, GroupChanges, GroupConfig, JoinSettings, NackOptions,
    NackOutcome, Record, Result,
};
use std::sync::Arc;
use std::time::Duration;

/// The settings a fleet runs with in these cases: not the defaults.
fn fleet() -> GroupConfig {
    GroupConfig::queue()
        .with_visibility_timeout(Duration::from_secs(10))
        .with_dlq(DlqPolicy::new(3))
}

/// Assert `c`'s group has `fleet()`'s settings (and describe agrees, on
/// backends whose describe shows the config).
async fn assert_fleet_settings(ctx: &Ctx<'_>, group: &str, c: &dyn Consumer) -> Result<()> {
    let stored = c.group_config().await?;
    assert_eq!(stored.visibility_timeout, Duration::from_secs(10));
    assert_eq!(stored.dlq.max_deliveries, 3);
    assert_eq!(stored.mode, conveyor_core::DeliveryMode::Queue);
    if let Some(described) = ctx.broker.describe_group(group).await?.config {
        assert_eq!(described.visibility_timeout, Duration::from_secs(10));
        assert_eq!(described.dlq.max_deliveries, 3);
    }
    Ok(())
}

/// §4: "a later member never changes the group's settings; one whose
/// settings differ is refused (`InvalidArgument` naming each field, stored
/// and given)". The issue's case: a member with the defaults joining a
/// fleet of `{visibility 10 s, max_deliveries 3}`.
pub async fn differing_member_is_refused_and_changes_nothing(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("gs-differ", 1).await?;
    let group = unique("billing");
    let a = ctx.broker.consumer(&group, &[&topic], fleet()).await?;
    let e = expect_kind(
        ctx.broker
            .consumer(&group, &[&topic], GroupConfig::queue())
            .await,
        ErrorKind::InvalidArgument,
    );
    let m = e.to_string();
    assert!(m.contains(&group), "names the group: {m}");
    assert!(
        m.contains("visibility_timeout is 10s (given 30s)"),
        "names the field, stored and given: {m}"
    );
    assert!(m.contains("dlq.max_deliveries is 3 (given 5)"), "{m}");
    assert_fleet_settings(&ctx, &group, a.as_ref()).await?;
    // The same settings join; the other mode is still a mode mismatch.
    let b = ctx.broker.consumer(&group, &[&topic], fleet()).await?;
    assert_fleet_settings(&ctx, &group, b.as_ref()).await?;
    expect_kind(
        ctx.broker
            .consumer(&group, &[&topic], GroupConfig::stream())
            .await,
        ErrorKind::GroupModeMismatch,
    );
    a.close().await?;
    b.close().await?;
    Ok(())
}

/// §4: "`JoinSettings::UseExisting` joins with whatever the group has":
/// such a member gets the group's settings, in what it reports and in
/// what it does (its nack dead-letters after the group's
/// `max_deliveries`, not its own), and leaves them unchanged.
pub async fn member_using_existing_settings_gets_the_groups(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("gs-existing", 1).await?;
    let group = unique("g");
    let creator = GroupConfig::queue()
        .with_dlq(DlqPolicy::new(1))
        .with_visibility_timeout(Duration::from_secs(10));
    let a = ctx.broker.consumer(&group, &[&topic], creator).await?;
    let b = ctx
        .broker
        .consumer(
            &group,
            &[&topic],
            GroupConfig::queue().with_join_settings(JoinSettings::UseExisting),
        )
        .await?;
    for c in [&a, &b] {
        let stored = c.group_config().await?;
        assert_eq!(stored.dlq.max_deliveries, 1);
        assert_eq!(stored.visibility_timeout, Duration::from_secs(10));
    }
    ctx.producer()
        .await?
        .send(&topic, Record::new("invoice"))
        .await?;
    let m = poll_exactly(b.as_ref(), 1, Duration::ZERO).await?.remove(0);
    assert_eq!(
        b.nack(&m, NackOptions::new().with_reason("bad")).await?,
        NackOutcome::DeadLettered,
        "the group's max_deliveries (1) applies, not the joiner's default (5)"
    );
    a.close().await?;
    b.close().await?;
    Ok(())
}

/// §4, §9: "inspection never changes anything": describe, lag, list and
/// a tool joining with the group's settings (`conveyor consume` without
/// settings) leave the stored settings as they were; a member with the
/// fleet's settings still joins afterwards.
pub async fn inspection_never_changes_settings(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("gs-inspect", 2).await?;
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[&topic], fleet()).await?;
    ctx.broker.describe_group(&group).await?;
    ctx.broker.group_lag(&group).await?;
    ctx.broker.list_groups().await?;
    let tool = ctx
        .broker
        .consumer(
            &group,
            &[&topic],
            GroupConfig::queue().with_join_settings(JoinSettings::UseExisting),
        )
        .await?;
    tool.poll(1, Duration::from_millis(10)).await?;
    tool.close().await?;
    assert_fleet_settings(&ctx, &group, a.as_ref()).await?;
    let again = ctx.broker.consumer(&group, &[&topic], fleet()).await?;
    again.close().await?;
    a.close().await?;
    Ok(())
}

/// §4: "`alter_group` changes the settings; running members follow":
/// the change is returned and reported by members that joined before it;
/// members with the old settings are now refused and members with the
/// new ones join; a lease taken after it uses the new visibility timeout
/// and a failure the new `max_deliveries`; it survives a reopen.
pub async fn alter_group_changes_settings_and_members_follow(backend: &dyn Backend) -> Result<()> {
    let mut ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("gs-alter", 1).await?;
    let group = unique("g");
    let a = ctx
        .broker
        .consumer(&group, &[&topic], GroupConfig::queue())
        .await?;
    let changes = GroupChanges::new()
        .with_visibility_timeout(Duration::from_millis(400))
        .with_max_deliveries(2);
    let now = ctx.broker.alter_group(&group, changes).await?;
    assert_eq!(now.visibility_timeout, Duration::from_millis(400));
    assert_eq!(now.dlq.max_deliveries, 2);
    assert_eq!(now.session_timeout, GroupConfig::queue().session_timeout);
    let seen = a.group_config().await?;
    assert_eq!(seen.visibility_timeout, Duration::from_millis(400));
    assert_eq!(seen.dlq.max_deliveries, 2);
    if let Some(described) = ctx.broker.describe_group(&group).await?.config {
        assert_eq!(described.visibility_timeout, Duration::from_millis(400));
    }
    expect_kind(
        ctx.broker
            .consumer(&group, &[&topic], GroupConfig::queue())
            .await,
        ErrorKind::InvalidArgument,
    );
    let altered = GroupConfig::queue()
        .with_visibility_timeout(Duration::from_millis(400))
        .with_dlq(DlqPolicy::new(2));
    let b: Arc<dyn Consumer> = ctx.broker.consumer(&group, &[&topic], altered).await?;
    ctx.producer()
        .await?
        .send(&topic, Record::new("job"))
        .await?;
    let first = poll_exactly(b.as_ref(), 1, Duration::ZERO).await?.remove(0);
    assert_eq!(first.attempt, 1);
    // Not settled: the 400 ms lease expires and it comes again well within
    // WAIT (the old 30 s would not).
    let again = poll_n(b.as_ref(), 1, WAIT).await?;
    assert_eq!(
        again.len(),
        1,
        "redelivered after the new visibility timeout"
    );
    assert_eq!(again[0].attempt, 2);
    assert_eq!(
        b.nack(&again[0], NackOptions::new()).await?,
        NackOutcome::DeadLettered,
        "the new max_deliveries (2) applies"
    );
    a.close().await?;
    b.close().await?;
    if ctx.broker.capabilities().persistent {
        ctx.reopen().await?;
        let c = ctx
            .broker
            .consumer(
                &group,
                &[&topic],
                GroupConfig::queue().with_join_settings(JoinSettings::UseExisting),
            )
            .await?;
        let stored = c.group_config().await?;
        assert_eq!(stored.visibility_timeout, Duration::from_millis(400));
        assert_eq!(stored.dlq.max_deliveries, 2);
        c.close().await?;
    }
    Ok(())
}

/// §4: `alter_group` of a missing group is `GroupNotFound`; an empty or
/// invalid change is `InvalidArgument` and stores nothing.
pub async fn alter_group_refuses_bad_changes(backend: &dyn Backend) -> Result<()> {
    let ctx = Ctx::open(backend).await?;
    let topic = ctx.topic("gs-alter-bad", 1).await?;
    expect_kind(
        ctx.broker
            .alter_group(
                &unique("nobody"),
                GroupChanges::new().with_max_deliveries(3),
            )
            .await,
        ErrorKind::GroupNotFound,
    );
    let group = unique("g");
    let a = ctx.broker.consumer(&group, &[&topic], fleet()).await?;
    expect_kind(
        ctx.broker.alter_group(&group, GroupChanges::new()).await,
        ErrorKind::InvalidArgument,
    );
    expect_kind(
        ctx.broker
            .alter_group(
                &group,
                GroupChanges::new()
                    .with_max_deliveries(0)
                    .with_visibility_timeout(Duration::from_secs(1)),
            )
            .await,
        ErrorKind::InvalidArgument,
    );
    assert_fleet_settings(&ctx, &group, a.as_ref()).await?;
    a.close().await?;
    Ok(())
}
