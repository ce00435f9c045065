//! The embedded default source: an SQLite database file.
//!
//! In: writes to the watched tables, by any connection or process. Out: [`Batch`]es.
//!
//! How: on start, changecast installs `AFTER INSERT/UPDATE/DELETE` triggers on every
//! watched table. Each trigger appends the row's before and after images (as JSON) to the
//! `_changecast_log` table in the same transaction as the write, so the log holds exactly
//! the committed changes in commit order. One blocking thread tails the log: it checks
//! `PRAGMA data_version` (which changes when another connection commits) every
//! `poll_interval`, reads new rows in order, and writes the acknowledged position to
//! `_changecast_checkpoint`, deleting log rows behind it in the same transaction.
//!
//! Positions are the log's sequence number followed by the log's identity (a random id in
//! `_changecast_meta`, made with the log), so a checkpoint (the database's or the durable
//! history's) is applied only to its own log and never when it is ahead of the log: else
//! reading starts at the log's beginning and the first batch has `lost_history` (clients
//! get `gap`). On each commit the tail also compares `PRAGMA schema_version`; when it
//! moved it checks that the log and every trigger exist, and reinstalls what is missing
//! (again with `lost_history`). `Health` is down, with the reason, while the log cannot be
//! read or something is missing; failures are retried 50 ms doubling to 5 s.
//!
//! Must never: fail an application's write (the triggers turn every value into one JSON
//! can hold: BLOBs to hex, infinities to null; see [`key_expr`]), stop at a log row it
//! cannot read (it is skipped, counted and passed), skip a row without moving past it, or
//! checkpoint a row not yet handed over.
//! One changecast process consumes one database's log: [`SqliteSource::open`] takes an
//! exclusive OS lock on `<db>-changecast.lock` for the source's lifetime, and a second
//! process is refused with an error naming the database and the holder's pid.

mod lookup;

pub use lookup::SqliteLookup;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    Batch, Catalog, ChangeCounters, Component, Health, Retry, Source, SourceError, retry_backoff,
};
use crate::change::{AsOf, Change, Op, Position, changed_fields};
use crate::config::SqliteSourceConfig;

const LOG_TABLE: &str = "_changecast_log";
const CHECKPOINT_TABLE: &str = "_changecast_checkpoint";
/// Created with the log: `log_id`, the log's identity.
const META_TABLE: &str = "_changecast_meta";
/// Checkpoints are written at most this often (and always on shutdown): each is a write
/// transaction competing with the application's writers.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// Takes the lock that makes this process the only changecast tailing the database at
/// `db`: an exclusive OS lock (`flock`) on `<db>-changecast.lock`, held as long as the
/// returned file is open, released by the OS however the process ends (kill -9 too).
/// The holder writes its pid into the file, so a refused second process can name it.
fn lock_database(db: &Path) -> Result<std::fs::File, SourceError> {
    use std::io::{Read, Seek, Write};
    let mut name = db.as_os_str().to_owned();
    name.push("-changecast.lock");
    let path = PathBuf::from(name);
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .map_err(|e| SourceError::Setup(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                h => h.to_string(),
            };
            return Err(SourceError::Setup(format!(
                "another changecast is already streaming {} ({holder} holds {}); \
                 one process per database: stop it first",
                db.display(),
                path.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(SourceError::Setup(format!(
                "cannot lock {}: {e}",
                path.display()
            )));
        }
    }
    // Best effort: the lock, not the text, is what excludes.
    let _ = file.set_len(0).and_then(|()| {
        file.rewind()?;
        write!(file, "changecast pid {}", std::process::id())?;
        file.flush()
    });
    Ok(file)
}

/// Opens a connection with the settings every changecast connection uses.
fn open(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Quotes an identifier for SQL (`"name"`, doubling inner quotes).
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The tables of a database and their columns, read from the schema.
#[derive(Debug, Clone)]
pub struct SqliteCatalog {
    tables: BTreeMap<String, Option<Vec<String>>>,
}

impl SqliteCatalog {
    /// Reads the schema of the database at `path` without writing to it.
    pub fn read(path: &Path) -> Result<Self, SourceError> {
        let conn = open(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| SourceError::Setup(format!("cannot open {}: {e}", path.display())))?;
        Self::from_conn(&conn)
    }

    fn from_conn(conn: &Connection) -> Result<Self, SourceError> {
        let names: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '\\_changecast\\_%' ESCAPE '\\' \
                 ORDER BY name",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut tables = BTreeMap::new();
        for name in names {
            let cols = columns(conn, &name)?.into_iter().map(|c| c.name).collect();
            tables.insert(name, Some(cols));
        }
        Ok(SqliteCatalog { tables })
    }
}

impl Catalog for SqliteCatalog {
    fn collections(&self) -> &BTreeMap<String, Option<Vec<String>>> {
        &self.tables
    }
}

/// One column of a table, from `PRAGMA table_info`.
pub(crate) struct Column {
    pub(crate) name: String,
    /// The declared type (`TEXT`, `JSON`, empty for none).
    pub(crate) decl: String,
    /// Position in the primary key (1-based), 0 if not part of it.
    pub(crate) pk: i64,
}

pub(crate) fn columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<Column>> {
    conn.prepare(&format!("PRAGMA table_info({})", ident(table)))?
        .query_map([], |r| {
            Ok(Column {
                name: r.get(1)?,
                decl: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                pk: r.get(5)?,
            })
        })?
        .collect()
}

/// The SQLite change feed. Created by [`SqliteSource::open`], which installs the log and
/// triggers; started by [`Source::run`].
pub struct SqliteSource {
    path: PathBuf,
    conn: Connection,
    poll_interval: Duration,
    batch_size: usize,
    /// The watched tables, and `[source] json_columns`: to reinstall triggers while running.
    tables: Vec<String>,
    json_listed: Vec<String>,
    /// Per table, the columns read as nested JSON.
    json: JsonColumns,
    /// Held while this source exists: one changecast per database (see `lock_database`).
    _lock: std::fs::File,
    /// The log's identity (`_changecast_meta`), carried in every position this source
    /// makes, so that a checkpoint is only ever applied to the log it was taken in.
    log_id: String,
    /// Highest sequence number checkpointed in this log (where reading starts at open).
    checkpoint: i64,
    /// The next batch must say that changes were lost before it (`gap` for clients).
    lost_history: bool,
    /// `PRAGMA schema_version` when the log and triggers were last seen complete.
    schema_version: Option<i64>,
    /// The watched tables' columns the triggers were built for (see [`table_shapes`]).
    shapes: String,
    /// Retrying a schema repair that failed: when next, and the delays.
    schema_retry: Option<(Instant, Retry)>,
    /// Watched tables gone from the database, for `/readyz` (see `note_absent_tables`).
    schema_problem: Option<String>,
    counters: ChangeCounters,
}

/// A position in one log: the sequence number (big-endian, so byte order is numeric
/// order) followed by the log's identity.
fn position(seq: i64, log_id: &str) -> Position {
    let mut p = Position::from_seq(seq.max(0) as u64);
    p.0.extend_from_slice(log_id.as_bytes());
    p
}

/// The sequence number and log identity of a position; a plain 8-byte sequence number
/// (written before logs had identities) has none and is taken to be this log's.
fn parse_position(p: &Position) -> Option<(i64, Option<&[u8]>)> {
    let (seq, id) = p.0.split_at_checked(8)?;
    let seq = i64::try_from(u64::from_be_bytes(seq.try_into().ok()?)).ok()?;
    Some((seq, (!id.is_empty()).then_some(id)))
}

/// Where to start reading a log whose identity is `log_id` and whose highest sequence
/// number ever handed out is `high`, given a checkpoint: after the checkpoint when it
/// belongs to this log, else from the log's start with the reason history was lost.
fn resume_point(checkpoint: Option<&Position>, log_id: &str, high: i64) -> (i64, Option<String>) {
    let Some(checkpoint) = checkpoint else {
        return (0, None);
    };
    match parse_position(checkpoint) {
        None => (0, Some("the checkpoint is not an SQLite log position".into())),
        Some((_, Some(id))) if id != log_id.as_bytes() => (
            0,
            Some("the checkpoint belongs to another change log (recreated, or the database was replaced)".into()),
        ),
        Some((seq, _)) if seq > high => (
            0,
            Some(format!(
                "the checkpoint ({seq}) is ahead of the change log (highest {high}): \
                 the log was recreated or the database restored from a backup"
            )),
        ),
        Some((seq, _)) => (seq, None),
    }
}

/// Reports trouble on `/readyz` and in the log, once per change of state; counts every
/// failure.
struct Trouble {
    health: Arc<Health>,
    /// What is wrong now (shown on `/readyz`), if anything.
    now: Option<String>,
    /// Delays for the current run of read failures.
    backoff: Option<Retry>,
}

impl Trouble {
    /// A problem: `/readyz` says `reason`; logged when it is news.
    fn report(&mut self, reason: String) {
        if self.now.as_deref() != Some(reason.as_str()) {
            tracing::warn!("{reason}");
            self.health.down(Component::Source, reason.clone());
            self.now = Some(reason);
        }
    }

    /// A failed read: reported, counted; returns how long to wait before the next try.
    fn failed(&mut self, kind: &'static str, reason: String) -> Duration {
        metrics::counter!("changecast_source_errors_total", "kind" => kind).increment(1);
        self.report(reason);
        self.backoff
            .get_or_insert_with(retry_backoff)
            .next()
            .unwrap_or(Duration::from_secs(5))
    }

    /// Everything works again.
    fn ok(&mut self) {
        self.backoff = None;
        if let Some(was) = self.now.take() {
            tracing::info!(was = %was, "sqlite source: recovered");
            self.health.up(Component::Source);
        }
    }
}

/// Sleeps `d`, waking early on shutdown.
fn pause(d: Duration, shutdown: &CancellationToken) {
    let until = Instant::now() + d;
    while !shutdown.is_cancelled() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

impl SqliteSource {
    /// Opens the database (which must exist), installs the change log, the checkpoint
    /// table and the triggers for `tables`, and reads the last checkpoint.
    /// `resume_from` (the durable history's checkpoint, committed with the events it
    /// covers) wins over the checkpoint in the database when given. A checkpoint of
    /// another log, or ahead of this one, is not applied: reading starts at the log's
    /// beginning and the first batch reports lost history.
    pub fn open(
        config: &SqliteSourceConfig,
        tables: &[String],
        resume_from: Option<Position>,
    ) -> Result<Self, SourceError> {
        let path = config.path.clone();
        if !path.exists() {
            return Err(SourceError::Setup(format!(
                "no database file at {}",
                path.display()
            )));
        }
        // Before anything is written: a second process must not touch the log.
        let lock = lock_database(&path)?;
        let mut conn = open(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI,
        )?;
        // WAL lets the application keep writing while changecast reads; NORMAL sync only
        // affects changecast's own checkpoint commits.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let installed = install(&mut conn, tables, &config.json_columns, true)?;
        let in_db: Option<(i64, Option<String>)> = conn
            .query_row(
                &format!("SELECT seq, log_id FROM {CHECKPOINT_TABLE} WHERE id = 1"),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let in_db = in_db.map(|(seq, id)| position(seq, id.as_deref().unwrap_or("")));
        let checkpoint = resume_from.or(in_db);
        let high = log_high(&conn)?;
        let (start, lost) = resume_point(checkpoint.as_ref(), &installed.log_id, high);
        if let Some(why) = &lost {
            tracing::warn!(
                db = %path.display(),
                "sqlite source: {why}; reading the change log from its start and telling \
                 clients that changes may have been missed (gap)"
            );
        }
        let schema_version = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        let shapes = table_shapes(&conn, tables)?;
        Ok(SqliteSource {
            path,
            conn,
            poll_interval: config.poll_interval,
            batch_size: config.batch_size.max(1),
            tables: tables.to_vec(),
            json_listed: config.json_columns.clone(),
            json: installed.json,
            _lock: lock,
            log_id: installed.log_id,
            checkpoint: start,
            lost_history: lost.is_some(),
            schema_version: Some(schema_version),
            shapes,
            schema_retry: None,
            schema_problem: None,
            counters: ChangeCounters::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log position reading starts after (0: the log's start).
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint.max(0) as u64
    }

    /// An acknowledged position's sequence number, if it is in this log.
    fn ack_seq(&self, p: Option<&Position>) -> Option<i64> {
        match parse_position(p?)? {
            (seq, Some(id)) if id == self.log_id.as_bytes() => Some(seq),
            _ => None,
        }
    }

    /// The blocking tail loop; see the module doc.
    fn tail(
        mut self,
        out: mpsc::Sender<Batch>,
        mut acks: watch::Receiver<Option<Position>>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut out = Some(out);
        let mut read_upto = self.checkpoint;
        let mut pending_ack: Option<i64> = None;
        let mut last_checkpoint_write = Instant::now();
        let mut last_data_version: Option<i64> = None;
        let mut trouble = Trouble {
            health,
            now: None,
            backoff: None,
        };
        loop {
            // Acknowledgements first: they are what makes positions durable. An ack of
            // a log replaced meanwhile is ignored.
            let router_done = match acks.has_changed() {
                Ok(true) => {
                    pending_ack = self.ack_seq(acks.borrow_and_update().as_ref());
                    false
                }
                Ok(false) => false,
                Err(_) => {
                    pending_ack = self.ack_seq(acks.borrow().as_ref()).or(pending_ack);
                    true
                }
            };
            if let Some(ack) = pending_ack
                && ack > self.checkpoint
                && (router_done || last_checkpoint_write.elapsed() >= CHECKPOINT_EVERY)
            {
                match self.write_checkpoint(ack) {
                    Ok(()) => {
                        last_checkpoint_write = Instant::now();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sqlite: checkpoint failed; will retry");
                        metrics::counter!("changecast_source_errors_total", "kind" => "checkpoint")
                            .increment(1);
                    }
                }
            }
            if router_done {
                if out.is_some() {
                    return Err(SourceError::Setup("router stopped unexpectedly".into()));
                }
                return Ok(());
            }
            if shutdown.is_cancelled() {
                // Stop reading; keep checkpointing until the router has drained.
                out = None;
                std::thread::sleep(self.poll_interval);
                continue;
            }
            let Some(tx) = out.as_ref() else {
                std::thread::sleep(self.poll_interval);
                continue;
            };
            if std::mem::take(&mut self.lost_history) {
                // Before any change read after the loss: clients get `gap` first.
                let batch = Batch {
                    changes: Vec::new(),
                    end: position(read_upto, &self.log_id),
                    lost_history: true,
                };
                if tx.blocking_send(batch).is_err() {
                    return Err(SourceError::Setup("router stopped unexpectedly".into()));
                }
            }

            // Cached: asked every poll_interval, it need not be parsed every time.
            let dv: rusqlite::Result<i64> = self
                .conn
                .prepare_cached("PRAGMA data_version")
                .and_then(|mut s| s.query_row([], |r| r.get(0)));
            let changed = match dv {
                Ok(dv) => {
                    let changed = last_data_version != Some(dv);
                    last_data_version = Some(dv);
                    changed
                }
                Err(e) => {
                    let reason = self.read_failure(&e);
                    pause(trouble.failed("read", reason), &shutdown);
                    continue;
                }
            };
            let repair_due = self
                .schema_retry
                .as_ref()
                .is_some_and(|(at, _)| Instant::now() >= *at);
            if !changed && !repair_due {
                std::thread::sleep(self.poll_interval);
                continue;
            }
            // A commit: the schema may have changed with it (cheap to tell).
            match self.check_schema(&mut trouble, read_upto) {
                Ok(Schema::Intact) => {}
                Ok(Schema::Repaired { log_recreated }) => {
                    if log_recreated {
                        // A new log starts at 1: read it all; acks of the old one are void.
                        read_upto = 0;
                        self.checkpoint = 0;
                        pending_ack = None;
                    }
                    self.lost_history = true;
                    last_data_version = None;
                    continue;
                }
                Err(reason) => {
                    // Keep reading what the log has; the repair is retried.
                    trouble.report(reason);
                }
            }
            // Drain everything committed so far, batch by batch.
            let mut failed = false;
            loop {
                match self.read_batch(read_upto) {
                    Ok(None) => break,
                    Ok(Some((batch, last, full))) => {
                        read_upto = last;
                        if tx.blocking_send(batch).is_err() {
                            return Err(SourceError::Setup("router stopped unexpectedly".into()));
                        }
                        if !full {
                            break;
                        }
                    }
                    Err(e) => {
                        // Re-check on the next tick, after a growing delay.
                        last_data_version = None;
                        let reason = self.read_failure(&e);
                        pause(trouble.failed("read", reason), &shutdown);
                        failed = true;
                        break;
                    }
                }
            }
            if !failed && self.schema_retry.is_none() && self.schema_problem.is_none() {
                trouble.ok();
            }
        }
    }

    fn read_failure(&self, e: &rusqlite::Error) -> String {
        format!(
            "sqlite source: reading the change log of {} failed: {e}",
            self.path.display()
        )
    }

    /// After a schema change with every object in place: when a watched table's columns
    /// changed (`ALTER TABLE … ADD COLUMN`, a table recreated with other columns), rebuilds
    /// the triggers so the next images carry the new columns. No change is lost meanwhile:
    /// writes before the rebuild were logged by the old triggers, with the old columns.
    /// False when the rebuild failed (it is retried on the next commit).
    fn rebuild_if_reshaped(&mut self) -> bool {
        let shapes = match table_shapes(&self.conn, &self.tables) {
            Ok(s) if s == self.shapes => return true,
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "sqlite source: reading the watched tables' columns failed");
                return false;
            }
        };
        match install(&mut self.conn, &self.tables, &self.json_listed, false) {
            Ok(installed) => {
                tracing::info!(
                    "sqlite source: a watched table's columns changed; triggers rebuilt"
                );
                self.json = installed.json;
                self.shapes = shapes;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "sqlite source: rebuilding the triggers after a schema change failed; retrying");
                metrics::counter!("changecast_source_errors_total", "kind" => "schema")
                    .increment(1);
                false
            }
        }
    }

    /// After a commit: when `PRAGMA schema_version` moved, checks that the log and every
    /// trigger are still there, and reinstalls what is missing (changes made meanwhile
    /// were not recorded: the caller reports lost history). `Err` says what is wrong
    /// while it cannot be repaired (retried with backoff).
    fn check_schema(&mut self, trouble: &mut Trouble, read_upto: i64) -> Result<Schema, String> {
        let retrying = self.schema_retry.is_some();
        let version: i64 = self
            .conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))
            .map_err(|e| self.read_failure(&e))?;
        if self.schema_version == Some(version) && !retrying {
            return Ok(Schema::Intact);
        }
        let (missing, absent) =
            missing_objects(&self.conn, &self.tables).map_err(|e| self.read_failure(&e))?;
        if missing.is_empty() {
            if !self.rebuild_if_reshaped() {
                // Retried on the next commit (the version is not marked as seen).
                return Ok(Schema::Intact);
            }
            self.schema_version = Some(version);
            self.schema_retry = None;
            self.note_absent_tables(&absent, trouble);
            // Dropped and created again in one transaction: nothing was missing, but
            // the sequence restarted below what was read.
            let high = log_high(&self.conn).map_err(|e| self.read_failure(&e))?;
            if high < read_upto {
                let id = renew_log_id(&self.conn).map_err(|e| self.read_failure(&e))?;
                tracing::warn!(
                    high,
                    read_upto,
                    "sqlite source: the change log was recreated; reading it from its start, \
                     clients get gap"
                );
                self.log_id = id;
                return Ok(Schema::Repaired {
                    log_recreated: true,
                });
            }
            return Ok(Schema::Intact);
        }
        let what = format!(
            "sqlite source: {} missing from {}: changes are not being recorded",
            missing.join(", "),
            self.path.display()
        );
        // Said before trying: the repair may wait for the application's write lock.
        trouble.report(format!("{what}; reinstalling"));
        match install(&mut self.conn, &self.tables, &self.json_listed, false) {
            Ok(installed) => {
                let log_recreated = installed.log_id != self.log_id;
                tracing::warn!(
                    reinstalled = %missing.join(", "),
                    log_recreated,
                    "sqlite source: change log and triggers reinstalled; clients get gap"
                );
                self.json = installed.json;
                self.log_id = installed.log_id;
                self.shapes = table_shapes(&self.conn, &self.tables).unwrap_or_default();
                self.schema_version = self
                    .conn
                    .query_row("PRAGMA schema_version", [], |r| r.get(0))
                    .ok();
                self.schema_retry = None;
                let absent = missing_objects(&self.conn, &self.tables)
                    .map(|(_, absent)| absent)
                    .unwrap_or_default();
                self.note_absent_tables(&absent, trouble);
                if self.schema_problem.is_none() {
                    trouble.ok();
                }
                Ok(Schema::Repaired { log_recreated })
            }
            Err(e) => {
                metrics::counter!("changecast_source_errors_total", "kind" => "schema")
                    .increment(1);
                let (_, mut delays) = self
                    .schema_retry
                    .take()
                    .unwrap_or_else(|| (Instant::now(), retry_backoff()));
                let next = delays.next().unwrap_or(Duration::from_secs(5));
                self.schema_retry = Some((Instant::now() + next, delays));
                Err(format!("{what}; reinstalling failed: {e}"))
            }
        }
    }

    /// Watched tables that are gone keep `/readyz` down (their routes cannot be served)
    /// until a schema change brings them back; the rest of the feed flows meanwhile.
    fn note_absent_tables(&mut self, absent: &[String], trouble: &mut Trouble) {
        self.schema_problem = (!absent.is_empty()).then(|| {
            format!(
                "sqlite source: watched {} missing from {}",
                absent.join(", "),
                self.path.display()
            )
        });
        if let Some(p) = &self.schema_problem {
            trouble.report(p.clone());
        }
    }

    /// Reads up to `batch_size` rows after `after`. Returns the batch, its last sequence
    /// number, and whether the batch was full (more may be waiting).
    fn read_batch(&mut self, after: i64) -> rusqlite::Result<Option<(Batch, i64, bool)>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT seq, tbl, op, key, before, after, at FROM {LOG_TABLE} \
             WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let mut rows = stmt.query(params![after, self.batch_size as i64])?;
        let mut changes = Vec::new();
        let mut last = after;
        let mut count = 0;
        while let Some(row) = rows.next()? {
            count += 1;
            // `seq` is the rowid: always an integer.
            let seq: i64 = row.get(0)?;
            last = seq;
            // Anything else in the row may be whatever a foreign writer or an older
            // changecast left there: it is converted, never trusted.
            match LogRow::read(seq, row).and_then(|r| r.into_change(&self.json, &self.log_id)) {
                Ok(change) => changes.push(change),
                Err(why) => {
                    tracing::warn!(seq, %why, "sqlite: skipping an unreadable change-log row");
                    metrics::counter!("changecast_source_skipped_total", "reason" => "malformed")
                        .increment(1);
                }
            }
        }
        drop(rows);
        drop(stmt);
        if count == 0 {
            return Ok(None);
        }
        changes.iter().for_each(|c| self.counters.count(c));
        let batch = Batch::new(changes, position(last, &self.log_id));
        Ok(Some((batch, last, count == self.batch_size)))
    }

    fn write_checkpoint(&mut self, seq: i64) -> rusqlite::Result<()> {
        // IMMEDIATE: take the write lock up front, so a busy database waits (busy_timeout)
        // instead of failing a read-to-write upgrade at once.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            &format!(
                "INSERT INTO {CHECKPOINT_TABLE}(id, seq, log_id) VALUES (1, ?1, ?2) \
                 ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, log_id = excluded.log_id"
            ),
            params![seq, self.log_id],
        )?;
        // The log behind the checkpoint is never read again.
        tx.execute(&format!("DELETE FROM {LOG_TABLE} WHERE seq <= ?1"), [seq])?;
        tx.commit()?;
        self.checkpoint = seq;
        Ok(())
    }
}

/// What a schema check found.
enum Schema {
    Intact,
    /// Missing triggers (or the log) were reinstalled.
    Repaired {
        log_recreated: bool,
    },
}

/// The highest sequence number the log has handed out: its last row, or the
/// AUTOINCREMENT counter when the log is pruned empty.
fn log_high(conn: &Connection) -> rusqlite::Result<i64> {
    let last: i64 = conn.query_row(
        &format!("SELECT COALESCE(MAX(seq), 0) FROM {LOG_TABLE}"),
        [],
        |r| r.get(0),
    )?;
    let counter: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = ?1",
            [LOG_TABLE],
            |r| r.get(0),
        )
        .optional()?;
    Ok(last.max(counter.unwrap_or(0)))
}

/// What is not in the schema: the log and triggers (which changecast can reinstall), and
/// watched tables (which only the application can bring back; a dropped table takes its
/// triggers with it).
fn missing_objects(
    conn: &Connection,
    tables: &[String],
) -> rusqlite::Result<(Vec<String>, Vec<String>)> {
    let present: HashSet<String> = conn
        .prepare_cached("SELECT name FROM sqlite_schema WHERE type IN ('table', 'trigger')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut missing = Vec::new();
    let mut absent_tables = Vec::new();
    if !present.contains(LOG_TABLE) {
        missing.push(format!("change log `{LOG_TABLE}`"));
    }
    for table in tables {
        if !present.contains(table) {
            absent_tables.push(format!("table `{table}`"));
            continue;
        }
        for op in ["insert", "update", "delete"] {
            let name = trigger_name(table, op);
            if !present.contains(&name) {
                missing.push(format!("trigger `{name}`"));
            }
        }
    }
    Ok((missing, absent_tables))
}

/// The columns (name, declared type, key position) of each watched table, as one string:
/// the triggers build a row's images from this list, so when it changes they are rebuilt.
fn table_shapes(conn: &Connection, tables: &[String]) -> rusqlite::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    for table in tables {
        let _ = write!(out, "{table}:");
        for c in columns(conn, table)? {
            let _ = write!(out, "{}/{}/{},", c.name, c.decl, c.pk);
        }
        out.push(';');
    }
    Ok(out)
}

fn trigger_name(table: &str, op: &str) -> String {
    format!("_changecast_{table}_{op}")
}

impl Source for SqliteSource {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Batch>,
        acks: watch::Receiver<Option<Position>>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        // /readyz is down, with the reason, while the log cannot be read or a trigger is
        // missing; failures are retried with a growing delay.
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.tail(out, acks, health, shutdown))
                .await
                .map_err(|e| SourceError::Setup(format!("sqlite tail thread failed: {e}")))?
        })
    }
}

/// One change-log row as stored.
struct LogRow {
    seq: i64,
    table: String,
    op: String,
    key: Option<String>,
    before: Option<String>,
    after: Option<String>,
    at: Option<String>,
}

/// A TEXT value as a string (lossy for invalid UTF-8, which SQLite lets TEXT hold).
fn text(v: ValueRef<'_>, what: &str) -> Result<Option<String>, String> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Text(t) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
        other => Err(format!("`{what}` holds {}, not TEXT", other.data_type())),
    }
}

/// Any value rendered as a key: BLOB as hex (as in documents), numbers as their text.
fn key_text(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Real(f) => Some(f.to_string()),
        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Some(hex(b)),
    }
}

/// Upper-case hex, as SQLite's `hex()` writes it.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02X}");
    }
    s
}

impl LogRow {
    /// Converts a row of `SELECT seq, tbl, op, key, before, after, at`; an error names
    /// the column that is not what the triggers write.
    fn read(seq: i64, row: &rusqlite::Row<'_>) -> Result<LogRow, String> {
        let get = |i: usize| row.get_ref(i).map_err(|e| e.to_string());
        let required = |i: usize, what: &str| -> Result<String, String> {
            text(get(i)?, what)?.ok_or_else(|| format!("`{what}` is NULL"))
        };
        Ok(LogRow {
            seq,
            table: required(1, "tbl")?,
            op: required(2, "op")?,
            key: key_text(get(3)?),
            before: text(get(4)?, "before")?,
            after: text(get(5)?, "after")?,
            at: text(get(6)?, "at").ok().flatten(),
        })
    }

    fn into_change(self, json: &JsonColumns, log_id: &str) -> Result<Change, String> {
        let op = Op::parse(&self.op).ok_or_else(|| format!("unknown op `{}`", self.op))?;
        let json = json.get(&self.table);
        let parse = |s: Option<String>| -> Result<Option<Value>, String> {
            s.map(|s| match serde_json::from_str::<Value>(&s) {
                Ok(doc @ Value::Object(_)) => Ok(nest_json_columns(doc, json)),
                Ok(_) => Err("bad row image: not a JSON object".to_string()),
                Err(e) => Err(format!("bad row image: {e}")),
            })
            .transpose()
        };
        let before = parse(self.before)?;
        let after = parse(self.after)?;
        let updated_fields = match (op, &before, &after) {
            (Op::Update, Some(b), Some(a)) => Some(changed_fields(b, a)),
            _ => None,
        };
        Ok(Change {
            op,
            collection: self.table,
            key: self.key.unwrap_or_default(),
            after,
            before,
            updated_fields,
            position: position(self.seq, log_id),
            at: self.at,
            // Lookups for this change read the tables as they were right after this row.
            as_of: Some(AsOf::Seq(self.seq as u64)),
        })
    }
}

/// Whether a declared column type says the column holds JSON (`JSON`, `JSONB`, any case).
pub(crate) fn is_json_decl(decl: &str) -> bool {
    let d = decl.trim();
    d.eq_ignore_ascii_case("json") || d.eq_ignore_ascii_case("jsonb")
}

/// The columns of each table whose TEXT is JSON: declared `JSON`/`JSONB`, or listed in
/// `[source] json_columns` as `table.column`.
pub(crate) type JsonColumns = HashMap<String, HashSet<String>>;

/// Splits a `json_columns` entry into table and column (at the first dot).
pub fn split_json_column(entry: &str) -> Option<(&str, &str)> {
    entry
        .split_once('.')
        .filter(|(t, c)| !t.is_empty() && !c.is_empty())
}

/// A JSON column's text (an object or an array) is read as a nested document, so that
/// paths like `owner._id` work on SQLite as they do on MongoDB. Only JSON columns: a
/// user-typed TEXT that happens to look like JSON stays the string it is.
pub(crate) fn nest_json_columns(mut doc: Value, json: Option<&HashSet<String>>) -> Value {
    let Some(json) = json.filter(|j| !j.is_empty()) else {
        return doc;
    };
    if let Value::Object(map) = &mut doc {
        for (name, v) in map.iter_mut() {
            if let Value::String(s) = v
                && json.contains(name)
                && let Some(nested) = parse_json_text(s)
            {
                *v = nested;
            }
        }
    }
    doc
}

pub(crate) fn parse_json_text(s: &str) -> Option<Value> {
    let t = s.trim_start();
    if !(t.starts_with('{') || t.starts_with('[')) {
        return None;
    }
    serde_json::from_str(t).ok()
}

/// A new random log identity.
fn new_log_id() -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(16)
        .collect()
}

/// Gives the log a new identity (it was recreated): positions of the old one are void.
fn renew_log_id(conn: &Connection) -> rusqlite::Result<String> {
    let id = new_log_id();
    conn.execute(
        &format!(
            "INSERT INTO {META_TABLE}(key, value) VALUES ('log_id', ?1) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        ),
        [&id],
    )?;
    Ok(id)
}

/// What [`install`] set up.
struct Installed {
    json: JsonColumns,
    log_id: String,
}

/// Creates the log (with a new identity), the meta and checkpoint tables, and (re)creates
/// the triggers for `tables`, all in one transaction. Triggers are rebuilt on every start
/// so they follow schema changes made while changecast was stopped. `strict`: a missing
/// table is an error (at start); else its triggers are skipped (while running: the
/// schema check keeps reporting it).
fn install(
    conn: &mut Connection,
    tables: &[String],
    listed: &[String],
    strict: bool,
) -> Result<Installed, SourceError> {
    // IMMEDIATE: wait for a busy application writer instead of failing an upgrade at once.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut json = JsonColumns::new();
    let log_exists: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
        [LOG_TABLE],
        |r| r.get(0),
    )?;
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            tbl TEXT NOT NULL,
            op TEXT NOT NULL,
            key TEXT,
            before TEXT,
            after TEXT,
            at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            log_id TEXT
        );
        CREATE TABLE IF NOT EXISTS {META_TABLE} (key TEXT PRIMARY KEY, value TEXT);"
    ))?;
    // Checkpoint tables of earlier versions have no log_id: their checkpoint is taken to
    // belong to the log that is there.
    if !columns(&tx, CHECKPOINT_TABLE)?
        .iter()
        .any(|c| c.name == "log_id")
    {
        tx.execute_batch(&format!(
            "ALTER TABLE {CHECKPOINT_TABLE} ADD COLUMN log_id TEXT;"
        ))?;
    }
    let existing: Option<String> = tx
        .query_row(
            &format!("SELECT value FROM {META_TABLE} WHERE key = 'log_id'"),
            [],
            |r| r.get(0),
        )
        .optional()?;
    let log_id = match existing {
        Some(id) if log_exists => id,
        // A new log (or one from before identities): a new identity.
        _ => renew_log_id(&tx)?,
    };
    for table in tables {
        let cols = columns(&tx, table)?;
        if cols.is_empty() {
            if strict {
                return Err(SourceError::Setup(format!(
                    "no table `{table}` in the database"
                )));
            }
            continue;
        }
        for sql in trigger_sql(table, &cols) {
            tx.execute_batch(&sql)?;
        }
        let mut nested: HashSet<String> = cols
            .iter()
            .filter(|c| is_json_decl(&c.decl))
            .map(|c| c.name.clone())
            .collect();
        nested.extend(
            listed
                .iter()
                .filter_map(|e| split_json_column(e))
                .filter(|(t, _)| t == table)
                .map(|(_, c)| c.to_string()),
        );
        json.insert(table.clone(), nested);
    }
    tx.commit()?;
    Ok(Installed { json, log_id })
}

/// A column's value as `json_object()`/`json_array()` can hold it without failing the
/// application's write: BLOB as hex; REAL with 17 significant digits (JSON's own
/// rendering keeps 15; SQLite's `printf` is then exact to about 1e-16 relative, not
/// always to the last bit), and infinities, which JSON cannot hold
/// (SQLite before 3.43 writes the invalid `Inf`), as null; everything else as itself.
/// `printf('%!.17g')` of a finite REAL is always a valid JSON number, so `json()` of it
/// cannot fail.
fn json_value_expr(col: &str) -> String {
    format!(
        "CASE typeof({col}) WHEN 'blob' THEN hex({col}) \
         WHEN 'real' THEN CASE WHEN abs({col}) <= 1.7976931348623157e308 \
         THEN json(printf('%!.17g', {col})) END \
         ELSE {col} END"
    )
}

/// The SQL (for the row `row`, `NEW` or `OLD`, or a table alias) that computes a row's key
/// as TEXT, the one definition the triggers and anything matching rows by key share:
/// - one primary-key column: its text form (BLOB as hex, numbers as SQLite's text; NULL,
///   which rowid tables allow, as NULL, read as the empty key);
/// - a composite primary key: a JSON array of the columns (BLOB as hex, infinities null);
/// - no declared primary key: the rowid.
pub(crate) fn key_expr(row: &str, cols: &[Column]) -> String {
    let mut pk: Vec<&Column> = cols.iter().filter(|c| c.pk > 0).collect();
    pk.sort_by_key(|c| c.pk);
    let col = |c: &Column| format!("{row}.{}", ident(&c.name));
    match pk.as_slice() {
        [] => format!("CAST({row}.rowid AS TEXT)"),
        [one] => {
            let c = col(one);
            format!("CASE WHEN typeof({c}) = 'blob' THEN hex({c}) ELSE CAST({c} AS TEXT) END")
        }
        many => format!(
            "json_array({})",
            many.iter()
                .map(|c| json_value_expr(&col(c)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn trigger_sql(table: &str, cols: &[Column]) -> Vec<String> {
    let image = |row: &str| {
        let pairs: Vec<String> = cols
            .iter()
            .map(|c| {
                let col = format!("{row}.{}", ident(&c.name));
                format!("{}, {}", literal(&c.name), json_value_expr(&col))
            })
            .collect();
        format!("json_object({})", pairs.join(", "))
    };
    let key = |row: &str| key_expr(row, cols);
    let t = literal(table);
    let trig = |op: &str| ident(&trigger_name(table, op));
    let on = ident(table);
    vec![
        format!(
            "DROP TRIGGER IF EXISTS {name}; CREATE TRIGGER {name} AFTER INSERT ON {on} BEGIN \
             INSERT INTO {LOG_TABLE}(tbl, op, key, after) VALUES ({t}, 'insert', {k}, {a}); END;",
            name = trig("insert"),
            k = key("NEW"),
            a = image("NEW"),
        ),
        format!(
            "DROP TRIGGER IF EXISTS {name}; CREATE TRIGGER {name} AFTER UPDATE ON {on} BEGIN \
             INSERT INTO {LOG_TABLE}(tbl, op, key, before, after) \
             VALUES ({t}, 'update', {k}, {b}, {a}); END;",
            name = trig("update"),
            k = key("NEW"),
            b = image("OLD"),
            a = image("NEW"),
        ),
        format!(
            "DROP TRIGGER IF EXISTS {name}; CREATE TRIGGER {name} AFTER DELETE ON {on} BEGIN \
             INSERT INTO {LOG_TABLE}(tbl, op, key, before) VALUES ({t}, 'delete', {k}, {b}); END;",
            name = trig("delete"),
            k = key("OLD"),
            b = image("OLD"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_json_columns_become_nested_documents() {
        let json: HashSet<String> = ["owner", "tags", "name"].map(String::from).into();
        let doc = nest_json_columns(
            json!({
                "owner": "{\"_id\": \"u1\"}",
                "tags": "[1, 2]",
                "name": "{not json",
                "plain": "hello",
                "assignee": "[\"u1\",\"u2\"]"
            }),
            Some(&json),
        );
        assert_eq!(doc["owner"]["_id"], "u1");
        assert_eq!(doc["tags"], json!([1, 2]));
        assert_eq!(doc["name"], "{not json");
        assert_eq!(doc["plain"], "hello");
        assert_eq!(doc["assignee"], "[\"u1\",\"u2\"]", "not a JSON column");
    }

    #[test]
    fn json_declared_types_and_listed_columns() {
        for d in ["JSON", "json", " Jsonb "] {
            assert!(is_json_decl(d), "{d}");
        }
        for d in ["TEXT", "", "JSONTEXT", "VARCHAR(10)"] {
            assert!(!is_json_decl(d), "{d}");
        }
        assert_eq!(split_json_column("t.c.d"), Some(("t", "c.d")));
        assert_eq!(split_json_column("t."), None);
        assert_eq!(split_json_column("plain"), None);
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn malformed_rows_are_refused_not_panicked_on() {
        let row = |op: &str, after: Option<&str>| LogRow {
            seq: 1,
            table: "t".into(),
            op: op.into(),
            key: Some("k".into()),
            before: None,
            after: after.map(str::to_owned),
            at: Some("2026-01-01T00:00:00.000Z".into()),
        };
        let none = JsonColumns::new();
        assert!(row("explode", Some("{}")).into_change(&none, "L").is_err());
        assert!(
            row("insert", Some("{broken"))
                .into_change(&none, "L")
                .is_err()
        );
        assert!(row("insert", Some("[1]")).into_change(&none, "L").is_err());
        let ok = row("insert", Some("{\"a\":1}"))
            .into_change(&none, "L")
            .unwrap();
        assert_eq!(ok.after, Some(json!({"a": 1})));
    }
}

/// Random rows of every storage class written through the real triggers and read back by
/// the real reader: the write never fails, and the change equals the row.
#[cfg(test)]
mod prop {
    use super::*;
    use proptest::prelude::*;
    use rusqlite::types::Value as Sql;

    fn sql_value() -> impl Strategy<Value = Sql> {
        prop_oneof![
            Just(Sql::Null),
            any::<i64>().prop_map(Sql::Integer),
            any::<f64>().prop_map(Sql::Real),
            prop_oneof![
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                Just(f64::MAX),
                Just(f64::MIN_POSITIVE)
            ]
            .prop_map(Sql::Real),
            ".{0,40}".prop_map(Sql::Text),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Sql::Blob),
        ]
    }

    /// What a document holds for a stored value (SQLite stores NaN as NULL).
    fn expected(v: &Sql) -> Value {
        match v {
            Sql::Null => Value::Null,
            Sql::Integer(i) => Value::from(*i),
            Sql::Real(f) if f.is_finite() => Value::from(*f),
            Sql::Real(_) => Value::Null,
            Sql::Text(s) => Value::from(s.as_str()),
            Sql::Blob(b) => Value::from(hex(b)),
        }
    }

    /// Equal, but REALs within SQLite's rendering precision (see `json_value_expr`).
    fn same(got: &Value, want: &Value) -> bool {
        match (got, want) {
            (Value::Object(g), Value::Object(w)) => {
                g.len() == w.len() && g.iter().all(|(k, v)| w.get(k).is_some_and(|x| same(v, x)))
            }
            (Value::Array(g), Value::Array(w)) => {
                g.len() == w.len() && g.iter().zip(w).all(|(a, b)| same(a, b))
            }
            (Value::Number(g), Value::Number(w)) if w.is_f64() => {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                g == w || (g - w).abs() <= w.abs() * 1e-15
            }
            _ => got == want,
        }
    }

    fn source() -> (tempfile::TempDir, SqliteSource) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE r (k PRIMARY KEY, a, b);
                 CREATE TABLE w (k1, k2, a, PRIMARY KEY (k1, k2)) WITHOUT ROWID;",
            )
            .unwrap();
        let config = SqliteSourceConfig {
            path,
            poll_interval: Duration::from_millis(2),
            batch_size: 100,
            json_columns: vec![],
        };
        let source = SqliteSource::open(&config, &["r".into(), "w".into()], None).unwrap();
        (dir, source)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_row_is_written_and_read_back_as_it_is(
            k in sql_value(), a in sql_value(), b in sql_value(), k1 in sql_value()
        ) {
            thread_local! {
                static SOURCE: std::cell::RefCell<Option<(tempfile::TempDir, SqliteSource, i64)>> =
                    const { std::cell::RefCell::new(None) };
            }
            SOURCE.with(|cell| {
                let mut cell = cell.borrow_mut();
                let (_, source, upto) = cell.get_or_insert_with(|| {
                    let (dir, s) = source();
                    (dir, s, 0)
                });
                let app = Connection::open(&source.path).unwrap();
                // WITHOUT ROWID refuses a NULL key by itself; that is the app's schema.
                let k1 = if k1 == Sql::Null { Sql::Integer(0) } else { k1 };
                app.execute("INSERT INTO r VALUES (?1, ?2, ?3)", params![k, a, b]).unwrap();
                app.execute("INSERT INTO w VALUES (?1, 7, ?2)", params![k1, a]).unwrap();
                app.execute_batch("DELETE FROM r; DELETE FROM w;").unwrap();
                let (batch, last, _) = source.read_batch(*upto).unwrap().unwrap();
                *upto = last;
                prop_assert_eq!(batch.changes.len(), 4);
                let r = &batch.changes[0];
                let want = serde_json::json!({"k": expected(&k), "a": expected(&a), "b": expected(&b)});
                prop_assert!(same(r.after.as_ref().unwrap(), &want), "{:?} != {want}", r.after);
                match &k {
                    Sql::Real(_) => {} // SQLite's own text form of a REAL
                    Sql::Null => prop_assert_eq!(&r.key, ""),
                    other => {
                        let want = match expected(other) {
                            Value::String(s) => s,
                            v => v.to_string(),
                        };
                        prop_assert_eq!(&r.key, &want);
                    }
                }
                let w = &batch.changes[1];
                let want = serde_json::json!([expected(&k1), 7]);
                prop_assert!(same(&serde_json::from_str(&w.key).unwrap(), &want), "{} != {want}", w.key);
                let want = serde_json::json!({"k1": expected(&k1), "k2": 7, "a": expected(&a)});
                prop_assert!(same(w.after.as_ref().unwrap(), &want), "{:?} != {want}", w.after);
                prop_assert_eq!(batch.changes[2].before.as_ref(), r.after.as_ref());
                prop_assert_eq!(batch.changes[3].before.as_ref(), w.after.as_ref());
                Ok(())
            })?;
        }
    }
}

#[cfg(test)]
mod resume_tests {
    use super::*;

    #[test]
    fn a_checkpoint_applies_only_to_its_own_log_and_never_ahead_of_it() {
        let mine = position(5, "L1");
        assert_eq!(resume_point(None, "L1", 0), (0, None));
        assert_eq!(resume_point(Some(&mine), "L1", 9), (5, None));
        assert_eq!(resume_point(Some(&mine), "L1", 5), (5, None));
        let (start, lost) = resume_point(Some(&mine), "L2", 9);
        assert_eq!(start, 0);
        assert!(lost.unwrap().contains("another change log"));
        let (start, lost) = resume_point(Some(&mine), "L1", 4);
        assert_eq!(start, 0);
        assert!(lost.unwrap().contains("ahead"));
        // From before identities: trusted unless ahead.
        let legacy = Position::from_seq(3);
        assert_eq!(resume_point(Some(&legacy), "L1", 3), (3, None));
        assert_eq!(resume_point(Some(&legacy), "L1", 2).0, 0);
        // Not an SQLite position at all (a MongoDB token in the history).
        assert!(
            resume_point(Some(&Position(vec![1, 2])), "L1", 9)
                .1
                .is_some()
        );
        assert!(
            resume_point(Some(&Position(vec![0xFF; 8])), "L1", 9)
                .1
                .is_some()
        );
    }

    #[test]
    fn positions_round_trip_and_order_by_sequence() {
        let p = position(1042, "abc");
        assert_eq!(parse_position(&p), Some((1042, Some(&b"abc"[..]))));
        assert!(position(9, "abc").0 < position(10, "abc").0);
        assert_eq!(parse_position(&Position::from_seq(7)), Some((7, None)));
        assert_eq!(parse_position(&Position(vec![])), None);
    }

    /// Issue 11 item 5: consecutive failures wait longer and longer (no ~100 warnings a
    /// second): each delay is at least 50 ms doubling to 5 s (jitter only adds), so a
    /// failure that persists is retried at most ~20 times a minute.
    #[test]
    fn retry_delays_grow_across_consecutive_failures() {
        let delays: Vec<Duration> = retry_backoff().take(40).collect();
        assert_eq!(delays.len(), 40, "retries for as long as it fails");
        for (k, d) in delays.iter().enumerate() {
            let floor = Duration::from_millis(50)
                .saturating_mul(1 << k.min(20))
                .min(Duration::from_secs(5));
            assert!(*d >= floor, "attempt {k}: {d:?} < {floor:?}");
            assert!(*d < Duration::from_secs(10), "attempt {k}: {d:?}");
        }
        let first_minute = delays
            .iter()
            .scan(Duration::ZERO, |t, d| {
                *t += *d;
                Some(*t)
            })
            .take_while(|t| *t <= Duration::from_secs(60))
            .count();
        assert!(first_minute <= 20, "{first_minute} retries in a minute");
    }
}
