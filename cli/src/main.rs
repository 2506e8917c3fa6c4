//! `conveyor`: what `kafka-topics`, the console producer and consumer,
//! `kcat` and the SQS console give people, on every Conveyor backend.
//!
//! Every command takes `--url` (or `CONVEYOR_URL`). Errors are one line on
//! stderr and a non-zero exit.

mod bench;
mod consume;
mod dlq;
mod group;
mod output;
mod produce;
mod topic;
mod verify;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;

/// Topics, produce, consume, groups and dead letters on any Conveyor backend.
#[derive(Parser, Debug)]
#[command(name = "conveyor", version, about, long_about = None)]
#[command(
    after_help = "Example:\n  conveyor --url mmap:///var/lib/app/queue topic create orders.events --partitions 8"
)]
struct Cli {
    /// Broker URL: mmap:///dir, rocksdb:///dir, redis://host, postgres://..., memory://
    #[arg(long, env = "CONVEYOR_URL", global = true)]
    url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list, describe, delete topics and add partitions.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Append lines (or JSON lines) from stdin to a topic.
    Produce(produce::ProduceArgs),
    /// Print messages of a topic, through a group or from a position.
    Consume(consume::ConsumeArgs),
    /// List groups, show their lag, reset their offsets.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Inspect and redrive dead-letter topics.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// A quick producer/consumer throughput run.
    Bench(bench::BenchArgs),
    /// Check every batch and state frame of an mmap:// store, read-only.
    Verify(verify::VerifyArgs),
}

/// What a command returns: `Ok` or an error line for stderr.
pub(crate) type CliResult = Result<(), String>;

pub(crate) fn fail(e: conveyor::Error) -> String {
    e.chain().to_string()
}

async fn broker(url: Option<&str>) -> Result<Arc<dyn conveyor::Broker>, String> {
    let url = url.ok_or_else(|| {
        "no broker URL: pass --url (e.g. --url mmap:///var/lib/app/queue) or set CONVEYOR_URL"
            .to_string()
    })?;
    conveyor::open(url).await.map_err(fail)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = async {
        // `verify` reads the files of a closed store: it opens no broker.
        let command = match cli.command {
            Command::Verify(a) => return verify::run(cli.url.as_deref(), a).await,
            command => command,
        };
        let broker = broker(cli.url.as_deref()).await?;
        let outcome = match command {
            Command::Topic(c) => topic::run(&broker, c).await,
            Command::Produce(a) => produce::run(&broker, a).await,
            Command::Consume(a) => consume::run(&broker, a).await,
            Command::Group(c) => group::run(&broker, c).await,
            Command::Dlq(c) => dlq::run(&broker, c).await,
            Command::Bench(a) => bench::run(&broker, a).await,
            Command::Verify(a) => verify::run(cli.url.as_deref(), a).await,
        };
        let closed = broker.close().await.map_err(fail);
        outcome.and(closed)
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("conveyor: error: {message}");
            ExitCode::FAILURE
        }
    }
}
