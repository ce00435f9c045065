//! The compiled plan: a whole config validated at once, before anything starts.
//!
//! In: a parsed [`Config`]. Out: a [`Plan`] — the source to open, the collections it must
//! watch, compiled routes and auth — or every error found, each naming its config path.
//! `changecast check` prints [`Plan::describe`]; `serve` and `demo` start from a plan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;

use crate::auth::AuthPlan;
use crate::change::Op;
use crate::config::{
    Config, ConfigError, ConfigErrors, HistoryConfig, LookupsConfig, MongoSourceConfig,
    PostgresSourceConfig, PublishConfig, ServerConfig, SourceConfig, SqliteSourceConfig,
};
use crate::route::alert::{Alert, compile_alert};
use crate::route::expr::Reads;
use crate::route::{RecipientSpec, Route, check_lookup_names, compile_route};
use crate::source::Catalog;
use crate::source::mongodb::pipeline::StreamSpec;
use crate::source::sqlite::SqliteCatalog;

/// The source to open.
#[derive(Debug, Clone)]
pub enum SourcePlan {
    Sqlite(SqliteSourceConfig),
    Mongodb(MongoSourceConfig),
    Postgres(PostgresSourceConfig),
}

/// A validated configuration, ready to run.
#[derive(Clone)]
pub struct Plan {
    pub server: ServerConfig,
    pub history: HistoryConfig,
    pub source: SourcePlan,
    pub auth: AuthPlan,
    pub routes: Vec<Route>,
    pub alerts: Vec<Alert>,
    pub lookups: LookupsConfig,
    /// API keys for `POST /v1/publish` (none: publishing is off).
    pub publish_keys: Vec<String>,
    /// `[auth] expiry_warning`.
    pub expiry_warning: std::time::Duration,
    /// `[cluster]`: this node's part in a cluster (`None`: one process).
    pub cluster: Option<crate::config::ClusterConfig>,
}

/// A config checked as a whole: the plan or every error, and the warnings either way.
pub struct Checked {
    pub plan: Result<Plan, ConfigErrors>,
    /// Things that are valid but would most likely deliver to nobody (a `where` value
    /// that names a field but lacks its `$`). `check` prints them and `--strict` fails on
    /// them; `serve` logs them at start. Same path and message form as errors.
    pub warnings: Vec<ConfigError>,
}

impl Plan {
    /// Validates `config` as a whole; reads the source's schema to check names.
    /// Warnings are dropped: [`Plan::check`] has them.
    pub fn compile(config: &Config) -> Result<Plan, ConfigErrors> {
        Plan::check(config).plan
    }

    /// Validates `config` as a whole, as [`Plan::compile`], and says what looks wrong
    /// though valid.
    pub fn check(config: &Config) -> Checked {
        let mut warnings = Vec::new();
        let plan = Plan::compile_into(config, &mut warnings);
        Checked { plan, warnings }
    }

    /// Checks what parsed of a config ([`crate::config::Partial`]): its parse errors
    /// and the plan's errors about the sections that did parse, all in one list, so a
    /// bad section does not hide another's errors.
    pub fn check_partial(partial: &crate::config::Partial) -> Checked {
        let Some(config) = &partial.config else {
            return Checked {
                plan: Err(ConfigErrors(partial.errors.clone())),
                warnings: Vec::new(),
            };
        };
        let mut checked = Plan::check(config);
        checked.warnings.retain(|w| !partial.is_stand_in(&w.path));
        if !partial.errors.is_empty() {
            let mut errors = partial.errors.clone();
            if let Err(more) = checked.plan {
                errors.extend(more.0.into_iter().filter(|e| !partial.is_stand_in(&e.path)));
            }
            checked.plan = Err(ConfigErrors(errors));
        }
        checked
    }

    /// [`Plan::compile`], adding warnings to `warnings`.
    fn compile_into(
        config: &Config,
        warnings: &mut Vec<ConfigError>,
    ) -> Result<Plan, ConfigErrors> {
        let mut errors = Vec::new();
        let source = match &config.source {
            SourceConfig::Sqlite(s) => Some(SourcePlan::Sqlite(s.clone())),
            SourceConfig::Mongodb(m) => {
                if !(m.uri.starts_with("mongodb://") || m.uri.starts_with("mongodb+srv://")) {
                    errors.push(ConfigError::new(
                        "source.uri",
                        "expected a connection string starting with mongodb:// or mongodb+srv://",
                    ));
                }
                if m.database.is_empty() {
                    errors.push(ConfigError::new("source.database", "must not be empty"));
                }
                Some(SourcePlan::Mongodb(m.clone()))
            }
            SourceConfig::Postgres(p) => {
                check_postgres(p, &mut errors);
                Some(SourcePlan::Postgres(p.clone()))
            }
        };
        // What the source can tell about names before anything starts: SQLite reads its
        // schema; MongoDB collections are schemaless and checked when used.
        let catalog = match &source {
            Some(SourcePlan::Sqlite(s)) if !s.path.exists() => {
                errors.push(ConfigError::new(
                    "source.path",
                    format!("no database file at {}", s.path.display()),
                ));
                None
            }
            Some(SourcePlan::Sqlite(s)) => match SqliteCatalog::read(&s.path) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(ConfigError::new("source.path", e.to_string()));
                    None
                }
            },
            _ => None,
        };
        let catalog = catalog.as_ref().map(|c| c as &dyn Catalog);
        if let (Some(SourcePlan::Sqlite(s)), Some(catalog)) = (&source, catalog) {
            check_json_columns(&s.json_columns, catalog, &mut errors);
        }
        if let Some(catalog) = catalog {
            literal_field_warnings(config, catalog, warnings);
        }
        if let SourceConfig::Sqlite(_) = &config.source {
            sqlite_replace_warnings(config, warnings);
        }

        // Every duration and size key: zero, too large, overflow.
        config.check_ranges(&mut errors);
        if let Some(c) = &config.cluster {
            crate::cluster::validate(c, &mut errors);
        }

        let auth = AuthPlan::compile(&config.auth, &mut errors);
        if let (Some(auth), Some(catalog)) = (&auth, catalog)
            && let Some(l) = auth.lookup()
        {
            check_lookup_names("auth.user", l, catalog, &mut errors);
        }

        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut routes = Vec::new();
        for (i, r) in config.routes.iter().enumerate() {
            if let Some(first) = names.insert(r.name.as_str(), i) {
                errors.push(ConfigError::new(
                    format!("route[{i}].name"),
                    format!("`{}` is already the name of route[{first}]", r.name),
                ));
            }
            if let Some(route) = compile_route(i, r, catalog, &mut errors) {
                routes.push(route);
            }
        }
        let publish_keys = publish_keys(&config.publish, &mut errors);
        let mut alert_names: HashMap<&str, usize> = HashMap::new();
        let mut alerts = Vec::new();
        for (i, a) in config.alerts.iter().enumerate() {
            if let Some(first) = alert_names.insert(a.name.as_str(), i) {
                errors.push(ConfigError::new(
                    format!("alert[{i}].name"),
                    format!("`{}` is already the name of alert[{first}]", a.name),
                ));
            }
            if let Some(alert) = compile_alert(i, a, catalog, &mut errors) {
                alerts.push(alert);
            }
        }

        let listed = match &config.source {
            SourceConfig::Mongodb(MongoSourceConfig {
                collections: Some(list),
                ..
            }) => Some(("source.collections", list)),
            SourceConfig::Postgres(PostgresSourceConfig {
                tables: Some(list), ..
            }) => Some(("source.tables", list)),
            _ => None,
        };
        if let Some((at, list)) = listed {
            let named = routes
                .iter()
                .map(|r| &r.collection)
                .chain(alerts.iter().map(|a| &a.collection));
            for c in named {
                if !list.contains(c) {
                    errors.push(ConfigError::new(
                        at,
                        format!("`{c}` is read by a rule but not in this list"),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        match (source, auth) {
            (Some(source), Some(auth)) => Ok(Plan {
                server: config.server.clone(),
                history: config.history.clone(),
                source,
                auth,
                routes,
                alerts,
                lookups: config.lookups.clone(),
                publish_keys,
                expiry_warning: config.auth.expiry_warning,
                cluster: config.cluster.clone(),
            }),
            _ => Err(ConfigErrors(vec![ConfigError::new("config", "invalid")])),
        }
    }

    /// What the source must watch: every collection a rule reads, with the operations the
    /// rules use, and every collection a lookup reads (all operations: their changes
    /// invalidate cached lookups).
    pub fn watched(&self) -> BTreeMap<String, BTreeSet<Op>> {
        let mut m: BTreeMap<String, BTreeSet<Op>> = BTreeMap::new();
        for r in &self.routes {
            m.entry(r.collection.clone()).or_default().extend(&r.ops);
        }
        for a in &self.alerts {
            m.entry(a.collection.clone()).or_default().extend(&a.ops);
        }
        for l in self.lookups_used() {
            m.entry(l.collection.clone()).or_default().extend(Op::ALL);
        }
        if let SourcePlan::Mongodb(MongoSourceConfig {
            collections: Some(list),
            ..
        })
        | SourcePlan::Postgres(PostgresSourceConfig {
            tables: Some(list), ..
        }) = &self.source
        {
            for c in list {
                m.entry(c.clone()).or_default();
            }
        }
        m
    }

    /// The change-stream request for a MongoDB source.
    pub fn stream_spec(&self, config: &MongoSourceConfig) -> StreamSpec {
        StreamSpec {
            watched: self.watched(),
            needed: self.needed_fields(),
            images: config.pre_and_post_images,
        }
    }

    fn lookups_used(&self) -> impl Iterator<Item = &crate::route::LookupSpec> {
        let routes = self.routes.iter().flat_map(|r| r.to.iter());
        let alerts = self.alerts.iter().flat_map(|a| a.to.iter());
        routes.chain(alerts).filter_map(|s| match s {
            RecipientSpec::Lookup(l) => Some(l),
            RecipientSpec::Field(_) => None,
        })
    }

    /// The top-level fields of each watched collection that changecast needs to see
    /// (`Whole` when a rule sends or reads the whole document). A source that can project
    /// (MongoDB's `$project`) sends only these.
    pub fn needed_fields(&self) -> BTreeMap<String, Reads> {
        let mut m: BTreeMap<String, Reads> = BTreeMap::new();
        let mut add = |coll: &str,
                       to: &BTreeSet<String>,
                       fields: Option<&[crate::path::FieldPath]>,
                       when: Option<&Reads>| {
            let entry = m.entry(coll.to_owned()).or_insert_with(Reads::none);
            entry.add("_id");
            to.iter().for_each(|f| entry.add(f));
            match fields {
                Some(fs) => fs.iter().for_each(|f| entry.add(f.root())),
                None => *entry = Reads::Whole,
            }
            if let Some(w) = when {
                entry.merge(w);
            }
        };
        for r in &self.routes {
            add(
                &r.collection,
                &r.reads,
                r.fields.as_deref(),
                r.when.as_ref().map(|w| &w.reads),
            );
        }
        for a in &self.alerts {
            let mut reads = a.when.reads.clone();
            reads.merge(&a.message_reads);
            add(&a.collection, &a.reads, a.fields.as_deref(), Some(&reads));
        }
        // Invalidating cached lookups needs the fields their conditions test.
        let lookups: Vec<(String, Vec<String>)> = self
            .lookups_used()
            .map(|l| {
                (
                    l.collection.clone(),
                    l.filter.iter().map(|(f, _)| f.root().to_owned()).collect(),
                )
            })
            .collect();
        for (coll, fields) in lookups {
            let entry = m.entry(coll).or_insert_with(Reads::none);
            entry.add("_id");
            fields.iter().for_each(|f| entry.add(f));
        }
        m
    }

    /// The router of these rules, on `lookup`, with the configured cache (one process's,
    /// or a cluster node's for each routing term).
    pub fn router(
        &self,
        lookup: std::sync::Arc<dyn crate::source::Lookup>,
    ) -> crate::route::Router {
        crate::route::Router::new(
            self.routes.clone(),
            self.alerts.clone(),
            lookup,
            self.lookups.cache_entries,
        )
    }

    /// The plan in words, for `changecast check`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        match &self.source {
            SourcePlan::Sqlite(c) => {
                let _ = writeln!(s, "source: sqlite {}", c.path.display());
                let _ = writeln!(
                    s,
                    "  change log: triggers on every watched table, polled every {}, batches of {}",
                    human(c.poll_interval),
                    c.batch_size
                );
            }
            SourcePlan::Mongodb(c) => {
                let _ = writeln!(
                    s,
                    "source: mongodb {} database {}",
                    redact(&c.uri),
                    c.database
                );
                let images = match c.pre_and_post_images {
                    crate::config::Images::Ensure => {
                        "ensure (collMod on the watched collections at start)"
                    }
                    crate::config::Images::Assume => "assume (already enabled)",
                    crate::config::Images::Off => "off (deletes cannot be routed by owner)",
                };
                let _ = writeln!(s, "  pre- and post-images: {images}");
                let _ = match c.checkpoint {
                    crate::config::CheckpointStore::Mongodb => writeln!(
                        s,
                        "  resume token: collection {}.{} (_id {:?})",
                        c.database, c.checkpoint_collection, c.stream_name
                    ),
                    crate::config::CheckpointStore::File => {
                        writeln!(s, "  resume token: file {}", c.checkpoint_file.display())
                    }
                };
                s.push_str(&self.stream_spec(c).describe());
            }
            SourcePlan::Postgres(c) => {
                let _ = writeln!(
                    s,
                    "source: postgres {} publication {} slot {}",
                    redact(&c.url),
                    c.publication,
                    c.slot
                );
                let manage = match c.manage {
                    crate::config::PgManage::Create => {
                        "create (the publication and slot are created when missing)"
                    }
                    crate::config::PgManage::Assume => "assume (they exist)",
                };
                let _ = writeln!(s, "  manage: {manage}");
                let images = match c.pre_images {
                    crate::config::Images::Ensure => {
                        "ensure (REPLICA IDENTITY FULL where rules need the old row)"
                    }
                    crate::config::Images::Assume => "assume (already set)",
                    crate::config::Images::Off => "off (deletes cannot be routed by owner)",
                };
                let _ = writeln!(s, "  pre-images: {images}");
                let tables: Vec<String> = self.watched().into_keys().collect();
                let _ = writeln!(s, "  tables (schema public): {}", tables.join(", "));
            }
        }
        if let Some(c) = &self.cluster {
            s.push_str(&crate::cluster::describe(c, &self.history));
        }
        let _ = writeln!(s, "listen: {}", self.server.listen);
        let _ = writeln!(s, "auth: {}", self.auth.describe());
        let _ = writeln!(
            s,
            "history: {}, {} events per user, {} at most; send queue: {} events / {} bytes per connection",
            match self.history.store {
                crate::config::HistoryKind::Sqlite =>
                    format!("durable in {}", self.history.path.display()),
                crate::config::HistoryKind::Memory => "in memory (lost on restart)".to_string(),
            },
            self.history.max_per_user,
            human(self.history.max_age),
            self.server.send_queue,
            self.server.send_queue_bytes
        );
        let _ = writeln!(
            s,
            "limits: {} connections, {} per user; publish API: {}",
            self.server.max_connections,
            self.server.max_connections_per_user,
            if self.publish_keys.is_empty() {
                "off".to_string()
            } else {
                format!("{} key(s)", self.publish_keys.len())
            }
        );
        let _ = writeln!(s, "lookup cache: {} answers", self.lookups.cache_entries);
        let watched = self.watched();
        let needed = self.needed_fields();
        if watched.is_empty() {
            let _ = writeln!(
                s,
                "collections watched: none (no [[route]] or [[alert]] configured)"
            );
        }
        for (collection, ops) in &watched {
            let ops = self.op_words(ops);
            let _ = writeln!(s, "collection {collection} ({})", ops.join(", "));
            match needed.get(collection) {
                Some(Reads::Fields(f)) => {
                    let f: Vec<&str> = f.iter().map(String::as_str).collect();
                    let _ = writeln!(s, "  needs fields: {}", f.join(", "));
                }
                _ => {
                    let _ = writeln!(s, "  needs fields: the whole document");
                }
            }
            let used_by_lookups = self.lookups_used().any(|l| &l.collection == collection);
            if used_by_lookups {
                let _ = writeln!(
                    s,
                    "  read by lookups; its changes invalidate their cached answers"
                );
            }
            for r in self.routes.iter().filter(|r| &r.collection == collection) {
                let ops = self.op_words(&r.ops);
                let _ = writeln!(s, "  route {} on {}", r.name, ops.join(", "));
                if let Some(w) = &r.when {
                    let _ = writeln!(s, "    when {}", w.source);
                }
                describe_rule(&mut s, &r.to, r.fields.as_deref());
            }
            for a in self.alerts.iter().filter(|a| &a.collection == collection) {
                let ops = self.op_words(&a.ops);
                let _ = writeln!(s, "  alert {} on {}", a.name, ops.join(", "));
                let _ = writeln!(s, "    fires when `{}` becomes true", a.when.source);
                if let Some(c) = a.cooldown {
                    let _ = writeln!(s, "    then quiet for {} per document", human(c));
                }
                let _ = writeln!(s, "    message {:?}", a.message);
                describe_rule(&mut s, &a.to, a.fields.as_deref());
            }
        }
        s
    }
}

impl Plan {
    /// Operations in the source's words: SQLite has no `replace` (an UPDATE is an update).
    fn op_words(&self, ops: &BTreeSet<Op>) -> Vec<&'static str> {
        let sqlite = matches!(self.source, SourcePlan::Sqlite(_));
        let words: Vec<&str> = ops
            .iter()
            .filter(|o| !(sqlite && **o == Op::Replace))
            .map(|o| o.as_str())
            .collect();
        if words.is_empty() && !ops.is_empty() {
            return vec!["nothing (SQLite has no replace)"];
        }
        words
    }
}

/// A duration as a config would write it (`2ms`, `1day`, `1m 30s`).
fn human(d: std::time::Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// Warns of each `where` value without `$` that names a field of the rule's collection:
/// it is matched as that literal string, so the rule most likely reaches nobody.
fn literal_field_warnings(config: &Config, catalog: &dyn Catalog, warnings: &mut Vec<ConfigError>) {
    let rules = config
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("route[{i}]"), &r.collection, &r.to))
        .chain(
            config
                .alerts
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("alert[{i}]"), &a.collection, &a.to)),
        );
    for (at, collection, to) in rules {
        if let Some(Some(cols)) = catalog.collections().get(collection) {
            literal_fields_in(to, &format!("{at}.to"), collection, cols, warnings);
        }
    }
}

fn literal_fields_in(
    to: &toml::Value,
    path: &str,
    collection: &str,
    cols: &[String],
    warnings: &mut Vec<ConfigError>,
) {
    match to {
        toml::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                literal_fields_in(item, &format!("{path}[{i}]"), collection, cols, warnings);
            }
        }
        toml::Value::Table(t) => {
            let Some(toml::Value::Table(filter)) = t.get("where") else {
                return;
            };
            for (key, value) in filter {
                if let toml::Value::String(v) = value
                    && !v.starts_with('$')
                    && cols.iter().any(|c| c == v)
                {
                    warnings.push(ConfigError::new(
                        format!("{path}.where.{key}"),
                        format!(
                            "\"{v}\" is compared as that literal text, not the value of `{collection}`'s field `{v}`: did you mean \"${v}\"?"
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
}

/// Warns of `on = ["replace"]` on SQLite, which reports an UPDATE as an update: such a
/// rule never fires on it.
fn sqlite_replace_warnings(config: &Config, warnings: &mut Vec<ConfigError>) {
    let rules = config
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("route[{i}]"), &r.on))
        .chain(
            config
                .alerts
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("alert[{i}]"), &a.on)),
        );
    for (at, on) in rules {
        for (j, op) in on.iter().flatten().enumerate() {
            if op == "replace" {
                warnings.push(ConfigError::new(
                    format!("{at}.on[{j}]"),
                    "SQLite has no replace (a changed row is an update): never fires here",
                ));
            }
        }
    }
}

fn describe_rule(s: &mut String, to: &[RecipientSpec], fields: Option<&[crate::path::FieldPath]>) {
    for spec in to {
        let _ = writeln!(s, "    to {spec}");
    }
    match fields {
        None => {
            let _ = writeln!(s, "    sends the whole document");
        }
        Some(f) => {
            let f: Vec<String> = f.iter().map(|p| p.to_string()).collect();
            let _ = writeln!(s, "    sends _id, {}", f.join(", "));
        }
    }
}

/// The API keys `[publish]` names, read from the environment when told to.
fn publish_keys(config: &PublishConfig, errors: &mut Vec<ConfigError>) -> Vec<String> {
    let mut keys: Vec<String> = config.api_keys.clone().unwrap_or_default();
    if let Some(var) = &config.api_keys_env {
        match std::env::var(var) {
            Ok(v) => keys.extend(v.split(',').map(|k| k.trim().to_owned())),
            Err(_) => errors.push(ConfigError::new(
                "publish.api_keys_env",
                format!("environment variable `{var}` is not set"),
            )),
        }
    }
    keys.retain(|k| !k.is_empty());
    if keys.iter().any(|k| k.len() < 16) {
        errors.push(ConfigError::new(
            "publish",
            "API keys must be at least 16 characters (they are bearer credentials)",
        ));
    }
    keys
}

/// `[source] type = "postgres"` checks that need no connection.
fn check_postgres(p: &PostgresSourceConfig, errors: &mut Vec<ConfigError>) {
    if !(p.url.starts_with("postgres://") || p.url.starts_with("postgresql://")) {
        errors.push(ConfigError::new(
            "source.url",
            "expected a URL starting with postgres:// or postgresql://",
        ));
    } else if let Err(e) = p.url.parse::<tokio_postgres::Config>() {
        errors.push(ConfigError::new(
            "source.url",
            format!("not a PostgreSQL URL: {e}"),
        ));
    }
    // Both are written into the replication command unquoted: plain names only.
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    for (key, name) in [
        ("source.slot", &p.slot),
        ("source.publication", &p.publication),
    ] {
        if !plain(name) {
            errors.push(ConfigError::new(
                key,
                format!("`{name}`: use lower-case letters, digits and `_` (at most 63)"),
            ));
        }
    }
}

/// A connection string with its password hidden.
fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{hosts}{}", &rest[host_end..])
        }
        None => uri.to_owned(),
    }
}

/// `[source] json_columns`: each entry a `table.column` of the database.
fn check_json_columns(listed: &[String], catalog: &dyn Catalog, errors: &mut Vec<ConfigError>) {
    for entry in listed {
        let problem = match crate::source::sqlite::split_json_column(entry) {
            None => Some("expected `table.column`".to_string()),
            Some((table, column)) => match catalog.collections().get(table) {
                None => Some(format!("no table `{table}` in the database")),
                Some(Some(cols)) if !cols.iter().any(|c| c == column) => {
                    Some(format!("no column `{column}` in table `{table}`"))
                }
                Some(_) => None,
            },
        };
        if let Some(p) = problem {
            errors.push(ConfigError::new(
                "source.json_columns",
                format!("`{entry}`: {p}"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_fields_cover_routes_alert_conditions_templates_and_lookups() {
        let config = Config::parse(
            r#"
            [source]
            type = "mongodb"
            uri = "mongodb://localhost/?replicaSet=rs0"
            database = "m"
            [auth]
            jwt_secret = "s"
            [[route]]
            name = "orders"
            collection = "orders"
            to = { lookup = "businesses", where = { _id = "$creator_id" }, pick = "owner._id" }
            fields = ["status"]
            when = "doc.quantity > 0"
            [[alert]]
            name = "low"
            collection = "items"
            when = "doc.qty <= doc.min"
            to = "$owner"
            message = "{{ doc.name }} is low"
            fields = ["qty"]
            "#,
        )
        .unwrap();
        let plan = Plan::compile(&config).unwrap();
        let needed = plan.needed_fields();
        let fields = |c: &str| match &needed[c] {
            Reads::Fields(f) => f.iter().cloned().collect::<Vec<_>>(),
            Reads::Whole => vec!["*".into()],
        };
        assert_eq!(
            fields("orders"),
            vec!["_id", "creator_id", "quantity", "status"]
        );
        assert_eq!(fields("items"), vec!["_id", "min", "name", "owner", "qty"]);
        assert_eq!(fields("businesses"), vec!["_id"]);
        assert_eq!(plan.watched().len(), 3);
    }

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact("mongodb://app:s3cret@db1:27017,db2/?replicaSet=rs0"),
            "mongodb://app:***@db1:27017,db2/?replicaSet=rs0"
        );
        assert_eq!(
            redact("mongodb://localhost/?x=a@b"),
            "mongodb://localhost/?x=a@b"
        );
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    const BASE: &str = r#"
        [source]
        type = "mongodb"
        uri = "mongodb://localhost/?replicaSet=rs0"
        database = "m"
        [auth]
        jwt_secret = "s"
        [[route]]
        name = "orders"
        collection = "orders"
        to = "$owner"
    "#;

    fn compile(cluster: &str) -> Result<Plan, Vec<String>> {
        let config = Config::parse(&format!("{BASE}\n[cluster]\n{cluster}")).map_err(|e| {
            e.0.iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect::<Vec<_>>()
        })?;
        Plan::compile(&config).map_err(|e| {
            e.0.iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect()
        })
    }

    #[test]
    fn a_cluster_plan_names_its_stream_subjects_bucket_and_retention() {
        let plan = compile("nats = [\"nats://10.0.0.1:4222\", \"nats://10.0.0.2:4222\"]\nname = \"n1\"\nlease_ttl = \"6s\"").unwrap();
        let text = plan.describe();
        assert!(
            text.contains("cluster: node n1 on NATS nats://10.0.0.1:4222, nats://10.0.0.2:4222"),
            "{text}"
        );
        assert!(
            text.contains("stream changecast: subjects changecast.event.*, file storage, 1 replica(s), max age 1day"),
            "{text}"
        );
        assert!(
            text.contains(
                "router lease: bucket changecast-lease key `router`, TTL 6s (renewed every 1s 500ms"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_bad_cluster_key_is_reported_by_its_path() {
        let errors = compile(
            "nats = [\"nats://ok:4222\", \"http://\"]\nname = \"n 1\"\nstream = \"a.b\"\n\
             lease_ttl = \"0s\"\nreplicas = 7\nuser = \"u\"\ntoken_env = \"CHANGECAST_TEST_UNSET_VAR\"",
        )
        .err()
        .expect("refused");
        let paths: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        for path in [
            "cluster.nats[1]",
            "cluster.name",
            "cluster.stream",
            "cluster.lease_ttl",
            "cluster.replicas",
            "cluster.password_env",
            "cluster.token_env",
        ] {
            assert!(paths.contains(&path), "{path} not in {errors:#?}");
        }
        // No [cluster] without its node name.
        let missing = compile("nats = \"nats://127.0.0.1:4222\"")
            .err()
            .expect("refused");
        assert!(missing[0].contains("name"), "{missing:?}");
    }
}
