//! `conveyor`: what `kafka-topics`, the console producer and consumer,
//! `kcat` and the SQS console give people, on every Conveyor backend.
//!
//! Every command takes `--url` (or `CONVEYOR_URL`) and `--format
//! text|json`. Errors are one line on stderr and a non-zero exit; a closed
//! stdout (`| head -1`) ends a command quietly.

mod bench;
mod consume;
mod dashboard;
mod dlq;
mod exit;
mod group;
mod message;
mod migrate;
mod output;
mod ping;
mod produce;
mod time;
mod topic;
mod verify;

use clap::{Parser, Subcommand};
use exit::Exit;
use output::{CliError, CliResult, Format};
use std::process::ExitCode;
use std::sync::Arc;

fn after_help() -> String {
    format!(
        "Examples:\n  \
        conveyor --url mmap:///var/lib/app/queue topic create orders.events --partitions 8\n  \
        conveyor --url mmap:///var/lib/app/queue group lag email --format json\n\n\
        Read commands (topic list/describe, group list/describe/lag, dlq list, consume without \
        --group) open an mmap:// store read-only, so they work while a service owns it. \
        Commands that change a store never create one at a mistyped path: only `topic create`, \
        `bench` and produce with auto_create=true do (or add create=true to the URL). \
        A postgres:// schema is created by `conveyor --url 'postgres://...?schema=NAME' migrate` \
        (or auto_create=true / migrate=true in the URL, for development).\n\n\
        Server backends: postgres:// and redis:// need the CLI built with their features: \
        `cargo install --path cli --features postgres,redis` (rocksdb:// with --features \
        rocksdb, which needs clang).\n\n\
        {JSON_HELP}\n\n{}",
        exit::TABLE
    )
}

/// The conventions of every `--format json` document.
const JSON_HELP: &str = "JSON output (--format json): one JSON document on one line, or one \
    object a line for messages (consume, produce --verbose). Keys are snake_case, names of \
    modes and states lower case (\"mode\":\"queue\"), durations integer milliseconds in keys \
    ending _ms (bench latencies: microseconds, _us), times milliseconds since the epoch. \
    Errors are never JSON: one line on stderr and the exit status below.";

/// Topics, produce, consume, groups and dead letters on any Conveyor backend.
#[derive(Parser, Debug)]
#[command(name = "conveyor", version, about, long_about = None)]
#[command(after_help = after_help())]
struct Cli {
    /// Broker URL: mmap:///dir (embedded), rocksdb:///dir, postgres://...
    /// or redis://... (when built with the rocksdb, postgres or redis
    /// feature) or memory:// (gone when the command exits).
    #[arg(long, env = "CONVEYOR_URL", global = true)]
    url: Option<String>,
    /// Output format of commands that print data.
    #[arg(long, value_enum, global = true, default_value_t = Format::Text)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list, describe, delete topics and add partitions.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Append lines (text, JSON or base64) from stdin to a topic.
    Produce(produce::ProduceArgs),
    /// Print messages of a topic, through a group or from a position.
    Consume(consume::ConsumeArgs),
    /// List groups, show their members and lag, reset their offsets.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Inspect and redrive dead-letter topics.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Serve a web page showing topics, groups with their lag, and DLQs
    /// (read-only unless --allow-redrive), on 127.0.0.1:7878 by default.
    #[command(after_help = "Examples:\n  \
        conveyor --url mmap:///var/lib/app/queue dashboard\n  \
        conveyor --url redis://cache:6379 dashboard --listen 127.0.0.1:9000 --allow-redrive\n\n\
        An mmap:// or rocksdb:// store is read read-only at every refresh, so the dashboard runs \
        beside the service that owns it; a redrive from the page opens it for writing for the \
        redrive only, and is refused (409) while another process owns it. The page reads \
        GET /api/overview (JSON); POST /api/redrive takes {\"dlq_topic\": ..., \"max\": N}.")]
    Dashboard(dashboard::DashboardArgs),
    /// A producer/consumer throughput and latency run.
    Bench(bench::BenchArgs),
    /// Check every batch and state frame of an mmap:// store, read-only.
    Verify(verify::VerifyArgs),
    /// Create a postgres:// schema's tables, or bring them to this version
    /// (run as the schema's owner, before applications open it).
    Migrate,
    /// One round trip to the store, for a readiness probe: exit 0 when it
    /// answers, 75 when a server cannot be reached (retry later).
    #[command(after_help = "Examples:\n  conveyor --url redis://cache:6379 ping\n  \
        conveyor --url postgres://app@db/app ping --format json")]
    Ping,
}

/// What a command does to the store, which decides how it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Only reads: an embedded store is opened read-only (it may be owned
    /// by a running service), and a missing store is an error.
    Read,
    /// Changes a store that must exist already.
    Write,
    /// May create the store (and topics in it).
    Create,
}

impl Command {
    fn access(&self, url: &str) -> Access {
        match self {
            Command::Topic(c) => c.access(),
            Command::Produce(_) if auto_create(url) => Access::Create,
            Command::Produce(_) => Access::Write,
            Command::Consume(a) => a.access(),
            Command::Group(c) => c.access(),
            Command::Dlq(c) => c.access(),
            Command::Dashboard(_) => Access::Read,
            Command::Bench(_) => Access::Create,
            Command::Verify(_) => Access::Read,
            Command::Migrate => Access::Create,
            Command::Ping => Access::Read,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Command::Topic(_) => "topic",
            Command::Produce(_) => "produce",
            Command::Consume(_) => "consume",
            Command::Group(_) => "group",
            Command::Dlq(_) => "dlq",
            Command::Dashboard(_) => "dashboard",
            Command::Bench(_) => "bench",
            Command::Verify(_) => "verify",
            Command::Migrate => "migrate",
            Command::Ping => "ping",
        }
    }
}

fn auto_create(url: &str) -> bool {
    conveyor::BrokerUrl::parse(url).is_ok_and(|u| u.options().auto_create_topics)
}

/// A conveyor error as a command's failure (its message and the exit
/// status of its kind).
pub(crate) fn fail(e: conveyor::Error) -> CliError {
    CliError::from(e)
}

/// The CLI feature a URL's backend needs, when this build lacks it (the
/// facade's own error names the facade's feature, which `cargo install
/// --path cli` cannot set).
fn missing_feature(url: &str) -> Option<&'static str> {
    let parsed = conveyor::BrokerUrl::parse(url).ok()?;
    match parsed.scheme() {
        "postgres" | "postgresql" if !cfg!(feature = "postgres") => Some("postgres"),
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" if !cfg!(feature = "redis") => {
            Some("redis")
        }
        "rocksdb" if !cfg!(feature = "rocksdb") => Some("rocksdb"),
        _ => None,
    }
}

/// The error for a URL whose backend this `conveyor` was built without.
pub(crate) fn not_compiled_in(url: &str) -> Option<CliError> {
    let feature = missing_feature(url)?;
    let scheme = conveyor::BrokerUrl::parse(url)
        .map(|u| u.scheme().to_string())
        .unwrap_or_default();
    let extra = if feature == "rocksdb" {
        " (RocksDB's C++ build needs clang)"
    } else {
        ""
    };
    Some(CliError::new(
        Exit::Unsupported,
        format!(
            "unsupported: this `conveyor` was built without the {scheme}:// backend: rebuild it \
             with `cargo install --path cli --features {feature}` (from a checkout; or \
             `cargo install conveyor-cli --features {feature}`){extra}"
        ),
    ))
}

/// The URL to open for a command of `access`: for embedded stores
/// (mmap://, rocksdb://), read
/// commands add `read_only=true` and commands that change a store add
/// `create=false`, unless the URL sets `read_only` or `create` itself.
fn url_for(url: &str, access: Access) -> String {
    let Ok(parsed) = conveyor::BrokerUrl::parse(url) else {
        return url.to_string(); // open() names what is wrong with it
    };
    if !matches!(parsed.scheme(), "mmap" | "rocksdb") {
        return url.to_string();
    }
    let has = |name: &str| parsed.backend_options().iter().any(|(k, _)| k == name);
    let option = match access {
        // `create=...` asks for an owning open (which may create).
        Access::Read if !has("read_only") && !has("create") => "read_only=true",
        Access::Write if !has("create") => "create=false",
        _ => return url.to_string(),
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{option}")
}

async fn broker(url: &str, access: Access) -> CliResult<Arc<dyn conveyor::Broker>> {
    if let Some(e) = not_compiled_in(url) {
        return Err(e);
    }
    conveyor::open(&url_for(url, access)).await.map_err(fail)
}

async fn run(cli: Cli) -> CliResult {
    // `verify` reads the files of a closed store: it opens no broker.
    let command = match cli.command {
        Command::Verify(a) => return verify::run(cli.url.as_deref(), a, cli.format).await,
        // `bench --list` prints the catalogue: it needs no broker either.
        Command::Bench(a) if a.list => return bench::list(cli.format),
        command => command,
    };
    let url = cli.url.ok_or_else(|| {
        CliError::usage(
            "no broker URL: pass --url (e.g. --url mmap:///var/lib/app/queue) or set CONVEYOR_URL",
        )
    })?;
    // `migrate` is its own step: it opens no broker.
    if let Command::Migrate = command {
        return migrate::run(&url, cli.format).await;
    }
    // `dashboard` opens its broker as it goes (an embedded store read-only
    // at each refresh) and runs until Ctrl-C.
    if let Command::Dashboard(a) = command {
        return dashboard::run(&url, a).await;
    }
    let access = command.access(&url);
    if url.starts_with("memory:") && access != Access::Read && !matches!(command, Command::Bench(_))
    {
        eprintln!(
            "conveyor: note: memory:// keeps nothing: what `{}` does here is gone when the \
             command exits (use mmap:///path to keep it)",
            command.name()
        );
    }
    let broker = broker(&url, access).await?;
    let format = cli.format;
    let outcome = match command {
        Command::Topic(c) => topic::run(&broker, c, format).await,
        Command::Produce(a) => produce::run(&broker, a, format).await,
        Command::Consume(a) => consume::run(&broker, a, format).await,
        Command::Group(c) => group::run(&broker, c, format).await,
        Command::Dlq(c) => dlq::run(&broker, c, format).await,
        Command::Dashboard(a) => dashboard::run(&url, a).await,
        Command::Bench(a) => bench::run(&broker, a, format, &url).await,
        Command::Verify(a) => verify::run(Some(&url), a, format).await,
        Command::Migrate => migrate::run(&url, format).await,
        Command::Ping => ping::run(&broker, format).await,
    };
    let closed = broker.close().await.map_err(fail);
    outcome.and(closed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) | Err(CliError::BrokenPipe) => ExitCode::SUCCESS,
        Err(CliError::Failed { message, exit }) => {
            eprintln!("conveyor: error: {message}");
            ExitCode::from(exit.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_commands_open_mmap_read_only_and_writes_never_create() {
        assert_eq!(
            url_for("mmap:///q", Access::Read),
            "mmap:///q?read_only=true"
        );
        assert_eq!(
            url_for("mmap:///q?segment_bytes=4096", Access::Write),
            "mmap:///q?segment_bytes=4096&create=false"
        );
        assert_eq!(url_for("mmap:///q", Access::Create), "mmap:///q");
        // The URL's own choice wins.
        assert_eq!(
            url_for("mmap:///q?read_only=false", Access::Read),
            "mmap:///q?read_only=false"
        );
        assert_eq!(
            url_for("mmap:///q?create=true", Access::Write),
            "mmap:///q?create=true"
        );
        assert_eq!(url_for("memory://", Access::Read), "memory://");
        assert_eq!(
            url_for("rocksdb:///q", Access::Read),
            "rocksdb:///q?read_only=true"
        );
    }
}
