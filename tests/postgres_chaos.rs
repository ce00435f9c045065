//! The PostgreSQL source under failure, against a real server (tests/common/pg.rs) with the
//! example's schema and config (tests/common/backend.rs):
//!
//! - the real `changecast` binary killed with SIGKILL three times while an application
//!   inserts orders in single-row transactions, restarted on the same history and slot:
//!   every client, resuming by `since`, ends with exactly its events, in order, once each;
//! - the slot dropped under a running changecast (its walsender terminated, then
//!   `pg_drop_replication_slot`): connected clients get `gap` once, and what is written
//!   afterwards is delivered;
//! - PostgreSQL itself crashed (SIGQUIT, recovery from the WAL) and restarted while
//!   changecast reads: nothing committed is lost.
//!
//! Bounded: at most 750 changes per test, every wait has a deadline.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::backend::{Backend, PG_DB};
use common::binary::{BINARY, Served};
use common::resume::{OnSilent, kill_and_restart, start_clients};
use common::{Gateway, Ws};

/// The changecast log lines of the binary-based test, printed when it fails.
static LOG: std::sync::LazyLock<Arc<Mutex<Vec<String>>>> =
    std::sync::LazyLock::new(Default::default);

const USERS: [(&str, &str); 3] = [("u1", "b1"), ("u2", "b2"), ("u3", "b3")];

/// A psql script inserting orders `{prefix}{i}` for `i` in `range` (business by index, as
/// [`USERS`]), each in its own transaction, `pause` seconds apart.
fn orders_script(
    dir: &std::path::Path,
    prefix: &str,
    range: std::ops::Range<usize>,
    pause: f64,
) -> std::path::PathBuf {
    let path = dir.join(format!("orders-{prefix}{}.sql", range.start));
    let mut sql = String::new();
    for i in range {
        let b = USERS[i % 3].1;
        sql.push_str(&format!(
            "INSERT INTO orders VALUES ('{prefix}{i}', '{b}', 'i1', 1, 'pending');\n"
        ));
        if pause > 0.0 {
            sql.push_str(&format!("SELECT pg_sleep({pause});\n"));
        }
    }
    std::fs::write(&path, sql).unwrap();
    path
}

/// The keys of `business`'s orders among `{prefix}{range}`.
fn expected(prefix: &str, range: std::ops::Range<usize>, business: &str) -> Vec<String> {
    range
        .filter(|i| USERS[i % 3].1 == business)
        .map(|i| format!("{prefix}{i}"))
        .collect()
}

/// `changecast_rule_skips_total{rule="route",name="orders",reason="lookup_failed"}` in
/// `metrics`.
fn lookup_failed_skips(metrics: &str) -> f64 {
    common::counter(
        metrics,
        "changecast_rule_skips_total",
        &[
            ("rule", "route"),
            ("name", "orders"),
            ("reason", "lookup_failed"),
        ],
    )
}

/// Exactly `want`, in order, once each, with increasing ids.
fn assert_exactly(user: &str, got: &[(String, String)], want: &[String]) {
    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !keys.contains(&w.as_str()))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let repeated: Vec<&&str> = keys.iter().filter(|k| !seen.insert(**k)).collect();
    assert!(
        missing.is_empty() && repeated.is_empty(),
        "{user}: {} of {} events; missing {missing:?}; repeated {repeated:?}",
        keys.len(),
        want.len()
    );
    assert_eq!(
        keys, want,
        "{user}: exactly its events, in order, once each"
    );
    let seqs: Vec<u64> = got.iter().map(|(_, id)| common::id_parts(id).1).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{user}: ids increase");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_write_and_restart_lose_and_repeat_nothing() {
    const CHANGES: usize = 750;
    const KILLS: usize = 3;
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut b = Backend::postgres();
    let config_path = b.dir().join("changecast.toml");
    std::fs::write(&config_path, b.config()).unwrap();
    let spawn = || {
        Served::start(
            Command::new(BINARY),
            &config_path,
            Arc::clone(&LOG),
            Duration::from_secs(30),
        )
    };

    let (server, first) = spawn();
    let addr = Arc::new(Mutex::new(Some(first)));
    // Every client knows where it started before the first change.
    let clients = start_clients(
        &USERS,
        2,
        |b| expected("o", 0..CHANGES, b).len(),
        &addr,
        deadline,
        deadline,
        OnSilent::Return,
    )
    .await;

    // The application: one psql session, each insert its own transaction.
    let script = orders_script(b.dir(), "o", 0..CHANGES, 0.004);
    let mut writer = b.pg().psql_command(PG_DB);
    writer.arg("-f").arg(&script);
    let writer = std::thread::spawn(move || writer.output().expect("runs psql"));

    let mut server = server;
    let mut mid_write = 0;
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(400..900))).await;
        mid_write += usize::from(!writer.is_finished());
        server = kill_and_restart(server, &addr, spawn).await;
    }
    assert!(mid_write > 0, "no kill came while the writer wrote");
    let out = tokio::task::block_in_place(|| writer.join().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = b.query_one("SELECT count(*) FROM orders");
    assert_eq!(written, CHANGES.to_string());

    for (user, business, handle) in clients {
        let got = handle.await.unwrap();
        if got.len() != expected("o", 0..CHANGES, business).len() {
            eprintln!("--- changecast log (last 40) ---");
            let log = LOG.lock().unwrap();
            for line in &log[log.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
        assert_exactly(user, &got, &expected("o", 0..CHANGES, business));
    }
    server.kill();
}

/// Terminates the walsender of slot `changecast` and drops the slot, retrying while
/// changecast reconnects to it (bounded).
fn drop_the_slot(b: &mut Backend) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = b.pg().try_psql(
            PG_DB,
            "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots \
             WHERE slot_name = 'changecast' AND active_pid IS NOT NULL; \
             SELECT pg_drop_replication_slot('changecast');",
        );
        match attempt {
            Ok(_) => return,
            Err(e) if e.contains("is active") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(fastrand::u64(5..50)));
            }
            Err(e) => panic!("cannot drop the slot: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_gives_connected_clients_one_gap_and_delivery_resumes() {
    // The crash test measures a process-wide counter that this test's gateway also keeps.
    let _metrics = common::metrics_lock().await;
    let mut b = Backend::postgres();
    let gw = Gateway::start(&b.config()).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    b.exec("INSERT INTO orders VALUES ('before', 'b1', 'i1', 1, 'pending');");
    assert_eq!(u1.change().await["key"], "before");

    tokio::task::block_in_place(|| drop_the_slot(&mut b));
    for ws in [&mut u1, &mut u2] {
        let gap = ws.next().await;
        assert_eq!(gap["type"], "gap", "{gap}");
    }

    // Written after the gap: delivered, with no second gap before or between them.
    for round in 0..3 {
        b.exec(&format!(
            "INSERT INTO orders VALUES ('a{round}', 'b1', 'i1', 1, 'pending');
             INSERT INTO orders VALUES ('c{round}', 'b2', 'i1', 1, 'pending');"
        ));
        let ev = u1.next().await;
        assert_eq!(
            (ev["type"].as_str(), ev["key"].as_str()),
            (Some("change"), Some(&*format!("a{round}"))),
            "{ev}"
        );
        let ev = u2.next().await;
        assert_eq!(
            (ev["type"].as_str(), ev["key"].as_str()),
            (Some("change"), Some(&*format!("c{round}"))),
            "{ev}"
        );
    }
    // The slot is back, and changecast reads it.
    assert_eq!(
        b.query_one("SELECT active FROM pg_replication_slots WHERE slot_name = 'changecast'"),
        "t"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_and_restart_mid_run_loses_nothing() {
    const PER_PHASE: usize = 300;
    let _metrics = common::metrics_lock().await;
    let mut b = Backend::postgres();
    let gw = Gateway::start(&b.config()).await;
    let skipped_before = lookup_failed_skips(&common::scrape(gw.addr).await);
    let deadline = Instant::now() + Duration::from_secs(90);
    let addr = Arc::new(Mutex::new(Some(gw.addr)));
    let clients = start_clients(
        &USERS,
        1,
        |b| expected("p", 0..2 * PER_PHASE, b).len(),
        &addr,
        deadline,
        deadline,
        OnSilent::Return,
    )
    .await;

    // Committed as fast as psql goes, then the crash while changecast still reads them.
    let first = orders_script(b.dir(), "p", 0..PER_PHASE, 0.0);
    tokio::task::block_in_place(|| b.pg().psql_file(PG_DB, &first));
    tokio::task::block_in_place(|| b.pg().restart());
    // And more after the restart.
    let second = orders_script(b.dir(), "p", PER_PHASE..2 * PER_PHASE, 0.0);
    tokio::task::block_in_place(|| b.pg().psql_file(PG_DB, &second));

    let mut results = Vec::new();
    for (user, business, handle) in clients {
        results.push((user, business, handle.await.unwrap()));
    }
    assert_eq!(
        lookup_failed_skips(&common::scrape(gw.addr).await) - skipped_before,
        0.0,
        "deliveries skipped because a lookup failed while PostgreSQL was down"
    );
    for (user, business, got) in results {
        assert_exactly(user, &got, &expected("p", 0..2 * PER_PHASE, business));
    }
    gw.stop().await;
}

/// The lookup connections ended by the server (`pg_terminate_backend`, as an administrator or
/// a failover does) while PostgreSQL stays up: the next lookup is made on a new connection,
/// and its delivery is not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_connection_ended_by_the_server_is_reopened_and_nothing_is_skipped() {
    let _metrics = common::metrics_lock().await;
    let b = Backend::postgres();
    let gw = Gateway::start(&b.config()).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u3, _) = Ws::user(&gw, "u3", None).await;
    let before = lookup_failed_skips(&common::scrape(gw.addr).await);
    // b3's cached owner is invalidated; b1's order after it shows the router is past it.
    b.exec("UPDATE businesses SET name = 'Abuja Mart' WHERE _id = 'b3';");
    b.exec("INSERT INTO orders VALUES ('k1', 'b1', 'i1', 1, 'pending');");
    assert_eq!(u1.change().await["key"], "k1");
    // Every ordinary backend but this one: the lookup connections (not the walsender).
    let ended = b.query_one(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity \
         WHERE datname = 'mercury' AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
    );
    assert_ne!(ended, "0", "changecast had lookup connections open");
    b.exec("INSERT INTO orders VALUES ('k3', 'b3', 'i1', 1, 'pending');");
    let ev = u3.next().await;
    assert_eq!(ev["key"], "k3", "{ev}");
    assert_eq!(
        lookup_failed_skips(&common::scrape(gw.addr).await) - before,
        0.0
    );
    gw.stop().await;
}
