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
