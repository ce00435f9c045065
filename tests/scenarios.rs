//! The shared scenario suite: the Mercury routes and the stock alert, written once and run on
//! every source (tests/common/backend.rs): SQLite with the demo's database and config, and a
//! real PostgreSQL server with `examples/postgres/schema.sql` and
//! `examples/postgres/changecast.toml`. Each scenario is one test per backend, `sqlite::NAME`
//! and `postgres::NAME`, so a failure names the backend.
//!
//! "No one else" is shown without sleeping: after the change, each other user's next event
//! is a change of its own written later (delivery per user is in order).

mod common;

use common::backend::Backend;
use common::*;
use serde_json::{Value, json};

/// The demo's orders route, whose recipient a scenario may replace.
const ORDERS_TO: &str =
    r#"to = { lookup = "businesses", where = { _id = "$creator_id" }, pick = "owner._id" }"#;

fn order(id: &str, business: &str) -> String {
    format!("INSERT INTO orders VALUES ('{id}', '{business}', 'i1', 1, 'pending');")
}

fn set_stock(b: &Backend, item: &str, qty: i64) {
    b.exec(&format!(
        "UPDATE inventory_items SET quantity_in_stock = {qty} WHERE _id = '{item}';"
    ));
}

/// Writes an order of `business` and asserts it is `ws`'s next event: nothing written
/// before it reached `ws`.
async fn next_is_own(b: &Backend, ws: &mut Ws, business: &str, key: &str) {
    b.exec(&order(key, business));
    let ev = ws.next().await;
    assert_eq!(ev["type"], "change", "{}: {ev}", b.name());
    assert_eq!(
        ev["key"],
        key,
        "{}: an event meant for others: {ev}",
        b.name()
    );
}

/// Reads `n` events, returning the alerts among them (the others must be changes).
async fn alerts_in(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut alerts = Vec::new();
    for _ in 0..n {
        let ev = ws.next().await;
        if ev["type"] == "alert" {
            alerts.push(ev);
        } else {
            assert_eq!(ev["type"], "change", "{ev}");
        }
    }
    alerts
}

async fn orders_reach_the_business_owner_and_no_one_else(b: Backend) {
    let gw = Gateway::start(&b.config()).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    let (mut u3, _) = Ws::user(&gw, "u3", None).await;

    b.exec(&order("o1", "b1"));
    let ev = u1.change().await;
    assert_eq!(ev["route"], "orders");
    assert_eq!(ev["op"], "insert");
    assert_eq!(ev["collection"], "orders");
    assert_eq!(ev["key"], "o1");
    assert_eq!(
        ev["doc"],
        json!({"_id": "o1", "creator_id": "b1", "item_id": "i1", "quantity": 1, "status": "pending"})
    );
    assert!(ev["at"].as_str().unwrap().ends_with('Z'), "{ev}");

    b.exec("UPDATE orders SET status = 'paid' WHERE _id = 'o1';");
    let ev = u1.change().await;
    assert_eq!(ev["op"], "update");
    assert_eq!(ev["key"], "o1");
    assert_eq!(ev["doc"]["status"], "paid");

    next_is_own(&b, &mut u2, "b2", "o2").await;
    next_is_own(&b, &mut u3, "b3", "o3").await;
    gw.stop().await;
}

async fn inventory_changes_reach_the_item_owner_and_no_one_else(b: Backend) {
    let gw = Gateway::start(&b.config()).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    // i4 is Tomatoes of b2 (owner u2), reorder point 8: 19 is no alert.
    set_stock(&b, "i4", 19);
    let ev = u2.change().await;
    assert_eq!(ev["route"], "inventory");
    assert_eq!(ev["op"], "update");
    assert_eq!(ev["collection"], "inventory_items");
    assert_eq!(ev["key"], "i4");
    assert_eq!(
        ev["doc"],
        json!({"_id": "i4", "name": "Tomatoes", "owned_by": "b2", "quantity_in_stock": 19, "reorder_point": 8})
    );
    next_is_own(&b, &mut u1, "b1", "mine").await;
    gw.stop().await;
}

async fn the_stock_alert_fires_once_per_crossing_not_on_every_update(b: Backend) {
    let gw = Gateway::start(&b.config()).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    // i1 is Rice of b1 (owner u1), reorder point 5; each update its own transaction.
    set_stock(&b, "i1", 10);
    set_stock(&b, "i1", 3);
    set_stock(&b, "i1", 2);
    // Three inventory changes, one alert (on the crossing to 3).
    let alerts = alerts_in(&mut u1, 4).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["alert"], "stock_low");
    assert_eq!(alerts[0]["collection"], "inventory_items");
    assert_eq!(alerts[0]["key"], "i1");
    assert_eq!(
        alerts[0]["message"],
        "Stock low: Rice has 3 left. Restock to keep issuing orders."
    );
    assert_eq!(alerts[0]["doc"]["quantity_in_stock"], 3);

    // Restocked, then falling again: a second alert.
    set_stock(&b, "i1", 20);
    set_stock(&b, "i1", 4);
    let alerts = alerts_in(&mut u1, 3).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["doc"]["quantity_in_stock"], 4);

    next_is_own(&b, &mut u2, "b2", "mine").await;
    gw.stop().await;
}

async fn a_delete_reaches_the_owner_of_its_pre_image(b: Backend) {
    let gw = Gateway::start(&b.config()).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    b.exec(&order("o19", "b2"));
    assert_eq!(u2.change().await["op"], "insert");
    b.exec("DELETE FROM orders WHERE _id = 'o19';");
    let ev = u2.change().await;
    assert_eq!(ev["op"], "delete");
    assert_eq!(ev["key"], "o19");
    assert_eq!(
        ev["doc"],
        json!({"_id": "o19", "creator_id": "b2", "item_id": "i1", "quantity": 1, "status": "pending"})
    );
    next_is_own(&b, &mut u1, "b1", "mine").await;
    gw.stop().await;
}

async fn an_item_moved_to_another_business_tells_both_owners(b: Backend) {
    let gw = Gateway::start(&b.config()).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    let (mut u3, _) = Ws::user(&gw, "u3", None).await;
    b.exec("UPDATE inventory_items SET owned_by = 'b2' WHERE _id = 'i1';");
    let old = u1.change().await;
    let new = u2.change().await;
    assert_eq!(old, new);
    assert_eq!(old["key"], "i1");
    assert_eq!(old["doc"]["owned_by"], "b2");
    next_is_own(&b, &mut u3, "b3", "mine").await;
    gw.stop().await;
}

async fn a_json_column_nests_in_events(b: Backend) {
    b.exec(&format!(
        "CREATE TABLE notes (_id TEXT PRIMARY KEY, owned_by TEXT NOT NULL, meta {} NOT NULL);",
        b.json_type()
    ));
    let config = format!(
        r#"{}
[[route]]
name = "notes"
collection = "notes"
to = {{ lookup = "businesses", where = {{ _id = "$owned_by" }}, pick = "owner._id" }}
"#,
        b.config()
    );
    let gw = Gateway::start(&config).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let meta =
        json!({"tags": ["dry", "bulk"], "size": {"w": 2, "h": 3}, "fragile": false, "note": null});
    b.exec(&format!("INSERT INTO notes VALUES ('n1', 'b1', '{meta}');"));
    let ev = u1.change().await;
    assert_eq!(ev["route"], "notes");
    assert_eq!(ev["key"], "n1");
    assert_eq!(ev["doc"]["meta"], meta, "a nested document, not a string");
    gw.stop().await;
}

async fn a_new_staff_member_is_reached_once_the_users_change_invalidates_the_lookup(b: Backend) {
    let config = b.config();
    assert!(config.contains(ORDERS_TO), "{config}");
    let config = config.replacen(
        ORDERS_TO,
        r#"to = { lookup = "users", where = { business_id = "$creator_id" }, pick = "_id", many = true }"#,
        1,
    );
    let gw = Gateway::start(&config).await;
    let (mut owner, _) = Ws::user(&gw, "u1", None).await;
    let (mut staff, _) = Ws::user(&gw, "u4", None).await;
    let (mut other, _) = Ws::user(&gw, "u2", None).await;
    b.exec(&order("o1", "b1"));
    assert_eq!(owner.change().await["key"], "o1");
    assert_eq!(staff.change().await["key"], "o1");
    next_is_own(&b, &mut other, "b2", "o2").await;

    // A new member of b1: the cached answer of the lookup is invalidated by the users
    // change, so the next order of b1 reaches them too.
    b.exec("INSERT INTO users VALUES ('u9', 'ola@kanograins.example', 'Ola', 'b1');");
    let (mut ola, ready) = Ws::by_email(gw.addr, "ola@kanograins.example").await;
    assert_eq!(ready["user"], "u9", "{ready}");
    b.exec(&order("o3", "b1"));
    assert_eq!(owner.change().await["key"], "o3");
    assert_eq!(staff.change().await["key"], "o3");
    assert_eq!(ola.change().await["key"], "o3", "the new member is reached");
    gw.stop().await;
}

async fn a_transaction_s_changes_arrive_in_commit_order(b: Backend) {
    let gw = Gateway::start(&b.config()).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    b.exec(&format!(
        "{}\n{}\nUPDATE orders SET status = 'paid' WHERE _id = 't1';\n{}",
        order("t1", "b1"),
        order("t2", "b1"),
        order("t3", "b1")
    ));
    let mut got = Vec::new();
    for _ in 0..4 {
        let ev = u1.change().await;
        got.push(format!(
            "{} {}",
            ev["op"].as_str().unwrap(),
            ev["key"].as_str().unwrap()
        ));
    }
    assert_eq!(got, ["insert t1", "insert t2", "update t1", "insert t3"]);
    gw.stop().await;
}

async fn a_restart_resumes_with_exactly_the_changes_written_while_down(b: Backend) {
    let config = b.config();
    let gw = Gateway::start(&config).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    b.exec(&order("o1", "b1"));
    let first = u1.change().await;
    drop(u1);
    gw.stop().await;

    // Written while no changecast runs: the source's checkpoint keeps them.
    for (key, business) in [("o2", "b1"), ("x2", "b2"), ("o3", "b1")] {
        b.exec(&order(key, business));
    }
    let gw = Gateway::start(&config).await;
    let (mut u1, ready) = Ws::user(&gw, "u1", Some(first["id"].as_str().unwrap())).await;
    assert_eq!(ready["resumed"], true, "{ready}");
    assert_eq!(u1.change().await["key"], "o2");
    assert_eq!(u1.change().await["key"], "o3");
    next_is_own(&b, &mut u1, "b1", "o4").await;
    gw.stop().await;
}

/// One `#[tokio::test]` per scenario in module `sqlite` and one in module `postgres`.
macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            use super::common::backend::Backend;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(Backend::sqlite()).await
                }
            )*
        }
        mod postgres {
            use super::common::backend::Backend;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(Backend::postgres()).await
                }
            )*
        }
    };
}

on_every_backend!(
    orders_reach_the_business_owner_and_no_one_else,
    inventory_changes_reach_the_item_owner_and_no_one_else,
    the_stock_alert_fires_once_per_crossing_not_on_every_update,
    a_delete_reaches_the_owner_of_its_pre_image,
    an_item_moved_to_another_business_tells_both_owners,
    a_json_column_nests_in_events,
    a_new_staff_member_is_reached_once_the_users_change_invalidates_the_lookup,
    a_transaction_s_changes_arrive_in_commit_order,
    a_restart_resumes_with_exactly_the_changes_written_while_down,
);

/// What only the PostgreSQL source promises, and the example's seed.
mod postgres_only {
    use super::*;

    /// `at` is the transaction's commit time: one transaction, one `at`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_changes_of_one_transaction_share_its_commit_time() {
        let b = Backend::postgres();
        let gw = Gateway::start(&b.config()).await;
        let (mut u1, _) = Ws::user(&gw, "u1", None).await;
        b.exec(&format!(
            "{}\nSELECT pg_sleep(0.05);\n{}",
            order("t1", "b1"),
            order("t2", "b1")
        ));
        let first = u1.change().await;
        let second = u1.change().await;
        assert_eq!(first["key"], "t1");
        assert_eq!(second["key"], "t2");
        assert_eq!(first["at"], second["at"], "{first} {second}");
        gw.stop().await;
    }

    /// `check --connect` accepts the example as printed (only the url, port, history and
    /// secret replaced) and, once a changecast made the slot, reports the WAL it retains.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn check_connect_accepts_the_example_and_reports_the_slot_s_retained_wal() {
        let b = Backend::postgres();
        let path = b.dir().join("changecast.toml");
        std::fs::write(&path, b.config()).unwrap();
        let check = || {
            let out = tokio::task::block_in_place(|| {
                std::process::Command::new(common::binary::BINARY)
                    .args(["check", "--connect", "--config"])
                    .arg(&path)
                    .output()
                    .unwrap()
            });
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "check --connect refused the example:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        };
        check();

        // Served once (the slot is made), stopped, then written to: the slot holds WAL.
        let gw = Gateway::start(&b.config()).await;
        let (mut u1, _) = Ws::user(&gw, "u1", None).await;
        b.exec(&order("o1", "b1"));
        assert_eq!(u1.change().await["key"], "o1");
        gw.stop().await;
        b.exec(&order("o2", "b1"));
        let stdout = check();
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok: source.slot: slot `changecast` retains")),
            "{stdout}"
        );
    }

    /// examples/postgres/schema.sql holds exactly the SQLite demo's seed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_example_schema_holds_the_sqlite_demo_s_seed() {
        let pg = Backend::postgres();
        let sqlite = Db::new();
        let conn = rusqlite::Connection::open(&sqlite.path).unwrap();
        for table in ["businesses", "users", "inventory_items", "orders"] {
            let json = pg.query_one(&format!(
                "SELECT coalesce(json_agg(t ORDER BY _id), '[]') FROM {table} t"
            ));
            let from_pg: Value = serde_json::from_str(&json).unwrap();
            let mut stmt = conn
                .prepare(&format!("SELECT * FROM {table} ORDER BY _id"))
                .unwrap();
            let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
            let rows: Vec<Value> = stmt
                .query_map([], |r| {
                    let mut doc = serde_json::Map::new();
                    for (i, name) in names.iter().enumerate() {
                        let v = match r.get::<_, rusqlite::types::Value>(i)? {
                            rusqlite::types::Value::Integer(n) => json!(n),
                            rusqlite::types::Value::Text(t) if name == "owner" => {
                                serde_json::from_str(&t).unwrap()
                            }
                            rusqlite::types::Value::Text(t) => json!(t),
                            other => panic!("unexpected {other:?}"),
                        };
                        doc.insert(name.clone(), v);
                    }
                    Ok(Value::Object(doc))
                })
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(from_pg, Value::Array(rows), "table {table}");
        }
    }
}

/// The README's PostgreSQL section prints the example's `[source]` block as it is.
#[test]
fn the_readme_shows_the_example_s_source_block() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("\n## PostgreSQL source\n")
        .expect("README has a PostgreSQL source section")..];
    let start = section.find("```toml\n").expect("with a TOML block") + "```toml\n".len();
    let block = &section[start..];
    let block = block[..block.find("```").unwrap()].trim();

    let example = std::fs::read_to_string(common::backend::example("changecast.toml")).unwrap();
    let source = &example[example.find("[source]\n").expect("a [source] table")..];
    let source = source[..source.find("\n[").unwrap()].trim();
    assert_eq!(block, source);
}
