//! Test servers. Tests that need Redis with particular settings (the
//! append-only file with `appendfsync always`, a 3-master cluster) start
//! their own `redis-server` on free local ports, in a temporary directory;
//! the others use `CONVEYOR_REDIS_URL`, else the local default. A test
//! that finds no server (or no `redis-server` to start) fails and says how
//! to get one. Each test uses a namespace of its own and deletes its keys.
#![allow(dead_code)]

use conveyor_core::{Broker, BrokerOptions, Error, Result};
use conveyor_redis::{RedisBroker, RedisOptions, Topology};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The shared server for tests without special needs.
pub fn url() -> String {
    std::env::var("CONVEYOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A namespace no other test (or test process) uses.
pub fn unique_ns(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}_{}_{}_{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Open a broker on `topology` and namespace `ns`; a server that cannot
/// be reached fails the test with how to get one.
pub async fn open(topology: &Topology, ns: &str, options: BrokerOptions) -> Result<RedisBroker> {
    conveyor_redis::open(
        topology.clone(),
        options,
        RedisOptions::default()
            .with_namespace(ns)
            .with_timeout(Duration::from_secs(10)),
    )
    .await
    .map_err(|e| {
        Error::new(
            e.kind(),
            format!(
                "{} (these tests need Redis: set CONVEYOR_REDIS_URL, or start the local server, \
                 e.g. `redis-server --daemonize yes --port 6379 --save ''`)",
                e.message()
            ),
        )
    })
}

/// A broker as the trait object tests use.
pub async fn open_dyn(
    topology: &Topology,
    ns: &str,
    options: BrokerOptions,
) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(open(topology, ns, options).await?))
}

/// Delete a test's namespace.
pub async fn drop_ns(topology: &Topology, ns: &str) {
    match open(topology, ns, BrokerOptions::default()).await {
        Ok(b) => {
            if let Err(e) = b.drop_namespace().await {
                eprintln!("could not delete namespace {ns}: {e}");
            }
            let _ = b.close().await;
        }
        Err(e) => eprintln!("could not delete namespace {ns}: {e}"),
    }
}

/// A `redis-server` this test process started. It dies with the test
/// process: a watchdog shell kills it when its parent is gone.
pub struct RedisServer {
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
    shell: Option<Child>,
    pid: u32,
    /// Served over TLS only, with the certificate this CA signed
    /// (readiness is a TCP connect; commands go through `redis-cli`).
    tls: Option<PathBuf>,
}

fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind a free port")
            .local_addr()
            .expect("local addr")
            .port();
        // A cluster node also listens on port + 10000.
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Send one inline command and read the first reply line (and, for a bulk
/// reply, its body).
pub fn raw_command(port: u16, cmd: &str) -> std::io::Result<String> {
    raw_command_as(port, None, cmd)
}

/// [`raw_command`] after `AUTH password` (if given) on the same
/// connection.
pub fn raw_command_as(port: u16, password: Option<&str>, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = password.map_or(String::new(), |pw| format!("AUTH {pw}\r\n"));
    s.write_all(format!("{auth}{cmd}\r\n").as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if password.is_some() {
        r.read_line(&mut line)?;
        if !line.starts_with("+OK") {
            return Err(std::io::Error::other(format!("AUTH: {line}")));
        }
        line.clear();
    }
    r.read_line(&mut line)?;
    if let Some(n) = line
        .strip_prefix('$')
        .and_then(|n| n.trim().parse::<usize>().ok())
    {
        let mut body = vec![0u8; n + 2];
        r.read_exact(&mut body)?;
        return Ok(String::from_utf8_lossy(&body[..n]).into_owned());
    }
    Ok(line.trim().to_string())
}

/// PEM files for a TLS test (made once for every backend, in the
/// conformance crate).
pub use conveyor_conformance::tls::TestCerts as TlsCerts;

impl RedisServer {
    /// Start `redis-server` on a free port in a new temporary directory,
    /// with `extra` settings (e.g. `--appendonly yes`).
    pub fn start(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        Self::start_in(&dir, free_port(), extra)
    }

    /// Start `redis-server` serving TLS only (`--port 0 --tls-port`),
    /// with the server certificate of `certs` and clients not checked.
    pub fn start_tls(certs: &TlsCerts, extra: &[&str]) -> RedisServer {
        Self::start_tls_checking(certs, false, extra)
    }

    /// [`RedisServer::start_tls`], with `tls-auth-clients` as given.
    pub fn start_tls_checking(
        certs: &TlsCerts,
        check_clients: bool,
        extra: &[&str],
    ) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            certs.server_cert.display().to_string(),
            "--tls-key-file".into(),
            certs.server_key.display().to_string(),
            "--tls-ca-cert-file".into(),
            certs.ca.display().to_string(),
            "--tls-auth-clients".into(),
            if check_clients { "yes" } else { "no" }.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_with(&dir, port, &args, Some(certs.ca.clone()))
    }

    fn start_in(dir: &Path, port: u16, extra: &[&str]) -> RedisServer {
        let mut args: Vec<String> = vec!["--port".into(), port.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_with(dir, port, &args, None)
    }

    fn start_with(dir: &Path, port: u16, extra: &[&str], tls: Option<PathBuf>) -> RedisServer {
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--save".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
            "--logfile".into(),
            dir.join("redis.log").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = RedisServer {
            port,
            dir: dir.to_path_buf(),
            args,
            shell: None,
            pid: 0,
            tls,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        // The shell prints the server's pid, then watches its own parent
        // (this test process) and the server; when the test process is
        // gone, it kills the server.
        let script = r#"redis-server "$@" & rpid=$!; echo $rpid
while kill -0 "$WATCH_PID" 2>/dev/null && kill -0 $rpid 2>/dev/null; do sleep 0.2; done
kill -9 $rpid 2>/dev/null"#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&self.args)
            .env("WATCH_PID", std::process::id().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect(
                "start redis-server (these tests need the `redis-server` binary: \
                 `apt-get install redis-server`)",
            );
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the server's pid");
        self.pid = line.trim().parse().expect("the server's pid");
        self.shell = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = if self.tls.is_some() {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                // A server with `requirepass` answers NOAUTH: it is up.
                raw_command(self.port, "PING")
                    .is_ok_and(|r| r == "+PONG" || r.starts_with("-NOAUTH"))
            };
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer within 20 s; see {}",
                self.port,
                self.dir.join("redis.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL the server (no shutdown, no final fsync).
    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .arg("-9")
            .arg(self.pid.to_string())
            .status();
        if let Some(mut sh) = self.shell.take() {
            let _ = sh.wait();
        }
        // Wait until the port is free again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start it again on the same port and directory (it reloads its AOF).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Start it again (after [`RedisServer::kill`]) with `extra` settings
    /// added (later ones win).
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn();
    }

    /// One command on this server, after `AUTH password` if given (a
    /// TLS server: through `redis-cli --tls`, arguments split on spaces).
    pub fn command(&self, password: Option<&str>, cmd: &str) -> String {
        if let Some(ca) = &self.tls {
            let mut cli = Command::new("redis-cli");
            cli.arg("--tls")
                .arg("--cacert")
                .arg(ca)
                .arg("-p")
                .arg(self.port.to_string());
            if let Some(pw) = password {
                cli.arg("-a").arg(pw).arg("--no-auth-warning");
            }
            let out = cli
                .args(cmd.split(' '))
                .output()
                .expect("run redis-cli (needs the `redis-tools` package)");
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        raw_command_as(self.port, password, cmd)
            .unwrap_or_else(|e| panic!("`{cmd}` on port {}: {e}", self.port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One private server per test process with `appendfsync always`: every
/// durability setting is honoured there, so the whole suite runs.
pub fn aof_server() -> &'static RedisServer {
    static S: OnceLock<RedisServer> = OnceLock::new();
    S.get_or_init(|| RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]))
}

/// A local 3-master Redis Cluster (no replicas), AOF with `appendfsync
/// always` on each master, started once per test process.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(None)
    }

    /// The same cluster over TLS only (`tls-cluster yes`: clients, and
    /// the nodes among themselves).
    pub fn start_tls(certs: &TlsCerts) -> Cluster {
        Self::start_with(Some(certs))
    }

    fn start_with(tls: Option<&TlsCerts>) -> Cluster {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ];
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| match tls {
                None => RedisServer::start(&args),
                Some(certs) => {
                    let mut args = args.to_vec();
                    args.extend(["--tls-cluster", "yes"]);
                    RedisServer::start_tls(certs, &args)
                }
            })
            .collect();
        // `timeout`: redis-cli waits for the nodes to join forever.
        let mut create = Command::new("timeout");
        create.arg("120").arg("redis-cli");
        if let Some(certs) = tls {
            create.arg("--tls").arg("--cacert").arg(&certs.ca);
        }
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create (needs the `redis-tools` package)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &nodes {
            loop {
                let info = match n.tls {
                    Some(_) => n.command(None, "CLUSTER INFO"),
                    None => raw_command(n.port, "CLUSTER INFO").unwrap_or_default(),
                };
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not become ok: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Cluster { nodes }
    }

    pub fn topology(&self) -> Topology {
        Topology::cluster(vec![format!("redis://127.0.0.1:{}", self.nodes[0].port)])
    }
}

/// The cluster of this test process.
pub fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(Cluster::start)
}
