//! `/metrics` counts exactly what happened: each core metric, read by exact name and label
//! set, moves by exactly the number of things the test did.
//!
//! Alone in its test binary: metrics are process-wide and tests in one binary run in
//! parallel, so only here are before/after differences this test's own.

mod common;

use common::*;

const KEY: &str = "publish-key-0123456789";

/// Polls `/metrics` until the gauge `name` is `value` (a registration is released by the
/// connection task after the client sees its socket close).
async fn gauge_becomes(gw: &Gateway, name: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = metric(&scrape(gw.addr).await, name, &[]).unwrap_or(0.0);
        if now == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {now}, expected {value}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_metric_moves_by_exactly_what_the_test_did() {
    let db = Db::new();
    let config = format!(
        "{}\n[publish]\napi_keys = [\"{KEY}\"]\n",
        db.config("max_connections_per_user = 2", 100)
    );
    let gw = Gateway::start(&config).await;
    let m0 = scrape(gw.addr).await;
    let inserts = [("collection", "orders"), ("op", "insert")];
    let per_user = [("limit", "per_user")];
    let conns0 = metric(&m0, "changecast_connections", &[]).unwrap_or(0.0);

    // One connection, one routed insert, delivered once.
    let (mut u1, ready) = Ws::user(&gw, "u1", None).await;
    db.exec(&insert_order("o1", "b1"));
    assert_eq!(u1.change().await["key"], "o1");
    // A second connection of u1 resumes from before o1: one replayed event.
    let since = ready["position"].as_str().unwrap().to_owned();
    let (mut again, _) = Ws::user(&gw, "u1", Some(&since)).await;
    assert_eq!(again.change().await["key"], "o1");
    // A third is over the per-user limit (2): refused, never counted as connected.
    let mut third = Ws::connect(&gw.ws_url(&format!("token={}", token_for("u1")))).await;
    assert_eq!(third.close_code().await, 1013);
    // A published message to u1 reaches both connections.
    let res = reqwest::Client::new()
        .post(gw.http("/v1/publish"))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"to": ["u1"], "event": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(u1.next().await["type"], "message");
    assert_eq!(again.next().await["type"], "message");

    let m1 = scrape(gw.addr).await;
    let diff = |name: &str, labels: &[(&str, &str)]| {
        counter(&m1, name, labels) - counter(&m0, name, labels)
    };
    assert_eq!(diff("changecast_changes_total", &inserts), 1.0);
    assert_eq!(
        diff(
            "changecast_changes_total",
            &[("collection", "orders"), ("op", "update")]
        ),
        0.0
    );
    // o1 and the message.
    assert_eq!(diff("changecast_events_published_total", &[]), 2.0);
    // o1 to one connection, the message to two.
    assert_eq!(diff("changecast_deliveries_total", &[]), 3.0);
    assert_eq!(diff("changecast_replayed_events_total", &[]), 1.0);
    assert_eq!(diff("changecast_published_total", &[]), 1.0);
    assert_eq!(diff("changecast_connections_refused_total", &per_user), 1.0);
    assert_eq!(
        diff(
            "changecast_connections_refused_total",
            &[("limit", "total")]
        ),
        0.0
    );
    assert_eq!(
        metric(&m1, "changecast_connections", &[]),
        Some(conns0 + 2.0),
        "two registered, the refused one not"
    );

    // Closed by their clients: the gauge returns to where it was.
    drop((u1, again, third));
    gauge_becomes(&gw, "changecast_connections", conns0).await;
    gw.stop().await;
}

/// The reader itself: exact names and exact label sets, never a prefix or a subset.
#[test]
fn the_metric_reader_matches_exact_names_and_label_sets() {
    let text = "# TYPE changecast_connections gauge\n\
        changecast_connections_refused_total{limit=\"total\"} 7\n\
        changecast_connections 2\n\
        changecast_changes_total{op=\"insert\",collection=\"orders\"} 5\n\
        changecast_changes_total{collection=\"orders\",op=\"update\"} 1\n\
        changecast_x{a=\"q\\\"uote,d\"} 3\n";
    assert_eq!(metric(text, "changecast_connections", &[]), Some(2.0));
    assert_eq!(metric(text, "changecast_connections_refused", &[]), None);
    assert_eq!(
        metric(text, "changecast_connections_refused_total", &[]),
        None
    );
    assert_eq!(
        metric(
            text,
            "changecast_changes_total",
            &[("collection", "orders"), ("op", "insert")]
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            text,
            "changecast_changes_total",
            &[("collection", "orders")]
        ),
        None
    );
    assert_eq!(
        metric(text, "changecast_x", &[("a", "q\"uote,d")]),
        Some(3.0)
    );
    assert_eq!(counter(text, "changecast_absent_total", &[]), 0.0);
}
