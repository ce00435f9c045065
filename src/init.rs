//! `changecast init`: a commented starter config, read from the database.
//!
//! In: an SQLite file (its tables, columns, keys, and one value per column to see inside
//! JSON columns) or a MongoDB database (its collections, and the field paths of a `$sample`
//! of each one's documents, through the `mongodb` driver). Out: a [`Schema`], and from it
//! the text of a config ([`render`]): the source, `[auth]` with the secret from the
//! environment, `[history]`, and one route per table or collection whose recipient is a
//! field whose name suggests a user or owner ([`guess_recipient`]) — or, when none does, a
//! commented-out route with a placeholder, so the file passes `check` as written. Every
//! choice has a comment saying why.
//!
//! Reading never writes: the SQLite file is opened read-only (changecast's own
//! `_changecast_*` tables and SQLite's internal ones are left out), and MongoDB is only
//! listed and sampled.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Documents sampled per MongoDB collection.
pub const MONGODB_SAMPLE: i64 = 100;
/// How deep nested documents are walked for field paths.
const MAX_DEPTH: usize = 4;
/// The environment variable the starter config reads the HS256 secret from.
pub const SECRET_ENV: &str = "CHANGECAST_JWT_SECRET";

/// Where the schema came from.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    Sqlite(PathBuf),
    Mongodb { uri: String, database: String },
}

/// A table or collection.
#[derive(Debug, Clone)]
pub struct Collection {
    pub name: String,
    pub key: Key,
    /// Field paths in schema (or first-seen) order, nested ones after their parent.
    pub fields: Vec<Field>,
    /// MongoDB: documents sampled.
    pub sampled: Option<usize>,
}

/// What a change's `key` is for this collection.
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    /// Primary-key columns, in key order (SQLite).
    Columns(Vec<String>),
    /// No primary key: SQLite's rowid.
    Rowid,
    /// MongoDB's `_id`.
    Id,
}

/// A field path with a sample value.
#[derive(Debug, Clone)]
pub struct Field {
    /// `owner_id`, `customer.user_id`.
    pub path: String,
    /// The first non-null value seen (`None`: only nulls, or no rows).
    pub sample: Option<Value>,
    /// MongoDB: how many sampled documents have it.
    pub seen: usize,
}

/// What was read from the database.
#[derive(Debug, Clone)]
pub struct Schema {
    pub source: SourceSpec,
    pub collections: Vec<Collection>,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("no database file at {0}")]
    NoFile(String),
    #[error("cannot read {path}: {message}")]
    Sqlite { path: String, message: String },
    #[error("mongodb: {0}")]
    Mongodb(String),
}

/// Names that say "this is a user", most telling first: a field whose last segment is one
/// of these (case-insensitive) is guessed to hold the user id a change is for.
const USER_NAMES: &[&str] = &[
    "user_id",
    "userid",
    "owner_id",
    "ownerid",
    "owner",
    "owned_by",
    "user",
    "assignee_id",
    "assignee",
    "assigned_to",
    "created_by",
    "creator_id",
    "creator",
    "author_id",
    "author",
    "recipient_id",
    "recipient",
    "member_id",
    "customer_id",
];

/// Tables whose rows are users: each user hears about changes to their own row.
const USER_TABLES: &[&str] = &["users", "user", "accounts", "members", "people", "profiles"];

/// A guessed recipient: the `to` value and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Guess {
    /// The field path (`to = "$<path>"`).
    pub path: String,
    pub why: String,
}

/// The recipient of `c`'s changes, guessed from its field names; `None` when nothing
/// suggests a user.
pub fn guess_recipient(c: &Collection) -> Option<Guess> {
    let has = |p: &str| c.fields.iter().any(|f| f.path == p);
    if USER_TABLES.contains(&c.name.to_lowercase().as_str()) {
        let own = match &c.key {
            Key::Columns(cols) if cols.len() == 1 => Some(cols[0].clone()),
            Key::Id => Some("_id".to_string()),
            _ => None,
        };
        if let Some(own) = own {
            return Some(Guess {
                why: format!(
                    "`{}` looks like the users {}, keyed by `{own}`: each user hears about \
                     changes to their own {}",
                    c.name,
                    noun(c, "table", "collection"),
                    noun(c, "row", "document")
                ),
                path: own,
            });
        }
    }
    for name in USER_NAMES {
        // Top-level fields first, then nested ones; in field order within each.
        let mut matches: Vec<&Field> = c
            .fields
            .iter()
            .filter(|f| {
                let last = f.path.rsplit('.').next().unwrap_or(&f.path);
                last.eq_ignore_ascii_case(name)
            })
            .collect();
        matches.sort_by_key(|f| f.path.matches('.').count());
        for f in matches {
            match &f.sample {
                // A document (a JSON column, an embedded owner): its id is the user.
                Some(Value::Object(_)) => {
                    for id in ["_id", "id", "user_id"] {
                        let inner = format!("{}.{id}", f.path);
                        if has(&inner) {
                            return Some(Guess {
                                why: format!(
                                    "`{}` names a user and holds a document: its `{id}` is \
                                     taken as the user id",
                                    f.path
                                ),
                                path: inner,
                            });
                        }
                    }
                }
                Some(Value::Array(items)) if items.iter().any(|i| i.is_object()) => {}
                Some(Value::Bool(_)) => {}
                _ => {
                    return Some(Guess {
                        why: format!(
                            "`{}` is named like a user{}: every change goes to the user it \
                             names",
                            f.path,
                            match &f.sample {
                                Some(Value::Array(_)) => " (a list: every id in it is a recipient)",
                                _ => "",
                            }
                        ),
                        path: f.path.clone(),
                    });
                }
            }
        }
    }
    None
}

fn noun<'a>(c: &Collection, sqlite: &'a str, mongo: &'a str) -> &'a str {
    if c.key == Key::Id { mongo } else { sqlite }
}

/// Reads the tables of the SQLite file at `path`, without writing to it.
pub fn read_sqlite(path: &Path) -> Result<Schema, InitError> {
    if !path.exists() {
        return Err(InitError::NoFile(path.display().to_string()));
    }
    let fail = |e: rusqlite::Error| InitError::Sqlite {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(fail)?;
    let names: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' \
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
             AND name NOT LIKE '\\_changecast\\_%' ESCAPE '\\' ORDER BY name",
        )
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(fail)?;
    let mut collections = Vec::new();
    for name in names {
        let cols = crate::source::sqlite::columns(&conn, &name).map_err(fail)?;
        let mut pk: Vec<&crate::source::sqlite::Column> =
            cols.iter().filter(|c| c.pk > 0).collect();
        pk.sort_by_key(|c| c.pk);
        let key = match pk.as_slice() {
            [] => Key::Rowid,
            many => Key::Columns(many.iter().map(|c| c.name.clone()).collect()),
        };
        let mut fields = Vec::new();
        for c in &cols {
            let sample: Option<Value> = conn
                .query_row(
                    &format!(
                        "SELECT {col} FROM {table} WHERE {col} IS NOT NULL LIMIT 1",
                        col = crate::source::sqlite::ident(&c.name),
                        table = crate::source::sqlite::ident(&name)
                    ),
                    [],
                    |r| {
                        Ok(match r.get_ref(0)? {
                            rusqlite::types::ValueRef::Integer(i) => Value::from(i),
                            rusqlite::types::ValueRef::Real(f) => Value::from(f),
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::String(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(_) => Value::String(String::new()),
                            rusqlite::types::ValueRef::Null => Value::Null,
                        })
                    },
                )
                .ok();
            // Columns declared JSON are read as nested documents, like the change feed.
            let sample = match sample {
                Some(Value::String(s)) if crate::source::sqlite::is_json_decl(&c.decl) => {
                    serde_json::from_str(&s).ok().or(Some(Value::String(s)))
                }
                other => other,
            };
            add_paths(&mut fields, &c.name, sample.as_ref(), 0);
            if sample.is_none() {
                fields.push(Field {
                    path: c.name.clone(),
                    sample: None,
                    seen: 0,
                });
            }
        }
        collections.push(Collection {
            name,
            key,
            fields,
            sampled: None,
        });
    }
    Ok(Schema {
        source: SourceSpec::Sqlite(path.to_path_buf()),
        collections,
    })
}

/// Adds `path` (and, for a document, its nested paths) to `fields`, counting one sighting.
fn add_paths(fields: &mut Vec<Field>, path: &str, value: Option<&Value>, depth: usize) {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return;
    };
    match fields.iter_mut().find(|f| f.path == path) {
        Some(f) => {
            f.seen += 1;
            if f.sample.is_none() {
                f.sample = Some(value.clone());
            }
        }
        None => fields.push(Field {
            path: path.to_owned(),
            sample: Some(value.clone()),
            seen: 1,
        }),
    }
    if let Value::Object(m) = value
        && depth < MAX_DEPTH
    {
        for (k, v) in m {
            add_paths(fields, &format!("{path}.{k}"), Some(v), depth + 1);
        }
    }
}

/// Lists the collections of `database` and samples each one's documents through the
/// driver. Views, `system.*` collections and changecast's checkpoint collection are left
/// out.
pub async fn read_mongodb(uri: &str, database: &str) -> Result<Schema, InitError> {
    use futures_util::TryStreamExt;
    use mongodb::bson::{Document, doc};
    let fail = |e: mongodb::error::Error| InitError::Mongodb(e.to_string());
    let client = mongodb::Client::with_uri_str(uri).await.map_err(fail)?;
    let db = client.database(database);
    // Collections only: views and time series have no change stream of their own.
    let mut names: Vec<String> = db
        .list_collection_names()
        .filter(doc! {"type": "collection"})
        .await
        .map_err(fail)?
        .into_iter()
        .filter(|n| !n.starts_with("system.") && n != "changecast_checkpoints")
        .collect();
    names.sort();
    let mut collections = Vec::new();
    for name in names {
        let docs: Vec<Document> = db
            .collection::<Document>(&name)
            .aggregate(vec![doc! {"$sample": {"size": MONGODB_SAMPLE}}])
            .await
            .map_err(fail)?
            .try_collect()
            .await
            .map_err(fail)?;
        let mut fields = Vec::new();
        for d in &docs {
            if let Value::Object(m) = crate::source::mongodb::decode::document_to_json(d) {
                for (k, v) in &m {
                    add_paths(&mut fields, k, Some(v), 0);
                }
            }
        }
        collections.push(Collection {
            name,
            key: Key::Id,
            fields,
            sampled: Some(docs.len()),
        });
    }
    Ok(Schema {
        source: SourceSpec::Mongodb {
            uri: uri.to_owned(),
            database: database.to_owned(),
        },
        collections,
    })
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The starter config for `schema`, listening on `listen`.
pub fn render(schema: &Schema, listen: &str) -> String {
    let mut s = String::new();
    let (from, table, column) = match &schema.source {
        SourceSpec::Sqlite(p) => (
            format!("the SQLite database {}", p.display()),
            "table",
            "column",
        ),
        SourceSpec::Mongodb { database, .. } => (
            format!("the MongoDB database `{database}`"),
            "collection",
            "field",
        ),
    };
    let _ = writeln!(
        s,
        "# A changecast starter config, written by `changecast init` from\n\
         # {from}.\n\
         # Every choice below is a guess from the schema, with its reason beside it: read it,\n\
         # adjust it, then run `changecast check --config <this file>` and\n\
         # `changecast serve --config <this file>`.\n"
    );
    let _ = writeln!(
        s,
        "[server]\n\
         # Where clients connect: WebSocket at /v1/ws, Server-Sent Events at /v1/sse.\n\
         listen = {}\n",
        quote(listen)
    );
    match &schema.source {
        SourceSpec::Sqlite(p) => {
            let _ = writeln!(
                s,
                "[source]\n\
                 # The file the application writes. On start changecast adds a change log table and\n\
                 # triggers to it, so every committed write is streamed, in commit order.\n\
                 type = \"sqlite\"\n\
                 path = {}\n",
                quote(&p.display().to_string())
            );
        }
        SourceSpec::Mongodb { uri, database } => {
            let _ = writeln!(
                s,
                "[source]\n\
                 # One change stream on the database (it needs a replica set or a sharded cluster).\n\
                 type = \"mongodb\"\n\
                 uri = {}\n\
                 database = {}\n\
                 # Pre-images let a delete reach the owner of the deleted document: `ensure` enables\n\
                 # them on the watched collections at start (MongoDB 6.0+); `assume` if they already\n\
                 # are; `off` to go without.\n\
                 pre_and_post_images = \"ensure\"\n",
                quote(uri),
                quote(database)
            );
        }
    }
    let users = schema
        .collections
        .iter()
        .find(|c| USER_TABLES.contains(&c.name.to_lowercase().as_str()));
    let user_example = match users {
        Some(u) if u.fields.iter().any(|f| f.path == "email") => {
            let id = match &u.key {
                Key::Columns(c) if c.len() == 1 => c[0].clone(),
                _ => "_id".to_string(),
            };
            format!(
                "# user = {{ claim = \"email\", lookup = {}, where = {{ email = \"$claim\" }}, pick = {} }}",
                quote(&u.name),
                quote(&id)
            )
        }
        _ => "# user = { claim = \"email\", lookup = \"users\", where = { email = \"$claim\" }, pick = \"id\" }"
            .to_string(),
    };
    let _ = writeln!(
        s,
        "[auth]\n\
         # Clients send an HS256 JWT signed with the secret held in this environment variable\n\
         # (`changecast token --sub USER --secret-env {SECRET_ENV}` mints one to try).\n\
         jwt_secret_env = \"{SECRET_ENV}\"\n\
         # The token's `sub` claim is the user id that the routes below compare with. If your\n\
         # tokens name users another way (an email), look the user up instead:\n\
         {user_example}\n"
    );
    let _ = writeln!(
        s,
        "[history]\n\
         # Each user's events are kept, so a client that reconnects with `?since=<last id>`\n\
         # misses nothing, across restarts too (the file is next to this config).\n\
         store = \"sqlite\"\n\
         path = \"changecast-history.db\"\n\
         max_per_user = 1000\n\
         max_age = \"24h\"\n"
    );
    let on = match &schema.source {
        SourceSpec::Sqlite(_) => "[\"insert\", \"update\", \"delete\"]",
        SourceSpec::Mongodb { .. } => "[\"insert\", \"update\", \"replace\", \"delete\"]",
    };
    if schema.collections.is_empty() {
        let _ = writeln!(
            s,
            "# No {table} found: add a [[route]] per {table} whose changes users should see."
        );
    }
    for c in &schema.collections {
        let key = match &c.key {
            Key::Columns(cols) if cols.len() == 1 => format!("`{}`", cols[0]),
            Key::Columns(cols) => {
                let cols: Vec<String> = cols.iter().map(|c| format!("`{c}`")).collect();
                format!("({}), as a JSON array", cols.join(", "))
            }
            Key::Rowid => "the rowid".to_string(),
            Key::Id => "`_id`".to_string(),
        };
        let fields: Vec<String> = c
            .fields
            .iter()
            .map(|f| match c.sampled {
                Some(n) if f.seen < n => format!("{} ({} of {n})", f.path, f.seen),
                _ => f.path.clone(),
            })
            .collect();
        let _ = writeln!(s, "# {} `{}` (key: {key}).", capitalise(table), c.name);
        if let Some(n) = c.sampled {
            let _ = writeln!(s, "# Fields in a sample of {n} document(s):");
        } else {
            let _ = writeln!(s, "# Columns:");
        }
        for line in wrap(&fields.join(", "), 86) {
            let _ = writeln!(s, "#   {line}");
        }
        match guess_recipient(c) {
            Some(g) => {
                for line in wrap(&format!("Recipient: {}.", g.why), 88) {
                    let _ = writeln!(s, "# {line}");
                }
                let _ = writeln!(
                    s,
                    "[[route]]\nname = {}\ncollection = {}\non = {on}\nto = {}\n\
                     # fields = [...]   # send only these fields (and the key); default: all\n",
                    quote(&c.name),
                    quote(&c.name),
                    quote(&format!("${}", g.path))
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "# No recipient: no {column} of `{}` names a user or owner. Say who hears about its\n\
                     # changes, then uncomment the route:\n\
                     #   a {column} holding a user id:   to = \"$<{column}>\"\n\
                     #   a user found elsewhere:       to = {{ lookup = \"<{table}>\", where = {{ _id = \"$<{column}>\" }}, pick = \"<user id field>\" }}\n\
                     # [[route]]\n\
                     # name = {}\n\
                     # collection = {}\n\
                     # on = {on}\n\
                     # to = \"$<{column}>\"\n",
                    c.name,
                    quote(&c.name),
                    quote(&c.name)
                );
            }
        }
    }
    s
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `text` in lines of at most about `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn coll(name: &str, key: Key, fields: &[(&str, Value)]) -> Collection {
        Collection {
            name: name.into(),
            key,
            fields: fields
                .iter()
                .map(|(p, v)| Field {
                    path: (*p).into(),
                    sample: (!v.is_null()).then(|| v.clone()),
                    seen: 1,
                })
                .collect(),
            sampled: None,
        }
    }

    #[test]
    fn the_most_telling_user_name_wins_and_documents_give_their_id() {
        let c = coll(
            "tasks",
            Key::Columns(vec!["id".into()]),
            &[
                ("id", json!(1)),
                ("created_by", json!("u1")),
                ("assignee_id", json!("u2")),
            ],
        );
        assert_eq!(guess_recipient(&c).unwrap().path, "assignee_id");
        let c = coll(
            "businesses",
            Key::Columns(vec!["_id".into()]),
            &[("owner", json!({"_id": "u1"})), ("owner._id", json!("u1"))],
        );
        assert_eq!(guess_recipient(&c).unwrap().path, "owner._id");
        // A document without an id says nothing; a flag named `owner` is no user.
        let c = coll(
            "x",
            Key::Rowid,
            &[("owner", json!({"name": "a"})), ("user", json!(true))],
        );
        assert_eq!(guess_recipient(&c), None);
        let c = coll(
            "users",
            Key::Columns(vec!["id".into()]),
            &[("id", json!(1))],
        );
        assert_eq!(guess_recipient(&c).unwrap().path, "id");
        let c = coll("tags", Key::Rowid, &[("label", json!("x"))]);
        assert_eq!(guess_recipient(&c), None);
    }

    #[test]
    fn odd_names_are_quoted_as_toml() {
        let schema = Schema {
            source: SourceSpec::Sqlite("/tmp/a \"b\".db".into()),
            collections: vec![coll(
                "we\"ird",
                Key::Columns(vec!["id".into()]),
                &[("user_id", json!("u"))],
            )],
        };
        let text = render(&schema, "127.0.0.1:8080");
        let parsed: toml::Table = text.parse().expect(&text);
        assert_eq!(parsed["route"][0]["collection"].as_str(), Some("we\"ird"));
        assert_eq!(parsed["source"]["path"].as_str(), Some("/tmp/a \"b\".db"));
    }
}
