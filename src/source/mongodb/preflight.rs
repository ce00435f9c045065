//! `changecast check --connect`: what a config assumes of the live deployment, verified.
//!
//! In: a compiled [`Plan`]. Out: one [`Finding`] per fact checked (`ok`, `warning` or
//! `error`, each naming the config path it concerns), printed by [`run`]. Only reads are
//! sent: `hello`, `listCollections`, the first and last entries of `local.oplog.rs`, and an
//! `aggregate` with `$sample` per collection. Every operation is bounded in time, so an
//! unreachable or silent server is an error, never a hang.
//!
//! Checked for MongoDB: a replica set or sharded cluster (change streams refuse a
//! standalone), each collection the rules read exists (a close name is suggested), pre-
//! and post-images where the rules need the old document, the oplog window against
//! `[history] max_age`, and that the fields the rules read occur in a sample of documents
//! (MongoDB has no schema to read, so a sample is the best evidence). For SQLite the file is
//! opened and its schema read, which `check` does with or without `--connect`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::IntoFuture;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

use crate::change::Op;
use crate::config::{Images, MongoSourceConfig};
use crate::path::FieldPath;
use crate::plan::{Plan, SourcePlan};
use crate::route::{LookupSpec, Operand, RecipientSpec};

/// Documents sampled per collection.
pub const SAMPLE_SIZE: i32 = 100;
/// Server selection timeout when the URI sets none (the driver's default is 30 s).
const SELECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest any one operation may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Pre- and post-images need MongoDB 6.0 (wire version 17).
const IMAGES_WIRE_VERSION: i32 = 17;

/// How a finding counts: only errors fail the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warning,
    Error,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// The config key concerned (`route[0].collection`, `history.max_age`).
    pub path: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        };
        write!(f, "{level}: {}: {}", self.path, self.message)
    }
}

/// Checks the plan against its source, prints every finding on stdout, and fails when any
/// is an error.
pub async fn run(plan: Plan) -> anyhow::Result<()> {
    let findings = check(&plan).await;
    for f in &findings {
        println!("{f}");
    }
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    let warnings = findings
        .iter()
        .filter(|f| f.level == Level::Warning)
        .count();
    println!("connected check: {errors} error(s), {warnings} warning(s)");
    if errors > 0 {
        anyhow::bail!("the source does not match the config ({errors} error(s) above)");
    }
    Ok(())
}

/// Every finding about the plan's source.
pub async fn check(plan: &Plan) -> Vec<Finding> {
    match &plan.source {
        SourcePlan::Sqlite(s) => vec![ok(
            "source.path",
            format!(
                "opened {} and read its schema (`check` does this with or without --connect)",
                s.path.display()
            ),
        )],
        SourcePlan::Mongodb(m) => check_mongodb(plan, m).await,
        SourcePlan::Postgres(p) => crate::source::postgres::preflight::check(plan, p).await,
    }
}

/// Each collection (table) whose rules need the old document (pre-images, PostgreSQL's
/// `REPLICA IDENTITY FULL`), with why, in config order.
pub fn tables_needing_old_documents(plan: &Plan) -> Vec<(String, Vec<String>)> {
    Uses::of(plan).images
}

pub(crate) fn ok(path: &str, message: impl Into<String>) -> Finding {
    finding(Level::Ok, path, message)
}
pub(crate) fn warning(path: &str, message: impl Into<String>) -> Finding {
    finding(Level::Warning, path, message)
}
pub(crate) fn error(path: &str, message: impl Into<String>) -> Finding {
    finding(Level::Error, path, message)
}
fn finding(level: Level, path: &str, message: impl Into<String>) -> Finding {
    Finding {
        level,
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Runs `op` within [`OPERATION_TIMEOUT`]; both failures become one message.
async fn bounded<T>(
    what: &str,
    op: impl IntoFuture<Output = mongodb::error::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(OPERATION_TIMEOUT, op.into_future()).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {}s",
            OPERATION_TIMEOUT.as_secs()
        )),
    }
}

/// What the deployment is, from `hello`.
enum Kind {
    ReplicaSet(String),
    Sharded,
    Standalone,
}

async fn check_mongodb(plan: &Plan, config: &MongoSourceConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut options = match ClientOptions::parse(&config.uri).await {
        Ok(o) => o,
        Err(e) => {
            out.push(error("source.uri", format!("bad connection string: {e}")));
            return out;
        }
    };
    if options.server_selection_timeout.is_none() {
        options.server_selection_timeout = Some(SELECTION_TIMEOUT);
    }
    let client = match Client::with_options(options) {
        Ok(c) => c,
        Err(e) => {
            out.push(error("source.uri", format!("cannot create a client: {e}")));
            return out;
        }
    };
    let hello = bounded(
        "hello",
        client.database("admin").run_command(doc! {"hello": 1}),
    )
    .await;
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            out.push(error(
                "source.uri",
                format!(
                    "cannot reach the deployment ({e}); is it running, and does the URI's \
                     replicaSet match its replica set name?"
                ),
            ));
            return out;
        }
    };
    let kind = match hello.get_str("setName") {
        Ok(name) => Kind::ReplicaSet(name.to_owned()),
        Err(_) if hello.get_str("msg") == Ok("isdbgrid") => Kind::Sharded,
        Err(_) => Kind::Standalone,
    };
    out.push(match &kind {
        Kind::ReplicaSet(name) => ok("source.uri", format!("replica set `{name}`")),
        Kind::Sharded => ok("source.uri", "sharded cluster (mongos)"),
        Kind::Standalone => error(
            "source.uri",
            "a standalone server: change streams need a replica set or a sharded cluster. \
             Start mongod with --replSet rs0 and run rs.initiate() once in mongosh \
             (a one-node replica set is enough), then add replicaSet=rs0 to the URI",
        ),
    });
    let wire = match hello.get("maxWireVersion").cloned() {
        Some(Bson::Int32(v)) => Some(v),
        Some(Bson::Int64(v)) => i32::try_from(v).ok(),
        _ => None,
    };

    let db = client.database(&config.database);
    let uses = Uses::of(plan);
    let existing = match list_collections(&db).await {
        Ok(c) => c,
        Err(e) => {
            out.push(error(
                "source.database",
                format!("cannot list the collections of `{}`: {e}", config.database),
            ));
            return out;
        }
    };
    for (coll, path) in &uses.collections {
        if existing.contains_key(coll) {
            out.push(ok(path, format!("`{coll}` exists")));
            continue;
        }
        let names = existing.keys().map(String::as_str);
        out.push(match did_you_mean(coll, names) {
            Some(near) => error(
                path,
                format!(
                    "no collection `{coll}` in database `{}`; did you mean `{near}`?",
                    config.database
                ),
            ),
            // Maybe created later by the app: its rules see nothing until then.
            None => warning(
                path,
                format!(
                    "no collection `{coll}` in database `{}` yet: its rules see nothing until \
                     it is created{}",
                    config.database,
                    existing_list(&existing)
                ),
            ),
        });
    }

    check_images(config, &uses, &existing, wire, &mut out);
    check_oplog(&client, &kind, plan, &mut out).await;
    check_fields(&db, &uses, &existing, &mut out).await;
    out
}

fn existing_list(existing: &BTreeMap<String, bool>) -> String {
    if existing.is_empty() {
        " (the database has no collections)".to_owned()
    } else {
        let names: Vec<&str> = existing.keys().map(String::as_str).collect();
        format!(" (the database has: {})", names.join(", "))
    }
}

/// Collection name → whether pre- and post-images are enabled on it.
async fn list_collections(db: &Database) -> Result<BTreeMap<String, bool>, String> {
    let listing = async {
        let mut cursor = db
            .run_cursor_command(doc! {"listCollections": 1, "authorizedCollections": true})
            .await?;
        let mut found = BTreeMap::new();
        while let Some(spec) = cursor.try_next().await? {
            let Ok(name) = spec.get_str("name") else {
                continue;
            };
            let enabled = spec
                .get_document("options")
                .and_then(|o| o.get_document("changeStreamPreAndPostImages"))
                .and_then(|i| i.get_bool("enabled"))
                .unwrap_or(false);
            found.insert(name.to_owned(), enabled);
        }
        Ok(found)
    };
    bounded("listCollections", listing).await
}

/// Pre- and post-images on every collection whose rules need the old document.
fn check_images(
    config: &MongoSourceConfig,
    uses: &Uses,
    existing: &BTreeMap<String, bool>,
    wire: Option<i32>,
    out: &mut Vec<Finding>,
) {
    const PATH: &str = "source.pre_and_post_images";
    let mode = config.pre_and_post_images;
    if mode != Images::Off
        && !uses.images.is_empty()
        && wire.is_some_and(|w| w < IMAGES_WIRE_VERSION)
    {
        out.push(error(
            PATH,
            "pre- and post-images need MongoDB 6.0 or newer and this server is older: \
             upgrade, or set pre_and_post_images = \"off\" (deletes then cannot be routed by owner)",
        ));
        return;
    }
    for (coll, needs) in &uses.images {
        let Some(&enabled) = existing.get(coll) else {
            continue; // reported missing above
        };
        let why = needs.join("; ");
        out.push(match (mode, enabled) {
            (Images::Off, true) => warning(
                PATH,
                format!(
                    "\"off\", so without the old documents of `{coll}`: {why}. They are enabled \
                     on `{coll}`: set pre_and_post_images = \"assume\" to use them"
                ),
            ),
            (Images::Off, false) => warning(
                PATH,
                format!(
                    "\"off\", so without the old documents of `{coll}`: {why}. Set \
                     pre_and_post_images = \"ensure\" to have them"
                ),
            ),
            (_, true) => ok(PATH, format!("enabled on `{coll}`")),
            (Images::Ensure, false) => ok(
                PATH,
                format!(
                    "not enabled on `{coll}` yet: `serve` enables them at start (collMod; the \
                     user needs the collMod privilege)"
                ),
            ),
            (Images::Assume, false) => error(
                PATH,
                format!(
                    "\"assume\", but they are not enabled on `{coll}`, so {why}. Enable them \
                     with db.runCommand({{collMod: \"{coll}\", changeStreamPreAndPostImages: \
                     {{enabled: true}}}}), or set pre_and_post_images = \"ensure\""
                ),
            ),
        });
    }
}

/// The oplog window against `[history] max_age`.
async fn check_oplog(client: &Client, kind: &Kind, plan: &Plan, out: &mut Vec<Finding>) {
    const PATH: &str = "history.max_age";
    let max_age = plan.history.max_age;
    match kind {
        Kind::Standalone => return, // no oplog: the error above says what to do
        Kind::Sharded => {
            out.push(warning(
                PATH,
                format!(
                    "the oplog window is not checked through mongos: it is each shard's own. \
                     Check it on every shard (rs.printReplicationInfo()) against {}",
                    human(max_age)
                ),
            ));
            return;
        }
        Kind::ReplicaSet(_) => {}
    }
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let entry = |order: i32| {
        let oplog = oplog.clone();
        async move {
            let mut cursor = oplog
                .find(doc! {})
                .sort(doc! {"$natural": order})
                .projection(doc! {"ts": 1})
                .limit(1)
                .await?;
            cursor.try_next().await
        }
    };
    let (first, last) = match (
        bounded("reading local.oplog.rs", entry(1)).await,
        bounded("reading local.oplog.rs", entry(-1)).await,
    ) {
        (Ok(first), Ok(last)) => (first, last),
        (Err(e), _) | (_, Err(e)) => {
            out.push(warning(
                PATH,
                format!("the oplog window was not checked: {e} (reading it needs read access to `local`)"),
            ));
            return;
        }
    };
    let ts = |d: Option<Document>| d.and_then(|d| d.get_timestamp("ts").ok());
    let (Some(first), Some(last)) = (ts(first), ts(last)) else {
        out.push(warning(
            PATH,
            "the oplog has no entries with a timestamp: its window was not checked",
        ));
        return;
    };
    let window = u64::from(last.time.saturating_sub(first.time));
    let hours = window as f64 / 3600.0;
    if window < max_age.as_secs() {
        out.push(warning(
            PATH,
            format!(
                "the oplog holds {hours:.1} h of changes, less than history.max_age ({}): \
                 if changecast is stopped for longer than {hours:.1} h it cannot resume, the \
                 changes in between are lost and clients get `gap` although their history \
                 reaches back further. Grow the oplog (replSetResizeOplog) or lower max_age",
                human(max_age)
            ),
        ));
    } else {
        out.push(ok(
            PATH,
            format!(
                "the oplog holds {hours:.1} h of changes (history.max_age {})",
                human(max_age)
            ),
        ));
    }
}

/// Sampled documents and every dotted path they have.
type Sample = (Vec<Document>, BTreeSet<String>);

/// Every field a rule reads, looked for in a sample of its collection's documents.
async fn check_fields(
    db: &Database,
    uses: &Uses,
    existing: &BTreeMap<String, bool>,
    out: &mut Vec<Finding>,
) {
    // Each collection sampled once, in config order; `None`: not sampled (reported).
    let mut samples: BTreeMap<&str, Option<Sample>> = BTreeMap::new();
    for u in &uses.fields {
        let coll = u.collection.as_str();
        if samples.contains_key(coll) || !existing.contains_key(coll) {
            continue;
        }
        let path = uses.path_of(coll).unwrap_or("source.database");
        let sampling = async {
            let mut cursor = db
                .collection::<Document>(coll)
                .aggregate(vec![doc! {"$sample": {"size": SAMPLE_SIZE}}])
                .await?;
            let mut docs = Vec::new();
            while let Some(d) = cursor.try_next().await? {
                docs.push(d);
            }
            Ok(docs)
        };
        let sample = match bounded(&format!("sampling `{coll}`"), sampling).await {
            Ok(docs) if docs.is_empty() => {
                out.push(ok(
                    path,
                    format!(
                        "`{coll}` has no documents yet: the fields its rules read were not checked"
                    ),
                ));
                None
            }
            Ok(docs) => {
                let mut seen = BTreeSet::new();
                for d in &docs {
                    paths_of(d, "", 0, &mut seen);
                }
                Some((docs, seen))
            }
            Err(e) => {
                out.push(warning(path, format!("its fields were not checked: {e}")));
                None
            }
        };
        samples.insert(coll, sample);
    }
    for u in &uses.fields {
        let coll = u.collection.as_str();
        let Some(Some((docs, seen))) = samples.get(coll) else {
            continue;
        };
        let segments: Vec<&str> = u.field.iter().map(String::as_str).collect();
        let found = docs.iter().filter(|d| has_path(d, &segments)).count();
        let name = segments.join(".");
        let n = docs.len();
        if found > 0 {
            out.push(ok(
                &u.path,
                format!("`{name}` is in {found} of {n} sampled documents of `{coll}`"),
            ));
            continue;
        }
        let hint = did_you_mean(&name, seen.iter().map(String::as_str))
            .map(|near| format!("; did you mean `{near}`?"))
            .unwrap_or_default();
        out.push(warning(
            &u.path,
            format!(
                "none of {n} sampled documents of `{coll}` has `{name}`, read by {}{hint}",
                u.rule
            ),
        ));
    }
}

/// Whether any value is at `segments` in `doc`, descending into arrays as MongoDB does.
fn has_path(doc: &Document, segments: &[&str]) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return true;
    };
    doc.get(*first).is_some_and(|v| bson_has_path(v, rest))
}

fn bson_has_path(v: &Bson, segments: &[&str]) -> bool {
    match v {
        _ if segments.is_empty() => true,
        Bson::Document(d) => has_path(d, segments),
        Bson::Array(items) => items.iter().any(|i| bson_has_path(i, segments)),
        _ => false,
    }
}

/// Every dotted path in `doc` (a few levels deep), for suggestions.
fn paths_of(doc: &Document, prefix: &str, depth: usize, out: &mut BTreeSet<String>) {
    if depth > 3 || out.len() > 10_000 {
        return;
    }
    for (k, v) in doc {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Bson::Document(d) => paths_of(d, &path, depth + 1, out),
            Bson::Array(items) => {
                for d in items.iter().filter_map(Bson::as_document).take(10) {
                    paths_of(d, &path, depth + 1, out);
                }
            }
            _ => {}
        }
        out.insert(path);
    }
}

/// The candidate closest to `word`, when close enough to be a likely misspelling.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_lowercase();
    candidates
        .map(|c| {
            (
                strsim::normalized_damerau_levenshtein(&word, &c.to_lowercase()),
                c,
            )
        })
        .filter(|(score, _)| *score >= 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// A duration as users write it: `24h`, `90m`, else humantime's form.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s > 0 && d.subsec_nanos() == 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 0 && d.subsec_nanos() == 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// A field a rule reads, with the config key that names it.
pub(crate) struct FieldUse {
    pub(crate) path: String,
    /// `route \`orders\``
    pub(crate) rule: String,
    pub(crate) collection: String,
    pub(crate) field: Vec<String>,
}

/// What the plan reads: collections (with the first config key naming each), fields, and
/// the rules that need the old documents of a collection.
pub(crate) struct Uses {
    /// In config order, each once.
    pub(crate) collections: Vec<(String, String)>,
    /// In config order.
    pub(crate) fields: Vec<FieldUse>,
    /// Collection → why its rules need pre-images ("route `orders` cannot route deletes"),
    /// in config order.
    pub(crate) images: Vec<(String, Vec<String>)>,
}

impl Uses {
    pub(crate) fn of(plan: &Plan) -> Uses {
        let mut u = Uses {
            collections: Vec::new(),
            fields: Vec::new(),
            images: Vec::new(),
        };
        for (i, r) in plan.routes.iter().enumerate() {
            let at = format!("route[{i}]");
            let rule = format!("route `{}`", r.name);
            u.collection(&r.collection, &format!("{at}.collection"));
            u.recipients(&at, &rule, &r.collection, &r.to);
            for (k, f) in r.fields.iter().flatten().enumerate() {
                u.field(&format!("{at}.fields[{k}]"), &rule, &r.collection, f);
            }
            if let Some(w) = &r.when {
                u.top_level(&format!("{at}.when"), &rule, &r.collection, &w.reads);
            }
            let mut needs = Vec::new();
            if r.ops.contains(&Op::Delete) {
                needs.push("cannot route deletes (they are routed from the deleted document)");
            }
            if (r.ops.contains(&Op::Update) || r.ops.contains(&Op::Replace)) && !r.reads.is_empty()
            {
                needs.push("cannot tell the old recipients when a document moves to others");
            }
            if r.when.as_ref().is_some_and(|w| w.uses("before")) {
                needs.push("cannot read `before` in its condition");
            }
            u.needs_images(&r.collection, &rule, &needs);
        }
        for (i, a) in plan.alerts.iter().enumerate() {
            let at = format!("alert[{i}]");
            let rule = format!("alert `{}`", a.name);
            u.collection(&a.collection, &format!("{at}.collection"));
            u.recipients(&at, &rule, &a.collection, &a.to);
            for (k, f) in a.fields.iter().flatten().enumerate() {
                u.field(&format!("{at}.fields[{k}]"), &rule, &a.collection, f);
            }
            u.top_level(&format!("{at}.when"), &rule, &a.collection, &a.when.reads);
            u.top_level(
                &format!("{at}.message"),
                &rule,
                &a.collection,
                &a.message_reads,
            );
            if a.ops.contains(&Op::Update) || a.ops.contains(&Op::Replace) {
                u.needs_images(
                    &a.collection,
                    &rule,
                    &["cannot compare before and after (it may fire again while its condition stays true)"],
                );
            }
        }
        if let Some(l) = plan.auth.lookup() {
            u.lookup("auth.user", "the user lookup ([auth] user)", None, l);
        }
        if let SourcePlan::Mongodb(MongoSourceConfig {
            collections: Some(list),
            ..
        }) = &plan.source
        {
            for c in list {
                u.collection(c, "source.collections");
            }
        }
        if let SourcePlan::Postgres(crate::config::PostgresSourceConfig {
            tables: Some(list),
            ..
        }) = &plan.source
        {
            for c in list {
                u.collection(c, "source.tables");
            }
        }
        u
    }

    fn collection(&mut self, name: &str, path: &str) {
        if self.path_of(name).is_none() {
            self.collections.push((name.to_owned(), path.to_owned()));
        }
    }

    /// The first config key naming collection `name`.
    fn path_of(&self, name: &str) -> Option<&str> {
        self.collections
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, p)| p.as_str())
    }

    fn field(&mut self, path: &str, rule: &str, collection: &str, field: &FieldPath) {
        let mut segments = vec![field.root().to_owned()];
        segments.extend(field.rest().iter().cloned());
        self.fields.push(FieldUse {
            path: path.to_owned(),
            rule: rule.to_owned(),
            collection: collection.to_owned(),
            field: segments,
        });
    }

    fn top_level(
        &mut self,
        path: &str,
        rule: &str,
        collection: &str,
        reads: &crate::route::expr::Reads,
    ) {
        if let crate::route::expr::Reads::Fields(fields) = reads {
            for f in fields {
                self.fields.push(FieldUse {
                    path: path.to_owned(),
                    rule: rule.to_owned(),
                    collection: collection.to_owned(),
                    field: vec![f.clone()],
                });
            }
        }
    }

    /// The fields `to` reads: of the changed document first, then of each lookup's.
    fn recipients(&mut self, at: &str, rule: &str, collection: &str, to: &[RecipientSpec]) {
        let multiple = to.len() > 1;
        for (j, spec) in to.iter().enumerate() {
            let p = if multiple {
                format!("{at}.to[{j}]")
            } else {
                format!("{at}.to")
            };
            match spec {
                RecipientSpec::Field(f) => self.field(&p, rule, collection, f),
                RecipientSpec::Lookup(l) => self.lookup(&p, rule, Some(collection), l),
            }
        }
    }

    fn lookup(&mut self, at: &str, rule: &str, changed: Option<&str>, l: &LookupSpec) {
        self.collection(&l.collection, &format!("{at}.lookup"));
        for (target, operand) in &l.filter {
            let p = format!("{at}.where.{target}");
            if let (Operand::Field(f), Some(changed)) = (operand, changed) {
                self.field(&p, rule, changed, f);
            }
            self.field(&p, rule, &l.collection, target);
        }
        self.field(&format!("{at}.pick"), rule, &l.collection, &l.pick);
    }

    fn needs_images(&mut self, collection: &str, rule: &str, needs: &[&str]) {
        if needs.is_empty() {
            return;
        }
        let why = format!("{rule} {}", needs.join(" and "));
        match self.images.iter_mut().find(|(c, _)| c == collection) {
            Some((_, list)) => list.push(why),
            None => self.images.push((collection.to_owned(), vec![why])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_take_the_closest_likely_misspelling_only() {
        let names = ["orders", "businesses", "users"];
        assert_eq!(did_you_mean("ordres", names.into_iter()), Some("orders"));
        assert_eq!(did_you_mean("Users", names.into_iter()), Some("users"));
        assert_eq!(did_you_mean("invoices", names.into_iter()), None);
        assert_eq!(
            did_you_mean("creator_id", ["creatorId", "status"].into_iter()),
            Some("creatorId")
        );
    }

    #[test]
    fn paths_descend_documents_and_arrays() {
        let d = doc! {"owner": {"_id": "u1"}, "members": [{"user_id": "u2"}, {"role": "x"}]};
        assert!(has_path(&d, &["owner", "_id"]));
        assert!(has_path(&d, &["members", "user_id"]));
        assert!(!has_path(&d, &["owner", "name"]));
        assert!(!has_path(&d, &["members", "email"]));
        let mut seen = BTreeSet::new();
        paths_of(&d, "", 0, &mut seen);
        assert!(seen.contains("owner._id") && seen.contains("members.role"));
    }

    #[test]
    fn durations_read_as_users_write_them() {
        assert_eq!(human(Duration::from_secs(24 * 3600)), "24h");
        assert_eq!(human(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(human(Duration::from_millis(1500)), "1s 500ms");
    }
}
