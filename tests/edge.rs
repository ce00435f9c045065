//! Issue 11 items 3 and 7: the network edge holds against idle, slow and stalled peers.
//!
//! Raw TCP clients against the real server on loopback: a slowloris request head is cut
//! by the header-read timeout, a silent connection by the idle timeout, the pending cap
//! evicts the oldest idle connection (so a probe gets through) or refuses when none is
//! idle, and an SSE reader that stops reading leaves the hub at once, frees its slots
//! and has its socket closed. The 20,000-socket flood against the binary is in
//! `edge_flood.rs`.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Generous upper bound for the server to close a connection it should close.
const CLOSE_WITHIN: Duration = Duration::from_secs(15);

/// Reads until the server closes the connection (EOF or reset); returns what was read and
/// when it closed. Panics if it is still open after `within`.
async fn read_until_closed(tcp: &mut TcpStream, within: Duration) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => panic!(
                "still open after {within:?}; read: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Instant::now()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// `GET path` on an open connection; returns the status line.
async fn get(tcp: &mut TcpStream, path: &str) -> String {
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_request_head_is_closed_by_the_header_read_timeout() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("header_read_timeout = \"1s\"\nidle_timeout = \"60s\"", 10))
        .await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let start = Instant::now();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    // A header line every 200 ms, forever: never a complete head.
    let trickle = tokio::spawn(async move {
        for i in 0.. {
            if wr
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(CLOSE_WITHIN, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408, if any; then the close
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the trickling connection is still open after {CLOSE_WITHIN:?}"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed by the timeout, not at once: {took:?}"
    );
    trickle.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("idle_timeout = \"1s\"\nheader_read_timeout = \"60s\"", 10))
        .await;
    let start = Instant::now();
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (got, at) = read_until_closed(&mut tcp, CLOSE_WITHIN).await;
    assert!(got.is_empty(), "nothing is sent to a silent connection");
    let took = at - start;
    assert!(
        took >= Duration::from_millis(900),
        "closed at once: {took:?}"
    );
    // A connection that does send a request in time is served.
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get(&mut tcp, "/healthz").await, "HTTP/1.1 200 OK");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_pending_cap_the_oldest_idle_connection_makes_room_for_a_probe() {
    let db = Db::new();
    let gw = Gateway::start(&db.config(
        "max_pending_connections = 4\nidle_timeout = \"60s\"\nheader_read_timeout = \"60s\"",
        10,
    ))
    .await;
    // Four silent connections fill the cap (accepted in connect order).
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // The probe is accepted after all four: it evicts the oldest and is answered.
    let mut probe = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get(&mut probe, "/healthz").await, "HTTP/1.1 200 OK");
    let (got, _) = read_until_closed(&mut idle[0], CLOSE_WITHIN).await;
    assert!(got.is_empty(), "the evicted connection got nothing");
    // The others were not evicted: they are still served.
    assert_eq!(get(&mut idle[1], "/readyz").await, "HTTP/1.1 200 OK");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_idle_connection_to_evict_a_new_one_is_refused_and_sessions_do_not_count() {
    let db = Db::new();
    let gw = Gateway::start(&db.config(
        "max_pending_connections = 3\nauth_timeout = \"60s\"\nidle_timeout = \"60s\"",
        10,
    ))
    .await;
    // Three WebSocket connections upgraded but not authenticated: pending, not idle.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(Ws::connect(&gw.ws_url("")).await);
    }
    // The next connection finds the cap full and nothing idle: closed without an answer.
    let mut refused = TcpStream::connect(gw.addr).await.unwrap();
    let _ = refused
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (got, _) = read_until_closed(&mut refused, CLOSE_WITHIN).await;
    assert!(
        got.is_empty(),
        "refused: {:?}",
        String::from_utf8_lossy(&got)
    );

    // Authenticated, they are sessions: the pending cap is free again.
    for ws in &mut waiting {
        ws.socket
            .send(Message::Text(
                json!({"type": "auth", "token": token_for("u1")})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        assert_eq!(ws.next().await["type"], "ready");
    }
    let mut probe = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get(&mut probe, "/healthz").await, "HTTP/1.1 200 OK");
    // And more sessions than the pending cap are served.
    let mut more = Vec::new();
    for _ in 0..4 {
        more.push(Ws::user(&gw, "u2", None).await.0);
    }
    assert_eq!(gw.running.app.hub.registered(), 7);
    for ws in &mut more {
        ws.socket.close(None).await.unwrap();
        while ws.socket.next().await.is_some() {}
    }
    gw.stop().await;
}

/// Issue 11 item 7: an SSE reader that stops reading is kicked with 4008 when its queue
/// overflows; it must leave the hub at once (its per-user and global slots free) though
/// the server's writes to it are blocked, and its socket is then closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_reader_frees_its_slots_at_once_and_its_socket_is_closed() {
    let db = Db::new();
    // Patience (two keepalives) is 6 s: the queue overflows well before it.
    let gw = Gateway::start(&db.config(
        "max_connections_per_user = 1\nsocket_send_buffer = 4096\nkeepalive = \"3s\"",
        5000,
    ))
    .await;
    let hub = std::sync::Arc::clone(&gw.running.app.hub);
    let mut raw = stalled_sse_reader(&gw, "u1").await;
    assert_eq!(hub.registered(), 1);
    // The per-user limit is in force while it is registered.
    let (status, _, _) = Sse::open(&gw, Some(&token_for("u1")), "", None).await;
    assert_eq!(status, 429);

    // ~4 MB of events that the reader never takes, paced (one 20 KB order every 5 ms) so
    // that the server's socket and HTTP buffers are full before its queue overflows: the
    // kick then comes while the server's write to it is blocked.
    let payload = "p".repeat(20_000);
    for i in 0..200 {
        db.exec(&format!(
            "INSERT INTO orders VALUES ('o{i}', 'b1', 'i1', 1, '{payload}');"
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let written = Instant::now();
    let deadline = written + Duration::from_secs(5);
    while hub.registered() != 0 || hub.connection_count() != 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled SSE stream still holds {} slot(s) with its socket open",
            hub.registered()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its socket is still open (not read, not closed by the client): a new connection of
    // the same user is accepted all the same (once the burst is delivered: it is no test of
    // the new connection's queue).
    while hub.head() < 200 {
        assert!(Instant::now() < written + WAIT, "the 200 orders are routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut fresh, _) = Sse::user(&gw, "u1").await;
    db.exec(&insert_order("after", "b1"));
    let (_, event) = fresh.next().await;
    assert_eq!(event["type"], "change", "{event}");
    assert_eq!(event["key"], "after", "{event}");

    // And the server closes the stalled socket once its patience runs out.
    let (_, closed) = read_until_closed(&mut raw, Duration::from_secs(6) + CLOSE_WITHIN).await;
    assert!(closed - written < Duration::from_secs(6) + CLOSE_WITHIN);
    gw.stop().await;
}

/// An SSE client that goes away leaves the hub at once, not at the next write (the next
/// event or keepalive comment, which may be minutes away): its slots are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_client_that_disconnects_leaves_the_hub_without_waiting_for_a_write() {
    let db = Db::new();
    // Nothing is written to the stream for a minute after `ready`.
    let gw = Gateway::start(&db.config("keepalive = \"60s\"", 5000)).await;
    let hub = std::sync::Arc::clone(&gw.running.app.hub);
    let (sse, _) = Sse::user(&gw, "u1").await;
    assert_eq!(hub.registered(), 1);
    drop(sse);
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.registered() != 0 {
        assert!(
            Instant::now() < deadline,
            "the closed SSE stream still holds its slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}
