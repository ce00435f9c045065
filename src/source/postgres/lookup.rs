//! Queries against PostgreSQL for the rules (owner lookups, user resolution, `explain`).
//!
//! In: a [`Query`]. Out: matching rows as JSON documents, converted exactly as the change
//! feed converts them ([`super::decode::value`]): every column is read as `::text` and
//! converted by its type, so a row reads the same in an event and in a lookup.
//!
//! Filters: equality on a column, the value bound as text and cast to the column's type
//! (`"col" = $1::text::integer`), so indexes apply. A value that cannot be of the column's
//! type (a string in an integer column, `null`) matches nothing, as on SQLite. A path into
//! a `json`/`jsonb` column (`owner._id`) compares the JSON value at that path
//! (`"owner"::jsonb #> '{_id}' = $1::jsonb`), types included.
//!
//! As of a change: PostgreSQL cannot read the past on an ordinary connection (a snapshot
//! can only be exported while it is current), so `Query::as_of` is not used: lookups read
//! the current state. The PostgreSQL source's changes carry no `as_of`; recipients are
//! those of the moment the change is routed, which lags the commit by the stream's delay.
//!
//! Connections: two, shared by every lookup (tokio-postgres pipelines concurrent queries
//! on one connection), opened on first use and again after one breaks. Column types are
//! read from the catalog once per table and again after a query on the table fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use tokio_postgres::Client;

use super::decode::{self, oid};
use super::{ConnInfo, TableInfo, quote, read_table};
use crate::source::{Lookup, LookupError, Query};

/// Connections shared by lookups.
const CONNECTIONS: usize = 2;
/// Longest one lookup may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Lookups on a PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub struct PgLookup {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnInfo,
    /// Each slot holds a connection once opened; the lock is held only while connecting.
    clients: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
    /// Table → its columns, read once.
    tables: Mutex<HashMap<String, Arc<TableInfo>>>,
}

impl PgLookup {
    pub fn new(conn: ConnInfo) -> Self {
        PgLookup {
            inner: Arc::new(Inner {
                conn,
                clients: (0..CONNECTIONS)
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                next: AtomicUsize::new(0),
                tables: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// Why a lookup failed, and whether the database could be asked at all.
struct Fail {
    message: String,
    /// The connection was refused, lost or timed out, or the server is shutting down or
    /// starting: asking again later may work ([`LookupError::Unavailable`]).
    unavailable: bool,
}

impl From<String> for Fail {
    fn from(message: String) -> Self {
        Fail {
            message,
            unavailable: false,
        }
    }
}

impl Fail {
    fn unavailable(message: String) -> Self {
        Fail {
            message,
            unavailable: true,
        }
    }

    /// A query's error: unavailable unless the server answered with an error about the
    /// query itself.
    fn of(e: &tokio_postgres::Error) -> Self {
        let unavailable = match e.as_db_error() {
            // No answer from the server: the connection broke or closed.
            None => true,
            Some(db) => {
                let code = db.code().code();
                // 08: connection exception; 57P01–57P03: the server shutting down or
                // starting; 53: out of resources; 40001/40P01: retry the transaction.
                code.starts_with("08")
                    || code.starts_with("57P")
                    || code.starts_with("53")
                    || code == "40001"
                    || code == "40P01"
            }
        };
        Fail {
            message: super::describe_pg_error(e),
            unavailable,
        }
    }

    fn into_error(self, collection: &str) -> LookupError {
        let collection = collection.to_owned();
        let message = self.message;
        if self.unavailable {
            LookupError::Unavailable {
                collection,
                message,
            }
        } else {
            LookupError::Failed {
                collection,
                message,
            }
        }
    }
}

impl Inner {
    async fn client(&self) -> Result<Arc<Client>, Fail> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let mut slot = self.clients[i].lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(Arc::clone(c));
        }
        let client = Arc::new(self.conn.connect().await.map_err(Fail::unavailable)?);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    async fn table(&self, client: &Client, name: &str) -> Result<Arc<TableInfo>, Fail> {
        if let Some(t) = self
            .tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            return Ok(Arc::clone(t));
        }
        let info = read_table(client, name)
            .await
            .map_err(|e| Fail::of(&e))?
            .ok_or_else(|| format!("no table `{name}` in schema public"))?;
        let info = Arc::new(info);
        self.tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), Arc::clone(&info));
        Ok(info)
    }

    fn forget(&self, name: &str) {
        self.tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    async fn find(&self, query: &Query) -> Result<Vec<Value>, Fail> {
        let client = self.client().await?;
        let table = self.table(&client, &query.collection).await?;
        let Some((sql, args)) = query_sql(&table, query) else {
            return Ok(Vec::new());
        };
        let result = self.run(&client, &table, &sql, &args).await;
        if result.is_err() {
            // The table may have changed (a column added, a type altered).
            self.forget(&query.collection);
        }
        result
    }

    async fn run(
        &self,
        client: &Client,
        table: &TableInfo,
        sql: &str,
        args: &[String],
    ) -> Result<Vec<Value>, Fail> {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
            .iter()
            .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = tokio::time::timeout(QUERY_TIMEOUT, client.query(sql, &params))
            .await
            .map_err(|_| Fail::unavailable(format!("no answer within {QUERY_TIMEOUT:?}")))?
            .map_err(|e| Fail::of(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut doc = Map::with_capacity(table.columns.len());
            for (i, col) in table.columns.iter().enumerate() {
                let text: Option<String> = row.try_get(i).map_err(|e| e.to_string())?;
                let v = match text {
                    None => Value::Null,
                    Some(t) => decode::value(col.type_oid, &t),
                };
                doc.insert(col.name.clone(), v);
            }
            out.push(Value::Object(doc));
        }
        Ok(out)
    }

    async fn by_key(&self, table_name: &str, key: &str) -> Result<Option<Value>, Fail> {
        let client = self.client().await?;
        let table = self.table(&client, table_name).await?;
        let keys = table.key_columns();
        // One key column: the key is its text; several: the JSON array of their values.
        let values: Vec<String> = match keys.as_slice() {
            [] => return Err(format!("table `{table_name}` has no primary key").into()),
            [_] => vec![key.to_owned()],
            many => match serde_json::from_str::<Vec<Value>>(key) {
                Ok(v) if v.len() == many.len() => v.iter().map(decode::key_text).collect(),
                _ => return Ok(None),
            },
        };
        let mut sql = select_list(&table);
        for (i, col) in keys.iter().enumerate() {
            sql.push_str(if i == 0 { " WHERE " } else { " AND " });
            sql.push_str(&format!("{}::text = ${}", quote(col), i + 1));
        }
        sql.push_str(" LIMIT 1");
        Ok(self
            .run(&client, &table, &sql, &values)
            .await?
            .into_iter()
            .next())
    }
}

/// `SELECT "a"::text, "b"::text FROM public."t"`.
fn select_list(table: &TableInfo) -> String {
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("{}::text", quote(&c.name)))
        .collect();
    format!(
        "SELECT {} FROM public.{}",
        if cols.is_empty() {
            "NULL".to_string()
        } else {
            cols.join(", ")
        },
        quote(&table.name)
    )
}

/// The SQL and text arguments of a query; `None` when a filter value cannot match (no
/// query needed).
fn query_sql(table: &TableInfo, query: &Query) -> Option<(String, Vec<String>)> {
    let mut sql = select_list(table);
    let mut args = Vec::new();
    for (i, (path, value)) in query.filter.iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        let Some(col) = table.columns.iter().find(|c| c.name == path.root()) else {
            // No such column: no row has the field.
            return None;
        };
        let is_json = matches!(col.type_oid, oid::JSON | oid::JSONB);
        if !path.rest().is_empty() || (is_json && !value.is_null()) {
            if !is_json {
                return None;
            }
            // The JSON value at the path, compared as JSON (types included).
            let segments: Vec<String> = path.rest().iter().map(|s| array_item(s)).collect();
            args.push(value.to_string());
            sql.push_str(&format!(
                "{}::jsonb #> '{{{}}}' = ${}::jsonb",
                quote(&col.name),
                segments.join(",").replace('\'', "''"),
                args.len()
            ));
            continue;
        }
        let text = filter_text(col.type_oid, value)?;
        args.push(text);
        sql.push_str(&format!(
            "{} = ${}::text::{}",
            quote(&col.name),
            args.len(),
            col.type_name
        ));
    }
    if let Some(limit) = query.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    Some((sql, args))
}

/// A path segment as an element of a text-array literal (`{a,"b c"}`).
fn array_item(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A filter value as the text the column's type reads; `None` when no value of the column
/// can equal it.
fn filter_text(type_oid: u32, value: &Value) -> Option<String> {
    let text = match value {
        Value::Null | Value::Array(_) | Value::Object(_) => return None,
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
    };
    let fits = match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text.parse::<i64>().is_ok(),
        oid::FLOAT4 | oid::FLOAT8 | oid::NUMERIC => {
            !matches!(value, Value::Bool(_)) && text.trim().parse::<f64>().is_ok()
        }
        oid::BOOL => matches!(value, Value::Bool(_)),
        // Strings only: a number is not equal to a text column's value on SQLite either.
        _ => matches!(value, Value::String(_)) || !is_textual(type_oid),
    };
    fits.then_some(text)
}

/// Types whose values are strings in documents.
fn is_textual(type_oid: u32) -> bool {
    // text, varchar, bpchar, name, uuid.
    matches!(type_oid, 25 | 1043 | 1042 | 19 | 2950)
}

impl Lookup for PgLookup {
    fn find(&self, query: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>> {
        Box::pin(async move {
            self.inner
                .find(&query)
                .await
                .map_err(|fail| fail.into_error(&query.collection))
        })
    }

    fn document<'a>(
        &'a self,
        collection: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, LookupError>> {
        Box::pin(async move {
            self.inner
                .by_key(collection, key)
                .await
                .map_err(|fail| fail.into_error(collection))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::FieldPath;
    use crate::source::postgres::ColumnInfo;
    use serde_json::json;

    fn table() -> TableInfo {
        let col = |name: &str, type_oid: u32, type_name: &str, pk: i32| ColumnInfo {
            name: name.into(),
            type_oid,
            type_name: type_name.into(),
            pk,
        };
        TableInfo {
            name: "items".into(),
            columns: vec![
                col("id", oid::INT4, "integer", 1),
                col("name", 25, "text", 0),
                col("owner", oid::JSONB, "jsonb", 0),
            ],
            replica_identity: 'd',
        }
    }

    fn q(filter: Vec<(&str, Value)>, limit: Option<usize>) -> Query {
        Query {
            collection: "items".into(),
            filter: filter
                .into_iter()
                .map(|(p, v)| (FieldPath::parse(p).unwrap(), v))
                .collect(),
            limit,
            as_of: None,
        }
    }

    #[test]
    fn filters_cast_text_to_the_column_type_and_compare_json_paths_as_json() {
        let (sql, args) = query_sql(
            &table(),
            &q(
                vec![
                    ("id", json!(7)),
                    ("owner._id", json!("u1")),
                    ("name", json!("a")),
                ],
                Some(1),
            ),
        )
        .unwrap();
        assert_eq!(
            sql,
            "SELECT \"id\"::text, \"name\"::text, \"owner\"::text FROM public.\"items\" \
             WHERE \"id\" = $1::text::integer AND \"owner\"::jsonb #> '{\"_id\"}' = $2::jsonb \
             AND \"name\" = $3::text::text LIMIT 1"
        );
        assert_eq!(args, vec!["7", "\"u1\"", "a"]);
    }

    #[test]
    fn values_that_cannot_match_need_no_query() {
        assert!(query_sql(&table(), &q(vec![("id", json!("x"))], None)).is_none());
        assert!(query_sql(&table(), &q(vec![("id", Value::Null)], None)).is_none());
        assert!(query_sql(&table(), &q(vec![("name", json!(1))], None)).is_none());
        assert!(query_sql(&table(), &q(vec![("name.x", json!("a"))], None)).is_none());
        assert!(query_sql(&table(), &q(vec![("nope", json!("a"))], None)).is_none());
        // A string that reads as a number matches an integer key, as SQLite's affinity does.
        assert!(query_sql(&table(), &q(vec![("id", json!("7"))], None)).is_some());
    }
}
