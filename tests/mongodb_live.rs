//! Live tests against a real MongoDB replica set (6.0+). No server can be installed on the
//! development machines, so these are ignored by default and reported as such by the test
//! runner, never as passed. To run them:
//!
//! ```sh
//! CHANGECAST_TEST_MONGODB_URI='mongodb://127.0.0.1:27017/?replicaSet=rs0' \
//!     cargo test --test mongodb_live -- --ignored
//! ```

mod common;

use std::time::Duration;

use common::{SECRET, WAIT, Ws};
use mongodb::bson::doc;
use serde_json::Map;
use tokio::net::TcpListener;

use changecast::config::Config;
use changecast::plan::Plan;

fn uri() -> String {
    std::env::var("CHANGECAST_TEST_MONGODB_URI")
        .expect("CHANGECAST_TEST_MONGODB_URI must name a replica set for the live tests")
}

async fn setup() -> (mongodb::Database, String) {
    let client = mongodb::Client::with_uri_str(uri()).await.unwrap();
    let name = format!("changecast_live_{}", fastrand::u32(..));
    let db = client.database(&name);
    db.collection("businesses")
        .insert_one(doc! {"_id": "b1", "name": "Kano Grains", "owner": {"_id": "u1"}})
        .await
        .unwrap();
    db.collection("users")
        .insert_one(doc! {"_id": "u1", "email": "amina@example.com", "business_id": "b1"})
        .await
        .unwrap();
    for c in ["orders", "inventory_items"] {
        db.create_collection(c).await.unwrap();
    }
    db.collection("inventory_items")
        .insert_one(doc! {"_id": "i1", "name": "Rice", "owned_by": "b1", "quantity_in_stock": 10, "reorder_point": 5})
        .await
        .unwrap();
    db.collection("orders")
        .insert_one(doc! {"_id": "o19", "creator_id": "b1", "status": "paid"})
        .await
        .unwrap();
    (db, name)
}

fn config(database: &str) -> String {
    format!(
        r#"
[source]
type = "mongodb"
uri = "{uri}"
database = "{database}"
pre_and_post_images = "ensure"

[history]
store = "memory"

[auth]
jwt_secret = "{SECRET}"
user = {{ claim = "user_id", lookup = "users", where = {{ email = "$claim" }}, pick = "_id" }}

[[route]]
name = "orders"
collection = "orders"
on = ["insert", "update", "delete"]
to = {{ lookup = "businesses", where = {{ _id = "$creator_id" }}, pick = "owner._id" }}

[[route]]
name = "inventory"
collection = "inventory_items"
to = {{ lookup = "businesses", where = {{ _id = "$owned_by" }}, pick = "owner._id" }}

[[alert]]
name = "stock_low"
collection = "inventory_items"
when = "doc.quantity_in_stock <= doc.reorder_point"
to = {{ lookup = "businesses", where = {{ _id = "$owned_by" }}, pick = "owner._id" }}
message = "Stock low: {{{{ doc.name }}}} has {{{{ doc.quantity_in_stock }}}} left."
"#,
        uri = uri()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a MongoDB replica set: set CHANGECAST_TEST_MONGODB_URI and run with --ignored"]
async fn mercury_end_to_end_on_a_real_replica_set() {
    let (db, name) = setup().await;
    let plan = Plan::compile(&Config::parse(&config(&name)).unwrap()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = changecast::server::start(plan, listener, None)
        .await
        .unwrap();
    let mut claims = Map::new();
    claims.insert("user_id".into(), "amina@example.com".into());
    let token = changecast::auth::mint(SECRET.as_bytes(), "amina", 600, &claims);
    let mut ws = Ws::connect(&format!("ws://{}/v1/ws?token={token}", running.local_addr)).await;
    assert_eq!(ws.next().await["user"], "u1");

    // The seed's scenario: order deleted → the owner's socket hears about it.
    db.collection::<mongodb::bson::Document>("orders")
        .delete_one(doc! {"_id": "o19"})
        .await
        .unwrap();
    let ev = ws.next().await;
    assert_eq!(
        (ev["op"].as_str(), ev["key"].as_str()),
        (Some("delete"), Some("o19")),
        "{ev}"
    );
    assert_eq!(ev["doc"]["creator_id"], "b1", "routed by the pre-image");

    // Stock crossing its reorder point: one alert, not one per update.
    let items = db.collection::<mongodb::bson::Document>("inventory_items");
    for qty in [3, 2] {
        items
            .update_one(
                doc! {"_id": "i1"},
                doc! {"$set": {"quantity_in_stock": qty}},
            )
            .await
            .unwrap();
    }
    let mut alerts = 0;
    for _ in 0..3 {
        if ws.next().await["type"] == "alert" {
            alerts += 1;
        }
    }
    assert_eq!(alerts, 1);

    tokio::time::timeout(WAIT, running.stop())
        .await
        .unwrap()
        .unwrap();
    // The resume token was checkpointed.
    let checkpoint = db
        .collection::<mongodb::bson::Document>("changecast_checkpoints")
        .find_one(doc! {"_id": "changecast"})
        .await
        .unwrap();
    assert!(checkpoint.is_some_and(|d| d.contains_key("token")));
    db.drop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
}
