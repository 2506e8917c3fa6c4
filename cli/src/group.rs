//! `conveyor group …`

use crate::output::table;
use crate::{fail, CliResult};
use clap::{Subcommand, ValueEnum};
use conveyor::{Broker, DeliveryMode, GroupConfig, SeekTo};
use std::sync::Arc;

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
    /// Move a group's position (stream: committed offsets; queue: the
    /// cursor). Stop the group's members first.
    #[command(after_help = "Examples:\n  \
        conveyor group reset-offsets loyalty orders.events --to earliest\n  \
        conveyor group reset-offsets loyalty orders.events --offset 1200 --partition 3")]
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
        /// Reset to the first record at or after this time (ms since the epoch).
        #[arg(long)]
        timestamp: Option<u64>,
        /// Only this partition.
        #[arg(long)]
        partition: Option<u32>,
    },
}

pub async fn run(broker: &Arc<dyn Broker>, command: GroupCommand) -> CliResult {
    match command {
        GroupCommand::List => {
            for g in broker.list_groups().await.map_err(fail)? {
                println!("{g}");
            }
        }
        GroupCommand::Describe { group } | GroupCommand::Lag { group } => {
            let lag = broker.group_lag(&group).await.map_err(fail)?;
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
                    p.lag.to_string(),
                ];
                if queue {
                    row.extend([p.in_flight.to_string(), p.available.to_string()]);
                }
                t.add_row(row);
            }
            println!(
                "group `{}` ({:?} mode): total lag {}",
                lag.group,
                lag.mode,
                lag.total_lag()
            );
            println!("{t}");
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to,
            offset,
            timestamp,
            partition,
        } => {
            let target = match (to, offset, timestamp) {
                (Some(ResetTo::Earliest), _, _) => SeekTo::Beginning,
                (Some(ResetTo::Latest), _, _) => SeekTo::End,
                (_, Some(o), _) => SeekTo::Offset(o),
                (_, _, Some(t)) => SeekTo::Timestamp(t),
                _ => {
                    return Err(
                        "say where to: --to earliest|latest, --offset N or --timestamp MS".into(),
                    )
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
            let mode = broker.group_lag(&group).await.map_err(fail)?.mode;
            let config = match mode {
                DeliveryMode::Stream => GroupConfig::stream(),
                DeliveryMode::Queue => GroupConfig::queue(),
            };
            let consumer = broker
                .consumer(&group, &[&topic], config)
                .await
                .map_err(fail)?;
            let wanted: Vec<u32> = match partition {
                Some(p) => vec![p],
                None => (0..partitions).collect(),
            };
            let owned: Vec<u32> = consumer
                .assignment()
                .await
                .map_err(fail)?
                .into_iter()
                .filter(|tp| tp.topic == topic)
                .map(|tp| tp.partition)
                .collect();
            let result = async {
                if let Some(p) = wanted.iter().find(|p| !owned.contains(p)) {
                    return Err(format!(
                        "group `{group}` has active members holding {topic}/{p}: stop them first"
                    ));
                }
                for p in &wanted {
                    consumer.seek(&topic, *p, target).await.map_err(fail)?;
                    if mode == DeliveryMode::Stream {
                        // Commit the position the seek chose.
                        let d = broker.describe_topic(&topic).await.map_err(fail)?;
                        let b = d
                            .partitions
                            .iter()
                            .find(|b| b.partition == *p)
                            .copied()
                            .ok_or_else(|| format!("topic `{topic}` lost partition {p}"))?;
                        let at = match target {
                            SeekTo::Beginning => b.log_start,
                            SeekTo::End => b.log_end,
                            SeekTo::Offset(o) => o.clamp(b.log_start, b.log_end),
                            SeekTo::Timestamp(t) => broker
                                .offset_for_timestamp(&topic, *p, t)
                                .await
                                .map_err(fail)?,
                        };
                        consumer.commit(&topic, *p, at).await.map_err(fail)?;
                        println!("{topic}/{p}: committed offset {at}");
                    } else {
                        println!("{topic}/{p}: cursor moved");
                    }
                }
                Ok(())
            }
            .await;
            consumer.close().await.map_err(fail)?;
            result?;
        }
    }
    Ok(())
}
