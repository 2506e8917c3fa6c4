//! The server's settings and the connection, when they are not what
//! Conveyor needs: a server that never answers at open, a closed port,
//! wrong credentials, an unknown role or database, missing rights (each
//! with its error kind, and no password in any text), TLS modes,
//! system schemas, reads that must not create, a least-privilege role, and
//! connections released by `close`.
//!
//! Shared-server cases use the test server (`CONVEYOR_POSTGRES_URL`, else
//! `postgres://postgres@127.0.0.1:5432/test`, trust auth) in schemas and
//! roles of their own, removed at the end; password and TLS cases start a
//! private cluster (`common::cluster`), stopped at the end.

mod common;

use common::cluster::{self, Cluster};
use conveyor_conformance::proxy::{closed_port, SilentServer};
use conveyor_conformance::tls::TestCerts;
use conveyor_core::backend::BrokerUrl;
use conveyor_core::prelude::*;
use conveyor_core::{BrokerOptions, Error, ErrorKind, GroupConfig, Record, TopicConfig};
use conveyor_postgres::{PgBroker, PgOptions};
use sqlx::Connection;
use std::time::{Duration, Instant};

/// `e`'s message, source chain and `Debug` output.
fn every_text(e: &Error) -> String {
    format!("{e}\n{}\n{e:?}", e.chain())
}

/// No text of `e` shows `secret`.
fn assert_hidden(e: &Error, secret: &str) {
    let text = every_text(e);
    eprintln!("{text}\n");
    assert!(!text.contains(secret), "the password shows: {text}");
}

/// The message says it once: no sentence of the driver's repeated.
fn assert_said_once(e: &Error) {
    let chain = e.chain().to_string();
    let message = e.message();
    let tail = &message[message.len().saturating_sub(30)..];
    assert_eq!(
        chain.matches(tail).count(),
        1,
        "said more than once: {chain}"
    );
    assert!(
        !chain.to_lowercase().contains("retry"),
        "a non-retriable error must not say to retry: {chain}"
    );
}

/// The shared test server's URL with `user` (and `password`) instead.
fn url_as(user: &str, password: Option<&str>) -> String {
    let mut url = url::Url::parse(&common::url()).expect("CONVEYOR_POSTGRES_URL is a URL");
    url.set_username(user).expect("a user");
    url.set_password(password).expect("a password");
    url.to_string()
}

/// A superuser connection to the shared server; fails with how to get one.
async fn admin() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&common::url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: these tests need PostgreSQL: set CONVEYOR_POSTGRES_URL, or start the local \
                 server at {} (e.g. `pg_ctlcluster 15 main start`)",
                common::url()
            )
        })
}

/// Fail at once, saying how to get one, if the shared server is not there.
async fn require_server() {
    let _ = admin().await.close().await;
}

/// Run `sql` on the shared server as its superuser.
async fn admin_sql(sql: &str) {
    use sqlx::Executor;
    let mut conn = admin().await;
    conn.execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
}

/// Run `sql` on the shared server, from a runtime of its own (for `Drop`).
fn cleanup_sql(sql: String) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                use sqlx::Executor;
                // A few tries: a busy server may refuse a connection, or
                // pick this statement as a deadlock victim.
                for _ in 0..5 {
                    match sqlx::PgConnection::connect(&common::url()).await {
                        Ok(mut conn) => match conn.execute(sql.as_str()).await {
                            Ok(_) => return,
                            Err(e) => eprintln!("cleanup `{sql}`: {e}"),
                        },
                        Err(e) => eprintln!("cleanup `{sql}`: {e}"),
                    }
                }
            });
        }
    })
    .join();
}

/// How many schemas are named `schema` (0 or 1).
async fn schemas_named(conn: &mut sqlx::PgConnection, schema: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1")
        .bind(schema)
        .fetch_one(conn)
        .await
        .expect("count schemas")
}

/// Wait until no connection named `name` is left (a close releases
/// them in a task of its own); fail, saying what they do, after 30 s.
async fn wait_until_released(conn: &mut sqlx::PgConnection, name: &str) {
    let started = Instant::now();
    loop {
        let open = connections_named(conn, name).await;
        if open == 0 {
            return;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let doing = connections_doing(conn, name).await;
            panic!("{open} connections still open after close: {doing:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many server connections carry `application_name`.
async fn connections_named(conn: &mut sqlx::PgConnection, name: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(name)
        .fetch_one(conn)
        .await
        .expect("count connections")
}

/// What the server's connections with `application_name` are doing.
async fn connections_doing(conn: &mut sqlx::PgConnection, name: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT coalesce(state, ''),
                coalesce(query, '') || ' (started ' || backend_start::text || ', last change '
                  || coalesce(state_change::text, '-') || ', now ' || now()::text
                  || ', ssl ' || coalesce((SELECT ssl::text FROM pg_stat_ssl s WHERE s.pid = a.pid), '?')
                  || ', port ' || coalesce(client_port::text, '-') || ')'
           FROM pg_stat_activity a
          WHERE application_name = $1",
    )
    .bind(name)
    .fetch_all(conn)
    .await
    .expect("list connections")
}

/// A schema (and roles) dropped at the end of the test, passed or failed.
struct Cleanup {
    schema: String,
    roles: Vec<String>,
}

impl Cleanup {
    fn new(prefix: &str) -> Self {
        Cleanup {
            schema: common::unique_schema(prefix),
            roles: Vec::new(),
        }
    }

    /// A new LOGIN role without rights, dropped at the end.
    async fn role(&mut self, prefix: &str) -> String {
        let role = common::unique_schema(prefix);
        admin_sql(&format!("CREATE ROLE \"{role}\" LOGIN")).await;
        self.roles.push(role.clone());
        role
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup_sql(format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema));
        for role in &self.roles {
            cleanup_sql(format!("DROP OWNED BY \"{role}\" CASCADE"));
            cleanup_sql(format!("DROP ROLE IF EXISTS \"{role}\""));
        }
    }
}

/// §7: opening against a server that accepts the connection and never
/// answers ends at the deadline with `Unavailable` (it hung for good
/// before: the schema connection had no deadline), and shows no password.
#[tokio::test]
async fn open_against_a_silent_server_is_unavailable_at_its_deadline() {
    let silent = SilentServer::start().await.expect("a loopback port");
    for migrate in ["true", "false"] {
        let url = BrokerUrl::parse(&format!(
            "postgres://app:pgs3cret@127.0.0.1:{}/db?timeout_ms=1000&migrate={migrate}",
            silent.port()
        ))
        .unwrap();
        let started = Instant::now();
        let e = conveyor_postgres::open_url(&url)
            .await
            .err()
            .expect("a silent server cannot be opened");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "open took {:?}, ten times its timeout",
            started.elapsed()
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.message().contains("did not answer"), "{e}");
        assert!(e.message().contains("127.0.0.1"), "names the server: {e}");
        assert_hidden(&e, "pgs3cret");
        // migrate() has the same deadline.
        let started = Instant::now();
        let e = conveyor_postgres::migrate_url(&url).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_hidden(&e, "pgs3cret");
    }
}

/// §7: a closed port is `Unavailable` (retriable) and shows no password.
#[tokio::test]
async fn open_against_a_closed_port_is_unavailable_and_hides_the_password() {
    let port = closed_port().expect("a loopback port");
    let url = BrokerUrl::parse(&format!(
        "postgres://app:pgs3cret@127.0.0.1:{port}/db?timeout_ms=5000"
    ))
    .unwrap();
    let started = Instant::now();
    let e = conveyor_postgres::open_url(&url)
        .await
        .err()
        .expect("closed");
    assert!(started.elapsed() < Duration::from_secs(50));
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retriable());
    assert!(e.message().contains("127.0.0.1"), "names the server: {e}");
    assert!(e.message().contains("refused"), "says why: {e}");
    assert_hidden(&e, "pgs3cret");
    // A bad option of the same URL: the URL is shown, not its password.
    let bad = BrokerUrl::parse(&format!(
        "postgres://app:pgs3cret@127.0.0.1:{port}/db?timeout_ms=soon"
    ))
    .unwrap();
    let e = conveyor_postgres::open_url(&bad).await.err().expect("bad");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_hidden(&e, "pgs3cret");
}

/// Wrong password and unknown role are `Unauthenticated`, an unknown
/// database `InvalidArgument`, each said once, naming what to fix, never
/// showing the password (ours, or the right one), against a private
/// cluster with scram-sha-256 password auth.
#[tokio::test]
async fn wrong_credentials_unknown_role_and_unknown_database_say_whose_fault() {
    let c = Cluster::start("host all all 127.0.0.1/32 scram-sha-256", "", &[]);
    let open = |url: String| async move {
        let url = BrokerUrl::parse(&format!("{url}?timeout_ms=20000&migrate=true")).unwrap();
        conveyor_postgres::open_url(&url).await
    };
    let wrong = format!("postgres://postgres:pgs3cret@127.0.0.1:{}/postgres", c.port);
    let e = open(wrong).await.err().expect("a wrong password");
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert!(!e.is_retriable());
    assert!(e.message().contains("password"), "{e}");
    assert_hidden(&e, "pgs3cret");
    assert_said_once(&e);

    let nobody = format!("postgres://nobody:pgs3cret@127.0.0.1:{}/postgres", c.port);
    let e = open(nobody).await.err().expect("an unknown role");
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert_hidden(&e, "pgs3cret");
    assert_said_once(&e);

    let e = open(c.url("no_such_db"))
        .await
        .err()
        .expect("an unknown db");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("no_such_db"), "{e}");
    assert!(e.message().contains("database name"), "{e}");
    assert_hidden(&e, cluster::SUPERUSER_PASSWORD);
    assert_said_once(&e);

    // The right password works, and errors after connecting hide it too.
    let b = open(c.url("postgres")).await.unwrap();
    b.close().await.unwrap();
    let url = BrokerUrl::parse(&format!("{}?schema=never_made", c.url("postgres"))).unwrap();
    let e = conveyor_postgres::open_url(&url)
        .await
        .err()
        .expect("no schema");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_hidden(&e, cluster::SUPERUSER_PASSWORD);
}

/// A role without rights on the schema: `PermissionDenied`, pointing at
/// the GRANTs, not `Internal`.
#[tokio::test]
async fn missing_rights_are_permission_denied() {
    require_server().await;
    let mut cleanup = Cleanup::new("perm");
    conveyor_postgres::migrate(
        &common::url(),
        &PgOptions::default().with_schema(cleanup.schema.clone()),
    )
    .await
    .unwrap();
    let role = cleanup.role("cv_norights").await;
    let pg = PgOptions::default().with_schema(cleanup.schema.clone());
    let e = conveyor_postgres::open(&url_as(&role, None), BrokerOptions::default(), pg.clone())
        .await
        .expect_err("no rights");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.message().contains("GRANT"), "{e}");
    assert_said_once(&e);
    // USAGE on the schema but no table rights: still PermissionDenied.
    admin_sql(&format!(
        "GRANT USAGE ON SCHEMA \"{}\" TO \"{role}\"",
        cleanup.schema
    ))
    .await;
    let e = conveyor_postgres::open(&url_as(&role, None), BrokerOptions::default(), pg)
        .await
        .expect_err("no table rights");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
}

/// TLS against a private cluster with `ssl = on` and a certificate made
/// for the test: `sslmode=require` works (and the connection is
/// encrypted), `verify-full` with the right CA works, with a wrong CA it
/// is refused with a clear error, `verify-ca` checks only the CA, a client
/// certificate (`sslcert`, `sslkey`) passes `cert` authentication, and a
/// `hostssl`-only rule refuses `sslmode=disable` saying TLS is required.
#[tokio::test]
async fn tls_modes_against_a_server_with_a_test_certificate() {
    let certs = TestCerts::generate("certuser");
    let (ca, wrong_ca) = (certs.ca.clone(), certs.other_ca.clone());
    let cert = std::fs::read(&certs.server_cert).unwrap();
    let key = std::fs::read(&certs.server_key).unwrap();
    let (client_cert, client_key) = (certs.client_cert.clone(), certs.client_key.clone());
    let ca_pem = std::fs::read(&ca).unwrap();
    let c = Cluster::start(
        "hostssl all tlsonly 127.0.0.1/32 trust\n\
         hostssl all certuser 127.0.0.1/32 cert\n\
         host all postgres 127.0.0.1/32 trust",
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
         ssl_ca_file = 'root.crt'\n",
        &[
            ("server.crt", cert),
            ("server.key", key),
            ("root.crt", ca_pem),
        ],
    );
    c.psql("CREATE ROLE tlsonly LOGIN SUPERUSER");
    c.psql("CREATE ROLE certuser LOGIN SUPERUSER");
    let open = |user: &str, host: &str, query: String| {
        let url = format!(
            "postgres://{user}@{host}:{}/postgres?timeout_ms=20000&migrate=true&{query}",
            c.port
        );
        async move { conveyor_postgres::open_url(&BrokerUrl::parse(&url).unwrap()).await }
    };
    let use_it = |b: std::sync::Arc<dyn Broker>| async move {
        b.create_topic("t", TopicConfig::new(1)).await.unwrap_or(());
        b.close().await.unwrap();
    };

    let b = open("postgres", "127.0.0.1", "sslmode=require".into())
        .await
        .unwrap();
    use_it(b).await;
    // The connection is encrypted (asked through a raw connection with the
    // same options).
    let mut raw = sqlx::PgConnection::connect(&format!(
        "postgres://tlsonly@127.0.0.1:{}/postgres?sslmode=require",
        c.port
    ))
    .await
    .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert!(ssl);
    let _ = raw.close().await;

    let right = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let b = open("tlsonly", "localhost", right.clone()).await.unwrap();
    use_it(b).await;

    // verify-ca checks the CA, not the name.
    let b = open(
        "tlsonly",
        "127.0.0.1",
        format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    )
    .await
    .unwrap();
    use_it(b).await;
    // Client certificate authentication (`cert` in pg_hba.conf).
    let b = open(
        "certuser",
        "localhost",
        format!(
            "{right}&sslcert={}&sslkey={}",
            client_cert.display(),
            client_key.display()
        ),
    )
    .await
    .unwrap();
    use_it(b).await;
    let e = open("certuser", "localhost", right.clone())
        .await
        .err()
        .expect("no client certificate");
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");

    let wrong = format!("sslmode=verify-full&sslrootcert={}", wrong_ca.display());
    let e = open("tlsonly", "localhost", wrong)
        .await
        .err()
        .expect("a certificate from another CA");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("TLS"), "{e}");
    assert!(
        e.message().contains("sslrootcert"),
        "names what to check: {e}"
    );

    let e = open("tlsonly", "127.0.0.1", "sslmode=disable".into())
        .await
        .err()
        .expect("hostssl only");
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert!(e.message().contains("sslmode=require"), "{e}");
    assert_said_once(&e);

    let e = open("postgres", "127.0.0.1", "sslmode=sometimes".into())
        .await
        .err()
        .expect("no such mode");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

/// `public`, `information_schema`, `pg_catalog`, `pg_toast` are refused
/// before anything is created; `drop_schema` drops only a schema Conveyor
/// created, never one that was there before.
#[tokio::test]
async fn system_schemas_are_refused_and_only_conveyors_schema_is_dropped() {
    require_server().await;
    for schema in ["public", "information_schema", "pg_catalog", "pg_toast"] {
        for migrate in [true, false] {
            let pg = PgOptions::default()
                .with_schema(schema)
                .with_migrate(migrate);
            let e = conveyor_postgres::open(&common::url(), BrokerOptions::default(), pg.clone())
                .await
                .expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{schema}: {e}");
            assert!(e.message().contains("system or shared"), "{e}");
            let e = conveyor_postgres::migrate(&common::url(), &pg)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{schema}: {e}");
        }
    }
    let mut conn = admin().await;
    let public_tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename IN ('topics', 'records')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(public_tables, 0, "nothing went into public");

    // A schema the user made: Conveyor may use it, but never drops it.
    let cleanup = Cleanup::new("theirs");
    admin_sql(&format!("CREATE SCHEMA \"{}\"", cleanup.schema)).await;
    let b = common::open(&cleanup.schema, BrokerOptions::default())
        .await
        .unwrap();
    let e = b.drop_schema().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("did not create"), "{e}");
    b.close().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1")
        .bind(&cleanup.schema)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 1, "the user's schema is still there");

    // One Conveyor created: dropped.
    let ours = Cleanup::new("ours");
    let b = common::open(&ours.schema, BrokerOptions::default())
        .await
        .unwrap();
    b.drop_schema().await.unwrap();
    b.close().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1")
        .bind(&ours.schema)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "Conveyor's schema is dropped");
    let _ = conn.close().await;
}

/// A mistyped schema in a read (what `conveyor group lag` opens) creates
/// nothing: the open fails naming the schema and the command to run.
/// `auto_create=true` (development) and `migrate=true` still create.
#[tokio::test]
async fn opening_without_migrate_never_creates_a_schema() {
    require_server().await;
    let typo = Cleanup::new("ux_typo");
    let url = BrokerUrl::parse(&format!("{}?schema={}", common::url(), typo.schema)).unwrap();
    let e = conveyor_postgres::open_url(&url).await.err().expect("typo");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains(&typo.schema), "{e}");
    assert!(e.message().contains("migrate"), "names the command: {e}");
    let mut conn = admin().await;
    assert_eq!(
        schemas_named(&mut conn, &typo.schema).await,
        0,
        "created nothing"
    );
    // An empty schema (made by hand): no tables made either.
    admin_sql(&format!("CREATE SCHEMA \"{}\"", typo.schema)).await;
    let e = conveyor_postgres::open_url(&url)
        .await
        .err()
        .expect("empty");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("no Conveyor tables"), "{e}");
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = $1")
        .bind(&typo.schema)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(tables, 0);

    for option in ["auto_create=true", "migrate=true"] {
        let dev = Cleanup::new("dev");
        let url =
            BrokerUrl::parse(&format!("{}?schema={}&{option}", common::url(), dev.schema)).unwrap();
        let b = conveyor_postgres::open_url(&url).await.unwrap();
        b.close().await.unwrap();
        assert_eq!(schemas_named(&mut conn, &dev.schema).await, 1, "{option}");
    }
    let _ = conn.close().await;
}

/// The GRANTs the crate docs list are enough to produce and consume in
/// stream and queue mode, opening with and without `migrate=true` once
/// the owner migrated; the role cannot run DDL (create the schema, a
/// table).
#[tokio::test]
async fn a_least_privilege_role_produces_and_consumes_but_cannot_run_ddl() {
    require_server().await;
    let mut cleanup = Cleanup::new("least");
    let schema = cleanup.schema.clone();
    conveyor_postgres::migrate(&common::url(), &PgOptions::default().with_schema(&schema))
        .await
        .unwrap();
    let role = cleanup.role("cv_app").await;
    // Exactly the GRANTs of the crate docs ("Server settings and rights").
    for grant in [
        "GRANT USAGE ON SCHEMA {s} TO {r}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r}",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} TO {r}",
    ] {
        admin_sql(
            &grant
                .replace("{s}", &format!("\"{schema}\""))
                .replace("{r}", &format!("\"{role}\"")),
        )
        .await;
    }
    let app_url = url_as(&role, None);
    for (round, migrate) in [false, true].into_iter().enumerate() {
        let b: PgBroker = conveyor_postgres::open(
            &app_url,
            BrokerOptions::default(),
            PgOptions::default()
                .with_schema(&schema)
                .with_migrate(migrate),
        )
        .await
        .unwrap_or_else(|e| panic!("migrate={migrate}: {e}"));
        let topic = format!("t{round}");
        b.create_topic(&topic, TopicConfig::new(2)).await.unwrap();
        let p = b.producer().await.unwrap();
        for i in 0..4 {
            p.send(&topic, Record::new(format!("m{i}"))).await.unwrap();
        }
        for (mode, config) in [
            ("stream", GroupConfig::stream()),
            ("queue", GroupConfig::queue()),
        ] {
            let group = format!("g{round}_{mode}");
            let c = b.consumer(&group, &[&topic], config).await.unwrap();
            let mut seen = 0;
            let started = Instant::now();
            while seen < 4 {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "got {seen} of 4"
                );
                for m in c.poll(10, Duration::from_secs(1)).await.unwrap() {
                    c.ack(&m).await.unwrap();
                    seen += 1;
                }
            }
            c.close().await.unwrap();
        }
        b.idempotency_store()
            .first_seen("k", Duration::from_secs(60))
            .await
            .unwrap();
        // No DDL: neither a table in the schema nor dropping it.
        let e = sqlx::query(&format!("CREATE TABLE \"{schema}\".x (a int)"))
            .execute(b.pool())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("permission denied"), "{e}");
        let e = b.drop_schema().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        b.close().await.unwrap();
    }
    // Nor create a schema of its own.
    let fresh = Cleanup::new("least_fresh");
    let e = conveyor_postgres::migrate(&app_url, &PgOptions::default().with_schema(&fresh.schema))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
}

/// `close` releases every PostgreSQL connection the broker opened, while
/// its producers and consumers are still held (two stayed open before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_releases_every_connection_while_handles_live() {
    require_server().await;
    let cleanup = Cleanup::new("close");
    let name = format!("cv_close_{}", cleanup.schema);
    let url = format!("{}?application_name={name}", common::url());
    let b = conveyor_postgres::open(
        &url,
        BrokerOptions::default(),
        PgOptions::default()
            .with_schema(&cleanup.schema)
            .with_migrate(true),
    )
    .await
    .unwrap();
    b.create_topic("t", TopicConfig::new(1)).await.unwrap();
    let p = b.producer().await.unwrap();
    p.send("t", Record::new("x")).await.unwrap();
    let c = b.consumer("g", &["t"], GroupConfig::queue()).await.unwrap();
    assert_eq!(c.poll(1, Duration::from_secs(5)).await.unwrap().len(), 1);
    let s = b
        .consumer("gs", &["t"], GroupConfig::stream())
        .await
        .unwrap();
    assert_eq!(s.poll(1, Duration::from_secs(5)).await.unwrap().len(), 1);
    // A poll waiting for more when the broker closes.
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move { s.poll(1, Duration::from_secs(3)).await })
    };
    let store = b.idempotency_store();
    store
        .first_seen("k", Duration::from_secs(60))
        .await
        .unwrap();
    let mut conn = admin().await;
    assert!(
        connections_named(&mut conn, &name).await > 0,
        "the broker is connected"
    );
    b.close().await.unwrap();
    wait_until_released(&mut conn, &name).await;
    // The handles still live, and say the broker is closed.
    assert_eq!(
        p.send("t", Record::new("y")).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    let _ = waiting.await;
    drop((p, c, s, store));
    let _ = conn.close().await;
    common::drop_schema(&cleanup.schema).await;
}

/// `close` cut at its deadline (here a connection of the broker's pool
/// is held by the application, so the pool cannot finish closing in time)
/// still releases every connection once it is given back, while the
/// broker's handles live: an interrupted pool close left the idle
/// connections open for as long as any handle kept the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_cut_at_its_deadline_still_releases_every_connection() {
    require_server().await;
    let cleanup = Cleanup::new("close_cut");
    let name = format!("cv_cut_{}", cleanup.schema);
    let url = format!("{}?application_name={name}", common::url());
    conveyor_postgres::migrate(
        &common::url(),
        &PgOptions::default().with_schema(&cleanup.schema),
    )
    .await
    .unwrap();
    // A short deadline, so that the close below is cut at it.
    let b = conveyor_postgres::open(
        &url,
        BrokerOptions::default(),
        PgOptions::default()
            .with_schema(&cleanup.schema)
            .with_timeout(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    b.create_topic("t", TopicConfig::new(4)).await.unwrap();
    let p = b.producer().await.unwrap();
    // Several pooled connections, idle after this.
    let sends: Vec<_> = (0..8)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.send("t", Record::new(format!("{i}"))).await })
        })
        .collect();
    for s in sends {
        s.await.unwrap().unwrap();
    }
    let held = b.pool().acquire().await.unwrap();
    let mut conn = admin().await;
    assert!(connections_named(&mut conn, &name).await > 1);
    let started = Instant::now();
    let closed = b.close().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    // Cut at the deadline or not, the broker is closed.
    if let Err(e) = closed {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    }
    drop(held);
    wait_until_released(&mut conn, &name).await;
    assert_eq!(
        p.send("t", Record::new("y")).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    drop(p);
    let _ = conn.close().await;
    common::drop_schema(&cleanup.schema).await;
}
