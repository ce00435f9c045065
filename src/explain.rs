//! Why a user did or did not get a change: `changecast explain` and `GET /v1/admin/explain`.
//!
//! In: a collection and a document — read from the source by its change key, or given as
//! JSON — the operation to explain (default `update`) and optionally a user id. Out: an
//! [`Explanation`]: every route and alert reading the collection with its decision traced
//! by the router's own code ([`Router::explain`]: conditions and their values, lookups with
//! their queries and answers, recipients), and for the user the reason they are or are not
//! among the recipients. As JSON (the endpoint) or as text ([`Explanation::to_text`]).
//!
//! The document is read as it is now and lookups read the current state; a live change was
//! routed as of its own moment, so an explanation of an older change can differ where the
//! looked-up documents changed since. Explaining is a dry run: the running router's cache,
//! cooldowns and metrics are untouched.

use std::fmt::Write;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::change::{Change, Op, Position};
use crate::path::scalar_to_string;
use crate::plan::Plan;
use crate::route::Router;
use crate::route::trace::{RuleTrace, all_recipients};
use crate::source::{Lookup, LookupError};

/// Which document to explain.
#[derive(Debug, Clone)]
pub enum Document {
    /// Read from the source by its change key (what events carry as `key`).
    Key(String),
    /// Given as JSON; its key is `key` when given, else its `_id`.
    Given { doc: Value, key: Option<String> },
}

/// The whole routing decision for one document.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub collection: String,
    pub key: String,
    pub op: Op,
    /// `database` (read by key) or `given`.
    pub source: &'static str,
    pub document: Value,
    /// Every route, then every alert, reading the collection, in config order.
    pub rules: Vec<RuleTrace>,
    /// Everyone the document reaches, sorted.
    pub recipients: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Verdict>,
}

/// Whether one user is among the recipients, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub id: String,
    pub recipient: bool,
    /// One sentence per rule, in rule order.
    pub reasons: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no rule reads `{collection}` (rules read: {known})")]
    UnknownCollection { collection: String, known: String },
    #[error("no document `{key}` in `{collection}`")]
    NoDocument { collection: String, key: String },
    #[error("the document must be a JSON object")]
    NotAnObject,
    #[error(transparent)]
    Lookup(#[from] LookupError),
}

/// The plan's rules on a router of their own (no lookup cache: answers are read from the
/// source each time), and the source's lookups.
pub struct Explainer {
    router: Router,
    lookup: Arc<dyn Lookup>,
    /// Collections the rules read, for the error naming them.
    collections: Vec<String>,
}

impl Explainer {
    pub fn new(plan: &Plan, lookup: Arc<dyn Lookup>) -> Self {
        let mut collections: Vec<String> = plan
            .routes
            .iter()
            .map(|r| r.collection.clone())
            .chain(plan.alerts.iter().map(|a| a.collection.clone()))
            .collect();
        collections.sort();
        collections.dedup();
        Explainer {
            router: Router::new(
                plan.routes.clone(),
                plan.alerts.clone(),
                Arc::clone(&lookup),
                0,
            ),
            lookup,
            collections,
        }
    }

    pub async fn explain(
        &self,
        collection: &str,
        document: Document,
        op: Op,
        user: Option<&str>,
    ) -> Result<Explanation, ExplainError> {
        if !self.router.reads(collection) {
            return Err(ExplainError::UnknownCollection {
                collection: collection.to_owned(),
                known: self.collections.join(", "),
            });
        }
        let (doc, key, source) = match document {
            Document::Key(key) => match self.lookup.document(collection, &key).await? {
                Some(doc) => (doc, key, "database"),
                None => {
                    return Err(ExplainError::NoDocument {
                        collection: collection.to_owned(),
                        key,
                    });
                }
            },
            Document::Given { doc, key } => {
                let key = key
                    .or_else(|| doc.get("_id").and_then(scalar_to_string))
                    .unwrap_or_default();
                (doc, key, "given")
            }
        };
        if !doc.is_object() {
            return Err(ExplainError::NotAnObject);
        }
        let (after, before) = match op {
            Op::Delete => (None, Some(doc.clone())),
            _ => (Some(doc.clone()), None),
        };
        let change = Change {
            op,
            collection: collection.to_owned(),
            key: key.clone(),
            after,
            before,
            updated_fields: None,
            position: Position::default(),
            at: None,
            as_of: None,
        };
        let rules = self.router.explain(&change).await;
        let recipients = all_recipients(&rules);
        let user = user.map(|u| {
            let reasons: Vec<(bool, String)> = rules.iter().map(|r| r.reason_for(u, op)).collect();
            Verdict {
                id: u.to_owned(),
                recipient: recipients.iter().any(|r| r == u),
                reasons: reasons.into_iter().map(|(_, why)| why).collect(),
            }
        });
        Ok(Explanation {
            collection: collection.to_owned(),
            key,
            op,
            source,
            document: doc,
            rules,
            recipients,
            user,
        })
    }
}

impl Explanation {
    /// The explanation for people: `changecast explain`'s output.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let from = match self.source {
            "database" => "read from the database",
            _ => "as given",
        };
        let _ = writeln!(
            s,
            "{} {}: explained as an `{}`, the document {from}:",
            self.collection, self.key, self.op
        );
        let _ = writeln!(s, "  {}", self.document);
        for rule in &self.rules {
            let _ = writeln!(s);
            let _ = writeln!(s, "{} (on {})", rule.title(), rule.on.join(", "));
            if !rule.listens {
                let _ = writeln!(s, "  does not listen to `{}`", self.op);
                continue;
            }
            for (label, c) in [("when", &rule.when), ("before the change", &rule.before)] {
                let Some(c) = c else { continue };
                let value = match (c.value, &c.error) {
                    (Some(v), _) => v.to_string(),
                    (None, Some(e)) => format!("failed: {e}"),
                    (None, None) => "not evaluated".to_string(),
                };
                let note = c
                    .note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                let _ = writeln!(s, "  {label} `{}`: {value}{note}", c.expr);
            }
            if let Some(c) = &rule.cooldown {
                let _ = writeln!(s, "  cooldown: {c}");
            }
            if let Some(m) = &rule.message {
                let _ = writeln!(s, "  message: {m:?}");
            }
            for spec in &rule.to {
                let image = match spec.image {
                    "before" => " (on the document before the change)",
                    "deleted" => " (on the deleted document)",
                    _ => "",
                };
                let _ = writeln!(s, "  to {}{image}", spec.spec);
                if let Some(l) = &spec.lookup {
                    let filter: Vec<String> =
                        l.filter.iter().map(|(f, v)| format!("{f} = {v}")).collect();
                    let limit = match l.limit {
                        Some(1) => "first match",
                        _ => "every match",
                    };
                    let from = if l.cached {
                        "from the lookup cache"
                    } else {
                        "read from the source"
                    };
                    let found = match l.answer.len() {
                        0 => "found no document".to_string(),
                        n => format!("{n} document(s)"),
                    };
                    let _ = writeln!(
                        s,
                        "    lookup `{}` where {} ({limit}): {from}, {found}",
                        l.collection,
                        filter.join(" and ")
                    );
                    for d in &l.answer {
                        let _ = writeln!(s, "      {d}");
                    }
                }
                match &spec.error {
                    Some(e) => {
                        let _ = writeln!(s, "    gives nobody: {e}");
                    }
                    None if spec.gives.is_empty() => {
                        let _ = writeln!(s, "    gives nobody");
                    }
                    None => {
                        let _ = writeln!(s, "    gives {}", spec.gives.join(", "));
                    }
                }
            }
            if let Some(skip) = &rule.skip {
                let _ = writeln!(s, "  skipped ({}): {}", skip.reason, skip.message);
            }
            if rule.delivers() {
                let _ = writeln!(s, "  recipients: {}", rule.recipients.join(", "));
            }
        }
        let _ = writeln!(s);
        let all = match self.recipients.as_slice() {
            [] => "nobody".to_string(),
            r => r.join(", "),
        };
        let _ = writeln!(s, "recipients in all: {all}");
        if let Some(v) = &self.user {
            let chosen: Vec<&str> = self
                .rules
                .iter()
                .zip(&v.reasons)
                .filter(|(r, _)| r.recipients.contains(&v.id))
                .map(|(_, why)| why.as_str())
                .collect();
            if v.recipient {
                let _ = writeln!(s, "{} is a recipient: {}", v.id, chosen.join("; "));
            } else {
                let _ = writeln!(s, "{} is not a recipient: {}", v.id, v.reasons.join("; "));
            }
            for why in &v.reasons {
                let _ = writeln!(s, "  - {why}");
            }
        }
        s
    }
}
