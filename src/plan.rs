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
    Config, ConfigError, ConfigErrors, HistoryConfig, ServerConfig, SourceConfig,
    SqliteSourceConfig,
};
use crate::route::{Route, check_lookup_names, compile_route, routes_by_collection};
use crate::source::Catalog;
use crate::source::sqlite::SqliteCatalog;

/// A validated configuration, ready to run.
#[derive(Clone)]
pub struct Plan {
    pub server: ServerConfig,
    pub history: HistoryConfig,
    pub source: SqliteSourceConfig,
    pub auth: AuthPlan,
    pub routes: Vec<Route>,
}

impl Plan {
    /// Validates `config` as a whole; reads the source's schema to check names.
    pub fn compile(config: &Config) -> Result<Plan, ConfigErrors> {
        let mut errors = Vec::new();
        let source = match &config.source {
            SourceConfig::Sqlite(s) => Some(s.clone()),
            SourceConfig::Mongodb(_) => {
                errors.push(ConfigError::new(
                    "source.type",
                    "the mongodb source is not available in this version yet; use type = \"sqlite\"",
                ));
                None
            }
        };
        if let Some(s) = &source {
            if s.poll_interval.is_zero() {
                errors.push(ConfigError::new(
                    "source.poll_interval",
                    "must be greater than zero",
                ));
            }
            if s.batch_size == 0 {
                errors.push(ConfigError::new("source.batch_size", "must be at least 1"));
            }
        }
        let catalog = match &source {
            Some(s) if !s.path.exists() => {
                errors.push(ConfigError::new(
                    "source.path",
                    format!("no database file at {}", s.path.display()),
                ));
                None
            }
            Some(s) => match SqliteCatalog::read(&s.path) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(ConfigError::new("source.path", e.to_string()));
                    None
                }
            },
            None => None,
        };
        let catalog = catalog.as_ref().map(|c| c as &dyn Catalog);

        if config.server.send_queue == 0 {
            errors.push(ConfigError::new("server.send_queue", "must be at least 1"));
        }
        if config.server.max_client_frame < 256 {
            errors.push(ConfigError::new(
                "server.max_client_frame",
                "must be at least 256 bytes",
            ));
        }
        if config.server.keepalive.is_zero() {
            errors.push(ConfigError::new(
                "server.keepalive",
                "must be greater than zero",
            ));
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
        for (i, _) in config.alerts.iter().enumerate() {
            errors.push(ConfigError::new(
                format!("alert[{i}]"),
                "alerts are not supported by this version yet",
            ));
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
            }),
            _ => Err(ConfigErrors(vec![ConfigError::new("config", "invalid")])),
        }
    }

    /// The collections the source must watch, with the operations the rules use.
    pub fn watched(&self) -> BTreeMap<String, BTreeSet<Op>> {
        let mut m: BTreeMap<String, BTreeSet<Op>> = BTreeMap::new();
        for r in &self.routes {
            m.entry(r.collection.clone()).or_default().extend(&r.ops);
        }
        m
    }

    /// The plan in words, for `changecast check`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "source: sqlite {}", self.source.path.display());
        let _ = writeln!(
            s,
            "  change log: triggers on every watched table, polled every {:?}, batches of {}",
            self.source.poll_interval, self.source.batch_size
        );
        let _ = writeln!(s, "listen: {}", self.server.listen);
        let _ = writeln!(s, "auth: {}", self.auth.describe());
        let _ = writeln!(
            s,
            "history: {} events per user (in memory); send queue: {} events per connection",
            self.history.max_per_user, self.server.send_queue
        );
        let watched = self.watched();
        let by_collection = routes_by_collection(&self.routes);
        if watched.is_empty() {
            let _ = writeln!(s, "collections watched: none (no [[route]] configured)");
        }
        for (collection, ops) in &watched {
            let ops: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
            let _ = writeln!(s, "collection {collection} ({})", ops.join(", "));
            for r in by_collection.get(collection.as_str()).into_iter().flatten() {
                let ops: Vec<&str> = r.ops.iter().map(|o| o.as_str()).collect();
                let _ = writeln!(s, "  route {} on {}", r.name, ops.join(", "));
                for spec in &r.to {
                    let _ = writeln!(s, "    to {spec}");
                }
                match &r.fields {
                    None => {
                        let _ = writeln!(s, "    sends the whole document");
                    }
                    Some(f) => {
                        let f: Vec<String> = f.iter().map(|p| p.to_string()).collect();
                        let _ = writeln!(s, "    sends _id, {}", f.join(", "));
                    }
                }
                let reads: Vec<&str> = r.reads.iter().map(String::as_str).collect();
                let _ = writeln!(s, "    reads fields: {}", reads.join(", "));
            }
        }
        s
    }
}
