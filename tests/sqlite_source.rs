//! The SQLite source on a real database file: triggers, tailing, checkpoints, pruning.

mod common;

use std::time::Duration;

use changecast::change::{Change, Op, Position};
use changecast::config::SqliteSourceConfig;
use changecast::source::sqlite::SqliteSource;
use changecast::source::{Batch, Source};
use common::{Db, WAIT, insert_order};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

fn config(db: &Db) -> SqliteSourceConfig {
    SqliteSourceConfig {
        path: db.path.clone(),
        poll_interval: Duration::from_millis(2),
        batch_size: 3,
    }
}

/// A running source with the test in the router's seat.
struct Tail {
    rx: mpsc::Receiver<Batch>,
    acks: watch::Sender<Option<Position>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), changecast::source::SourceError>>,
}

impl Tail {
    fn start(db: &Db, tables: &[&str]) -> Tail {
        let tables: Vec<String> = tables.iter().map(|s| s.to_string()).collect();
        let source = SqliteSource::open(&config(db), &tables, None).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let (acks, ack_rx) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let health = std::sync::Arc::new(changecast::source::Health::default());
        let task = tokio::spawn(Box::new(source).run(tx, ack_rx, health, shutdown.clone()));
        Tail {
            rx,
            acks,
            shutdown,
            task,
        }
    }

    /// Receives changes until `n` have arrived; acknowledges each batch when `ack`.
    async fn take(&mut self, n: usize, ack: bool) -> Vec<Change> {
        let mut out = Vec::new();
        while out.len() < n {
            let batch = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("changes arrive in time")
                .expect("source running");
            out.extend(batch.changes);
            if ack {
                self.acks.send_replace(Some(batch.end));
            }
        }
        assert_eq!(out.len(), n, "no more than asked for");
        out
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let Tail {
            mut rx, acks, task, ..
        } = self;
        // Drain like the router does, then hang up.
        while rx.recv().await.is_some() {}
        drop(acks);
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn keys(changes: &[Change]) -> Vec<&str> {
    changes.iter().map(|c| c.key.as_str()).collect()
}

fn log_rows(db: &Db) -> i64 {
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    conn.query_row("SELECT COUNT(*) FROM _changecast_log", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sees_writes_of_other_processes_with_both_images() {
    let db = Db::new();
    let mut tail = Tail::start(&db, &["orders"]);
    db.exec_in_other_process(&insert_order("o1", "b1"));
    db.exec_in_other_process("UPDATE orders SET status = 'paid' WHERE _id = 'o1';");
    db.exec_in_other_process("DELETE FROM orders WHERE _id = 'o1';");
    let changes = tail.take(3, true).await;
    let ops: Vec<Op> = changes.iter().map(|c| c.op).collect();
    assert_eq!(ops, vec![Op::Insert, Op::Update, Op::Delete]);
    assert_eq!(changes[1].before.as_ref().unwrap()["status"], "pending");
    assert_eq!(changes[1].after.as_ref().unwrap()["status"], "paid");
    assert_eq!(
        changes[1].updated_fields.as_deref(),
        Some(&["status".to_string()][..])
    );
    assert_eq!(changes[2].before.as_ref().unwrap()["_id"], "o1");
    assert!(changes[2].after.is_none());
    let seqs: Vec<u64> = changes
        .iter()
        .map(|c| c.position.as_seq().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    tail.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_after_the_checkpoint_and_prunes_the_log() {
    let db = Db::new();
    let mut tail = Tail::start(&db, &["orders"]);
    for i in 1..=5 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
    }
    assert_eq!(
        keys(&tail.take(5, true).await),
        vec!["o1", "o2", "o3", "o4", "o5"]
    );
    tail.stop().await;
    assert_eq!(log_rows(&db), 0, "the log behind the checkpoint is pruned");

    db.exec(&insert_order("o6", "b1"));
    db.exec(&insert_order("o7", "b1"));
    let mut tail = Tail::start(&db, &["orders"]);
    assert_eq!(
        keys(&tail.take(2, true).await),
        vec!["o6", "o7"],
        "nothing lost, nothing repeated"
    );
    tail.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_not_acknowledged_are_read_again_after_a_restart() {
    let db = Db::new();
    let mut tail = Tail::start(&db, &["orders"]);
    // One transaction, so the source sees all four at once whenever it looks.
    let inserts: String = (1..=4)
        .map(|i| insert_order(&format!("o{i}"), "b1"))
        .collect();
    db.exec(&format!("BEGIN;{inserts}COMMIT;"));
    // batch_size is 3: acknowledge only the first batch.
    let first = tokio::time::timeout(WAIT, tail.rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(keys(&first.changes), vec!["o1", "o2", "o3"]);
    tail.acks.send_replace(Some(first.end));
    let second = tokio::time::timeout(WAIT, tail.rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(keys(&second.changes), vec!["o4"]);
    // Stop without acknowledging the second batch (as if the process died after reading).
    tail.shutdown.cancel();
    let Tail {
        mut rx, acks, task, ..
    } = tail;
    while rx.recv().await.is_some() {}
    drop(acks);
    task.await.unwrap().unwrap();

    let mut tail = Tail::start(&db, &["orders"]);
    assert_eq!(keys(&tail.take(1, true).await), vec!["o4"]);
    tail.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_never_fail_the_applications_write() {
    let db = Db::new();
    db.exec("CREATE TABLE files (id INTEGER PRIMARY KEY, owner TEXT, data BLOB, meta TEXT);");
    let mut tail = Tail::start(&db, &["files"]);
    db.exec("INSERT INTO files VALUES (1, 'u1', x'00FF10', '{\"tags\": [\"a\"]}');");
    let c = &tail.take(1, true).await[0];
    let after = c.after.as_ref().unwrap();
    assert_eq!(after["data"], "00FF10", "BLOBs are carried as hex");
    assert_eq!(
        after["meta"]["tags"][0], "a",
        "JSON text columns are nested documents"
    );
    assert_eq!(c.key, "1");
    tail.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_a_clear_setup_error() {
    let db = Db::new();
    let err = SqliteSource::open(&config(&db), &["nope".to_string()], None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("nope"), "{err}");
    let gone = SqliteSourceConfig {
        path: db.dir.path().join("missing.db"),
        ..config(&db)
    };
    let err = SqliteSource::open(&gone, &[], None).err().unwrap();
    assert!(err.to_string().contains("missing.db"), "{err}");
}
