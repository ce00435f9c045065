//! A source backend for the shared scenario suite (tests/scenarios.rs): the Mercury schema
//! and seed on a real database, the Mercury config that streams it, and SQL writes as an
//! application makes them.
//!
//! - SQLite: `changecast::demo::create_database` on a file in a temp folder, the demo's own
//!   config (`changecast::demo::config_toml`), writes with rusqlite on that file.
//! - PostgreSQL: a real server ([`PgServer`]), database `mercury` loaded with
//!   `examples/postgres/schema.sql` by `psql -f`, the config derived from
//!   `examples/postgres/changecast.toml` (only the url, listen address, history path and
//!   secret replaced), writes with `psql`. So the example cannot rot: the suite runs it.
//!
//! Out: [`Backend::config`] (TOML with `listen = "127.0.0.1:0"`, history in the temp
//! folder, the harness's [`SECRET`]) and [`Backend::exec`] (one transaction per call).

use std::path::{Path, PathBuf};

use super::pg::PgServer;
use super::{Db, SECRET};

/// The database name the PostgreSQL example uses.
pub const PG_DB: &str = "mercury";

/// The example files, from the crate root.
pub fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/postgres")
        .join(file)
}

/// A database with the Mercury schema and seed, and the config that streams it.
pub enum Backend {
    Sqlite(Db),
    Postgres(PgBackend),
}

/// A real PostgreSQL server with the example loaded, and a folder for history.
pub struct PgBackend {
    pub server: PgServer,
    pub dir: tempfile::TempDir,
}

impl Backend {
    pub fn sqlite() -> Backend {
        Backend::Sqlite(Db::new())
    }

    /// Starts a server (blocking: a few seconds for `initdb`), creates `mercury` and loads
    /// the example schema and seed into it.
    pub fn postgres() -> Backend {
        let server = blocking(PgServer::start);
        server.create_db(PG_DB);
        server.psql_file(PG_DB, &example("schema.sql"));
        Backend::Postgres(PgBackend {
            server,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The folder for history and config files.
    pub fn dir(&self) -> &Path {
        match self {
            Backend::Sqlite(db) => db.dir.path(),
            Backend::Postgres(pg) => pg.dir.path(),
        }
    }

    /// The column type a JSON document is declared with (nested in events on both).
    pub fn json_type(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "JSON",
            Backend::Postgres(_) => "jsonb",
        }
    }

    /// Runs `sql` (one or more statements) as one transaction, from a connection of its
    /// own as the application would. Inside a multi-threaded runtime the worker is handed
    /// off, so an in-process gateway keeps running meanwhile.
    pub fn exec(&self, sql: &str) {
        match self {
            Backend::Sqlite(db) => blocking(|| db.exec(&format!("BEGIN;\n{sql}\nCOMMIT;"))),
            Backend::Postgres(pg) => {
                blocking(|| pg.server.psql(PG_DB, sql));
            }
        }
    }

    /// A single-value query (`SELECT count(*) ...`) as text.
    pub fn query_one(&self, sql: &str) -> String {
        match self {
            Backend::Sqlite(db) => {
                let conn = rusqlite::Connection::open(&db.path).unwrap();
                conn.query_row(sql, [], |r| {
                    let v: rusqlite::types::Value = r.get(0)?;
                    Ok(match v {
                        rusqlite::types::Value::Integer(i) => i.to_string(),
                        rusqlite::types::Value::Real(f) => f.to_string(),
                        rusqlite::types::Value::Text(t) => t,
                        other => format!("{other:?}"),
                    })
                })
                .unwrap()
            }
            Backend::Postgres(pg) => blocking(|| pg.server.psql(PG_DB, sql)).trim().to_owned(),
        }
    }

    /// The Mercury config of this backend, to serve on 127.0.0.1:0 with history in
    /// [`Backend::dir`] and tokens signed with [`SECRET`].
    pub fn config(&self) -> String {
        match self {
            Backend::Sqlite(db) => changecast::demo::config_toml(&db.path, "127.0.0.1:0", SECRET),
            Backend::Postgres(pg) => {
                pg_config(&pg.server.url(PG_DB), &pg.dir.path().join("history.db"))
            }
        }
    }

    /// The PostgreSQL server, for the chaos tests' crashes and slot drops.
    pub fn pg(&mut self) -> &mut PgServer {
        match self {
            Backend::Postgres(pg) => &mut pg.server,
            Backend::Sqlite(_) => panic!("not a PostgreSQL backend"),
        }
    }
}

/// `examples/postgres/changecast.toml` for the server at `url`, listening on a free
/// loopback port, history at `history`, tokens signed with [`SECRET`]. Each replaced line
/// must be in the example as printed, so that an edit of the example fails here loudly.
pub fn pg_config(url: &str, history: &Path) -> String {
    let text = std::fs::read_to_string(example("changecast.toml")).unwrap();
    let replace = |text: String, from: &str, to: &str| -> String {
        assert!(
            text.contains(from),
            "examples/postgres/changecast.toml no longer has `{from}`"
        );
        text.replacen(from, to, 1)
    };
    let text = replace(
        text,
        r#"url = "postgres://postgres@127.0.0.1:5432/mercury""#,
        &format!("url = \"{url}\""),
    );
    let text = replace(
        text,
        r#"listen = "127.0.0.1:8080""#,
        r#"listen = "127.0.0.1:0""#,
    );
    let text = replace(
        text,
        r#"path = "history.db""#,
        &format!("path = \"{}\"", history.display()),
    );
    replace(
        text,
        r#"jwt_secret_env = "CHANGECAST_JWT_SECRET""#,
        &format!("jwt_secret = \"{SECRET}\""),
    )
}

/// Runs blocking work without starving a multi-threaded runtime's other tasks (the
/// in-process gateway); outside a runtime, or in a current-thread one, it just runs it.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
