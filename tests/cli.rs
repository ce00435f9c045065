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
    assert!(
        stdout.contains("collection inventory_items (insert, update, replace, delete)"),
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
