use super::*;
use crate::change::UserId;

/// A delivery's recipients as plain strings, for comparing.
fn ids<'a>(d: &'a Delivery) -> Vec<&'a str> {
    d.recipients.iter().map(|u| &**u).collect()
}
use crate::change::Position;
use crate::config::AlertConfig;
use crate::source::LookupError;
use crate::source::Query;
use crate::source::sqlite::SqliteLookup;
use futures_util::future::BoxFuture;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The source's lookups on a real SQLite file (`SqliteLookup`: JSON columns nested as the
/// change feed has them), recording every query that reaches it.
struct Docs {
    /// Holds the database file for as long as the lookups run.
    _dir: tempfile::TempDir,
    lookup: SqliteLookup,
    queries: Mutex<Vec<Query>>,
}

impl Lookup for Docs {
    fn find(&self, query: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>> {
        self.queries.lock().unwrap().push(query.clone());
        self.lookup.find(query)
    }
}

struct Cat(BTreeMap<String, Option<Vec<String>>>);
impl Catalog for Cat {
    fn collections(&self) -> &BTreeMap<String, Option<Vec<String>>> {
        &self.0
    }
}

fn mercury_catalog() -> Cat {
    let cols = |c: &[&str]| Some(c.iter().map(|s| s.to_string()).collect());
    Cat(BTreeMap::from([
        ("businesses".into(), cols(&["_id", "name", "owner"])),
        (
            "users".into(),
            cols(&["_id", "email", "name", "business_id"]),
        ),
        (
            "orders".into(),
            cols(&[
                "_id",
                "creator_id",
                "item_id",
                "quantity",
                "status",
                "watcher",
                "meta",
                "secret",
            ]),
        ),
    ]))
}

fn route_config(to: &str, extra: &str) -> RouteConfig {
    let text = format!("name = \"orders\"\ncollection = \"orders\"\nto = {to}\n{extra}");
    toml::from_str(&text).unwrap()
}

fn compile(to: &str, extra: &str) -> Result<Route, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let r = compile_route(
        0,
        &route_config(to, extra),
        Some(&mercury_catalog()),
        &mut errors,
    );
    r.ok_or(errors)
}

/// b1 (owner u1, staff u1 and u3) and b2 (owner u2, staff u2). `owner` is declared JSON:
/// the lookup returns it nested, `{"_id": "u1"}`.
fn docs() -> Arc<Docs> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            r#"CREATE TABLE businesses (_id TEXT PRIMARY KEY, name TEXT, owner JSON);
               INSERT INTO businesses VALUES ('b1', NULL, '{"_id": "u1"}'), ('b2', NULL, '{"_id": "u2"}');
               CREATE TABLE users (_id TEXT PRIMARY KEY, email TEXT, name TEXT, business_id TEXT);
               INSERT INTO users (_id, business_id) VALUES ('u1', 'b1'), ('u3', 'b1'), ('u2', 'b2');"#,
        )
        .unwrap();
    Arc::new(Docs {
        lookup: SqliteLookup::new(&path),
        _dir: dir,
        queries: Mutex::new(Vec::new()),
    })
}

fn change(op: Op, before: Option<Value>, after: Option<Value>) -> Change {
    let updated_fields = match (&before, &after) {
        (Some(b), Some(a)) => Some(crate::change::changed_fields(b, a)),
        _ => None,
    };
    Change {
        op,
        collection: "orders".into(),
        key: "o1".into(),
        after,
        before,
        updated_fields,
        position: Position::from_seq(1),
        at: None,
        as_of: None,
    }
}

const OWNER: &str =
    r#"{ lookup = "businesses", where = { _id = "$creator_id" }, pick = "owner._id" }"#;

#[tokio::test]
async fn lookup_routes_to_the_owner() {
    let route = compile(OWNER, "").unwrap();
    let router = Router::new(vec![route], vec![], docs(), 100);
    let c = change(
        Op::Insert,
        None,
        Some(json!({"_id": "o1", "creator_id": "b1"})),
    );
    let d = router.route(&c).await;
    assert_eq!(d.len(), 1);
    assert_eq!(ids(&d[0]), vec!["u1"]);
    assert_eq!(
        d[0].projected, None,
        "no projection: the change's document is sent as is"
    );
    let sent: Value = serde_json::from_str(&d[0].encode("e1-1", &c)).unwrap();
    assert_eq!(sent["doc"], json!({"_id": "o1", "creator_id": "b1"}));
}

#[tokio::test]
async fn delete_routes_by_the_pre_image() {
    let router = Router::new(vec![compile(OWNER, "").unwrap()], vec![], docs(), 100);
    let c = change(
        Op::Delete,
        Some(json!({"_id": "o1", "creator_id": "b2"})),
        None,
    );
    let d = router.route(&c).await;
    assert_eq!(ids(&d[0]), vec!["u2"]);
}

#[tokio::test]
async fn moving_a_document_reaches_old_and_new_owners_and_only_when_needed() {
    let docs = docs();
    let router = Router::new(vec![compile(OWNER, "").unwrap()], vec![], docs.clone(), 0);
    let moved = change(
        Op::Update,
        Some(json!({"_id": "o1", "creator_id": "b1", "status": "new"})),
        Some(json!({"_id": "o1", "creator_id": "b2", "status": "new"})),
    );
    assert_eq!(ids(&router.route(&moved).await[0]), vec!["u1", "u2"]);
    docs.queries.lock().unwrap().clear();
    let paid = change(
        Op::Update,
        Some(json!({"_id": "o1", "creator_id": "b1", "status": "new"})),
        Some(json!({"_id": "o1", "creator_id": "b1", "status": "paid"})),
    );
    assert_eq!(ids(&router.route(&paid).await[0]), vec!["u1"]);
    // The owner field did not change, so the pre-image was not looked up again.
    assert_eq!(docs.queries.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn many_reaches_every_matching_document_and_lists_union() {
    let many = r#"[{ lookup = "users", where = { business_id = "$creator_id" }, pick = "_id", many = true }, "$watcher"]"#;
    let router = Router::new(vec![compile(many, "").unwrap()], vec![], docs(), 100);
    let c = change(
        Op::Insert,
        None,
        Some(json!({"_id": "o1", "creator_id": "b1", "watcher": "u1"})),
    );
    // u1 is both a user of b1 and the watcher: delivered once.
    assert_eq!(ids(&router.route(&c).await[0]), vec!["u1", "u3"]);
}

#[tokio::test]
async fn a_missing_field_skips_the_delivery_without_failing() {
    let router = Router::new(vec![compile(OWNER, "").unwrap()], vec![], docs(), 100);
    let c = change(Op::Insert, None, Some(json!({"_id": "o1"})));
    assert!(router.route(&c).await.is_empty());
    let c = change(
        Op::Insert,
        None,
        Some(json!({"_id": "o1", "creator_id": "nobody"})),
    );
    assert!(router.route(&c).await.is_empty());
}

#[tokio::test]
async fn ops_filter_and_projection_apply() {
    let r = compile(
        "\"$creator_id\"",
        "on = [\"delete\"]\nfields = [\"status\", \"meta.a\"]",
    )
    .unwrap();
    let router = Router::new(vec![r], vec![], docs(), 100);
    let ins = change(
        Op::Insert,
        None,
        Some(json!({"_id": "o1", "creator_id": "u9"})),
    );
    assert!(router.route(&ins).await.is_empty());
    let del = change(
        Op::Delete,
        Some(
            json!({"_id": "o1", "creator_id": "u9", "status": "x", "secret": 1, "meta": {"a": 1, "b": 2}}),
        ),
        None,
    );
    let d = router.route(&del).await;
    assert_eq!(ids(&d[0]), vec!["u9"]);
    assert_eq!(
        d[0].projected.clone().unwrap(),
        json!({"_id": "o1", "status": "x", "meta": {"a": 1}})
    );
}

#[test]
fn bad_routes_are_refused_with_paths() {
    let cases = [
        (r#""owner""#, "", "route[0].to"),
        (
            r#"{ lookup = "nope", where = { _id = "$creator_id" } }"#,
            "",
            "route[0].to.lookup",
        ),
        (
            r#"{ where = { _id = "$creator_id" } }"#,
            "",
            "route[0].to.lookup",
        ),
        (
            r#"{ lookup = "businesses", where = { _id = "$creator_id" }, colour = 1 }"#,
            "",
            "route[0].to.colour",
        ),
        (
            r#"{ lookup = "businesses", where = { nope = "$creator_id" } }"#,
            "",
            "route[0].to.where.nope",
        ),
        (
            r#"{ lookup = "businesses", where = { _id = "$creator_id" }, pick = "x" }"#,
            "",
            "route[0].to.pick",
        ),
        (r#""$missing""#, "", "route[0].to"),
        (r#""$creator_id""#, "on = [\"upsert\"]", "route[0].on[0]"),
        (
            r#""$creator_id""#,
            "fields = [\"a..b\"]",
            "route[0].fields[0]",
        ),
        ("[]", "", "route[0].to"),
    ];
    for (to, extra, path) in cases {
        let errors = compile(to, extra).unwrap_err();
        assert!(
            errors.iter().any(|e| e.path == path),
            "to = {to} {extra}: expected an error at {path}, got {errors:?}"
        );
    }
}

#[test]
fn unknown_collection_is_named() {
    let mut errors = Vec::new();
    let mut config = route_config("\"$creator_id\"", "");
    config.collection = "ordres".into();
    assert!(compile_route(2, &config, Some(&mercury_catalog()), &mut errors).is_none());
    assert_eq!(errors[0].path, "route[2].collection");
    assert!(errors[0].message.contains("ordres"));
}

#[test]
fn literals_and_escapes_in_where() {
    let mut errors = Vec::new();
    let lit = toml::Value::String("$$raw".into());
    assert_eq!(
        compile_operand(&lit, "p", false, &mut errors),
        Some(Operand::Literal(json!("$raw")))
    );
    assert_eq!(
        compile_operand(&toml::Value::Integer(3), "p", false, &mut errors),
        Some(Operand::Literal(json!(3)))
    );
    assert!(errors.is_empty());
    assert_eq!(
        compile_operand(
            &toml::Value::String("$claim".into()),
            "p",
            true,
            &mut errors
        ),
        Some(Operand::Claim)
    );
    assert!(
        compile_operand(
            &toml::Value::String("$email".into()),
            "p",
            true,
            &mut errors
        )
        .is_none()
    );
    assert_eq!(errors.len(), 1);
}

fn inventory_catalog() -> Cat {
    let cols = |c: &[&str]| Some(c.iter().map(|s| s.to_string()).collect());
    let mut cat = mercury_catalog();
    cat.0.insert(
        "inventory_items".into(),
        cols(&[
            "_id",
            "name",
            "owned_by",
            "quantity_in_stock",
            "reorder_point",
        ]),
    );
    cat
}

fn stock_alert(extra: &str) -> Alert {
    let text = format!(
        r#"name = "stock_low"
collection = "inventory_items"
when = "doc.quantity_in_stock <= doc.reorder_point"
to = {{ lookup = "businesses", where = {{ _id = "$owned_by" }}, pick = "owner._id" }}
message = "Stock low: {{{{ doc.name }}}} has {{{{ doc.quantity_in_stock }}}} left."
{extra}"#
    );
    let config: AlertConfig = toml::from_str(&text).unwrap();
    let mut errors = Vec::new();
    alert::compile_alert(0, &config, Some(&inventory_catalog()), &mut errors)
        .unwrap_or_else(|| panic!("{errors:?}"))
}

fn item(qty: Option<i64>) -> Value {
    let mut v = json!({"_id": "i3", "name": "Rice", "owned_by": "b1", "reorder_point": 5});
    if let Some(q) = qty {
        v["quantity_in_stock"] = json!(q);
    }
    v
}

fn stock_change(op: Op, before: Option<Value>, after: Option<Value>) -> Change {
    Change {
        collection: "inventory_items".into(),
        key: "i3".into(),
        ..change(op, before, after)
    }
}

/// Runs stock levels through the router and returns the alert messages raised.
async fn alerts_for(router: &Router, levels: &[Option<i64>]) -> Vec<String> {
    let mut prev: Option<Value> = None;
    let mut out = Vec::new();
    for q in levels {
        let now = item(*q);
        let op = if prev.is_none() {
            Op::Insert
        } else {
            Op::Update
        };
        for d in router
            .route(&stock_change(op, prev.clone(), Some(now.clone())))
            .await
        {
            if let DeliveryKind::Alert { message, .. } = &d.kind {
                assert_eq!(ids(&d), vec!["u1"]);
                out.push(message.clone());
            }
        }
        prev = Some(now);
    }
    out
}

#[tokio::test]
async fn stock_low_fires_when_it_becomes_true_not_on_every_update() {
    let router = Router::new(vec![], vec![stock_alert("")], docs(), 100);
    let raised = alerts_for(&router, &[Some(10), Some(3), Some(2)]).await;
    assert_eq!(raised, vec!["Stock low: Rice has 3 left."]);
    // Restocked, then falling again: a second alert.
    let router = Router::new(vec![], vec![stock_alert("")], docs(), 100);
    let raised = alerts_for(&router, &[Some(10), Some(3), Some(2), Some(20), Some(4)]).await;
    assert_eq!(
        raised,
        vec!["Stock low: Rice has 3 left.", "Stock low: Rice has 4 left."]
    );
    // Inserted already low: fires once.
    let router = Router::new(vec![], vec![stock_alert("")], docs(), 100);
    assert_eq!(alerts_for(&router, &[Some(1), Some(0)]).await.len(), 1);
}

#[tokio::test]
async fn a_document_missing_the_field_is_skipped_and_later_ones_still_fire() {
    let router = Router::new(vec![], vec![stock_alert("")], docs(), 100);
    let raised = alerts_for(&router, &[None, None, Some(2)]).await;
    assert_eq!(raised, vec!["Stock low: Rice has 2 left."]);
}

#[tokio::test]
async fn cooldown_silences_repeats_for_a_while() {
    let router = Router::new(vec![], vec![stock_alert("cooldown = \"1h\"")], docs(), 100);
    let raised = alerts_for(&router, &[Some(10), Some(3), Some(20), Some(4)]).await;
    assert_eq!(raised.len(), 1, "{raised:?}");
}

#[tokio::test]
async fn alert_events_have_the_documented_shape() {
    let router = Router::new(
        vec![],
        vec![stock_alert("fields = [\"name\", \"quantity_in_stock\"]")],
        docs(),
        100,
    );
    let c = stock_change(Op::Update, Some(item(Some(9))), Some(item(Some(2))));
    let d = router.route(&c).await;
    let v: Value = serde_json::from_str(&d[0].encode("e1-7", &c)).unwrap();
    assert_eq!(
        v,
        json!({"type": "alert", "id": "e1-7", "alert": "stock_low", "collection": "inventory_items", "key": "i3",
               "message": "Stock low: Rice has 2 left.", "doc": {"_id": "i3", "name": "Rice", "quantity_in_stock": 2}})
    );
}

#[tokio::test]
async fn a_route_when_filters_changes() {
    let r = compile(
        OWNER,
        "when = \"doc.status == 'paid' && (before == null || before.status != 'paid')\"",
    )
    .unwrap();
    let router = Router::new(vec![r], vec![], docs(), 100);
    let new = json!({"_id": "o1", "creator_id": "b1", "status": "new"});
    let paid = json!({"_id": "o1", "creator_id": "b1", "status": "paid"});
    assert!(
        router
            .route(&change(Op::Insert, None, Some(new.clone())))
            .await
            .is_empty()
    );
    assert_eq!(
        router
            .route(&change(Op::Update, Some(new), Some(paid.clone())))
            .await
            .len(),
        1
    );
    assert!(
        router
            .route(&change(Op::Update, Some(paid.clone()), Some(paid)))
            .await
            .is_empty()
    );
    // A document the condition cannot evaluate is skipped, not fatal.
    let odd = json!({"_id": "o1", "creator_id": "b1"});
    assert!(
        router
            .route(&change(Op::Insert, None, Some(odd)))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn one_failing_rule_does_not_stop_the_others() {
    let broken = compile(
        r#"{ lookup = "missing_table", where = { _id = "$creator_id" } }"#,
        "",
    );
    // The catalog refuses an unknown collection, so build it without one.
    assert!(broken.is_err());
    let mut errors = Vec::new();
    let config = route_config(
        r#"{ lookup = "missing_table", where = { _id = "$creator_id" } }"#,
        "",
    );
    let broken = compile_route(0, &config, None, &mut errors).unwrap();
    let good = compile(OWNER, "").unwrap();
    let router = Router::new(vec![broken, good], vec![], docs(), 100);
    let d = router
        .route(&change(
            Op::Insert,
            None,
            Some(json!({"_id": "o1", "creator_id": "b1"})),
        ))
        .await;
    assert_eq!(d.len(), 1);
    assert_eq!(ids(&d[0]), vec!["u1"]);
}

#[tokio::test]
async fn a_burst_for_one_business_costs_one_lookup() {
    let docs = docs();
    let router = Router::new(vec![compile(OWNER, "").unwrap()], vec![], docs.clone(), 100);
    for i in 0..1000 {
        let c = change(
            Op::Insert,
            None,
            Some(json!({"_id": format!("o{i}"), "creator_id": "b1"})),
        );
        assert_eq!(ids(&router.route(&c).await[0]), vec!["u1"]);
    }
    assert_eq!(docs.queries.lock().unwrap().len(), 1);
}

#[test]
fn bad_alerts_are_refused_with_paths() {
    let base = r#"name = "a"
collection = "inventory_items"
when = "doc.quantity_in_stock <= doc.reorder_point"
to = "$owned_by"
message = "low"
"#;
    let cases = [
        (
            "when = \"doc.quantity_in_stock <= doc.reorder_point\"",
            "when = \"doc.quantity_in_stock <= \"",
            "alert[0].when",
        ),
        (
            "message = \"low\"",
            "message = \"{{ doc.name \"",
            "alert[0].message",
        ),
        ("to = \"$owned_by\"", "to = \"$owner\"", "alert[0].to"),
        (
            "collection = \"inventory_items\"",
            "collection = \"stock\"",
            "alert[0].collection",
        ),
        (
            "message = \"low\"",
            "message = \"low\"\non = [\"delete\"]",
            "alert[0].on",
        ),
        (
            "message = \"low\"",
            "message = \"low\"\ncooldown = \"0s\"",
            "alert[0].cooldown",
        ),
        (
            "when = \"doc.quantity_in_stock <= doc.reorder_point\"",
            "when = \"stock < 1\"",
            "alert[0].when",
        ),
    ];
    for (from, to, path) in cases {
        let text = base.replace(from, to);
        let config: AlertConfig = toml::from_str(&text).unwrap();
        let mut errors = Vec::new();
        assert!(
            alert::compile_alert(0, &config, Some(&inventory_catalog()), &mut errors).is_none(),
            "{text}"
        );
        assert!(errors.iter().any(|e| e.path == path), "{path}: {errors:?}");
    }
}

#[test]
fn a_single_list_of_recipients_is_passed_on_without_a_copy_and_several_are_merged() {
    let list: Recipients = vec![UserId::from("u1"), UserId::from("u2")].into();
    let mut one = RecipientSet::default();
    one.add_list(Arc::clone(&list));
    one.add_list(Vec::<UserId>::new().into());
    assert!(Arc::ptr_eq(&one.finish(), &list));

    let mut many = RecipientSet::default();
    many.add(UserId::from("u3"));
    many.add_list(Arc::clone(&list));
    many.add(UserId::from("u1"));
    let merged = many.finish();
    assert_eq!(
        merged.iter().map(|u| &**u).collect::<Vec<_>>(),
        ["u1", "u2", "u3"]
    );

    assert!(RecipientSet::default().is_empty());
    assert!(RecipientSet::default().finish().is_empty());
}

#[tokio::test]
async fn explain_is_a_dry_run_that_agrees_with_routing() {
    let docs = docs();
    let router = Router::new(
        vec![],
        vec![stock_alert("cooldown = \"1h\"")],
        docs.clone(),
        100,
    );
    let c = stock_change(Op::Update, Some(item(Some(9))), Some(item(Some(2))));
    // Explained twice: a cooldown recorded by the first would silence the second.
    for _ in 0..2 {
        let traces = router.explain(&c).await;
        assert_eq!(traces.len(), 1);
        let t = &traces[0];
        assert_eq!(t.when.as_ref().unwrap().value, Some(true));
        assert_eq!(t.before.as_ref().unwrap().value, Some(false));
        assert_eq!(t.message.as_deref(), Some("Stock low: Rice has 2 left."));
        assert_eq!(t.recipients, vec!["u1"]);
        let lookup = t.to[0].lookup.as_ref().unwrap();
        assert_eq!(lookup.filter["_id"], json!("b1"));
        assert!(!lookup.cached);
        assert!(t.cooldown.as_deref().unwrap().contains("not applied"));
    }
    // Nothing stored in the cache, every explain read the source.
    assert_eq!(router.cache().len(), 0);
    assert_eq!(docs.queries.lock().unwrap().len(), 2);

    // Routing the same change delivers what explain said, and fills the cache; explain
    // then reports the cached answer.
    let routed = router.route(&c).await;
    assert_eq!(ids(&routed[0]), vec!["u1"]);
    assert_eq!(router.cache().len(), 1);
    let traces = router.explain(&c).await;
    assert!(traces[0].to[0].lookup.as_ref().unwrap().cached);
    // The cooldown recorded by routing is not consulted by explain.
    assert_eq!(traces[0].recipients, vec!["u1"]);
    assert!(
        router.route(&c).await.is_empty(),
        "routing honours its cooldown"
    );
}

#[tokio::test]
async fn explain_traces_a_route_that_does_not_listen_and_a_missing_field() {
    let route = compile(OWNER, "on = [\"insert\"]").unwrap();
    let router = Router::new(vec![route], vec![], docs(), 100);
    let t = &router
        .explain(&change(Op::Update, None, Some(json!({"_id": "o1"}))))
        .await[0];
    assert!(!t.listens);
    assert_eq!(
        t.reason_for("u1", Op::Update).1,
        "route orders does not listen to `update` (on: insert)"
    );
    let t = &router
        .explain(&change(Op::Insert, None, Some(json!({"_id": "o1"}))))
        .await[0];
    assert_eq!(t.skip.as_ref().unwrap().reason, "no_recipients");
    assert_eq!(
        t.to[0].error.as_deref(),
        Some("the document has no `creator_id` (missing_field)")
    );
    assert_eq!(
        t.reason_for("u1", Op::Insert).1,
        "route orders reaches nobody (owner._id from `businesses` where _id = $creator_id: the document has no `creator_id` (missing_field))"
    );
}

/// Lookups that cannot reach the database for the first `down` calls (all of them with
/// `usize::MAX`), then answer from `docs`; each call notes what `/readyz` says then.
struct Flaky {
    docs: Arc<Docs>,
    down: usize,
    calls: std::sync::atomic::AtomicUsize,
    health: Arc<crate::source::Health>,
    seen: Mutex<Vec<Option<String>>>,
}

impl Flaky {
    fn new(down: usize, health: &Arc<crate::source::Health>) -> Arc<Flaky> {
        Arc::new(Flaky {
            docs: docs(),
            down,
            calls: Default::default(),
            health: Arc::clone(health),
            seen: Mutex::default(),
        })
    }
}

impl Lookup for Flaky {
    fn find(&self, query: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>> {
        self.seen.lock().unwrap().push(self.health.problem());
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < self.down {
            return Box::pin(async move {
                Err(LookupError::Unavailable {
                    collection: query.collection,
                    message: "connection refused".into(),
                })
            });
        }
        self.docs.find(query)
    }
}

fn patient_router(
    flaky: &Arc<Flaky>,
    health: &Arc<crate::source::Health>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Router {
    let patient = crate::source::patient::Patient::new(
        Arc::clone(flaky) as Arc<dyn Lookup>,
        Arc::clone(health),
        shutdown.clone(),
    );
    let gave_up = patient.gave_up();
    Router::new(
        vec![compile(OWNER, "").unwrap()],
        vec![],
        Arc::new(patient),
        100,
    )
    .interrupted_by(gave_up)
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_cannot_reach_the_database_waits_then_routes_to_the_owner() {
    let health = Arc::new(crate::source::Health::default());
    let flaky = Flaky::new(3, &health);
    let router = patient_router(&flaky, &health, &Default::default());
    let c = change(
        Op::Insert,
        None,
        Some(json!({"_id": "o1", "creator_id": "b1"})),
    );
    let d = router.route(&c).await;
    assert_eq!(d.len(), 1, "delivered, not skipped");
    assert_eq!(ids(&d[0]), vec!["u1"]);
    let seen = flaky.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "asked until it answered: {seen:?}");
    assert_eq!(seen[0], None);
    for reason in &seen[1..] {
        let reason = reason.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with("lookups: lookup in `businesses`: the database cannot be reached"),
            "/readyz says why while it waits: {reason:?}"
        );
    }
    assert_eq!(health.problem(), None, "ready again once it answered");
}

/// One appended batch: lost_history, its events' change positions, start, end.
type Appended = (bool, Vec<u64>, Option<Position>, Position);

/// A stream that records every batch appended, and takes it.
#[derive(Default)]
struct Recorded(Mutex<Vec<Appended>>);

impl crate::router::EventStream for Recorded {
    fn append(
        &self,
        batch: crate::router::RoutedBatch,
    ) -> BoxFuture<'_, Result<Option<Position>, crate::router::StreamError>> {
        let positions = batch
            .events
            .iter()
            .map(|e| e.position.as_seq().unwrap())
            .collect();
        self.0.lock().unwrap().push((
            batch.lost_history,
            positions,
            batch.start.clone(),
            batch.end.clone(),
        ));
        Box::pin(async move { Ok(Some(batch.end)) })
    }
    fn publish(
        &self,
        _: crate::change::Recipients,
        _: String,
    ) -> BoxFuture<'_, Result<String, crate::router::StreamError>> {
        Box::pin(async { Err(crate::router::StreamError::Stopped) })
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_while_a_lookup_waits_stops_routing_without_storing_or_acknowledging() {
    use crate::router::StreamError;
    let health = Arc::new(crate::source::Health::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let flaky = Flaky::new(usize::MAX, &health);
    let router = patient_router(&flaky, &health, &shutdown);
    let stream = Recorded::default();
    let (batch_tx, batch_rx) = tokio::sync::mpsc::channel(4);
    let (ack_tx, ack_rx) = tokio::sync::watch::channel(None);
    let c = change(
        Op::Insert,
        None,
        Some(json!({"_id": "o1", "creator_id": "b1"})),
    );
    batch_tx
        .send(crate::source::Batch::new(vec![c], Position::from_seq(1)))
        .await
        .unwrap();
    let run = crate::router::run(batch_rx, None, &router, &stream, ack_tx, None);
    tokio::pin!(run);
    // Let it wait for the database a while (paused time runs ahead when idle).
    let waited = tokio::time::timeout(std::time::Duration::from_secs(30), &mut run).await;
    assert!(waited.is_err(), "still waiting for the database");
    assert!(flaky.seen.lock().unwrap().len() > 3);
    shutdown.cancel();
    let ended = run.await;
    assert!(matches!(ended, Err(StreamError::Stopped)), "{ended:?}");
    assert!(stream.0.lock().unwrap().is_empty(), "nothing stored");
    assert_eq!(*ack_rx.borrow(), None, "nothing acknowledged");
}

#[tokio::test]
async fn batches_waiting_for_the_router_are_appended_together_and_a_loss_starts_its_own_group() {
    let order = |seq: u64| {
        let mut c = change(
            Op::Insert,
            None,
            Some(json!({"_id": format!("o{seq}"), "creator_id": "u1"})),
        );
        c.position = Position::from_seq(seq);
        c
    };
    let batch = |seqs: &[u64], lost: bool| {
        let mut b = crate::source::Batch::new(
            seqs.iter().map(|&s| order(s)).collect(),
            Position::from_seq(*seqs.last().unwrap()),
        );
        b.lost_history = lost;
        b
    };
    let router = Router::new(
        vec![compile("\"$creator_id\"", "").unwrap()],
        vec![],
        docs(),
        100,
    );
    let stream = Recorded::default();
    let (batch_tx, batch_rx) = tokio::sync::mpsc::channel(8);
    let (ack_tx, ack_rx) = tokio::sync::watch::channel(None);
    // All queued before the router runs: it is behind the source.
    for b in [
        batch(&[1, 2], false),
        batch(&[3], false),
        batch(&[4, 5], false),
        batch(&[6], true),
        batch(&[7], false),
    ] {
        batch_tx.send(b).await.unwrap();
    }
    drop(batch_tx);
    crate::router::run(batch_rx, None, &router, &stream, ack_tx, None)
        .await
        .unwrap();
    let pos = |s: u64| Position::from_seq(s);
    let keys = |r: std::ops::RangeInclusive<u64>| r.collect::<Vec<_>>();
    assert_eq!(
        *stream.0.lock().unwrap(),
        vec![
            (false, keys(1..=5), None, pos(5)),
            (true, keys(6..=7), Some(pos(5)), pos(7)),
        ],
        "the three waiting batches in one append; the loss first in the next"
    );
    assert_eq!(*ack_rx.borrow(), Some(pos(7)));
}
