//! Account-wide fan-out on one core, without sockets: each change to an order reaches the
//! 500 users of its business through a cached `many = true` lookup, is given its id,
//! encoded once and offered to every recipient's connection queue; the queues are then
//! drained as connection tasks would. This is the router and hub part of workload (b) in
//! BENCHMARKS.md; the rest there is the sockets.
//!
//! `cargo bench --bench fanout` (throughput in deliveries per second).

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

use changecast::change::{Change, Op, Position};
use changecast::config::Config;
use changecast::hub::{Hub, HubConfig, Subscription};
use changecast::plan::Plan;
use changecast::route::Router;
use changecast::source::sqlite::SqliteLookup;

const USERS: usize = 2000;
const BUSINESSES: usize = 4;
const BATCH: usize = 100;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    changecast::demo::create_database(&db).unwrap();
    let mut conn = rusqlite::Connection::open(&db).unwrap();
    let tx = conn.transaction().unwrap();
    tx.execute("DELETE FROM users", []).unwrap();
    for u in 0..USERS {
        tx.execute(
            "INSERT INTO users VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![
                format!("u{u}"),
                format!("u{u}@example.com"),
                format!("User {u}"),
                format!("b{}", u % BUSINESSES)
            ],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let toml = format!(
        r#"
[source]
type = "sqlite"
path = "{}"
[auth]
jwt_secret = "s"
user = {{ claim = "sub" }}
[[route]]
name = "orders"
collection = "orders"
on = ["insert"]
to = {{ lookup = "users", where = {{ business_id = "$creator_id" }}, pick = "_id", many = true }}
"#,
        db.display()
    );
    let plan = Plan::compile(&Config::parse(&toml).unwrap()).unwrap();
    let router = Router::new(
        plan.routes,
        plan.alerts,
        Arc::new(SqliteLookup::new(&db)),
        100_000,
    );
    let hub = Arc::new(Hub::new(HubConfig {
        history_per_user: 64,
        queue_capacity: 256,
        queue_bytes: 256 * 1024,
        max_connections: 100_000,
        max_connections_per_user: 64,
    }));
    let mut subs: Vec<Subscription> = (0..USERS)
        .map(|u| hub.subscribe(&format!("u{u}"), None).unwrap())
        .collect();
    let changes: Vec<Change> = (0..BATCH)
        .map(|i| {
            let doc = json!({"_id": format!("o{i}"), "creator_id": format!("b{}", i % BUSINESSES),
                "item_id": "i1", "quantity": i, "status": "1764064800000000"});
            Change {
                op: Op::Insert,
                collection: "orders".into(),
                key: format!("o{i}"),
                updated_fields: None,
                before: None,
                after: Some(doc),
                position: Position::from_seq(i as u64),
                at: Some("2026-11-25T10:00:00.000Z".into()),
                as_of: None,
            }
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut run = || {
        let delivered = rt.block_on(async {
            for change in &changes {
                for d in router.route(change).await {
                    let recipients = d.recipients.clone();
                    if let Some(p) = hub.prepare(recipients, |id| d.encode(id, change)) {
                        hub.deliver(&p);
                    }
                }
            }
            let mut n = 0usize;
            for s in &mut subs {
                while s.try_recv().is_some() {
                    n += 1;
                }
            }
            n
        });
        assert_eq!(
            delivered,
            BATCH * USERS / BUSINESSES,
            "every delivery arrives"
        );
        delivered
    };
    run(); // warm the lookup cache
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements((BATCH * USERS / BUSINESSES) as u64));
    group.bench_function("account_wide_500_recipients", |b| b.iter(&mut run));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
