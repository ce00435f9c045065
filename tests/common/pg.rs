//! A real PostgreSQL server for the PostgreSQL source's tests: a fresh cluster (`initdb`)
//! in a temporary folder, started on a free loopback port with `wal_level = logical`,
//! crashed (`SIGQUIT`: an immediate shutdown, recovered from the WAL on the next start)
//! and restarted on the same port and data, and stopped when dropped. Its log is drained
//! by a thread into lines a failing test prints.
//!
//! The binaries come from `$PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` (Debian's
//! `postgresql` package, which `scripts/test` installs when missing), else `pg_config
//! --bindir`. PostgreSQL refuses to run as root: as root, the server runs as the
//! `postgres` user, which owns the temporary folder.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::server_log::{self, Log};

/// How long the server may take to accept connections (crash recovery replays the WAL).
const START_WITHIN: Duration = Duration::from_secs(30);

/// The superuser the cluster is made with (`trust` authentication on loopback).
pub const SUPERUSER: &str = "postgres";

/// A running PostgreSQL server (or a crashed one, until [`PgServer::restart`]).
pub struct PgServer {
    child: Option<Child>,
    /// Fixed at the first start so that clients reconnect to the restarted server.
    port: u16,
    /// Holds `data/` (the cluster) and the server's Unix socket; removed on drop.
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `(uid, gid)` of `postgres` when the tests run as root.
    user: Option<(u32, u32)>,
    /// Every log line of every run, to print when a test fails.
    pub log: Log,
    /// `-c` settings beyond the defaults (`ssl=on`), kept across restarts.
    settings: Vec<String>,
}

/// The folder with `initdb` and `postgres`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    bin.join("initdb").is_file().then_some(bin)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `(uid, gid)` of the `postgres` user, when this process is root.
fn run_as() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("runs `id`");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!("running as root needs a `postgres` user to run PostgreSQL as")
            })
    };
    Some((id("-u"), id("-g")))
}

impl PgServer {
    /// Makes a cluster and starts it; waits until it accepts connections.
    pub fn start() -> PgServer {
        let server = PgServer::init();
        server.spawned()
    }

    /// Like [`PgServer::start`], with TLS: `cert_pem` (the server's certificate chain) and
    /// `key_pem` (its private key) become the data folder's `server.crt` and `server.key`
    /// (PostgreSQL's defaults for `ssl_cert_file`/`ssl_key_file`; the key readable by the
    /// server's user only, as PostgreSQL demands), and `ssl = on`.
    pub fn start_with_tls(cert_pem: &[u8], key_pem: &[u8]) -> PgServer {
        use std::os::unix::fs::PermissionsExt;
        let mut server = PgServer::init();
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = server.data().join(name);
            std::fs::write(&path, pem).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = server.user {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        server.settings.push("ssl=on".into());
        server.spawned()
    }

    fn spawned(mut self) -> PgServer {
        self.spawn();
        self
    }

    /// A fresh cluster, not started.
    fn init() -> PgServer {
        let bin = bin_dir().expect(
            "PostgreSQL's initdb not found: install Debian's `postgresql` package \
             (scripts/test does) or set PG_BIN",
        );
        let dir = tempfile::tempdir().unwrap();
        let user = run_as();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let server = PgServer {
            child: None,
            port: free_port(),
            dir,
            bin,
            user,
            log: Arc::default(),
            settings: Vec::new(),
        };
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(server.data())
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale", "C"])
            .output()
            .expect("runs initdb");
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server
    }

    /// The cluster's data folder.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// `psql` connected to database `db` over loopback, quiet, stopping at the first
    /// error; add `-c SQL` or `-f FILE`.
    pub fn psql_command(&self, db: &str) -> Command {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", db]);
        cmd
    }

    /// Runs `sql` (one or more statements, one transaction) with `psql` in database `db`:
    /// what psql printed (unaligned, tuples only, `|`-separated), or its error message.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self
            .psql_command(db)
            .args(["-c", sql])
            .output()
            .expect("runs psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// [`PgServer::try_psql`] that panics with psql's message if a statement fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql failed on {sql:?}:\n{e}"))
    }

    /// Runs the SQL file at `path` with `psql -f` in database `db` (as a user following the
    /// README would; each statement commits by itself); panics with psql's message if a
    /// statement fails.
    pub fn psql_file(&self, db: &str, path: &Path) {
        let out = self
            .psql_command(db)
            .arg("-f")
            .arg(path)
            .output()
            .expect("runs psql");
        assert!(
            out.status.success(),
            "psql -f {} failed:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates database `name`.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }

    /// An immediate shutdown (SIGQUIT): no checkpoint, every backend dies at once, and the
    /// next start recovers from the WAL, as after a crash.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Crashes the server if it runs, then starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.crash();
        self.spawn();
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        server_log::tail(&self.log, n)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn spawn(&mut self) {
        let socket_dir: &Path = self.dir.path();
        let mut child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-c", &format!("port={}", self.port)])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", socket_dir.display()))
            .args(["-c", "wal_level=logical"])
            .args(["-c", "max_replication_slots=16"])
            .args(["-c", "max_wal_senders=16"])
            .args(["-c", "max_connections=200"])
            // Durability against a crash of the server process only: the OS keeps what
            // was written, so fsync buys nothing in these tests and costs seconds.
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run postgres: {e}"));
        let stderr = child.stderr.take().unwrap();
        self.child = Some(child);
        server_log::drain_until_ready(
            "postgres",
            stderr,
            &self.log,
            "ready to accept connections",
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            START_WITHIN,
        );
    }
}

/// The gateway's config on the PostgreSQL database at `url`: users looked up by email,
/// orders routed to their business's owner (`owner._id`; deletes too), `source_extra` in
/// `[source]`, `routes` appended, a durable history in `history_dir`.
pub fn gateway_config(url: &str, source_extra: &str, routes: &str, history_dir: &Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[source]
type = "postgres"
url = "{url}"
{source_extra}

[auth]
jwt_secret = "{SECRET}"
user = {{ claim = "user_id", lookup = "users", where = {{ email = "$claim" }}, pick = "_id" }}

[history]
max_per_user = 1000
path = "{history}"

[[route]]
name = "orders"
collection = "orders"
on = ["insert", "update", "delete"]
to = {{ lookup = "businesses", where = {{ _id = "$creator_id" }}, pick = "owner._id" }}
{routes}
"#,
        SECRET = super::SECRET,
        history = history_dir.join("history.db").display(),
    )
}

impl Drop for PgServer {
    fn drop(&mut self) {
        server_log::print_if_panicking("postgres", &self.log);
        // A fast shutdown (SIGINT) so that no backend outlives the folder it runs in.
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
