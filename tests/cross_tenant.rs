//! Cross-tenant property (issue 11, "Keep it fixed"): for random businesses, users,
//! ownership moves and writer transactions, every client receives exactly the events whose
//! audience contained it as of the change — zero foreign, zero missing, in stream order.
//!
//! Each case runs the real server on a real SQLite file with one real WebSocket client per
//! user. A model replays the script to compute each user's expected events; the writer
//! commits the script transaction by transaction while the router runs. Then every user's
//! own marker order (in a business only that user ever owns) is written last: each client
//! reads until its marker, so nothing foreign or missing can hide after the expected ones.
//! Bounded: 4 cases of at most 6 transactions of at most 12 writes; every read waits at
//! most `common::WAIT`. Run more cases with `PROPTEST_CASES=64`.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use serde_json::{Map, json};

/// One write of the script. Indices are taken modulo what exists when it runs.
#[derive(Debug, Clone)]
enum Write {
    /// A new order in business `biz`.
    Insert { biz: usize },
    /// An order moves to business `biz` (or stays, when it is the same), with a new status.
    Move { order: usize, biz: usize },
    /// An order's status changes.
    Touch { order: usize },
    /// An order is deleted.
    Delete { order: usize },
    /// Business `biz` gets owner `user`.
    Own { biz: usize, user: usize },
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        4 => (0..8usize).prop_map(|biz| Write::Insert { biz }),
        2 => (0..64usize, 0..8usize).prop_map(|(order, biz)| Write::Move { order, biz }),
        1 => (0..64usize).prop_map(|order| Write::Touch { order }),
        1 => (0..64usize).prop_map(|order| Write::Delete { order }),
        3 => (0..8usize, 0..8usize).prop_map(|(biz, user)| Write::Own { biz, user }),
    ]
}

#[derive(Debug, Clone)]
struct Script {
    users: usize,
    /// Initial owner of each business (an index into users).
    owners: Vec<usize>,
    /// Transactions, committed one after another.
    transactions: Vec<Vec<Write>>,
}

fn script() -> impl Strategy<Value = Script> {
    (2..=4usize, 2..=4usize).prop_flat_map(|(users, businesses)| {
        (
            Just(users),
            proptest::collection::vec(0..users, businesses),
            proptest::collection::vec(proptest::collection::vec(write(), 1..=12), 2..=6),
        )
            .prop_map(|(users, owners, transactions)| Script {
                users,
                owners,
                transactions,
            })
    })
}

/// An event as a client sees it: key, op, the document's status.
type Seen = (String, String, String);

fn user(u: usize) -> String {
    format!("p{u}")
}

fn email(u: usize) -> String {
    format!("p{u}@prop.example")
}

fn owner_json(u: usize) -> String {
    format!("{{\"_id\": \"{}\"}}", user(u))
}

/// The SQL of each transaction, and each user's expected events, from replaying the script.
fn replay(s: &Script) -> (Vec<String>, BTreeMap<usize, Vec<Seen>>) {
    let nb = s.owners.len();
    let mut owner = s.owners.clone();
    // Live orders: key → (business, status), in creation order.
    let mut orders: Vec<(String, usize, String)> = Vec::new();
    let mut expected: BTreeMap<usize, Vec<Seen>> = (0..s.users).map(|u| (u, vec![])).collect();
    let mut n = 0;
    let mut sql = Vec::new();
    for tx in &s.transactions {
        let mut t = String::from("BEGIN;");
        for w in tx {
            n += 1;
            let status = format!("s{n}");
            match *w {
                Write::Insert { biz } => {
                    let (key, biz) = (format!("o{n}"), biz % nb);
                    t.push_str(&format!(
                        "INSERT INTO orders VALUES ('{key}', 'pb{biz}', 'i1', 1, '{status}');"
                    ));
                    expected.get_mut(&owner[biz]).unwrap().push((
                        key.clone(),
                        "insert".into(),
                        status.clone(),
                    ));
                    orders.push((key, biz, status));
                }
                Write::Move { order, .. } | Write::Touch { order } | Write::Delete { order }
                    if orders.is_empty() =>
                {
                    let _ = order; // nothing to change yet
                }
                Write::Move { order, biz } => {
                    let i = order % orders.len();
                    let (key, old, _) = orders[i].clone();
                    let biz = biz % nb;
                    t.push_str(&format!(
                        "UPDATE orders SET creator_id = 'pb{biz}', status = '{status}' \
                         WHERE _id = '{key}';"
                    ));
                    // The new business's owner, and the old one's when it moved.
                    let mut audience = vec![owner[biz]];
                    if old != biz {
                        audience.push(owner[old]);
                    }
                    audience.sort();
                    audience.dedup();
                    for u in audience {
                        expected.get_mut(&u).unwrap().push((
                            key.clone(),
                            "update".into(),
                            status.clone(),
                        ));
                    }
                    orders[i] = (key, biz, status);
                }
                Write::Touch { order } => {
                    let i = order % orders.len();
                    let (key, biz, _) = orders[i].clone();
                    t.push_str(&format!(
                        "UPDATE orders SET status = '{status}' WHERE _id = '{key}';"
                    ));
                    expected.get_mut(&owner[biz]).unwrap().push((
                        key.clone(),
                        "update".into(),
                        status.clone(),
                    ));
                    orders[i] = (key, biz, status);
                }
                Write::Delete { order } => {
                    let i = order % orders.len();
                    let (key, biz, before) = orders.remove(i);
                    t.push_str(&format!("DELETE FROM orders WHERE _id = '{key}';"));
                    // Routed by the pre-image: its status is the order's last one.
                    expected
                        .get_mut(&owner[biz])
                        .unwrap()
                        .push((key, "delete".into(), before));
                }
                Write::Own { biz, user: u } => {
                    let (biz, u) = (biz % nb, u % s.users);
                    t.push_str(&format!(
                        "UPDATE businesses SET owner = '{}' WHERE _id = 'pb{biz}';",
                        owner_json(u)
                    ));
                    owner[biz] = u;
                }
            }
        }
        t.push_str("COMMIT;");
        sql.push(t);
    }
    (sql, expected)
}

async fn connect(gw: &Gateway, u: usize) -> Ws {
    let mut claims = Map::new();
    claims.insert("user_id".into(), json!(email(u)));
    let token = changecast::auth::mint(SECRET.as_bytes(), &email(u), 600, &claims);
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={token}"))).await;
    let ready = ws.next().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert_eq!(ready["user"], user(u));
    ws
}

async fn run(s: Script) {
    let db = Db::new();
    let mut seed = String::from("BEGIN;");
    for u in 0..s.users {
        seed.push_str(&format!(
            "INSERT INTO users VALUES ('{}', '{}', 'P', 'm{u}');",
            user(u),
            email(u)
        ));
        // The user's marker business: only ever theirs.
        seed.push_str(&format!(
            "INSERT INTO businesses VALUES ('m{u}', 'M', '{}');",
            owner_json(u)
        ));
    }
    for (b, u) in s.owners.iter().enumerate() {
        seed.push_str(&format!(
            "INSERT INTO businesses VALUES ('pb{b}', 'B', '{}');",
            owner_json(*u)
        ));
    }
    seed.push_str("COMMIT;");
    db.exec(&seed);

    let gw = Gateway::start(&db.config("send_queue = 1000", 1000)).await;
    let mut clients = Vec::new();
    for u in 0..s.users {
        clients.push(connect(&gw, u).await);
    }
    let (transactions, expected) = replay(&s);
    for t in &transactions {
        db.exec(t);
    }
    let mut markers = String::new();
    for u in 0..s.users {
        markers.push_str(&format!(
            "INSERT INTO orders VALUES ('marker-{u}', 'm{u}', 'i1', 1, 'end');"
        ));
    }
    db.exec(&markers);

    for (u, ws) in clients.iter_mut().enumerate() {
        let mut got: Vec<Seen> = Vec::new();
        loop {
            let ev = ws.next().await;
            assert_eq!(ev["type"], "change", "user {u}: {ev}");
            let key = ev["key"].as_str().unwrap_or_default().to_string();
            if key == format!("marker-{u}") {
                break;
            }
            got.push((
                key,
                ev["op"].as_str().unwrap_or_default().into(),
                ev["doc"]["status"].as_str().unwrap_or_default().into(),
            ));
            assert!(
                got.len() <= expected[&u].len(),
                "user {u} received more than expected: {got:?}\nexpected {:?}\nscript {s:?}",
                expected[&u]
            );
        }
        assert_eq!(got, expected[&u], "user {u}; script {s:?}");
    }
    gw.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_client_gets_exactly_the_events_its_user_was_in_the_audience_of(s in script()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(s));
    }
}
