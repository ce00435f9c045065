//! Readiness tells the truth about every component (issue 11, items 5 and 10).
//!
//! A background task that dies is never silent: the real pruning task panics on a zero
//! interval (tokio's `interval` refuses a zero period) when handed a plan that skipped
//! validation, and `/readyz` must turn false with the reason, the failure be counted, and
//! delivery go on. A pruning pass that keeps failing (the history database locked by
//! another connection) makes `/readyz` false until a pass succeeds; and one component's
//! recovery never hides another's failure (the history store recovers while the change log
//! still cannot be read).

mod common;

use std::time::Duration;

use common::{Db, Gateway, WAIT, Ws};
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

async fn readyz(gw: &Gateway) -> (u16, serde_json::Value) {
    let res = reqwest::get(gw.http("/readyz")).await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

/// Polls `/readyz` until `want` holds, for at most `within`; returns the body that held.
async fn wait_readyz(
    gw: &Gateway,
    what: &str,
    within: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = readyz(gw).await;
        if want(status, body["reason"].as_str().unwrap_or("")) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never {what}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The history database with its write lock taken by another connection, as a backup tool
/// or a stray `sqlite3` shell would (file modes do not stop root): every write changecast
/// makes to it fails once its 5 s busy timeout runs out.
fn lock_history(db: &Db) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db.dir.path().join("history.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE;").unwrap();
    conn
}

/// Long enough for a write to wait out the store's 5 s busy timeout and fail.
const LOCKED_WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pruning_pass_makes_readyz_false_until_a_pass_succeeds() {
    let db = Db::new();
    let config = db
        .config("", 100)
        .replace("[history]\n", "[history]\nprune_interval = \"100ms\"\n");
    let metric = "changecast_history_prune_failures_total";
    let before = series(&changecast::server::metrics_handle().render(), metric);
    let gw = Gateway::start(&config).await;
    wait_readyz(&gw, "ready at start", WAIT, |s, _| s == 200).await;

    let lock = lock_history(&db);
    let body = wait_readyz(&gw, "named pruning", LOCKED_WAIT, |s, reason| {
        s == 503 && reason.contains("pruning")
    })
    .await;
    assert_eq!(body["ready"], false, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("history pruning failed: "),
        "the reason says what failed: {body}"
    );
    let text = reqwest::get(gw.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(series(&text, metric) - before >= 1.0, "{text}");

    lock.execute_batch("ROLLBACK;").unwrap();
    wait_readyz(
        &gw,
        "ready again after a pass succeeds",
        LOCKED_WAIT,
        |s, _| s == 200,
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_recovering_does_not_hide_a_failing_change_log() {
    const KEY: &str = "publish-key-0123456789";
    let db = Db::new();
    let config = format!(
        "{}\n[publish]\napi_keys = [\"{KEY}\"]\n",
        db.config("", 100)
    );
    let gw = Gateway::start(&config).await;
    wait_readyz(&gw, "ready at start", WAIT, |s, _| s == 200).await;

    // The source fails first: a column the reader selects disappears.
    db.exec("ALTER TABLE _changecast_log DROP COLUMN at;");
    db.exec(&common::insert_order("o1", "b1"));
    wait_readyz(&gw, "reported the log", WAIT, |s, reason| {
        s == 503 && reason.contains("change log")
    })
    .await;

    // Then the history store: a publish cannot be stored while the lock is held.
    let lock = lock_history(&db);
    let publish = tokio::spawn(
        reqwest::Client::new()
            .post(gw.http("/v1/publish"))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"to": ["u1"], "event": {"n": 1}}))
            .send(),
    );
    let body = wait_readyz(&gw, "named both", LOCKED_WAIT, |s, reason| {
        s == 503 && reason.contains("history append") && reason.contains("change log")
    })
    .await;
    assert_eq!(body["ready"], false, "{body}");

    // The history recovers (the publish is stored); the log is still broken.
    lock.execute_batch("ROLLBACK;").unwrap();
    let res = tokio::time::timeout(LOCKED_WAIT, publish)
        .await
        .expect("the publish is stored once the lock is gone")
        .unwrap()
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let (status, body) = readyz(&gw).await;
    assert_eq!(status, 503, "the change log still fails: {body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("change log") && !reason.contains("history append"),
        "{body}"
    );

    db.exec("ALTER TABLE _changecast_log ADD COLUMN at TEXT;");
    wait_readyz(&gw, "ready again", WAIT, |s, _| s == 200).await;
    gw.stop().await;
}
