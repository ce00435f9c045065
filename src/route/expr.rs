//! Conditions: CEL expressions on a change (`doc.quantity_in_stock <= doc.reorder_point`).
//!
//! In: the expression text from the config (compiled once) and, per evaluation, the
//! document, its pre-image and the operation. Out: true or false, or an error (a missing
//! field, a type mismatch) that the caller counts and skips. CEL comes from the `cel`
//! crate, which returns errors rather than panicking on malformed input.
//!
//! Variables: `doc` (the document after the change, or before it for a delete), `before`
//! (the pre-image, or null), `op` ("insert", …), `collection` and `key`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::{Context, Env, Program};
use serde_json::Value;

use crate::change::Op;
use crate::config::ConfigError;

/// The variables a condition may use.
const VARIABLES: [&str; 5] = ["doc", "before", "op", "collection", "key"];

/// CEL's standard library, built once: building it per evaluation would dominate the cost.
fn stdlib() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    Arc::clone(ENV.get_or_init(|| Arc::new(Env::stdlib())))
}

/// Which top-level fields of `doc` (and `before`) an expression reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Reads {
    /// Exactly these top-level fields.
    Fields(BTreeSet<String>),
    /// The document as a whole (it is passed to a function, or indexed dynamically).
    #[default]
    Whole,
}

impl Reads {
    pub fn none() -> Reads {
        Reads::Fields(BTreeSet::new())
    }

    pub fn merge(&mut self, other: &Reads) {
        match (&mut *self, other) {
            (Reads::Whole, _) => {}
            (_, Reads::Whole) => *self = Reads::Whole,
            (Reads::Fields(a), Reads::Fields(b)) => a.extend(b.iter().cloned()),
        }
    }

    pub fn add(&mut self, field: &str) {
        if let Reads::Fields(f) = self {
            f.insert(field.to_owned());
        }
    }
}

/// A compiled condition.
pub struct Condition {
    pub source: String,
    program: Program,
    /// Top-level document fields the expression reads.
    pub reads: Reads,
    /// Each `doc.<field>` and `before.<field>` it names, as (variable, field): what
    /// `check` compares with the collection's fields, even when `reads` is `Whole`.
    pub named: BTreeSet<(String, String)>,
    /// Which of [`VARIABLES`] the expression uses: only those are bound.
    uses: [bool; 5],
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Condition({:?})", self.source)
    }
}

impl Clone for Condition {
    fn clone(&self) -> Self {
        // Compiled once already, so compiling the same text again cannot fail.
        let program = Program::compile(&self.source).expect("recompiling a valid expression");
        Condition {
            source: self.source.clone(),
            program,
            reads: self.reads.clone(),
            named: self.named.clone(),
            uses: self.uses,
        }
    }
}

impl Condition {
    /// Compiles `source`; errors name `path`.
    pub fn compile(source: &str, path: &str, errors: &mut Vec<ConfigError>) -> Option<Condition> {
        if source.trim().is_empty() {
            errors.push(ConfigError::new(path, "empty condition"));
            return None;
        }
        let program = match Program::compile(source) {
            Ok(p) => p,
            Err(e) => {
                let msg = e
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("syntax error")
                    .to_owned();
                errors.push(ConfigError::new(
                    path,
                    format!("invalid CEL expression: {msg}"),
                ));
                return None;
            }
        };
        let mut bound = Vec::new();
        comprehension_vars(program.expression(), &mut bound);
        let unknown: Vec<String> = program
            .references()
            .variables()
            .into_iter()
            .filter(|v| !VARIABLES.contains(v) && !bound.iter().any(|b| b == v))
            .map(str::to_owned)
            .collect();
        if !unknown.is_empty() {
            errors.push(ConfigError::new(
                path,
                format!(
                    "unknown variable(s) {}: a condition can use {}",
                    unknown.join(", "),
                    VARIABLES.join(", ")
                ),
            ));
            return None;
        }
        let mut reads = Reads::none();
        let mut named = BTreeSet::new();
        collect_reads(program.expression(), &mut reads, &mut named);
        let refs = program.references();
        let uses = VARIABLES.map(|v| refs.has_variable(v));
        Some(Condition {
            source: source.to_owned(),
            program,
            reads,
            named,
            uses,
        })
    }

    /// Whether the expression reads `variable` (`"before"`: it needs the old document).
    pub fn uses(&self, variable: &str) -> bool {
        VARIABLES
            .iter()
            .zip(self.uses)
            .any(|(v, used)| *v == variable && used)
    }

    /// Evaluates the condition. A result that is not a boolean is an error.
    pub fn eval(
        &self,
        doc: &Value,
        before: Option<&Value>,
        op: Op,
        collection: &str,
        key: &str,
    ) -> Result<bool, String> {
        let mut ctx = Context::with_env(stdlib());
        // Converting a document into CEL values is most of the cost of an evaluation:
        // bind only the variables the expression uses, and of a document only the fields
        // it reads.
        let [use_doc, use_before, use_op, use_collection, use_key] = self.uses;
        let mut bind = |name: &str, v: &Value| {
            ctx.add_variable(name.to_owned(), self.narrow(v).as_ref())
                .map_err(|e| format!("cannot bind `{name}`: {e}"))
        };
        if use_doc {
            bind("doc", doc)?;
        }
        if use_before {
            bind("before", before.unwrap_or(&Value::Null))?;
        }
        if use_op {
            ctx.add_variable_from_value("op", op.as_str());
        }
        if use_collection {
            ctx.add_variable_from_value("collection", collection);
        }
        if use_key {
            ctx.add_variable_from_value("key", key);
        }
        match self.program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("`{}` gave {other:?}, not a boolean", self.source)),
            Err(e) => Err(format!("`{}`: {e}", self.source)),
        }
    }

    /// The document limited to the fields the expression reads.
    fn narrow<'a>(&self, v: &'a Value) -> Cow<'a, Value> {
        match (&self.reads, v) {
            (Reads::Fields(fields), Value::Object(map)) if map.len() > fields.len() => {
                Cow::Owned(Value::Object(
                    fields
                        .iter()
                        .filter_map(|f| map.get(f).map(|x| (f.clone(), x.clone())))
                        .collect(),
                ))
            }
            _ => Cow::Borrowed(v),
        }
    }
}

/// Names bound by comprehensions (`doc.items.exists(i, ...)` binds `i`): not free
/// variables, so not unknown ones.
fn comprehension_vars(e: &IdedExpr, out: &mut Vec<String>) {
    match &e.expr {
        Expr::Comprehension(c) => {
            out.push(c.iter_var.clone());
            out.extend(c.iter_var2.clone());
            out.push(c.accu_var.clone());
            for x in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                comprehension_vars(x, out);
            }
        }
        Expr::Select(s) => comprehension_vars(&s.operand, out),
        Expr::Call(c) => {
            c.target.iter().for_each(|t| comprehension_vars(t, out));
            c.args.iter().for_each(|a| comprehension_vars(a, out));
        }
        Expr::List(l) => l.elements.iter().for_each(|x| comprehension_vars(x, out)),
        _ => {}
    }
}

/// Walks the expression for `doc.<field>` and `before.<field>` selections, into `reads`
/// and, as (variable, field), into `named`.
fn collect_reads(e: &IdedExpr, reads: &mut Reads, named: &mut BTreeSet<(String, String)>) {
    match &e.expr {
        Expr::Select(s) => {
            if let Expr::Ident(root) = &s.operand.expr
                && (root == "doc" || root == "before")
            {
                reads.add(&s.field);
                named.insert((root.clone(), s.field.clone()));
            } else {
                collect_reads(&s.operand, reads, named);
            }
        }
        Expr::Ident(name) if name == "doc" || name == "before" => *reads = Reads::Whole,
        Expr::Call(c) => {
            // `doc["field"]` is an index call with a literal: still one field.
            if c.func_name == "_[_]"
                && let [target, index] = c.args.as_slice()
                && matches!(&target.expr, Expr::Ident(n) if n == "doc" || n == "before")
                && let Expr::Ident(root) = &target.expr
                && let Expr::Literal(cel::common::ast::LiteralValue::String(field)) = &index.expr
            {
                reads.add(field.as_ref());
                named.insert((root.clone(), field.to_string()));
                return;
            }
            if let Some(t) = &c.target {
                collect_reads(t, reads, named);
            }
            c.args.iter().for_each(|a| collect_reads(a, reads, named));
        }
        Expr::Comprehension(c) => {
            for x in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                collect_reads(x, reads, named);
            }
        }
        Expr::List(l) => l
            .elements
            .iter()
            .for_each(|x| collect_reads(x, reads, named)),
        Expr::Map(m) => m.entries.iter().for_each(|en| match &en.expr {
            EntryExpr::MapEntry(me) => {
                collect_reads(&me.key, reads, named);
                collect_reads(&me.value, reads, named);
            }
            EntryExpr::StructField(sf) => collect_reads(&sf.value, reads, named),
        }),
        Expr::Struct(s) => s.entries.iter().for_each(|en| match &en.expr {
            EntryExpr::MapEntry(me) => {
                collect_reads(&me.key, reads, named);
                collect_reads(&me.value, reads, named);
            }
            EntryExpr::StructField(sf) => collect_reads(&sf.value, reads, named),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(src: &str) -> Condition {
        let mut errors = Vec::new();
        Condition::compile(src, "x", &mut errors).unwrap_or_else(|| panic!("{errors:?}"))
    }

    fn eval(c: &Condition, doc: Value) -> Result<bool, String> {
        c.eval(&doc, None, Op::Update, "items", "i1")
    }

    #[test]
    fn evaluates_on_the_document() {
        let c = cond("doc.quantity_in_stock <= doc.reorder_point");
        assert_eq!(
            eval(&c, json!({"quantity_in_stock": 2, "reorder_point": 5})),
            Ok(true)
        );
        assert_eq!(
            eval(&c, json!({"quantity_in_stock": 9, "reorder_point": 5})),
            Ok(false)
        );
        assert_eq!(
            c.reads,
            Reads::Fields(["quantity_in_stock".into(), "reorder_point".into()].into())
        );
    }

    #[test]
    fn missing_fields_and_non_booleans_are_errors_not_panics() {
        let c = cond("doc.quantity_in_stock <= doc.reorder_point");
        assert!(eval(&c, json!({"reorder_point": 5})).is_err());
        assert!(eval(&c, json!({"quantity_in_stock": "lots", "reorder_point": 5})).is_err());
        assert!(eval(&cond("doc.reorder_point"), json!({"reorder_point": 5})).is_err());
    }

    #[test]
    fn other_variables_are_available() {
        let c = cond(
            "op == 'update' && collection == 'items' && key == 'i1' && before.status != doc.status",
        );
        let r = c.eval(
            &json!({"status": "paid"}),
            Some(&json!({"status": "new"})),
            Op::Update,
            "items",
            "i1",
        );
        assert_eq!(r, Ok(true));
        assert_eq!(c.reads, Reads::Fields(["status".into()].into()));
    }

    #[test]
    fn bad_expressions_are_refused_at_compile_time() {
        for src in ["doc.quantity <= ", "", "stock < 3", "doc.a +* 2"] {
            let mut errors = Vec::new();
            assert!(
                Condition::compile(src, "alert[0].when", &mut errors).is_none(),
                "{src}"
            );
            assert_eq!(errors[0].path, "alert[0].when");
        }
    }

    #[test]
    fn named_fields_are_known_even_when_the_whole_document_is_read() {
        let c = cond("size(doc) > 2 && doc.stat == 'x' && before['titel'] != doc.meta.urgent");
        assert_eq!(c.reads, Reads::Whole);
        let named: Vec<(&str, &str)> = c
            .named
            .iter()
            .map(|(v, f)| (v.as_str(), f.as_str()))
            .collect();
        assert_eq!(
            named,
            vec![("before", "titel"), ("doc", "meta"), ("doc", "stat")]
        );
    }

    #[test]
    fn reads_fall_back_to_the_whole_document() {
        assert_eq!(cond("size(doc) > 2").reads, Reads::Whole);
        assert_eq!(
            cond("doc['name'] == 'x'").reads,
            Reads::Fields(["name".into()].into())
        );
        assert_eq!(
            cond("doc.items.exists(i, i.qty > 1)").reads,
            Reads::Fields(["items".into()].into())
        );
    }
}
