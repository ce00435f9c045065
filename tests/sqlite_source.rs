//! The SQLite source on a real database file: triggers, tailing, checkpoints, pruning.

mod common;

use std::time::Duration;

use changecast::change::{Change, Op, Position};
use changecast::config::SqliteSourceConfig;
use changecast::source::sqlite::SqliteSource;
use changecast::source::{Batch, Source};
use common::{Db, Gateway, SECRET, WAIT, Ws, insert_order};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

fn config(db: &Db) -> SqliteSourceConfig {
    SqliteSourceConfig {
        path: db.path.clone(),
        poll_interval: Duration::from_millis(2),
        batch_size: 3,
        json_columns: vec![],
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
        Self::start_from(db, tables, None)
    }

    /// Starts with the durable history's checkpoint, as the server does.
    fn start_from(db: &Db, tables: &[&str], resume_from: Option<Position>) -> Tail {
        let tables: Vec<String> = tables.iter().map(|s| s.to_string()).collect();
        let source = SqliteSource::open(&config(db), &tables, resume_from).unwrap();
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
        self.take_batches(n, ack).await.1
    }

    /// As `take`, also saying whether any batch reported lost history; the end position
    /// of the last batch.
    async fn take_batches(&mut self, n: usize, ack: bool) -> (bool, Vec<Change>, Position) {
        let mut out = Vec::new();
        let mut lost = false;
        let mut end = Position::default();
        while out.len() < n || end == Position::default() {
            let batch = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("changes arrive in time")
                .expect("source running");
            lost |= batch.lost_history;
            end = batch.end.clone();
            out.extend(batch.changes);
            if ack {
                self.acks.send_replace(Some(batch.end));
            }
        }
        assert_eq!(out.len(), n, "no more than asked for");
        (lost, out, end)
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
    // Positions of one log order as their bytes do.
    let positions: Vec<&Position> = changes.iter().map(|c| &c.position).collect();
    assert!(positions.windows(2).all(|w| w[0].0 < w[1].0));
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
    db.exec("CREATE TABLE files (id INTEGER PRIMARY KEY, owner TEXT, data BLOB, meta JSON);");
    let mut tail = Tail::start(&db, &["files"]);
    db.exec("INSERT INTO files VALUES (1, 'u1', x'00FF10', '{\"tags\": [\"a\"]}');");
    let c = &tail.take(1, true).await[0];
    let after = c.after.as_ref().unwrap();
    assert_eq!(after["data"], "00FF10", "BLOBs are carried as hex");
    assert_eq!(
        after["meta"]["tags"][0], "a",
        "columns declared JSON are nested documents"
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

/// The value of one Prometheus sample, by its exact name and labels (0 if not yet recorded).
fn metric(sample: &str) -> f64 {
    let text = changecast::server::metrics_handle().render();
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| *name == sample)
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_primary_key_is_delivered_as_hex_and_never_pins_the_feed() {
    let db = Db::new();
    db.exec("CREATE TABLE blobkeys (id BLOB PRIMARY KEY, owner TEXT);");
    let mut tail = Tail::start(&db, &["blobkeys", "orders"]);
    db.exec("INSERT INTO blobkeys VALUES (x'00FF10AB', 'u1');");
    db.exec(&insert_order("o1", "b1"));
    let changes = tail.take(2, true).await;
    assert_eq!(keys(&changes), vec!["00FF10AB", "o1"]);
    assert_eq!(changes[0].after.as_ref().unwrap()["id"], "00FF10AB");
    tail.stop().await;
}

/// The only test in this binary that writes unreadable log rows, so the skip counter's
/// difference is this test's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_log_rows_are_skipped_counted_and_passed_even_across_restarts() {
    let db = Db::new();
    let skipped = r#"changecast_source_skipped_total{reason="malformed"}"#;
    let mut tail = Tail::start(&db, &["orders"]);
    let before = metric(skipped);
    // Rows as a foreign writer or an older changecast could leave them: a BLOB table name,
    // an INTEGER op, bad JSON, a JSON array instead of an object.
    db.exec(
        "INSERT INTO _changecast_log(tbl, op, key, after) VALUES (x'6F72', 'insert', 'k1', '{}');
         INSERT INTO _changecast_log(tbl, op, key, after) VALUES ('orders', 7, 'k2', '{}');
         INSERT INTO _changecast_log(tbl, op, key, after) VALUES ('orders', 'insert', 'k3', '{bad');
         INSERT INTO _changecast_log(tbl, op, key, after) VALUES ('orders', 'insert', 'k4', '[1]');",
    );
    db.exec(&insert_order("o1", "b1"));
    assert_eq!(keys(&tail.take(1, true).await), vec!["o1"]);
    assert_eq!(
        metric(skipped) - before,
        4.0,
        "each unreadable row counted once"
    );
    tail.stop().await;

    db.exec(&insert_order("o2", "b1"));
    let mut tail = Tail::start(&db, &["orders"]);
    assert_eq!(
        keys(&tail.take(1, true).await),
        vec!["o2"],
        "the skipped rows are behind the checkpoint"
    );
    assert_eq!(
        metric(skipped) - before,
        4.0,
        "not read again after the restart"
    );
    tail.stop().await;
}

/// Every storage class in keys and columns, rowid and WITHOUT ROWID tables: the
/// application's write succeeds (from Python's own SQLite, as an application's would) and
/// the change arrives with the right key and values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_accept_every_storage_class_in_keys_and_columns() {
    use serde_json::{Value, json};
    let db = Db::new();
    db.exec(
        "CREATE TABLE one (k PRIMARY KEY, v);
         CREATE TABLE one_wr (k PRIMARY KEY, v) WITHOUT ROWID;
         CREATE TABLE two (k1, k2, v, PRIMARY KEY (k1, k2));
         CREATE TABLE two_wr (k1, k2, v, PRIMARY KEY (k1, k2)) WITHOUT ROWID;
         CREATE TABLE nokey (v);",
    );
    let mut tail = Tail::start(&db, &["one", "one_wr", "two", "two_wr", "nokey"]);
    let huge = "x".repeat(1 << 20);
    // (SQL literal, its JSON value in a document, its key text)
    let values: Vec<(String, Value, String)> = vec![
        ("NULL".into(), Value::Null, String::new()),
        ("42".into(), json!(42), "42".into()),
        (
            "-9223372036854775808".into(),
            json!(i64::MIN),
            "-9223372036854775808".into(),
        ),
        ("1.5".into(), json!(1.5), "1.5".into()),
        ("1e308".into(), json!(1e308), String::new()),
        (
            "1.7976931348623157e308".into(),
            json!(f64::MAX),
            String::new(),
        ),
        ("0.30000000000000004".into(), json!(0.1 + 0.2), "0.3".into()),
        ("1e999".into(), Value::Null, "Inf".into()),
        ("-1e999".into(), Value::Null, "-Inf".into()),
        (
            "'it''s \"q\" \n'".into(),
            json!("it's \"q\" \n"),
            "it's \"q\" \n".into(),
        ),
        ("x'00FF'".into(), json!("00FF"), "00FF".into()),
        ("x''".into(), json!(""), String::new()),
        // 1 MiB of `x`, made in SQL (too long for a command line).
        (
            "replace(hex(zeroblob(524288)), '0', 'x')".into(),
            json!(huge),
            huge.clone(),
        ),
    ];
    let mut expected = 0;
    for (i, (sql, value, key)) in values.iter().enumerate() {
        let mut script = String::new();
        for table in ["one", "one_wr"] {
            if sql == "NULL" && table == "one_wr" {
                continue; // WITHOUT ROWID refuses NULL keys itself
            }
            script.push_str(&format!(
                "INSERT INTO {table} VALUES ({sql}, {sql}); UPDATE {table} SET v = 1 WHERE v IS {sql}; DELETE FROM {table};"
            ));
            expected += 3;
        }
        for table in ["two", "two_wr"] {
            if sql == "NULL" && table == "two_wr" {
                continue;
            }
            script.push_str(&format!(
                "INSERT INTO {table} VALUES ({sql}, {i}, {sql}); DELETE FROM {table};"
            ));
            expected += 2;
        }
        script.push_str(&format!(
            "INSERT INTO nokey VALUES ({sql}); DELETE FROM nokey;"
        ));
        expected += 2;
        db.exec_in_other_process(&script);
        let changes = tail.take(expected, true).await;
        expected = 0;
        for c in &changes {
            let doc = c.after.as_ref().or(c.before.as_ref()).unwrap();
            let what = format!("{sql:.40} in {} {}", c.collection, c.op);
            match c.collection.as_str() {
                "one" | "one_wr" => {
                    // `key` differs for SQLite's text form of an infinity and DBL_MAX.
                    if !sql.contains("e308") {
                        assert_eq!(&c.key, key, "{what}");
                    }
                    assert_eq!(doc["k"], *value, "{what}");
                    if c.op == Op::Insert {
                        assert_eq!(doc["v"], *value, "{what}");
                    }
                }
                "two" | "two_wr" => {
                    let parsed: Value = serde_json::from_str(&c.key).unwrap();
                    assert_eq!(parsed, json!([value, i]), "{what}");
                    assert_eq!(doc["v"], *value, "{what}");
                }
                _ => assert_eq!(doc["v"], *value, "{what}"),
            }
        }
    }
    tail.stop().await;
}

/// The Mercury auth with routes by a column of `tasks`, for the JSON-nesting tests.
fn tasks_config(db: &Db, source_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[source]
type = "sqlite"
path = "{db}"
poll_interval = "2ms"
{source_extra}

[auth]
jwt_secret = "{SECRET}"
user = {{ claim = "user_id", lookup = "users", where = {{ email = "$claim" }}, pick = "_id" }}

[history]
store = "memory"

[[route]]
name = "tasks"
collection = "tasks"
to = "$assignee"

[[route]]
name = "shared"
collection = "shared"
to = "$assignees"

[[route]]
name = "listed"
collection = "listed"
to = "$watchers"
"#,
        db = db.path.display(),
    )
}

/// Issue 11 item 13: a user-typed TEXT that looks like JSON is a string, not a list of
/// recipients; only columns declared `JSON`/`JSONB` or listed in `json_columns` nest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_json_columns_are_nested_so_typed_text_never_fans_out() {
    let db = Db::new();
    db.exec(
        "CREATE TABLE tasks (_id TEXT PRIMARY KEY, assignee TEXT);
         CREATE TABLE shared (_id TEXT PRIMARY KEY, assignees json);
         CREATE TABLE listed (_id TEXT PRIMARY KEY, watchers TEXT);",
    );
    let gw = Gateway::start(&tasks_config(&db, r#"json_columns = ["listed.watchers"]"#)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let (mut u2, _) = Ws::user(&gw, "u2", None).await;
    db.exec(
        r#"INSERT INTO tasks VALUES ('t1', '["u1","u2"]');
           INSERT INTO tasks VALUES ('t2', 'u2');
           INSERT INTO shared VALUES ('s1', '["u1","u2"]');
           INSERT INTO listed VALUES ('l1', '["u1","u2"]');"#,
    );
    // In commit order: u2's first change is t2, so t1 never reached u2.
    let ids = |c: &serde_json::Value| c["doc"]["_id"].as_str().unwrap().to_string();
    let mut got2 = Vec::new();
    for _ in 0..3 {
        got2.push(ids(&u2.change().await));
    }
    assert_eq!(got2, vec!["t2", "s1", "l1"]);
    let mut got1 = Vec::new();
    for _ in 0..2 {
        got1.push(ids(&u1.change().await));
    }
    assert_eq!(
        got1,
        vec!["s1", "l1"],
        "t1's assignee is one (odd) user id, not u1"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_json_columns_not_in_the_database() {
    let db = Db::new();
    db.exec("CREATE TABLE tasks (_id TEXT PRIMARY KEY, assignee TEXT); CREATE TABLE shared (_id, assignees); CREATE TABLE listed (_id, watchers);");
    let config = tasks_config(&db, r#"json_columns = ["tasks.nope", "nope.x", "plain"]"#);
    let errors =
        changecast::plan::Plan::compile(&changecast::config::Config::parse(&config).unwrap())
            .err()
            .expect("refused")
            .to_string();
    for bad in ["tasks.nope", "nope.x", "plain"] {
        assert!(errors.contains(bad), "{bad} not named in: {errors}");
    }
}

/// Issue 11 item 6: a second changecast on the same database would tail and prune the same
/// log (events lost). It refuses to start, naming the database and the holder; the lock
/// goes with the first (an OS file lock, so also on kill -9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_source_on_the_same_database_refuses_to_start() {
    let db = Db::new();
    let mut first = Tail::start(&db, &["orders"]);
    let err = SqliteSource::open(&config(&db), &["orders".to_string()], None)
        .err()
        .expect("the second is refused")
        .to_string();
    assert!(err.contains(&db.path.display().to_string()), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "names the holder: {err}"
    );
    // The first is unaffected.
    db.exec(&insert_order("o1", "b1"));
    assert_eq!(keys(&first.take(1, true).await), vec!["o1"]);
    first.stop().await;
    // Released with the first.
    let mut second = Tail::start(&db, &["orders"]);
    db.exec(&insert_order("o2", "b1"));
    assert_eq!(keys(&second.take(1, true).await), vec!["o2"]);
    second.stop().await;
}

/// The change log as it is now, dropped and created again empty (as an operator
/// "cleaning up" would): its sequence restarts at 1.
fn recreate_log(db: &Db) {
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    let sql: String = conn
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE name = '_changecast_log'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    conn.execute_batch(&format!(
        "BEGIN; DROP TABLE _changecast_log; {sql}; COMMIT;"
    ))
    .unwrap();
}

/// Issue 11 item 4: rows of a recreated log sit at or below the old checkpoint; they are
/// read from the log's start, and the batch says history was lost (clients get `gap`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_log_is_read_from_its_start_and_reports_lost_history() {
    let db = Db::new();
    let mut tail = Tail::start(&db, &["orders"]);
    for i in 1..=3 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
    }
    let (lost, changes, _) = tail.take_batches(3, true).await;
    assert!(!lost);
    assert_eq!(keys(&changes), vec!["o1", "o2", "o3"]);
    tail.stop().await;

    recreate_log(&db);
    db.exec(&insert_order("o4", "b1"));
    db.exec(&insert_order("o5", "b1"));
    let mut tail = Tail::start(&db, &["orders"]);
    let (lost, changes, _) = tail.take_batches(2, true).await;
    assert_eq!(keys(&changes), vec!["o4", "o5"], "nothing skipped");
    assert!(lost, "clients are told");
    tail.stop().await;
}

/// Issue 11 item 4: the history's checkpoint belongs to a log; a different log (a new
/// database file at the same path) is read from its start with lost history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_another_log_is_not_applied_to_this_one() {
    let db = Db::new();
    let mut tail = Tail::start(&db, &["orders"]);
    for i in 1..=3 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
    }
    let (_, _, end) = tail.take_batches(3, true).await;
    tail.stop().await;

    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    changecast::demo::create_database(&db.path).unwrap();
    let mut tail = Tail::start_from(&db, &["orders"], Some(end.clone()));
    db.exec(&insert_order("n1", "b1"));
    let (lost, changes, _) = tail.take_batches(1, true).await;
    assert_eq!(keys(&changes), vec!["n1"], "seq 1 of the new log is read");
    assert!(lost);
    tail.stop().await;

    // The same log again: no loss reported.
    db.exec(&insert_order("n2", "b1"));
    let mut tail = Tail::start(&db, &["orders"]);
    let (lost, changes, _) = tail.take_batches(1, true).await;
    assert_eq!(keys(&changes), vec!["n2"]);
    assert!(!lost);
    tail.stop().await;
}

async fn readyz(gw: &Gateway) -> (u16, serde_json::Value) {
    let res = reqwest::get(gw.http("/readyz")).await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

/// Polls `/readyz` until `want` holds (never longer than WAIT).
async fn wait_readyz(gw: &Gateway, what: &str, want: impl Fn(u16, &serde_json::Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = readyz(gw).await;
        if want(status, &body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never {what}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Issue 11 item 4, end to end: a log recreated while changecast was stopped; the rows
/// written since are stored and clients resuming from before get `gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_gap_after_the_log_was_recreated_and_new_rows_are_delivered() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let mut last = String::new();
    for i in 1..=3 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
        last = u1.change().await["id"].as_str().unwrap().to_string();
    }
    drop(u1);
    gw.stop().await;

    recreate_log(&db);
    db.exec(&insert_order("o4", "b1"));
    db.exec(&insert_order("o5", "b1"));
    let gw = Gateway::start(&db.config("", 100)).await;
    let (epoch, seq) = last.rsplit_once('-').unwrap();
    let seq: u64 = seq.parse().unwrap();
    // o4 and o5 are stored right after the gap: resuming from o4's id replays o5.
    let o4 = format!("{epoch}-{}", seq + 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut replayed = loop {
        let (ws, ready) = Ws::user(&gw, "u1", Some(&o4)).await;
        if ready["resumed"] == true {
            break ws;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "o4 never stored: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let o5 = replayed.change().await;
    assert_eq!(o5["key"], "o5");
    assert_eq!(o5["id"], format!("{epoch}-{}", seq + 2));
    let (mut old, ready) = Ws::user(&gw, "u1", Some(&last)).await;
    assert_eq!(ready["resumed"], false);
    assert_eq!(old.next().await["type"], "gap");
    gw.stop().await;
}

/// Issue 11 items 4 and 5: a dropped trigger is noticed while serving; /readyz says which,
/// until it is reinstalled (held back here by an application's open write transaction);
/// then clients get `gap` (changes meanwhile were not recorded) and changes flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_trigger_is_reported_reinstalled_and_reported_as_a_gap() {
    let db = Db::new();
    // A slower poll, so that the source cannot notice the drop in the microseconds
    // between its commit and the write lock taken right after it.
    let config = db
        .config("", 100)
        .replace(r#"poll_interval = "2ms""#, r#"poll_interval = "100ms""#);
    let gw = Gateway::start(&config).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    db.exec(&insert_order("o1", "b1"));
    assert_eq!(u1.change().await["key"], "o1");
    assert_eq!(readyz(&gw).await.0, 200);

    let app = rusqlite::Connection::open(&db.path).unwrap();
    // The application keeps its write lock right after the drop (as a long transaction
    // would), so the reinstall has to wait and the state can be observed.
    app.execute_batch(&format!(
        "DROP TRIGGER _changecast_orders_insert; BEGIN IMMEDIATE; {}",
        insert_order("lost", "b1") // not recorded: no trigger
    ))
    .unwrap();
    wait_readyz(&gw, "names the missing trigger", |s, b| {
        s == 503
            && b["reason"]
                .as_str()
                .unwrap_or("")
                .contains("_changecast_orders_insert")
    })
    .await;
    app.execute_batch("COMMIT;").unwrap();
    wait_readyz(&gw, "ready again", |s, _| s == 200).await;
    assert_eq!(u1.next().await["type"], "gap");
    db.exec(&insert_order("o2", "b1"));
    assert_eq!(u1.change().await["key"], "o2");
    gw.stop().await;
}

/// Issue 11 item 5: /readyz reports a change log that cannot be read, with the reason,
/// and recovers once a read succeeds; nothing is lost meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_failing_log_read_and_recovers() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    assert_eq!(readyz(&gw).await.0, 200);
    // A column the reader selects disappears (the triggers do not write it).
    db.exec("ALTER TABLE _changecast_log DROP COLUMN at;");
    db.exec(&insert_order("o1", "b1"));
    wait_readyz(&gw, "reports the read failure", |s, b| {
        s == 503 && b["reason"].as_str().unwrap_or("").contains("change log")
    })
    .await;
    db.exec("ALTER TABLE _changecast_log ADD COLUMN at TEXT;");
    wait_readyz(&gw, "ready again", |s, _| s == 200).await;
    assert_eq!(u1.change().await["key"], "o1");
    gw.stop().await;
}

/// A watched table dropped while serving: /readyz says so, the other tables keep flowing,
/// and once the table is back its triggers are installed and clients get `gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watched_table_is_reported_and_the_rest_keeps_flowing() {
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 100)).await;
    let (mut u1, _) = Ws::user(&gw, "u1", None).await;
    let schema: String = rusqlite::Connection::open(&db.path)
        .unwrap()
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE name = 'inventory_items'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.exec("DROP TABLE inventory_items;");
    wait_readyz(&gw, "names the table", |s, b| {
        s == 503
            && b["reason"]
                .as_str()
                .unwrap_or("")
                .contains("inventory_items")
    })
    .await;
    db.exec(&insert_order("o1", "b1"));
    assert_eq!(u1.change().await["key"], "o1", "other tables flow");
    assert_eq!(readyz(&gw).await.0, 503, "still missing");
    db.exec(&schema);
    wait_readyz(&gw, "ready again", |s, _| s == 200).await;
    assert_eq!(u1.next().await["type"], "gap");
    db.exec("INSERT INTO inventory_items VALUES ('i99', 'Rice', 'b1', 50, 10);");
    assert_eq!(u1.change().await["key"], "i99");
    gw.stop().await;
}

/// Issue 11 item 6 with real processes: a second `changecast serve` on the same database
/// exits with an error naming the database and the first's pid; after the first is
/// killed with SIGKILL (no clean-up), a new one starts.
#[test]
fn a_second_process_is_refused_and_the_lock_dies_with_the_first() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let db = Db::new();
    let config = db.dir.path().join("changecast.toml");
    std::fs::write(&config, db.config("", 100)).unwrap();
    let serve = || {
        Command::new(env!("CARGO_BIN_EXE_changecast"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "changecast=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts")
    };
    // Started: it logged that it listens (read on a thread, so a hang cannot hang us).
    let started = |child: &mut std::process::Child| {
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(WAIT).is_ok()
    };
    /// Kills the server if the test fails first (a no-op once it has exited).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut first = Killed(serve());
    assert!(started(&mut first.0), "the first server starts");

    let mut second = Killed(serve());
    let stderr = second.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        let _ = tx.send(text);
    });
    let stderr = rx.recv_timeout(WAIT).expect("the second exits");
    let status = second.0.wait().unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&db.path.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.0.id())),
        "{stderr}"
    );

    first.0.kill().unwrap(); // SIGKILL
    first.0.wait().unwrap();
    let mut third = Killed(serve());
    assert!(started(&mut third.0), "starts once the holder is gone");
}

/// Issue 11 item 4: the database restored from an older backup while changecast was
/// stopped. The history's checkpoint is ahead of the restored log: the log is read from
/// its start (the rows written since the restore are delivered) with lost history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_a_backup_is_read_from_the_start_with_lost_history() {
    let db = Db::new();
    let mut tail = Tail::start(&db, &["orders"]);
    db.exec(&insert_order("o1", "b1"));
    tail.take(1, true).await;
    tail.stop().await;
    let backup = db.dir.path().join("backup.db");
    db.exec(&format!("VACUUM INTO '{}';", backup.display()));

    let mut tail = Tail::start(&db, &["orders"]);
    for i in 2..=5 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
    }
    // What the durable history keeps: the end of the last batch it stored.
    let (_, _, history_checkpoint) = tail.take_batches(4, true).await;
    tail.stop().await;

    for suffix in ["-wal", "-shm"] {
        let mut p = db.path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    std::fs::copy(&backup, &db.path).unwrap();
    db.exec(&insert_order("r1", "b1")); // the restored log's seq 2: below the checkpoint
    let mut tail = Tail::start_from(&db, &["orders"], Some(history_checkpoint));
    let (lost, changes, _) = tail.take_batches(1, true).await;
    assert_eq!(keys(&changes), vec!["r1"]);
    assert!(lost, "clients are told");
    tail.stop().await;
}

/// Issue 11 item 4 while serving: the log dropped and created again in one transaction
/// (so nothing is ever missing) restarts its sequence below what was read. The source
/// notices on the schema change, reads the new log from its start and reports lost
/// history; acknowledgements of the old log never prune the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_recreated_while_running_is_read_from_its_start() {
    let db = Db::new();
    let mut tail = Tail::start(&db, &["orders"]);
    for i in 1..=3 {
        db.exec(&insert_order(&format!("o{i}"), "b1"));
    }
    let (_, _, old_end) = tail.take_batches(3, false).await;
    recreate_log(&db);
    db.exec(&insert_order("n1", "b1"));
    let (lost, changes, _) = tail.take_batches(1, false).await;
    assert_eq!(keys(&changes), vec!["n1"]);
    assert!(lost);
    // A late ack of the old log (seq 3) must not prune the new log's rows (seq 1).
    tail.acks.send_replace(Some(old_end));
    tail.stop().await;
    assert_eq!(log_rows(&db), 1, "n1 is still in the log");
    let mut tail = Tail::start(&db, &["orders"]);
    assert_eq!(keys(&tail.take(1, true).await), vec!["n1"]);
    tail.stop().await;
}

/// A column added while changecast runs reaches the change images without a restart: a
/// schema change that leaves every trigger in place still rebuilds the triggers of a table
/// whose columns changed (the images are built from the column list).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_while_running_is_in_the_next_changes() {
    let db = Db::new();
    let mut tail = Tail::start(&db, &["orders"]);
    db.exec_in_other_process(&insert_order("o1", "b1"));
    let first = tail.take(1, true).await;
    assert!(first[0].after.as_ref().unwrap().get("note").is_none());
    db.exec_in_other_process("ALTER TABLE orders ADD COLUMN note TEXT;");
    // The rebuild follows the schema change it sees on the next commit, so this one write
    // may still be logged by the old triggers; the one after it is not.
    db.exec_in_other_process("UPDATE orders SET status = 'paid' WHERE _id = 'o1';");
    let _ = tail.take(1, true).await;
    db.exec_in_other_process("UPDATE orders SET note = 'fragile' WHERE _id = 'o1';");
    let changes = tail.take(1, true).await;
    let after = changes[0].after.as_ref().unwrap();
    assert_eq!(after["note"], "fragile", "{after}");
    assert_eq!(
        changes[0].updated_fields.as_deref(),
        Some(&["note".to_string()][..])
    );
    tail.stop().await;
}
