//! The one change type every source produces.
//!
//! In: whatever a source reads (an SQLite change-log row, a MongoDB change event).
//! Out: a [`Change`], handed to the router. Nothing downstream of a source knows which
//! database a change came from; that is what lets one rules engine and one hub serve
//! every source.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A user id as routing hands it on: shared, so the same id reaches the hub, the history
/// store and every event's recipient list without a copy.
pub type UserId = Arc<str>;

/// An event's recipients: distinct user ids, sorted. One list can be shared by many events
/// (every change of a business reaches the same cached list of its users).
pub type Recipients = Arc<[UserId]>;

/// What happened to the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Replace,
    Delete,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Insert, Op::Update, Op::Replace, Op::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Replace => "replace",
            Op::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == s)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A source's position: opaque to everyone but the source that made it, and persistable
/// as bytes (an SQLite log sequence number followed by the log's identity, a MongoDB
/// resume token as BSON).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Position(pub Vec<u8>);

impl Position {
    /// A position that is a plain sequence number (big-endian, so byte order is numeric order).
    pub fn from_seq(seq: u64) -> Self {
        Position(seq.to_be_bytes().to_vec())
    }

    /// The sequence number of a position made by [`Position::from_seq`].
    pub fn as_seq(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.0.as_slice().try_into().ok()?;
        Some(u64::from_be_bytes(bytes))
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_seq() {
            Some(seq) => write!(f, "Position({seq})"),
            None => write!(f, "Position({} bytes)", self.0.len()),
        }
    }
}

/// The point in the source's history a change sits at, for reading other documents as
/// they were when the change was made (see `route` module docs, "as of the change").
/// Not part of any cache key: an answer read as of one change stays right for later
/// changes until the stream itself invalidates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AsOf {
    /// SQLite: the change-log sequence number; the state after every log row up to it.
    Seq(u64),
    /// MongoDB: the event's `clusterTime` (a BSON Timestamp: seconds, increment); a
    /// snapshot read `atClusterTime` sees every write committed up to it.
    ClusterTime { time: u32, increment: u32 },
}

/// One change to one document, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub op: Op,
    /// The collection (MongoDB) or table (SQLite) the document lives in.
    pub collection: String,
    /// The document key rendered as a string (`_id`, or the table's primary key).
    pub key: String,
    /// The document after the change; `None` for a delete, or when the source could not
    /// supply it.
    pub after: Option<Value>,
    /// The document before the change, when the source has it (always for SQLite;
    /// MongoDB with pre-images enabled).
    pub before: Option<Value>,
    /// For updates: the top-level fields whose value changed.
    pub updated_fields: Option<Vec<String>>,
    /// Where this change sits in the source; checkpointed once the change is handed over.
    pub position: Position,
    /// Commit time as RFC 3339 UTC with milliseconds, when the source knows it.
    pub at: Option<String>,
    /// Where lookups made to route this change read (`None`: the current state).
    pub as_of: Option<AsOf>,
}

impl Change {
    /// The document rules read: the post-image, or the pre-image for a delete.
    pub fn doc(&self) -> Option<&Value> {
        match self.op {
            Op::Delete => self.before.as_ref(),
            _ => self.after.as_ref().or(self.before.as_ref()),
        }
    }
}

/// The top-level fields whose values differ between two documents (added, removed or
/// changed), sorted.
pub fn changed_fields(before: &Value, after: &Value) -> Vec<String> {
    let (Some(b), Some(a)) = (before.as_object(), after.as_object()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn position_round_trips_a_sequence_number() {
        let p = Position::from_seq(1042);
        assert_eq!(p.as_seq(), Some(1042));
        assert!(Position::from_seq(9).0 < Position::from_seq(10).0);
        assert_eq!(Position(vec![1, 2, 3]).as_seq(), None);
    }

    #[test]
    fn changed_fields_lists_added_removed_and_changed() {
        let before = json!({"a": 1, "b": 2, "c": 3});
        let after = json!({"a": 1, "b": 5, "d": 4});
        assert_eq!(changed_fields(&before, &after), vec!["b", "c", "d"]);
    }

    #[test]
    fn doc_is_the_pre_image_for_deletes() {
        let change = Change {
            op: Op::Delete,
            collection: "orders".into(),
            key: "o1".into(),
            after: None,
            before: Some(json!({"_id": "o1"})),
            updated_fields: None,
            position: Position::from_seq(1),
            at: None,
            as_of: None,
        };
        assert_eq!(change.doc(), Some(&json!({"_id": "o1"})));
    }
}
