//! The README's first config — "a minimal config for your own SQLite app" — works as printed:
//! `check` accepts it, and served against a database with that table it delivers a row to
//! the user its column names. A newcomer copies exactly this block.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::{BINARY, Served};
use common::{SECRET, Ws};

/// The first ```toml block of the README's Configuration section.
fn minimal_config() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("\n## Configuration\n")
        .expect("README has a Configuration section")..];
    let start = section.find("```toml\n").expect("with a TOML block") + "```toml\n".len();
    let block = &section[start..];
    block[..block.find("```").unwrap()].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_minimal_sqlite_config_passes_check_and_delivers() {
    let config = minimal_config();
    assert!(
        config.contains("type = \"sqlite\"") && config.contains("path = \"app.db\""),
        "the first config is the SQLite one:\n{config}"
    );
    // The app's database: the table the config names, with the column it routes by.
    let dir = tempfile::tempdir().unwrap();
    let app = rusqlite::Connection::open(dir.path().join("app.db")).unwrap();
    app.execute_batch(
        "CREATE TABLE tasks (_id TEXT PRIMARY KEY, title TEXT NOT NULL, assignee_id TEXT);",
    )
    .unwrap();
    // As printed, but on a free port instead of 8080.
    let path = dir.path().join("changecast.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:0\"\n\n{config}"),
    )
    .unwrap();

    let check = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(&path)
        .env("CHANGECAST_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "check refused the README's config:\n{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let mut serve = Command::new(BINARY);
    serve.env("CHANGECAST_JWT_SECRET", SECRET);
    let log = Arc::new(Mutex::new(Vec::new()));
    let (_served, addr) = Served::start(serve, &path, Arc::clone(&log), Duration::from_secs(20));
    // The user id is the token's `sub`, as the config's comment says.
    let token = changecast::auth::mint(SECRET.as_bytes(), "u7", 3600, &Default::default());
    let mut ws = Ws::connect(&format!("ws://{addr}/v1/ws?token={token}")).await;
    let ready = ws.next().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert_eq!(ready["user"], "u7");

    app.execute_batch(
        "INSERT INTO tasks VALUES ('t1', 'someone else''s', 'u8');
         INSERT INTO tasks VALUES ('t2', 'write the report', 'u7');",
    )
    .unwrap();
    let event = ws.next().await;
    assert_eq!(event["type"], "change", "{event}");
    assert_eq!(event["route"], "tasks");
    assert_eq!(event["key"], "t2", "only the row assigned to u7: {event}");
    assert_eq!(event["doc"]["title"], "write the report");
}
