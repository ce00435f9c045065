//! `changecast check --connect` on a MongoDB source: the real binary against the scripted
//! wire peer (`tests/mongo_peer`), one test per finding: the printed line and the exit code.

mod common;
mod mongo_peer;

use std::process::Command;
use std::time::Duration;

use mongo_peer::{Reply, Script, Scripted, Topology, first_batch};
use mongodb::bson::{Bson, Document, Timestamp, doc};

const DB: &str = "mercury";
const HOUR: u32 = 3600;

/// The deployment as `check --connect` sees it.
struct Deployment {
    /// (name, `options` as `listCollections` reports them, documents).
    collections: Vec<(String, Document, Vec<Document>)>,
    /// Cluster times of the oplog's first and last entries; `None`: an empty oplog.
    oplog: Option<(u32, u32)>,
}

fn images_on() -> Document {
    doc! {"changeStreamPreAndPostImages": {"enabled": true}}
}

impl Deployment {
    /// Orders owned through businesses, inventory with an alert, users: every collection
    /// with pre- and post-images, and a week of oplog.
    fn mercury() -> Deployment {
        let orders = (0..150)
            .map(|i| doc! {"_id": format!("o{i}"), "creator_id": "b1", "status": "paid"})
            .collect();
        Deployment {
            collections: vec![
                ("orders".into(), images_on(), orders),
                (
                    "businesses".into(),
                    images_on(),
                    vec![doc! {"_id": "b1", "name": "Kano Grains", "owner": {"_id": "u1"}}],
                ),
                (
                    "inventory_items".into(),
                    images_on(),
                    vec![doc! {
                        "_id": "i1", "name": "Rice", "owned_by": "b1",
                        "quantity_in_stock": 5, "reorder_point": 3,
                    }],
                ),
                (
                    "users".into(),
                    images_on(),
                    vec![doc! {"_id": "u1", "email": "amina@example.com"}],
                ),
            ],
            oplog: Some((1_700_000_000, 1_700_000_000 + 7 * 24 * HOUR)),
        }
    }

    fn collection(&mut self, name: &str) -> &mut (String, Document, Vec<Document>) {
        self.collections
            .iter_mut()
            .find(|c| c.0 == name)
            .expect("a scripted collection")
    }
}

impl Script for Deployment {
    fn answer(&mut self, name: &str, body: &Document) -> Reply {
        match name {
            "listCollections" => {
                let specs = self
                    .collections
                    .iter()
                    .map(|(name, options, _)| {
                        doc! {
                            "name": name,
                            "type": "collection",
                            "options": options.clone(),
                            "info": {"readOnly": false},
                            "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"},
                        }
                    })
                    .collect();
                Reply::Ok(first_batch(
                    0,
                    &format!("{DB}.$cmd.listCollections"),
                    specs,
                    None,
                ))
            }
            "find" if body.get_str("$db") == Ok("local") => {
                let newest_first = body
                    .get_document("sort")
                    .ok()
                    .and_then(|s| s.get("$natural"))
                    .and_then(Bson::as_i32)
                    == Some(-1);
                let entry = self.oplog.map(|(first, last)| {
                    let t = if newest_first { last } else { first };
                    doc! {"ts": Timestamp { time: t, increment: 1 }, "op": "n", "ns": ""}
                });
                Reply::Ok(first_batch(
                    0,
                    "local.oplog.rs",
                    entry.into_iter().collect(),
                    None,
                ))
            }
            "aggregate" => {
                let coll = body.get_str("aggregate").unwrap_or_default().to_owned();
                let size = body
                    .get_array("pipeline")
                    .ok()
                    .and_then(|p| p.first())
                    .and_then(Bson::as_document)
                    .and_then(|s| s.get_document("$sample").ok())
                    .and_then(|s| s.get_i32("size").ok());
                let Some(size) = size else {
                    return Reply::error(2, "BadValue", "the scripted peer samples only");
                };
                let docs: Vec<Document> = self
                    .collections
                    .iter()
                    .find(|c| c.0 == coll)
                    .map(|c| c.2.iter().take(size as usize).cloned().collect())
                    .unwrap_or_default();
                Reply::Ok(first_batch(0, &format!("{DB}.{coll}"), docs, None))
            }
            other => Reply::error(
                59,
                "CommandNotFound",
                &format!("the scripted peer does not know {other}"),
            ),
        }
    }
}

/// The test config: orders routed by owner (deletes too), a stock alert, users by email.
fn config(uri: &str, extra_source: &str, orders: &str) -> String {
    common::mongo_config(uri, DB, extra_source, orders)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The first printed line that starts with `prefix` (`"warning: history.max_age:"`).
    fn line(&self, prefix: &str) -> &str {
        self.line_about(prefix, "")
    }

    /// The first printed line that starts with `prefix` and mentions `subject`.
    fn line_about(&self, prefix: &str, subject: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains(subject))
            .unwrap_or_else(|| {
                panic!(
                    "no line starting with {prefix:?} about {subject:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout, self.stderr
                )
            })
    }
}

/// Runs `changecast check --config <file> --connect` on `config` (in a blocking thread: the
/// peer answers from this test's runtime meanwhile).
async fn check_connect(config: String) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("changecast.toml");
    std::fs::write(&file, config).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_changecast"))
                .args(["check", "--connect", "--config"])
                .arg(&file)
                .env_remove("CHANGECAST_JWT_SECRET")
                .output()
                .expect("the binary runs")
        }),
    )
    .await
    .expect("check --connect finishes in time")
    .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn run(topology: Topology, world: Deployment, extra_source: &str, orders: &str) -> Run {
    let setup = Scripted::new_as(topology, world).await;
    check_connect(config(&setup.peer.uri(), extra_source, orders)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_set_with_everything_in_place_passes() {
    let r = run(Topology::ReplicaSet, Deployment::mercury(), "", "orders").await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.line("ok: source.uri:").contains("replica set `rs0`"),
        "{}",
        r.stdout
    );
    assert!(
        r.line("ok: route[0].collection:")
            .contains("`orders` exists"),
        "{}",
        r.stdout
    );
    assert!(
        r.line_about("ok: source.pre_and_post_images:", "`orders`")
            .contains("enabled on `orders`"),
        "{}",
        r.stdout
    );
    assert!(
        r.line("ok: history.max_age:")
            .contains("the oplog holds 168.0 h of changes"),
        "{}",
        r.stdout
    );
    assert!(
        r.line("ok: route[0].to.where._id:")
            .contains("`creator_id` is in 100 of 100 sampled documents of `orders`"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("warning:"), "{}", r.stdout);
    assert!(!r.stdout.contains("error:"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_server_is_an_error_with_the_fix() {
    let r = run(Topology::Standalone, Deployment::mercury(), "", "orders").await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let line = r.line("error: source.uri:");
    assert!(line.contains("standalone"), "{line}");
    assert!(
        line.contains("--replSet") && line.contains("rs.initiate()"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_cluster_is_accepted() {
    let r = run(Topology::Mongos, Deployment::mercury(), "", "orders").await;
    assert!(
        r.line("ok: source.uri:")
            .contains("sharded cluster (mongos)"),
        "{}",
        r.stdout
    );
    // The oplog lives on the shards: mongos does not serve local.oplog.rs.
    assert!(
        r.line("warning: history.max_age:")
            .contains("not checked through mongos"),
        "{}",
        r.stdout
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_collection_is_an_error_with_a_suggestion() {
    let r = run(Topology::ReplicaSet, Deployment::mercury(), "", "ordres").await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let line = r.line("error: route[0].collection:");
    assert!(
        line.contains("no collection `ordres` in database `mercury`")
            && line.contains("did you mean `orders`?"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_images_with_ensure_are_enabled_at_start() {
    let mut world = Deployment::mercury();
    world.collection("orders").1 = doc! {};
    let r = run(Topology::ReplicaSet, world, "", "orders").await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let line = r.line_about("ok: source.pre_and_post_images:", "`orders`");
    assert!(
        line.contains("not enabled on `orders` yet") && line.contains("collMod"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_images_with_assume_are_an_error() {
    let mut world = Deployment::mercury();
    world.collection("orders").1 = doc! {"changeStreamPreAndPostImages": {"enabled": false}};
    let r = run(
        Topology::ReplicaSet,
        world,
        "pre_and_post_images = \"assume\"",
        "orders",
    )
    .await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let line = r.line_about("error: source.pre_and_post_images:", "`orders`");
    assert!(
        line.contains("not enabled on `orders`")
            && line.contains("route `orders`")
            && line.contains("changeStreamPreAndPostImages: {enabled: true}"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_off_warns_naming_the_rules_that_cannot_route_deletes() {
    let mut world = Deployment::mercury();
    world.collection("orders").1 = doc! {};
    let r = run(
        Topology::ReplicaSet,
        world,
        "pre_and_post_images = \"off\"",
        "orders",
    )
    .await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let line = r.line_about("warning: source.pre_and_post_images:", "`orders`");
    assert!(
        line.contains("route `orders`") && line.contains("cannot route deletes"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oplog_shorter_than_the_history_warns() {
    let mut world = Deployment::mercury();
    world.oplog = Some((1_700_000_000, 1_700_000_000 + 2 * HOUR));
    let r = run(Topology::ReplicaSet, world, "", "orders").await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let line = r.line("warning: history.max_age:");
    assert!(
        line.contains("the oplog holds 2.0 h of changes")
            && line.contains("less than history.max_age (24h)"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_no_sampled_document_has_warns_naming_the_rule() {
    let mut world = Deployment::mercury();
    world.collection("orders").2 = (0..20)
        .map(|i| doc! {"_id": format!("o{i}"), "creatorId": "b1", "status": "paid"})
        .collect();
    let r = run(Topology::ReplicaSet, world, "", "orders").await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let line = r.line("warning: route[0].to.where._id:");
    assert!(
        line.contains("none of 20 sampled documents of `orders` has `creator_id`")
            && line.contains("route `orders`")
            && line.contains("did you mean `creatorId`?"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_deployment_is_an_error_not_a_hang() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let uri = format!(
        "mongodb://127.0.0.1:{port}/?replicaSet=rs0&serverSelectionTimeoutMS=1000&connectTimeoutMS=1000"
    );
    let r = check_connect(config(&uri, "", "orders")).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.line("error: source.uri:").contains("cannot reach"),
        "{}",
        r.stdout
    );
}

#[test]
fn sqlite_connect_opens_the_file_and_says_so() {
    let db = common::Db::new();
    let file = db.dir.path().join("changecast.toml");
    std::fs::write(&file, db.config("", 100)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_changecast"))
        .args(["check", "--connect", "--config"])
        .arg(&file)
        .env_remove("CHANGECAST_JWT_SECRET")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ok: source.path:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("opened"), "{line}");
}
