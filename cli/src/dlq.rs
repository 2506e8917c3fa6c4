//! `conveyor dlq …`: inspect and redrive dead-letter topics.

use crate::message::{message_json, MessageLine};
use crate::output::{count, out, out_json, table, CliResult, Format};
use crate::{fail, Access};
use clap::Subcommand;
use conveyor::dlq::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_GROUP, HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC,
    REDRIVE_GROUP,
};
use conveyor::prelude::*;
use conveyor::{Broker, ErrorKind, Message};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List the messages of a DLQ topic with where they came from and why
    /// they failed.
    #[command(after_help = "Example:\n  conveyor dlq list orders.events.sms.dlq\n\n\
        A DLQ nothing was dead-lettered to yet does not exist: it lists as empty (exit 0). \
        Records without the conveyor.dlq.* headers are shown as \"not dead letter\". \
        --format json: {dlq_topic, exists, total, messages}, each message as consume \
        --format json writes it, with its state (waiting, redriven, not_dead_letter).")]
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
    /// Discard every dead letter of a DLQ topic still waiting for redrive
    /// (none of them will be redriven). The records stay in the topic
    /// until its retention removes them; `dlq list` shows them as `redriven` (settled).
    #[command(
        after_help = "Example:\n  conveyor dlq purge orders.events.sms.dlq\n\n\
        A topic that is not a DLQ (its records have no conveyor.dlq.* headers) is refused \
        (exit 5) and left untouched. --format json: {dlq_topic, discarded}."
    )]
    Purge {
        /// The DLQ topic.
        dlq_topic: String,
    },
    /// Discard one dead letter, by partition and offset (as `dlq list`
    /// shows them: `dlq offset` is `partition@offset`): it will not be
    /// redriven; the others stay waiting.
    #[command(
        after_help = "Example:\n  conveyor dlq discard orders.events.sms.dlq 0 17\n\n\
        A record that is not a waiting dead letter (already redriven or discarded, not a dead \
        letter, no such offset) exits 5. --format json: {dlq_topic, partition, offset, \
        discarded: true}."
    )]
    Discard {
        /// The DLQ topic.
        dlq_topic: String,
        /// The dead letter's partition in the DLQ topic.
        partition: u32,
        /// The dead letter's offset in the DLQ topic.
        offset: u64,
    },
}

impl DlqCommand {
    pub(crate) fn access(&self) -> Access {
        match self {
            DlqCommand::List { .. } => Access::Read,
            DlqCommand::Redrive { .. } | DlqCommand::Purge { .. } | DlqCommand::Discard { .. } => {
                Access::Write
            }
        }
    }
}

/// The JSON document of `dlq list`: the messages as `consume --format
/// json` writes them (values embedded as stored), each with its `state`.
#[derive(Serialize)]
struct DlqList<'a> {
    dlq_topic: &'a str,
    exists: bool,
    total: u64,
    messages: Vec<MessageLine<'a>>,
}

impl std::fmt::Display for DlqList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let doc = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&doc)
    }
}

/// `dlq list`: a DLQ that was never created is empty (nothing was
/// dead-lettered to it yet); messages without the dead-letter headers (a
/// topic that is not a DLQ) are shown as such, not as rows of `?`.
async fn list(broker: &Arc<dyn Broker>, dlq_topic: &str, max: usize, format: Format) -> CliResult {
    let d = match broker.describe_topic(dlq_topic).await {
        Ok(d) => Some(d),
        Err(e) if e.kind() == ErrorKind::TopicNotFound => None,
        Err(e) => return Err(fail(e)),
    };
    let Some(d) = d else {
        if format == Format::Json {
            return out_json(&json!({
                "dlq_topic": dlq_topic,
                "exists": false,
                "total": 0,
                "messages": [],
            }));
        }
        return out(format!(
            "DLQ `{dlq_topic}`: 0 messages (no such topic yet: nothing was dead-lettered to it)"
        ));
    };
    let redriven_below: Vec<(u32, u64)> = match broker.group_lag(REDRIVE_GROUP).await {
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
    let mut dead_letters = 0u64;
    let mut kept: Vec<(Message, &'static str)> = Vec::new();
    for p in &d.partitions {
        let floor = redriven_below
            .iter()
            .find(|(q, _)| *q == p.partition)
            .map_or(0, |(_, c)| *c);
        let mut at = p.log_start;
        while shown < max && at < p.log_end {
            let batch = broker
                .fetch(dlq_topic, p.partition, at, max - shown)
                .await
                .map_err(fail)?;
            if batch.is_empty() {
                break;
            }
            for m in batch {
                at = m.offset + 1;
                shown += 1;
                let dead_letter = m.header(HEADER_TOPIC).is_some();
                let state = match (dead_letter, m.offset < floor) {
                    (false, _) => "not_dead_letter",
                    (true, true) => "redriven",
                    (true, false) => "waiting",
                };
                dead_letters += u64::from(dead_letter);
                if format == Format::Json {
                    kept.push((m, state));
                    continue;
                }
                let h = |n: &str| m.header_str(n).unwrap_or("-").to_string();
                let mut value = String::from_utf8_lossy(&m.value).into_owned();
                if value.len() > 60 {
                    value.truncate(value.floor_char_boundary(57));
                    value.push_str("...");
                }
                let from = if dead_letter {
                    format!(
                        "{}/{}@{}",
                        h(HEADER_TOPIC),
                        h(HEADER_PARTITION),
                        h(HEADER_OFFSET)
                    )
                } else {
                    "-".to_string()
                };
                t.add_row(vec![
                    format!("{}@{}", m.partition, m.offset),
                    from,
                    h(HEADER_GROUP),
                    h(HEADER_ATTEMPTS),
                    h(HEADER_ERROR),
                    state.replace('_', " "),
                    value,
                ]);
            }
        }
    }
    let total: u64 = d.partitions.iter().map(|p| p.log_end - p.log_start).sum();
    if format == Format::Json {
        let messages = kept
            .iter()
            .map(|(m, state)| {
                let mut line = message_json(m);
                line.extra.insert("state".into(), json!(state));
                line
            })
            .collect();
        return out(DlqList {
            dlq_topic,
            exists: true,
            total,
            messages,
        });
    }
    out(format!("DLQ `{dlq_topic}`: {}", count(total, "message")))?;
    if shown > 0 && dead_letters == 0 {
        out(format!(
            "note: none of these is a dead letter (no {HEADER_TOPIC} header): `{dlq_topic}` \
             is not a DLQ; read it with `conveyor consume {dlq_topic}`"
        ))?;
    } else if dead_letters < shown as u64 {
        out(format!(
            "note: {} shown are not dead letters (no {HEADER_TOPIC} header)",
            count(shown as u64 - dead_letters, "message")
        ))?;
    }
    if shown > 0 {
        out(t)?;
    }
    Ok(())
}

pub async fn run(broker: &Arc<dyn Broker>, command: DlqCommand, format: Format) -> CliResult {
    match command {
        DlqCommand::List { dlq_topic, max } => list(broker, &dlq_topic, max, format).await?,
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
        DlqCommand::Purge { dlq_topic } => {
            let discarded = broker.purge_dlq(&dlq_topic).await.map_err(fail)?;
            match format {
                Format::Json => out_json(&json!({"dlq_topic": dlq_topic, "discarded": discarded}))?,
                Format::Text => out(format!(
                    "discarded {} from `{dlq_topic}`",
                    count(discarded as u64, "dead letter")
                ))?,
            }
        }
        DlqCommand::Discard {
            dlq_topic,
            partition,
            offset,
        } => {
            broker
                .discard_dead_letter(&dlq_topic, partition, offset)
                .await
                .map_err(fail)?;
            match format {
                Format::Json => out_json(&json!({
                    "dlq_topic": dlq_topic,
                    "partition": partition,
                    "offset": offset,
                    "discarded": true,
                }))?,
                Format::Text => out(format!(
                    "discarded dead letter {partition}@{offset} of `{dlq_topic}`"
                ))?,
            }
        }
    }
    Ok(())
}
