//! Traces of routing decisions, for `changecast explain` and `GET /v1/admin/explain`.
//!
//! In: a [`RuleTrace`] handed to the router's own evaluation ([`super::Router::explain`]):
//! the same code that routes live changes fills it in, so an explanation cannot disagree
//! with what the router does. Out: for each rule reading the collection, whether it listens
//! to the operation, each condition's value, each recipient spec with its lookup (query,
//! answer, cached or not) and the ids it gave, the recipients, and why it delivered nothing.
//!
//! Tracing is a dry run: it never records an alert's cooldown, never stores a lookup answer
//! in the cache, and never counts or logs skips (they are in the trace instead).

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::change::Op;

/// One rule's decision for one document.
#[derive(Debug, Clone, Serialize)]
pub struct RuleTrace {
    /// `route` or `alert`.
    pub rule: &'static str,
    pub name: String,
    /// The operations the rule listens to.
    pub on: Vec<&'static str>,
    /// Whether it listens to the operation explained.
    pub listens: bool,
    /// The route's `when`, or the alert's condition on the document after the change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<ConditionTrace>,
    /// An alert's condition before the change: it fires only when it becomes true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<ConditionTrace>,
    /// An alert's cooldown: explain keeps no firing history, so it is not applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<String>,
    /// An alert's rendered message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Each recipient spec, as evaluated (an update that can move a document between
    /// owners evaluates them on the image before the change too).
    pub to: Vec<SpecTrace>,
    /// The rule's distinct recipients, sorted.
    pub recipients: Vec<String>,
    /// Why the rule delivers nothing, when it skipped (`no_recipients`, `when_failed`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip: Option<Skip>,
}

/// A condition and what it gave.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionTrace {
    pub expr: String,
    /// `None` when it could not be evaluated (see `error`, or `note`).
    pub value: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One recipient spec evaluated on one image of the document.
#[derive(Debug, Clone, Serialize)]
pub struct SpecTrace {
    /// The spec as `check` prints it (`owner._id from `businesses` where _id = $creator_id`).
    pub spec: String,
    /// `after` (the document after the change), `before` (the pre-image of an update that
    /// may have moved the document between owners) or `deleted` (a delete's pre-image).
    pub image: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup: Option<LookupTrace>,
    /// The user ids it gave, sorted.
    pub gives: Vec<String>,
    /// Why it gave nobody (a missing field, a failed lookup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A lookup's query and answer.
#[derive(Debug, Clone, Serialize)]
pub struct LookupTrace {
    pub collection: String,
    /// Field path → the value it must equal.
    pub filter: Map<String, Value>,
    /// 1: the first match; `None`: every match (`many = true`).
    pub limit: Option<usize>,
    /// Whether the answer came from the lookup cache (else it was read from the source).
    pub cached: bool,
    /// The documents found.
    pub answer: Vec<Value>,
}

/// Why a rule delivered nothing.
#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    /// The label counted in `changecast_rule_skips_total{reason}`.
    pub reason: &'static str,
    pub message: String,
}

impl RuleTrace {
    pub fn new(
        rule: &'static str,
        name: &str,
        ops: &std::collections::BTreeSet<Op>,
        op: Op,
    ) -> Self {
        RuleTrace {
            rule,
            name: name.to_owned(),
            on: ops.iter().map(|o| o.as_str()).collect(),
            listens: ops.contains(&op),
            when: None,
            before: None,
            cooldown: None,
            message: None,
            to: Vec::new(),
            recipients: Vec::new(),
            skip: None,
        }
    }

    /// `route orders`, `alert stock_low`.
    pub fn title(&self) -> String {
        format!("{} {}", self.rule, self.name)
    }

    /// Whether the rule delivers to anyone.
    pub fn delivers(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// Why `user` is (true) or is not (false) among this rule's recipients, in a sentence.
    pub fn reason_for(&self, user: &str, op: Op) -> (bool, String) {
        let title = self.title();
        if !self.listens {
            return (
                false,
                format!(
                    "{title} does not listen to `{op}` (on: {})",
                    self.on.join(", ")
                ),
            );
        }
        if self.recipients.iter().any(|r| r == user) {
            let through: Vec<String> = self
                .to
                .iter()
                .filter(|s| s.gives.iter().any(|g| g == user))
                .map(|s| format!("{} gives {}", s.spec, s.gives.join(", ")))
                .collect();
            return (true, format!("{title} ({})", through.join("; ")));
        }
        if let Some(c) = &self.when {
            match (c.value, self.rule) {
                (Some(false), "alert") => {
                    return (
                        false,
                        format!("{title} does not fire: its condition is false"),
                    );
                }
                (Some(false), _) => {
                    return (false, format!("{title}: its `when` is false"));
                }
                (None, _) => {
                    let why = c.error.as_deref().unwrap_or("not evaluated");
                    return (false, format!("{title}: its condition failed: {why}"));
                }
                _ => {}
            }
        }
        if let Some(b) = &self.before
            && b.value == Some(true)
        {
            return (
                false,
                format!("{title} does not fire: its condition was already true before the change"),
            );
        }
        if let Some(skip) = &self.skip
            && skip.reason != "no_recipients"
        {
            return (false, format!("{title} skipped: {}", skip.message));
        }
        let specs: Vec<String> = self
            .to
            .iter()
            .map(|s| match &s.error {
                Some(e) => format!("{}: {e}", s.spec),
                None if s.gives.is_empty() => format!("{} gives nobody", s.spec),
                None => format!("{} gives {}", s.spec, s.gives.join(", ")),
            })
            .collect();
        if self.recipients.is_empty() {
            return (
                false,
                format!("{title} reaches nobody ({})", specs.join("; ")),
            );
        }
        let only = if self.recipients.len() == 1 {
            " only"
        } else {
            ""
        };
        (
            false,
            format!(
                "{title} reaches {}{only} ({})",
                self.recipients.join(", "),
                specs.join("; ")
            ),
        )
    }
}

/// The distinct recipients of several rules, sorted.
pub fn all_recipients(rules: &[RuleTrace]) -> Vec<String> {
    let set: BTreeSet<&String> = rules.iter().flat_map(|r| r.recipients.iter()).collect();
    set.into_iter().cloned().collect()
}
