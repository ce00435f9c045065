//! The rules engine end to end on the SQLite demo schema: account-wide fan-out,
//! edge-triggered alerts, failure isolation.

mod common;

use common::*;
use serde_json::Value;

fn set_stock(db: &Db, item: &str, qty: i64) {
    db.exec(&format!(
        "UPDATE inventory_items SET quantity_in_stock = {qty} WHERE _id = '{item}';"
    ));
}

/// Reads `n` events, returning the alerts among them.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_low_fires_once_per_crossing() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    // i1 is Rice of b1 (owner u1), reorder point 5.
    set_stock(&db, "i1", 10);
    set_stock(&db, "i1", 3);
    set_stock(&db, "i1", 2);
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
    set_stock(&db, "i1", 20);
    set_stock(&db, "i1", 4);
    let alerts = alerts_in(&mut u1, 3).await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["doc"]["quantity_in_stock"], 4);

    // Nothing of b1 reached u2: its first event is its own.
    db.exec(&insert_order("mine", "b2"));
    assert_eq!(u2.change().await["key"], "mine");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reaches_every_user_of_the_business_and_no_one_else() {
    let db = Db::new();
    let config = db.config("", 100).replace(
        r#"to = { lookup = "businesses", where = { _id = "$creator_id" }, pick = "owner._id" }"#,
        r#"to = { lookup = "users", where = { business_id = "$creator_id" }, pick = "_id", many = true }"#,
    );
    let gw = Gateway::start(&config).await;
    let (mut owner, _) = Ws::user(&gw, "u1", None).await;
    let (mut staff, _) = Ws::user(&gw, "u4", None).await;
    let (mut other, _) = Ws::user(&gw, "u2", None).await;
    db.exec(&insert_order("o1", "b1"));
    assert_eq!(owner.change().await["key"], "o1");
    assert_eq!(staff.change().await["key"], "o1");
    db.exec(&insert_order("o2", "b2"));
    assert_eq!(
        other.change().await["key"],
        "o2",
        "b1's order never reached u2"
    );

    // A new staff member joins b1: the cached answer is invalidated by the users change,
    // so the next order of b1 reaches the new member too (connected before it is written).
    db.exec("INSERT INTO users VALUES ('u9', 'ola@kanograins.example', 'Ola', 'b1');");
    let mut claims = serde_json::Map::new();
    claims.insert("user_id".into(), "ola@kanograins.example".into());
    let token = changecast::auth::mint(SECRET.as_bytes(), "ola", 3600, &claims);
    let mut ola = Ws::connect(&gw.ws_url(&format!("token={token}"))).await;
    let ready = ola.next().await;
    assert_eq!(ready["user"], "u9", "{ready}");
    db.exec(&insert_order("o3", "b1"));
    assert_eq!(owner.change().await["key"], "o3");
    assert_eq!(staff.change().await["key"], "o3");
    assert_eq!(
        ola.change().await["key"],
        "o3",
        "the new member receives the next order"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_missing_the_field_is_skipped_and_counted_without_reaching_clients() {
    let db = Db::new();
    db.exec(
        "CREATE TABLE stock (_id TEXT PRIMARY KEY, name TEXT, owned_by TEXT, quantity_in_stock INTEGER, reorder_point INTEGER);",
    );
    let config = format!(
        r#"{}
[[alert]]
name = "loose_stock_low"
collection = "stock"
when = "doc.quantity_in_stock <= doc.reorder_point"
to = {{ lookup = "businesses", where = {{ _id = "$owned_by" }}, pick = "owner._id" }}
message = "low"
"#,
        db.config("", 100)
    );
    let gw = Gateway::start(&config).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    db.exec(
        "INSERT INTO stock (_id, name, owned_by, reorder_point) VALUES ('s1', 'Salt', 'b1', 5);",
    );
    db.exec("INSERT INTO stock VALUES ('s2', 'Sugar', 'b1', 1, 5);");
    // The first is skipped; the second fires.
    let ev = u1.next().await;
    assert_eq!(ev["type"], "alert", "{ev}");
    assert_eq!(ev["key"], "s2");
    // The label set is this test's alone (no other test has the rule `loose_stock_low`).
    let skips = counter(
        &scrape(gw.addr).await,
        "changecast_rule_skips_total",
        &[
            ("rule", "alert"),
            ("name", "loose_stock_low"),
            ("reason", "when_failed"),
        ],
    );
    assert_eq!(skips, 1.0, "one skip counted");
    gw.stop().await;
}
