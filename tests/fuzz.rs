//! Property and fuzz tests: hostile or malformed input never panics and gets its
//! documented outcome.
//!
//! In: generated client frames, `since` / `Last-Event-ID` values, tokens and claims,
//! config TOML, MongoDB change events (BSON). Most properties run at the parser level
//! (many cases, fast); a few cases of client frames and `Last-Event-ID` go end to end
//! through a real server on 127.0.0.1:0.
//!
//! Bounded: every property sets its case count, so the whole binary runs in seconds in
//! `cargo test`. Longer runs: `PROPTEST_CASES=20000 cargo test --test fuzz` (the variable
//! replaces every count here, the end-to-end ones included). A failure prints the shrunk
//! input; nothing is written to the source tree.

mod common;

use std::sync::Arc;

use mongodb::bson::{self, Bson, Document, doc, oid::ObjectId, spec::BinarySubtype};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};
use tokio_tungstenite::tungstenite::Message;

use changecast::auth::{AuthPlan, Authenticator, now_secs};
use changecast::config::{AuthConfig, Config};
use changecast::hub::{Hub, HubConfig, Opening};
use changecast::plan::Plan;
use changecast::source::mongodb::decode::{Decoded, bson_to_json, decode};
use changecast::source::sqlite::SqliteLookup;
use changecast::transport::ws::{ClientFrame, parse_client_frame};
use common::*;

/// `cases` unless `PROPTEST_CASES` asks for another number.
fn cases(cases: u32) -> ProptestConfig {
    let config = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_some() {
        config
    } else {
        ProptestConfig { cases, ..config }
    }
}

/// A multi-threaded runtime for the end-to-end properties.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---- generators ---------------------------------------------------------------------

/// Arbitrary JSON, a few levels deep, with numbers of every kind.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON objects shaped like client frames: a `type` (often a real one), often a `token`,
/// a `client_id`, and other fields.
fn frame_object() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        4 => prop_oneof![Just("auth"), Just("refresh"), Just("ping")].prop_map(Value::from),
        1 => prop_oneof![Just("pong"), Just("Ping"), Just("AUTH"), Just("")].prop_map(Value::from),
        1 => json_value(),
    ];
    let token = prop_oneof![3 => ".{0,40}".prop_map(Value::from), 1 => json_value()];
    (
        prop::option::weighted(0.9, kind),
        prop::option::of(token),
        prop::option::of(json_value()),
        prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..3),
    )
        .prop_map(|(kind, token, client_id, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [("type", kind), ("token", token), ("client_id", client_id)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

/// Client frame text: JSON-ish objects, arbitrary JSON, and arbitrary text.
fn frame_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => frame_object().prop_map(|v| v.to_string()),
        1 => json_value().prop_map(|v| v.to_string()),
        1 => ".{0,200}",
        1 => prop::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

// ---- client frames -------------------------------------------------------------------

/// What the documented grammar says `text` is (`None`: not a client frame).
fn expected_frame(text: &str) -> Option<ClientFrame> {
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    let token = || m.get("token")?.as_str().map(str::to_owned);
    match m.get("type")?.as_str()? {
        "ping" => Some(ClientFrame::Ping),
        "refresh" => Some(ClientFrame::Refresh { token: token()? }),
        "auth" => {
            let client_id = match m.get("client_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return None,
            };
            Some(ClientFrame::Auth {
                token: token()?,
                client_id,
            })
        }
        _ => None,
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    /// Any text: no panic, and exactly the frames the grammar names are recognised.
    #[test]
    fn client_frames_parse_as_the_grammar_says(text in frame_text()) {
        prop_assert_eq!(parse_client_frame(&text), expected_frame(&text), "{}", text);
    }

    /// Well-formed frames are recognised whatever their token and client id.
    #[test]
    fn well_formed_client_frames_are_recognised(token in ".{0,64}", client in prop::option::of(".{0,16}")) {
        let auth = json!({"type": "auth", "token": token, "client_id": client}).to_string();
        prop_assert_eq!(
            parse_client_frame(&auth),
            Some(ClientFrame::Auth { token: token.clone(), client_id: client })
        );
        let refresh = json!({"type": "refresh", "token": token}).to_string();
        prop_assert_eq!(parse_client_frame(&refresh), Some(ClientFrame::Refresh { token }));
        prop_assert_eq!(parse_client_frame(r#"{"type":"ping"}"#), Some(ClientFrame::Ping));
    }
}

/// One frame a client sends after it is authenticated.
#[derive(Debug, Clone)]
enum Sent {
    Text(String),
    Binary(Vec<u8>),
}

fn sent() -> impl Strategy<Value = Sent> {
    prop_oneof![
        4 => frame_text().prop_map(Sent::Text),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Sent::Binary),
    ]
}

/// The documented outcome of frames sent by an authenticated client, then a `ping`:
/// unknown frames are ignored, each `ping` answered with `pong`, and a `refresh` with a
/// token that is not valid (no generated one is) closes with 1008. `(pongs, closed)`.
fn expected_session(frames: &[Sent]) -> (usize, bool) {
    let mut pongs = 0;
    for frame in frames {
        if let Sent::Text(t) = frame {
            match parse_client_frame(t) {
                Some(ClientFrame::Ping) => pongs += 1,
                Some(ClientFrame::Refresh { .. }) => return (pongs, true),
                _ => {}
            }
        }
    }
    (pongs + 1, false)
}

/// A few cases end to end: arbitrary frames into a real connection get the documented
/// outcome, and the server keeps serving others.
#[test]
fn client_frames_into_a_real_connection_get_the_documented_outcome() {
    let rt = runtime();
    let db = Db::new();
    let gw = rt.block_on(Gateway::start(&db.config("", 10)));
    let mut runner = TestRunner::new(cases(12));
    let strategy = (prop::collection::vec(sent(), 1..6), frame_text());
    let result = runner.run(&strategy, |(frames, first)| {
        rt.block_on(async {
            // Authenticated: frames, then a ping.
            let (mut ws, _) = Ws::user(&gw, "u1", None).await;
            for f in &frames {
                let msg = match f {
                    Sent::Text(t) => Message::Text(t.clone().into()),
                    Sent::Binary(b) => Message::Binary(b.clone().into()),
                };
                // A write may fail only once the server has closed (after a refresh).
                let _ = futures_util::SinkExt::send(&mut ws.socket, msg).await;
            }
            let _ = futures_util::SinkExt::send(
                &mut ws.socket,
                Message::Text(r#"{"type":"ping"}"#.into()),
            )
            .await;
            let (pongs, closed) = expected_session(&frames);
            for _ in 0..pongs {
                let ev = ws.next_or_end().await;
                prop_assert_eq!(ev, Ok(json!({"type": "pong"})), "{:?}", frames);
            }
            if closed {
                let end = ws.next_or_end().await.map_err(|e| format!("{e:?}"));
                prop_assert!(
                    matches!(&end, Err(e) if e.starts_with("Closed(1008")),
                    "{:?} for {:?}",
                    end,
                    frames
                );
            }

            // Unauthenticated: any first frame that is not a valid auth frame gets 1008.
            let mut anon = Ws::connect(&gw.ws_url("")).await;
            let _ =
                futures_util::SinkExt::send(&mut anon.socket, Message::Text(first.clone().into()))
                    .await;
            prop_assert_eq!(anon.close_code().await, 1008, "{}", first);

            // The server still serves everyone else.
            let (_other, ready) = Ws::user(&gw, "u2", None).await;
            prop_assert_eq!(&ready["type"], "ready");
            Ok(())
        })
    });
    rt.block_on(gw.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---- since / Last-Event-ID -----------------------------------------------------------

/// `since` values: well-formed ids of this epoch (in range or not), of other epochs, and
/// arbitrary text.
fn since_value() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => (0u64..40).prop_map(|s| format!("ep-{s}")),
        1 => any::<u64>().prop_map(|s| format!("ep-{s}")),
        1 => ("[a-z0-9]{0,6}", any::<u64>()).prop_map(|(e, s)| format!("{e}-{s}")),
        1 => "ep-[-+0-9a-z ]{0,22}",
        2 => ".{0,30}",
    ]
}

/// How the opening of a subscription resumed: `ready.resumed`, the replayed seqs, and
/// whether a `gap` followed `ready`.
async fn open(hub: &Arc<Hub>, since: Option<&str>) -> (bool, Vec<u64>, bool) {
    let mut sub = hub.subscribe("u", since).expect("under the limits");
    let opening = sub.opening().await;
    let Some(Opening::Control(ready)) = opening.first() else {
        panic!("the opening starts with ready");
    };
    let ready: Value = serde_json::from_str(ready).unwrap();
    assert_eq!(ready["type"], "ready");
    let mut gap = false;
    let mut replayed = Vec::new();
    for item in &opening[1..] {
        match item {
            Opening::Control(c) => {
                let c: Value = serde_json::from_str(c).unwrap();
                assert_eq!(c["type"], "gap", "{c}");
                gap = true;
            }
            Opening::Event(f) => replayed.push(f.seq),
        }
    }
    (ready["resumed"] == true, replayed, gap)
}

proptest! {
    #![proptest_config(cases(500))]

    /// Any `since`: no panic; resumed exactly when it is a well-formed id of this epoch
    /// that history still covers, with exactly the later events; otherwise `gap`. Every
    /// id the hub hands out round-trips.
    #[test]
    fn since_resumes_exactly_when_history_covers_it(
        targets in prop::collection::vec(0u8..3, 0..30),
        keep in 1usize..12,
        since in since_value(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let hub = Arc::new(Hub::with_epoch("ep", HubConfig {
            history_per_user: keep,
            queue_capacity: 64,
            queue_bytes: 1 << 20,
            max_connections: 1000,
            max_connections_per_user: 1000,
        }));
        // Events for u, for v, or both.
        let mut mine = Vec::new();
        let mut ids = Vec::new();
        for t in &targets {
            let to: &[&str] = match t { 0 => &["u"], 1 => &["v"], _ => &["u", "v"] };
            let mut id = String::new();
            let seq = hub.publish(to, |i| { id = i.to_owned(); json!({"id": i}).to_string() }).unwrap();
            prop_assert_eq!(id_parts(&id), ("ep".to_owned(), seq));
            ids.push(id);
            if to.contains(&"u") {
                mine.push(seq);
            }
        }
        let head = hub.head();
        // u's memory starts after the last event it dropped.
        let floor = mine.len().checked_sub(keep + 1).map_or(0, |i| mine[i]);
        let later = |after: u64| mine.iter().copied().filter(|s| *s > after).collect::<Vec<_>>();

        // Every position 0..=head, as the hub spells it, round-trips.
        for after in 0..=head {
            let id = format!("ep-{after}");
            let got = rt.block_on(open(&hub, Some(&id)));
            if after >= floor {
                prop_assert_eq!(got, (true, later(after), false), "{}", id);
            } else {
                prop_assert_eq!(got, (false, vec![], true), "{}", id);
            }
        }
        for id in &ids {
            let seq = id_parts(id).1;
            prop_assert_eq!(rt.block_on(open(&hub, Some(id))).0, seq >= floor);
        }

        // Anything else: resumed only as a well-formed, covered id would be.
        let (resumed, replayed, gap) = rt.block_on(open(&hub, Some(&since)));
        let covered = since
            .rsplit_once('-')
            .filter(|(epoch, _)| *epoch == "ep")
            .and_then(|(_, seq)| seq.parse::<u64>().ok())
            .filter(|seq| *seq <= head && *seq >= floor);
        match covered {
            Some(after) => prop_assert_eq!((resumed, replayed, gap), (true, later(after), false)),
            None => prop_assert_eq!((resumed, replayed, gap), (false, vec![], true)),
        }
        // Without since: a fresh start, nothing replayed, no gap.
        prop_assert_eq!(rt.block_on(open(&hub, None)), (false, vec![], false));
    }
}

/// A few cases end to end: arbitrary `Last-Event-ID` headers on `/v1/sse` get `ready`,
/// then `gap` unless the id is one the server can resume from.
#[test]
fn last_event_id_headers_on_a_real_sse_stream_get_ready_then_gap_or_resume() {
    let rt = runtime();
    let db = Db::new();
    let gw = rt.block_on(Gateway::start(&db.config("", 10)));
    let mut runner = TestRunner::new(cases(12));
    // Visible ASCII and spaces: what an HTTP header value can carry.
    let header = prop_oneof![
        "[ -~]{0,40}",
        (0u64..3).prop_map(|s| format!("{{epoch}}-{s}")),
        any::<u64>().prop_map(|s| format!("{{epoch}}-{s}")),
    ];
    let epoch = gw.running.app.hub.epoch().to_owned();
    let head = gw.running.app.hub.head();
    let result = runner.run(&header, |value| {
        let value = value.replace("{epoch}", &epoch);
        rt.block_on(async {
            let (status, sse, body) =
                Sse::open(&gw, Some(&token_for("u1")), "", Some(&value)).await;
            prop_assert_eq!(status, 200, "{}: {}", value, body);
            let mut sse = sse.unwrap();
            let (_, ready) = sse.next().await;
            prop_assert_eq!(&ready["type"], "ready");
            // Header values are sent trimmed of surrounding spaces.
            let covered = value
                .trim()
                .rsplit_once('-')
                .filter(|(e, _)| *e == epoch)
                .and_then(|(_, s)| s.parse::<u64>().ok())
                .is_some_and(|s| s <= head);
            prop_assert_eq!(ready["resumed"] == true, covered, "{}: {}", value, ready);
            if !covered {
                let (_, gap) = sse.next().await;
                prop_assert_eq!(&gap["type"], "gap", "{}", value);
            }
            Ok(())
        })
    });
    rt.block_on(gw.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---- tokens --------------------------------------------------------------------------

const TOKEN_SECRET: &str = "fuzz-secret";

/// What the token tests run against: an HS256 authenticator that names users by `sub`
/// (no lookup is made), the runtime it runs on, and the folder of its (empty) lookup
/// database.
struct Tokens {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    auth: Authenticator,
}

fn tokens() -> Tokens {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config: AuthConfig =
        toml::from_str(&format!("jwt_secret = \"{TOKEN_SECRET}\"\nleeway = \"0s\"")).unwrap();
    let mut errors = Vec::new();
    let plan = AuthPlan::compile(&config, &mut errors).unwrap_or_else(|| panic!("{errors:?}"));
    let empty = dir.path().join("empty.db");
    rusqlite::Connection::open(&empty).unwrap();
    let auth = rt
        .block_on(plan.build(Arc::new(SqliteLookup::new(empty))))
        .unwrap();
    Tokens {
        rt,
        _dir: dir,
        auth,
    }
}

/// Numbers a hostile issuer might put in `exp` / `nbf` / `iat`.
fn claim_number() -> impl Strategy<Value = Value> {
    let now = now_secs() as i64;
    prop_oneof![
        (-100_000i64..100_000).prop_map(move |d| Value::from(now + d)),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        Just(Value::from(u64::MAX - 1)),
        Just(Value::from(i64::MAX as u64 + 1)),
        (-1e6f64..1e6).prop_map(move |d| json!(now as f64 + d + 0.5)),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(1e300)),
        Just(json!(-1e300)),
        Just(json!("9999999999")),
        Just(Value::Null),
    ]
}

/// Claim sets: `sub`, `exp`, `nbf`, `iat` of every kind, and others.
fn claims() -> impl Strategy<Value = Value> {
    (
        prop::option::weighted(
            0.9,
            prop_oneof![".{0,12}".prop_map(Value::from), json_value()],
        ),
        prop::option::weighted(0.9, claim_number()),
        prop::option::of(claim_number()),
        prop::option::of(claim_number()),
        prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..3),
    )
        .prop_map(|(sub, exp, nbf, iat, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [("sub", sub), ("exp", exp), ("nbf", nbf), ("iat", iat)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(TOKEN_SECRET.as_bytes()),
    )
    .unwrap()
}

/// Arbitrary strings (and JWT-shaped ones) into the verifier: refused, never a panic.
#[test]
fn arbitrary_token_strings_are_refused_without_panicking() {
    let Tokens { rt, _dir, auth } = tokens();
    let strategy = prop_oneof![
        ".{0,200}",
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,40}",
        // A real header and signature around arbitrary claim bytes.
        prop::collection::vec(any::<u8>(), 0..120).prop_map(|b| {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.{}",
                b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
                b64.encode(&b),
                b64.encode([0u8; 32])
            )
        }),
    ];
    let mut runner = TestRunner::new(cases(2000));
    runner
        .run(&strategy, |token| {
            prop_assert!(auth.verify(&token).is_err(), "{}", token);
            prop_assert!(rt.block_on(auth.identify(&token, None)).is_err());
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Validly signed tokens with arbitrary claims: never a panic.
#[test]
fn arbitrary_claims_never_panic_the_verifier() {
    let Tokens { rt, _dir, auth } = tokens();
    let mut runner = TestRunner::new(cases(2000));
    runner
        .run(&claims(), |claims| {
            let token = sign(&claims);
            let _ = auth.verify(&token);
            let _ = rt.block_on(auth.identify(&token, None));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// What an accepted token promises can be honoured: its `exp` is a NumericDate not yet
/// past (leeway 0 here; jsonwebtoken accepts `exp == now`) and within
/// `MAX_TOKEN_LIFETIME`, the identity expires exactly at that `exp` (a fractional one
/// rounded, as the verifier reads it), and `nbf`, when present, is not in the future.
#[test]
fn an_accepted_token_has_an_honourable_exp_and_no_future_nbf() {
    let Tokens { rt, _dir, auth } = tokens();
    let mut runner = TestRunner::new(cases(3000));
    runner
        .run(&claims(), |claims| {
            let token = sign(&claims);
            let before = now_secs();
            let Ok(identity) = rt.block_on(auth.identify(&token, None)) else {
                return Ok(());
            };
            let after = now_secs();
            // The verifier's reading of a NumericDate: an integer, or a number rounded.
            let exp = claims["exp"]
                .as_u64()
                .or_else(|| claims["exp"].as_f64().map(|f| f.round() as u64));
            prop_assert_eq!(Some(identity.expires_at), exp, "{}", claims);
            prop_assert!(
                identity.expires_at >= before,
                "accepted a past exp: {}",
                claims
            );
            prop_assert!(
                identity.expires_at <= after + changecast::auth::MAX_TOKEN_LIFETIME.as_secs(),
                "accepted an exp past the horizon: {}",
                claims
            );
            if let Some(nbf) = claims.get("nbf") {
                prop_assert!(
                    nbf.as_f64().is_some_and(|n| n.round() <= after as f64),
                    "accepted nbf: {}",
                    claims
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---- config TOML ---------------------------------------------------------------------

/// Names the config knows (so generated documents reach past the first unknown field),
/// and others.
fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "server", "source", "auth", "history", "route", "alert", "publish", "listen",
            "type", "path", "poll_interval", "batch_size", "keepalive", "auth_timeout",
            "send_queue", "send_queue_bytes", "max_connections", "max_connections_per_user",
            "max_client_frame", "jwt_secret", "leeway", "expiry_warning", "user", "claim",
            "lookup", "where", "pick", "max_per_user", "retention", "prune_interval", "name",
            "collection", "on", "to", "when", "message", "cooldown", "many", "api_keys", "uri",
            "database", "json_columns", "fields",
        ])
        .prop_map(String::from),
        1 => "[a-z_]{1,10}",
    ]
}

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        ".{0,20}".prop_map(toml::Value::String),
        prop::sample::select(vec![
            "0s",
            "1ms",
            "5s",
            "100y",
            "300000000000y",
            "-1s",
            "1",
            "$owner",
            "$claim",
            "sqlite",
            "mongodb",
            "127.0.0.1:0",
            "insert",
            "owner._id",
            "doc.x <= ",
            "{{ doc.name }}",
        ])
        .prop_map(|s| toml::Value::String(s.into())),
        any::<i64>().prop_map(toml::Value::Integer),
        prop_oneof![Just(0i64), Just(1), Just(-1), Just(1 << 62), Just(i64::MAX)]
            .prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
    ];
    leaf.prop_recursive(3, 30, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map(config_key(), inner, 0..5)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// Parses and compiles `text`: no panic, and every error names a path and says what is
/// wrong.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    let errors = match Config::parse(text) {
        Ok(config) => match Plan::compile(&config) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        },
        Err(e) => e,
    };
    prop_assert!(!errors.0.is_empty(), "an error without a message");
    for e in &errors.0 {
        prop_assert!(
            !e.path.is_empty() && !e.message.is_empty(),
            "unnamed error {:?} for\n{}",
            e,
            text
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(1000))]

    /// Arbitrary text and arbitrary TOML documents.
    #[test]
    fn arbitrary_config_documents_get_named_errors_not_panics(
        doc in prop::collection::btree_map(config_key(), toml_value(), 0..6),
        text in ".{0,200}",
    ) {
        check_config(&text)?;
        if let Ok(doc) = toml::to_string(&doc.into_iter().collect::<toml::Table>()) {
            check_config(&doc)?;
        }
    }
}

/// One change to a TOML tree: the value at a (random) path replaced, removed, or a new
/// key added beside it.
#[derive(Debug, Clone)]
enum Mutation {
    Replace(toml::Value),
    Remove,
    Add(String, toml::Value),
}

/// Applies `m` at the node reached by following `steps` (indices into keys or items).
fn mutate(node: &mut toml::Value, steps: &[usize], m: Mutation) {
    let (step, rest) = match steps.split_first() {
        Some(s) => s,
        None => {
            if let Mutation::Replace(v) = m {
                *node = v;
            }
            return;
        }
    };
    match node {
        toml::Value::Table(t) if !t.is_empty() => {
            let key = t.keys().nth(step % t.len()).unwrap().clone();
            let deeper = !rest.is_empty()
                && matches!(t[&key], toml::Value::Table(_) | toml::Value::Array(_));
            if deeper {
                return mutate(t.get_mut(&key).unwrap(), rest, m);
            }
            match m {
                Mutation::Replace(v) => {
                    t.insert(key, v);
                }
                Mutation::Remove => {
                    t.remove(&key);
                }
                Mutation::Add(k, v) => {
                    t.insert(k, v);
                }
            }
        }
        toml::Value::Array(a) if !a.is_empty() => {
            let i = step % a.len();
            if rest.is_empty() {
                match m {
                    Mutation::Replace(v) => a[i] = v,
                    Mutation::Remove => {
                        a.remove(i);
                    }
                    Mutation::Add(_, v) => a.push(v),
                }
            } else {
                mutate(&mut a[i], rest, m);
            }
        }
        _ => {}
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => toml_value().prop_map(Mutation::Replace),
        1 => Just(Mutation::Remove),
        1 => (config_key(), toml_value()).prop_map(|(k, v)| Mutation::Add(k, v)),
    ]
}

/// The reference (Mercury) config, each case changed in one to three places.
#[test]
fn mutations_of_the_reference_config_get_named_errors_not_panics() {
    let db = Db::new();
    let reference = db.config("", 100);
    check_config(&reference).unwrap();
    assert!(Plan::compile(&Config::parse(&reference).unwrap()).is_ok());
    let tree: toml::Value = toml::from_str(&reference).unwrap();
    let strategy = prop::collection::vec(
        (prop::collection::vec(any::<usize>(), 1..5), mutation()),
        1..4,
    );
    let mut runner = TestRunner::new(cases(1000));
    runner
        .run(&strategy, |changes| {
            let mut tree = tree.clone();
            for (steps, m) in changes {
                mutate(&mut tree, &steps, m);
            }
            match toml::to_string(&tree) {
                Ok(text) => check_config(&text),
                Err(_) => Ok(()), // not expressible as a TOML document
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---- MongoDB change events -----------------------------------------------------------

/// Field names of change events (so generated ones get past the first check), and others.
fn event_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "_id", "_data", "operationType", "ns", "db", "coll", "documentKey", "fullDocument",
            "fullDocumentBeforeChange", "updateDescription", "updatedFields", "removedFields",
            "wallTime", "clusterTime", "to", "owner",
        ])
        .prop_map(String::from),
        1 => ".{0,8}",
    ]
}

fn bson_value() -> impl Strategy<Value = Bson> {
    let leaf = prop_oneof![
        any::<f64>().prop_map(Bson::Double),
        ".{0,12}".prop_map(Bson::String),
        prop::sample::select(vec![
            "insert",
            "update",
            "replace",
            "delete",
            "invalidate",
            "drop",
            "rename",
            "dropDatabase",
            "orders",
            "b1"
        ])
        .prop_map(|s| Bson::String(s.into())),
        any::<bool>().prop_map(Bson::Boolean),
        Just(Bson::Null),
        any::<i32>().prop_map(Bson::Int32),
        any::<i64>().prop_map(Bson::Int64),
        any::<i64>().prop_map(|ms| Bson::DateTime(bson::DateTime::from_millis(ms))),
        (any::<u32>(), any::<u32>())
            .prop_map(|(time, increment)| Bson::Timestamp(bson::Timestamp { time, increment })),
        any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(ObjectId::from_bytes(b))),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(|bytes| Bson::Binary(bson::Binary {
            subtype: BinarySubtype::Generic,
            bytes,
        })),
        any::<[u8; 16]>().prop_map(|b| Bson::Decimal128(bson::Decimal128::from_bytes(b))),
    ];
    leaf.prop_recursive(3, 30, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Bson::Array),
            prop::collection::btree_map(event_key(), inner, 0..5)
                .prop_map(|m| Bson::Document(m.into_iter().collect())),
        ]
    })
}

/// A well-formed event of each routed kind.
fn good_event(op: &str) -> Document {
    let order = doc! {"_id": "o1", "creator_id": "b1", "status": "paid"};
    let mut event = doc! {
        "_id": {"_data": "826A1B2C3D000000012B"},
        "operationType": op,
        "ns": {"db": "mercury", "coll": "orders"},
        "documentKey": {"_id": "o1"},
        "clusterTime": bson::Timestamp { time: 1_700_000_000, increment: 1 },
    };
    if op != "delete" {
        event.insert("fullDocument", order.clone());
    }
    if op != "insert" {
        event.insert("fullDocumentBeforeChange", order);
    }
    if op == "update" {
        event.insert(
            "updateDescription",
            doc! {"updatedFields": {"status": "paid"}, "removedFields": []},
        );
    }
    event
}

/// The documented shape of a routed change event: what `decode` may turn into a change.
fn assert_change_has_its_shape(event: &Document, decoded: &Decoded) -> Result<(), TestCaseError> {
    let Decoded::Change(change) = decoded else {
        return Ok(());
    };
    prop_assert!(
        event.get_document("_id").is_ok(),
        "no resume token: {}",
        event
    );
    let op = event.get_str("operationType").unwrap_or_default();
    prop_assert!(
        ["insert", "update", "replace", "delete"].contains(&op),
        "{}",
        event
    );
    prop_assert_eq!(
        event
            .get_document("ns")
            .and_then(|ns| ns.get_str("coll"))
            .ok(),
        Some(change.collection.as_str())
    );
    let key = event
        .get_document("documentKey")
        .ok()
        .and_then(|k| k.get("_id"))
        .map(bson_to_json);
    prop_assert!(key.is_some(), "no documentKey._id: {}", event);
    for image in ["fullDocument", "fullDocumentBeforeChange"] {
        prop_assert!(
            matches!(
                event.get(image),
                None | Some(Bson::Null | Bson::Document(_))
            ),
            "{} is not a document: {}",
            image,
            event
        );
    }
    if op == "update" {
        prop_assert!(event.get_document("updateDescription").is_ok());
    }
    Ok(())
}

#[test]
fn well_formed_events_decode_to_their_change() {
    for op in ["insert", "update", "replace", "delete"] {
        let Ok(Decoded::Change(change)) = decode(&good_event(op)) else {
            panic!("{op} decodes to a change");
        };
        assert_eq!(
            (change.collection.as_str(), change.key.as_str()),
            ("orders", "o1")
        );
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    /// Arbitrary documents: no panic; a change only from an event of the documented shape.
    #[test]
    fn arbitrary_event_documents_decode_without_panicking(
        fields in prop::collection::btree_map(event_key(), bson_value(), 0..8),
    ) {
        let event: Document = fields.into_iter().collect();
        let decoded = decode(&event);
        if let Ok(d) = &decoded {
            assert_change_has_its_shape(&event, d)?;
        }
        let _ = bson_to_json(&Bson::Document(event));
    }

    /// A well-formed event with one to three fields replaced, removed or added (at any
    /// depth): no panic; a malformed result is an error, not a change.
    #[test]
    fn mutated_events_are_changes_only_when_well_formed(
        op in prop::sample::select(vec!["insert", "update", "replace", "delete"]),
        changes in prop::collection::vec(
            (prop::collection::vec(any::<usize>(), 1..4), prop_oneof![
                3 => bson_value().prop_map(Some),
                1 => Just(None),
            ], event_key()),
            1..4,
        ),
    ) {
        let mut event = Bson::Document(good_event(op));
        for (steps, value, key) in changes {
            mutate_bson(&mut event, &steps, value, key);
        }
        let Bson::Document(event) = event else { unreachable!() };
        match decode(&event) {
            Ok(d) => assert_change_has_its_shape(&event, &d)?,
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    /// Arbitrary bytes read as BSON, then decoded: no panic.
    #[test]
    fn arbitrary_bytes_as_events_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(event) = Document::from_reader(&mut bytes.as_slice()) {
            let _ = decode(&event);
        }
    }
}

/// Replaces (`Some`), removes (`None`) the value at the path `steps`, or adds `key`
/// beside it when the path ends early.
fn mutate_bson(node: &mut Bson, steps: &[usize], value: Option<Bson>, key: String) {
    let Bson::Document(d) = node else {
        if let (Bson::Array(a), Some((step, rest))) = (&mut *node, steps.split_first())
            && !a.is_empty()
        {
            let i = step % a.len();
            return mutate_bson(&mut a[i], rest, value, key);
        }
        return;
    };
    let Some((step, rest)) = steps.split_first() else {
        return;
    };
    if d.is_empty() {
        if let Some(v) = value {
            d.insert(key, v);
        }
        return;
    }
    let k = d.keys().nth(step % d.len()).unwrap().clone();
    if !rest.is_empty() && matches!(d.get(&k), Some(Bson::Document(_) | Bson::Array(_))) {
        return mutate_bson(d.get_mut(&k).unwrap(), rest, value, key);
    }
    match value {
        Some(v) if rest.is_empty() => {
            d.insert(k, v);
        }
        Some(v) => {
            d.insert(key, v);
        }
        None => {
            d.remove(&k);
        }
    }
}
