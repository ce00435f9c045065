//! Recipients are resolved as of the change (issue 11, item 11), on a real SQLite file with
//! the real server and real WebSocket clients.
//!
//! The reproduction as found: 200 orders for business b100 (owner u100) in one
//! transaction, then at once b100's owner becomes u101. Every one of the 200 orders was
//! written while u100 owned b100, so u100 gets all 200 and u101 none, whenever the router
//! happens to read them.

mod common;

use common::*;
use serde_json::{Map, Value, json};

/// Adds users u100 and u101, and businesses b100 and b101, both owned by u100.
fn seed(db: &Db) {
    db.exec(
        "INSERT INTO users VALUES ('u100', 'u100@asof.example', 'U100', 'b100');
         INSERT INTO users VALUES ('u101', 'u101@asof.example', 'U101', 'b100');
         INSERT INTO businesses VALUES ('b100', 'B100', '{\"_id\": \"u100\"}');
         INSERT INTO businesses VALUES ('b101', 'B101', '{\"_id\": \"u100\"}');",
    );
}

async fn connect(gw: &Gateway, user: &str) -> Ws {
    let email = format!("{user}@asof.example");
    let mut claims = Map::new();
    claims.insert("user_id".into(), json!(email));
    let token = changecast::auth::mint(SECRET.as_bytes(), &email, 600, &claims);
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={token}"))).await;
    let ready = ws.next().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert_eq!(ready["user"], user);
    ws
}

/// The next event, which must be a `change` of `key` on route `orders`.
async fn expect_order(ws: &mut Ws, key: &str) {
    let ev: Value = ws.next().await;
    assert_eq!(ev["type"], "change", "expected order {key}, got {ev}");
    assert_eq!(ev["route"], "orders", "{ev}");
    assert_eq!(ev["key"], key, "{ev}");
}

/// After the burst: one order in b100 (now u101's) and one in b101 (still u100's). Each
/// client's next event is its own marker, so anything foreign before it fails the test.
async fn check_markers(db: &Db, u100: &mut Ws, u101: &mut Ws) {
    db.exec(&insert_order("after-move", "b100"));
    db.exec(&insert_order("marker-u100", "b101"));
    expect_order(u101, "after-move").await;
    expect_order(u100, "marker-u100").await;
}

async fn run(move_in_same_transaction: bool) {
    let db = Db::new();
    seed(&db);
    let gw = Gateway::start(&db.config("send_queue = 1000", 1000)).await;
    let mut u100 = connect(&gw, "u100").await;
    let mut u101 = connect(&gw, "u101").await;

    let mut sql = String::from("BEGIN;");
    for i in 0..200 {
        sql.push_str(&insert_order(&format!("o{i}"), "b100"));
    }
    let change_owner = "UPDATE businesses SET owner = '{\"_id\": \"u101\"}' WHERE _id = 'b100';";
    if move_in_same_transaction {
        sql.push_str(change_owner);
        sql.push_str("COMMIT;");
    } else {
        sql.push_str("COMMIT;");
        sql.push_str(change_owner);
    }
    db.exec(&sql);

    // u100 gets all 200, in order, with nothing (no gap, nothing foreign) in between.
    for i in 0..200 {
        expect_order(&mut u100, &format!("o{i}")).await;
    }
    // u101 gets none of them: its first event is the order written after the move.
    check_markers(&db, &mut u100, &mut u101).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_written_before_an_ownership_move_reach_the_owner_at_the_time() {
    run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ownership_move_later_in_the_same_transaction_does_not_reroute_earlier_orders() {
    run(true).await;
}
