//! A loopback TCP proxy in front of a NATS server, to cut one node off from NATS without
//! root or network namespaces. In: connections to [`Proxy::addr`]; out: the same bytes to
//! the upstream address, both ways.
//!
//! [`Proxy::cut`] is a silent partition, as a real one is: existing connections stay open
//! but no byte moves in either direction, and new connections are accepted but never
//! forwarded — no FIN, no RST, so the client learns of it only by its own timeouts.
//! [`Proxy::restore`] closes every connection held during the cut (the client reconnects)
//! and forwards again. Everything stops when the proxy is dropped.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What every connection obeys; changed by `cut`, `restore` and drop.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Mode {
    /// No byte is forwarded.
    cut: bool,
    /// Bumped by `restore`: connections from an earlier generation close.
    generation: u64,
    /// The proxy was dropped: every connection closes.
    closed: bool,
}

pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode {
            cut: false,
            generation: 0,
            closed: false,
        });
        let accept_mode = mode.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = accept_mode.subscribe();
                tokio::spawn(connection(client, upstream, rx));
            }
        });
        Proxy { addr, mode, accept }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nats://` + [`Proxy::addr`].
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Stops forwarding, silently, on every connection, old and new.
    pub fn cut(&self) {
        self.mode.send_modify(|m| m.cut = true);
    }

    /// Closes the connections held during the cut and forwards new ones again.
    pub fn restore(&self) {
        self.mode.send_modify(|m| {
            m.cut = false;
            m.generation += 1;
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.mode.send_modify(|m| m.closed = true);
    }
}

/// One proxied connection, from accept until either side closes, the proxy is restored
/// (if it began before or during a cut) or dropped.
async fn connection(client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<Mode>) {
    let generation = rx.borrow_and_update().generation;
    // Accepted during a cut: held, never forwarded, until the cut ends.
    loop {
        let m = *rx.borrow_and_update();
        if m.closed || m.generation != generation {
            return;
        }
        if !m.cut {
            break;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Whichever direction ends first ends the connection: both halves are dropped.
    tokio::select! {
        _ = pump(client_read, server_write, rx.clone(), generation) => {}
        _ = pump(server_read, client_write, rx, generation) => {}
    }
}

/// Copies bytes one way while the mode allows it.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut rx: watch::Receiver<Mode>,
    generation: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let m = *rx.borrow_and_update();
        if m.closed || m.generation != generation {
            return;
        }
        if m.cut {
            // Not reading: the bytes wait in the kernel, as behind a dead link.
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // Read just as the cut began: held, and dropped with the connection.
                if rx.borrow().cut {
                    continue;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
