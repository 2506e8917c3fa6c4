//! `conveyor group …`

use crate::exit::Exit;
use crate::output::{human_duration, out, out_json, table, thousands, CliError, CliResult, Format};
use crate::time::{parse_duration, parse_timestamp};
use crate::{fail, Access};
use clap::{Subcommand, ValueEnum};
use conveyor::{
    Broker, DeliveryMode, GroupChanges, GroupConfig, GroupLag, JoinSettings, RetryBackoff, SeekTo,
    StartFrom,
};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetTo {
    /// The log start.
    Earliest,
    /// The log end.
    Latest,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List groups.
    #[command(after_help = "Example:\n  conveyor group list")]
    List,
    /// Show a group's mode and per-partition progress.
    #[command(after_help = "Example:\n  conveyor group describe email")]
    Describe {
        /// Group name.
        group: String,
    },
    /// Show a group's lag as a table.
    #[command(after_help = "Example:\n  conveyor group lag email")]
    Lag {
        /// Group name.
        group: String,
    },
    /// Delete a group: its committed offsets, cursors, leases and
    /// membership (the records stay). Refused while it has live members
    /// (exit 4): stop them first, or wait for their session timeout.
    #[command(after_help = "Example:\n  conveyor group delete typo-grp\n\n\
        A group that does not exist exits 3. --format json: {group, deleted: true}.")]
    Delete {
        /// Group name.
        group: String,
    },
    /// Move a group's position (stream: committed offsets; queue: the
    /// cursor). Stop the group's members first.
    #[command(after_help = "Examples:\n  \
        conveyor group reset-offsets loyalty orders.events --to earliest\n  \
        conveyor group reset-offsets loyalty orders.events --offset 1200 --partition 3\n  \
        conveyor group reset-offsets loyalty orders.events --timestamp 2024-05-01T12:00:00Z --dry-run")]
    ResetOffsets {
        /// Group name.
        group: String,
        /// Topic whose offsets to reset.
        topic: String,
        /// Reset to the log start or end.
        #[arg(long, value_enum, conflicts_with_all = ["offset", "timestamp"])]
        to: Option<ResetTo>,
        /// Reset to this offset.
        #[arg(long, conflicts_with = "timestamp")]
        offset: Option<u64>,
        /// Reset to the first record at or after this time: milliseconds
        /// since the epoch or RFC 3339 (2024-05-01T12:00:00Z).
        #[arg(long, value_parser = parse_timestamp)]
        timestamp: Option<u64>,
        /// Only this partition.
        #[arg(long)]
        partition: Option<u32>,
        /// Show the positions it would set, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Change a group's settings (the only way to change them: a member
    /// joining with other settings is refused). Running members follow:
    /// new leases use the new visibility timeout, the next failure the new
    /// max deliveries and backoff.
    #[command(after_help = "Examples:\n  \
        conveyor group alter billing --visibility-timeout 10s --max-deliveries 3\n  \
        conveyor group alter email --retry-backoff 1s..5m --dlq-topic email.dead\n  \
        conveyor group alter email --default-dlq-topic --format json")]
    Alter {
        /// Group name.
        group: String,
        /// New visibility timeout (queue mode): 30s, 1500ms, 5m.
        #[arg(long, value_parser = parse_duration)]
        visibility_timeout: Option<Duration>,
        /// New session timeout: members silent this long are removed.
        #[arg(long, value_parser = parse_duration)]
        session_timeout: Option<Duration>,
        /// New number of deliveries before a message is dead-lettered.
        #[arg(long)]
        max_deliveries: Option<u32>,
        /// New DLQ topic.
        #[arg(long, conflicts_with = "default_dlq_topic")]
        dlq_topic: Option<String>,
        /// Go back to the default DLQ topic, `{topic}.{group}.dlq`.
        #[arg(long)]
        default_dlq_topic: bool,
        /// New retry backoff: `DELAY` (fixed) or `INITIAL..MAX` (doubling).
        #[arg(long, value_parser = parse_backoff)]
        retry_backoff: Option<RetryBackoff>,
    },
}

/// Parse `--retry-backoff`: `1s` (fixed) or `100ms..30s` (exponential,
/// doubling).
fn parse_backoff(s: &str) -> Result<RetryBackoff, String> {
    match s.split_once("..") {
        Some((initial, max)) => Ok(RetryBackoff::exponential(
            parse_duration(initial)?,
            parse_duration(max)?,
        )),
        None => Ok(RetryBackoff::fixed(parse_duration(s)?)),
    }
}

impl GroupCommand {
    pub(crate) fn access(&self) -> Access {
        match self {
            GroupCommand::ResetOffsets { dry_run: false, .. }
            | GroupCommand::Delete { .. }
            | GroupCommand::Alter { .. } => Access::Write,
            _ => Access::Read,
        }
    }
}

fn mode_name(mode: DeliveryMode) -> &'static str {
    mode.name()
}

/// Milliseconds of a duration, for `*_ms` keys.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A group's config as JSON: lower-case names, durations in `*_ms`.
fn config_json(c: &GroupConfig) -> serde_json::Value {
    json!({
        "mode": mode_name(c.mode),
        "start": match c.start {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        },
        "visibility_timeout_ms": ms(c.visibility_timeout),
        "session_timeout_ms": ms(c.session_timeout),
        "dlq": {
            "max_deliveries": c.dlq.max_deliveries,
            "topic": c.dlq.topic,
        },
        "retry_backoff": {
            "initial_ms": ms(c.retry_backoff.initial),
            "max_ms": ms(c.retry_backoff.max),
            "multiplier": c.retry_backoff.multiplier,
        },
    })
}

/// A group's settings as text lines, indented as `describe` prints.
fn settings_text(c: &GroupConfig) -> String {
    let b = &c.retry_backoff;
    [
        format!("  visibility:  {}", human_duration(c.visibility_timeout)),
        format!("  session:     {}", human_duration(c.session_timeout)),
        format!(
            "  dlq:         after {} deliveries, to {}",
            c.dlq.max_deliveries,
            c.dlq
                .topic
                .as_deref()
                .map_or("{topic}.{group}.dlq".to_string(), |t| format!("`{t}`"))
        ),
        format!(
            "  backoff:     {} growing x{} to {}",
            human_duration(b.initial),
            b.multiplier,
            human_duration(b.max)
        ),
    ]
    .join("\n")
}

/// A group's lag as JSON.
fn lag_json(lag: &GroupLag) -> serde_json::Value {
    json!({
        "group": lag.group,
        "mode": mode_name(lag.mode),
        "total_lag": lag.total_lag(),
        "total_in_flight": lag.total_in_flight(),
        "partitions": lag.partitions.iter().map(|p| json!({
            "topic": p.topic,
            "partition": p.partition,
            "committed": p.committed,
            "log_end": p.log_end,
            "lag": p.lag,
            "in_flight": p.in_flight,
            "available": p.available,
        })).collect::<Vec<_>>(),
    })
}

/// Where `target` puts a partition with these bounds.
async fn position(
    broker: &Arc<dyn Broker>,
    topic: &str,
    partition: u32,
    target: SeekTo,
) -> CliResult<u64> {
    let d = broker.describe_topic(topic).await.map_err(fail)?;
    let b = d
        .partitions
        .iter()
        .find(|b| b.partition == partition)
        .copied()
        .ok_or_else(|| format!("topic `{topic}` lost partition {partition}"))?;
    Ok(match target {
        SeekTo::Beginning => b.log_start,
        SeekTo::End => b.log_end,
        SeekTo::Offset(o) => o.clamp(b.log_start, b.log_end),
        SeekTo::Timestamp(t) => broker
            .offset_for_timestamp(topic, partition, t)
            .await
            .map_err(fail)?,
    })
}

pub async fn run(broker: &Arc<dyn Broker>, command: GroupCommand, format: Format) -> CliResult {
    match command {
        GroupCommand::List => {
            let groups = broker.list_groups().await.map_err(fail)?;
            match format {
                Format::Json => out_json(&json!(groups))?,
                Format::Text => {
                    for g in groups {
                        out(g)?;
                    }
                }
            }
        }
        GroupCommand::Describe { group } => describe(broker, &group, format).await?,
        GroupCommand::Delete { group } => {
            broker.delete_group(&group).await.map_err(fail)?;
            match format {
                Format::Json => out_json(&json!({"group": group, "deleted": true}))?,
                Format::Text => out(format!("deleted group `{group}`"))?,
            }
        }
        GroupCommand::Alter {
            group,
            visibility_timeout,
            session_timeout,
            max_deliveries,
            dlq_topic,
            default_dlq_topic,
            retry_backoff,
        } => {
            let mut changes = GroupChanges::new();
            if let Some(d) = visibility_timeout {
                changes = changes.with_visibility_timeout(d);
            }
            if let Some(d) = session_timeout {
                changes = changes.with_session_timeout(d);
            }
            if let Some(n) = max_deliveries {
                changes = changes.with_max_deliveries(n);
            }
            if let Some(t) = dlq_topic {
                changes = changes.with_dlq_topic(Some(t));
            }
            if default_dlq_topic {
                changes = changes.with_dlq_topic(None);
            }
            if let Some(b) = retry_backoff {
                changes = changes.with_retry_backoff(b);
            }
            if changes.is_empty() {
                return Err(CliError::usage(
                    "say what to change: --visibility-timeout, --session-timeout, \
                     --max-deliveries, --dlq-topic, --default-dlq-topic or --retry-backoff",
                ));
            }
            let now = broker.alter_group(&group, changes).await.map_err(fail)?;
            if format == Format::Json {
                return out_json(&json!({ "group": group, "config": config_json(&now) }));
            }
            out(format!("group `{group}`: settings changed"))?;
            out(settings_text(&now))?;
        }
        GroupCommand::Lag { group } => {
            let lag = broker.group_lag(&group).await.map_err(fail)?;
            if format == Format::Json {
                return out_json(&lag_json(&lag));
            }
            out(format!(
                "group `{}`, {} mode: total lag {}",
                lag.group,
                mode_name(lag.mode),
                thousands(lag.total_lag())
            ))?;
            out(lag_table(&lag))?;
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to,
            offset,
            timestamp,
            partition,
            dry_run,
        } => {
            let target = match (to, offset, timestamp) {
                (Some(ResetTo::Earliest), _, _) => SeekTo::Beginning,
                (Some(ResetTo::Latest), _, _) => SeekTo::End,
                (_, Some(o), _) => SeekTo::Offset(o),
                (_, _, Some(t)) => SeekTo::Timestamp(t),
                _ => {
                    return Err(CliError::usage(
                        "say where to: --to earliest|latest, --offset N or --timestamp TIME",
                    ))
                }
            };
            let partitions = broker
                .describe_topic(&topic)
                .await
                .map_err(fail)?
                .config
                .partitions;
            if let Some(p) = partition.filter(|p| *p >= partitions) {
                return Err(fail(conveyor::Error::partition_out_of_range(
                    &topic, p, partitions,
                )));
            }
            let lag = broker.group_lag(&group).await.map_err(fail)?;
            let mode = lag.mode;
            let wanted: Vec<u32> = match partition {
                Some(p) => vec![p],
                None => (0..partitions).collect(),
            };
            let mut rows = Vec::new();
            for p in &wanted {
                let now = lag
                    .partitions
                    .iter()
                    .find(|l| l.topic == topic && l.partition == *p)
                    .map(|l| l.committed);
                rows.push((*p, now, position(broker, &topic, *p, target).await?));
            }
            if !dry_run {
                reset(broker, &group, &topic, mode, &wanted, target).await?;
            }
            print_reset(&group, &topic, mode, &rows, dry_run, format)?;
        }
    }
    Ok(())
}

fn lag_table(lag: &GroupLag) -> comfy_table::Table {
    let queue = lag.mode == DeliveryMode::Queue;
    let mut header = vec!["topic", "partition", "committed", "log end", "lag"];
    if queue {
        header.extend(["in flight", "available"]);
    }
    let mut t = table(&header);
    for p in &lag.partitions {
        let mut row = vec![
            p.topic.clone(),
            p.partition.to_string(),
            p.committed.to_string(),
            p.log_end.to_string(),
            thousands(p.lag),
        ];
        if queue {
            row.extend([thousands(p.in_flight), thousands(p.available)]);
        }
        t.add_row(row);
    }
    t
}

async fn describe(broker: &Arc<dyn Broker>, group: &str, format: Format) -> CliResult {
    let d = broker.describe_group(group).await.map_err(fail)?;
    let lag = &d.lag;
    let mut topics: Vec<&str> = lag.partitions.iter().map(|p| p.topic.as_str()).collect();
    topics.dedup();
    if format == Format::Json {
        let mut doc = lag_json(lag);
        doc["topics"] = json!(topics);
        doc["generation"] = json!(d.generation);
        doc["members_visible"] = json!(d.members_visible);
        // Each member: what it reads and holds.
        doc["members"] = d
            .members
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "topics": m.topics,
                    "assignment": m.assignment.iter().map(|(topic, partition)| json!({
                        "topic": topic,
                        "partition": partition,
                    })).collect::<Vec<_>>(),
                    "leases": m.leases,
                    "idle_ms": m.idle_ms,
                })
            })
            .collect();
        doc["config"] = d.config.as_ref().map_or(json!(null), config_json);
        return out_json(&doc);
    }
    out(format!("group `{}`", lag.group))?;
    out(format!("  mode:        {}", mode_name(lag.mode)))?;
    out(format!("  topics:      {}", topics.join(", ")))?;
    if let Some(c) = &d.config {
        out(settings_text(c))?;
    }
    if lag.mode == DeliveryMode::Stream {
        out(format!("  generation:  {}", d.generation))?;
    }
    out(format!("  total lag:   {}", thousands(lag.total_lag())))?;
    if lag.mode == DeliveryMode::Queue {
        out(format!(
            "  in flight:   {} (leased to members now)",
            thousands(lag.total_in_flight())
        ))?;
    }
    if !d.members_visible {
        out(
            "  members:     not visible here (an embedded store keeps its members and leases \
             in the owning process; this is a read-only view)"
                .to_string(),
        )?;
    } else if d.members.is_empty() {
        out("  members:     none".to_string())?;
    } else {
        out(format!("  members:     {}", d.members.len()))?;
        for m in &d.members {
            let holds = match lag.mode {
                DeliveryMode::Stream => {
                    let parts: Vec<String> = m
                        .assignment
                        .iter()
                        .map(|(t, p)| format!("{t}/{p}"))
                        .collect();
                    format!(
                        "owns {}",
                        if parts.is_empty() {
                            "nothing".to_string()
                        } else {
                            parts.join(", ")
                        }
                    )
                }
                DeliveryMode::Queue => format!("holds {} leased", thousands(m.leases)),
            };
            out(format!(
                "    member {}: reads {}; {holds}; last seen {} ms ago",
                m.id,
                m.topics.join(", "),
                thousands(m.idle_ms)
            ))?;
        }
    }
    out(lag_table(lag))
}

async fn reset(
    broker: &Arc<dyn Broker>,
    group: &str,
    topic: &str,
    mode: DeliveryMode,
    wanted: &[u32],
    target: SeekTo,
) -> CliResult {
    // Join with the group's settings: a tool never changes them.
    let config = match mode {
        DeliveryMode::Stream => GroupConfig::stream(),
        DeliveryMode::Queue => GroupConfig::queue(),
    }
    .with_join_settings(JoinSettings::UseExisting);
    let consumer = broker
        .consumer(group, &[topic], config)
        .await
        .map_err(fail)?;
    let result = async {
        let owned: Vec<u32> = consumer
            .assignment()
            .await
            .map_err(fail)?
            .into_iter()
            .filter(|tp| tp.topic == topic)
            .map(|tp| tp.partition)
            .collect();
        if let Some(p) = wanted.iter().find(|p| !owned.contains(p)) {
            return Err(CliError::new(
                Exit::Conflict,
                format!("group `{group}` has active members holding {topic}/{p}: stop them first"),
            ));
        }
        for p in wanted {
            consumer.seek(topic, *p, target).await.map_err(fail)?;
            if mode == DeliveryMode::Stream {
                // Commit the position the seek chose.
                let at = position(broker, topic, *p, target).await?;
                consumer.commit(topic, *p, at).await.map_err(fail)?;
            }
        }
        Ok(())
    }
    .await;
    consumer.close().await.map_err(fail)?;
    result
}

fn print_reset(
    group: &str,
    topic: &str,
    mode: DeliveryMode,
    rows: &[(u32, Option<u64>, u64)],
    dry_run: bool,
    format: Format,
) -> CliResult {
    if format == Format::Json {
        return out_json(&json!({
            "group": group,
            "topic": topic,
            "mode": mode_name(mode),
            "dry_run": dry_run,
            "partitions": rows.iter().map(|(p, now, new)| json!({
                "partition": p, "current": now, "new": new,
            })).collect::<Vec<_>>(),
        }));
    }
    let what = match mode {
        DeliveryMode::Stream => "committed offset",
        DeliveryMode::Queue => "cursor",
    };
    out(format!(
        "group `{group}`, {} mode: {what} of `{topic}` {}",
        mode_name(mode),
        if dry_run {
            "would move (dry run: nothing changed)"
        } else {
            "moved"
        }
    ))?;
    let mut t = table(&["partition", "current", "new"]);
    for (p, now, new) in rows {
        t.add_row(vec![
            p.to_string(),
            now.map_or("-".to_string(), |n| n.to_string()),
            new.to_string(),
        ]);
    }
    out(t)
}
