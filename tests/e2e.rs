//! End to end: the real server on 127.0.0.1:0, a real SQLite file written by other
//! connections and processes, real WebSocket and SSE clients.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::{Value, json};

fn seq_of(id: &Value) -> u64 {
    id.as_str()
        .unwrap()
        .rsplit_once('-')
        .unwrap()
        .1
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_from_another_process_reaches_its_owner_and_no_one_else() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;

    db.exec_in_other_process(&insert_order("o100", "b1"));
    let ev = u1.change().await;
    assert_eq!(ev["route"], "orders");
    assert_eq!(ev["op"], "insert");
    assert_eq!(ev["collection"], "orders");
    assert_eq!(ev["key"], "o100");
    assert_eq!(ev["doc"]["creator_id"], "b1");
    assert!(ev["at"].as_str().unwrap().ends_with('Z'), "{ev}");

    // u2's next event is its own order: u1's change never reached it.
    db.exec(&insert_order("o101", "b2"));
    assert_eq!(u2.change().await["key"], "o101");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_of_a_user_receives_the_event() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut a, _) = Ws::user(&gw, "u1", None).await;
    let (mut b, _) = Ws::user(&gw, "u1", None).await;
    let (mut c, _) = Sse::user(&gw, "u1").await;

    db.exec(&insert_order("o1", "b1"));
    let ea = a.change().await;
    let eb = b.change().await;
    let (sse_id, ec) = c.next().await;
    assert_eq!(ea, eb);
    assert_eq!(ea, ec);
    assert_eq!(
        sse_id,
        ea["id"].as_str().unwrap(),
        "SSE id: carries the event id"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_routes_by_its_pre_image() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    db.exec(&insert_order("o19", "b2"));
    assert_eq!(u2.change().await["op"], "insert");
    db.exec_in_other_process("DELETE FROM orders WHERE _id = 'o19';");
    let ev = u2.change().await;
    assert_eq!(ev["op"], "delete");
    assert_eq!(ev["key"], "o19");
    assert_eq!(
        ev["doc"],
        json!({"_id": "o19", "creator_id": "b2", "item_id": "i1", "quantity": 1, "status": "pending"})
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_an_item_to_another_business_tells_both_owners() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    db.exec("UPDATE inventory_items SET owned_by = 'b2' WHERE _id = 'i1';");
    let old = u1.change().await;
    let new = u2.change().await;
    assert_eq!(old, new);
    assert_eq!(old["doc"]["owned_by"], "b2");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_replays_exactly_the_missed_events_in_order() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    // A second connection of u1 stays up and tells us when events have been routed.
    let (mut watcher, _) = Ws::user(&gw, "u1", None).await;
    let (mut client, _) = Ws::user(&gw, "u1", None).await;

    db.exec(&insert_order("o1", "b1"));
    let first = client.change().await;
    watcher.change().await;
    drop(client);

    let mut missed = Vec::new();
    for i in 2..=6 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
        db.exec(&insert_order(&format!("x{i}"), "b2")); // someone else's
        missed.push(watcher.change().await);
    }

    let (mut client, ready) = Ws::user(&gw, "u1", Some(first["id"].as_str().unwrap())).await;
    assert_eq!(ready["resumed"], true);
    let mut replayed = Vec::new();
    for _ in 0..5 {
        replayed.push(client.change().await);
    }
    assert_eq!(replayed, missed, "exactly the missed events, in order");
    let seqs: Vec<u64> = replayed.iter().map(|e| seq_of(&e["id"])).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "ids increase: {seqs:?}"
    );

    // Live events continue right after the replay, with no repeat at the seam.
    db.exec(&insert_order("o7", "b1"));
    assert_eq!(client.change().await["key"], "o7");

    // SSE resumes the same way through Last-Event-ID.
    let (status, sse, _) = Sse::open(
        &gw,
        Some(&token_for("u1")),
        "",
        Some(first["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    assert_eq!(sse.next().await.1["resumed"], true);
    let mut sse_keys = Vec::new();
    for _ in 0..6 {
        sse_keys.push(sse.next().await.1["key"].as_str().unwrap().to_owned());
    }
    assert_eq!(sse_keys, vec!["o2", "o3", "o4", "o5", "o6", "o7"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_older_than_history_or_from_another_epoch_gets_gap_then_live_events() {
    let db = Db::new();
    let config = db
        .config("", 3)
        .replace("[history]\n", "[history]\nstore = \"memory\"\n");
    let gw = Gateway::start(&config).await;
    let (mut watcher, _) = Ws::user(&gw, "u1", None).await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
        ids.push(watcher.change().await["id"].as_str().unwrap().to_owned());
    }
    // History keeps the last 3: resuming after the 2nd is still complete.
    let (mut client, ready) = Ws::user(&gw, "u1", Some(&ids[1])).await;
    assert_eq!(ready["resumed"], true);
    assert_eq!(client.change().await["id"], ids[2].as_str());
    drop(client);
    for since in [ids[0].clone(), "eother-4".to_string()] {
        let (mut client, ready) = Ws::user(&gw, "u1", Some(&since)).await;
        assert_eq!(ready["resumed"], false);
        let gap = client.next().await;
        assert_eq!(gap["type"], "gap", "{gap}");
        assert_eq!(gap["since"], since.as_str());
        assert_eq!(gap["position"], ready["position"]);
        db.exec(&insert_order(&format!("live-{since}"), "b1"));
        assert_eq!(client.change().await["key"], format!("live-{since}"));
        watcher.change().await;
    }
    gw.stop().await;
}

fn raw_token(header: Value, claims: Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_expired_wrongly_signed_and_alg_none_tokens_get_1008() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("auth_timeout = \"300ms\"", 100)).await;
    let now = changecast::auth::now_secs();
    let claims = json!({"user_id": email_of("u1"), "exp": now + 600});
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"user_id": email_of("u1"), "exp": now - 60}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let wrong_secret = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"not the secret"),
    )
    .unwrap();
    let alg_none = raw_token(json!({"alg": "none", "typ": "JWT"}), claims.clone());

    for (name, token) in [
        ("expired", expired.as_str()),
        ("wrong secret", wrong_secret.as_str()),
        ("alg none", alg_none.as_str()),
        ("garbage", "not-a-jwt"),
    ] {
        let mut ws = Ws::connect(&gw.ws_url(&format!("token={token}"))).await;
        assert_eq!(ws.close_code().await, 1008, "{name} via query");
        let mut ws = Ws::connect_with(&gw.ws_url(""), Some(token)).await;
        assert_eq!(ws.close_code().await, 1008, "{name} via header");
        let mut ws = Ws::connect(&gw.ws_url("")).await;
        ws.send(json!({"type": "auth", "token": token})).await;
        assert_eq!(ws.close_code().await, 1008, "{name} via auth frame");
        let (status, _, body) = Sse::open(&gw, Some(token), "", None).await;
        assert_eq!(status, 401, "{name} via SSE");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["code"], 1008);
    }

    // No credentials at all: the auth frame never comes.
    let mut ws = Ws::connect(&gw.ws_url("")).await;
    assert_eq!(ws.close_code().await, 1008);
    let (status, _, _) = Sse::open(&gw, None, "", None).await;
    assert_eq!(status, 401);
    // A first frame that is not auth.
    let mut ws = Ws::connect(&gw.ws_url("")).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.close_code().await, 1008);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_and_disallowed_client_ids_get_4003() {
    let db = Db::new();
    let config = db
        .config("", 100)
        .replace("[auth]\n", "[auth]\nclient_ids = [\"web\", \"ios\"]\n");
    let gw = Gateway::start(&config).await;

    let stranger = token_for("nobody");
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={stranger}&client_id=web"))).await;
    assert_eq!(ws.close_code().await, 4003);
    let (status, _, _) = Sse::open(&gw, Some(&stranger), "client_id=web", None).await;
    assert_eq!(status, 403);

    let ok = token_for("u1");
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={ok}&client_id=tv"))).await;
    assert_eq!(ws.close_code().await, 4003);
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={ok}"))).await;
    assert_eq!(
        ws.close_code().await,
        4003,
        "a missing client id is not on the list"
    );

    // The auth frame may carry the client id.
    let mut ws = Ws::connect(&gw.ws_url("")).await;
    ws.send(json!({"type": "auth", "token": ok, "client_id": "ios"}))
        .await;
    assert_eq!(ws.next().await["type"], "ready");
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await, json!({"type": "pong"}));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_memory_history_a_restart_is_a_new_epoch_and_repeats_nothing() {
    let db = Db::new();
    let config = db
        .config("", 100)
        .replace("[history]\n", "[history]\nstore = \"memory\"\n");

    let gw = Gateway::start(&config).await;
    let (mut u1, first_ready) = Ws::user(&gw, "u1", None).await;
    for i in 1..=3 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
        assert_eq!(u1.change().await["key"], format!("o{i}"));
    }
    let old_epoch = first_ready["position"]
        .as_str()
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .to_owned();
    let stopping = tokio::spawn(gw.stop());
    assert_eq!(
        u1.close_code().await,
        1012,
        "clients are told the server is restarting"
    );
    stopping.await.unwrap();

    // Written while changecast is down.
    db.exec(&format!(
        "{}{}",
        insert_order("o4", "b1"),
        insert_order("o5", "b1")
    ));

    let gw = Gateway::start(&config).await;
    // Wait (bounded) until the backlog has been routed into the new epoch.
    let mut epoch = String::new();
    for _ in 0..200 {
        let (_, ready) = Ws::user(&gw, "u1", None).await;
        let position = ready["position"].as_str().unwrap().to_owned();
        let (e, seq) = position.rsplit_once('-').unwrap();
        epoch = e.to_owned();
        if seq.parse::<u64>().unwrap() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_ne!(
        epoch, old_epoch,
        "in-memory history: a new process is a new epoch"
    );
    // Everything of the new epoch: exactly the two changes written while down.
    let (mut u1, ready) = Ws::user(&gw, "u1", Some(&format!("{epoch}-0"))).await;
    assert_eq!(ready["resumed"], true);
    assert_eq!(u1.change().await["key"], "o4");
    assert_eq!(u1.change().await["key"], "o5");
    db.exec(&insert_order("o6", "b1"));
    assert_eq!(u1.change().await["key"], "o6", "o1..o3 were not repeated");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_with_4001_unless_refreshed_by_the_same_user() {
    let db = Db::new();
    // No expiry warnings here (tests/durability.rs covers them): only the close matters.
    let config = db
        .config("", 100)
        .replace("[auth]\n", "[auth]\nexpiry_warning = \"0s\"\n");
    let gw = Gateway::start(&config).await;
    // Expires in 2 s (the 5 s leeway lets it connect).
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={}", token_with_ttl("u1", 2)))).await;
    assert_eq!(ws.next().await["type"], "ready");
    assert_eq!(ws.close_code().await, 4001);

    let mut refreshed =
        Ws::connect(&gw.ws_url(&format!("token={}", token_with_ttl("u1", 2)))).await;
    assert_eq!(refreshed.next().await["type"], "ready");
    refreshed
        .send(json!({"type": "refresh", "token": token_for("u1")}))
        .await;
    let mut other = Ws::connect(&gw.ws_url(&format!("token={}", token_with_ttl("u2", 2)))).await;
    assert_eq!(other.next().await["type"], "ready");
    other
        .send(json!({"type": "refresh", "token": token_for("u1")}))
        .await;
    assert_eq!(
        other.close_code().await,
        1008,
        "a refresh may not switch users"
    );

    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    refreshed.send(json!({"type": "ping"})).await;
    assert_eq!(
        refreshed.next().await,
        json!({"type": "pong"}),
        "still open after the old expiry"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_say_what_is_going_on() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let get = |p: &str| reqwest::get(gw.http(p));
    let health: Value = get("/healthz").await.unwrap().json().await.unwrap();
    assert_eq!(health, json!({"status": "ok"}));
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap(), json!({"ready": true}));

    // `/metrics` speaks Prometheus text and declares the core metrics; what they count is
    // checked by exact differences in `tests/metrics.rs`, alone in its binary (metrics
    // are process-wide and this binary's tests run in parallel).
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    db.exec(&insert_order("o1", "b1"));
    u1.change().await;
    let res = get("/metrics").await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        res.headers()
    );
    let metrics = res.text().await.unwrap();
    for declared in [
        "# TYPE changecast_connections gauge",
        "# TYPE changecast_deliveries_total counter",
        "# TYPE changecast_events_published_total counter",
    ] {
        assert!(
            metrics.lines().any(|l| l == declared),
            "{declared} in\n{metrics}"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_durable_history_a_client_resumes_across_a_restart_with_exactly_what_it_missed() {
    let db = Db::new();
    let config = db.config("", 100);

    let gw = Gateway::start(&config).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let mut last = String::new();
    for i in 1..=3 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
        let ev = u1.change().await;
        assert_eq!(ev["key"], format!("o{i}"));
        last = ev["id"].as_str().unwrap().to_owned();
    }
    let stopping = tokio::spawn(gw.stop());
    assert_eq!(u1.close_code().await, 1012);
    stopping.await.unwrap();

    // Written while changecast is down, plus someone else's.
    db.exec(&format!(
        "{}{}{}",
        insert_order("o4", "b1"),
        insert_order("x1", "b2"),
        insert_order("o5", "b1")
    ));

    let gw = Gateway::start(&config).await;
    // Resume with the last id seen before the restart: same epoch, nothing lost.
    let mut keys = Vec::new();
    let mut ids = vec![last.clone()];
    let (mut u1, ready) = Ws::user(&gw, "u1", Some(&last)).await;
    assert_eq!(ready["resumed"], true, "{ready}");
    assert_eq!(
        ready["position"].as_str().unwrap().split('-').next(),
        last.split('-').next(),
        "same epoch"
    );
    // The backlog may be routed before or after the client connects: replayed or live, the
    // client gets o4 and o5 exactly once, in order.
    while keys.len() < 2 {
        let ev = u1.change().await;
        keys.push(ev["key"].as_str().unwrap().to_owned());
        ids.push(ev["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(keys, vec!["o4", "o5"]);
    let seqs: Vec<u64> = ids
        .iter()
        .map(|i| i.rsplit_once('-').unwrap().1.parse().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "ids keep increasing across the restart: {seqs:?}"
    );
    db.exec(&insert_order("o6", "b1"));
    assert_eq!(u1.change().await["key"], "o6", "nothing repeated");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_history_is_pruned_per_user_and_older_resumes_get_gap() {
    let db = Db::new();
    let config = db.config("", 3).replace(
        "[history]\n",
        "[history]\nprune_interval = \"20ms\"\nmemory_per_user = 1\n",
    );
    let gw = Gateway::start(&config).await;
    let (mut watcher, _) = Ws::user(&gw, "u1", None).await;
    let mut ids = Vec::new();
    for i in 1..=6 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
        ids.push(watcher.change().await["id"].as_str().unwrap().to_owned());
    }
    // Bounded wait for retention to run: the 3 newest stay, older resumes become gaps.
    let mut gap = false;
    for _ in 0..250 {
        let (mut c, ready) = Ws::user(&gw, "u1", Some(&ids[1])).await;
        if ready["resumed"] == false {
            assert_eq!(c.next().await["type"], "gap");
            gap = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(gap, "retention never applied");
    // After the 3rd: complete, from the store (memory keeps only 1).
    let (mut c, ready) = Ws::user(&gw, "u1", Some(&ids[2])).await;
    assert_eq!(ready["resumed"], true);
    for id in &ids[3..] {
        assert_eq!(c.change().await["id"], id.as_str());
    }
    gw.stop().await;
}

/// A protocol-level ping from the client is answered by the server's WebSocket layer, whose
/// pong shares the socket with live events written straight to it: the pong must go out
/// (not sit in a buffer) and must not land inside an event's frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_ping_gets_its_pong_while_live_events_flow_and_every_frame_arrives_whole() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let db = Db::new();
    let gw = Gateway::start(&db.config("", 1000)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 10;
    for round in 0..ROUNDS {
        u1.socket
            .send(Message::Ping(vec![round as u8; 4].into()))
            .await
            .unwrap();
        let batch: String = (0..PER_ROUND)
            .map(|i| insert_order(&format!("o{round}-{i}"), "b1"))
            .collect();
        db.exec(&format!("BEGIN;{batch}COMMIT;"));
    }
    let (mut pongs, mut keys) = (Vec::new(), Vec::new());
    while pongs.len() < ROUNDS || keys.len() < ROUNDS * PER_ROUND {
        let msg = tokio::time::timeout(WAIT, u1.socket.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} pongs and {} events, then nothing",
                    pongs.len(),
                    keys.len()
                )
            })
            .expect("the connection stays open")
            .expect("every frame parses");
        match msg {
            Message::Pong(payload) => pongs.push(payload.to_vec()),
            Message::Text(text) => {
                let ev: Value = serde_json::from_str(&text).expect("each event is whole JSON");
                assert_eq!(ev["type"], "change", "{ev}");
                keys.push(ev["key"].as_str().unwrap().to_owned());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let want_pongs: Vec<Vec<u8>> = (0..ROUNDS).map(|r| vec![r as u8; 4]).collect();
    assert_eq!(
        pongs, want_pongs,
        "one pong per ping, in order, with its payload"
    );
    let want_keys: Vec<String> = (0..ROUNDS)
        .flat_map(|r| (0..PER_ROUND).map(move |i| format!("o{r}-{i}")))
        .collect();
    assert_eq!(keys, want_keys, "every event once, in order");
    gw.stop().await;
}
