//! `conveyor dashboard`: a small web page to look at a broker, as Kafka
//! UI, RabbitMQ's management page and apalis-board do: topics and their
//! partitions, groups with members, lag and a lag chart, and each DLQ with
//! its dead letters and (with `--allow-redrive`) a redrive button.
//!
//! This module owns the command's flags, the broker it reads (see
//! [`Source`]), the poller that refreshes the overview and the lag
//! history, and the server's lifetime. The JSON shape is in [`overview`],
//! the routes in [`server`], the page in `assets/` (plain HTML, JS and
//! CSS, no build step). It never changes the broker except by a redrive
//! the operator asked for.

mod history;
mod listen;
mod overview;
mod server;

use crate::exit::Exit;
use crate::output::{out, CliError, CliResult};
use crate::time::parse_duration;
use crate::Access;
use clap::Args;
use conveyor::{Broker, BrokerExt};
use history::LagHistory;
use overview::Overview;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Mutex};

/// `conveyor dashboard`'s flags.
#[derive(Args, Debug)]
pub struct DashboardArgs {
    /// Where to serve the page: IP:PORT, localhost:PORT or a port (port 0:
    /// any free one, printed at start). Loopback only unless --allow-remote.
    #[arg(long, default_value = listen::DEFAULT_LISTEN, value_parser = listen::parse_listen)]
    listen: SocketAddr,
    /// Serve on a non-loopback address. The page has no login: put it
    /// behind a proxy that authenticates.
    #[arg(long)]
    allow_remote: bool,
    /// Show a redrive button for each DLQ and accept POST /api/redrive
    /// (refused with 403 without it: the page is read-only).
    #[arg(long)]
    allow_redrive: bool,
    /// How often to read the broker: 2s, 500ms.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// How much lag history the chart keeps, in memory: 10m, 1h.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    history: Duration,
    /// Show at most this many waiting dead letters per DLQ (up to 1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(0..=1000))]
    dlq_messages: u16,
}

/// Where the dashboard's broker comes from. An embedded store (mmap://,
/// rocksdb://) is opened read-only for each refresh, so the dashboard
/// never holds its lock and sees what the owning service commits; a
/// redrive opens it for writing only for the redrive's time (refused with
/// `Locked` while a service owns it). Other URLs are opened once and kept.
struct Source {
    url: String,
    embedded: bool,
    kept: Mutex<Option<Arc<dyn Broker>>>,
}

impl Source {
    fn new(url: &str) -> Self {
        let embedded =
            conveyor::BrokerUrl::parse(url).is_ok_and(|u| matches!(u.scheme(), "mmap" | "rocksdb"));
        Source {
            url: url.to_string(),
            embedded,
            kept: Mutex::new(None),
        }
    }

    /// A broker to read (`Access::Read`) or redrive with (`Access::Write`).
    async fn open(&self, access: Access) -> CliResult<Arc<dyn Broker>> {
        if self.embedded {
            return crate::broker(&self.url, access).await;
        }
        let mut kept = self.kept.lock().await;
        if let Some(broker) = kept.as_ref() {
            return Ok(broker.clone());
        }
        let broker = crate::broker(&self.url, Access::Write).await?;
        *kept = Some(broker.clone());
        Ok(broker)
    }

    /// Done with a broker from [`open`](Source::open): an embedded store is
    /// closed (its lock released); a kept broker that reported itself
    /// closed is dropped, to be opened again.
    async fn release(&self, broker: Arc<dyn Broker>, failed: Option<conveyor::ErrorKind>) {
        if self.embedded {
            let _ = broker.close().await;
        } else if failed == Some(conveyor::ErrorKind::Closed) {
            *self.kept.lock().await = None;
        }
    }

    async fn close(&self) {
        if let Some(broker) = self.kept.lock().await.take() {
            let _ = broker.close().await;
        }
    }
}

/// The running dashboard: its source, settings and latest overview.
pub(crate) struct Dashboard {
    source: Source,
    allow_redrive: bool,
    /// Answer only requests whose `Host` is the loopback.
    loopback_only: bool,
    dlq_messages: usize,
    /// The overview and the history it was shaped with; locked for a whole
    /// refresh, so refreshes (poller, after a redrive) never overlap.
    state: Mutex<(Overview, LagHistory)>,
    /// The latest overview as JSON, for `GET /api/overview`.
    latest: watch::Sender<Arc<String>>,
    /// One redrive at a time.
    redriving: Mutex<()>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The message of a failure, for the page.
fn message(e: &CliError) -> String {
    match e {
        CliError::Failed { message, .. } => message.clone(),
        CliError::BrokenPipe => "broken pipe".to_string(),
    }
}

impl Dashboard {
    /// A dashboard over `source` (whose URL is `url`) with `args`' settings,
    /// nothing read yet.
    fn new(source: Source, url: &conveyor::BrokerUrl, args: &DashboardArgs) -> Self {
        let (latest, _) = watch::channel(Arc::new("{}".to_string()));
        let overview = Overview {
            url: url.redacted(),
            backend: url.scheme().to_string(),
            allow_redrive: args.allow_redrive,
            interval_ms: u64::try_from(args.interval.as_millis()).unwrap_or(u64::MAX),
            ..Overview::default()
        };
        Dashboard {
            source,
            allow_redrive: args.allow_redrive,
            loopback_only: !args.allow_remote,
            dlq_messages: usize::from(args.dlq_messages),
            state: Mutex::new((overview, LagHistory::new(args.history, args.interval))),
            latest,
            redriving: Mutex::new(()),
        }
    }

    /// Read the broker again: the overview (or, when that fails, the last
    /// one with the error) and one more sample of lag history.
    async fn refresh(&self) {
        let mut state = self.state.lock().await;
        let (overview, history) = &mut *state;
        let outcome = match self.source.open(Access::Read).await {
            Ok(broker) => {
                let gathered = overview::gather(&broker, self.dlq_messages).await;
                let kind = gathered.as_ref().err().map(conveyor::Error::kind);
                self.source.release(broker, kind).await;
                gathered.map_err(crate::fail)
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(gathered) => {
                let at = now_ms();
                let mut live = std::collections::BTreeSet::new();
                for (group, lags) in gathered.lags() {
                    history.record(group, at, lags);
                    live.insert(group.to_string());
                }
                history.retain_groups(&live);
                gathered.shape(history, overview);
                overview.refreshed_at = Some(at);
                overview.error = None;
            }
            Err(e) => overview.error = Some(message(&e)),
        }
        let json = serde_json::to_string(&*overview)
            .unwrap_or_else(|e| format!("{{\"error\":\"the overview as JSON: {e}\"}}"));
        self.latest.send_replace(Arc::new(json));
    }

    /// Move up to `max` (all if `None`) dead letters of `dlq_topic` back,
    /// then refresh, so the page's next read shows it.
    async fn redrive(&self, dlq_topic: &str, max: Option<usize>) -> CliResult<usize> {
        let _one = self.redriving.lock().await;
        let broker = self.source.open(Access::Write).await.map_err(|e| {
            e.map_message(|m| format!("redrive `{dlq_topic}`: opening the store for writing: {m}"))
        })?;
        let moved = broker.redrive(dlq_topic, max).await;
        let kind = moved.as_ref().err().map(conveyor::Error::kind);
        self.source.release(broker, kind).await;
        let moved = moved.map_err(crate::fail)?;
        self.refresh().await;
        Ok(moved)
    }
}

/// Serve the dashboard until Ctrl-C.
pub async fn run(url: &str, args: DashboardArgs) -> CliResult {
    listen::check_listen(args.listen, args.allow_remote).map_err(CliError::usage)?;
    if let Some(e) = crate::not_compiled_in(url) {
        return Err(e);
    }
    if args.interval.is_zero() {
        return Err(CliError::usage("--interval must be more than 0"));
    }
    let parsed = conveyor::BrokerUrl::parse(url).map_err(crate::fail)?;
    let source = Source::new(url);
    // A URL that cannot work (no store at the path, bad options) ends the
    // command now; a server that is down only for now is shown on the page.
    match source.open(Access::Read).await {
        Ok(broker) => source.release(broker, None).await,
        Err(CliError::Failed {
            exit: Exit::Unavailable,
            message,
        }) => eprintln!("conveyor: warning: {message} (the page shows it until it answers)"),
        Err(e) => return Err(e),
    }
    if url.starts_with("memory:") {
        eprintln!(
            "conveyor: note: memory:// is this process's own empty broker: the dashboard shows \
             nothing another process did (use mmap:///path or a server URL)"
        );
    }
    let dashboard = Arc::new(Dashboard::new(source, &parsed, &args));
    dashboard.refresh().await;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::new(Exit::Io, format!("listening on {}: {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::new(Exit::Io, format!("listening on {}: {e}", args.listen)))?;
    if !local.ip().is_loopback() {
        eprintln!(
            "conveyor: WARNING: serving on {local}, beyond this machine, with no login{}",
            if args.allow_redrive {
                ", and anyone who reaches it can redrive dead letters"
            } else {
                ""
            }
        );
    }
    out(format!(
        "conveyor dashboard: http://{local}/ for {} ({})",
        parsed.redacted(),
        if args.allow_redrive {
            "redrive allowed"
        } else {
            "read-only"
        }
    ))?;

    // The poller: owned here, stopped when the server stops.
    let poller = tokio::spawn({
        let dashboard = dashboard.clone();
        let interval = args.interval;
        async move {
            loop {
                tokio::time::sleep(interval).await;
                dashboard.refresh().await;
            }
        }
    });
    let served = axum::serve(listener, server::router(dashboard.clone()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| CliError::new(Exit::Io, format!("serving on {local}: {e}")));
    poller.abort();
    dashboard.source.close().await;
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor::prelude::*;
    use conveyor::{DlqPolicy, NackOptions};

    fn args(allow_redrive: bool) -> DashboardArgs {
        DashboardArgs {
            listen: listen::parse_listen(listen::DEFAULT_LISTEN).unwrap(),
            allow_remote: false,
            allow_redrive,
            interval: Duration::from_secs(2),
            history: Duration::from_secs(600),
            dlq_messages: 10,
        }
    }

    fn latest(d: &Dashboard) -> serde_json::Value {
        serde_json::from_str(&d.latest.borrow()).unwrap()
    }

    /// The kept-broker path (server backends), on memory://: a refresh
    /// reads members, lag and dead letters; a redrive moves them and the
    /// next overview shows it.
    #[tokio::test]
    async fn a_refresh_shows_lag_members_and_dead_letters_and_a_redrive_moves_them() {
        let url = conveyor::BrokerUrl::parse("memory://").unwrap();
        let d = Dashboard::new(Source::new("memory://"), &url, &args(true));
        let broker = d.source.open(Access::Read).await.unwrap();
        broker
            .create_topic("orders", TopicConfig::new(1))
            .await
            .unwrap();
        let producer = broker.producer().await.unwrap();
        for i in 0..5 {
            producer
                .send("orders", Record::new(format!("order {i}")))
                .await
                .unwrap();
        }
        let audit = broker
            .consumer("audit", &["orders"], GroupConfig::stream())
            .await
            .unwrap();
        let mail = broker
            .consumer(
                "mail",
                &["orders"],
                GroupConfig::queue().with_dlq(DlqPolicy::new(1)),
            )
            .await
            .unwrap();
        for m in mail.poll(2, Duration::from_secs(1)).await.unwrap() {
            mail.nack(&m, NackOptions::new().with_reason("<i>bounced</i>"))
                .await
                .unwrap();
        }

        d.refresh().await;
        let o = latest(&d);
        assert_eq!(o["error"], serde_json::Value::Null, "{o}");
        assert_eq!(o["url"], "memory://");
        let groups = o["groups"].as_array().unwrap();
        let names: Vec<&str> = groups
            .iter()
            .map(|g| g["group"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["audit", "mail"]);
        assert_eq!(groups[0]["total_lag"], 5);
        assert_eq!(groups[0]["mode"], "stream");
        assert_eq!(groups[0]["members_visible"], true);
        assert_eq!(groups[0]["members"].as_array().unwrap().len(), 1);
        assert_eq!(groups[0]["history"]["t"].as_array().unwrap().len(), 1);
        assert_eq!(groups[1]["total_lag"], 3, "2 dead-lettered, 3 left");
        assert_eq!(groups[1]["dlq_topics"][0], "orders.mail.dlq");
        let dlq = &o["dlqs"][0];
        assert_eq!(dlq["topic"], "orders.mail.dlq");
        assert_eq!(dlq["groups"][0], "mail");
        assert_eq!(dlq["waiting"], 2);
        assert_eq!(dlq["messages"][0]["error"], "<i>bounced</i>");
        assert_eq!(dlq["messages"][0]["origin"], "orders/0@0");
        assert_eq!(dlq["messages"][0]["attempts"], 1);
        let dlq_topic = o["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["topic"] == "orders.mail.dlq")
            .unwrap();
        assert_eq!(dlq_topic["is_dlq"], true);

        assert_eq!(d.redrive("orders.mail.dlq", None).await.unwrap(), 2);
        let o = latest(&d);
        assert_eq!(o["dlqs"][0]["waiting"], 0);
        assert_eq!(o["dlqs"][0]["messages"].as_array().unwrap().len(), 0);
        assert_eq!(o["groups"][1]["total_lag"], 5, "the two are back for mail");
        assert_eq!(
            o["groups"].as_array().unwrap().len(),
            2,
            "redrive's own group is not listed"
        );
        assert_eq!(o["groups"][0]["history"]["t"].as_array().unwrap().len(), 2);

        // A topic that is not there, or not a DLQ: refused, nothing moved.
        match d.redrive("nope", None).await {
            Err(CliError::Failed { exit, .. }) => assert_eq!(exit, Exit::NotFound),
            other => panic!("{other:?}"),
        }
        match d.redrive("orders", None).await {
            Err(CliError::Failed { exit, message }) => {
                assert_eq!(exit, Exit::Invalid, "{message}");
            }
            other => panic!("{other:?}"),
        }
        audit.close().await.unwrap();
        mail.close().await.unwrap();
        d.source.close().await;
    }
}
