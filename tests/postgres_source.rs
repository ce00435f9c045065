//! The PostgreSQL source end to end: a real PostgreSQL server (tests/common/pg.rs, started
//! with `wal_level = logical` on loopback), the real gateway on 127.0.0.1:0, and real
//! WebSocket clients. Each test has a server of its own (slots are server-wide).

mod common;

use std::time::{Duration, Instant};

use common::binary::check;
use common::pg::PgServer;
use common::*;
use serde_json::{Value, json};

/// Users, businesses (owner as jsonb, as Mercury's) and orders; u1 owns b1, u2 owns b2.
const SCHEMA: &str = r#"
CREATE TABLE users (_id text PRIMARY KEY, email text NOT NULL, name text, business_id text);
CREATE TABLE businesses (_id text PRIMARY KEY, name text, owner jsonb);
CREATE TABLE orders (_id text PRIMARY KEY, creator_id text, item_id text, quantity integer, status text);
INSERT INTO users VALUES
  ('u1', 'amina@kanograins.example', 'Amina', 'b1'),
  ('u2', 'tunde@lagosfresh.example', 'Tunde', 'b2');
INSERT INTO businesses VALUES
  ('b1', 'Kano Grains', '{"_id": "u1"}'),
  ('b2', 'Lagos Fresh', '{"_id": "u2"}');
"#;

/// A server with database `db` holding [`SCHEMA`] and `extra` SQL.
fn server(db: &str, extra: &str) -> PgServer {
    let pg = PgServer::start();
    pg.create_db(db);
    pg.psql(db, SCHEMA);
    if !extra.is_empty() {
        pg.psql(db, extra);
    }
    pg
}

/// The gateway's config on `pg`'s database `db` ([`common::pg::gateway_config`]).
fn config(
    pg: &PgServer,
    db: &str,
    source_extra: &str,
    routes: &str,
    history_dir: &std::path::Path,
) -> String {
    common::pg::gateway_config(&pg.url(db), source_extra, routes, history_dir)
}

fn order(id: &str, business: &str) -> String {
    format!("INSERT INTO orders VALUES ('{id}', '{business}', 'i1', 1, 'pending');")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_and_deletes_reach_the_owner_and_no_one_else() {
    let pg = server("crud", "");
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&pg, "crud", "", "", dir.path())).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;

    pg.psql("crud", &order("o1", "b1"));
    let ev = u1.change().await;
    assert_eq!(ev["route"], "orders", "{ev}");
    assert_eq!(ev["op"], "insert");
    assert_eq!(ev["collection"], "orders");
    assert_eq!(ev["key"], "o1");
    assert_eq!(
        ev["doc"],
        json!({"_id": "o1", "creator_id": "b1", "item_id": "i1", "quantity": 1, "status": "pending"})
    );
    assert!(ev["at"].as_str().unwrap().ends_with('Z'), "{ev}");

    pg.psql("crud", "UPDATE orders SET status = 'paid' WHERE _id = 'o1'");
    let ev = u1.change().await;
    assert_eq!(ev["op"], "update");
    assert_eq!(ev["key"], "o1");
    assert_eq!(ev["doc"]["status"], "paid");

    // The delete is routed by the old row (pre_images = "ensure" set REPLICA IDENTITY FULL
    // on `orders`, whose route takes deletes).
    assert_eq!(
        pg.psql(
            "crud",
            "SELECT relreplident FROM pg_class WHERE relname = 'orders'"
        )
        .trim(),
        "f"
    );
    pg.psql("crud", "DELETE FROM orders WHERE _id = 'o1'");
    let ev = u1.change().await;
    assert_eq!(ev["op"], "delete");
    assert_eq!(ev["key"], "o1");
    assert_eq!(
        ev["doc"],
        json!({"_id": "o1", "creator_id": "b1", "item_id": "i1", "quantity": 1, "status": "paid"})
    );

    // u2's next event is its own order: none of u1's reached it.
    pg.psql("crud", &order("o2", "b2"));
    assert_eq!(u2.change().await["key"], "o2");

    // The slot's retained WAL is measured (at start, then every 10 s).
    let metrics = scrape(gw.addr).await;
    let retained = metric(&metrics, "changecast_postgres_slot_retained_wal_bytes", &[]);
    assert!(
        retained.is_some_and(|b| b >= 0.0),
        "retained WAL gauge: {retained:?}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_every_listed_type_convert_and_jsonb_nests() {
    let pg = server(
        "types",
        r#"CREATE TABLE things (
            id integer PRIMARY KEY, owner_id text, n bigint, f double precision, ok boolean,
            price numeric(10, 4), tags text[], nums integer[], data jsonb, j json, u uuid,
            ts timestamp, tstz timestamptz, d date, raw bytea, nothing text)"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let routes = "[[route]]\nname = \"things\"\ncollection = \"things\"\nto = \"$owner_id\"\n";
    let gw = Gateway::start(&config(&pg, "types", "", routes, dir.path())).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql(
        "types",
        r#"INSERT INTO things VALUES (7, 'u1', 9007199254740993, 1.5, true, 12.3400,
            '{a,"b c",NULL}', '{1,2,3}', '{"owner": {"_id": "u1"}, "list": [1, {"x": null}]}',
            '{"k": "v"}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '2026-12-02 10:00:00.5', '2026-12-02 12:00:00.25+02', '2026-12-02',
            '\x00ffa1', NULL)"#,
    );
    let ev = u1.change().await;
    assert_eq!(ev["key"], "7");
    assert_eq!(
        ev["doc"],
        json!({
            "id": 7, "owner_id": "u1", "n": 9007199254740993i64, "f": 1.5, "ok": true,
            "price": "12.3400", "tags": ["a", "b c", null], "nums": [1, 2, 3],
            "data": {"owner": {"_id": "u1"}, "list": [1, {"x": null}]},
            "j": {"k": "v"}, "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "ts": "2026-12-02T10:00:00.5", "tstz": "2026-12-02T10:00:00.25Z",
            "d": "2026-12-02", "raw": "00FFA1", "nothing": null
        })
    );
    // A lookup reads the same row the same way (explain reads the document by key).
    let lookup = changecast::server::open_lookup(
        &changecast::plan::Plan::compile(
            &changecast::config::Config::parse(&config(&pg, "types", "", routes, dir.path()))
                .unwrap(),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let doc = lookup.document("things", "7").await.unwrap().unwrap();
    assert_eq!(doc, ev["doc"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_toasted_value_is_never_sent_as_null() {
    // A value large enough to be stored out of line (TOAST), and badly compressible.
    let pg = server(
        "toast",
        "CREATE TABLE notes (id integer PRIMARY KEY, owner_id text, title text, body text);
         INSERT INTO notes SELECT 1, 'u1', 'first',
           (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 2000) i);",
    );
    let body_len: usize = pg
        .psql("toast", "SELECT length(body) FROM notes")
        .trim()
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // pre_images = "off": the default replica identity, so updates carry no old row.
    let routes = "[[route]]\nname = \"notes\"\ncollection = \"notes\"\non = [\"update\"]\nto = \"$owner_id\"\n";
    let gw = Gateway::start(&config(
        &pg,
        "toast",
        "pre_images = \"off\"",
        routes,
        dir.path(),
    ))
    .await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;

    pg.psql("toast", "UPDATE notes SET title = 'second' WHERE id = 1");
    let ev = u1.change().await;
    assert_eq!(ev["doc"]["title"], "second");
    assert!(
        ev["doc"].as_object().unwrap().get("body").is_none(),
        "no old row to fill it from: left out, not null: {}",
        ev["doc"]
    );

    // With the old row (REPLICA IDENTITY FULL), the unchanged value is filled from it.
    pg.psql("toast", "ALTER TABLE notes REPLICA IDENTITY FULL");
    pg.psql("toast", "UPDATE notes SET title = 'third' WHERE id = 1");
    let ev = u1.change().await;
    assert_eq!(ev["doc"]["title"], "third");
    assert_eq!(
        ev["doc"]["body"].as_str().map(str::len),
        Some(body_len),
        "filled from the old row"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_arrives_together_in_order_with_its_commit_time() {
    let pg = server("txn", "");
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&pg, "txn", "", "", dir.path())).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;

    // Milliseconds, as `at` has them.
    let before = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    pg.psql(
        "txn",
        &format!(
            "BEGIN; {} {} {} UPDATE orders SET quantity = 5 WHERE _id = 't1'; \
             SELECT pg_sleep(0.3); COMMIT;",
            order("t1", "b1"),
            order("t2", "b2"),
            order("t3", "b1")
        ),
    );
    let after = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let events = [u1.change().await, u1.change().await, u1.change().await];
    let keys: Vec<&str> = events.iter().map(|e| e["key"].as_str().unwrap()).collect();
    let ops: Vec<&str> = events.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(keys, ["t1", "t3", "t1"], "in the transaction's order");
    assert_eq!(ops, ["insert", "insert", "update"]);
    assert_eq!(u2.change().await["key"], "t2");
    // One commit time for all, taken at COMMIT (after the 0.3 s sleep, not at BEGIN).
    let at = events[0]["at"].as_str().unwrap();
    assert!(events.iter().all(|e| e["at"] == at), "{events:?}");
    assert!(
        before.as_str() <= at && at <= after.as_str(),
        "{before} <= {at} <= {after}"
    );
    let begun_plus_300ms = humantime::format_rfc3339_millis(
        humantime::parse_rfc3339(&before).unwrap() + Duration::from_millis(300),
    )
    .to_string();
    assert!(at >= begun_plus_300ms.as_str(), "the commit's time: {at}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_changecast_resumes_without_loss_or_repeat() {
    let pg = server("restart", "");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&pg, "restart", "", "", dir.path());

    let gw = Gateway::start(&cfg).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql("restart", &order("r1", "b1"));
    let first = u1.change().await;
    assert_eq!(first["key"], "r1");
    drop(u1);
    gw.stop().await;

    // Written while changecast is down.
    for i in 2..=4 {
        pg.psql("restart", &order(&format!("r{i}"), "b1"));
    }

    let gw = Gateway::start(&cfg).await;
    gw.ready().await;
    let (mut u1, ready_ev) = Ws::user(&gw, "u1", Some(first["id"].as_str().unwrap())).await;
    assert_eq!(ready_ev["resumed"], true, "{ready_ev}");
    // Exactly r2..r4 (no gap, no repeat of r1), then live events.
    for i in 2..=4 {
        let ev: Value = u1.next().await;
        assert_eq!(ev["type"], "change", "{ev}");
        assert_eq!(ev["key"], format!("r{i}"), "{ev}");
    }
    pg.psql("restart", &order("r5", "b1"));
    assert_eq!(u1.change().await["key"], "r5");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_primary_key_is_refused_at_start_naming_it() {
    let pg = server("nopk", "CREATE TABLE events (owner_id text, what text);");
    let dir = tempfile::tempdir().unwrap();
    let routes = "[[route]]\nname = \"events\"\ncollection = \"events\"\nto = \"$owner_id\"\n";
    let plan = changecast::plan::Plan::compile(
        &changecast::config::Config::parse(&config(&pg, "nopk", "", routes, dir.path())).unwrap(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = match changecast::server::start(plan, listener, None).await {
        Ok(_) => panic!("started with a table that has no primary key"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("table `events` has no primary key"), "{err}");
}

/// A client connection of the test's own, as an application's would be.
async fn sql(pg: &PgServer, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.url(db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_recreated_and_clients_get_gap_once() {
    let pg = server("dropped", "");
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&pg, "dropped", "", "", dir.path())).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql("dropped", &order("d1", "b1"));
    assert_eq!(u1.change().await["key"], "d1");

    // Drop the slot under changecast: end its walsender, then drop it before changecast
    // takes it again (retried while it is back in use).
    let admin = sql(&pg, "dropped").await;
    let deadline = Instant::now() + WAIT;
    loop {
        admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = 'changecast' AND active_pid IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        match admin
            .execute("SELECT pg_drop_replication_slot('changecast')", &[])
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "cannot drop the slot: {e:?}"),
        }
    }

    // Clients are told, once; delivery resumes on the new slot.
    let gap = u1.next().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    gw.ready().await;
    pg.psql("dropped", &order("d2", "b1"));
    assert_eq!(u1.change().await["key"], "d2");
    pg.psql("dropped", &order("d3", "b1"));
    assert_eq!(u1.change().await["key"], "d3", "no second gap");
    assert_eq!(
        pg.psql(
            "dropped",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'changecast'"
        )
        .trim(),
        "1"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_postgres_mid_run_loses_and_repeats_nothing() {
    let mut pg = server("crash", "");
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&pg, "crash", "", "", dir.path())).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql("crash", &order("p1", "b1"));
    assert_eq!(u1.change().await["key"], "p1");

    // Committed, then the server dies at once (before changecast may have read it).
    pg.psql("crash", &order("p2", "b1"));
    pg.crash();
    // /readyz says why while the server is away.
    let deadline = Instant::now() + WAIT;
    loop {
        let res = reqwest::get(gw.http("/readyz")).await.unwrap();
        if res.status() != 200 {
            let body = res.text().await.unwrap();
            assert!(body.contains("postgres source"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stayed ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg.restart();
    pg.psql("crash", &order("p3", "b1"));
    for key in ["p2", "p3"] {
        let ev = u1.next().await;
        assert_eq!(ev["type"], "change", "{ev}");
        assert_eq!(ev["key"], key, "{ev}");
    }
    gw.ready().await;
    pg.psql("crash", &order("p4", "b1"));
    assert_eq!(u1.change().await["key"], "p4", "nothing repeated");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_validates_tables_and_columns_against_the_catalog_and_shows_the_slot() {
    let pg = server(
        "checked",
        "CREATE TABLE events (owner_id text, what text);
         CREATE TABLE things (id integer PRIMARY KEY, owner_id text, label text);",
    );
    let dir = tempfile::tempdir().unwrap();
    let bad_routes = "[[route]]\nname = \"events\"\ncollection = \"events\"\nto = \"$owner_id\"\n\n\
                      [[route]]\nname = \"things\"\ncollection = \"things\"\nto = \"$ownerid\"\n";
    let (code, out) = check(config(&pg, "checked", "", bad_routes, dir.path()), &[]).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("error: route[1].collection: table `events` has no primary key"),
        "{out}"
    );
    assert!(
        out.contains("no column `ownerid` in `things`; did you mean `owner_id`?"),
        "{out}"
    );

    let good = config(&pg, "checked", "", "", dir.path());
    let (code, out) = check(good.clone(), &["--connect"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.matches("ok: source.url: wal_level = logical").count(),
        1,
        "--connect checks the catalog once, as plain check does: {out}"
    );
    assert!(
        out.contains("ok: source.pre_images: will set REPLICA IDENTITY FULL on `orders` at start"),
        "{out}"
    );
    assert!(
        out.contains("ok: source.slot: slot `changecast` will be created (pgoutput)"),
        "{out}"
    );

    // Once serve has made it, the slot's retained WAL is a line of its own.
    let gw = Gateway::start(&good).await;
    gw.ready().await;
    gw.stop().await;
    let (code, out) = check(good, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok: source.slot: slot `changecast` retains ")
            && out.contains(" of WAL (not in use)"),
        "{out}"
    );
    assert!(
        out.contains("ok: source.pre_images: `orders` has REPLICA IDENTITY FULL"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_recreated_and_a_resuming_client_gets_gap() {
    let pg = server("lost", "");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&pg, "lost", "", "", dir.path());
    let gw = Gateway::start(&cfg).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql("lost", &order("l1", "b1"));
    let first = u1.change().await;
    drop(u1);
    gw.stop().await;

    // While changecast is down, the server removes WAL the slot still needs.
    pg.psql("lost", "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
    pg.psql("lost", "SELECT pg_reload_conf()");
    for i in 2..=5 {
        pg.psql("lost", &order(&format!("l{i}"), "b1"));
        pg.psql("lost", "SELECT pg_switch_wal()");
    }
    pg.psql("lost", "CHECKPOINT");
    assert_eq!(
        pg.psql(
            "lost",
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'changecast'"
        )
        .trim(),
        "lost"
    );

    let gw = Gateway::start(&cfg).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", Some(first["id"].as_str().unwrap())).await;
    let gap = u1.next().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    pg.psql("lost", &order("l6", "b1"));
    assert_eq!(u1.change().await["key"], "l6");
    assert_eq!(
        pg.psql(
            "lost",
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'changecast'"
        )
        .trim(),
        "reserved"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_manage_assume_a_missing_slot_keeps_readyz_down_until_it_exists() {
    let pg = server("assumed", "ALTER TABLE orders REPLICA IDENTITY FULL;");
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(
        &pg,
        "assumed",
        "manage = \"assume\"",
        "",
        dir.path(),
    ))
    .await;
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let res = reqwest::get(gw.http("/readyz")).await.unwrap();
        let status = res.status();
        let body = res.text().await.unwrap();
        if body.contains("manage = \\\"assume\\\"") || body.contains("manage = \"assume\"") {
            assert_ne!(status, 200);
            break body;
        }
        assert!(Instant::now() < deadline, "no reason on /readyz: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        body.contains("publication `changecast` does not exist"),
        "{body}"
    );
    assert_eq!(
        pg.psql("assumed", "SELECT count(*) FROM pg_publication")
            .trim(),
        "0",
        "assume creates nothing"
    );

    // Once they exist, the retries find them and delivery starts.
    pg.psql(
        "assumed",
        "CREATE PUBLICATION changecast FOR TABLE orders, businesses",
    );
    pg.psql(
        "assumed",
        "SELECT pg_create_logical_replication_slot('changecast', 'pgoutput')",
    );
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql("assumed", &order("a1", "b1"));
    assert_eq!(u1.change().await["key"], "a1");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_unwatched_tables_do_not_pin_the_slots_wal() {
    let pg = server(
        "quiet",
        "CREATE TABLE other (id serial PRIMARY KEY, v text);",
    );
    // Keepalives every half second (wal_sender_timeout / 2) instead of every 30 s.
    pg.psql("quiet", "ALTER SYSTEM SET wal_sender_timeout = '1s'");
    pg.psql("quiet", "SELECT pg_reload_conf()");
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&pg, "quiet", "", "", dir.path())).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    pg.psql("quiet", &order("q1", "b1"));
    assert_eq!(u1.change().await["key"], "q1");

    // Only unwatched writes from here: the slot's confirmed position still moves past
    // them, so the server can recycle their WAL.
    pg.psql(
        "quiet",
        "INSERT INTO other (v) SELECT md5(i::text) FROM generate_series(1, 20000) i",
    );
    let written = pg
        .psql("quiet", "SELECT pg_current_wal_lsn()")
        .trim()
        .to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        let passed = pg.psql(
            "quiet",
            &format!(
                "SELECT confirmed_flush_lsn >= '{written}' FROM pg_replication_slots \
                 WHERE slot_name = 'changecast'"
            ),
        );
        if passed.trim() == "t" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stayed behind {written}: {}",
            pg.psql(
                "quiet",
                "SELECT confirmed_flush_lsn FROM pg_replication_slots"
            )
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Delivery goes on, with nothing in between.
    pg.psql("quiet", &order("q2", "b1"));
    assert_eq!(u1.change().await["key"], "q2");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_moved_between_businesses_tells_both_owners_and_a_new_owner_is_looked_up() {
    let pg = server("moves", "");
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&pg, "moves", "", "", dir.path())).await;
    gw.ready().await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    pg.psql("moves", &order("m1", "b1"));
    assert_eq!(u1.change().await["key"], "m1");

    // The old row (REPLICA IDENTITY FULL) names the old owner, the new row the new one.
    pg.psql(
        "moves",
        "UPDATE orders SET creator_id = 'b2' WHERE _id = 'm1'",
    );
    let old = u1.change().await;
    let new = u2.change().await;
    assert_eq!(old, new);
    assert_eq!(old["doc"]["creator_id"], "b2");

    // b1 changes hands: the cached lookup is invalidated by the change to `businesses`.
    pg.psql(
        "moves",
        r#"UPDATE businesses SET owner = '{"_id": "u2"}' WHERE _id = 'b1'"#,
    );
    pg.psql("moves", &order("m2", "b1"));
    assert_eq!(u2.change().await["key"], "m2");
    // u1's next event would be m2 had the cached old owner been used.
    pg.psql(
        "moves",
        "UPDATE businesses SET owner = '{\"_id\": \"u1\"}' WHERE _id = 'b2'",
    );
    pg.psql("moves", &order("m4", "b2"));
    assert_eq!(u1.change().await["key"], "m4");
    gw.stop().await;
}
