//! TLS on the PostgreSQL source's connections, against a real PostgreSQL server started
//! with `ssl = on` and a certificate signed by a CA made here with the `openssl` CLI
//! (tests/common/pg.rs), the real gateway on 127.0.0.1:0 and real WebSocket clients.
//! `sslmode` and `sslrootcert` are the URL's, as libpq's. Each test has a server of its
//! own. The plaintext `disable`/`prefer` paths are also covered by every test in
//! tests/postgres_source.rs (their URLs name no `sslmode`: `prefer`, against a server
//! without TLS).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::pg::PgServer;
use common::*;

/// Users, businesses (owner as jsonb) and orders; u1 owns b1.
const SCHEMA: &str = r#"
CREATE TABLE users (_id text PRIMARY KEY, email text NOT NULL, business_id text);
CREATE TABLE businesses (_id text PRIMARY KEY, owner jsonb);
CREATE TABLE orders (_id text PRIMARY KEY, creator_id text, status text);
INSERT INTO users VALUES ('u1', 'amina@kanograins.example', 'b1');
INSERT INTO businesses VALUES ('b1', '{"_id": "u1"}');
"#;

/// A CA (`ca.crt`) and a server certificate it signed for `names` (`server.crt`,
/// `server.key`), made with the `openssl` CLI in `dir`.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// `ca_name`: the CA's common name (two CAs of one name are told apart only by their
    /// signatures); `sans`: the server certificate's subjectAltName
    /// (`DNS:localhost,IP:127.0.0.1`).
    fn make(dir: &Path, ca_name: &str, sans: &str) -> Certs {
        let subject = format!("/CN={ca_name}");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("runs the openssl CLI");
            assert!(
                out.status.success(),
                "openssl {args:?} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", &subject];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
        ca.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        run(&ca);
        let mut csr = vec!["req", "-subj", "/CN=changecast test server"];
        csr.extend(ec);
        csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
        run(&csr);
        std::fs::write(
            dir.join("server.ext"),
            format!(
                "subjectAltName={sans}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        Certs {
            dir: dir.to_owned(),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A server with TLS on, with this certificate, database `db` and [`SCHEMA`].
    fn server(&self, db: &str) -> PgServer {
        let read = |name: &str| std::fs::read(self.dir.join(name)).unwrap();
        let pg = PgServer::start_with_tls(&read("server.crt"), &read("server.key"));
        pg.create_db(db);
        pg.psql(db, SCHEMA);
        pg
    }
}

/// A server without TLS, with database `db` and [`SCHEMA`].
fn plain_server(db: &str) -> PgServer {
    let pg = PgServer::start();
    pg.create_db(db);
    pg.psql(db, SCHEMA);
    pg
}

/// The gateway's config on `url` ([`common::pg::gateway_config`]), slot and publication
/// `slot`.
fn config(url: &str, slot: &str, history_dir: &Path) -> String {
    let source = format!("slot = \"{slot}\"\npublication = \"{slot}\"");
    common::pg::gateway_config(url, &source, "", history_dir)
}

/// `backend_type|ssl` of every connection named `changecast`, sorted.
fn changecast_connections(pg: &PgServer, db: &str) -> Vec<String> {
    let out = pg.psql(
        db,
        "SELECT a.backend_type || CASE WHEN s.ssl THEN '|t' ELSE '|f' END FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'changecast' \
         ORDER BY 1",
    );
    out.lines().map(str::to_owned).collect()
}

/// Runs `changecast check --connect --config <file>` on `config`.
async fn check(config: String) -> (i32, String) {
    common::binary::check(config, &["--connect"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_test_ca_streams_over_tls_on_the_replication_and_query_connections() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(
        dir.path(),
        "changecast test CA",
        "DNS:localhost,IP:127.0.0.1",
    );
    let pg = certs.server("tls");
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("tls"),
        certs.ca().display()
    );
    let history = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&url, "tls", history.path())).await;
    gw.ready().await;
    // The WebSocket's user is resolved by a lookup: a query connection.
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql("tls", "INSERT INTO orders VALUES ('o1', 'b1', 'pending')");
    let ev = u1.change().await;
    assert_eq!(ev["key"], "o1", "{ev}");
    assert_eq!(ev["doc"]["status"], "pending", "{ev}");

    // The server sees every changecast connection encrypted: the walsender (the slot's
    // reader) and the ordinary backends (lookups, the retained-WAL gauge).
    let conns = changecast_connections(&pg, "tls");
    assert!(conns.contains(&"walsender|t".to_string()), "{conns:?}");
    assert!(conns.contains(&"client backend|t".to_string()), "{conns:?}");
    assert!(conns.iter().all(|c| c.ends_with("|t")), "{conns:?}");
    gw.stop().await;

    // `check` says how each connection is secured.
    let (code, out) = check(config(&url, "tls", history.path())).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("sslmode=verify-full")
            && out.contains("query connection: TLS")
            && out.contains("replication connection: TLS"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_another_ca_keeps_readyz_down_saying_the_certificate_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(
        dir.path(),
        "changecast test CA",
        "DNS:localhost,IP:127.0.0.1",
    );
    let other = tempfile::tempdir().unwrap();
    let other = Certs::make(other.path(), "another CA", "DNS:localhost");
    let pg = certs.server("wrongca");
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("wrongca"),
        other.ca().display()
    );
    let history = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&url, "wrongca", history.path())).await;
    let body = gw.down_saying("certificate not trusted").await;
    assert!(
        body.contains(&format!(
            "the server's certificate is not signed by a CA in {}",
            other.ca().display()
        )),
        "{body}"
    );
    // Nothing was set up through an untrusted connection.
    assert_eq!(
        pg.psql(
            "wrongca",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'wrongca'"
        )
        .trim(),
        "0"
    );
    gw.stop().await;

    let (code, out) = check(config(&url, "wrongca", history.path())).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("certificate not trusted"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let dir = tempfile::tempdir().unwrap();
    // Trusted, but for another name than the 127.0.0.1 the URL names.
    let certs = Certs::make(dir.path(), "changecast test CA", "DNS:db.example");
    let pg = certs.server("names");
    let history = tempfile::tempdir().unwrap();

    let url = |mode: &str| {
        format!(
            "{}?sslmode={mode}&sslrootcert={}",
            pg.url("names"),
            certs.ca().display()
        )
    };
    let gw = Gateway::start(&config(&url("verify-full"), "full", history.path())).await;
    gw.down_saying("certificate not valid for host `127.0.0.1`")
        .await;
    gw.stop().await;

    let history = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&url("verify-ca"), "ca", history.path())).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql("names", "INSERT INTO orders VALUES ('o1', 'b1', 'pending')");
    assert_eq!(u1.change().await["key"], "o1");
    let conns = changecast_connections(&pg, "names");
    assert!(conns.contains(&"walsender|t".to_string()), "{conns:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_against_a_server_without_tls_fails_clearly() {
    let pg = plain_server("require");
    let url = format!("{}?sslmode=require", pg.url("require"));
    let history = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&url, "require", history.path())).await;
    gw.down_saying("the server does not support TLS but sslmode=require")
        .await;
    gw.stop().await;

    let (code, out) = check(config(&url, "require", history.path())).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("the server does not support TLS but sslmode=require"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_uses_tls_when_offered_and_plaintext_when_not_and_disable_never() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(
        dir.path(),
        "changecast test CA",
        "DNS:localhost,IP:127.0.0.1",
    );
    for (tls, mode, encrypted) in [
        (true, "prefer", "t"),
        (false, "prefer", "f"),
        (true, "disable", "f"),
    ] {
        let pg = if tls {
            certs.server("prefer")
        } else {
            plain_server("prefer")
        };
        let url = format!("{}?sslmode={mode}", pg.url("prefer"));
        let history = tempfile::tempdir().unwrap();
        let gw = Gateway::start(&config(&url, "prefer", history.path())).await;
        gw.ready().await;
        let (mut u1, _) = Ws::user(&gw, "u1", None).await;
        pg.psql(
            "prefer",
            "INSERT INTO orders VALUES ('o1', 'b1', 'pending')",
        );
        assert_eq!(u1.change().await["key"], "o1", "tls={tls} {mode}");
        let conns = changecast_connections(&pg, "prefer");
        assert!(
            conns.contains(&format!("walsender|{encrypted}"))
                && conns.iter().all(|c| c.ends_with(encrypted)),
            "tls={tls} {mode}: {conns:?}"
        );
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_sslrootcert_stops_the_start_naming_the_file() {
    let history = tempfile::tempdir().unwrap();
    let missing = history.path().join("no-such-ca.crt");
    let url = format!(
        "postgres://postgres@127.0.0.1:1/db?sslmode=verify-full&sslrootcert={}",
        missing.display()
    );
    let (code, out) = check(config(&url, "x", history.path())).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("sslrootcert") && out.contains("no-such-ca.crt"),
        "{out}"
    );
}
