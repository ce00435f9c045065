//! Issue 11 item 8: the hub's per-user memory is released after retention.
//!
//! Every user id ever published to used to keep an entry in the hub forever. Here 20,000
//! distinct ids get a message through `POST /v1/publish`; once retention (`max_age`) has
//! pruned it, the hub holds only the users with a connection, and `/metrics` says so.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const KEY: &str = "hub-memory-test-api-key";
/// Distinct ids published to.
const USERS: usize = 20_000;
/// Ids per request: `to` takes at most 10,000 and the body at most 64 KiB.
const PER_REQUEST: usize = 4_000;
/// Retention runs every 100 ms and drops events older than 1 s: a few seconds at most.
const RETENTION_WAIT: Duration = Duration::from_secs(30);

async fn publish(client: &reqwest::Client, gw: &Gateway, to: &[String], n: usize) -> String {
    let res = client
        .post(gw.http("/v1/publish"))
        .bearer_auth(KEY)
        .json(&json!({"to": to, "event": {"n": n}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// The value of the gauge named exactly `name` (no labels) in a Prometheus text page.
fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_without_connections_cost_nothing_after_retention() {
    let db = Db::new();
    let config = db.config("", 100).replace(
        "[history]\n",
        "[history]\nmax_age = \"1s\"\nprune_interval = \"100ms\"\n",
    ) + &format!("\n[publish]\napi_keys = [\"{KEY}\"]\n");
    let gw = Gateway::start(&config).await;
    let hub = std::sync::Arc::clone(&gw.running.app.hub);
    let (mut ws, _) = Ws::user(&gw, "u1", None).await;

    let client = reqwest::Client::new();
    let ids: Vec<String> = (0..USERS).map(|i| format!("p{i}")).collect();
    let mut first_id = None;
    for (n, chunk) in ids.chunks(PER_REQUEST).enumerate() {
        let mut to = chunk.to_vec();
        to.push("u1".into());
        let id = publish(&client, &gw, &to, n).await;
        first_id.get_or_insert(id);
        assert_eq!(ws.next().await["event"]["n"], n, "u1 gets every message");
    }
    // Right after publishing, every recipient has an entry (the events are its history).
    let held = hub.user_count();
    assert!(
        held > USERS,
        "the hub holds the {USERS} recipients and u1 right after publishing: {held}"
    );

    // Retention prunes the events; the entries of users without a connection go with them.
    let deadline = tokio::time::Instant::now() + RETENTION_WAIT;
    while hub.user_count() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} users in the hub after {RETENTION_WAIT:?}",
            hub.user_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The gauge reports it (set by the same pruning pass that released them).
    let page = client
        .get(gw.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(gauge(&page, "changecast_hub_users"), Some(1.0), "{page}");

    // Nothing was lost on the way: a released user resuming from before the cut gets
    // `gap` rather than an empty replay, and u1 still gets new messages.
    let first_id = first_id.unwrap();
    let mut late =
        Ws::connect(&gw.ws_url(&format!("token={}&since={first_id}", token_for("u2")))).await;
    assert_eq!(late.next().await["type"], "ready");
    assert_eq!(late.next().await["type"], "gap", "pruned history is a gap");
    publish(&client, &gw, &["u1".to_string()], 99).await;
    assert_eq!(ws.next().await["event"]["n"], 99);
    gw.stop().await;
}
