//! The `changecast` binary: `check` and `token`.

mod common;

use std::process::{Command, Output};

use common::{Db, Gateway, SECRET, Ws, email_of, insert_order};

fn changecast(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(args)
        .env_remove("CHANGECAST_JWT_SECRET")
        .output()
        .expect("the binary runs")
}

fn check(db: &Db, config: &str) -> (i32, String, String) {
    let file = db.dir.path().join("changecast.toml");
    std::fs::write(&file, config).unwrap();
    let out = changecast(&["check", "--config", file.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_the_plan_of_a_good_config() {
    let db = Db::new();
    let (code, stdout, stderr) = check(&db, &db.config("", 100));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("collection orders (insert, update, delete)"),
        "{stdout}"
    );
    assert!(stdout.contains("route orders"), "{stdout}");
    assert!(
        stdout.contains("owner._id from `businesses` where _id = $creator_id"),
        "{stdout}"
    );
    // Every operation by default, in SQLite's words: no `replace`.
    assert!(
        stdout.contains("collection inventory_items (insert, update, delete)"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_bad_configs_naming_the_config_path() {
    let db = Db::new();
    let good = db.config("", 100);
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("max_per_user = 100", "max_per_user = 100\ncolour = \"red\""),
            "history",
        ),
        (
            good.replace(
                "where = { _id = \"$creator_id\" }",
                "where = { _id = \"$creator\" }",
            ),
            "route[0].to",
        ),
        (
            good.replace(
                "lookup = \"businesses\", where = { _id = \"$creator_id\" }",
                "lookup = \"busineses\", where = { _id = \"$creator_id\" }",
            ),
            "route[0].to.lookup: no such collection",
        ),
        (
            good.replace("collection = \"orders\"", "collection = \"ordres\""),
            "route[0].collection",
        ),
        (
            good.replace(
                "on = [\"insert\", \"update\", \"delete\"]",
                "on = [\"upsert\"]",
            ),
            "route[0].on[0]",
        ),
        (
            good.replace(
                &format!("jwt_secret = \"{SECRET}\""),
                "jwt_secret_env = \"CHANGECAST_JWT_SECRET\"",
            ),
            "auth.jwt_secret_env",
        ),
        (
            good.replace(
                "type = \"sqlite\"",
                "type = \"mongodb\"\nuri = \"postgres://x\"\ndatabase = \"d\"",
            )
            .replace("path = ", "# path = ")
            .replace("poll_interval = \"2ms\"", ""),
            "source.uri",
        ),
        (good.replace("mercury.db", "absent.db"), "source.path"),
        (
            good.replace("poll_interval = \"2ms\"", "poll_interval = \"often\""),
            "source",
        ),
        (format!("{good}\n[[alert]]\nname = \"other\"\n"), "alert[1]"),
        (
            good.replace(
                "when = \"doc.quantity_in_stock <= doc.reorder_point\"",
                "when = \"doc.quantity_in_stock <= \"",
            ),
            "alert[0].when: invalid CEL expression",
        ),
        (
            good.replace("{{ doc.name }}", "{{ doc.name "),
            "alert[0].message: invalid template",
        ),
        (
            good.replace(
                "on = [\"insert\", \"update\", \"delete\"]",
                "on = [\"insert\"]\nwhen = \"doc.status ==\"",
            ),
            "route[0].when",
        ),
        (
            good.replace(
                "when = \"doc.quantity_in_stock <= doc.reorder_point\"",
                "when = \"quantity < 3\"",
            ),
            "alert[0].when: unknown variable(s) quantity",
        ),
        (
            good.replace("pick = \"_id\"", "pick = \"id\""),
            "auth.user.pick",
        ),
        (
            good.replace("name = \"inventory\"", "name = \"orders\""),
            "route[1].name",
        ),
        ("[source\n".to_string(), "line 1"),
    ];
    for (config, expected) in cases {
        let (code, _, stderr) = check(&db, &config);
        assert_eq!(code, 1, "expected failure for `{expected}`:\n{stderr}");
        assert!(
            stderr.contains(expected),
            "expected `{expected}` in:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mints_a_token_the_gateway_accepts() {
    let out = changecast(&[
        "token",
        "--sub",
        "u1",
        "--secret",
        SECRET,
        "--ttl",
        "10m",
        "--claim",
        "role=admin",
        "--claim",
        "n=3",
        "--claim",
        &format!("user_id={}", email_of("u1")),
    ]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.trim();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_required_spec_claims(&["exp"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &v,
    )
    .unwrap();
    assert_eq!(data.claims["sub"], "u1");
    assert_eq!(data.claims["role"], "admin");
    assert_eq!(data.claims["n"], 3);
    let ttl = data.claims["exp"].as_u64().unwrap() - data.claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 600);

    // The gateway (same secret, users resolved by the `user_id` claim) accepts it: the
    // connection is ready as u1 and receives u1's next change.
    let db = Db::new();
    let gw = Gateway::start(&db.config("", 10)).await;
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={token}"))).await;
    let ready = ws.next().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert_eq!(ready["user"], "u1");
    db.exec(&insert_order("o1", "b1"));
    assert_eq!(ws.change().await["key"], "o1");
    gw.stop().await;

    let out = changecast(&[
        "token",
        "--sub",
        "u1",
        "--secret-env",
        "CHANGECAST_JWT_SECRET",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CHANGECAST_JWT_SECRET"));
}

/// The README's MongoDB example config: `check` prints the pipeline without connecting.
#[test]
fn check_prints_the_mongodb_change_stream_request() {
    let db = Db::new();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```toml\n[source]\ntype = \"mongodb\"")
        .expect("README has the MongoDB example");
    let body = &readme[start + "```toml\n".len()..];
    let example = &body[..body.find("```").unwrap()];
    let config = example.replace(
        "jwt_secret_env = \"CHANGECAST_JWT_SECRET\"",
        "jwt_secret = \"s\"",
    );
    let (code, stdout, stderr) = check(&db, &config);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .contains("source: mongodb mongodb://localhost:27017/?replicaSet=rs0 database mercury"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fullDocument: whenAvailable, fullDocumentBeforeChange: whenAvailable"),
        "{stdout}"
    );
    assert!(stdout.contains("\"$match\""), "{stdout}");
    assert!(stdout.contains("\"ns.coll\":\"orders\""), "{stdout}");
    assert!(stdout.contains("\"$project\""), "{stdout}");
    assert!(stdout.contains("collMod"), "{stdout}");
}

/// Every duration and size key with a value the server cannot honour (zero where zero
/// stops a task or refuses everyone, too large, overflowing): `(key, TOML line, error)`.
/// `key` says where the line goes: `server`, `history`, `auth`, `source`, `alert`.
const OUT_OF_RANGE: &[(&str, &str, &str)] = &[
    (
        "server",
        "keepalive = \"0s\"",
        "server.keepalive: must be greater than zero",
    ),
    (
        "server",
        "keepalive = \"300000000000y\"",
        "server.keepalive: must be at most 1h",
    ),
    (
        "server",
        "keepalive = \"99999999999999999999999y\"",
        "server.keepalive: ",
    ),
    (
        "server",
        "auth_timeout = \"0s\"",
        "server.auth_timeout: must be greater than zero",
    ),
    (
        "server",
        "auth_timeout = \"300000000000y\"",
        "server.auth_timeout: must be at most 1h",
    ),
    (
        "server",
        "send_queue = 0",
        "server.send_queue: must be at least 1",
    ),
    (
        "server",
        "send_queue = 4611686018427387904",
        "server.send_queue: must be at most",
    ),
    (
        "server",
        "send_queue_bytes = 0",
        "server.send_queue_bytes: must be at least 1024",
    ),
    (
        "server",
        "send_queue_bytes = 4611686018427387904",
        "server.send_queue_bytes: must be at most",
    ),
    (
        "server",
        "socket_send_buffer = 4611686018427387904",
        "server.socket_send_buffer: must be at most",
    ),
    (
        "server",
        "max_client_frame = 100",
        "server.max_client_frame: must be at least 256",
    ),
    (
        "server",
        "max_client_frame = 4611686018427387904",
        "server.max_client_frame: must be at most",
    ),
    (
        "server",
        "max_connections = 0",
        "server.max_connections: must be at least 1",
    ),
    (
        "server",
        "max_connections_per_user = 0",
        "server.max_connections_per_user: must be at least 1",
    ),
    (
        "history",
        "prune_interval = \"0s\"",
        "history.prune_interval: must be greater than zero",
    ),
    (
        "history",
        "prune_interval = \"100y\"",
        "history.prune_interval: must be at most 1day",
    ),
    (
        "history",
        "max_age = \"0s\"",
        "history.max_age: must be greater than zero",
    ),
    (
        "history",
        "max_age = \"300000000000y\"",
        "history.max_age: must be at most",
    ),
    (
        "history",
        "memory_per_user = 4611686018427387904",
        "history.memory_per_user: must be at most",
    ),
    (
        "history-max",
        "max_per_user = 0",
        "history.max_per_user: must be at least 1",
    ),
    (
        "auth",
        "leeway = \"100y\"",
        "auth.leeway: must be at most 1h",
    ),
    (
        "auth",
        "expiry_warning = \"100y\"",
        "auth.expiry_warning: must be at most 1day",
    ),
    (
        "source",
        "poll_interval = \"0s\"",
        "source.poll_interval: must be greater than zero",
    ),
    (
        "source",
        "poll_interval = \"100y\"",
        "source.poll_interval: must be at most 1m",
    ),
    (
        "source",
        "batch_size = 0",
        "source.batch_size: must be at least 1",
    ),
    (
        "source",
        "batch_size = 4611686018427387904",
        "source.batch_size: must be at most",
    ),
    (
        "lookups",
        "cache_entries = 4611686018427387904",
        "lookups.cache_entries: must be at most",
    ),
    (
        "alert",
        "cooldown = \"300000000000y\"",
        "alert[0].cooldown: must be at most",
    ),
];

/// The harness config with `line` put where `key` says.
fn with_line(db: &Db, key: &str, line: &str) -> String {
    let good = db.config("", 100);
    let (anchor, replacement) = match key {
        "server" => ("[server]\n", format!("[server]\n{line}\n")),
        "history" => ("[history]\n", format!("[history]\n{line}\n")),
        "history-max" => ("max_per_user = 100\n", format!("{line}\n")),
        "auth" => ("[auth]\n", format!("[auth]\n{line}\n")),
        "source" => ("poll_interval = \"2ms\"\n", format!("{line}\n")),
        "lookups" => ("[[route]]\n", format!("[lookups]\n{line}\n\n[[route]]\n")),
        "alert" => (
            "name = \"stock_low\"\n",
            format!("name = \"stock_low\"\n{line}\n"),
        ),
        other => panic!("no anchor for {other}"),
    };
    assert!(
        good.contains(anchor),
        "{anchor:?} not in the harness config"
    );
    good.replacen(anchor, &replacement, 1)
}

#[test]
fn check_refuses_every_out_of_range_duration_and_size_naming_its_key() {
    let db = Db::new();
    let mut failures = Vec::new();
    for (key, line, expected) in OUT_OF_RANGE {
        let (code, _, stderr) = check(&db, &with_line(&db, key, line));
        if code == 0 || !stderr.contains(expected) {
            failures.push(format!(
                "{line}: exit {code}, expected {expected:?} in:\n{stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn serve_refuses_an_out_of_range_value_as_check_does() {
    let db = Db::new();
    let file = db.dir.path().join("serve.toml");
    std::fs::write(&file, with_line(&db, "history", "prune_interval = \"0s\"")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // Bounded: a serve that started anyway would run until killed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("serve started with prune_interval = \"0s\"");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("history.prune_interval: must be greater than zero"),
        "{stderr}"
    );
}

/// A project tracker on SQLite (the issue's trial): tasks routed to every member of the
/// task's project, and an alert to the project's owner when a task becomes blocked.
struct Tracker {
    dir: tempfile::TempDir,
}

const TRACKER: &str = r#"
[source]
type = "sqlite"
path = "tracker.db"
poll_interval = "2ms"

[auth]
jwt_secret = "s"

[history]
path = "history.db"

[[route]]
name = "tasks"
collection = "tasks"
to = { lookup = "members", where = { project_id = "$project_id" }, pick = "user_id", many = true }

[[alert]]
name = "blocked"
collection = "tasks"
when = "doc.status == 'blocked'"
to = { lookup = "projects", where = { _id = "$project_id" }, pick = "owner_id" }
message = "{{ doc.title }} is blocked"
"#;

impl Tracker {
    fn new() -> Tracker {
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("tracker.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE projects (_id TEXT PRIMARY KEY, name TEXT, owner_id TEXT);
             CREATE TABLE members (_id TEXT PRIMARY KEY, project_id TEXT, user_id TEXT);
             CREATE TABLE tasks (_id TEXT PRIMARY KEY, project_id TEXT, title TEXT,
                                 status TEXT, meta JSON);",
        )
        .unwrap();
        Tracker { dir }
    }

    /// `changecast check [extra args] --config <config>`: (exit code, stdout, stderr).
    fn check(&self, config: &str, extra: &[&str]) -> (i32, String, String) {
        let file = self.dir.path().join("changecast.toml");
        std::fs::write(&file, config).unwrap();
        let mut args = vec!["check"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--config", file.to_str().unwrap()]);
        let out = changecast(&args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `TRACKER` with `from` replaced by `to` (which must be there).
    fn config_with(from: &str, to: &str) -> String {
        assert!(TRACKER.contains(from), "{from:?} not in the tracker config");
        TRACKER.replacen(from, to, 1)
    }
}

#[test]
fn the_tracker_config_checks_clean() {
    let t = Tracker::new();
    let (code, stdout, stderr) = t.check(TRACKER, &["--strict"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(stdout.contains("route tasks"), "{stdout}");
}

/// Silent config 1: `where = { _id = "project_id" }` matches the literal string
/// "project_id", so the alert reaches nobody. `check` warns and names the fix; `--strict`
/// fails on it.
#[test]
fn check_warns_of_a_where_value_that_names_a_field_without_its_dollar() {
    let t = Tracker::new();
    let config = Tracker::config_with(
        "where = { _id = \"$project_id\" }",
        "where = { _id = \"project_id\" }",
    );
    let (code, _, stderr) = t.check(&config, &[]);
    assert_eq!(code, 0, "a warning is not an error:\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("warning: alert[0].to.where._id: "))
        .unwrap_or_else(|| panic!("no warning for alert[0].to.where._id in:\n{stderr}"));
    assert!(line.contains("\"$project_id\""), "{line}");

    let (code, _, stderr) = t.check(&config, &["--strict"]);
    assert_eq!(code, 1, "--strict fails on a warning:\n{stderr}");
    assert!(
        stderr.contains("warning: alert[0].to.where._id: "),
        "{stderr}"
    );
}

/// Silent config 2: a condition reading a column the table does not have.
#[test]
fn check_refuses_a_condition_reading_a_missing_column_with_a_suggestion() {
    let t = Tracker::new();
    let config = Tracker::config_with(
        "when = \"doc.status == 'blocked'\"",
        "when = \"doc.stat == 'blocked'\"",
    );
    let (code, _, stderr) = t.check(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("alert[0].when: "))
        .unwrap_or_else(|| panic!("no error for alert[0].when in:\n{stderr}"));
    assert!(line.contains("`stat`"), "{line}");
    assert!(line.contains("did you mean `doc.status`?"), "{line}");

    // A route's condition, and `before`, are checked the same way.
    let config = Tracker::config_with(
        "many = true }\n",
        "many = true }\nwhen = \"before.titel != doc.title\"\n",
    );
    let (code, _, stderr) = t.check(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("route[0].when: ") && stderr.contains("did you mean `before.title`?"),
        "{stderr}"
    );
}

/// Silent config 3: a template variable the table does not have renders empty.
#[test]
fn check_refuses_a_template_variable_of_a_missing_column_with_a_suggestion() {
    let t = Tracker::new();
    let config = Tracker::config_with("{{ doc.title }}", "{{ doc.titel }}");
    let (code, _, stderr) = t.check(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("alert[0].message: "))
        .unwrap_or_else(|| panic!("no error for alert[0].message in:\n{stderr}"));
    assert!(line.contains("`titel`"), "{line}");
    assert!(line.contains("did you mean `doc.title`?"), "{line}");
}

/// `pick` and `where` name columns of the looked-up table; JSON columns are checked by
/// their first segment only.
#[test]
fn check_refuses_pick_and_where_fields_the_looked_up_table_lacks() {
    let t = Tracker::new();
    let config = Tracker::config_with("pick = \"owner_id\"", "pick = \"ownr_id\"");
    let (code, _, stderr) = t.check(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("alert[0].to.pick: ") && stderr.contains("did you mean `owner_id`?"),
        "{stderr}"
    );

    let config = Tracker::config_with(
        "where = { project_id = \"$project_id\" }",
        "where = { project_id = \"$projct_id\" }",
    );
    let (code, _, stderr) = t.check(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("route[0].to.where.project_id: ")
            && stderr.contains("did you mean `$project_id`?"),
        "{stderr}"
    );

    // A path into a JSON column: only its column can be checked, and it exists.
    let config = Tracker::config_with(
        "when = \"doc.status == 'blocked'\"",
        "when = \"doc.status == 'blocked' && doc.meta.urgent == true\"",
    );
    let (code, _, stderr) = t.check(&config, &["--strict"]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_suggests_the_key_table_or_section_meant() {
    let t = Tracker::new();
    let cases = [
        (
            Tracker::config_with("[history]\n", "[history]\nmax_per_usr = 5\n"),
            "history.max_per_usr: ",
            "did you mean `max_per_user`?",
        ),
        (
            Tracker::config_with("collection = \"tasks\"", "collection = \"taks\""),
            "route[0].collection: ",
            "did you mean `tasks`?",
        ),
        (
            Tracker::config_with("lookup = \"members\"", "lookup = \"member\""),
            "route[0].to.lookup: ",
            "did you mean `members`?",
        ),
        (
            Tracker::config_with("[history]\n", "[histroy]\n"),
            "histroy: ",
            "did you mean `history`?",
        ),
        (
            Tracker::config_with("type = \"sqlite\"", "type = \"sqlit\""),
            "source.type: ",
            "did you mean `sqlite`?",
        ),
        (
            Tracker::config_with("many = true", "manny = true"),
            "route[0].to.manny: ",
            "did you mean `many`?",
        ),
    ];
    for (config, path, suggestion) in cases {
        let (code, _, stderr) = t.check(&config, &[]);
        assert_eq!(code, 1, "{path}: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains(path))
            .unwrap_or_else(|| panic!("no error at {path} in:\n{stderr}"));
        assert!(line.contains(suggestion), "{path}: {line}");
    }
}

/// One run reports every error of the file, each at its exact key: two syntax errors,
/// and bad values in several sections.
#[test]
fn check_reports_every_error_in_one_run_at_the_exact_key() {
    let t = Tracker::new();
    let config = Tracker::config_with("[auth]\n", "[auth]\nleeway = = \"1s\"\n").replacen(
        "[history]\n",
        "[history]\nmax_age = \"1d\" \"2d\"\n",
        1,
    );
    let (code, _, stderr) = t.check(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    let syntax: Vec<&str> = stderr.lines().filter(|l| l.contains("(line ")).collect();
    assert!(syntax.len() >= 2, "both syntax errors:\n{stderr}");

    let config = Tracker::config_with("poll_interval = \"2ms\"", "poll_interval = \"often\"")
        .replacen("[auth]\n", "[auth]\nleeway = 5\n", 1)
        .replacen("many = true", "many = \"yes\"", 1)
        + "\n[server]\nkeepalive = \"0s\"\n";
    let (code, _, stderr) = t.check(&config, &[]);
    assert_eq!(code, 1, "{stderr}");
    for path in [
        "  source.poll_interval: ",
        "  auth.leeway: ",
        "  route[0].to.many: ",
    ] {
        assert!(stderr.contains(path), "{path} missing in:\n{stderr}");
    }
}

/// The plan speaks SQLite's words and human durations.
#[test]
fn check_prints_a_sqlite_plan_without_replace_and_with_human_durations() {
    let t = Tracker::new();
    let config = Tracker::config_with("[history]\n", "[history]\nmax_age = \"24h\"\n").replacen(
        "message = ",
        "cooldown = \"90s\"\nmessage = ",
        1,
    );
    let (code, stdout, stderr) = t.check(&config, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("replace"), "{stdout}");
    assert!(
        stdout.contains("collection tasks (insert, update, delete)"),
        "{stdout}"
    );
    assert!(stdout.contains("polled every 2ms"), "{stdout}");
    assert!(stdout.contains("1day at most"), "{stdout}");
    assert!(stdout.contains("quiet for 1m 30s per document"), "{stdout}");
    assert!(!stdout.contains("Duration"), "{stdout}");
    assert!(!stdout.contains("90s"), "{stdout}");
}

/// `serve` compiles the same plan: it starts despite a warning, and logs it first.
#[test]
fn serve_logs_config_warnings_at_start() {
    use std::io::BufRead;
    let t = Tracker::new();
    let config = Tracker::config_with(
        "where = { _id = \"$project_id\" }",
        "where = { _id = \"project_id\" }",
    ) + "\n[server]\nlisten = \"127.0.0.1:0\"\n";
    let file = t.dir.path().join("serve.toml");
    std::fs::write(&file, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // Read stderr on a thread so a serve that never logs cannot hang the test.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut warned = false;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        if line.contains("alert[0].to.where._id") && line.contains("\"$project_id\"") {
            warned = true;
        }
        let listening = line.contains("changecast listening");
        seen.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("changecast listening")),
        "serve did not start:\n{}",
        seen.join("\n")
    );
    assert!(
        warned,
        "no warning logged before listening:\n{}",
        seen.join("\n")
    );
}

/// SQLite reports a changed row as an update: a rule on `replace` alone never fires.
#[test]
fn check_warns_of_replace_on_sqlite() {
    let t = Tracker::new();
    let config = Tracker::config_with("many = true }\n", "many = true }\non = [\"replace\"]\n");
    let (code, stdout, stderr) = t.check(&config, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("warning: route[0].on[0]: SQLite has no replace")),
        "{stderr}"
    );
    assert!(
        stdout.contains("route tasks on nothing (SQLite has no replace)"),
        "{stdout}"
    );
    let (code, _, stderr) = t.check(&config, &["--strict"]);
    assert_eq!(code, 1, "{stderr}");
}
