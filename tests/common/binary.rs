//! The real `changecast` binary as a child process: `serve --config FILE` with JSON logs,
//! the address it listens on (read from its log, since it binds port 0), and every log
//! line it writes, kept for the test to inspect or print.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_changecast");

/// A running `changecast serve`; killed when dropped, so a failing test never leaves a
/// server running.
pub struct Served {
    pub child: Child,
}

impl Served {
    /// Runs `command` (the [`BINARY`] itself, or a wrapper such as `prlimit` whose last
    /// argument is the binary) with `--log-format json serve --config config`, and waits up
    /// to `within` for its "changecast listening" line. Every stderr line is appended to
    /// `log`, which is also printed if it never starts.
    pub fn start(
        mut command: Command,
        config: &Path,
        log: Arc<Mutex<Vec<String>>>,
        within: Duration,
    ) -> (Served, SocketAddr) {
        let mut child = command
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "changecast=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining the log so the child never blocks on a full pipe.
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && line.contains("changecast listening") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let addr: SocketAddr = v["fields"]["addr"].as_str().unwrap().parse().unwrap();
                    let _ = tx.send(addr);
                    sent = true;
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(within).unwrap_or_else(|_| {
            panic!(
                "the server did not start:\n{}",
                log.lock().unwrap().join("\n")
            )
        });
        (Served { child }, addr)
    }

    /// SIGKILL: no shutdown, no last checkpoint, mid-write.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Served {
    /// A no-op once it exited.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `changecast check ARGS --config FILE` on `config` (written to a temporary `FILE`)
/// in a blocking thread, within 60 s. Returns the exit code (-1: ended by a signal) and
/// stdout followed by stderr.
pub async fn check(config: String, args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("changecast.toml");
    std::fs::write(&file, config).unwrap();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            Command::new(BINARY)
                .arg("check")
                .args(&args)
                .arg("--config")
                .arg(&file)
                .output()
                .expect("the binary runs")
        }),
    )
    .await
    .expect("check finishes in time")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}
