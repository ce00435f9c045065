//! Queries against the SQLite database for the rules (owner lookups, user resolution).
//!
//! In: a [`Query`]. Out: matching rows as JSON documents (JSON columns nested, as the
//! change feed does: declared `JSON`/`JSONB` or listed in `[source] json_columns`; other
//! TEXT stays a string). Queries run on read-only connections from a small pool, on tokio's
//! blocking threads, so a slow query never blocks the runtime.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags};
use serde_json::{Map, Value};

use super::{hex, ident, is_json_decl, open, parse_json_text, split_json_column};
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
        SqliteLookup {
            inner: Arc::new(Pool {
                path: path.into(),
                json_columns: HashSet::new(),
                idle: Mutex::new(Vec::new()),
            }),
        }
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
        let result = execute(&conn, query, &self.json_columns).map_err(|e| e.to_string());
        if let Ok(mut pool) = self.idle.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(conn);
        }
        result
    }
}

impl Lookup for SqliteLookup {
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

/// Builds and runs the SQL for one query.
fn execute(
    conn: &Connection,
    query: &Query,
    listed: &HashSet<(String, String)>,
) -> rusqlite::Result<Vec<Value>> {
    let mut sql = format!("SELECT * FROM {}", ident(&query.collection));
    let mut args: Vec<SqlValue> = Vec::with_capacity(query.filter.len());
    for (i, (path, value)) in query.filter.iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        let column = ident(path.root());
        if path.rest().is_empty() {
            sql.push_str(&column);
        } else {
            // A nested field of a JSON column: `$."a"."b"`.
            let json_path: String = path
                .rest()
                .iter()
                .map(|s| format!(".\"{}\"", s.replace('"', "\\\"")))
                .collect();
            sql.push_str(&format!("json_extract({column}, ?{})", args.len() + 1));
            args.push(SqlValue::Text(format!("${json_path}")));
        }
        sql.push_str(&format!(" = ?{}", args.len() + 1));
        args.push(to_sql(value));
    }
    if let Some(limit) = query.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    let mut stmt = conn.prepare_cached(&sql)?;
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
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
        out.push(Value::Object(doc));
    }
    Ok(out)
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
            })
            .await
            .unwrap();
        let ids: Vec<&Value> = many.iter().map(|d| &d["_id"]).collect();
        assert_eq!(ids, vec![&json!("u1"), &json!("u3")]);
    }

    #[tokio::test]
    async fn unknown_table_is_an_error_not_a_panic() {
        let (_dir, path) = db();
        let err = SqliteLookup::new(&path)
            .find(Query {
                collection: "nope".into(),
                filter: vec![],
                limit: None,
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
