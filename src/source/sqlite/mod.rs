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
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Batch, Catalog, ChangeCounters, Health, Source, SourceError};
use crate::change::{Change, Op, Position, changed_fields};
use crate::config::SqliteSourceConfig;

const LOG_TABLE: &str = "_changecast_log";
const CHECKPOINT_TABLE: &str = "_changecast_checkpoint";
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
    /// Per table, the columns read as nested JSON.
    json: JsonColumns,
    /// Held while this source exists: one changecast per database (see `lock_database`).
    _lock: std::fs::File,
    /// Highest log sequence number already checkpointed at open.
    checkpoint: i64,
    counters: ChangeCounters,
}

impl SqliteSource {
    /// Opens the database (which must exist), installs the change log, the checkpoint
    /// table and the triggers for `tables`, and reads the last checkpoint.
    /// `resume_from` (the durable history's checkpoint, committed with the events it
    /// covers) wins over the checkpoint in the database when given.
    pub fn open(
        config: &SqliteSourceConfig,
        tables: &[String],
        resume_from: Option<u64>,
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
        let json = install(&mut conn, tables, &config.json_columns)?;
        let checkpoint: i64 = conn
            .query_row(
                &format!("SELECT seq FROM {CHECKPOINT_TABLE} WHERE id = 1"),
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let checkpoint = match resume_from {
            Some(seq) => seq as i64,
            None => checkpoint,
        };
        Ok(SqliteSource {
            path,
            conn,
            poll_interval: config.poll_interval,
            batch_size: config.batch_size.max(1),
            json,
            _lock: lock,
            checkpoint,
            counters: ChangeCounters::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last checkpointed log position (0 before the first).
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint.max(0) as u64
    }

    /// The blocking tail loop; see the module doc.
    fn tail(
        mut self,
        out: mpsc::Sender<Batch>,
        mut acks: watch::Receiver<Option<Position>>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut out = Some(out);
        let mut read_upto = self.checkpoint;
        let mut pending_ack: Option<i64> = None;
        let mut last_checkpoint_write = Instant::now();
        let mut last_data_version: Option<i64> = None;
        let mut error_backoff = Duration::ZERO;
        loop {
            // Acknowledgements first: they are what makes positions durable.
            let router_done = match acks.has_changed() {
                Ok(true) => {
                    pending_ack = acks
                        .borrow_and_update()
                        .as_ref()
                        .and_then(Position::as_seq)
                        .map(|s| s as i64);
                    false
                }
                Ok(false) => false,
                Err(_) => {
                    pending_ack = acks
                        .borrow()
                        .as_ref()
                        .and_then(Position::as_seq)
                        .map(|s| s as i64)
                        .or(pending_ack);
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

            let dv: rusqlite::Result<i64> =
                self.conn.query_row("PRAGMA data_version", [], |r| r.get(0));
            let changed = match dv {
                Ok(dv) => {
                    let changed = last_data_version != Some(dv);
                    last_data_version = Some(dv);
                    changed
                }
                Err(e) => {
                    self.note_error(&e, &mut error_backoff);
                    continue;
                }
            };
            if !changed {
                std::thread::sleep(self.poll_interval);
                continue;
            }
            // Drain everything committed so far, batch by batch.
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
                        // Re-check on the next tick.
                        last_data_version = None;
                        self.note_error(&e, &mut error_backoff);
                        break;
                    }
                }
            }
            error_backoff = Duration::ZERO;
        }
    }

    fn note_error(&self, e: &rusqlite::Error, backoff: &mut Duration) {
        tracing::warn!(error = %e, "sqlite: reading the change log failed; retrying");
        metrics::counter!("changecast_source_errors_total", "kind" => "read").increment(1);
        *backoff = (*backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        std::thread::sleep(*backoff);
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
            match LogRow::read(seq, row).and_then(|r| r.into_change(&self.json)) {
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
        let batch = Batch::new(changes, Position::from_seq(last as u64));
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
                "INSERT INTO {CHECKPOINT_TABLE}(id, seq) VALUES (1, ?1) \
                 ON CONFLICT(id) DO UPDATE SET seq = excluded.seq"
            ),
            [seq],
        )?;
        // The log behind the checkpoint is never read again.
        tx.execute(&format!("DELETE FROM {LOG_TABLE} WHERE seq <= ?1"), [seq])?;
        tx.commit()?;
        self.checkpoint = seq;
        Ok(())
    }
}

impl Source for SqliteSource {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Batch>,
        acks: watch::Receiver<Option<Position>>,
        _health: std::sync::Arc<Health>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        // A local file: it is up while this runs (read errors are retried and counted).
        Box::pin(async move {
            tokio::task::spawn_blocking(move || self.tail(out, acks, shutdown))
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

    fn into_change(self, json: &JsonColumns) -> Result<Change, String> {
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
            position: Position::from_seq(self.seq as u64),
            at: self.at,
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

/// Creates the log and checkpoint tables and (re)creates the triggers for `tables`, all in
/// one transaction. Triggers are rebuilt on every start so they follow schema changes made
/// while changecast was stopped.
fn install(
    conn: &mut Connection,
    tables: &[String],
    listed: &[String],
) -> Result<JsonColumns, SourceError> {
    // IMMEDIATE: wait for a busy application writer instead of failing an upgrade at once.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut json = JsonColumns::new();
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
            seq INTEGER NOT NULL
        );"
    ))?;
    for table in tables {
        let cols = columns(&tx, table)?;
        if cols.is_empty() {
            return Err(SourceError::Setup(format!(
                "no table `{table}` in the database"
            )));
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
    Ok(json)
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
    let trig = |op: &str| ident(&format!("_changecast_{table}_{op}"));
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
        assert!(row("explode", Some("{}")).into_change(&none).is_err());
        assert!(row("insert", Some("{broken")).into_change(&none).is_err());
        assert!(row("insert", Some("[1]")).into_change(&none).is_err());
        let ok = row("insert", Some("{\"a\":1}")).into_change(&none).unwrap();
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
