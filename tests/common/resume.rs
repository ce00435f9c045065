//! Clients that survive a gateway being killed and restarted (the crash tests): each
//! connects to whatever server is up, resumes with the last id it saw (never accepting a
//! `gap`), and hangs up by itself at random; and the kill-and-restart step itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::binary::Served;
use super::{Ws, WsEnd, token_for};

/// How long a live connection may stay silent before [`resuming_client`] gives up on it.
const SILENT: Duration = Duration::from_secs(20);

/// The next event, or how the connection ended; a server silent for [`SILENT`] is reported
/// (`Closed(0, "silent")`), not hung on.
pub async fn read(ws: &mut Ws) -> Result<serde_json::Value, WsEnd> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    // One deadline for the whole read: the server's pings must not keep a silent wait alive.
    let deadline = tokio::time::Instant::now() + SILENT;
    loop {
        match tokio::time::timeout_at(deadline, ws.socket.next()).await {
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

/// A WebSocket connection to the gateway at `addr` with `token`, resuming after `since`
/// when given; `None` when it cannot be made within 2 s (the server is down or starting).
pub async fn connect(addr: SocketAddr, token: &str, since: Option<&str>) -> Option<Ws> {
    let mut url = format!("ws://{addr}/v1/ws?token={token}");
    if let Some(id) = since {
        url.push_str(&format!("&since={id}"));
    }
    let connected = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_tungstenite::connect_async(url),
    )
    .await;
    let Ok(Ok((socket, _))) = connected else {
        return None;
    };
    Some(Ws { socket })
}

/// What [`resuming_client`] does when a live connection stays silent.
#[derive(Clone, Copy, Debug)]
pub enum OnSilent {
    /// Fail the test there, naming what it had.
    Panic,
    /// Say so and return what it has: the caller's comparison names what is missing.
    Return,
}

/// One client of `user`: connects to whatever server `addr` names (`None`: none is up),
/// resumes with the last id it saw (never accepting a `gap`), sometimes hangs up by itself,
/// until it has `expected` events or `deadline` passes. Counts its first `ready` in
/// `connected_once`. Returns each event's key and id.
pub async fn resuming_client(
    user: &'static str,
    expected: usize,
    addr: Arc<Mutex<Option<SocketAddr>>>,
    deadline: Instant,
    connected_once: Arc<AtomicUsize>,
    on_silent: OnSilent,
) -> Vec<(String, String)> {
    let mut got: Vec<(String, String)> = Vec::new();
    // Where to resume from: the first `ready`'s position, then each event's id.
    let mut since: Option<String> = None;
    let token = token_for(user);
    while got.len() < expected && Instant::now() < deadline {
        let Some(a) = *addr.lock().unwrap() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Some(mut ws) = connect(a, &token, since.as_deref()).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
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
                        connected_once.fetch_add(1, Ordering::SeqCst);
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
                Err(WsEnd::Closed(0, why)) if why == "silent" => match on_silent {
                    OnSilent::Panic => {
                        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
                        panic!(
                            "{user}: no event for 20 s on a live connection after {} of {expected}; last {:?}; got {keys:?}",
                            got.len(),
                            got.last()
                        );
                    }
                    OnSilent::Return => {
                        eprintln!(
                            "{user}: no event for 20 s on a live connection after {} of {expected}",
                            got.len()
                        );
                        return got;
                    }
                },
                Err(WsEnd::Closed(..)) | Err(WsEnd::Dropped) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
    }
    got
}

/// A started [`resuming_client`]: its user, the user's business, and what it will return.
pub type Client = (
    &'static str,
    &'static str,
    tokio::task::JoinHandle<Vec<(String, String)>>,
);

/// Starts `per_user` [`resuming_client`]s of each `(user, business)`, each expecting
/// `expected(business)` events, and returns once every one has its first `ready` (so knows
/// where it started), failing at `connect_by`.
pub async fn start_clients(
    users: &[(&'static str, &'static str)],
    per_user: usize,
    expected: impl Fn(&str) -> usize,
    addr: &Arc<Mutex<Option<SocketAddr>>>,
    deadline: Instant,
    connect_by: Instant,
    on_silent: OnSilent,
) -> Vec<Client> {
    let connected = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for &(user, business) in users {
        for _ in 0..per_user {
            clients.push((
                user,
                business,
                tokio::spawn(resuming_client(
                    user,
                    expected(business),
                    Arc::clone(addr),
                    deadline,
                    Arc::clone(&connected),
                    on_silent,
                )),
            ));
        }
    }
    while connected.load(Ordering::SeqCst) < clients.len() {
        assert!(Instant::now() < connect_by, "clients did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    clients
}

/// Kills `server` (SIGKILL) with `addr` saying none is up, and after 50-300 ms starts the
/// next one with `spawn` and publishes its address.
pub async fn kill_and_restart(
    server: Served,
    addr: &Mutex<Option<SocketAddr>>,
    spawn: impl FnOnce() -> (Served, SocketAddr),
) -> Served {
    *addr.lock().unwrap() = None;
    server.kill();
    tokio::time::sleep(Duration::from_millis(fastrand::u64(50..300))).await;
    let (server, a) = tokio::task::block_in_place(spawn);
    *addr.lock().unwrap() = Some(a);
    server
}
