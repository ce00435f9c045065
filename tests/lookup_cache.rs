//! A burst of changes for one business costs one lookup, read from `/metrics`.
//! Alone in its test binary: metrics are per process.

mod common;

use common::*;

fn misses(metrics: &str, collection: &str) -> u64 {
    counter(
        metrics,
        "changecast_lookups_total",
        &[("collection", collection), ("result", "miss")],
    ) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_changes_for_one_business_performs_one_lookup() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("send_queue = 2000", 2000)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let metrics = || async {
        reqwest::get(gw.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = misses(&metrics().await, "businesses");

    let mut sql = String::from("BEGIN;");
    for i in 0..1000 {
        sql.push_str(&insert_order(&format!("o{i}"), "b1"));
    }
    sql.push_str("COMMIT;");
    db.exec(&sql);
    for i in 0..1000 {
        assert_eq!(u1.change().await["key"], format!("o{i}"));
    }
    let after = misses(&metrics().await, "businesses");
    assert_eq!(after - before, 1, "1,000 order changes, one lookup of b1");

    // A change to the business invalidates the cached answer: the next order looks again.
    db.exec("UPDATE businesses SET name = 'Kano Grains Ltd' WHERE _id = 'b1';");
    db.exec(&insert_order("o1000", "b1"));
    assert_eq!(u1.change().await["key"], "o1000");
    assert_eq!(misses(&metrics().await, "businesses") - before, 2);
    gw.stop().await;
}
