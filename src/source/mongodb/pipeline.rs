//! The change-stream request, generated from the rules.
//!
//! In: the collections the plan watches, the operations its rules use and the fields they
//! need. Out: the `$match` / `$project` pipeline and the options sent with `aggregate`, so
//! the server filters and trims events before they cross the network (the seed wrote this
//! pipeline by hand).

use std::collections::{BTreeMap, BTreeSet};

use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};

use crate::change::Op;
use crate::config::Images;
use crate::route::expr::Reads;

/// What the stream asks for.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Collection → operations routed there.
    pub watched: BTreeMap<String, BTreeSet<Op>>,
    /// Collection → top-level fields the rules read.
    pub needed: BTreeMap<String, Reads>,
    pub images: Images,
}

/// Event fields changecast itself reads. `_id` (the resume token) is kept by `$project`
/// implicitly; removing it would make the stream unresumable.
const EVENT_FIELDS: [&str; 7] = [
    "operationType",
    "ns",
    "to",
    "documentKey",
    "updateDescription",
    "clusterTime",
    "wallTime",
];

/// The stage that splits events over 16 MB into fragments (MongoDB 6.0.9+, 7.0+).
pub const SPLIT_STAGE: &str = "$changeStreamSplitLargeEvent";

impl StreamSpec {
    pub fn full_document(&self) -> FullDocumentType {
        match self.images {
            // The post-image: the document exactly as the change left it.
            Images::Ensure | Images::Assume => FullDocumentType::WhenAvailable,
            // The current document, looked up when the event is read.
            Images::Off => FullDocumentType::UpdateLookup,
        }
    }

    pub fn full_document_before_change(&self) -> FullDocumentBeforeChangeType {
        match self.images {
            // A missing pre-image is null, not a stream-killing error 47.
            Images::Ensure | Images::Assume => FullDocumentBeforeChangeType::WhenAvailable,
            Images::Off => FullDocumentBeforeChangeType::Off,
        }
    }

    /// The aggregation stages after `$changeStream`, ending with
    /// `$changeStreamSplitLargeEvent` (it must be last): events over 16 MB then arrive as
    /// fragments the source reassembles, instead of failing the stream.
    pub fn pipeline(&self) -> Vec<Document> {
        self.stages(true)
    }

    /// The stages for a server without `$changeStreamSplitLargeEvent` (before 6.0.9 / 7.0).
    pub fn pipeline_without_split(&self) -> Vec<Document> {
        self.stages(false)
    }

    /// The stages that read past an event too large to send (10334): the same `$match`, so
    /// the same events in the same order, projected to what identifies the event; the
    /// images, which made it too large, are left out.
    pub fn identify_pipeline(&self, split: bool) -> Vec<Document> {
        let mut stages = self.stages(split);
        let mut project = Document::new();
        for f in [
            "operationType",
            "ns",
            "documentKey",
            "clusterTime",
            "wallTime",
        ] {
            project.insert(f, 1);
        }
        stages[1] = doc! {"$project": project};
        stages
    }

    fn stages(&self, split: bool) -> Vec<Document> {
        let mut clauses: Vec<Bson> = self
            .watched
            .iter()
            .map(|(coll, ops)| {
                let mut types: Vec<Bson> = ops
                    .iter()
                    .map(|o| Bson::String(o.as_str().into()))
                    .collect();
                // Documents vanish without per-document events on these: counted and logged.
                types.extend(["drop", "rename"].map(|t| Bson::String(t.into())));
                Bson::Document(doc! {"ns.coll": coll, "operationType": {"$in": types}})
            })
            .collect();
        clauses.push(Bson::Document(
            doc! {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
        ));
        let mut project = Document::new();
        for f in EVENT_FIELDS {
            project.insert(f, 1);
        }
        let mut fields: BTreeSet<&str> = BTreeSet::new();
        let mut whole = false;
        for reads in self.needed.values() {
            match reads {
                Reads::Whole => whole = true,
                Reads::Fields(f) => fields.extend(f.iter().map(String::as_str)),
            }
        }
        let images = ["fullDocument", "fullDocumentBeforeChange"];
        for image in images {
            if whole {
                project.insert(image, 1);
            } else {
                for f in &fields {
                    project.insert(format!("{image}.{f}"), 1);
                }
            }
        }
        let mut stages = vec![
            doc! {"$match": {"$or": clauses}},
            doc! {"$project": project},
        ];
        if split {
            stages.push(doc! {SPLIT_STAGE: {}});
        }
        stages
    }

    /// For `check`: the pipeline and options as the server will receive them.
    pub fn describe(&self) -> String {
        let stages: Vec<String> = self
            .pipeline()
            .iter()
            .map(|s| {
                serde_json::to_string(&Bson::Document(s.clone()).into_relaxed_extjson())
                    .unwrap_or_default()
            })
            .collect();
        let full = match self.full_document() {
            FullDocumentType::WhenAvailable => "whenAvailable",
            _ => "updateLookup",
        };
        let before = match self.full_document_before_change() {
            FullDocumentBeforeChangeType::WhenAvailable => "whenAvailable",
            _ => "off",
        };
        format!(
            "  change stream options: fullDocument: {full}, fullDocumentBeforeChange: {before}\n  pipeline:\n    {}\n  (the last stage is left out on servers that do not know it: before 6.0.9 / 7.0)\n",
            stages.join("\n    ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(needed: Reads, images: Images) -> StreamSpec {
        StreamSpec {
            watched: BTreeMap::from([
                (
                    "orders".to_string(),
                    BTreeSet::from([Op::Insert, Op::Delete]),
                ),
                ("businesses".to_string(), Op::ALL.into_iter().collect()),
            ]),
            needed: BTreeMap::from([("orders".to_string(), needed)]),
            images,
        }
    }

    #[test]
    fn match_names_each_collection_with_its_operations() {
        let p = spec(Reads::Whole, Images::Ensure).pipeline();
        let m = p[0].get_document("$match").unwrap();
        let or = m.get_array("$or").unwrap();
        assert_eq!(or.len(), 3);
        let orders = or[1].as_document().unwrap();
        assert_eq!(orders.get_str("ns.coll").unwrap(), "orders");
        let types: Vec<&str> = orders
            .get_document("operationType")
            .unwrap()
            .get_array("$in")
            .unwrap()
            .iter()
            .filter_map(Bson::as_str)
            .collect();
        assert_eq!(types, vec!["insert", "delete", "drop", "rename"]);
    }

    #[test]
    fn project_keeps_only_needed_fields_and_never_drops_the_token() {
        let fields = Reads::Fields(["_id".to_string(), "creator_id".to_string()].into());
        let p = spec(fields, Images::Ensure).pipeline();
        let project = p[1].get_document("$project").unwrap();
        assert!(
            !project.contains_key("_id"),
            "excluding _id would break resume"
        );
        assert!(project.contains_key("fullDocument.creator_id"));
        assert!(project.contains_key("fullDocumentBeforeChange.creator_id"));
        assert!(!project.contains_key("fullDocument"));
        let whole = spec(Reads::Whole, Images::Off).pipeline();
        assert!(
            whole[1]
                .get_document("$project")
                .unwrap()
                .contains_key("fullDocument")
        );
    }

    #[test]
    fn the_split_stage_is_last_and_the_identifying_pipeline_drops_the_images() {
        let spec = spec(Reads::Whole, Images::Ensure);
        let p = spec.pipeline();
        assert_eq!(p.len(), 3);
        assert!(p[2].contains_key(SPLIT_STAGE), "{:?}", p[2]);
        let without = spec.pipeline_without_split();
        assert_eq!(without.len(), 2);
        assert!(without.iter().all(|s| !s.contains_key(SPLIT_STAGE)));
        for split in [true, false] {
            let ident = spec.identify_pipeline(split);
            assert_eq!(ident[0], p[0], "the same $match: the same events");
            let project = ident[1].get_document("$project").unwrap();
            assert!(!project.contains_key("fullDocument"));
            assert!(!project.contains_key("fullDocumentBeforeChange"));
            assert!(project.contains_key("documentKey"));
            assert_eq!(ident.len(), if split { 3 } else { 2 });
        }
    }

    #[test]
    fn options_follow_the_images_setting() {
        let on = spec(Reads::Whole, Images::Ensure);
        assert!(matches!(
            on.full_document(),
            FullDocumentType::WhenAvailable
        ));
        assert!(matches!(
            on.full_document_before_change(),
            FullDocumentBeforeChangeType::WhenAvailable
        ));
        let off = spec(Reads::Whole, Images::Off);
        assert!(matches!(
            off.full_document(),
            FullDocumentType::UpdateLookup
        ));
        assert!(matches!(
            off.full_document_before_change(),
            FullDocumentBeforeChangeType::Off
        ));
        assert!(
            on.describe()
                .contains("fullDocumentBeforeChange: whenAvailable")
        );
    }
}
