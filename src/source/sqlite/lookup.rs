//! Queries against the SQLite database for the rules (owner lookups, user resolution).
//!
//! In: a [`Query`]. Out: matching rows as JSON documents (JSON columns nested, as the
//! change feed does: declared `JSON`/`JSONB` or listed in `[source] json_columns`; other
//! TEXT stays a string). Queries run on read-only connections from a small pool, on tokio's
//! blocking threads, so a slow query never blocks the runtime.
//!
//! As of a change (`Query::as_of` = `AsOf::Seq(p)`, routing change-log row `p`), the
//! answer is the table as it was right after row `p`, read from the change log, which
//! still holds every row after `p` (it is pruned only up to the acknowledged checkpoint,
//! which is at most the last row before the batch being routed). In one read transaction:
//! the log rows of the table after `p`; none → the plain query is exact. Otherwise, for
//! each key changed after `p`, its state at `p` is the `before` image of its earliest log
//! row after `p` (none if that row is an insert); the answer is the current matching rows
//! whose key did not change after `p`, plus the images at `p` that match the filter
//! (matched in Rust with SQLite's equality and affinity rules), cut to `limit`.
//! If the checkpoint is already past `p` (another process pruned the log), the current
//! state is read instead, logged and counted in
//! `changecast_lookups_not_as_of_total{collection, reason="log_pruned"}`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::{Map, Value};

use super::{
    CHECKPOINT_TABLE, LOG_TABLE, META_TABLE, columns, hex, ident, is_json_decl, key_expr,
    nest_json_columns, open, parse_json_text, split_json_column,
};
use crate::change::AsOf;
use crate::path::FieldPath;
use crate::source::{Lookup, LookupError, Query};

/// Idle read connections kept for reuse.
const POOL_MAX: usize = 4;

/// Read-only lookups on an SQLite file. Cheap to clone.
#[derive(Clone)]
pub struct SqliteLookup {
    inner: Arc<Pool>,
}

struct Pool {
    path: PathBuf,
    /// `[source] json_columns`: (table, column) pairs read as nested JSON besides the
    /// columns declared `JSON`/`JSONB`.
    json_columns: HashSet<(String, String)>,
    /// Idle connections; taken for one query, returned after.
    idle: Mutex<Vec<Connection>>,
}

impl SqliteLookup {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::with_json_columns(path, &[])
    }

    /// Also reads these `table.column`s as nested JSON (`[source] json_columns`).
    pub fn with_json_columns(path: impl Into<PathBuf>, listed: &[String]) -> Self {
        let json_columns = listed
            .iter()
            .filter_map(|e| split_json_column(e))
            .map(|(t, c)| (t.to_string(), c.to_string()))
            .collect();
        SqliteLookup {
            inner: Arc::new(Pool {
                path: path.into(),
                json_columns,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl Pool {
    fn run(&self, query: &Query) -> Result<Vec<Value>, String> {
        let conn = match self.idle.lock().map(|mut p| p.pop()) {
            Ok(Some(conn)) => conn,
            _ => open(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| e.to_string())?,
        };
        let result = match query.as_of {
            Some(AsOf::Seq(p)) => execute_as_of(
                &conn,
                query,
                i64::try_from(p).unwrap_or(i64::MAX),
                &self.json_columns,
            ),
            // A cluster time means nothing here; the current state is all there is.
            _ => execute(&conn, query, &self.json_columns),
        }
        .map_err(|e| e.to_string());
        if let Ok(mut pool) = self.idle.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(conn);
        }
        result
    }
}

impl Pool {
    /// The row of `table` whose change-log key is `key`: matched by the same key expression
    /// the triggers write (the primary key as text, a JSON array of a composite one, or
    /// the rowid), so any key an event carried finds its row.
    fn by_key(&self, table: &str, key: &str) -> Result<Option<Value>, String> {
        let conn = open(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| e.to_string())?;
        let cols = columns(&conn, table).map_err(|e| e.to_string())?;
        if cols.is_empty() {
            return Err(format!("no table `{table}` in the database"));
        }
        let sql = format!(
            "SELECT * FROM {} WHERE {} = ?1 LIMIT 1",
            ident(table),
            key_expr(&ident(table), &cols)
        );
        let query = Query {
            collection: table.to_owned(),
            filter: Vec::new(),
            limit: Some(1),
            as_of: None,
        };
        let found = rows(
            &conn,
            &query,
            (sql, vec![SqlValue::Text(key.to_owned())]),
            false,
            &self.json_columns,
        )
        .map_err(|e| e.to_string())?;
        Ok(found.into_iter().next().map(|(_, doc)| doc))
    }
}

impl Lookup for SqliteLookup {
    fn document<'a>(
        &'a self,
        collection: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, LookupError>> {
        Box::pin(async move {
            let pool = Arc::clone(&self.inner);
            let (table, k) = (collection.to_owned(), key.to_owned());
            tokio::task::spawn_blocking(move || pool.by_key(&table, &k))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map_err(|message| LookupError::Failed {
                    collection: collection.to_owned(),
                    message,
                })
        })
    }

    fn find(&self, query: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>> {
        Box::pin(async move {
            let collection = query.collection.clone();
            let pool = Arc::clone(&self.inner);
            tokio::task::spawn_blocking(move || pool.run(&query))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map_err(|message| LookupError::Failed {
                    collection,
                    message,
                })
        })
    }
}

/// The SQL of a query: `SELECT *[, extra] FROM table WHERE ...[ LIMIT n]`, and its arguments.
fn query_sql(query: &Query, extra: Option<&str>, limit: bool) -> (String, Vec<SqlValue>) {
    let table = ident(&query.collection);
    let mut sql = match extra {
        Some(e) => format!("SELECT *, {e} FROM {table}"),
        None => format!("SELECT * FROM {table}"),
    };
    let mut args: Vec<SqlValue> = Vec::with_capacity(query.filter.len());
    for (i, (path, value)) in query.filter.iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        let column = ident(path.root());
        if path.rest().is_empty() {
            sql.push_str(&column);
        } else {
            // A nested field of a JSON column: `$."a"."b"`.
            sql.push_str(&format!("json_extract({column}, ?{})", args.len() + 1));
            args.push(SqlValue::Text(json_path(path)));
        }
        sql.push_str(&format!(" = ?{}", args.len() + 1));
        args.push(to_sql(value));
    }
    if limit && let Some(limit) = query.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    (sql, args)
}

fn json_path(path: &FieldPath) -> String {
    let rest: String = path
        .rest()
        .iter()
        .map(|s| format!(".\"{}\"", s.replace('"', "\\\"")))
        .collect();
    format!("${rest}")
}

/// Runs `sql`; each row as a document, with the text of its last column when `keyed`
/// (the row's log key, not part of the document).
fn rows(
    conn: &Connection,
    query: &Query,
    (sql, args): (String, Vec<SqlValue>),
    keyed: bool,
    listed: &HashSet<(String, String)>,
) -> rusqlite::Result<Vec<(Option<String>, Value)>> {
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    if keyed {
        names.pop();
    }
    // Which columns nest: known from the prepared statement, no extra query.
    let json: Vec<bool> = stmt
        .columns()
        .iter()
        .map(|c| {
            c.decl_type().is_some_and(is_json_decl)
                || listed.contains(&(query.collection.clone(), c.name().to_string()))
        })
        .collect();
    let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut doc = Map::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            doc.insert(name.clone(), from_sql(row.get_ref(i)?, json[i]));
        }
        let key = if keyed {
            row.get::<_, Option<String>>(names.len())?
        } else {
            None
        };
        out.push((key, Value::Object(doc)));
    }
    Ok(out)
}

/// Builds and runs the SQL for one query, on the current state.
fn execute(
    conn: &Connection,
    query: &Query,
    listed: &HashSet<(String, String)>,
) -> rusqlite::Result<Vec<Value>> {
    Ok(
        rows(conn, query, query_sql(query, None, true), false, listed)?
            .into_iter()
            .map(|(_, d)| d)
            .collect(),
    )
}

/// A log row after `p`: op, key, before and after images.
type LaterRow = (String, Option<String>, Option<String>, Option<String>);

/// The answer to `query` as of log row `p`; see the module doc.
fn execute_as_of(
    conn: &Connection,
    query: &Query,
    p: i64,
    listed: &HashSet<(String, String)>,
) -> rusqlite::Result<Vec<Value>> {
    // One read transaction: the table and its log from the same snapshot.
    let tx = conn.unchecked_transaction()?;
    // The checkpoint of this log only: one of an earlier log (recreated, restored) says
    // nothing about what this log still holds.
    let checkpoint: i64 = tx
        .query_row(
            &format!(
                "SELECT c.seq FROM {CHECKPOINT_TABLE} c JOIN {META_TABLE} m \
                 ON m.key = 'log_id' AND m.value = c.log_id WHERE c.id = 1"
            ),
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    if checkpoint > p {
        tracing::warn!(
            collection = %query.collection, seq = p, checkpoint,
            "lookup: the change log is pruned past the change being routed; \
             reading the current state"
        );
        metrics::counter!("changecast_lookups_not_as_of_total",
            "collection" => query.collection.clone(), "reason" => "log_pruned")
        .increment(1);
        return execute(&tx, query, listed);
    }
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT op, CAST(key AS TEXT), before, after FROM {LOG_TABLE} \
         WHERE seq > ?1 AND tbl = ?2 ORDER BY seq"
    ))?;
    let later: Vec<LaterRow> = stmt
        .query_map(rusqlite::params![p, query.collection], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    drop(stmt);
    if later.is_empty() {
        // Nothing in this table changed since `p`: the current state is the state at `p`.
        return execute(&tx, query, listed);
    }

    let cols = columns(&tx, &query.collection)?;
    // The images in the log nest the same columns as the rows read from the table.
    let json: HashSet<String> = cols
        .iter()
        .filter(|c| is_json_decl(&c.decl))
        .map(|c| c.name.clone())
        .chain(
            listed
                .iter()
                .filter(|(t, _)| *t == query.collection)
                .map(|(_, c)| c.clone()),
        )
        .collect();
    let nest = |doc: Value| nest_json_columns(doc, Some(&json));
    // Each key changed after `p`, with its image at `p` (None: no row at `p`), in the
    // order first touched.
    let mut at_p: Vec<(String, Option<Value>)> = Vec::new();
    let mut touched: HashMap<String, usize> = HashMap::new();
    let mut touch = |key: String, image: Option<Value>| {
        touched.entry(key.clone()).or_insert_with(|| {
            at_p.push((key, image));
            at_p.len() - 1
        });
    };
    for (op, key, before, after) in later {
        let Some(key) = key else { continue };
        let image = before
            .as_deref()
            .and_then(|b| serde_json::from_str::<Value>(b).ok());
        match op.as_str() {
            "insert" => touch(key, None),
            "delete" => touch(key, image.map(nest)),
            _ => {
                // An update that changed the key: the row at `p` had the old key.
                let old = match (&before, &after) {
                    (Some(b), Some(a)) if key_changed(&cols, b, a) => old_key(&tx, &cols, b)?,
                    _ => None,
                };
                match old {
                    Some(old) if old != key => {
                        touch(old, image.map(nest));
                        touch(key, None);
                    }
                    _ => touch(key, image.map(nest)),
                }
            }
        }
    }
    let affinity: HashMap<String, Affinity> = declared_types(&tx, &query.collection)?
        .into_iter()
        .map(|(name, ty)| (name, Affinity::of(&ty)))
        .collect();

    let key_sql = format!(
        "CAST({} AS TEXT)",
        key_expr(&ident(&query.collection), &cols)
    );
    let sql = query_sql(query, Some(&key_sql), false);
    let mut out: Vec<Value> = rows(&tx, query, sql, true, listed)?
        .into_iter()
        .filter(|(key, _)| key.as_ref().is_none_or(|k| !touched.contains_key(k)))
        .map(|(_, doc)| doc)
        .collect();
    out.extend(
        at_p.into_iter()
            .filter_map(|(_, image)| image)
            .filter(|doc| matches(doc, &query.filter, &affinity)),
    );
    if let Some(limit) = query.limit {
        out.truncate(limit);
    }
    Ok(out)
}

/// Whether an update's images differ in a primary-key column (rowid tables: never seen).
fn key_changed(cols: &[super::Column], before: &str, after: &str) -> bool {
    let (Ok(b), Ok(a)) = (
        serde_json::from_str::<Value>(before),
        serde_json::from_str::<Value>(after),
    ) else {
        return false;
    };
    cols.iter()
        .filter(|c| c.pk > 0)
        .any(|c| b.get(&c.name) != a.get(&c.name))
}

/// The log key a row with the image `before` had: the triggers' key expression evaluated
/// on the image's values.
fn old_key(
    conn: &Connection,
    cols: &[super::Column],
    before: &str,
) -> rusqlite::Result<Option<String>> {
    let fields: Vec<String> = cols
        .iter()
        .map(|c| {
            format!(
                "json_extract(?1, '$.\"' || {} || '\"') AS {}",
                super::literal(&c.name.replace('"', "\\\"")),
                ident(&c.name)
            )
        })
        .collect();
    let sql = format!(
        "SELECT CAST({} AS TEXT) FROM (SELECT {}) AS r",
        key_expr("r", cols),
        fields.join(", ")
    );
    conn.query_row(&sql, [before], |r| r.get(0))
}

fn declared_types(conn: &Connection, table: &str) -> rusqlite::Result<Vec<(String, String)>> {
    conn.prepare(&format!("PRAGMA table_info({})", ident(table)))?
        .query_map([], |r| Ok((r.get(1)?, r.get(2)?)))?
        .collect()
}

/// A column's type affinity, from its declared type (SQLite's rules, "Datatypes" §3.1).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

impl Affinity {
    fn of(declared: &str) -> Affinity {
        let t = declared.to_ascii_uppercase();
        if t.contains("INT") {
            Affinity::Integer
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            Affinity::Text
        } else if t.contains("BLOB") || t.is_empty() {
            Affinity::Blob
        } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }
}

/// A value as SQL compares it.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl Scalar {
    /// A JSON value as SQLite holds it (a bound argument, or what `json_extract` returns;
    /// a nested column's object is its JSON text).
    fn of(v: &Value) -> Scalar {
        match v {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Int(*b as i64),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Scalar::Int(i),
                None => Scalar::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Scalar::Text(s.clone()),
            other => Scalar::Text(other.to_string()),
        }
    }

    /// Applies a column's affinity to a bound argument, as `column = ?` does.
    fn with_affinity(self, affinity: Affinity) -> Scalar {
        match (affinity, self) {
            (Affinity::Integer | Affinity::Real | Affinity::Numeric, Scalar::Text(t)) => {
                let s = t.trim();
                if let Ok(i) = s.parse::<i64>() {
                    Scalar::Int(i)
                } else if let Ok(f) = s.parse::<f64>()
                    && f.is_finite()
                    && s.bytes().any(|b| b.is_ascii_digit())
                {
                    Scalar::Real(f)
                } else {
                    Scalar::Text(t)
                }
            }
            (Affinity::Text, Scalar::Int(i)) => Scalar::Text(i.to_string()),
            (Affinity::Text, Scalar::Real(f)) if f.fract() == 0.0 && f.abs() < 1e15 => {
                Scalar::Text(format!("{f:.1}"))
            }
            (Affinity::Text, Scalar::Real(f)) => Scalar::Text(f.to_string()),
            (_, s) => s,
        }
    }

    /// SQL `=`: NULL equals nothing, numbers compare by value, text by bytes.
    fn sql_eq(&self, other: &Scalar) -> bool {
        match (self, other) {
            (Scalar::Int(a), Scalar::Int(b)) => a == b,
            (Scalar::Int(a), Scalar::Real(b)) | (Scalar::Real(b), Scalar::Int(a)) => {
                (*a as f64) == *b
            }
            (Scalar::Real(a), Scalar::Real(b)) => a == b,
            (Scalar::Text(a), Scalar::Text(b)) => a == b,
            _ => false,
        }
    }
}

/// Whether an image satisfies the filter as the query's SQL would: a column compares with
/// its affinity applied to the argument, a nested path (`json_extract`) without.
fn matches(
    doc: &Value,
    filter: &[(FieldPath, Value)],
    affinity: &HashMap<String, Affinity>,
) -> bool {
    filter.iter().all(|(path, want)| {
        let Some(have) = path.get(doc) else {
            return false;
        };
        let want = Scalar::of(want);
        let want = if path.rest().is_empty() {
            want.with_affinity(affinity.get(path.root()).copied().unwrap_or(Affinity::Blob))
        } else {
            want
        };
        Scalar::of(have).sql_eq(&want)
    })
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(*b as i64),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        other => SqlValue::Text(other.to_string()),
    }
}

fn from_sql(v: ValueRef<'_>, json: bool) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        ValueRef::Text(t) => {
            let s = String::from_utf8_lossy(t);
            json.then(|| parse_json_text(&s))
                .flatten()
                .unwrap_or_else(|| Value::String(s.into_owned()))
        }
        ValueRef::Blob(b) => Value::String(hex(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::FieldPath;
    use serde_json::json;

    fn db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE businesses(_id TEXT PRIMARY KEY, name TEXT, owner JSON, note TEXT);
             INSERT INTO businesses VALUES ('b1', 'Acme', '{\"_id\": \"u1\"}', '[\"typed\"]');
             INSERT INTO businesses VALUES ('b2', 'Beta', '{\"_id\": \"u2\"}', NULL);
             CREATE TABLE users(_id TEXT PRIMARY KEY, business_id TEXT, age INTEGER);
             INSERT INTO users VALUES ('u1', 'b1', 30), ('u3', 'b1', 40), ('u2', 'b2', 50);",
        )
        .unwrap();
        (dir, path)
    }

    #[tokio::test]
    async fn finds_by_column_and_by_nested_json_field() {
        let (_dir, path) = db();
        let lookup = SqliteLookup::new(&path);
        let by_id = lookup
            .find(Query {
                collection: "businesses".into(),
                filter: vec![(FieldPath::parse("_id").unwrap(), json!("b1"))],
                limit: Some(1),
                as_of: None,
            })
            .await
            .unwrap();
        assert_eq!(
            by_id,
            vec![
                json!({"_id": "b1", "name": "Acme", "owner": {"_id": "u1"}, "note": "[\"typed\"]"})
            ],
            "a JSON column nests; TEXT that looks like JSON stays a string"
        );

        let by_owner = lookup
            .find(Query {
                collection: "businesses".into(),
                filter: vec![(FieldPath::parse("owner._id").unwrap(), json!("u2"))],
                limit: None,
                as_of: None,
            })
            .await
            .unwrap();
        assert_eq!(by_owner.len(), 1);
        assert_eq!(by_owner[0]["_id"], "b2");

        let many = lookup
            .find(Query {
                collection: "users".into(),
                filter: vec![(FieldPath::parse("business_id").unwrap(), json!("b1"))],
                limit: None,
                as_of: None,
            })
            .await
            .unwrap();
        let ids: Vec<&Value> = many.iter().map(|d| &d["_id"]).collect();
        assert_eq!(ids, vec![&json!("u1"), &json!("u3")]);
    }

    /// A watched database (log and triggers installed) and a way to read the last seq.
    fn watched() -> (tempfile::TempDir, PathBuf, Connection) {
        let (dir, path) = db();
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE nums(k INTEGER PRIMARY KEY, n INTEGER, t TEXT);")
            .unwrap();
        super::super::install(&mut conn, &["businesses".into(), "nums".into()], &[], true).unwrap();
        (dir, path, conn)
    }

    fn last_seq(conn: &Connection) -> u64 {
        conn.query_row(
            "SELECT coalesce(max(seq), 0) FROM _changecast_log",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    }

    fn at(collection: &str, field: &str, v: Value, seq: u64) -> Query {
        Query {
            collection: collection.into(),
            filter: vec![(FieldPath::parse(field).unwrap(), v)],
            limit: None,
            as_of: Some(AsOf::Seq(seq)),
        }
    }

    fn ids(docs: &[Value], field: &str) -> Vec<Value> {
        let mut v: Vec<Value> = docs.iter().map(|d| d[field].clone()).collect();
        v.sort_by_key(|x| x.to_string());
        v
    }

    #[tokio::test]
    async fn as_of_reads_updated_deleted_and_inserted_rows_as_they_were() {
        let (_dir, path, conn) = watched();
        let lookup = SqliteLookup::new(&path);
        conn.execute_batch(
            "INSERT INTO businesses(_id, name, owner) VALUES ('b9', 'Nine', '{\"_id\": \"u1\"}');",
        )
        .unwrap();
        let p = last_seq(&conn);
        // After p: b1 moves to u2, b9 is deleted, b5 is inserted for u1, b2 moves to u1.
        conn.execute_batch(
            "UPDATE businesses SET owner = '{\"_id\": \"u2\"}' WHERE _id = 'b1';
             DELETE FROM businesses WHERE _id = 'b9';
             INSERT INTO businesses(_id, name, owner) VALUES ('b5', 'Five', '{\"_id\": \"u1\"}');
             UPDATE businesses SET owner = '{\"_id\": \"u1\"}' WHERE _id = 'b2';
             UPDATE businesses SET name = 'Acme 2' WHERE _id = 'b1';",
        )
        .unwrap();
        let owned_by_u1 = lookup
            .find(at("businesses", "owner._id", json!("u1"), p))
            .await
            .unwrap();
        assert_eq!(ids(&owned_by_u1, "_id"), vec![json!("b1"), json!("b9")]);
        let b1 = &owned_by_u1.iter().find(|d| d["_id"] == "b1").unwrap();
        assert_eq!(b1["name"], "Acme", "the image at p, not a later one");
        let now = lookup
            .find(Query {
                as_of: None,
                ..at("businesses", "owner._id", json!("u1"), p)
            })
            .await
            .unwrap();
        assert_eq!(ids(&now, "_id"), vec![json!("b2"), json!("b5")]);
        // As of the last row, the log has nothing later: the plain query.
        let last = last_seq(&conn);
        let at_last = lookup
            .find(at("businesses", "owner._id", json!("u1"), last))
            .await
            .unwrap();
        assert_eq!(ids(&at_last, "_id"), vec![json!("b2"), json!("b5")]);
        // Between: after b1 moved and b9 was deleted, before b5 and b2.
        let mid = lookup
            .find(at("businesses", "owner._id", json!("u1"), p + 2))
            .await
            .unwrap();
        assert!(mid.is_empty(), "{mid:?}");
    }

    #[tokio::test]
    async fn as_of_follows_a_changed_primary_key_and_honours_limit() {
        let (_dir, path, conn) = watched();
        let lookup = SqliteLookup::new(&path);
        conn.execute_batch("INSERT INTO businesses(_id, name, owner) VALUES ('b7', 'Seven', 'x');")
            .unwrap();
        let p = last_seq(&conn);
        conn.execute_batch("UPDATE businesses SET _id = 'b8' WHERE _id = 'b7';")
            .unwrap();
        let by_old = lookup
            .find(at("businesses", "_id", json!("b7"), p))
            .await
            .unwrap();
        assert_eq!(ids(&by_old, "_id"), vec![json!("b7")]);
        let by_new = lookup
            .find(at("businesses", "_id", json!("b8"), p))
            .await
            .unwrap();
        assert!(by_new.is_empty(), "b8 did not exist at p: {by_new:?}");
        let by_name = lookup
            .find(at("businesses", "name", json!("Seven"), p))
            .await
            .unwrap();
        assert_eq!(ids(&by_name, "_id"), vec![json!("b7")], "not b8 as well");

        conn.execute_batch("UPDATE businesses SET name = 'Same' WHERE _id IN ('b1', 'b2');")
            .unwrap();
        let q = Query {
            limit: Some(1),
            ..at("businesses", "name", json!("Same"), p)
        };
        assert!(lookup.find(q).await.unwrap().is_empty());
        let last = last_seq(&conn);
        let q = Query {
            limit: Some(1),
            ..at("businesses", "name", json!("Same"), last)
        };
        assert_eq!(lookup.find(q).await.unwrap().len(), 1);
        let q = Query {
            limit: Some(1),
            ..at("businesses", "name", json!("Acme"), p)
        };
        assert_eq!(
            lookup.find(q).await.unwrap().len(),
            1,
            "b1's image at p, cut to 1"
        );
    }

    #[tokio::test]
    async fn as_of_images_match_with_sqlite_affinity_like_the_query() {
        let (_dir, path, conn) = watched();
        let lookup = SqliteLookup::new(&path);
        conn.execute_batch("INSERT INTO nums VALUES (1, 42, '7');")
            .unwrap();
        let p = last_seq(&conn);
        conn.execute_batch("UPDATE nums SET n = 0, t = 'x' WHERE k = 1;")
            .unwrap();
        // Text against an INTEGER column, a number against a TEXT column: SQL converts
        // the argument, so the image at p must match too, as the current row would.
        for (field, v) in [
            ("n", json!("42")),
            ("n", json!(42)),
            ("t", json!(7)),
            ("k", json!("1")),
        ] {
            let found = lookup.find(at("nums", field, v.clone(), p)).await.unwrap();
            assert_eq!(found.len(), 1, "{field} = {v} as of p");
        }
        for (field, v) in [
            ("n", json!("forty-two")),
            ("t", json!(8)),
            ("n", json!(null)),
        ] {
            let found = lookup.find(at("nums", field, v.clone(), p)).await.unwrap();
            assert!(found.is_empty(), "{field} = {v} as of p: {found:?}");
        }
    }

    #[tokio::test]
    async fn a_log_pruned_past_the_change_reads_the_current_state() {
        let (_dir, path, conn) = watched();
        let lookup = SqliteLookup::new(&path);
        let p = last_seq(&conn);
        conn.execute_batch(
            "UPDATE businesses SET owner = '{\"_id\": \"u9\"}' WHERE _id = 'b1';
             INSERT INTO _changecast_checkpoint(id, seq) VALUES (1, 1000);
             DELETE FROM _changecast_log;",
        )
        .unwrap();
        let found = lookup
            .find(at("businesses", "_id", json!("b1"), p))
            .await
            .unwrap();
        assert_eq!(found[0]["owner"]["_id"], "u9", "the current state");
    }

    #[tokio::test]
    async fn unknown_table_is_an_error_not_a_panic() {
        let (_dir, path) = db();
        let err = SqliteLookup::new(&path)
            .find(Query {
                collection: "nope".into(),
                filter: vec![],
                limit: None,
                as_of: None,
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
