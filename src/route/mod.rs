//! Routes: who hears about which change.
//!
//! In: a [`Change`] from the source. Out: [`Delivery`]s — a route, the distinct user ids it
//! reaches, and the document to send (projected to the route's `fields`).
//!
//! A `[[route]]` is compiled once ([`compile_route`]) into a [`Route`]: parsed paths,
//! recipient specs and projection. Recipients come from a field of the document
//! (`"$owner_id"`), from a lookup in another collection (`{ lookup, where, pick }`, through
//! the source's own [`Lookup`]), or from a list of those. Deletes route by the pre-image;
//! an update that moves a document between owners reaches the old and the new ones.
//!
//! A rule that fails on one document (a missing field, a failed lookup) is logged and
//! counted and skips only that part of the delivery; it never stops the router.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::change::{Change, Op};
use crate::config::{ConfigError, RouteConfig};
use crate::path::{FieldPath, scalar_to_string};
use crate::source::{Catalog, Lookup, Query};

/// A compiled `[[route]]`.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub collection: String,
    pub ops: BTreeSet<Op>,
    pub to: Vec<RecipientSpec>,
    /// Projection; `None` sends the whole document.
    pub fields: Option<Vec<FieldPath>>,
    /// Top-level fields of the changed document that `to` reads: an update touching none
    /// of them cannot have changed the recipients.
    pub reads: BTreeSet<String>,
}

/// One way of finding recipients.
#[derive(Debug, Clone, PartialEq)]
pub enum RecipientSpec {
    /// User ids at a path of the changed document (an array gives several).
    Field(FieldPath),
    /// User ids picked from documents found in another collection.
    Lookup(LookupSpec),
}

/// `{ lookup, where, pick, many }`
#[derive(Debug, Clone, PartialEq)]
pub struct LookupSpec {
    pub collection: String,
    pub filter: Vec<(FieldPath, Operand)>,
    pub pick: FieldPath,
    /// Take every matching document, not just the first.
    pub many: bool,
}

/// A value in a `where`: a field of the changed document, the token's claim (user
/// resolution only), or a literal.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Field(FieldPath),
    Claim,
    Literal(Value),
}

/// Converts a TOML value to JSON (TOML datetimes become strings).
pub fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// Compiles a `where` value. `"$a.b"` reads the document, `"$claim"` the claim (where
/// allowed), `"$$x"` is the literal string `"$x"`, anything else is a literal.
pub fn compile_operand(
    v: &toml::Value,
    path: &str,
    allow_claim: bool,
    errors: &mut Vec<ConfigError>,
) -> Option<Operand> {
    match v {
        toml::Value::String(s) if s.starts_with("$$") => {
            Some(Operand::Literal(Value::String(s[1..].to_owned())))
        }
        toml::Value::String(s) if s == "$claim" && allow_claim => Some(Operand::Claim),
        toml::Value::String(s) if s.starts_with('$') => match FieldPath::parse(&s[1..]) {
            Ok(p) if !allow_claim => Some(Operand::Field(p)),
            Ok(_) => {
                errors.push(ConfigError::new(
                    path,
                    format!("`{s}`: only \"$claim\" can be read here"),
                ));
                None
            }
            Err(e) => {
                errors.push(ConfigError::new(path, e));
                None
            }
        },
        toml::Value::Table(_) | toml::Value::Array(_) => {
            errors.push(ConfigError::new(
                path,
                "expected a \"$field\" reference or a scalar literal",
            ));
            None
        }
        other => Some(Operand::Literal(toml_to_json(other))),
    }
}

/// Compiles a `lookup` table: `{ lookup, where, pick, many }`. Shared by routes and by
/// `[auth] user`.
pub fn compile_lookup(
    table: &toml::Table,
    path: &str,
    allow_claim: bool,
    errors: &mut Vec<ConfigError>,
) -> Option<LookupSpec> {
    let before = errors.len();
    for key in table.keys() {
        if !["lookup", "where", "pick", "many"].contains(&key.as_str()) {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                "unknown key (expected lookup, where, pick or many)",
            ));
        }
    }
    let collection = match table.get("lookup") {
        Some(toml::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => {
            errors.push(ConfigError::new(
                format!("{path}.lookup"),
                "expected a collection name",
            ));
            None
        }
        None => {
            errors.push(ConfigError::new(
                format!("{path}.lookup"),
                "missing: the collection to look in",
            ));
            None
        }
    };
    let mut filter = Vec::new();
    match table.get("where") {
        Some(toml::Value::Table(w)) if !w.is_empty() => {
            for (field, value) in w {
                let fpath = format!("{path}.where.{field}");
                let target = FieldPath::parse(field)
                    .map_err(|e| errors.push(ConfigError::new(&fpath, e)))
                    .ok();
                let operand = compile_operand(value, &fpath, allow_claim, errors);
                if let (Some(t), Some(o)) = (target, operand) {
                    filter.push((t, o));
                }
            }
        }
        Some(_) => errors.push(ConfigError::new(
            format!("{path}.where"),
            "expected a non-empty table like { _id = \"$owner_id\" }",
        )),
        None => errors.push(ConfigError::new(
            format!("{path}.where"),
            "missing: which documents to find",
        )),
    }
    let pick = match table.get("pick") {
        None => FieldPath::parse("_id").ok(),
        Some(toml::Value::String(s)) => FieldPath::parse(s)
            .map_err(|e| errors.push(ConfigError::new(format!("{path}.pick"), e)))
            .ok(),
        Some(_) => {
            errors.push(ConfigError::new(
                format!("{path}.pick"),
                "expected a field path",
            ));
            None
        }
    };
    let many = match table.get("many") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => {
            errors.push(ConfigError::new(
                format!("{path}.many"),
                "expected true or false",
            ));
            false
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(LookupSpec {
        collection: collection?,
        filter,
        pick: pick?,
        many,
    })
}

fn compile_to(
    v: &toml::Value,
    path: &str,
    out: &mut Vec<RecipientSpec>,
    errors: &mut Vec<ConfigError>,
) {
    match v {
        toml::Value::String(s) => match s.strip_prefix('$').map(FieldPath::parse) {
            Some(Ok(p)) => out.push(RecipientSpec::Field(p)),
            Some(Err(e)) => errors.push(ConfigError::new(path, e)),
            None => errors.push(ConfigError::new(
                path,
                format!("`{s}`: expected a \"$field.path\" or a lookup table"),
            )),
        },
        toml::Value::Table(t) => {
            if let Some(l) = compile_lookup(t, path, false, errors) {
                out.push(RecipientSpec::Lookup(l));
            }
        }
        toml::Value::Array(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                compile_to(item, &format!("{path}[{i}]"), out, errors);
            }
        }
        _ => errors.push(ConfigError::new(
            path,
            "expected \"$field.path\", { lookup, where, pick }, or a non-empty list of them",
        )),
    }
}

/// Compiles `route[index]`, checking names against the source's catalog when given.
pub fn compile_route(
    index: usize,
    config: &RouteConfig,
    catalog: Option<&dyn Catalog>,
    errors: &mut Vec<ConfigError>,
) -> Option<Route> {
    let at = format!("route[{index}]");
    let before = errors.len();
    if config.name.is_empty() {
        errors.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
    }
    let ops: BTreeSet<Op> = match &config.on {
        None => Op::ALL.into_iter().collect(),
        Some(list) if list.is_empty() => {
            errors.push(ConfigError::new(
                format!("{at}.on"),
                "must name at least one operation",
            ));
            BTreeSet::new()
        }
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                Op::parse(s).or_else(|| {
                    errors.push(ConfigError::new(
                        format!("{at}.on[{i}]"),
                        format!("`{s}` is not one of insert, update, replace, delete"),
                    ));
                    None
                })
            })
            .collect(),
    };
    let mut to = Vec::new();
    compile_to(&config.to, &format!("{at}.to"), &mut to, errors);
    let fields = config.fields.as_ref().map(|fs| {
        fs.iter()
            .enumerate()
            .filter_map(|(i, f)| {
                FieldPath::parse(f)
                    .map_err(|e| errors.push(ConfigError::new(format!("{at}.fields[{i}]"), e)))
                    .ok()
            })
            .collect::<Vec<_>>()
    });
    let mut reads = BTreeSet::new();
    for spec in &to {
        match spec {
            RecipientSpec::Field(p) => {
                reads.insert(p.root().to_owned());
            }
            RecipientSpec::Lookup(l) => {
                for (_, o) in &l.filter {
                    if let Operand::Field(p) = o {
                        reads.insert(p.root().to_owned());
                    }
                }
            }
        }
    }
    if let Some(catalog) = catalog {
        check_names(&at, config, &to, fields.as_deref(), &reads, catalog, errors);
    }
    if errors.len() > before {
        return None;
    }
    Some(Route {
        name: config.name.as_str().into(),
        collection: config.collection.clone(),
        ops,
        to,
        fields,
        reads,
    })
}

/// Checks collections and top-level fields against what the source knows.
fn check_names(
    at: &str,
    config: &RouteConfig,
    to: &[RecipientSpec],
    fields: Option<&[FieldPath]>,
    reads: &BTreeSet<String>,
    catalog: &dyn Catalog,
    errors: &mut Vec<ConfigError>,
) {
    let collections = catalog.collections();
    let known = |c: &str| -> String {
        let names: Vec<&str> = collections.keys().map(String::as_str).collect();
        format!(
            "no such collection `{c}` (the source has: {})",
            names.join(", ")
        )
    };
    let has_field = |coll: &str, field: &str| match collections.get(coll) {
        Some(Some(cols)) => cols.iter().any(|c| c == field),
        _ => true, // unknown schema: cannot tell, so do not refuse
    };
    if !collections.contains_key(&config.collection) {
        errors.push(ConfigError::new(
            format!("{at}.collection"),
            known(&config.collection),
        ));
        return;
    }
    for field in reads {
        if !has_field(&config.collection, field) {
            errors.push(ConfigError::new(
                format!("{at}.to"),
                format!("`{}` has no field `{field}`", config.collection),
            ));
        }
    }
    for (i, f) in fields.unwrap_or_default().iter().enumerate() {
        if !has_field(&config.collection, f.root()) {
            errors.push(ConfigError::new(
                format!("{at}.fields[{i}]"),
                format!("`{}` has no field `{}`", config.collection, f.root()),
            ));
        }
    }
    let multiple = to.len() > 1;
    for (i, spec) in to.iter().enumerate() {
        let RecipientSpec::Lookup(l) = spec else {
            continue;
        };
        let p = if multiple {
            format!("{at}.to[{i}]")
        } else {
            format!("{at}.to")
        };
        check_lookup_names(&p, l, catalog, errors);
    }
}

/// Checks a lookup's collection, `where` fields and `pick` against the catalog.
pub fn check_lookup_names(
    at: &str,
    l: &LookupSpec,
    catalog: &dyn Catalog,
    errors: &mut Vec<ConfigError>,
) {
    let collections = catalog.collections();
    match collections.get(&l.collection) {
        None => {
            let names: Vec<&str> = collections.keys().map(String::as_str).collect();
            errors.push(ConfigError::new(
                format!("{at}.lookup"),
                format!(
                    "no such collection `{}` (the source has: {})",
                    l.collection,
                    names.join(", ")
                ),
            ));
        }
        Some(Some(cols)) => {
            for (target, _) in &l.filter {
                if !cols.iter().any(|c| c == target.root()) {
                    errors.push(ConfigError::new(
                        format!("{at}.where.{target}"),
                        format!("`{}` has no field `{}`", l.collection, target.root()),
                    ));
                }
            }
            if !cols.iter().any(|c| c == l.pick.root()) {
                errors.push(ConfigError::new(
                    format!("{at}.pick"),
                    format!("`{}` has no field `{}`", l.collection, l.pick.root()),
                ));
            }
        }
        Some(None) => {}
    }
}

/// Why part of a delivery was skipped.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("the document has no `{0}`")]
    MissingField(String),
    #[error("`{0}` is not a scalar id")]
    NotAnId(String),
    #[error(transparent)]
    Lookup(#[from] crate::source::LookupError),
}

impl RouteError {
    fn label(&self) -> &'static str {
        match self {
            RouteError::MissingField(_) => "missing_field",
            RouteError::NotAnId(_) => "not_an_id",
            RouteError::Lookup(_) => "lookup_failed",
        }
    }
}

/// One route's output for one change.
#[derive(Debug)]
pub struct Delivery<'r> {
    pub route: &'r Route,
    /// Distinct user ids, sorted.
    pub recipients: Vec<String>,
    /// The document to send, projected.
    pub doc: Value,
}

/// All compiled routes, indexed by collection, with the source's lookup capability.
pub struct Router {
    by_collection: HashMap<String, Vec<Route>>,
    lookup: Arc<dyn Lookup>,
}

impl Router {
    pub fn new(routes: Vec<Route>, lookup: Arc<dyn Lookup>) -> Self {
        let mut by_collection: HashMap<String, Vec<Route>> = HashMap::new();
        for r in routes {
            by_collection
                .entry(r.collection.clone())
                .or_default()
                .push(r);
        }
        Router {
            by_collection,
            lookup,
        }
    }

    /// Every route's delivery of `change`. Routes with no recipients are left out.
    pub async fn route<'r>(&'r self, change: &Change) -> Vec<Delivery<'r>> {
        let Some(routes) = self.by_collection.get(&change.collection) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for route in routes.iter().filter(|r| r.ops.contains(&change.op)) {
            let Some(doc) = change.doc() else {
                skip(
                    route,
                    "no_document",
                    &change.key,
                    "the change carries no document",
                );
                continue;
            };
            let mut recipients = BTreeSet::new();
            self.resolve(route, doc, &change.key, &mut recipients).await;
            // An update may have moved the document to other owners: tell the old ones too.
            if matches!(change.op, Op::Update | Op::Replace)
                && let Some(before) = &change.before
                && route_reads_changed(route, change)
            {
                self.resolve(route, before, &change.key, &mut recipients)
                    .await;
            }
            if recipients.is_empty() {
                metrics::counter!("changecast_route_skips_total",
                    "route" => route.name.to_string(), "reason" => "no_recipients")
                .increment(1);
                continue;
            }
            out.push(Delivery {
                route,
                recipients: recipients.into_iter().collect(),
                doc: project(doc, route.fields.as_deref()),
            });
        }
        out
    }

    async fn resolve(&self, route: &Route, doc: &Value, key: &str, out: &mut BTreeSet<String>) {
        for spec in &route.to {
            if let Err(e) = recipients_of(spec, doc, self.lookup.as_ref(), out).await {
                skip(route, e.label(), key, &e.to_string());
            }
        }
    }
}

fn route_reads_changed(route: &Route, change: &Change) -> bool {
    match &change.updated_fields {
        Some(fields) => fields.iter().any(|f| route.reads.contains(f)),
        None => true,
    }
}

fn skip(route: &Route, reason: &'static str, key: &str, why: &str) {
    tracing::warn!(route = %route.name, key, reason, "route skipped a delivery: {why}");
    metrics::counter!("changecast_route_skips_total",
        "route" => route.name.to_string(), "reason" => reason)
    .increment(1);
}

/// Adds the user ids that `spec` yields for `doc` to `out`.
pub async fn recipients_of(
    spec: &RecipientSpec,
    doc: &Value,
    lookup: &dyn Lookup,
    out: &mut BTreeSet<String>,
) -> Result<(), RouteError> {
    match spec {
        RecipientSpec::Field(path) => collect_ids(path, doc, out),
        RecipientSpec::Lookup(l) => {
            let mut filter = Vec::with_capacity(l.filter.len());
            for (target, operand) in &l.filter {
                let value = match operand {
                    Operand::Field(p) => match p.get(doc) {
                        Some(v) if !v.is_null() => v.clone(),
                        _ => return Err(RouteError::MissingField(p.to_string())),
                    },
                    Operand::Literal(v) => v.clone(),
                    Operand::Claim => return Err(RouteError::MissingField("$claim".into())),
                };
                filter.push((target.clone(), value));
            }
            let found = lookup
                .find(Query {
                    collection: l.collection.clone(),
                    filter,
                    limit: if l.many { None } else { Some(1) },
                })
                .await?;
            metrics::counter!("changecast_lookups_total", "collection" => l.collection.clone())
                .increment(1);
            for d in &found {
                // A found document without the picked field yields nobody, like a missing
                // document does.
                let _ = collect_ids(&l.pick, d, out);
            }
            Ok(())
        }
    }
}

fn collect_ids(
    path: &FieldPath,
    doc: &Value,
    out: &mut BTreeSet<String>,
) -> Result<(), RouteError> {
    let mut values = Vec::new();
    path.collect(doc, &mut values);
    if values.is_empty() {
        return Err(RouteError::MissingField(path.to_string()));
    }
    for v in values {
        out.insert(scalar_to_string(v).ok_or_else(|| RouteError::NotAnId(path.to_string()))?);
    }
    Ok(())
}

/// The document limited to `fields` (plus `_id`); the whole document when `None`.
pub fn project(doc: &Value, fields: Option<&[FieldPath]>) -> Value {
    let Some(fields) = fields else {
        return doc.clone();
    };
    let mut out = Map::new();
    if let Some(id) = doc.get("_id") {
        out.insert("_id".into(), id.clone());
    }
    for f in fields {
        if let Some(v) = f.get(doc) {
            insert_at(&mut out, &f.to_string(), v.clone());
        }
    }
    Value::Object(out)
}

fn insert_at(map: &mut Map<String, Value>, dotted: &str, v: Value) {
    match dotted.split_once('.') {
        None => {
            map.insert(dotted.to_owned(), v);
        }
        Some((head, rest)) => {
            let child = map
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = child {
                insert_at(m, rest, v);
            }
        }
    }
}

/// For `check`: the routes reading each collection.
pub fn routes_by_collection(routes: &[Route]) -> BTreeMap<&str, Vec<&Route>> {
    let mut m: BTreeMap<&str, Vec<&Route>> = BTreeMap::new();
    for r in routes {
        m.entry(r.collection.as_str()).or_default().push(r);
    }
    m
}

impl std::fmt::Display for RecipientSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecipientSpec::Field(p) => write!(f, "${p}"),
            RecipientSpec::Lookup(l) => {
                let w: Vec<String> = l
                    .filter
                    .iter()
                    .map(|(t, o)| match o {
                        Operand::Field(p) => format!("{t} = ${p}"),
                        Operand::Claim => format!("{t} = $claim"),
                        Operand::Literal(v) => format!("{t} = {v}"),
                    })
                    .collect();
                write!(
                    f,
                    "{} from `{}` where {}{}",
                    l.pick,
                    l.collection,
                    w.join(" and "),
                    if l.many { " (every match)" } else { "" }
                )
            }
        }
    }
}

#[cfg(test)]
mod tests;
