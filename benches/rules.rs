//! Rule evaluation throughput on one core: changes routed per second through the Mercury
//! rules (two lookup routes and the stock_low alert) with warm, cached lookups, each
//! delivery encoded to its event JSON.
//!
//! `cargo bench --bench rules`

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

use changecast::change::{Change, Op, Position};
use changecast::config::Config;
use changecast::plan::Plan;
use changecast::route::Router;
use changecast::source::sqlite::SqliteLookup;

const BUSINESSES: usize = 100;
const BATCH: usize = 1000;

fn changes() -> Vec<Change> {
    (0..BATCH)
        .map(|i| {
            let b = format!("b{}", i % BUSINESSES + 1);
            let (collection, before, after) = if i % 2 == 0 {
                let doc = json!({"_id": format!("o{i}"), "creator_id": b, "item_id": "i1", "quantity": 2, "status": "paid"});
                let mut before = doc.clone();
                before["status"] = json!("pending");
                ("orders", before, doc)
            } else {
                // Stock moving around the reorder point: every fourth change crosses it.
                let qty = if i % 4 == 1 { 3 } else { 9 };
                let doc = json!({"_id": format!("i{i}"), "name": "Rice", "owned_by": b, "quantity_in_stock": qty, "reorder_point": 5});
                let mut before = doc.clone();
                before["quantity_in_stock"] = json!(qty + 4);
                ("inventory_items", before, doc)
            };
            Change {
                op: Op::Update,
                collection: collection.into(),
                key: after["_id"].as_str().unwrap().into(),
                updated_fields: Some(changecast::change::changed_fields(&before, &after)),
                before: Some(before),
                after: Some(after),
                position: Position::from_seq(i as u64),
                at: Some("2026-11-25T10:00:00.000Z".into()),
                as_of: None,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    changecast::demo::create_database(&db).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    for b in 4..=BUSINESSES {
        conn.execute(
            "INSERT INTO businesses VALUES (?1, ?2, ?3)",
            rusqlite::params![
                format!("b{b}"),
                format!("Business {b}"),
                json!({"_id": format!("u{b}")}).to_string()
            ],
        )
        .unwrap();
    }
    let config = Config::parse(&changecast::demo::config_toml(&db, "127.0.0.1:0", "s")).unwrap();
    let plan = Plan::compile(&config).unwrap();
    let router = Router::new(
        plan.routes,
        plan.alerts,
        Arc::new(SqliteLookup::new(&db)),
        100_000,
    );
    let changes = changes();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let run = || {
        rt.block_on(async {
            let mut bytes = 0;
            for change in &changes {
                for d in router.route(change).await {
                    bytes += d.encode("e1-1", change).len();
                }
            }
            bytes
        })
    };
    run(); // warm the lookup cache
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("route_and_encode_cached", |b| b.iter(run));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
