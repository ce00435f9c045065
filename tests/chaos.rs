//! Crash and resume: the real `changecast` binary is killed with SIGKILL and restarted
//! several times while an application writes a few thousand changes and clients drop and
//! resume at random. Every client must end with exactly the events addressed to its user,
//! in order, none twice, none missing. Bounded: 1,500 changes, 3 kills, a 120 s deadline.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::{BINARY, Served};
use common::resume::{OnSilent, kill_and_restart, start_clients};
use common::{Db, Ws, token_for};

const CHANGES: usize = 1500;
const KILLS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(120);

/// Every server's log lines, to print when something goes wrong.
static LOG: std::sync::LazyLock<Arc<Mutex<Vec<String>>>> =
    std::sync::LazyLock::new(Default::default);

/// Starts the binary and returns it with the address it listens on.
fn spawn(config: &std::path::Path) -> (Served, SocketAddr) {
    Served::start(
        Command::new(BINARY),
        config,
        Arc::clone(&LOG),
        Duration::from_secs(20),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restarts_and_random_resumes_lose_and_repeat_nothing() {
    let db = Db::new();
    let config_path = db.dir.path().join("changecast.toml");
    std::fs::write(&config_path, db.config("", 5000)).unwrap();
    let started = Instant::now();

    let (server, first) = spawn(&config_path);
    let addr = Arc::new(Mutex::new(Some(first)));
    let users = [("u1", "b1"), ("u2", "b2"), ("u3", "b3")];
    let expected = |b: &str| -> Vec<String> {
        (0..CHANGES)
            .filter(|i| users[i % 3].1 == b)
            .map(|i| format!("o{i}"))
            .collect()
    };
    // Every client is connected (and knows where it started) before the first change.
    let clients = start_clients(
        &users,
        2,
        |b| expected(b).len(),
        &addr,
        started + DEADLINE,
        started + Duration::from_secs(20),
        OnSilent::Panic,
    )
    .await;

    // The application: one writer, each change its own transaction.
    let path = db.path.clone();
    let writer = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        for i in 0..CHANGES {
            let b = users[i % 3].1;
            conn.execute(
                "INSERT INTO orders VALUES (?1, ?2, 'i1', 1, 'pending')",
                rusqlite::params![format!("o{i}"), b],
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    });

    // Kill and restart while it writes.
    let mut server = server;
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(400..900))).await;
        server = kill_and_restart(server, &addr, || spawn(&config_path)).await;
    }
    writer.join().unwrap();

    for (user, business, handle) in clients {
        let got = handle.await.unwrap();
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        let want = expected(business);
        assert_eq!(
            keys.len(),
            want.len(),
            "{user}: {} of {} events",
            keys.len(),
            want.len()
        );
        assert_eq!(
            keys, want,
            "{user}: exactly its events, in order, once each"
        );
        let seqs: Vec<u64> = got
            .iter()
            .map(|(_, id)| id.rsplit_once('-').unwrap().1.parse().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{user}: ids increase");
    }
    server.kill();
    assert!(started.elapsed() < DEADLINE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1012_and_exits_cleanly() {
    let db = Db::new();
    let config_path = db.dir.path().join("changecast.toml");
    std::fs::write(&config_path, db.config("", 100)).unwrap();
    let (mut server, addr) = spawn(&config_path);
    let token = token_for("u1");
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={token}"))
        .await
        .unwrap();
    let mut ws = Ws { socket };
    assert_eq!(ws.next().await["type"], "ready");
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(ws.close_code().await, 1012);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    // It went through the orderly path (clients told, router drained, checkpoint written).
    assert!(LOG.lock().unwrap().iter().any(|l| l.contains("stopping")));
}
