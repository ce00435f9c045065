//! Recent activity on connect (issue 13 item 4): `?last=N` on WebSocket and SSE opens on
//! the user's newest N events, oldest first, then live — nothing missed or repeated at the
//! seam, also across a restart (durable history) and while events arrive during the
//! connect. `since` (or `Last-Event-ID`) wins over `last`.

mod common;

use common::*;
use serde_json::Value;

/// Inserts orders `{prefix}1..={prefix}n` for u1 (business b1) plus one for u2 each, and
/// waits until `watcher` (a u1 connection) has them all; returns u1's event ids in order.
async fn activity(db: &Db, watcher: &mut Ws, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 1..=n {
        db.exec(&format!(
            "{}{}",
            insert_order(&format!("{prefix}{i}"), "b1"),
            insert_order(&format!("{prefix}x{i}"), "b2")
        ));
        let ev = watcher.change().await;
        assert_eq!(ev["key"], format!("{prefix}{i}"));
        ids.push(ev["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Connects a WebSocket as `user` with `query` appended; returns it and `ready`.
async fn ws_with(gw: &Gateway, user: &str, query: &str) -> (Ws, Value) {
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={}&{query}", token_for(user)))).await;
    let ready = ws.next().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    (ws, ready)
}

/// Reads `n` change events; returns their ids.
async fn ws_ids(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(ws.change().await["id"].as_str().unwrap().to_owned());
    }
    out
}

async fn sse_ids(sse: &mut Sse, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (id, ev) = sse.next().await;
        assert_eq!(ev["type"], "change", "{ev}");
        assert_eq!(ev["id"], id.as_str(), "the SSE id is the event's");
        out.push(id);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_last_n_gives_exactly_the_newest_n_in_order_then_live() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut watcher, _) = Ws::user(&gw, "u1", None).await;
    let ids = activity(&db, &mut watcher, "o", 6).await;

    let (mut ws, ready) = ws_with(&gw, "u1", "last=4").await;
    assert_eq!(ready["last"], 4, "{ready}");
    assert_eq!(ready["resumed"], false, "{ready}");
    assert_eq!(ws_ids(&mut ws, 4).await, ids[2..]);
    // Live right after, nothing repeated at the seam.
    db.exec(&insert_order("o7", "b1"));
    let live = ws.change().await;
    assert_eq!(live["key"], "o7");
    assert_eq!(live["id"], watcher.change().await["id"]);

    // More than there is: all of u1's, and never anyone else's.
    let (mut all, ready) = ws_with(&gw, "u1", "last=50").await;
    assert_eq!(ready["last"], 7, "{ready}");
    let keys: Vec<String> = {
        let mut k = Vec::new();
        for _ in 0..7 {
            k.push(all.change().await["key"].as_str().unwrap().to_owned());
        }
        k
    };
    assert_eq!(keys, ["o1", "o2", "o3", "o4", "o5", "o6", "o7"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_last_n_gives_the_newest_n_and_since_or_last_event_id_wins() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut watcher, _) = Ws::user(&gw, "u1", None).await;
    let ids = activity(&db, &mut watcher, "o", 5).await;
    let token = token_for("u1");

    let (status, sse, body) = Sse::open(&gw, Some(&token), "last=3", None).await;
    assert_eq!(status, 200, "{body}");
    let mut sse = sse.unwrap();
    let ready = sse.next().await.1;
    assert_eq!(
        (ready["type"].as_str(), &ready["last"]),
        (Some("ready"), &Value::from(3))
    );
    assert_eq!(sse_ids(&mut sse, 3).await, ids[2..]);
    db.exec(&insert_order("o6", "b1"));
    let live = sse_ids(&mut sse, 1).await;
    assert_eq!(live[0], watcher.change().await["id"].as_str().unwrap());

    // EventSource reconnects with the same URL and `Last-Event-ID`: that is a resume.
    let (status, sse, _) = Sse::open(&gw, Some(&token), "last=3", Some(&ids[3])).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    let ready = sse.next().await.1;
    assert_eq!(ready["resumed"], true, "{ready}");
    assert!(ready.get("last").is_none(), "{ready}");
    let resumed = sse_ids(&mut sse, 2).await;
    assert_eq!(resumed, [ids[4].clone(), live[0].clone()]);

    // `since` as a parameter wins the same way, on both transports.
    let (status, sse, _) =
        Sse::open(&gw, Some(&token), &format!("last=3&since={}", ids[3]), None).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    assert_eq!(sse.next().await.1["resumed"], true);
    assert_eq!(sse_ids(&mut sse, 1).await, [ids[4].clone()]);
    let (mut ws, ready) = ws_with(&gw, "u1", &format!("since={}&last=1", ids[2])).await;
    assert_eq!(ready["resumed"], true, "{ready}");
    assert!(ready.get("last").is_none(), "{ready}");
    assert_eq!(
        ws_ids(&mut ws, 3).await,
        [ids[3].clone(), ids[4].clone(), live[0].clone()]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_last_is_refused_with_400_and_a_huge_one_is_capped() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let token = token_for("u1");
    for bad in ["x", "-1", "1.5", "", "3%200"] {
        let (status, _, body) = Sse::open(&gw, Some(&token), &format!("last={bad}"), None).await;
        assert_eq!(status, 400, "last={bad}: {body}");
        let json: Value = serde_json::from_str(&body).unwrap();
        assert!(
            json["error"].as_str().unwrap().starts_with("last: "),
            "last={bad}: {body}"
        );
        // The WebSocket upgrade is refused the same way.
        let res = reqwest::Client::new()
            .get(gw.http(&format!("/v1/ws?token={token}&last={bad}")))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 400, "ws last={bad}");
        let json: Value = res.json().await.unwrap();
        assert!(
            json["error"].as_str().unwrap().starts_with("last: "),
            "{json}"
        );
    }
    // Above the maximum (and beyond u64): served as the maximum.
    for huge in ["1001", "99999999999999999999999"] {
        let (_, ready) = ws_with(&gw, "u1", &format!("last={huge}")).await;
        assert_eq!(ready["last"], 0, "no events yet: {ready}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_n_across_a_restart_comes_from_the_durable_history_then_live() {
    let db = Db::new();
    // Memory keeps 2 per user: most of what `last` asks for is read from the file.
    let config = db
        .config("", 100)
        .replace("[history]\n", "[history]\nmemory_per_user = 2\n");
    let gw = Gateway::start(&config).await;
    let (mut watcher, _) = Ws::user(&gw, "u1", None).await;
    let mut ids = activity(&db, &mut watcher, "o", 5).await;
    // Before the restart: 2 from memory, 2 from the file.
    let (mut ws, ready) = ws_with(&gw, "u1", "last=4").await;
    assert_eq!(ready["last"], 4, "{ready}");
    assert_eq!(ws_ids(&mut ws, 4).await, ids[1..]);
    drop(ws);
    let stopping = tokio::spawn(gw.stop());
    assert_eq!(watcher.close_code().await, 1012);
    stopping.await.unwrap();

    let gw = Gateway::start(&config).await;
    // A new process: nothing in memory; the newest N from the file, then live.
    let (mut ws, ready) = ws_with(&gw, "u1", "last=3").await;
    assert_eq!(ready["last"], 3, "{ready}");
    assert_eq!(ws_ids(&mut ws, 3).await, ids[2..]);
    let (status, sse, _) = Sse::open(&gw, Some(&token_for("u1")), "last=3", None).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    assert_eq!(sse.next().await.1["last"], 3);
    assert_eq!(sse_ids(&mut sse, 3).await, ids[2..]);

    db.exec(&insert_order("o6", "b1"));
    let live = ws.change().await;
    assert_eq!(live["key"], "o6");
    let live_id = live["id"].as_str().unwrap().to_owned();
    assert_eq!(
        sse_ids(&mut sse, 1).await,
        std::slice::from_ref(&live_id),
        "the same live event"
    );
    let (before, after) = (id_parts(&ids[4]), id_parts(&live_id));
    assert_eq!(before.0, after.0, "same epoch");
    assert!(after.1 > before.1, "ids keep increasing");
    ids.push(live_id);
    // And now one from memory, the rest from the file.
    let (mut ws, ready) = ws_with(&gw, "u1", "last=3").await;
    assert_eq!(ready["last"], 3, "{ready}");
    assert_eq!(ws_ids(&mut ws, 3).await, ids[3..]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_n_while_events_arrive_during_the_connect_has_no_gap_and_no_repeat() {
    let db = Db::new();
    let config = db
        .config("", 1000)
        .replace("[history]\n", "[history]\nmemory_per_user = 4\n");
    let gw = Gateway::start(&config).await;
    let (mut watcher, _) = Ws::user(&gw, "u1", None).await;
    // Another process writes u1's orders w1..wN as fast as it can, while clients connect.
    const N: usize = 200; // under the per-connection queue (256) of a client not yet reading
    // Half way, the writer waits (up to 10 s) for a client that was served some events, so
    // that at least one connects while events flow however slow the machine is.
    let (connected_tx, connected_rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let path = db.path.clone();
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .unwrap();
            for i in 1..=N {
                if i == N / 2 {
                    let _ = connected_rx.recv_timeout(std::time::Duration::from_secs(10));
                }
                conn.execute_batch(&insert_order(&format!("w{i}"), "b1"))
                    .unwrap();
            }
        })
    };
    let mut clients = Vec::new();
    let mut sse_clients = Vec::new();
    while !writer.is_finished() && clients.len() < 20 {
        let (ws, ready) = ws_with(&gw, "u1", "last=8").await;
        if ready["last"].as_u64() > Some(0) {
            let _ = connected_tx.send(());
        }
        clients.push((ws, ready));
        let (status, sse, _) = Sse::open(&gw, Some(&token_for("u1")), "last=8", None).await;
        assert_eq!(status, 200);
        let mut sse = sse.unwrap();
        let ready = sse.next().await.1;
        sse_clients.push((sse, ready));
    }
    writer.join().unwrap();
    // Every key the writer wrote, in order, as the watcher saw them.
    let mut all = Vec::new();
    while all.len() < N {
        let ev = watcher.change().await;
        all.push(ev["key"].as_str().unwrap().to_owned());
    }
    let last_key = format!("w{N}");
    let mut mid_stream = 0;
    // Each client: the opening and live events up to the last write are consecutive
    // writes, each once, ending with the last one.
    let check = |keys: Vec<String>, served: usize, what: &str| {
        let start = all.iter().position(|k| *k == keys[0]).unwrap();
        assert_eq!(
            keys,
            all[start..],
            "{what}: consecutive, none twice (opening of {served})"
        );
        served > 0 && keys.len() > served
    };
    for (mut ws, ready) in clients {
        let served = ready["last"].as_u64().unwrap() as usize;
        let mut keys = Vec::new();
        loop {
            let k = ws.change().await["key"].as_str().unwrap().to_owned();
            keys.push(k.clone());
            if k == last_key {
                break;
            }
        }
        mid_stream += check(keys, served, "ws") as usize;
    }
    for (mut sse, ready) in sse_clients {
        let served = ready["last"].as_u64().unwrap() as usize;
        let mut keys = Vec::new();
        loop {
            let ev = sse.next().await.1;
            let k = ev["key"].as_str().unwrap().to_owned();
            keys.push(k.clone());
            if k == last_key {
                break;
            }
        }
        mid_stream += check(keys, served, "sse") as usize;
    }
    assert!(
        mid_stream > 0,
        "no client connected while events were flowing"
    );
    gw.stop().await;
}
