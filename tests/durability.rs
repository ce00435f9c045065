//! Nothing lost: slow consumers, the publish API, token lifecycle, limits, readiness.

mod common;

use changecast::source::Component;
use common::*;
use serde_json::{Value, json};

const KEY: &str = "publish-key-0123456789";

fn with_publish(db: &Db, server: &str) -> String {
    format!(
        "{}\n[publish]\napi_keys = [\"{KEY}\"]\n",
        db.config(server, 1000)
    )
}

async fn post(gw: &Gateway, key: Option<&str>, body: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(gw.http("/v1/publish"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_delivers_resumable_message_events() {
    let db = Db::new();
    let gw = Gateway::start(&with_publish(&db, "")).await;
    let (mut u1, ready) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    let before = ready["position"].as_str().unwrap().to_owned();

    let (status, body) = post(
        &gw,
        Some(KEY),
        r#"{"to": ["u1", "u2", "u1"], "event": {"kind": "promo", "text": "20% off"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    for ws in [&mut u1, &mut u2] {
        let ev = ws.next().await;
        assert_eq!(
            ev,
            json!({"type": "message", "id": id, "event": {"kind": "promo", "text": "20% off"}})
        );
    }
    // Through the same history: a client that was away gets it on resume.
    let (mut again, _) = Ws::user(&gw, "u1", Some(&before)).await;
    assert_eq!(again.next().await["id"], id.as_str());
    // Interleaved with routed changes, ids keep increasing.
    db.exec(&insert_order("o1", "b1"));
    let change = u1.change().await;
    let (epoch, seq) = id_parts(&id);
    let (change_epoch, change_seq) = id_parts(change["id"].as_str().unwrap());
    assert_eq!(change_epoch, epoch);
    assert!(change_seq > seq, "{change} after {id}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_bad_requests_with_json_reasons() {
    let db = Db::new();
    let gw = Gateway::start(&with_publish(&db, "")).await;
    let good = r#"{"to": ["u1"], "event": {"a": 1}}"#;
    let cases: Vec<(Option<&str>, String, u16, &str)> = vec![
        (None, good.into(), 401, "missing API key"),
        (
            Some("wrong-key-0123456789"),
            good.into(),
            401,
            "unknown API key",
        ),
        (Some(KEY), "{not json".into(), 400, "invalid body"),
        (
            Some(KEY),
            r#"{"to": [], "event": {}}"#.into(),
            400,
            "at least one",
        ),
        (
            Some(KEY),
            r#"{"to": [""], "event": {}}"#.into(),
            400,
            "empty user id",
        ),
        (
            Some(KEY),
            r#"{"to": ["u1"], "event": 5}"#.into(),
            400,
            "JSON object",
        ),
        (
            Some(KEY),
            r#"{"to": ["u1"], "event": {}, "extra": 1}"#.into(),
            400,
            "unknown field",
        ),
        (
            Some(KEY),
            r#"{"to": "u1", "event": {}}"#.into(),
            400,
            "invalid body",
        ),
    ];
    for (key, body, status, reason) in cases {
        let (got, json) = post(&gw, key, &body).await;
        assert_eq!(got, status, "{body}: {json}");
        assert!(
            json["error"].as_str().unwrap_or_default().contains(reason),
            "{body}: {json}"
        );
    }
    let huge = format!(
        r#"{{"to": ["u1"], "event": {{"x": "{}"}}}}"#,
        "y".repeat(100_000)
    );
    assert_eq!(post(&gw, Some(KEY), &huge).await.0, 413);
    gw.stop().await;

    // Without keys the endpoint is off.
    let gw = Gateway::start(&db.config("", 10)).await;
    let (status, json) = post(&gw, Some(KEY), good).await;
    assert_eq!(status, 403);
    assert!(json["error"].as_str().unwrap().contains("not enabled"));
    gw.stop().await;
}

/// Reads `n` change events and returns their keys.
async fn keys(mut ws: Ws, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(ws.change().await["key"].as_str().unwrap().to_owned());
    }
    out
}

/// A WebSocket client of `user` that will not read, with a 4 KiB receive buffer so that
/// its stall reaches the server quickly; returned after its `ready`.
async fn stalled_reader(gw: &Gateway, user: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gw.addr).await.unwrap();
    let url = gw.ws_url(&format!("token={}", token_for(user)));
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (socket, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let mut ws = Ws { socket };
    assert_eq!(ws.next().await["type"], "ready");
    ws
}

/// Pause between transactions of [`write_large_orders`]: an application's steady stream
/// (500 orders/s of 20 KB), not bursts of megabytes; a reading client's queue (64 events)
/// then covers a pause of 100 ms or more in its reads on a busy machine.
const PACE: std::time::Duration = std::time::Duration::from_millis(20);

/// Inserts orders `o0..o{n-1}` of 20 KB each into the business `business(i)`, 10 per
/// transaction, `pace` apart.
async fn write_large_orders(
    db: &Db,
    n: usize,
    business: impl Fn(usize) -> &'static str,
    pace: std::time::Duration,
) {
    let payload = "p".repeat(20_000);
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let mut sql = String::from("BEGIN;");
        for &i in chunk {
            let b = business(i);
            sql.push_str(&format!(
                "INSERT INTO orders VALUES ('o{i}', '{b}', 'i1', 1, '{payload}');"
            ));
        }
        sql.push_str("COMMIT;");
        db.exec(&sql);
        tokio::time::sleep(pace).await;
    }
}

/// Waits up to 5 s for the hub to hold `n` connections.
async fn connections_reach(hub: &changecast::hub::Hub, n: usize) -> bool {
    for _ in 0..250 {
        if hub.connection_count() == n {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_cut_off_with_4008_others_keep_receiving_and_it_resumes_without_loss() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("send_queue = 64\nsend_queue_bytes = 1048576", 5000)).await;
    let mut stalled = stalled_reader(&gw, "u1").await;
    let (sibling, _) = Ws::user(&gw, "u1", None).await;
    let (other, _) = Ws::user(&gw, "u2", None).await;

    // Large events, written in paced transactions.
    let n = 1000;
    let mine: Vec<String> = (0..n)
        .filter(|i| i % 4 != 3)
        .map(|i| format!("o{i}"))
        .collect();
    let theirs: Vec<String> = (0..n)
        .filter(|i| i % 4 == 3)
        .map(|i| format!("o{i}"))
        .collect();
    let sibling = tokio::spawn(keys(sibling, mine.len()));
    let other = tokio::spawn(keys(other, theirs.len()));
    write_large_orders(&db, n, |i| if i % 4 == 3 { "b2" } else { "b1" }, PACE).await;
    // The others get everything, in order, while the stalled one is not reading.
    assert_eq!(sibling.await.unwrap(), mine);
    assert_eq!(other.await.unwrap(), theirs);

    // The stalled client reads what reached it, then the 4008 close.
    let mut got = Vec::new();
    let mut last = String::new();
    let code = loop {
        match stalled.next_or_end().await {
            Ok(ev) => {
                got.push(ev["key"].as_str().unwrap().to_owned());
                last = ev["id"].as_str().unwrap().to_owned();
            }
            Err(WsEnd::Closed(code, _)) => break code,
            Err(WsEnd::Dropped) => panic!("dropped without a close frame"),
        }
    };
    assert_eq!(code, 4008);
    assert!(got.len() < mine.len(), "it was cut off before the end");
    // Resume: exactly the rest, in order.
    let (mut resumed, ready) = Ws::user(&gw, "u1", Some(&last)).await;
    assert_eq!(ready["resumed"], true);
    while got.len() < mine.len() {
        got.push(resumed.change().await["key"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, mine, "every event once, in order");
    gw.stop().await;
}

/// A reader with full buffers that is kicked leaves the hub at once (its queue freed) while
/// its socket waits, for a bounded time, to hand over the 4008 close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kicked_reader_leaves_the_hub_at_once_and_still_gets_its_4008() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("send_queue = 64\nsend_queue_bytes = 1048576", 5000)).await;
    let mut stalled = stalled_reader(&gw, "u1").await;
    let (other, _) = Ws::user(&gw, "u2", None).await;
    let hub = std::sync::Arc::clone(&gw.running.app.hub);
    assert_eq!(hub.connection_count(), 2);

    // ~8 MB for u1: more than the kernel buffers between the two ends take, so the
    // server's write blocks and then its queue (1 MB) fills.
    let n = 400;
    let theirs: Vec<String> = (0..n)
        .filter(|i| i % 8 == 7)
        .map(|i| format!("o{i}"))
        .collect();
    let other = tokio::spawn(keys(other, theirs.len()));
    write_large_orders(&db, n, |i| if i % 8 == 7 { "b2" } else { "b1" }, PACE).await;
    assert_eq!(
        other.await.unwrap(),
        theirs,
        "the other user gets everything"
    );

    // The stalled reader has read nothing since `ready`, and is out of the hub already
    // (the other user's connection closed when its reader finished).
    assert!(
        connections_reach(&hub, 0).await,
        "the kicked connection left the hub before its peer read again"
    );

    // When it reads again, it gets what was already on its way, then the 4008 close.
    let mut got = 0;
    let code = loop {
        match stalled.next_or_end().await {
            Ok(_) => got += 1,
            Err(WsEnd::Closed(code, _)) => break code,
            Err(WsEnd::Dropped) => panic!("dropped without a close frame after {got} events"),
        }
    };
    assert_eq!(code, 4008);
    assert!(got < n - theirs.len(), "it was cut off: {got} events");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_is_warned_and_refreshed_without_a_reconnect() {
    let db = Db::new();
    let config = db
        .config("", 10)
        .replace("[auth]\n", "[auth]\nexpiry_warning = \"60s\"\n");
    let gw = Gateway::start(&config).await;
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={}", token_with_ttl("u1", 3)))).await;
    assert_eq!(ws.next().await["type"], "ready");
    // Within the warning window from the start: warned at once.
    let warning = ws.next().await;
    assert_eq!(warning["type"], "expiring", "{warning}");
    assert!(warning["expires_in"].as_u64().unwrap() <= 3);
    ws.send(json!({"type": "refresh", "token": token_with_ttl("u1", 3600)}))
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    db.exec(&insert_order("o1", "b1"));
    assert_eq!(
        ws.change().await["key"],
        "o1",
        "still open after the old expiry"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_with_1013_and_429() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("max_connections_per_user = 2", 10)).await;
    let (_a, _) = Ws::user(&gw, "u1", None).await;
    let (_b, _) = Ws::user(&gw, "u1", None).await;
    let mut third = Ws::connect(&gw.ws_url(&format!("token={}", token_for("u1")))).await;
    assert_eq!(third.close_code().await, 1013);
    let (status, _, body) = Sse::open(&gw, Some(&token_for("u1")), "", None).await;
    assert_eq!(status, 429, "{body}");
    let (_c, _) = Ws::user(&gw, "u2", None).await;
    gw.stop().await;
}

/// What `/metrics` counts is checked in `tests/metrics.rs`, alone in its binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_explains_itself() {
    let db = Db::new();
    let gw = Gateway::start(&with_publish(&db, "")).await;
    let ready = reqwest::get(gw.http("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let running = gw.running;
    running
        .app
        .health
        .down(Component::Source, "mongodb: no answer from the server");
    let addr = running.local_addr;
    let res = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body,
        json!({"ready": false, "reason": "mongodb: no answer from the server"})
    );
    running.stop().await.unwrap();
}

/// An SSE reader that stops reading, with full buffers, is cut off when its queue
/// overflows and leaves the hub, though the server's writes to it are blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_reader_that_stops_reading_leaves_the_hub() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 5000)).await;
    let raw = stalled_sse_reader(&gw, "u1").await;
    let hub = std::sync::Arc::clone(&gw.running.app.hub);
    assert_eq!(hub.connection_count(), 1);

    // ~4 MB of events that the reader never takes.
    write_large_orders(&db, 200, |_| "b1", std::time::Duration::ZERO).await;
    assert!(
        connections_reach(&hub, 0).await,
        "the stalled SSE stream left the hub"
    );
    drop(raw);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peers_are_dropped_and_sse_streams_get_keepalive_comments() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = Db::new();
    let gw = Gateway::start(&db.config("keepalive = \"150ms\"", 10)).await;
    // A peer that completes the handshake, then never reads or answers a ping again.
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /v1/ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token_for("u1")
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = raw.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    let hub = std::sync::Arc::clone(&gw.running.app.hub);
    // The session joins the hub after the upgrade: first it is there, then it is dropped.
    assert!(
        connections_reach(&hub, 1).await,
        "the silent peer's session joined the hub"
    );
    assert!(
        connections_reach(&hub, 0).await,
        "a silent peer is dropped after two missed keepalives"
    );

    let res = reqwest::Client::new()
        .get(gw.http("/v1/sse"))
        .bearer_auth(token_for("u1"))
        .send()
        .await
        .unwrap();
    let mut body = res.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(": keepalive") {
        use futures_util::StreamExt;
        let chunk = tokio::time::timeout(WAIT, body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    gw.stop().await;
}
