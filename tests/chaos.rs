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
use common::{Db, Ws, WsEnd, token_for};

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

/// The next event, or how the connection ended; a silent server is reported, not hung on.
async fn read(ws: &mut Ws) -> Result<serde_json::Value, WsEnd> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    // One deadline for the whole read: the server's pings must not keep a silent wait alive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.socket.next()).await;
        match msg {
            Err(_) => return Err(WsEnd::Closed(0, "silent".into())),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(f)))) => {
                return Err(WsEnd::Closed(
                    f.map(|f| u16::from(f.code)).unwrap_or(0),
                    String::new(),
                ));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return Err(WsEnd::Dropped),
        }
    }
}

/// One client: connects to whatever server is up, resumes with the last id it saw,
/// sometimes hangs up by itself, until it has `expected` events or the deadline passes.
async fn client(
    user: &'static str,
    expected: usize,
    addr: Arc<Mutex<Option<SocketAddr>>>,
    started: Instant,
    connected_once: Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<(String, String)> {
    let mut got: Vec<(String, String)> = Vec::new();
    // Where to resume from: the first `ready`'s position, then each event's id.
    let mut since: Option<String> = None;
    let token = token_for(user);
    while got.len() < expected && started.elapsed() < DEADLINE {
        let Some(a) = *addr.lock().unwrap() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut url = format!("ws://{a}/v1/ws?token={token}");
        if let Some(id) = &since {
            url.push_str(&format!("&since={id}"));
        }
        let connected = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url),
        )
        .await;
        let Ok(Ok((socket, _))) = connected else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut ws = Ws { socket };
        match read(&mut ws).await {
            Ok(ready) => {
                assert_eq!(ready["type"], "ready", "{user}: {ready}");
                match &since {
                    Some(_) => assert_eq!(
                        ready["resumed"], true,
                        "{user} was sent a gap: events were lost ({ready})"
                    ),
                    None => {
                        since = Some(ready["position"].as_str().unwrap().to_owned());
                        connected_once.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
            Err(_) => continue,
        }
        loop {
            match read(&mut ws).await {
                Ok(ev) => {
                    assert_eq!(ev["type"], "change", "{user}: {ev}");
                    got.push((
                        ev["key"].as_str().unwrap().to_owned(),
                        ev["id"].as_str().unwrap().to_owned(),
                    ));
                    since = Some(ev["id"].as_str().unwrap().to_owned());
                    if got.len() >= expected {
                        break;
                    }
                    if fastrand::u32(0..150) == 0 {
                        break; // hang up by itself, resume later
                    }
                }
                Err(WsEnd::Closed(0, why)) if why == "silent" => {
                    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
                    panic!(
                        "{user}: no event for 20 s on a live connection after {} of {expected}; last {:?}; got {keys:?}",
                        got.len(),
                        got.last()
                    );
                }
                Err(WsEnd::Closed(..)) | Err(WsEnd::Dropped) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
    }
    got
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
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for (user, business) in users {
        for _ in 0..2 {
            clients.push((
                user,
                business,
                tokio::spawn(client(
                    user,
                    expected(business).len(),
                    Arc::clone(&addr),
                    started,
                    Arc::clone(&connected),
                )),
            ));
        }
    }

    // Every client is connected (and knows where it started) before the first change.
    while connected.load(std::sync::atomic::Ordering::SeqCst) < clients.len() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "clients did not connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

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
        *addr.lock().unwrap() = None;
        server.kill();
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..300))).await;
        let (s, a) = spawn(&config_path);
        server = s;
        *addr.lock().unwrap() = Some(a);
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
