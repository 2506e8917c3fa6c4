//! A private PostgreSQL cluster for one test: settings the shared server
//! must not be given (password auth, TLS, `hostssl`-only rules) go here.
//! `initdb` in a temporary directory, a free loopback port, started with
//! `pg_ctl`; stopped and removed when the guard drops (also on panic).
//! Run as the `postgres` user when the tests run as root (initdb refuses
//! root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where PostgreSQL's programs are: `CONVEYOR_PG_BIN`, else Debian's path
/// for version 15.
fn bin(program: &str) -> PathBuf {
    let dir = std::env::var("CONVEYOR_PG_BIN")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string());
    let path = Path::new(&dir).join(program);
    assert!(
        path.exists(),
        "{} not found: these tests start a private PostgreSQL cluster; install the server \
         (`apt-get install postgresql-15`) or set CONVEYOR_PG_BIN to the directory holding \
         initdb and pg_ctl",
        path.display()
    );
    path
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Run `program args` as the cluster's owner; panics with its output if it
/// fails.
fn run(program: &Path, args: &[&str]) {
    let output = if is_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args)
            .output()
    } else {
        Command::new(program).args(args).output()
    }
    .expect("run a PostgreSQL program");
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A free loopback port (bound and released: nothing else on this machine
/// picks ports in the range the kernel hands out here).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A running private cluster.
pub struct Cluster {
    dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// The superuser `postgres`'s password in every private cluster.
pub const SUPERUSER_PASSWORD: &str = "owner-pw-7";

impl Cluster {
    /// As root, hand the cluster's directory to the `postgres` user (the
    /// server refuses to run as root); otherwise nothing to do.
    fn give_to_postgres(&self) {
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster's directory");
        }
    }

    /// A cluster whose `pg_hba.conf` is `hba` (after `local all all
    /// trust`), with `conf` appended to `postgresql.conf` and `files`
    /// (name, contents) written into the data directory, mode 0600.
    pub fn start(hba: &str, conf: &str, files: &[(&str, Vec<u8>)]) -> Cluster {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "conveyor-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let port = free_port();
        // From here on, the guard removes the directory whatever happens.
        let cluster = Cluster { dir, port };
        let data = cluster.dir.join("data");
        let pw = cluster.dir.join("pw");
        std::fs::write(&pw, SUPERUSER_PASSWORD).expect("write the password file");
        cluster.give_to_postgres();
        run(
            &bin("initdb"),
            &[
                "-D",
                data.to_str().expect("a UTF-8 path"),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                pw.to_str().expect("a UTF-8 path"),
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{hba}\n"),
        )
        .expect("write pg_hba.conf");
        let mut settings = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nmax_connections = 40\nshared_buffers = 16MB\n",
            cluster.dir.display()
        );
        settings.push_str(conf);
        let postgresql_conf = data.join("postgresql.conf");
        let mut all = std::fs::read_to_string(&postgresql_conf).expect("read postgresql.conf");
        all.push_str(&settings);
        std::fs::write(&postgresql_conf, all).expect("write postgresql.conf");
        for (name, contents) in files {
            let path = data.join(name);
            std::fs::write(&path, contents).expect("write a file of the cluster");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
        }
        cluster.give_to_postgres();
        run(
            &bin("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("a UTF-8 path"),
                "-l",
                cluster.dir.join("log").to_str().expect("a UTF-8 path"),
                "-w",
                "-t",
                "120",
                "start",
            ],
        );
        cluster
    }

    /// The superuser's URL (with its password) for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Run SQL as the superuser over the cluster's Unix socket (trust).
    pub fn psql(&self, sql: &str) {
        run(
            &bin("psql"),
            &[
                "-h",
                self.dir.to_str().expect("a UTF-8 path"),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let program = bin("pg_ctl");
            let args = [
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ];
            let _ = if is_root() {
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(&program)
                    .args(args)
                    .output()
            } else {
                Command::new(&program).args(args).output()
            };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
