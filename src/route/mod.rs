//! Rules: who hears about which change, and which changes raise alerts.
//!
//! In: a [`Change`] from the source. Out: [`Delivery`]s — the distinct user ids a route or
//! an alert reaches, the document to send (projected to its `fields`) and, for alerts, the
//! rendered message.
//!
//! Config is compiled once ([`compile_route`], [`alert::compile_alert`]) into parsed paths,
//! recipient specs ([`spec`]), CEL conditions ([`expr`]) and templates. Recipients come from
//! a field of the document (`"$owner_id"`), from lookups in other collections through the
//! source's own queries, cached and invalidated by this same change stream ([`cache`]), or
//! from a list of those. Deletes route by the pre-image; an update that moves a document
//! between owners reaches the old and the new ones.
//!
//! Recipients are resolved as of the change: every lookup made to route a change carries the
//! change's point in the source ([`crate::change::AsOf`]: the SQLite log seq, the MongoDB
//! `clusterTime`), and a cache miss reads the source as it was right after that change (the
//! change log on SQLite, a snapshot read `atClusterTime` on MongoDB; see each source's
//! `lookup`). Changes are routed strictly in order and [`cache`] is invalidated by this same
//! stream first, so an answer read as of change c stays exact until a later change to the
//! looked-up collection drops it. Where the source cannot read the past (MongoDB's snapshot
//! history passed while catching up), the miss reads the current state and is counted in
//! `changecast_lookups_not_as_of_total`.
//!
//! A rule that fails on one document (a missing field, a failed lookup, a condition that
//! does not evaluate, no recipients at all) is logged with the rule, the document key and
//! the reason, counted in `changecast_rule_skips_total{rule, name, reason}`, and skips only
//! that delivery; it never stops the router or other rules. A lookup that cannot reach the
//! database at all is not such a failure: the serving router's lookups
//! ([`crate::source::patient`]) wait for it to answer, so an outage delays events but
//! drops none.
//!
//! [`Router::explain`] runs the same evaluation as a dry run that fills in a
//! [`trace::RuleTrace`] per rule instead of logging, counting or touching the cache.

pub mod alert;
pub mod cache;
pub mod expr;
pub mod spec;
pub mod trace;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::change::{Change, Op, Recipients};
use crate::config::{ConfigError, RouteConfig};
use crate::event::ServerEvent;
use crate::path::FieldPath;
use crate::source::{Catalog, Lookup};
use alert::{Alert, AlertEngine};
use cache::CachedLookup;
use expr::Condition;
use spec::{FieldReads, check_rule_names, compile_fields, compile_ops, compile_to, spec_reads};
pub use spec::{
    LookupSpec, Operand, RecipientSet, RecipientSpec, RouteError, check_lookup_names,
    compile_lookup, compile_operand, project, recipients_of, toml_to_json,
};
use trace::{ConditionTrace, RuleTrace, Skip, SpecTrace};

/// A compiled `[[route]]`.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub collection: String,
    pub ops: BTreeSet<Op>,
    pub to: Vec<RecipientSpec>,
    /// Projection; `None` sends the whole document.
    pub fields: Option<Vec<FieldPath>>,
    /// Only changes for which this is true are delivered.
    pub when: Option<Condition>,
    /// Top-level fields of the changed document that `to` reads: an update touching none
    /// of them cannot have changed the recipients.
    pub reads: BTreeSet<String>,
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
    let ops = compile_ops(config.on.as_ref(), &Op::ALL, &at, errors);
    let mut located = Vec::new();
    compile_to(&config.to, &format!("{at}.to"), &mut located, errors);
    let fields = compile_fields(config.fields.as_ref(), &at, errors);
    let when = config
        .when
        .as_ref()
        .and_then(|w| Condition::compile(w, &format!("{at}.when"), errors));
    if let Some(catalog) = catalog {
        let reads: FieldReads = when
            .iter()
            .flat_map(|w| &w.named)
            .map(|(var, field)| (format!("{at}.when"), var.clone(), field.clone()))
            .collect();
        check_rule_names(
            &at,
            &config.collection,
            &located,
            fields.as_deref(),
            &reads,
            catalog,
            errors,
        );
    }
    let to: Vec<RecipientSpec> = located.into_iter().map(|(_, spec)| spec).collect();
    if errors.len() > before {
        return None;
    }
    Some(Route {
        name: config.name.as_str().into(),
        collection: config.collection.clone(),
        ops,
        reads: spec_reads(&to),
        to,
        fields,
        when,
    })
}

/// What a delivery is.
#[derive(Debug)]
pub enum DeliveryKind<'r> {
    Change(&'r Route),
    Alert { alert: &'r Alert, message: String },
}

/// One rule's output for one change.
#[derive(Debug)]
pub struct Delivery<'r> {
    pub kind: DeliveryKind<'r>,
    /// Distinct user ids, sorted; often a list shared with other deliveries.
    pub recipients: Recipients,
    /// The document to send when the rule projects it; `None` sends the change's own
    /// document as it is (no copy).
    pub projected: Option<Value>,
}

impl Delivery<'_> {
    /// The event's JSON, with the id the hub gave it.
    pub fn encode(&self, id: &str, change: &Change) -> String {
        let doc = match (&self.projected, &self.kind) {
            (Some(p), _) => p,
            (None, DeliveryKind::Change(_)) => change.doc().unwrap_or(&Value::Null),
            (None, DeliveryKind::Alert { .. }) => change.after.as_ref().unwrap_or(&Value::Null),
        };
        match &self.kind {
            DeliveryKind::Change(route) => ServerEvent::Change {
                id,
                route: &route.name,
                op: change.op,
                collection: &change.collection,
                key: &change.key,
                at: change.at.as_deref(),
                doc,
            },
            DeliveryKind::Alert { alert, message } => ServerEvent::Alert {
                id,
                alert: &alert.name,
                collection: &change.collection,
                key: &change.key,
                at: change.at.as_deref(),
                message,
                doc,
            },
        }
        .to_json()
    }
}

/// All compiled rules, indexed by collection, with the cached lookups.
pub struct Router {
    routes: HashMap<String, Vec<Route>>,
    /// (index in config order, alert), by collection.
    alerts: HashMap<String, Vec<(usize, Alert)>>,
    engine: AlertEngine,
    lookup: CachedLookup,
    /// Set when a lookup gave up waiting for the database on shutdown
    /// ([`crate::source::patient::Patient`]): the changes being routed are incomplete.
    gave_up: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Router {
    pub fn new(
        routes: Vec<Route>,
        alerts: Vec<Alert>,
        lookup: Arc<dyn Lookup>,
        cache_entries: usize,
    ) -> Self {
        let engine = AlertEngine::new(&alerts);
        let mut by_collection: HashMap<String, Vec<Route>> = HashMap::new();
        for r in routes {
            by_collection
                .entry(r.collection.clone())
                .or_default()
                .push(r);
        }
        let mut alerts_by: HashMap<String, Vec<(usize, Alert)>> = HashMap::new();
        for (i, a) in alerts.into_iter().enumerate() {
            alerts_by
                .entry(a.collection.clone())
                .or_default()
                .push((i, a));
        }
        Router {
            routes: by_collection,
            alerts: alerts_by,
            engine,
            lookup: CachedLookup::new(lookup, cache_entries),
            gave_up: None,
        }
    }

    /// `flag` is set when a lookup gives up on shutdown (see [`Router::gave_up`]).
    pub fn interrupted_by(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.gave_up = Some(flag);
        self
    }

    /// A lookup gave up waiting for the database (shutdown): what was routed since may
    /// lack recipients, so it must not be stored or acknowledged.
    pub fn gave_up(&self) -> bool {
        self.gave_up
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The longest alert cooldown (`None`: no alert has one).
    pub fn longest_cooldown(&self) -> Option<std::time::Duration> {
        self.alerts
            .values()
            .flatten()
            .filter_map(|(_, a)| a.cooldown)
            .max()
    }

    /// Restores a cooldown clock: alert `name` fired for document `key` `ago` (a new
    /// cluster router reads this from the stream).
    pub fn restore_cooldown(&self, name: &str, key: String, ago: std::time::Duration) {
        let found = self
            .alerts
            .values()
            .flatten()
            .find(|(_, a)| &*a.name == name);
        if let Some((index, alert)) = found
            && alert.cooldown.is_some_and(|c| ago < c)
        {
            self.engine.fired(*index, key, ago);
        }
    }

    /// The lookup cache (for inspection).
    pub fn cache(&self) -> &CachedLookup {
        &self.lookup
    }

    /// Every delivery `change` makes. Rules with no recipients are left out.
    pub async fn route<'r>(&'r self, change: &Change) -> Vec<Delivery<'r>> {
        // The change may alter answers the cache holds: drop those before routing anything.
        self.lookup.invalidate(change);
        let mut out = Vec::new();
        for route in self.routes.get(&change.collection).into_iter().flatten() {
            if route.ops.contains(&change.op)
                && let Some(d) = self.route_one(route, change, None).await
            {
                out.push(d);
            }
        }
        for (index, alert) in self.alerts.get(&change.collection).into_iter().flatten() {
            if alert.ops.contains(&change.op)
                && let Some(d) = self.alert_one(*index, alert, change, None).await
            {
                out.push(d);
            }
        }
        out
    }

    /// Whether any route or alert reads `collection`.
    pub fn reads(&self, collection: &str) -> bool {
        self.routes.contains_key(collection) || self.alerts.contains_key(collection)
    }

    /// The decision of every rule reading `change.collection`, traced: a dry run of
    /// [`Router::route`] that neither invalidates nor fills the lookup cache, records no
    /// alert cooldown, and logs and counts nothing.
    pub async fn explain(&self, change: &Change) -> Vec<RuleTrace> {
        let mut out = Vec::new();
        for route in self.routes.get(&change.collection).into_iter().flatten() {
            let mut t = RuleTrace::new("route", &route.name, &route.ops, change.op);
            if t.listens {
                let _ = self.route_one(route, change, Some(&mut t)).await;
            }
            out.push(t);
        }
        for (index, alert) in self.alerts.get(&change.collection).into_iter().flatten() {
            let mut t = RuleTrace::new("alert", &alert.name, &alert.ops, change.op);
            if t.listens {
                let _ = self.alert_one(*index, alert, change, Some(&mut t)).await;
            }
            out.push(t);
        }
        out
    }

    async fn route_one<'r>(
        &self,
        route: &'r Route,
        change: &Change,
        mut trace: Option<&mut RuleTrace>,
    ) -> Option<Delivery<'r>> {
        let name = &route.name;
        let Some(doc) = change.doc() else {
            skip(
                trace,
                "route",
                name,
                "no_document",
                &change.key,
                "the change carries no document",
            );
            return None;
        };
        if let Some(when) = &route.when {
            let value = when.eval(
                doc,
                change.before.as_ref(),
                change.op,
                &change.collection,
                &change.key,
            );
            if let Some(t) = trace.as_deref_mut() {
                t.when = Some(condition_trace(&when.source, &value));
            }
            match value {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    skip(trace, "route", name, "when_failed", &change.key, &e);
                    return None;
                }
            }
        }
        let mut recipients = RecipientSet::default();
        let rule = ("route", &**name);
        // A delete routes by the deleted document (its pre-image).
        let image = if change.op == Op::Delete {
            "deleted"
        } else {
            "after"
        };
        self.resolve(
            rule,
            &route.to,
            doc,
            image,
            change,
            &mut recipients,
            trace.as_deref_mut(),
        )
        .await;
        // An update may have moved the document to other owners: tell the old ones too.
        if matches!(change.op, Op::Update | Op::Replace)
            && let Some(before) = &change.before
            && reads_changed(&route.reads, change)
        {
            self.resolve(
                rule,
                &route.to,
                before,
                "before",
                change,
                &mut recipients,
                trace.as_deref_mut(),
            )
            .await;
        }
        finish(
            trace,
            rule,
            &change.key,
            recipients,
            DeliveryKind::Change(route),
            route.fields.as_deref().map(|f| project(doc, f)),
        )
    }

    async fn alert_one<'r>(
        &self,
        index: usize,
        alert: &'r Alert,
        change: &Change,
        mut trace: Option<&mut RuleTrace>,
    ) -> Option<Delivery<'r>> {
        let name = &alert.name;
        match self
            .engine
            .fires(index, alert, change, trace.as_deref_mut())
        {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                skip(trace, "alert", name, "when_failed", &change.key, &e);
                return None;
            }
        }
        let doc = change.after.as_ref()?;
        let message = match self.engine.message(index, alert, change) {
            Ok(m) => m,
            Err(e) => {
                skip(trace, "alert", name, "message_failed", &change.key, &e);
                return None;
            }
        };
        if let Some(t) = trace.as_deref_mut() {
            t.message = Some(message.clone());
        }
        let mut recipients = RecipientSet::default();
        let rule = ("alert", &**name);
        self.resolve(
            rule,
            &alert.to,
            doc,
            "after",
            change,
            &mut recipients,
            trace.as_deref_mut(),
        )
        .await;
        if trace.is_none() {
            metrics::counter!("changecast_alerts_fired_total", "alert" => name.to_string())
                .increment(1);
        }
        finish(
            trace,
            rule,
            &change.key,
            recipients,
            DeliveryKind::Alert { alert, message },
            alert.fields.as_deref().map(|f| project(doc, f)),
        )
    }

    /// Adds the recipients `to` gives for `doc` (the change's `image`, read as of
    /// `change`), tracing each spec when asked.
    #[allow(clippy::too_many_arguments)]
    async fn resolve(
        &self,
        (rule, name): (&'static str, &str),
        to: &[RecipientSpec],
        doc: &Value,
        image: &'static str,
        change: &Change,
        out: &mut RecipientSet,
        mut trace: Option<&mut RuleTrace>,
    ) {
        let (key, as_of) = (&change.key, change.as_of);
        for spec in to {
            let Some(t) = trace.as_deref_mut() else {
                if let Err(e) = recipients_of(spec, doc, as_of, &self.lookup, out, None).await {
                    skip(None, rule, name, e.label(), key, &e.to_string());
                }
                continue;
            };
            let mut st = SpecTrace {
                spec: spec.to_string(),
                image,
                lookup: None,
                gives: Vec::new(),
                error: None,
            };
            let mut own = RecipientSet::default();
            let result =
                recipients_of(spec, doc, as_of, &self.lookup, &mut own, Some(&mut st)).await;
            let ids = own.finish();
            st.gives = ids.iter().map(|u| u.to_string()).collect();
            if let Err(e) = result {
                st.error = Some(format!("{} ({})", e, e.label()));
            }
            out.add_list(ids);
            t.to.push(st);
        }
    }
}

fn condition_trace(expr: &str, value: &Result<bool, String>) -> ConditionTrace {
    ConditionTrace {
        expr: expr.to_owned(),
        value: value.as_ref().ok().copied(),
        error: value.as_ref().err().cloned(),
        note: None,
    }
}

fn finish<'r>(
    trace: Option<&mut RuleTrace>,
    (rule, name): (&'static str, &str),
    key: &str,
    recipients: RecipientSet,
    kind: DeliveryKind<'r>,
    projected: Option<Value>,
) -> Option<Delivery<'r>> {
    if recipients.is_empty() {
        skip(
            trace,
            rule,
            name,
            "no_recipients",
            key,
            "no recipients: every spec gave nobody",
        );
        return None;
    }
    let recipients = recipients.finish();
    if let Some(t) = trace {
        t.recipients = recipients.iter().map(|u| u.to_string()).collect();
    }
    Some(Delivery {
        kind,
        recipients,
        projected,
    })
}

fn reads_changed(reads: &BTreeSet<String>, change: &Change) -> bool {
    match &change.updated_fields {
        Some(fields) => fields.iter().any(|f| reads.contains(f)),
        None => true,
    }
}

/// A rule skipped a document: logged with the rule, its name, the document key and the
/// reason, and counted — or, when tracing, recorded in the trace only.
fn skip(
    trace: Option<&mut RuleTrace>,
    rule: &'static str,
    name: &str,
    reason: &'static str,
    key: &str,
    why: &str,
) {
    if let Some(t) = trace {
        t.skip = Some(Skip {
            reason,
            message: why.to_owned(),
        });
        return;
    }
    metrics::counter!("changecast_rule_skips_total",
        "rule" => rule, "name" => name.to_string(), "reason" => reason)
    .increment(1);
    static LOGGED: std::sync::LazyLock<SkipLog> =
        std::sync::LazyLock::new(|| SkipLog::new(SKIP_LOG_EVERY));
    if let Some(suppressed) = LOGGED.admit(rule, name, reason, std::time::Instant::now()) {
        tracing::warn!(
            rule,
            name,
            key,
            reason,
            suppressed,
            "skipped a delivery: {why}"
        );
    }
}

/// How often one rule's skips of one reason are logged: a route whose field is often empty
/// would otherwise write a warning per change. Every skip is still counted.
const SKIP_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// (rule kind, rule name, reason).
type SkipKey = (&'static str, String, &'static str);

/// Which skips are logged: the first of each (rule, name, reason), then at most one per
/// period, saying how many were left out since the last line.
struct SkipLog {
    every: std::time::Duration,
    /// Keyed by the config's rules and the fixed reasons: bounded by the config.
    last: std::sync::Mutex<HashMap<SkipKey, (std::time::Instant, u64)>>,
}

impl SkipLog {
    fn new(every: std::time::Duration) -> Self {
        SkipLog {
            every,
            last: Default::default(),
        }
    }

    /// `Some(left out since the last line)` when this skip is logged.
    fn admit(
        &self,
        rule: &'static str,
        name: &str,
        reason: &'static str,
        now: std::time::Instant,
    ) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(&(rule, name.to_owned(), reason)) {
            Some((at, left_out)) if now.saturating_duration_since(*at) < self.every => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                last.insert((rule, name.to_owned(), reason), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod skip_log_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_rule_s_skips_are_logged_first_then_once_per_period_with_the_count_left_out() {
        let log = SkipLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.admit("route", "tasks", "no_recipients", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(
                log.admit(
                    "route",
                    "tasks",
                    "no_recipients",
                    t0 + Duration::from_secs(i)
                ),
                None
            );
        }
        // Another reason, or another rule, is logged on its own.
        assert_eq!(log.admit("route", "tasks", "missing_field", t0), Some(0));
        assert_eq!(log.admit("alert", "tasks", "no_recipients", t0), Some(0));
        // A period later: logged again, saying five were left out.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(log.admit("route", "tasks", "no_recipients", later), Some(5));
        assert_eq!(log.admit("route", "tasks", "no_recipients", later), None);
    }
}

#[cfg(test)]
mod tests;
