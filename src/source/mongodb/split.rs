//! Reassembly of change events the server split into fragments.
//!
//! In: events read from a stream with `$changeStreamSplitLargeEvent`. An event over 16 MB
//! arrives as consecutive fragments, each with `splitEvent: {fragment: n, of: m}`, its own
//! resume token in `_id`, and some of the event's top-level fields. Out: the whole event,
//! its fields merged and its `_id` the last fragment's token — the token to checkpoint,
//! since resuming after it continues after the whole event. Until the last fragment
//! arrives nothing is handed over and no token advances, so a restart mid-event re-reads
//! every fragment.

use mongodb::bson::{Bson, Document};

/// What one event read from the stream amounts to.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// A whole event (never split, or the last fragment completed it).
    Whole(Document),
    /// A fragment was kept; more are to come.
    Pending,
    /// The last fragment of an event whose earlier fragments were lost: the event is over
    /// and this, its token, may be passed.
    LostEnd(Bson),
    /// A fragment that belongs to no event being read: nothing to hand over.
    Stray,
}

/// The fragments of the event being reassembled.
#[derive(Debug, Default)]
pub struct Fragments {
    /// Fields gathered so far, the fragment expected next, and how many there are.
    partial: Option<(Document, i64, i64)>,
}

impl Fragments {
    /// True while an event is half read: no token may advance past its start.
    pub fn pending(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes the next event read from the stream. The second value says why a partly
    /// read event was dropped (a fragment missing or out of order), for counting.
    pub fn add(&mut self, mut event: Document) -> (Piece, Option<String>) {
        let Some(split) = event.remove("splitEvent") else {
            let dropped = self
                .partial
                .take()
                .map(|_| "an event arrived before the last fragment of the one before".into());
            return (Piece::Whole(event), dropped);
        };
        let numbers = split.as_document().and_then(|d| {
            let n = |k| {
                d.get(k)
                    .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from)))
            };
            Some((n("fragment")?, n("of")?))
        });
        let Some((fragment, of)) = numbers.filter(|(f, of)| (1..=*of).contains(f)) else {
            self.partial = None;
            return (Piece::Stray, Some(format!("malformed splitEvent {split}")));
        };
        let mut dropped = None;
        let mut merged = match self.partial.take() {
            Some((merged, next, total)) if next == fragment && total == of => merged,
            partial => {
                if partial.is_some() || fragment != 1 {
                    dropped = Some(format!("fragment {fragment} of {of} arrived out of order"));
                }
                if fragment != 1 {
                    let piece = match event.remove("_id") {
                        Some(token) if fragment == of => Piece::LostEnd(token),
                        _ => Piece::Stray,
                    };
                    return (piece, dropped);
                }
                Document::new()
            }
        };
        let token = event.remove("_id");
        merged.extend(event);
        if fragment < of {
            self.partial = Some((merged, fragment + 1, of));
            return (Piece::Pending, dropped);
        }
        let mut whole = Document::new();
        if let Some(token) = token {
            whole.insert("_id", token);
        }
        whole.extend(merged);
        (Piece::Whole(whole), dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn fragment(n: i32, of: i32, fields: Document) -> Document {
        let mut d =
            doc! {"_id": {"_data": format!("t{n}")}, "splitEvent": {"fragment": n, "of": of}};
        d.extend(fields);
        d
    }

    #[test]
    fn fragments_are_merged_with_the_last_token() {
        let mut f = Fragments::default();
        let first = fragment(
            1,
            3,
            doc! {"operationType": "update", "fullDocument": {"a": 1}},
        );
        assert_eq!(f.add(first), (Piece::Pending, None));
        assert!(f.pending());
        let second = fragment(2, 3, doc! {"fullDocumentBeforeChange": {"a": 0}});
        assert_eq!(f.add(second), (Piece::Pending, None));
        let (Piece::Whole(whole), None) = f.add(fragment(3, 3, doc! {"updateDescription": {}}))
        else {
            panic!("the third of three completes the event")
        };
        assert!(!f.pending());
        assert_eq!(
            whole,
            doc! {
                "_id": {"_data": "t3"},
                "operationType": "update",
                "fullDocument": {"a": 1},
                "fullDocumentBeforeChange": {"a": 0},
                "updateDescription": {},
            }
        );
        let plain = doc! {"_id": {"_data": "t4"}, "operationType": "insert"};
        assert_eq!(f.add(plain.clone()), (Piece::Whole(plain), None));
    }

    #[test]
    fn broken_sequences_are_dropped_not_glued() {
        let mut f = Fragments::default();
        // A middle fragment with nothing before it.
        let (piece, why) = f.add(fragment(2, 3, doc! {}));
        assert_eq!(piece, Piece::Stray);
        assert!(why.is_some());
        // A last fragment with nothing before it: the event is over, its token passable.
        let (piece, why) = f.add(fragment(2, 2, doc! {}));
        assert_eq!(piece, Piece::LostEnd(Bson::Document(doc! {"_data": "t2"})));
        assert!(why.is_some());
        // A whole event cutting a split one short: the partial one is dropped, the whole
        // one still delivered.
        assert_eq!(f.add(fragment(1, 2, doc! {"a": 1})), (Piece::Pending, None));
        let plain = doc! {"_id": {"_data": "x"}, "b": 2};
        let (piece, why) = f.add(plain.clone());
        assert_eq!(piece, Piece::Whole(plain));
        assert!(why.is_some());
        assert!(!f.pending());
        // A new first fragment restarts the event; the old one's fields are not glued on.
        assert_eq!(f.add(fragment(1, 2, doc! {"a": 1})), (Piece::Pending, None));
        let (piece, why) = f.add(fragment(1, 2, doc! {"c": 3}));
        assert_eq!(piece, Piece::Pending);
        assert!(why.is_some());
        let (Piece::Whole(whole), None) = f.add(fragment(2, 2, doc! {"d": 4})) else {
            panic!("completes")
        };
        assert_eq!(whole, doc! {"_id": {"_data": "t2"}, "c": 3, "d": 4});
        // Nonsense numbers.
        for bad in [
            doc! {"fragment": 0, "of": 1},
            doc! {"fragment": 3, "of": 2},
            doc! {},
        ] {
            let mut e = doc! {"_id": {"_data": "y"}};
            e.insert("splitEvent", bad);
            let (piece, why) = f.add(e);
            assert_eq!(piece, Piece::Stray);
            assert!(why.is_some());
        }
    }
}
