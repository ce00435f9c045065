//! Token claims against the real server: `exp` and `nbf` values that once panicked a
//! connection task or were misread (issue 11, item 9). Every answer is the one the
//! verifier gave, and the server keeps serving.

mod common;

use common::{Db, Gateway, SECRET, Sse, Ws, email_of};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// An HS256 token for `user` (the harness's `user_id` email claim) with `exp` / `nbf` as
/// given.
fn token(user: &str, exp: Value, nbf: Option<u64>) -> String {
    let mut claims = json!({"sub": user, "user_id": email_of(user), "exp": exp});
    if let Some(nbf) = nbf {
        claims["nbf"] = json!(nbf);
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    changecast::auth::now_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exp_near_u64_max_is_refused_and_the_server_keeps_serving() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    for exp in [json!(u64::MAX), json!(u64::MAX - 1), json!(1.8e19)] {
        let huge = token("u1", exp.clone(), None);
        let mut ws = Ws::connect(&gw.ws_url(&format!("token={huge}"))).await;
        assert_eq!(ws.close_code().await, 1008, "WebSocket, exp {exp}");
        let (status, _, body) = Sse::open(&gw, Some(&huge), "", None).await;
        assert_eq!(status, 401, "SSE, exp {exp}: {body}");
        assert!(body.contains("exp"), "{body}");
    }
    // The same user with an ordinary token is served: nothing panicked, nothing is stuck.
    let (mut ws, _) = Ws::user(&gw, "u1", None).await;
    db.exec(&common::insert_order("o-after-huge", "b1"));
    assert_eq!(ws.change().await["key"], "o-after-huge");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fractional_exp_gives_the_connection_the_tokens_expiry() {
    let db = Db::new();
    // Warn at once, so the first event after `ready` says how long the connection has.
    let config = db
        .config("", 100)
        .replace("[auth]\n", "[auth]\nexpiry_warning = \"1h\"\n");
    let gw = Gateway::start(&config).await;
    let exp = now() as f64 + 90.4;
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={}", token("u1", json!(exp), None)))).await;
    let ready = ws.next().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    let warning = ws.next().await;
    assert_eq!(warning["type"], "expiring", "{warning}");
    let left = warning["expires_in"].as_u64().unwrap();
    assert!(
        (80..=91).contains(&left),
        "the connection expires with the token (exp {exp}), not at once: {warning}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_before_its_nbf_is_refused_and_after_it_accepted() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let exp = json!(now() + 600);
    let early = token("u1", exp.clone(), Some(now() + 300));
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={early}"))).await;
    assert_eq!(ws.close_code().await, 1008);
    let (status, _, body) = Sse::open(&gw, Some(&early), "", None).await;
    assert_eq!(status, 401, "{body}");

    let valid = token("u1", exp, Some(now() - 5));
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={valid}"))).await;
    let ready = ws.next().await;
    assert_eq!(
        (ready["type"].as_str(), ready["user"].as_str()),
        (Some("ready"), Some("u1"))
    );
    gw.stop().await;
}
