//! The PostgreSQL source: logical replication with the built-in `pgoutput` plugin.
//!
//! In: a publication and a logical replication slot of one database. Out: one [`Batch`]
//! per committed transaction (its changes in order, `at` = the commit time), and lookups
//! through ordinary queries ([`lookup`]).
//!
//! - Setup (at start and on every reconnect, [`prepare`]): every watched table must exist
//!   in schema `public` and have a primary key (its value is the events' `key`; several
//!   columns: the JSON array of their values, as on SQLite). With `pre_images = "ensure"`
//!   the tables whose rules need the old row (deletes routed by owner, ownership moves,
//!   alerts, `before` in conditions; the same rule as MongoDB's pre-images) get `REPLICA
//!   IDENTITY FULL`. With `manage = "create"` the publication is created `FOR TABLE` the
//!   watched tables (or set to them) and the slot created with `pgoutput` when missing or
//!   invalidated; with `manage = "assume"` both must exist.
//! - Reading: `pgwire-replication` (pure Rust, tokio) holds the replication connection:
//!   it answers the server's keepalives, sends standby status updates, and hands over
//!   `Begin`/`Commit` and the raw pgoutput messages, which [`decode`] turns into rows.
//!   Chosen over `pg_walstream` for its small dependency tree (no aws-lc, no libpq), a
//!   gated session (IDENTIFY_SYSTEM on the same connection before START_REPLICATION), and
//!   an explicit applied-LSN API that reports only what the consumer says is durable.
//!   Queries use `tokio-postgres`.
//! - TLS: both kinds of connection are secured alike, by the URL's `sslmode` and
//!   `sslrootcert` as libpq reads them (default `prefer`); see [`tls`].
//! - Positions: a transaction's commit end LSN followed by the slot's identity (the
//!   server's system identifier and the slot name). The slot is told a position is
//!   flushed only when it arrives on `acks` (the history holds its events), so the server
//!   keeps every WAL record changecast may still need. On start, reading resumes after the
//!   history's position when it is this slot's; transactions at or below it (PostgreSQL
//!   resends from the slot's confirmed position) are skipped, so nothing repeats. A
//!   position of another slot or server, a slot that had to be created (dropped, or
//!   invalidated by `max_slot_wal_keep_size`), or a slot whose confirmed position is past
//!   the history's: the next batch has `lost_history` (clients get `gap` once).
//!   Between transactions, the position of a server keepalive (every commit before it
//!   has been sent) is handed over as an empty batch, at most once a second, so that
//!   writes to unwatched tables (which pgoutput skips) never pin the slot's WAL.
//! - Failures: the connection is reopened after 50 ms doubling to 5 s (with jitter), from
//!   the last position handed over; `/readyz` is down with the reason meanwhile.
//! - Values: see [`decode`]. An update carries the old row when the replica identity
//!   gives it (`FULL`); with the default identity `before` is absent, and a delete's
//!   `before` holds the key columns only. An unchanged TOASTed value (a large value the
//!   update did not touch) is filled from the old row when the update carries it (`FULL`),
//!   else left out of the document — never sent as `null`.
//! - Lookups read the current state: PostgreSQL cannot read the past on an ordinary
//!   connection, so changes carry no `as_of` (see [`lookup`]).
//! - `TRUNCATE`: rows go away without per-row events, as a dropped MongoDB collection's
//!   do: logged and counted once per truncated table in `changecast_source_drops_total`;
//!   nothing is delivered for it.
//! - The slot's retained WAL (`pg_current_wal_lsn() - restart_lsn`) is the gauge
//!   `changecast_postgres_slot_retained_wal_bytes`, refreshed every 10 s: an abandoned
//!   slot keeps WAL until the server's disk fills.

pub mod decode;
pub mod lookup;
pub mod preflight;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{Batch, ChangeCounters, Component, Health, Source, SourceError, retry_backoff};
use crate::change::{Change, Op, Position, changed_fields};
use crate::config::{Images, PgManage, PostgresSourceConfig};
use decode::{Datum, Message, OldKind, Relation};
pub use lookup::PgLookup;

/// Session settings that make values' text the same on every server (see [`decode`]).
const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c bytea_output=hex -c extra_float_digits=1";
/// How often the slot's retained WAL is measured.
const RETAINED_WAL_EVERY: Duration = Duration::from_secs(10);
/// How soon an acknowledged position is reported to the server.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// A quiet stream's position is handed over at most this often.
const QUIET_EVERY: Duration = Duration::from_secs(1);
/// Longest a connection attempt or a setup query may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to connect, parsed from `url` (and `password_env`).
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
    host: String,
    port: u16,
    user: String,
    password: String,
    dbname: String,
    tls: tls::Tls,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ConnInfo {
    /// Parses `url` (`postgres://user[:password]@host[:port]/db[?sslmode=…&sslrootcert=…]`);
    /// the password from `password_env` when set; reads `sslrootcert`. An error says what
    /// is wrong, without the password.
    pub fn parse(config: &PostgresSourceConfig) -> Result<ConnInfo, String> {
        let (url, tls) = tls::split_url(&config.url)?;
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        pg.ssl_mode(tls.pg_mode());
        if let Some(var) = &config.password_env {
            match std::env::var(var) {
                Ok(p) => {
                    pg.password(p);
                }
                Err(_) => return Err(format!("environment variable `{var}` is not set")),
            }
        }
        let host = match pg.get_hosts() {
            [tokio_postgres::config::Host::Tcp(h)] => h.clone(),
            [] => "localhost".to_string(),
            _ => return Err("give exactly one TCP host".to_string()),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg
            .get_user()
            .ok_or("the URL names no user (postgres://USER@host/db)")?
            .to_owned();
        let dbname = pg.get_dbname().unwrap_or(&user).to_owned();
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        pg.options(SESSION_OPTIONS)
            .application_name("changecast")
            .connect_timeout(CONNECT_TIMEOUT)
            .dbname(&dbname);
        Ok(ConnInfo {
            config: pg,
            host,
            port,
            user,
            password,
            dbname,
            tls,
        })
    }

    /// How the connections are secured.
    pub fn tls(&self) -> &tls::Tls {
        &self.tls
    }

    /// A connection error's text, said in terms of the TLS settings when TLS is the
    /// cause (tokio-postgres' own text stops at "error performing TLS handshake").
    fn connect_error(&self, e: &tokio_postgres::Error) -> String {
        if e.as_db_error().is_some() {
            return describe_pg_error(e);
        }
        self.tls.explain(&self.host, &tls::error_chain(e))
    }

    /// A replication connection's error, as [`ConnInfo::connect_error`].
    pub fn replication_error(&self, e: &pgwire_replication::PgWireError) -> String {
        format!(
            "replication connection: {}",
            self.tls.explain(&self.host, &e.to_string())
        )
    }

    /// `user@host:port/db`, for messages.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    /// An ordinary (query) connection, with TLS as the URL says; its connection task
    /// runs until the client drops.
    pub async fn connect(&self) -> Result<Client, String> {
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            match self.tls.connector() {
                Some(tls) => self.config.connect(tls.clone()).await.map(|(c, conn)| {
                    spawn_connection(conn);
                    c
                }),
                None => self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map(|(c, conn)| {
                        spawn_connection(conn);
                        c
                    }),
            }
        })
        .await
        .map_err(|_| format!("cannot connect to {}: timed out", self.describe()))?;
        connected.map_err(|e| {
            format!(
                "cannot connect to {}: {}",
                self.describe(),
                self.connect_error(&e)
            )
        })
    }

    fn replication(&self, config: &PostgresSourceConfig) -> ReplicationConfig {
        ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.dbname.clone(),
            config.slot.clone(),
            config.publication.clone(),
        )
        .with_port(self.port)
        .with_options(SESSION_OPTIONS)
        .with_application_name("changecast")
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(Duration::from_secs(10))
        .with_tls(self.tls.replication(&self.host))
    }
}

/// Runs a query connection's task until its client drops.
fn spawn_connection<T>(connection: tokio_postgres::Connection<tokio_postgres::Socket, T>)
where
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres: a query connection ended");
        }
    });
}

/// A server error's message (tokio-postgres' `Display` says only "db error").
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_owned(),
        },
        None => e.to_string(),
    }
}

/// Quotes an identifier (`"name"`, inner quotes doubled).
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One column of a table, from the catalog.
#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    pub type_oid: u32,
    /// `format_type` of the column's type (`integer`, `jsonb`, `"MyEnum"`), for casts.
    pub type_name: String,
    /// Position in the primary key (1-based), 0 if not part of it.
    pub pk: i32,
}

/// A table of schema `public`, from the catalog.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: String,
    pub columns: Vec<ColumnInfo>,
    /// `pg_class.relreplident`: `d` default, `f` full, `n` nothing, `i` index.
    pub replica_identity: char,
}

impl TableInfo {
    /// The primary key's columns, in key order.
    pub fn key_columns(&self) -> Vec<&str> {
        let mut pk: Vec<&ColumnInfo> = self.columns.iter().filter(|c| c.pk > 0).collect();
        pk.sort_by_key(|c| c.pk);
        pk.into_iter().map(|c| c.name.as_str()).collect()
    }
}

/// The table `name` of schema `public` (`None`: no such table).
pub async fn read_table(
    client: &Client,
    name: &str,
) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let rel = client
        .query_opt(
            "SELECT c.oid::int8, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relname = $1 AND c.relkind IN ('r', 'p')",
            &[&name],
        )
        .await?;
    let Some(rel) = rel else {
        return Ok(None);
    };
    let relid: i64 = rel.get(0);
    let identity: String = rel.get(1);
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, format_type(a.atttypid, NULL), \
             COALESCE((SELECT k.n FROM pg_index i, \
                       unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
                       WHERE i.indrelid = a.attrelid AND i.indisprimary \
                       AND k.attnum = a.attnum), 0)::int4 \
             FROM pg_attribute a WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 \
             AND NOT a.attisdropped ORDER BY a.attnum",
            &[&relid],
        )
        .await?;
    let columns = rows
        .iter()
        .map(|r| ColumnInfo {
            name: r.get(0),
            type_oid: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            type_name: r.get(2),
            pk: r.get(3),
        })
        .collect();
    Ok(Some(TableInfo {
        name: name.to_owned(),
        columns,
        replica_identity: identity.chars().next().unwrap_or('d'),
    }))
}

/// What the source must watch, from the plan.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Every watched table (rules', lookups', and `[source] tables`).
    pub tables: Vec<String>,
    /// Tables whose rules need the old row, with why.
    pub need_old_row: Vec<(String, Vec<String>)>,
}

impl Watch {
    pub fn of(plan: &crate::plan::Plan) -> Watch {
        Watch {
            tables: plan.watched().into_keys().collect(),
            need_old_row: crate::source::mongodb::preflight::tables_needing_old_documents(plan),
        }
    }
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, Default)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    /// `reserved`, `extended`, `unreserved`, `lost` (PostgreSQL 13+).
    pub wal_status: Option<String>,
    pub confirmed_flush: Option<u64>,
    /// Bytes of WAL the slot holds back (`pg_current_wal_lsn() - restart_lsn`).
    pub retained_wal: Option<i64>,
    pub active_pid: Option<i64>,
}

impl SlotState {
    /// Why the slot cannot be read any more, if it cannot.
    pub fn invalid(&self) -> Option<String> {
        (self.wal_status.as_deref() == Some("lost"))
            .then(|| "it was invalidated (its WAL was removed, max_slot_wal_keep_size)".to_string())
    }
}

/// The slot named `slot`, if it exists. Read through `to_jsonb` so that columns newer
/// servers add (or older ones lack) never fail the query.
pub async fn slot_state(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotState>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT to_jsonb(s)::text, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::int8, \
             pg_wal_lsn_diff(s.confirmed_flush_lsn, '0/0')::int8 \
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| {
        let json: Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap_or_default();
        let text = |k: &str| json.get(k).and_then(Value::as_str).map(str::to_owned);
        SlotState {
            plugin: text("plugin"),
            database: text("database"),
            wal_status: text("wal_status"),
            confirmed_flush: r
                .get::<_, Option<i64>>(2)
                .and_then(|v| u64::try_from(v).ok()),
            retained_wal: r.get(1),
            active_pid: json.get("active_pid").and_then(Value::as_i64),
        }
    }))
}

/// What [`prepare`] found and did.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Table → its primary key's columns.
    pub keys: HashMap<String, Vec<String>>,
    /// The slot was created (it was missing or invalidated): changes before now are gone.
    pub slot_created: bool,
    /// The slot's confirmed position before this session.
    pub confirmed_flush: Option<u64>,
    /// What was changed, for the log.
    pub actions: Vec<String>,
}

/// Checks the watched tables, sets replica identities, and makes sure the publication and
/// the slot exist (see the module doc). `Err` says what is wrong, for `/readyz` and the
/// log.
pub async fn prepare(
    client: &Client,
    config: &PostgresSourceConfig,
    watch: &Watch,
) -> Result<Prepared, String> {
    let fail = |what: &str, e: tokio_postgres::Error| format!("{what}: {}", describe_pg_error(&e));
    let mut out = Prepared::default();
    let mut tables = BTreeMap::new();
    for name in &watch.tables {
        let info = read_table(client, name)
            .await
            .map_err(|e| fail("reading the catalog", e))?
            .ok_or_else(|| format!("no table `{name}` in schema public"))?;
        let keys: Vec<String> = info.key_columns().into_iter().map(str::to_owned).collect();
        if keys.is_empty() {
            return Err(no_primary_key(name));
        }
        out.keys.insert(name.clone(), keys);
        tables.insert(name.clone(), info);
    }
    for (name, _) in &watch.need_old_row {
        let Some(info) = tables.get(name) else {
            continue;
        };
        if info.replica_identity == 'f' {
            continue;
        }
        match config.pre_images {
            Images::Ensure => {
                client
                    .batch_execute(&format!(
                        "ALTER TABLE public.{} REPLICA IDENTITY FULL",
                        quote(name)
                    ))
                    .await
                    .map_err(|e| fail(&format!("setting REPLICA IDENTITY FULL on `{name}`"), e))?;
                out.actions
                    .push(format!("set REPLICA IDENTITY FULL on `{name}`"));
            }
            Images::Assume => tracing::warn!(
                table = %name,
                "postgres: pre_images = \"assume\" but the table's replica identity is not FULL: \
                 its updates and deletes carry no old row"
            ),
            Images::Off => {}
        }
    }
    ensure_publication(client, config, &watch.tables, &mut out).await?;
    let slot = slot_state(client, &config.slot)
        .await
        .map_err(|e| fail("reading pg_replication_slots", e))?;
    let recreate = match &slot {
        None => Some(format!("replication slot `{}` does not exist", config.slot)),
        Some(s) => s
            .invalid()
            .map(|why| format!("replication slot `{}`: {why}", config.slot)),
    };
    if let Some(s) = &slot {
        if s.plugin.as_deref().is_some_and(|p| p != "pgoutput") {
            return Err(format!(
                "replication slot `{}` uses plugin `{}`, not pgoutput",
                config.slot,
                s.plugin.as_deref().unwrap_or("?")
            ));
        }
        if let Some(db) = s.database.as_deref()
            && let Some(ours) = config_dbname(client).await
            && db != ours
        {
            return Err(format!(
                "replication slot `{}` belongs to database `{db}`, not `{ours}`",
                config.slot
            ));
        }
    }
    match (recreate, config.manage) {
        (None, _) => out.confirmed_flush = slot.and_then(|s| s.confirmed_flush),
        (Some(why), PgManage::Assume) => {
            return Err(format!(
                "{why} (manage = \"assume\": create it, or set manage = \"create\")"
            ));
        }
        (Some(why), PgManage::Create) => {
            if slot.is_some() {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&config.slot])
                    .await
                    .map_err(|e| {
                        fail(
                            &format!("dropping the invalidated slot `{}`", config.slot),
                            e,
                        )
                    })?;
            }
            client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&config.slot],
                )
                .await
                .map_err(|e| fail(&format!("creating replication slot `{}`", config.slot), e))?;
            out.actions.push(format!("{why}: created it"));
            out.slot_created = true;
        }
    }
    Ok(out)
}

async fn config_dbname(client: &Client) -> Option<String> {
    client
        .query_one("SELECT current_database()::text", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

/// The message for a watched table without a primary key.
pub fn no_primary_key(name: &str) -> String {
    format!(
        "table `{name}` has no primary key: changecast keys events by it \
         (ALTER TABLE {} ADD PRIMARY KEY (…))",
        quote(name)
    )
}

/// The tables (of schema `public`) the publication has, and whether it is `FOR ALL TABLES`;
/// `None` when it does not exist.
pub async fn publication_tables(
    client: &Client,
    name: &str,
) -> Result<Option<(bool, Vec<String>)>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(None);
    };
    let all: bool = row.get(0);
    let tables = client
        .query(
            "SELECT tablename::text FROM pg_publication_tables \
             WHERE pubname = $1 AND schemaname = 'public' ORDER BY 1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some((all, tables)))
}

async fn ensure_publication(
    client: &Client,
    config: &PostgresSourceConfig,
    tables: &[String],
    out: &mut Prepared,
) -> Result<(), String> {
    let name = &config.publication;
    let fail =
        |e: tokio_postgres::Error| format!("publication `{name}`: {}", describe_pg_error(&e));
    let existing = publication_tables(client, name).await.map_err(fail)?;
    let list = tables
        .iter()
        .map(|t| format!("public.{}", quote(t)))
        .collect::<Vec<_>>()
        .join(", ");
    match (existing, config.manage) {
        (None, PgManage::Assume) => Err(format!(
            "publication `{name}` does not exist (manage = \"assume\": create it, \
             or set manage = \"create\")"
        )),
        (None, PgManage::Create) => {
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {list}",
                    quote(name)
                ))
                .await
                .map_err(fail)?;
            out.actions.push(format!("created publication `{name}`"));
            Ok(())
        }
        (Some((true, _)), _) => Ok(()),
        (Some((false, have)), manage) => {
            let mut want: Vec<String> = tables.to_vec();
            want.sort();
            if have == want {
                return Ok(());
            }
            if manage == PgManage::Assume {
                let missing: Vec<&String> = want.iter().filter(|t| !have.contains(t)).collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "publication `{name}` lacks watched table(s) {missing:?} \
                         (manage = \"assume\")"
                    ));
                }
                return Ok(());
            }
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} SET TABLE {list}",
                    quote(name)
                ))
                .await
                .map_err(fail)?;
            out.actions
                .push(format!("set publication `{name}` to the watched tables"));
            Ok(())
        }
    }
}

/// A position: the commit end LSN (big-endian, so byte order is LSN order) followed by
/// `pg:<system identifier>/<slot>`.
fn position(lsn: u64, ident: &str) -> Position {
    let mut p = Position::from_seq(lsn);
    p.0.extend_from_slice(ident.as_bytes());
    p
}

/// The LSN of a position of the slot identified by `ident`.
fn position_lsn(p: &Position, ident: &str) -> Option<u64> {
    let (lsn, id) = p.0.split_at_checked(8)?;
    (id == ident.as_bytes()).then(|| u64::from_be_bytes(lsn.try_into().unwrap_or([0; 8])))
}

/// RFC 3339 UTC with milliseconds, from PostgreSQL microseconds since 2000-01-01.
fn commit_time(pg_micros: i64) -> Option<String> {
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    let unix = u64::try_from(pg_micros.checked_add(PG_EPOCH_UNIX_MICROS)?).ok()?;
    let t = SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(unix))?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// Why a session ended.
enum Ended {
    /// Shutdown: the client is kept for the last acknowledgement.
    Shutdown(ReplicationClient),
    /// The router is gone while the source still runs.
    RouterGone,
    /// A failure: reconnect after a delay.
    Failed(String),
}

/// Why [`PgSource::hand_over`] did not hand a batch over.
enum NotSent {
    Shutdown,
    RouterGone,
}

impl NotSent {
    /// How the stream on `repl` ends for it.
    fn ended(self, repl: ReplicationClient) -> Ended {
        match self {
            NotSent::Shutdown => Ended::Shutdown(repl),
            NotSent::RouterGone => Ended::RouterGone,
        }
    }
}

/// The PostgreSQL change feed. Created by [`PgSource::new`], started by [`Source::run`].
pub struct PgSource {
    config: PostgresSourceConfig,
    conn: ConnInfo,
    watch: Watch,
    /// The durable history's position when the process started.
    resume_from: Option<Position>,
    /// `pg:<system id>/<slot>`, known once connected.
    ident: Option<String>,
    /// The last commit LSN handed to the router: transactions at or below it are skipped.
    sent_upto: u64,
    /// The last commit LSN acknowledged (its events are in the history).
    acked: u64,
    /// The next batch must say that changes were lost before it.
    lost_history: bool,
    keys: HashMap<String, Vec<String>>,
    /// [`PgSource::prepare_at_start`] created the slot: the first session must treat it
    /// as new (the history's position, if any, is from a slot that is gone).
    created_at_start: bool,
    counters: ChangeCounters,
}

impl PgSource {
    /// A source for `config`, resuming after `resume_from` (the durable history's
    /// position) when it is this slot's. Connects only when run.
    pub fn new(
        config: &PostgresSourceConfig,
        watch: Watch,
        resume_from: Option<Position>,
    ) -> Result<Self, SourceError> {
        let conn =
            ConnInfo::parse(config).map_err(|e| SourceError::Setup(format!("source.url: {e}")))?;
        Ok(PgSource {
            config: config.clone(),
            conn,
            watch,
            resume_from,
            ident: None,
            sent_upto: 0,
            acked: 0,
            lost_history: false,
            keys: HashMap::new(),
            created_at_start: false,
            counters: ChangeCounters::default(),
        })
    }

    /// The connection settings (for the lookups).
    pub fn conn(&self) -> &ConnInfo {
        &self.conn
    }

    /// Prepares the database once, at start (see [`prepare`]), so that changes are
    /// captured from the moment `serve` is up, and a missing table or one without a
    /// primary key stops the start with the reason. An unreachable server does not: the
    /// source keeps trying, and `/readyz` says why.
    pub async fn prepare_at_start(&mut self) -> Result<(), SourceError> {
        let client = match self.conn.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("postgres source: {e}; preparing the database once connected");
                return Ok(());
            }
        };
        for name in &self.watch.tables {
            match read_table(&client, name).await {
                Ok(Some(t)) if t.key_columns().is_empty() => {
                    return Err(SourceError::Setup(format!(
                        "postgres: {}",
                        no_primary_key(name)
                    )));
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(SourceError::Setup(format!(
                        "postgres: no table `{name}` in schema public of {}",
                        self.conn.describe()
                    )));
                }
                Err(e) => {
                    return Err(SourceError::Setup(format!(
                        "postgres: {}",
                        describe_pg_error(&e)
                    )));
                }
            }
        }
        match prepare(&client, &self.config, &self.watch).await {
            Ok(p) => {
                for action in &p.actions {
                    tracing::info!("postgres source: {action}");
                }
                self.created_at_start = p.slot_created;
            }
            Err(e) => tracing::warn!("postgres source: {e}; retrying once streaming"),
        }
        Ok(())
    }

    fn ident_of(&self, system_id: &str) -> String {
        format!("pg:{system_id}/{}", self.config.slot)
    }

    /// Prepares the database and opens a replication session from the last position
    /// handed over.
    async fn open(
        &mut self,
        out: &mpsc::Sender<Batch>,
    ) -> Result<Option<ReplicationClient>, String> {
        let client = self.conn.connect().await?;
        let prepared = tokio::time::timeout(
            Duration::from_secs(60),
            prepare(&client, &self.config, &self.watch),
        )
        .await
        .map_err(|_| "setting up the publication and slot timed out".to_string())??;
        drop(client);
        for action in &prepared.actions {
            tracing::info!("postgres source: {action}");
        }
        self.keys = prepared.keys;

        if self.ident.is_none() {
            // The first session: whether the history's position is this slot's decides
            // where to start, and that needs the server's identity.
            let mut probe = ReplicationClient::connect_gated(self.conn.replication(&self.config))
                .await
                .map_err(|e| self.conn.replication_error(&e))?;
            let system = identify(&mut probe).await?;
            drop(probe);
            let ident = self.ident_of(&system);
            match self.resume_from.as_ref().map(|p| position_lsn(p, &ident)) {
                None => {}
                Some(Some(lsn)) => {
                    self.sent_upto = lsn;
                    self.acked = lsn;
                }
                Some(None) => {
                    tracing::warn!(
                        "postgres source: the history's position belongs to another slot or \
                         server; reading from the slot's position, clients get gap"
                    );
                    self.lost_history = true;
                }
            }
            self.ident = Some(ident);
        }
        let cfg = self
            .conn
            .replication(&self.config)
            .with_start_lsn(Lsn::from_u64(self.acked))
            .with_ack_lsn(Lsn::from_u64(self.acked));
        let mut repl = ReplicationClient::connect_gated(cfg)
            .await
            .map_err(|e| self.conn.replication_error(&e))?;
        let ident = self.ident_of(&identify(&mut repl).await?);
        if self.ident.as_deref() != Some(ident.as_str()) {
            // Another server answers at this address (restored, or a failover): its
            // LSNs are not ours. Start over from its slot, telling clients.
            self.ident = None;
            self.resume_from = None;
            self.sent_upto = 0;
            self.acked = 0;
            self.lost_history = true;
            return Err("the server's system identifier changed; reopening".into());
        }
        let slot_created = prepared.slot_created || std::mem::take(&mut self.created_at_start);
        if self.sent_upto > 0 {
            if slot_created {
                tracing::warn!(
                    slot = %self.config.slot,
                    "postgres source: the slot was created anew; changes since the last \
                     position are gone, clients get gap"
                );
                self.lost_history = true;
            } else if prepared.confirmed_flush.is_some_and(|c| c > self.sent_upto) {
                tracing::warn!(
                    slot = %self.config.slot,
                    "postgres source: the slot is past the history's position (the history \
                     was restored, or another consumer read the slot); clients get gap"
                );
                self.lost_history = true;
            }
        }
        repl.start()
            .await
            .map_err(|e| format!("START_REPLICATION: {e}"))?;
        tokio::time::timeout(CONNECT_TIMEOUT, repl.wait_started())
            .await
            .map_err(|_| "START_REPLICATION timed out".to_string())?
            .map_err(|e| format!("START_REPLICATION: {e}"))?;
        if std::mem::take(&mut self.lost_history) {
            // Clients get `gap` now, before any change read after the loss.
            let at = self.sent_upto.max(prepared.confirmed_flush.unwrap_or(0));
            self.sent_upto = at;
            let batch = Batch {
                changes: Vec::new(),
                end: position(at, &ident),
                lost_history: true,
            };
            if out.send(batch).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(repl))
    }

    /// Hands `batch`, which ends at WAL position `end`, to the router and notes `end` as
    /// sent; shutdown wins when both are ready. `Err`: not handed over, and why.
    async fn hand_over(
        &mut self,
        out: &mpsc::Sender<Batch>,
        batch: Batch,
        end: u64,
        shutdown: &CancellationToken,
    ) -> Result<(), NotSent> {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(NotSent::Shutdown),
            sent = out.send(batch) => sent.map_err(|_| NotSent::RouterGone)?,
        }
        self.sent_upto = end;
        Ok(())
    }

    /// Reads transactions until shutdown or a failure.
    async fn stream(
        &mut self,
        mut repl: ReplicationClient,
        out: &mpsc::Sender<Batch>,
        acks: &mut watch::Receiver<Option<Position>>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let ident = self.ident.clone().unwrap_or_default();
        let mut relations: HashMap<u32, Relation> = HashMap::new();
        let mut txn: Option<Vec<Change>> = None;
        let mut last_quiet: Option<std::time::Instant> = None;
        loop {
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ended::Shutdown(repl),
                changed = acks.changed() => {
                    if changed.is_err() {
                        return Ended::RouterGone;
                    }
                    self.note_ack(acks.borrow_and_update().as_ref(), &ident, Some(&repl));
                    continue;
                }
                event = repl.recv() => event,
            };
            let event = match event {
                Ok(Some(e)) => e,
                Ok(None) => return Ended::Failed("the replication stream ended".into()),
                Err(e) => return Ended::Failed(format!("replication stream: {e}")),
            };
            match event {
                ReplicationEvent::Begin { .. } => txn = Some(Vec::new()),
                ReplicationEvent::XLogData { data, .. } => {
                    self.apply(&data, &mut relations, txn.as_mut());
                }
                ReplicationEvent::Commit {
                    end_lsn,
                    commit_time_micros,
                    ..
                } => {
                    let changes = txn.take().unwrap_or_default();
                    let end = end_lsn.as_u64();
                    if end <= self.sent_upto {
                        // Resent from the slot's confirmed position: already handed over.
                        continue;
                    }
                    let at = commit_time(commit_time_micros);
                    let end_position = position(end, &ident);
                    let mut changes = changes;
                    for c in &mut changes {
                        c.position = end_position.clone();
                        c.at = at.clone();
                        self.counters.count(c);
                    }
                    let batch = Batch {
                        changes,
                        end: end_position,
                        lost_history: false,
                    };
                    if let Err(stop) = self.hand_over(out, batch, end, shutdown).await {
                        return stop.ended(repl);
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    // Between transactions the server has sent every commit before
                    // `wal_end`: hand that position over (an empty batch, through the
                    // history like any other) so that writes to unwatched tables never
                    // pin the slot's WAL. At most once a second.
                    let end = wal_end.as_u64();
                    if txn.is_none()
                        && end > self.sent_upto
                        && last_quiet.is_none_or(|t| t.elapsed() >= QUIET_EVERY)
                    {
                        last_quiet = Some(std::time::Instant::now());
                        let batch = Batch::new(Vec::new(), position(end, &ident));
                        if let Err(stop) = self.hand_over(out, batch, end, shutdown).await {
                            return stop.ended(repl);
                        }
                    }
                }
                ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
            }
        }
    }

    /// An acknowledged position: reported to the server as flushed when it is this slot's.
    fn note_ack(&mut self, p: Option<&Position>, ident: &str, repl: Option<&ReplicationClient>) {
        if let Some(lsn) = p.and_then(|p| position_lsn(p, ident))
            && lsn > self.acked
        {
            self.acked = lsn;
            if let Some(r) = repl {
                r.update_applied_lsn(Lsn::from_u64(lsn));
            }
        }
    }

    /// One pgoutput message: a relation is remembered; a row change joins the open
    /// transaction; anything malformed is skipped, logged and counted.
    fn apply(
        &mut self,
        data: &[u8],
        relations: &mut HashMap<u32, Relation>,
        txn: Option<&mut Vec<Change>>,
    ) {
        let message = match decode::parse(data) {
            Ok(m) => m,
            Err(why) => return skipped("malformed", &why),
        };
        let change = match message {
            Message::Relation(r) => {
                relations.insert(r.id, r);
                return;
            }
            Message::Truncate { rels } => {
                for id in rels {
                    let name = relations
                        .get(&id)
                        .map_or_else(|| format!("relation {id}"), collection_name);
                    tracing::warn!(
                        table = %name,
                        "postgres source: TRUNCATE: rows went away without per-row events; \
                         nothing is delivered for them"
                    );
                    metrics::counter!("changecast_source_drops_total").increment(1);
                }
                return;
            }
            Message::Other(_) => return,
            Message::Insert { rel, new } => {
                self.row_change(relations, rel, Op::Insert, None, Some(new))
            }
            Message::Update { rel, old, new } => {
                self.row_change(relations, rel, Op::Update, old, Some(new))
            }
            Message::Delete { rel, old } => {
                self.row_change(relations, rel, Op::Delete, Some(old), None)
            }
        };
        match (change, txn) {
            (Ok(c), Some(txn)) => txn.push(c),
            (Ok(_), None) => skipped("malformed", "a row change outside a transaction"),
            (Err(why), _) => skipped("malformed", &why),
        }
    }

    fn row_change(
        &self,
        relations: &HashMap<u32, Relation>,
        rel: u32,
        op: Op,
        old: Option<(OldKind, Vec<Datum>)>,
        new: Option<Vec<Datum>>,
    ) -> Result<Change, String> {
        let relation = relations
            .get(&rel)
            .ok_or_else(|| format!("a change of relation {rel}, which was not described"))?;
        let collection = collection_name(relation);
        let before = match &old {
            Some((OldKind::Full, row)) => Some(decode::document(relation, row, false)?),
            // The key only: enough to say which row went away, not a pre-image.
            Some((OldKind::Key, row)) if op == Op::Delete => {
                Some(decode::document(relation, row, true)?)
            }
            _ => None,
        };
        let after = match &new {
            Some(row) => {
                let mut doc = decode::document(relation, row, false)?;
                // Unchanged TOASTed values: from the old row when it is there.
                if let Some(b) = &before {
                    for (col, datum) in relation.columns.iter().zip(row) {
                        if *datum == Datum::Unchanged
                            && let Some(v) = b.get(&col.name)
                        {
                            doc.insert(col.name.clone(), v.clone());
                        }
                    }
                }
                Some(doc)
            }
            None => None,
        };
        let keyed = after.as_ref().or(before.as_ref()).ok_or("no row")?;
        let key_columns: Vec<&str> = match self.keys.get(&collection) {
            Some(k) => k.iter().map(String::as_str).collect(),
            None => relation
                .columns
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.as_str())
                .collect(),
        };
        let key = decode::key(&key_columns, keyed)
            .ok_or_else(|| format!("a change of `{collection}` lacks its key columns"))?;
        let before = before.map(Value::Object);
        let after = after.map(Value::Object);
        let updated_fields = match (op, &before, &after) {
            (Op::Update, Some(b), Some(a)) => Some(changed_fields(b, a)),
            _ => None,
        };
        Ok(Change {
            op,
            collection,
            key,
            after,
            before,
            updated_fields,
            position: Position::default(),
            at: None,
            // PostgreSQL cannot read the past: lookups read the current state.
            as_of: None,
        })
    }

    async fn tail(
        mut self,
        out: mpsc::Sender<Batch>,
        mut acks: watch::Receiver<Option<Position>>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        health.down(
            Component::Source,
            format!(
                "postgres source: connecting to {} (slot `{}`)",
                self.conn.describe(),
                self.config.slot
            ),
        );
        let gauge = shutdown.child_token();
        tokio::spawn(measure_retained_wal(
            self.conn.clone(),
            self.config.slot.clone(),
            gauge.clone(),
        ));
        let _stop_gauge = gauge.drop_guard();
        let mut backoff: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
        let mut down: Option<String> = None;
        let mut last = None;
        while !shutdown.is_cancelled() {
            let reason = match self.open(&out).await {
                Ok(None) => return Err(router_gone()),
                Ok(Some(repl)) => {
                    backoff = None;
                    if down.take().is_some() {
                        tracing::info!("postgres source: streaming again");
                    }
                    health.up(Component::Source);
                    let ident = self.ident.clone().unwrap_or_default();
                    // Acks that arrived while disconnected.
                    let acked = acks.borrow_and_update().clone();
                    self.note_ack(acked.as_ref(), &ident, Some(&repl));
                    match self.stream(repl, &out, &mut acks, &shutdown).await {
                        Ended::Shutdown(repl) => {
                            last = Some(repl);
                            break;
                        }
                        Ended::RouterGone => return Err(router_gone()),
                        Ended::Failed(why) => why,
                    }
                }
                Err(why) => why,
            };
            let reason = format!(
                "postgres source: cannot stream slot `{}` of {}: {reason}",
                self.config.slot,
                self.conn.describe()
            );
            metrics::counter!("changecast_source_errors_total", "kind" => "read").increment(1);
            if down.as_deref() != Some(&reason) {
                tracing::warn!("{reason}");
                down = Some(reason.clone());
            }
            health.down(Component::Source, reason);
            let delay = backoff
                .get_or_insert_with(retry_backoff)
                .next()
                .unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
                // Keep taking acks while waiting, and notice a router that stopped.
                changed = acks.changed() => if changed.is_err() { return Err(router_gone()); },
            }
        }
        // Shutdown: stop reading, let the router drain, report the last position.
        drop(out);
        let ident = self.ident.clone().unwrap_or_default();
        while acks.changed().await.is_ok() {
            self.note_ack(acks.borrow_and_update().as_ref(), &ident, last.as_ref());
        }
        let acked = acks.borrow().clone();
        self.note_ack(acked.as_ref(), &ident, last.as_ref());
        if let Some(mut repl) = last {
            // Best effort: the history holds the position either way, and transactions
            // the slot resends are skipped on the next start.
            let metrics = repl.metrics();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while metrics.last_applied_lsn().as_u64() < self.acked
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            repl.stop();
            if tokio::time::timeout(Duration::from_secs(2), repl.shutdown())
                .await
                .is_err()
            {
                repl.abort();
            }
        }
        Ok(())
    }
}

/// IDENTIFY_SYSTEM on a gated session: the server's system identifier.
async fn identify(repl: &mut ReplicationClient) -> Result<String, String> {
    let system = tokio::time::timeout(CONNECT_TIMEOUT, repl.identify_system())
        .await
        .map_err(|_| "IDENTIFY_SYSTEM timed out".to_string())?
        .map_err(|e| format!("replication connection: {e}"))?;
    Ok(system.system_id)
}

fn collection_name(r: &Relation) -> String {
    if r.schema == "public" {
        r.name.clone()
    } else {
        format!("{}.{}", r.schema, r.name)
    }
}

fn router_gone() -> SourceError {
    SourceError::Setup("router stopped unexpectedly".into())
}

fn skipped(reason: &'static str, why: &str) {
    tracing::warn!(reason, "postgres source: skipping a change: {why}");
    metrics::counter!("changecast_source_skipped_total", "reason" => reason).increment(1);
}

/// Sets `changecast_postgres_slot_retained_wal_bytes` every [`RETAINED_WAL_EVERY`] until
/// `stop`, on its own connection (reopened when it breaks).
async fn measure_retained_wal(conn: ConnInfo, slot: String, stop: CancellationToken) {
    let gauge = metrics::gauge!("changecast_postgres_slot_retained_wal_bytes");
    let mut client: Option<Client> = None;
    loop {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = conn.connect().await.ok();
        }
        if let Some(c) = &client
            && let Ok(Ok(Some(s))) =
                tokio::time::timeout(CONNECT_TIMEOUT, slot_state(c, &slot)).await
            && let Some(bytes) = s.retained_wal
        {
            gauge.set(bytes as f64);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETAINED_WAL_EVERY) => {}
        }
    }
}

impl Source for PgSource {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Batch>,
        acks: watch::Receiver<Option<Position>>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.tail(out, acks, health, shutdown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_lsn_and_belong_to_one_slot() {
        let a = position(0x16B_3748, "pg:7123/changecast");
        let b = position(0x1_0000_0000, "pg:7123/changecast");
        assert!(a.0 < b.0);
        assert_eq!(position_lsn(&a, "pg:7123/changecast"), Some(0x16B_3748));
        assert_eq!(position_lsn(&a, "pg:7123/other"), None);
        assert_eq!(position_lsn(&a, "pg:9999/changecast"), None);
        assert_eq!(
            position_lsn(&Position(vec![1, 2]), "pg:7123/changecast"),
            None
        );
    }

    #[test]
    fn commit_times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(commit_time(0).as_deref(), Some("2000-01-01T00:00:00.000Z"));
        assert_eq!(
            commit_time(849_528_000_123_456).as_deref(),
            Some("2026-12-02T12:00:00.123Z")
        );
        assert_eq!(commit_time(i64::MIN), None);
        assert_eq!(commit_time(i64::MAX), None);
    }

    #[test]
    fn urls_parse_with_the_password_from_the_environment() {
        let mut c = PostgresSourceConfig {
            url: "postgres://app@db.example:6543/mercury".into(),
            password_env: None,
            publication: "changecast".into(),
            slot: "changecast".into(),
            manage: PgManage::Create,
            pre_images: Images::Ensure,
            tables: None,
        };
        let info = ConnInfo::parse(&c).unwrap();
        assert_eq!(info.describe(), "app@db.example:6543/mercury");
        assert_eq!(info.password, "");
        c.password_env = Some("CHANGECAST_TEST_PG_PASSWORD_UNSET".into());
        assert!(ConnInfo::parse(&c).unwrap_err().contains("is not set"));
        c.password_env = None;
        c.url = "mysql://x".into();
        assert!(ConnInfo::parse(&c).is_err());
    }
}
