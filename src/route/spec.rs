//! Recipient specs: who a document reaches (`to`), compiled from the config.
//!
//! In: the `to` value of a route or alert (and `[auth] user`). Out: [`RecipientSpec`]s
//! that, given a document, yield user ids, through lookups in the source when they say so.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::cache::CachedLookup;
use crate::change::{AsOf, Recipients, UserId};
use crate::config::ConfigError;
use crate::path::{FieldPath, scalar_to_string};
use crate::source::{Catalog, Query};

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
    const KEYS: [&str; 4] = ["lookup", "where", "pick", "many"];
    for key in table.keys() {
        if !KEYS.contains(&key.as_str()) {
            let message = match crate::suggest::closest(key, &KEYS) {
                Some(s) => format!("unknown key `{key}`, did you mean `{s}`?"),
                None => format!("unknown key `{key}` (expected lookup, where, pick or many)"),
            };
            errors.push(ConfigError::new(format!("{path}.{key}"), message));
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

/// Compiles a `to` value into `out`, each spec with the config path it was written at
/// (`route[0].to`, `route[0].to[1]`), so that later checks name the exact key.
pub(crate) fn compile_to(
    v: &toml::Value,
    path: &str,
    out: &mut Vec<(String, RecipientSpec)>,
    errors: &mut Vec<ConfigError>,
) {
    match v {
        toml::Value::String(s) => match s.strip_prefix('$').map(FieldPath::parse) {
            Some(Ok(p)) => out.push((path.to_owned(), RecipientSpec::Field(p))),
            Some(Err(e)) => errors.push(ConfigError::new(path, e)),
            None => errors.push(ConfigError::new(
                path,
                format!("`{s}`: expected a \"$field.path\" or a lookup table"),
            )),
        },
        toml::Value::Table(t) => {
            if let Some(l) = compile_lookup(t, path, false, errors) {
                out.push((path.to_owned(), RecipientSpec::Lookup(l)));
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

/// Checks a lookup's collection, `where` fields and `pick` against the catalog, each
/// error at its exact key and with the closest known name. `at` is the lookup's path.
pub fn check_lookup_names(
    at: &str,
    l: &LookupSpec,
    catalog: &dyn Catalog,
    errors: &mut Vec<ConfigError>,
) {
    let collections = catalog.collections();
    match collections.get(&l.collection) {
        None => errors.push(no_collection(
            &format!("{at}.lookup"),
            &l.collection,
            catalog,
        )),
        Some(Some(cols)) => {
            for (target, _) in &l.filter {
                if !cols.iter().any(|c| c == target.root()) {
                    errors.push(no_field(
                        &format!("{at}.where.{target}"),
                        &l.collection,
                        target.root(),
                        "",
                        cols,
                    ));
                }
            }
            if !cols.iter().any(|c| c == l.pick.root()) {
                errors.push(no_field(
                    &format!("{at}.pick"),
                    &l.collection,
                    l.pick.root(),
                    "",
                    cols,
                ));
            }
        }
        Some(None) => {}
    }
}

/// "no such collection", with the closest one the source has.
fn no_collection(path: &str, name: &str, catalog: &dyn Catalog) -> ConfigError {
    let names: Vec<&str> = catalog.collections().keys().map(String::as_str).collect();
    let message = match crate::suggest::closest(name, &names) {
        Some(s) => format!("no such collection `{name}`, did you mean `{s}`?"),
        None => format!(
            "no such collection `{name}` (the source has: {})",
            names.join(", ")
        ),
    };
    ConfigError::new(path, message)
}

/// "`c` has no field `f`", with the closest column written as the config would write it
/// (`prefix` is `$`, `doc.` or nothing).
fn no_field(
    path: &str,
    collection: &str,
    field: &str,
    prefix: &str,
    cols: &[String],
) -> ConfigError {
    let names: Vec<&str> = cols.iter().map(String::as_str).collect();
    let hint = match crate::suggest::closest(field, &names) {
        Some(s) => format!(", did you mean `{prefix}{s}`?"),
        None => format!(" (it has: {})", names.join(", ")),
    };
    ConfigError::new(path, format!("`{collection}` has no field `{field}`{hint}"))
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
    pub fn label(&self) -> &'static str {
        match self {
            RouteError::MissingField(_) => "missing_field",
            RouteError::NotAnId(_) => "not_an_id",
            RouteError::Lookup(_) => "lookup_failed",
        }
    }
}

/// User ids gathered from one or more specs for one delivery.
///
/// A lookup's ids come as a shared, sorted, distinct list (cached with the lookup's
/// answer): when that is all there is, [`RecipientSet::finish`] hands the same list on
/// without copying it — the common case of a change reaching every user of an account.
/// Anything more is merged, sorted and made distinct once, at the end.
#[derive(Debug, Default)]
pub struct RecipientSet {
    shared: Option<Recipients>,
    loose: Vec<UserId>,
}

impl RecipientSet {
    /// Adds a sorted list of distinct ids.
    pub fn add_list(&mut self, ids: Recipients) {
        if ids.is_empty() {
            return;
        }
        if self.shared.is_none() && self.loose.is_empty() {
            self.shared = Some(ids);
        } else {
            self.loose.extend(ids.iter().cloned());
        }
    }

    pub fn add(&mut self, id: UserId) {
        self.loose.push(id);
    }

    pub fn is_empty(&self) -> bool {
        self.shared.is_none() && self.loose.is_empty()
    }

    /// The distinct ids, sorted.
    pub fn finish(self) -> Recipients {
        match self.shared {
            Some(shared) if self.loose.is_empty() => shared,
            shared => {
                let mut all = self.loose;
                all.extend(shared.iter().flat_map(|s| s.iter().cloned()));
                all.sort_unstable();
                all.dedup();
                all.into()
            }
        }
    }
}

/// The distinct ids at `pick` in `docs`, sorted. A document without the picked field
/// yields nobody, like a missing document does.
pub fn pick_ids(docs: &[Value], pick: &FieldPath) -> Recipients {
    let mut set = RecipientSet::default();
    for d in docs {
        let _ = collect_ids(pick, d, &mut set);
    }
    set.finish()
}

/// Adds the user ids that `spec` yields for `doc` to `out`. Lookups read the source as of
/// `as_of` (the change being routed), so recipients are those of that moment. With a
/// `trace` (explain's dry run) the lookup's query and answer are recorded, and the answer
/// is read without filling the cache.
pub async fn recipients_of(
    spec: &RecipientSpec,
    doc: &Value,
    as_of: Option<AsOf>,
    lookup: &CachedLookup,
    out: &mut RecipientSet,
    trace: Option<&mut super::trace::SpecTrace>,
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
            let query = Query {
                collection: l.collection.clone(),
                filter,
                limit: if l.many { None } else { Some(1) },
                as_of,
            };
            let ids = match trace {
                None => lookup.find_ids(query, &l.pick).await?,
                Some(t) => {
                    let mut lt = super::trace::LookupTrace {
                        collection: query.collection.clone(),
                        filter: query
                            .filter
                            .iter()
                            .map(|(f, v)| (f.to_string(), v.clone()))
                            .collect(),
                        limit: query.limit,
                        cached: false,
                        answer: Vec::new(),
                    };
                    let answer = lookup.find_uncounted(query).await;
                    if let Ok((docs, cached)) = &answer {
                        lt.cached = *cached;
                        lt.answer = docs.to_vec();
                    }
                    t.lookup = Some(lt);
                    pick_ids(&answer?.0, &l.pick)
                }
            };
            out.add_list(ids);
            Ok(())
        }
    }
}

fn collect_ids(path: &FieldPath, doc: &Value, out: &mut RecipientSet) -> Result<(), RouteError> {
    let mut values = Vec::new();
    path.collect(doc, &mut values);
    if values.is_empty() {
        return Err(RouteError::MissingField(path.to_string()));
    }
    for v in values {
        let id = scalar_to_string(v).ok_or_else(|| RouteError::NotAnId(path.to_string()))?;
        out.add(id.into());
    }
    Ok(())
}

/// The document limited to `fields` (plus `_id`).
pub fn project(doc: &Value, fields: &[FieldPath]) -> Value {
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

/// Top-level fields of the changed document that `to` reads.
pub fn spec_reads(to: &[RecipientSpec]) -> BTreeSet<String> {
    let mut reads = BTreeSet::new();
    for spec in to {
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
    reads
}

/// Compiles a `fields = [...]` projection.
pub fn compile_fields(
    fields: Option<&Vec<String>>,
    at: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<FieldPath>> {
    fields.map(|fs| {
        fs.iter()
            .enumerate()
            .filter_map(|(i, f)| {
                FieldPath::parse(f)
                    .map_err(|e| errors.push(ConfigError::new(format!("{at}.fields[{i}]"), e)))
                    .ok()
            })
            .collect()
    })
}

/// What a rule reads of the changed document, beyond its recipients, for
/// [`check_rule_names`]: `(config path, variable, field)`, e.g. `("alert[0].when", "doc",
/// "status")`. Only the first segment of a path is known to the catalog (a JSON column's
/// inside is not), so `field` is a top-level field.
pub type FieldReads = Vec<(String, String, String)>;

/// Checks a rule's collection, the fields it reads (recipients, `fields`, its condition
/// and template) and its lookups against the catalog; each error names its exact key and
/// the closest known name. Returns false when the collection itself is unknown.
pub fn check_rule_names(
    at: &str,
    collection: &str,
    to: &[(String, RecipientSpec)],
    fields: Option<&[FieldPath]>,
    reads: &FieldReads,
    catalog: &dyn Catalog,
    errors: &mut Vec<ConfigError>,
) -> bool {
    let collections = catalog.collections();
    let Some(cols) = collections.get(collection) else {
        errors.push(no_collection(
            &format!("{at}.collection"),
            collection,
            catalog,
        ));
        return false;
    };
    // An unknown schema (a collection without columns): cannot tell, so do not refuse.
    let mut field = |path: &str, name: &str, prefix: &str| {
        if let Some(cols) = cols
            && !cols.iter().any(|c| c == name)
        {
            errors.push(no_field(path, collection, name, prefix, cols));
        }
    };
    for (path, spec) in to {
        match spec {
            RecipientSpec::Field(p) => field(path, p.root(), "$"),
            RecipientSpec::Lookup(l) => {
                for (target, operand) in &l.filter {
                    if let Operand::Field(p) = operand {
                        field(&format!("{path}.where.{target}"), p.root(), "$");
                    }
                }
            }
        }
    }
    for (i, f) in fields.unwrap_or_default().iter().enumerate() {
        field(&format!("{at}.fields[{i}]"), f.root(), "");
    }
    for (path, variable, name) in reads {
        field(path, name, &format!("{variable}."));
    }
    for (path, spec) in to {
        if let RecipientSpec::Lookup(l) = spec {
            check_lookup_names(path, l, catalog, errors);
        }
    }
    true
}

/// Compiles an `on = [...]` list; `default` when absent.
pub fn compile_ops(
    on: Option<&Vec<String>>,
    default: &[crate::change::Op],
    at: &str,
    errors: &mut Vec<ConfigError>,
) -> BTreeSet<crate::change::Op> {
    use crate::change::Op;
    match on {
        None => default.iter().copied().collect(),
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
    }
}
