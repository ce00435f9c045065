//! A background task that dies is never silent (issue 11, item 10): the real pruning task
//! panics on a zero interval (tokio's `interval` refuses a zero period) when handed a plan
//! that skipped validation, and `/readyz` must turn false with the reason, the failure be
//! counted, and delivery go on.

mod common;

use std::time::Duration;

use common::{Db, WAIT, Ws};
use tokio::net::TcpListener;

use changecast::config::Config;
use changecast::plan::Plan;

/// The value of the exactly named metric series in `/metrics` text (0 when absent).
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name_and_labels))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_pruning_task_makes_readyz_false_and_is_counted() {
    let db = Db::new();
    let mut plan = Plan::compile(&Config::parse(&db.config("", 100)).unwrap()).unwrap();
    // What `check` refuses (history.prune_interval: must be greater than zero), given to the
    // library directly: the real pruning task then panics in tokio::time::interval.
    plan.history.prune_interval = Duration::ZERO;
    let metric = "changecast_task_failures_total{task=\"pruning\"}";
    let http = reqwest::Client::new();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let before = {
        // The recorder is process-wide: read the series before this gateway exists.
        let text = changecast::server::metrics_handle().render();
        series(&text, metric)
    };
    let running = changecast::server::start(plan, listener, None)
        .await
        .unwrap();
    let base = format!("http://{}", running.local_addr);

    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let res = http.get(format!("{base}/readyz")).send().await.unwrap();
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await.unwrap();
        if status == 503 {
            break body;
        }
        assert_eq!(body["ready"], true, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz stayed ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(body["ready"], false, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("pruning task panicked: "),
        "the reason names the task and the panic: {body}"
    );
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(series(&text, metric) - before, 1.0, "{text}");

    // The pipeline is unaffected: changes are still delivered.
    let token = common::token_for("u1");
    let mut ws = Ws::connect(&format!("ws://{}/v1/ws?token={token}", running.local_addr)).await;
    assert_eq!(ws.next().await["type"], "ready");
    db.exec(&common::insert_order("o-after-prune-died", "b1"));
    assert_eq!(ws.change().await["key"], "o-after-prune-died");

    tokio::time::timeout(WAIT, running.stop())
        .await
        .expect("stops in time")
        .unwrap();
}
