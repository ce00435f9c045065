//! `changecast explain` and `GET /v1/admin/explain`: the routing decision for one document,
//! and why a user is or is not among its recipients, from the real routing code; a delivered
//! event's stored audience; rule skips logged with their route, key and reason.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use common::binary::{BINARY, Served};
use common::{Db, Gateway, WAIT, Ws, insert_order};

const API_KEY: &str = "explain-test-api-key-0123456789";

fn explain(db: &Db, config: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let file = db.dir.path().join("changecast.toml");
    std::fs::write(&file, config).unwrap();
    let mut child = Command::new(BINARY)
        .args(["explain", "--config", file.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn explain_says_why_a_user_is_a_recipient_and_why_another_is_not() {
    let db = Db::new();
    db.exec(&insert_order("o1", "b1"));
    let config = db.config("", 100);

    let out = explain(
        &db,
        &config,
        &["--collection", "orders", "--key", "o1", "--user", "u1"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // The rule, its lookup with the query and the answer, the recipients.
    assert!(stdout.contains("route orders"), "{stdout}");
    assert!(
        stdout.contains("lookup `businesses` where _id = \"b1\""),
        "{stdout}"
    );
    assert!(stdout.contains("gives u1"), "{stdout}");
    assert!(stdout.contains("recipients: u1"), "{stdout}");
    assert!(
        stdout.contains("u1 is a recipient: route orders (owner._id from `businesses` where _id = $creator_id gives u1)"),
        "{stdout}"
    );

    let out = explain(
        &db,
        &config,
        &["--collection", "orders", "--key", "o1", "--user", "u2"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("u2 is not a recipient: route orders reaches u1 only"),
        "{stdout}"
    );
}

#[test]
fn explain_names_the_skip_that_left_a_user_out() {
    let db = Db::new();
    // b9 is no business: the lookup finds nothing, so the order reaches nobody.
    db.exec(&insert_order("o2", "b9"));
    let config = db.config("", 100);
    let out = explain(
        &db,
        &config,
        &["--collection", "orders", "--key", "o2", "--user", "u1"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("lookup `businesses` where _id = \"b9\""),
        "{stdout}"
    );
    assert!(stdout.contains("found no document"), "{stdout}");
    assert!(
        stdout.contains("u1 is not a recipient: route orders reaches nobody"),
        "{stdout}"
    );
}

#[test]
fn explain_evaluates_alert_conditions_and_reads_a_document_from_stdin() {
    let db = Db::new();
    let config = db.config("", 100);
    // Stock 2 at reorder point 5: the alert's condition is true, and with no pre-image
    // (a document given on stdin) it is taken to become true.
    let doc = r#"{"_id": "i1", "name": "Rice", "owned_by": "b1", "quantity_in_stock": 2, "reorder_point": 5}"#;
    let out = explain(
        &db,
        &config,
        &["--collection", "inventory_items", "--stdin", "--user", "u1"],
        Some(doc),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("when `doc.quantity_in_stock <= doc.reorder_point`: true"),
        "{stdout}"
    );
    assert!(
        stdout.contains("message: \"Stock low: Rice has 2 left."),
        "{stdout}"
    );
    assert!(
        stdout.contains("u1 is a recipient: route inventory"),
        "{stdout}"
    );
    assert!(stdout.contains("alert stock_low"), "{stdout}");

    // Plenty of stock: the alert does not fire, and says so. (`--key -` reads stdin too.)
    let doc = doc.replace("\"quantity_in_stock\": 2", "\"quantity_in_stock\": 50");
    let out = explain(
        &db,
        &config,
        &[
            "--collection",
            "inventory_items",
            "--key",
            "-",
            "--user",
            "u1",
        ],
        Some(&doc),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("when `doc.quantity_in_stock <= doc.reorder_point`: false"),
        "{stdout}"
    );
    assert!(
        stdout.contains("alert stock_low does not fire: its condition is false"),
        "{stdout}"
    );
}

#[test]
fn explain_of_an_unknown_key_or_collection_is_a_clear_error() {
    let db = Db::new();
    let config = db.config("", 100);
    let out = explain(
        &db,
        &config,
        &["--collection", "orders", "--key", "nope"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no document `nope` in `orders`"),
        "{}",
        text(&out.stderr)
    );
    let out = explain(
        &db,
        &config,
        &["--collection", "ordrs", "--key", "o1"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no rule reads `ordrs`"),
        "{}",
        text(&out.stderr)
    );
}

fn with_publish_key(config: &str) -> String {
    format!("{config}\n[publish]\napi_keys = [\"{API_KEY}\"]\n")
}

#[tokio::test]
async fn the_admin_endpoint_explains_behind_the_api_key_and_gives_a_stored_audience() {
    let db = Db::new();
    let config = with_publish_key(&db.config("", 100));
    let gw = Gateway::start(&config).await;
    let (mut ws, _) = Ws::user(&gw, "u1", None).await;
    db.exec(&insert_order("o3", "b1"));
    let event = ws.change().await;
    let id = event["id"].as_str().unwrap().to_owned();

    let http = reqwest::Client::new();
    let url = gw.http("/v1/admin/explain?collection=orders&key=o3&user=u2");
    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 401);
    let res = http
        .get(&url)
        .bearer_auth("wrong-key-wrong-key-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);

    let res = http.get(&url).bearer_auth(API_KEY).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["collection"], "orders", "{body}");
    assert_eq!(body["key"], "o3", "{body}");
    assert_eq!(body["recipients"], serde_json::json!(["u1"]), "{body}");
    assert_eq!(body["user"]["id"], "u2", "{body}");
    assert_eq!(body["user"]["recipient"], false, "{body}");
    assert_eq!(
        body["user"]["reasons"][0],
        "route orders reaches u1 only (owner._id from `businesses` where _id = $creator_id gives u1)",
        "{body}"
    );
    let rule = &body["rules"][0];
    assert_eq!(rule["name"], "orders", "{body}");
    let lookup = &rule["to"][0]["lookup"];
    assert_eq!(lookup["collection"], "businesses", "{body}");
    assert_eq!(lookup["filter"]["_id"], "b1", "{body}");
    assert_eq!(lookup["cached"], false, "{body}");
    assert_eq!(lookup["answer"][0]["_id"], "b1", "{body}");

    // A delivered event: its stored audience.
    let res = http
        .get(gw.http(&format!("/v1/admin/explain?id={id}")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["id"], id.as_str(), "{body}");
    assert_eq!(body["audience"], serde_json::json!(["u1"]), "{body}");
    assert_eq!(body["event"]["key"], "o3", "{body}");

    // An id the history does not hold, a bad query: clear refusals.
    let res = http
        .get(gw.http("/v1/admin/explain?id=nope-99"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 404);
    let res = http
        .get(gw.http("/v1/admin/explain?collection=orders"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 400);
    gw.stop().await;
}

#[test]
fn a_change_routed_to_nobody_is_logged_with_its_route_key_and_reason() {
    let db = Db::new();
    let file = db.dir.path().join("serve.toml");
    std::fs::write(&file, db.config("", 100)).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (_served, _addr) = Served::start(Command::new(BINARY), &file, Arc::clone(&log), WAIT);
    db.exec(&insert_order("o-nobody", "b9"));
    let deadline = std::time::Instant::now() + WAIT;
    let line = loop {
        let found = log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("o-nobody"))
            .cloned();
        if let Some(l) = found {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "never logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["rule"], "route", "{line}");
    assert_eq!(v["fields"]["name"], "orders", "{line}");
    assert_eq!(v["fields"]["key"], "o-nobody", "{line}");
    assert_eq!(v["fields"]["reason"], "no_recipients", "{line}");
}

#[test]
fn explain_finds_rows_by_the_key_events_carry_composite_and_rowid_too() {
    let db = Db::new();
    db.exec(
        "CREATE TABLE memberships (user_id TEXT, project_id INTEGER, PRIMARY KEY (user_id, project_id));
         INSERT INTO memberships VALUES ('alice', 3), ('bob', 3);
         CREATE TABLE notes (body TEXT, author TEXT);
         INSERT INTO notes VALUES ('hello', 'carol');",
    );
    let config = format!(
        "[source]\ntype = \"sqlite\"\npath = \"{}\"\n[auth]\njwt_secret = \"s\"\n\
         [[route]]\nname = \"memberships\"\ncollection = \"memberships\"\nto = \"$user_id\"\n\
         [[route]]\nname = \"notes\"\ncollection = \"notes\"\nto = \"$author\"\n",
        db.path.display()
    );
    // A composite key is the JSON array of its columns, as the change log writes it.
    let out = explain(
        &db,
        &config,
        &[
            "--collection",
            "memberships",
            "--key",
            "[\"alice\",3]",
            "--user",
            "alice",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("alice is a recipient: route memberships ($user_id gives alice)"),
        "{stdout}"
    );
    // No primary key: the rowid.
    let out = explain(
        &db,
        &config,
        &["--collection", "notes", "--key", "1", "--user", "dave"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("\"body\":\"hello\""), "{stdout}");
    assert!(
        stdout.contains(
            "dave is not a recipient: route notes reaches carol only ($author gives carol)"
        ),
        "{stdout}"
    );
}
