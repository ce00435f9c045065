//! The log of a server process a test runs (PostgreSQL, nats-server): its stderr drained by
//! a thread into lines, so the server never blocks on a full pipe; the start waited on until
//! the server says it is ready and accepts connections; the last lines printed when a test
//! fails.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::ChildStderr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every log line of every run of one server.
pub type Log = Arc<Mutex<Vec<String>>>;

/// The last `n` lines of `log`.
pub fn tail(log: &Mutex<Vec<String>>, n: usize) -> String {
    let log = log.lock().unwrap();
    log[log.len().saturating_sub(n)..].join("\n")
}

/// Drains `stderr` into `log` on a thread, then waits until a line contains `ready_line`
/// (within `within`) and `addr` accepts TCP connections (within `within` more). `name`
/// says which server in the panic, with the log's last lines, when it does not.
pub fn drain_until_ready(
    name: &str,
    stderr: ChildStderr,
    log: &Log,
    ready_line: &'static str,
    addr: SocketAddr,
    within: Duration,
) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let lines = Arc::clone(log);
    // Drained to the end, so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(ready_line) {
                let _ = ready_tx.send(());
            }
            lines.lock().unwrap().push(line);
        }
    });
    if ready_rx.recv_timeout(within).is_err() {
        panic!(
            "{name} did not become ready within {within:?}:\n{}",
            tail(log, 50)
        );
    }
    // The ready line may come before the listener: check it accepts all the same.
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < within,
            "{name} said it was ready but refuses connections:\n{}",
            tail(log, 50)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Prints `name`'s last 30 log lines when the thread is panicking (a failing test).
pub fn print_if_panicking(name: &str, log: &Mutex<Vec<String>>) {
    if std::thread::panicking() {
        eprintln!("--- {name} log (last 30 lines) ---\n{}", tail(log, 30));
    }
}
