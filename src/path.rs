//! Dotted field paths into JSON documents (`owner._id`), as rules name them.
//!
//! Paths are parsed once when the config is compiled; reading one on a document walks
//! objects by key and, like MongoDB, descends into every element of an array it meets.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// A parsed, non-empty dotted path. Cheap to clone (queries carry their paths).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldPath {
    segments: Arc<[String]>,
}

impl FieldPath {
    /// Parses `a.b.c`. Empty paths and empty segments (`a..b`, `.a`) are refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty field path".into());
        }
        let segments: Vec<String> = s.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("`{s}` has an empty segment"));
        }
        Ok(FieldPath {
            segments: segments.into(),
        })
    }

    /// The first segment: the top-level field (an SQLite column).
    pub fn root(&self) -> &str {
        &self.segments[0]
    }

    /// The segments after the first.
    pub fn rest(&self) -> &[String] {
        &self.segments[1..]
    }

    /// Every value found at this path. A missing field yields nothing; arrays on the way are
    /// descended element by element, and an array at the end contributes its elements.
    pub fn collect<'a>(&self, doc: &'a Value, out: &mut Vec<&'a Value>) {
        collect_at(&self.segments, doc, out);
    }

    /// The single value at this path, without descending arrays; `None` when missing.
    pub fn get<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        self.segments
            .iter()
            .try_fold(doc, |v, seg| v.as_object()?.get(seg))
    }
}

fn collect_at<'a>(segments: &[String], v: &'a Value, out: &mut Vec<&'a Value>) {
    match (segments.split_first(), v) {
        (_, Value::Array(items)) => items.iter().for_each(|i| collect_at(segments, i, out)),
        (None, Value::Null) => {}
        (None, v) => out.push(v),
        (Some((first, rest)), Value::Object(map)) => {
            if let Some(child) = map.get(first) {
                collect_at(rest, child, out);
            }
        }
        (Some(_), _) => {}
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

/// Renders a scalar as a user id / document key string: strings as they are, numbers and
/// booleans in their JSON form. Objects, arrays and null are not ids.
pub fn scalar_to_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_refuses_empty_segments() {
        assert!(FieldPath::parse("").is_err());
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse(".a").is_err());
        let p = FieldPath::parse("owner._id").unwrap();
        assert_eq!(p.root(), "owner");
        assert_eq!(p.to_string(), "owner._id");
    }

    #[test]
    fn collect_walks_objects_and_arrays() {
        let doc = json!({"owner": {"_id": "u1"}, "staff": [{"_id": "u2"}, {"_id": "u3"}, {}], "tags": ["a", "b"], "none": null});
        let mut out = Vec::new();
        FieldPath::parse("owner._id")
            .unwrap()
            .collect(&doc, &mut out);
        assert_eq!(out, vec![&json!("u1")]);
        out.clear();
        FieldPath::parse("staff._id")
            .unwrap()
            .collect(&doc, &mut out);
        assert_eq!(out, vec![&json!("u2"), &json!("u3")]);
        out.clear();
        FieldPath::parse("tags").unwrap().collect(&doc, &mut out);
        assert_eq!(out.len(), 2);
        out.clear();
        FieldPath::parse("none").unwrap().collect(&doc, &mut out);
        FieldPath::parse("missing.x")
            .unwrap()
            .collect(&doc, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn get_does_not_descend_arrays() {
        let doc = json!({"a": {"b": 1}, "c": [{"d": 1}]});
        assert_eq!(FieldPath::parse("a.b").unwrap().get(&doc), Some(&json!(1)));
        assert_eq!(FieldPath::parse("c.d").unwrap().get(&doc), None);
    }

    #[test]
    fn scalars_render_as_ids() {
        assert_eq!(scalar_to_string(&json!("x")), Some("x".into()));
        assert_eq!(scalar_to_string(&json!(7)), Some("7".into()));
        assert_eq!(scalar_to_string(&json!({"a": 1})), None);
        assert_eq!(scalar_to_string(&json!(null)), None);
    }
}
