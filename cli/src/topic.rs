//! `conveyor topic …`

use crate::output::{
    count, human_duration, out, out_json, table, thousands, CliError, CliResult, Format,
};
use crate::{fail, Access};
use clap::Subcommand;
use conveyor::{Broker, Retention, TopicConfig, TopicDescription};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic (a no-op if it exists with the same config).
    #[command(
        after_help = "Example:\n  conveyor topic create orders.events --partitions 8 --retention-hours 168"
    )]
    Create {
        /// Topic name: 1-249 characters of [A-Za-z0-9._-].
        name: String,
        /// Number of partitions (1-10000).
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Delete records older than this many hours.
        #[arg(long)]
        retention_hours: Option<u64>,
        /// Keep at most this many bytes per partition.
        #[arg(long)]
        retention_bytes: Option<u64>,
        /// Largest record in bytes (key + value + headers).
        #[arg(long)]
        max_message_bytes: Option<usize>,
    },
    /// List topics.
    #[command(after_help = "Example:\n  conveyor topic list")]
    List,
    /// Show partitions with log start, log end and bytes.
    #[command(after_help = "Example:\n  conveyor topic describe orders.events")]
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and its records.
    #[command(after_help = "Example:\n  conveyor topic delete orders.events")]
    Delete {
        /// Topic name.
        name: String,
    },
    /// Grow a topic to this many partitions.
    #[command(
        after_help = "Example:\n  conveyor topic add-partitions orders.events --partitions 16"
    )]
    AddPartitions {
        /// Topic name.
        name: String,
        /// The new total partition count.
        #[arg(long)]
        partitions: u32,
    },
}

impl TopicCommand {
    pub(crate) fn access(&self) -> Access {
        match self {
            TopicCommand::Create { .. } => Access::Create,
            TopicCommand::List | TopicCommand::Describe { .. } => Access::Read,
            TopicCommand::Delete { .. } | TopicCommand::AddPartitions { .. } => Access::Write,
        }
    }
}

/// A topic's description as JSON (durations in milliseconds).
fn description_json(d: &TopicDescription) -> serde_json::Value {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    json!({
        "topic": d.name,
        "partitions": d.config.partitions,
        "max_message_bytes": d.config.max_message_bytes,
        "dedup_window_ms": ms(d.config.dedup_window),
        "retention": {
            "max_age_ms": d.config.retention.max_age.map(ms),
            "max_bytes": d.config.retention.max_bytes,
        },
        "records": d.partitions.iter().map(|p| p.log_end - p.log_start).sum::<u64>(),
        "partition_bounds": d.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "log_start": p.log_start,
            "log_end": p.log_end,
            "records": p.log_end - p.log_start,
            "bytes": p.bytes,
        })).collect::<Vec<_>>(),
    })
}

pub async fn run(broker: &Arc<dyn Broker>, command: TopicCommand, format: Format) -> CliResult {
    match command {
        TopicCommand::Create {
            name,
            partitions,
            retention_hours,
            retention_bytes,
            max_message_bytes,
        } => {
            let mut retention = Retention::forever();
            if let Some(h) = retention_hours {
                let secs = h.checked_mul(3600).ok_or_else(|| {
                    CliError::usage(format!(
                        "--retention-hours {h} is too large (at most {})",
                        u64::MAX / 3600
                    ))
                })?;
                retention = retention.with_max_age(Duration::from_secs(secs));
            }
            if let Some(b) = retention_bytes {
                retention = retention.with_max_bytes(b);
            }
            let mut config = TopicConfig::new(partitions).with_retention(retention);
            if let Some(m) = max_message_bytes {
                config = config.with_max_message_bytes(m);
            }
            broker.create_topic(&name, config).await.map_err(fail)?;
            match format {
                Format::Json => out_json(&json!({"topic": name, "partitions": partitions}))?,
                Format::Text => out(format!(
                    "topic `{name}` ready with {}",
                    count(partitions.into(), "partition")
                ))?,
            }
        }
        TopicCommand::List => {
            let topics = broker.list_topics().await.map_err(fail)?;
            match format {
                Format::Json => out_json(&json!(topics))?,
                Format::Text => {
                    for t in topics {
                        out(t)?;
                    }
                }
            }
        }
        TopicCommand::Describe { name } => {
            let d = broker.describe_topic(&name).await.map_err(fail)?;
            if format == Format::Json {
                return out_json(&description_json(&d));
            }
            let mut t = table(&["partition", "log start", "log end", "records", "bytes"]);
            for p in &d.partitions {
                t.add_row(vec![
                    p.partition.to_string(),
                    p.log_start.to_string(),
                    p.log_end.to_string(),
                    thousands(p.log_end - p.log_start),
                    thousands(p.bytes),
                ]);
            }
            let retention = match (d.config.retention.max_age, d.config.retention.max_bytes) {
                (None, None) => "kept forever".to_string(),
                (Some(age), None) => format!("kept {}", human_duration(age)),
                (None, Some(b)) => format!("at most {} a partition", count(b, "byte")),
                (Some(age), Some(b)) => format!(
                    "kept {}, at most {} a partition",
                    human_duration(age),
                    count(b, "byte")
                ),
            };
            out(format!(
                "topic `{}`: {}, max message {}, dedup window {}, records {retention}",
                d.name,
                count(d.config.partitions.into(), "partition"),
                count(d.config.max_message_bytes as u64, "byte"),
                human_duration(d.config.dedup_window)
            ))?;
            out(t)?;
        }
        TopicCommand::Delete { name } => {
            broker.delete_topic(&name).await.map_err(fail)?;
            match format {
                Format::Json => out_json(&json!({"topic": name, "deleted": true}))?,
                Format::Text => out(format!("topic `{name}` deleted"))?,
            }
        }
        TopicCommand::AddPartitions { name, partitions } => {
            broker
                .add_partitions(&name, partitions)
                .await
                .map_err(fail)?;
            match format {
                Format::Json => out_json(&json!({"topic": name, "partitions": partitions}))?,
                Format::Text => out(format!(
                    "topic `{name}` has {}",
                    count(partitions.into(), "partition")
                ))?,
            }
        }
    }
    Ok(())
}
