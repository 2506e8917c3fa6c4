//! `conveyor topic …`

use crate::output::table;
use crate::{fail, CliResult};
use clap::Subcommand;
use conveyor::{Broker, Retention, TopicConfig};
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

pub async fn run(broker: &Arc<dyn Broker>, command: TopicCommand) -> CliResult {
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
                    format!(
                        "--retention-hours {h} is too large (at most {})",
                        u64::MAX / 3600
                    )
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
            println!("topic `{name}` ready with {partitions} partitions");
        }
        TopicCommand::List => {
            for t in broker.list_topics().await.map_err(fail)? {
                println!("{t}");
            }
        }
        TopicCommand::Describe { name } => {
            let d = broker.describe_topic(&name).await.map_err(fail)?;
            let mut t = table(&["partition", "log start", "log end", "records", "bytes"]);
            for p in &d.partitions {
                t.add_row(vec![
                    p.partition.to_string(),
                    p.log_start.to_string(),
                    p.log_end.to_string(),
                    (p.log_end - p.log_start).to_string(),
                    p.bytes.to_string(),
                ]);
            }
            println!(
                "topic `{}`: {} partitions, max message {} bytes, dedup window {:?}",
                d.name, d.config.partitions, d.config.max_message_bytes, d.config.dedup_window
            );
            println!("{t}");
        }
        TopicCommand::Delete { name } => {
            broker.delete_topic(&name).await.map_err(fail)?;
            println!("topic `{name}` deleted");
        }
        TopicCommand::AddPartitions { name, partitions } => {
            broker
                .add_partitions(&name, partitions)
                .await
                .map_err(fail)?;
            println!("topic `{name}` has {partitions} partitions");
        }
    }
    Ok(())
}
