//! `changecast init`: a starter config read from the database, that passes `check` and
//! delivers (the real binary for init, check and serve; a real WebSocket client; a real
//! SQLite file), and reads MongoDB through the driver (against the scripted wire peer).

mod common;
mod mongo_peer;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use mongodb::bson::{Document, doc};
use serde_json::Map;

use common::binary::{BINARY, Served};
use common::{WAIT, Ws};
use mongo_peer::{MongoPeer, Reply, filter_matches, first_batch};

const SECRET_VAR: &str = "CHANGECAST_JWT_SECRET";
const SECRET: &str = "init-test-secret";

fn changecast(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .env(SECRET_VAR, SECRET)
        .output()
        .expect("the binary runs")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// `check --config file` passes (exit 0), or the test fails with its output.
fn assert_checks(file: &Path) -> String {
    let out = changecast(&["check", "--config", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "check failed:\n{}\n--- config ---\n{}",
        text(&out.stderr),
        std::fs::read_to_string(file).unwrap()
    );
    text(&out.stdout)
}

/// Serves `config` with the real binary, connects as `user`, runs `write` on the database and
/// returns the first change the client receives.
async fn serve_and_receive(config: &Path, db: &Path, user: &str, write: &str) -> serde_json::Value {
    let mut command = Command::new(BINARY);
    command.env(SECRET_VAR, SECRET);
    let log = Arc::new(Mutex::new(Vec::new()));
    let (_served, addr) = Served::start(command, config, Arc::clone(&log), WAIT);
    let token = changecast::auth::mint(SECRET.as_bytes(), user, 600, &Map::new());
    let mut ws = Ws::connect(&format!("ws://{addr}/v1/ws?token={token}")).await;
    let ready = ws.next().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert_eq!(ready["user"], user, "{ready}");
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(WAIT).unwrap();
    conn.execute_batch(write).unwrap();
    ws.change().await
}

#[tokio::test]
async fn init_on_the_demo_database_passes_check_and_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mercury.db");
    changecast::demo::create_database(&db).unwrap();
    let file = dir.path().join("changecast.toml");
    let out = changecast(&[
        "init",
        "--sqlite",
        db.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config = std::fs::read_to_string(&file).unwrap();

    // The secret comes from the environment, never the file.
    assert!(
        config.contains("jwt_secret_env = \"CHANGECAST_JWT_SECRET\""),
        "{config}"
    );
    assert!(!config.contains("jwt_secret ="), "{config}");
    // One route per table, each with a guessed recipient and the reason for it.
    for (table, to) in [
        ("orders", "to = \"$creator_id\""),
        ("inventory_items", "to = \"$owned_by\""),
        // A JSON column holding a document with an `_id`: its id is the user.
        ("businesses", "to = \"$owner._id\""),
        // The users table: each user hears about their own row.
        ("users", "to = \"$_id\""),
    ] {
        let block = route_block(&config, table);
        assert!(block.contains(to), "{table}: expected `{to}` in\n{block}");
        assert!(block.contains("# "), "{table}: no comment in\n{block}");
    }
    // changecast's own tables (the change log the server adds) are not routed.
    assert!(!config.contains("_changecast"), "{config}");
    assert!(config.contains("[history]"), "{config}");

    let plan = assert_checks(&file);
    assert!(plan.contains("route orders"), "{plan}");

    let change = serve_and_receive(
        &file,
        &db,
        "b1",
        "INSERT INTO orders VALUES ('o-init', 'b1', 'i1', 2, 'new');",
    )
    .await;
    assert_eq!(change["route"], "orders", "{change}");
    assert_eq!(change["key"], "o-init", "{change}");
    assert_eq!(change["doc"]["creator_id"], "b1", "{change}");
}

/// The `[[route]]` block for `collection` (up to the next blank line).
fn route_block(config: &str, collection: &str) -> String {
    let at = config
        .find(&format!("collection = \"{collection}\""))
        .unwrap_or_else(|| panic!("no route for {collection} in\n{config}"));
    let start = config[..at].rfind("[[route]]").unwrap();
    let end = config[at..]
        .find("\n\n")
        .map(|e| at + e)
        .unwrap_or(config.len());
    // The comments just above the block belong to it.
    let comments = config[..start].rfind("\n\n").map(|s| s + 2).unwrap_or(0);
    config[comments..end].to_string()
}

#[tokio::test]
async fn init_on_another_schema_comments_out_what_it_cannot_guess_and_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tracker.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE projects (id INTEGER PRIMARY KEY, name TEXT NOT NULL, owner_id TEXT);
         CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT, assignee_id TEXT,
                             project_id INTEGER REFERENCES projects(id));
         CREATE TABLE tags (id INTEGER PRIMARY KEY, label TEXT);
         CREATE TABLE memberships (user_id TEXT, project_id INTEGER,
                                   PRIMARY KEY (user_id, project_id));
         CREATE TABLE notes (body TEXT, author TEXT);",
    )
    .unwrap();
    drop(conn);
    // On stdout by default.
    let out = changecast(&[
        "init",
        "--sqlite",
        db.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config = text(&out.stdout);
    assert!(
        route_block(&config, "tasks").contains("to = \"$assignee_id\""),
        "{config}"
    );
    assert!(
        route_block(&config, "projects").contains("to = \"$owner_id\""),
        "{config}"
    );
    assert!(
        route_block(&config, "memberships").contains("to = \"$user_id\""),
        "{config}"
    );
    assert!(
        route_block(&config, "notes").contains("to = \"$author\""),
        "{config}"
    );
    // Keys: the primary key, a composite one, the rowid.
    assert!(config.contains("key: `id`"), "{config}");
    assert!(
        config.contains("key: (`user_id`, `project_id`)"),
        "{config}"
    );
    assert!(config.contains("key: the rowid"), "{config}");
    // `tags` has no user column: its route is a commented placeholder, and the file still
    // passes check.
    assert!(
        !config.contains("\ncollection = \"tags\""),
        "the tags route must be commented out:\n{config}"
    );
    assert!(config.contains("# collection = \"tags\""), "{config}");
    assert!(
        config.contains("no column of `tags` names a user"),
        "{config}"
    );

    let file = dir.path().join("tracker.toml");
    std::fs::write(&file, &config).unwrap();
    let plan = assert_checks(&file);
    assert!(plan.contains("route tasks"), "{plan}");
    assert!(!plan.contains("route tags"), "{plan}");

    let change = serve_and_receive(
        &file,
        &db,
        "alice",
        "INSERT INTO tasks (id, title, assignee_id) VALUES (7, 'write the docs', 'alice');",
    )
    .await;
    assert_eq!(change["route"], "tasks", "{change}");
    assert_eq!(change["key"], "7", "{change}");
    assert_eq!(change["doc"]["title"], "write the docs", "{change}");
}

#[test]
fn init_refuses_to_overwrite_a_file_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mercury.db");
    changecast::demo::create_database(&db).unwrap();
    let file = dir.path().join("mine.toml");
    std::fs::write(&file, "# my own config\n").unwrap();
    let args = [
        "init",
        "--sqlite",
        db.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ];
    let out = changecast(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "# my own config\n");

    let forced = changecast(&[&args[..], &["--force"]].concat());
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert!(
        std::fs::read_to_string(&file)
            .unwrap()
            .contains("[[route]]")
    );
}

#[test]
fn init_on_a_missing_database_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.db");
    let out = changecast(&["init", "--sqlite", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no database file"),
        "{}",
        text(&out.stderr)
    );
    // Reading it did not create it.
    assert!(!missing.exists());
}

/// A MongoDB deployment of two collections: `listCollections` and `$sample` answered.
fn mongo_handler(name: &str, body: &Document) -> Reply {
    match name {
        "listCollections" => {
            // As a server does: the filter applies to the specifications.
            let filter = body.get_document("filter").cloned().unwrap_or_default();
            let all = vec![
                doc! {"name": "orders", "type": "collection"},
                doc! {"name": "audit", "type": "collection"},
                doc! {"name": "recent", "type": "view"},
                doc! {"name": "system.profile", "type": "collection"},
            ];
            let found = all
                .into_iter()
                .filter(|d| filter_matches(d, &filter))
                .collect();
            Reply::Ok(first_batch(0, "shop.$cmd.listCollections", found, None))
        }
        "aggregate" => {
            let coll = body.get_str("aggregate").unwrap_or_default();
            let docs = match coll {
                "orders" => vec![
                    doc! {"_id": 1, "customer": {"user_id": "u1"}, "total": 3},
                    doc! {"_id": 2, "customer": {"user_id": "u2"}, "total": 5, "note": "x"},
                ],
                "audit" => vec![doc! {"_id": "a1", "what": "login"}],
                _ => vec![],
            };
            Reply::Ok(first_batch(0, &format!("shop.{coll}"), docs, None))
        }
        other => Reply::error(59, "CommandNotFound", &format!("no such command: {other}")),
    }
}

#[tokio::test]
async fn init_on_mongodb_samples_each_collection_through_the_driver() {
    let peer = MongoPeer::start(mongo_handler).await;
    let uri = peer.uri();
    let out = tokio::task::spawn_blocking(move || {
        changecast(&["init", "--mongodb", &uri, "--database", "shop"])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config = text(&out.stdout);
    assert!(config.contains("type = \"mongodb\""), "{config}");
    assert!(config.contains("database = \"shop\""), "{config}");
    // A nested field path found in the sample names the user.
    assert!(
        route_block(&config, "orders").contains("to = \"$customer.user_id\""),
        "{config}"
    );
    assert!(config.contains("customer.user_id"), "{config}");
    // No user field: a commented placeholder. Views and system collections are left out.
    assert!(config.contains("# collection = \"audit\""), "{config}");
    assert!(!config.contains("recent"), "{config}");
    assert!(!config.contains("system.profile"), "{config}");
    // Every collection was sampled.
    let samples = peer.commands_named("aggregate");
    let sampled: Vec<&str> = samples
        .iter()
        .map(|c| c.get_str("aggregate").unwrap())
        .collect();
    assert_eq!(sampled, vec!["audit", "orders"], "{samples:?}");
    assert!(
        samples[0].get_array("pipeline").unwrap()[0]
            .as_document()
            .unwrap()
            .contains_key("$sample"),
        "{samples:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.toml");
    std::fs::write(&file, &config).unwrap();
    let plan = assert_checks(&file);
    assert!(plan.contains("route orders"), "{plan}");
}
