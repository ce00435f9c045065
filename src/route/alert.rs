//! Alerts: events raised when a condition on a document *becomes* true.
//!
//! In: a change with its pre- and post-image. Out: at most one alert delivery per
//! `[[alert]]`, with a message rendered from its template (minijinja).
//!
//! "Stock low" must fire when stock crosses the reorder point, not on every update while it
//! is low (the seed's bug): the condition is evaluated on the post-image and on the
//! pre-image, and the alert fires only when it is true after and was not true before
//! (false, or not evaluable: an insert, a missing field). A `cooldown` then silences the
//! alert for that document for a while.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use minijinja::Environment;

use super::expr::{Condition, Reads};
use super::spec::{
    FieldReads, RecipientSpec, check_rule_names, compile_fields, compile_ops, compile_to,
    spec_reads,
};
use super::trace::{ConditionTrace, RuleTrace};
use crate::change::{Change, Op};
use crate::config::{AlertConfig, ConfigError};
use crate::path::FieldPath;
use crate::source::Catalog;

/// A compiled `[[alert]]`.
#[derive(Debug, Clone)]
pub struct Alert {
    pub name: Arc<str>,
    pub collection: String,
    pub ops: BTreeSet<Op>,
    pub when: Condition,
    pub to: Vec<RecipientSpec>,
    /// The template text; compiled into the router's template environment.
    pub message: String,
    pub fields: Option<Vec<FieldPath>>,
    pub cooldown: Option<Duration>,
    /// Top-level fields `to` reads.
    pub reads: BTreeSet<String>,
    /// Top-level fields the message template reads.
    pub message_reads: Reads,
}

/// The template name of `alert[index]`.
pub fn template_name(index: usize) -> String {
    format!("alert[{index}].message")
}

/// Compiles `alert[index]`.
pub fn compile_alert(
    index: usize,
    config: &AlertConfig,
    catalog: Option<&dyn Catalog>,
    errors: &mut Vec<ConfigError>,
) -> Option<Alert> {
    let at = format!("alert[{index}]");
    let before = errors.len();
    if config.name.is_empty() {
        errors.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
    }
    let ops = compile_ops(
        config.on.as_ref(),
        &[Op::Insert, Op::Update, Op::Replace],
        &at,
        errors,
    );
    if ops.contains(&Op::Delete) {
        errors.push(ConfigError::new(
            format!("{at}.on"),
            "an alert fires when a condition on the document becomes true; a deleted document has no after-image",
        ));
    }
    let when = Condition::compile(&config.when, &format!("{at}.when"), errors);
    let mut located = Vec::new();
    compile_to(&config.to, &format!("{at}.to"), &mut located, errors);
    let mut env = Environment::new();
    let mut message_reads = Reads::none();
    // What the condition and the template name, for the catalog check.
    let mut reads: FieldReads = when
        .iter()
        .flat_map(|w| &w.named)
        .map(|(var, field)| (format!("{at}.when"), var.clone(), field.clone()))
        .collect();
    match env.add_template_owned(template_name(index), config.message.clone()) {
        Err(e) => errors.push(ConfigError::new(
            format!("{at}.message"),
            format!("invalid template: {}", e.detail().unwrap_or(&e.to_string())),
        )),
        Ok(()) => {
            if let Ok(t) = env.get_template(&template_name(index)) {
                for var in t.undeclared_variables(true) {
                    let mut parts = var.split('.');
                    match (parts.next(), parts.next()) {
                        (Some(var @ ("doc" | "before")), Some(field)) => {
                            message_reads.add(field);
                            reads.push((format!("{at}.message"), var.into(), field.into()));
                        }
                        (Some("doc" | "before"), None) => message_reads = Reads::Whole,
                        _ => {}
                    }
                }
            }
        }
    }
    let fields = compile_fields(config.fields.as_ref(), &at, errors);
    if config.cooldown.is_some_and(|d| d.is_zero()) {
        errors.push(ConfigError::new(
            format!("{at}.cooldown"),
            "must be greater than zero (or left out)",
        ));
    }
    if let Some(catalog) = catalog {
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
    Some(Alert {
        name: config.name.as_str().into(),
        collection: config.collection.clone(),
        ops,
        when: when?,
        reads: spec_reads(&to),
        to,
        message: config.message.clone(),
        message_reads,
        fields,
        cooldown: config.cooldown,
    })
}

/// Decides whether alerts fire; owns the templates and the cooldown clocks.
pub struct AlertEngine {
    templates: Environment<'static>,
    /// (alert index, document key) → when it last fired. Only for alerts with a cooldown.
    last_fired: std::sync::Mutex<HashMap<(usize, String), Instant>>,
}

/// Cooldown entries kept before expired ones are swept.
const COOLDOWN_SWEEP: usize = 10_000;

impl AlertEngine {
    pub fn new(alerts: &[Alert]) -> Self {
        let mut templates = Environment::new();
        for (i, a) in alerts.iter().enumerate() {
            // Validated when the alert was compiled.
            if let Err(e) = templates.add_template_owned(template_name(i), a.message.clone()) {
                tracing::error!(alert = %a.name, error = %e, "alert template failed to load");
            }
        }
        AlertEngine {
            templates,
            last_fired: Default::default(),
        }
    }

    /// Whether alert `index` fires for `change`: true after, not true before, and not in
    /// its cooldown. An error evaluating the post-image is returned for counting. With a
    /// `trace` (explain's dry run) both evaluations are recorded and the cooldown is
    /// neither applied nor recorded.
    pub fn fires(
        &self,
        index: usize,
        alert: &Alert,
        change: &Change,
        mut trace: Option<&mut RuleTrace>,
    ) -> Result<bool, String> {
        let Some(after) = change.after.as_ref() else {
            return Ok(false);
        };
        let key = change.key.as_str();
        let now_true = alert.when.eval(
            after,
            change.before.as_ref(),
            change.op,
            &change.collection,
            key,
        );
        if let Some(t) = trace.as_deref_mut() {
            t.when = Some(ConditionTrace {
                expr: alert.when.source.clone(),
                value: now_true.as_ref().ok().copied(),
                error: now_true.as_ref().err().cloned(),
                note: None,
            });
        }
        if !now_true? {
            return Ok(false);
        }
        let (was_true, note) = match change.before.as_ref() {
            Some(before) => (
                alert
                    .when
                    .eval(before, None, change.op, &change.collection, key)
                    == Ok(true),
                None,
            ),
            // No pre-image (MongoDB without images): if the update touched none of the
            // fields the condition reads, the condition cannot have changed.
            None => match (&change.updated_fields, &alert.when.reads) {
                (Some(updated), super::expr::Reads::Fields(reads)) if change.op == Op::Update => (
                    !updated.iter().any(|f| reads.contains(f)),
                    Some("no pre-image: true before if the update touched none of its fields"),
                ),
                _ => (false, Some("no pre-image: taken as not true before")),
            },
        };
        if let Some(t) = trace.as_deref_mut() {
            t.before = Some(ConditionTrace {
                expr: alert.when.source.clone(),
                value: Some(was_true),
                error: None,
                note: note.map(str::to_owned),
            });
        }
        if was_true {
            return Ok(false);
        }
        if let Some(cooldown) = alert.cooldown {
            if let Some(t) = trace {
                t.cooldown = Some(format!(
                    "{} per document; not applied by explain (it keeps no firing history)",
                    humantime::format_duration(cooldown)
                ));
                return Ok(true);
            }
            let mut last = self.last_fired.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if last.len() >= COOLDOWN_SWEEP {
                last.retain(|_, t| now.duration_since(*t) < cooldown);
            }
            match last.get(&(index, key.to_owned())) {
                Some(t) if now.duration_since(*t) < cooldown => {
                    metrics::counter!("changecast_alerts_suppressed_total",
                        "alert" => alert.name.to_string())
                    .increment(1);
                    return Ok(false);
                }
                _ => {
                    last.insert((index, key.to_owned()), now);
                }
            }
        }
        Ok(true)
    }

    /// Records that alert `index` fired for `key` `ago` (restoring state after a failover).
    pub fn fired(&self, index: usize, key: String, ago: std::time::Duration) {
        let at = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        let mut last = self.last_fired.lock().unwrap_or_else(|p| p.into_inner());
        let entry = last.entry((index, key)).or_insert(at);
        *entry = (*entry).max(at);
    }

    /// Renders alert `index`'s message for `change`.
    pub fn message(&self, index: usize, alert: &Alert, change: &Change) -> Result<String, String> {
        let template = self
            .templates
            .get_template(&template_name(index))
            .map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                doc => change.after.as_ref(),
                before => change.before.as_ref(),
                key => change.key.as_str(),
                collection => change.collection.as_str(),
                alert => alert.name.as_ref(),
            })
            .map_err(|e| format!("message template: {e}"))
    }
}
