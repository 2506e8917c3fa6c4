//! `conveyor dlq …`: inspect and redrive dead-letter topics.

use crate::message::message_json;
use crate::output::{count, out, out_json, table, CliResult, Format};
use crate::{fail, Access};
use clap::Subcommand;
use conveyor::dlq::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_GROUP, HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC,
    REDRIVE_GROUP,
};
use conveyor::prelude::*;
use conveyor::Broker;
use serde_json::json;
use std::sync::Arc;

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List the messages of a DLQ topic with where they came from and why
    /// they failed.
    #[command(after_help = "Example:\n  conveyor dlq list orders.events.sms.dlq")]
    List {
        /// The DLQ topic (default name: `{topic}.{group}.dlq`).
        dlq_topic: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Move DLQ messages back to their original topics, for the group that dead-lettered each.
    #[command(after_help = "Example:\n  conveyor dlq redrive orders.events.sms.dlq --max 100")]
    Redrive {
        /// The DLQ topic.
        dlq_topic: String,
        /// Move at most this many (default: all).
        #[arg(long)]
        max: Option<usize>,
    },
}

impl DlqCommand {
    pub(crate) fn access(&self) -> Access {
        match self {
            DlqCommand::List { .. } => Access::Read,
            DlqCommand::Redrive { .. } => Access::Write,
        }
    }
}

pub async fn run(broker: &Arc<dyn Broker>, command: DlqCommand, format: Format) -> CliResult {
    match command {
        DlqCommand::List { dlq_topic, max } => {
            let d = broker.describe_topic(&dlq_topic).await.map_err(fail)?;
            let redriven_below = match broker.group_lag(REDRIVE_GROUP).await {
                Ok(lag) => lag
                    .partitions
                    .into_iter()
                    .filter(|p| p.topic == dlq_topic)
                    .map(|p| (p.partition, p.committed))
                    .collect(),
                Err(_) => Vec::new(),
            };
            let mut t = table(&[
                "dlq offset",
                "from",
                "group",
                "attempts",
                "error",
                "state",
                "value",
            ]);
            let mut shown = 0;
            let mut entries = Vec::new();
            for p in &d.partitions {
                let floor = redriven_below
                    .iter()
                    .find(|(q, _)| *q == p.partition)
                    .map_or(0, |(_, c)| *c);
                let mut at = p.log_start;
                while shown < max && at < p.log_end {
                    let batch = broker
                        .fetch(&dlq_topic, p.partition, at, max - shown)
                        .await
                        .map_err(fail)?;
                    if batch.is_empty() {
                        break;
                    }
                    for m in batch {
                        at = m.offset + 1;
                        shown += 1;
                        let h = |n: &str| m.header_str(n).unwrap_or("?").to_string();
                        let state = if m.offset < floor {
                            "redriven"
                        } else {
                            "waiting"
                        };
                        if format == Format::Json {
                            let mut entry = message_json(&m);
                            entry["state"] = json!(state);
                            entries.push(entry);
                            continue;
                        }
                        let mut value = String::from_utf8_lossy(&m.value).into_owned();
                        if value.len() > 60 {
                            value.truncate(value.floor_char_boundary(57));
                            value.push_str("...");
                        }
                        t.add_row(vec![
                            format!("{}@{}", m.partition, m.offset),
                            format!(
                                "{}/{}@{}",
                                h(HEADER_TOPIC),
                                h(HEADER_PARTITION),
                                h(HEADER_OFFSET)
                            ),
                            h(HEADER_GROUP),
                            h(HEADER_ATTEMPTS),
                            h(HEADER_ERROR),
                            state.to_string(),
                            value,
                        ]);
                    }
                }
            }
            let total: u64 = d.partitions.iter().map(|p| p.log_end - p.log_start).sum();
            if format == Format::Json {
                return out_json(&json!({
                    "dlq_topic": dlq_topic,
                    "total": total,
                    "messages": entries,
                }));
            }
            out(format!("DLQ `{dlq_topic}`: {}", count(total, "message")))?;
            out(t)?;
        }
        DlqCommand::Redrive { dlq_topic, max } => {
            let moved = broker.redrive(&dlq_topic, max).await.map_err(fail)?;
            match format {
                Format::Json => out_json(&json!({"dlq_topic": dlq_topic, "redriven": moved}))?,
                Format::Text => out(format!(
                    "redrove {} from `{dlq_topic}`",
                    count(moved as u64, "message")
                ))?,
            }
        }
    }
    Ok(())
}
