//! MongoDB change events and documents, decoded into changecast's types.
//!
//! In: raw change-stream events (`Document`, never deserialised into a typed struct, so a
//! surprising event is a counted skip, not a stream error) and query results. Out:
//! [`Decoded`] events with JSON documents.
//!
//! BSON → JSON: ObjectIds become their 24-hex-digit strings (user ids and keys as the seed
//! prints them), dates RFC 3339 strings, Decimal128 strings, binaries hex. JSON → BSON for
//! lookups: a 24-hex-digit string matches either an ObjectId or that string, so a lookup
//! keyed by a field that was an ObjectId still finds its document.

use mongodb::bson::{Bson, Document, doc, oid::ObjectId};
use serde_json::{Map, Number, Value};

use crate::change::{AsOf, Change, Op, Position};
use crate::path::scalar_to_string;

/// A decoded change-stream event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A document change, ready to route.
    Change(Box<Change>),
    /// The stream ended; reopen with `start_after` this token.
    Invalidate,
    /// A watched collection was dropped or renamed, or the database dropped: documents
    /// disappeared without per-document events.
    Dropped { op: String, collection: String },
    /// An event type changecast does not route (e.g. `createIndexes` with showExpandedEvents).
    Other(String),
}

/// The resume token of an event: its `_id`, as BSON bytes.
pub fn token_bytes(event: &Document) -> Result<Vec<u8>, String> {
    let id = event
        .get_document("_id")
        .map_err(|_| "event has no resume token (`_id`)".to_string())?;
    let mut bytes = Vec::new();
    id.to_writer(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Decodes one event. `Err` for an event that does not have the documented shape.
pub fn decode(event: &Document) -> Result<Decoded, String> {
    let position = Position(token_bytes(event)?);
    let op = event
        .get_str("operationType")
        .map_err(|_| "event has no operationType".to_string())?;
    let collection = || -> Result<String, String> {
        event
            .get_document("ns")
            .and_then(|ns| ns.get_str("coll"))
            .map(str::to_owned)
            .map_err(|_| format!("{op} event has no ns.coll"))
    };
    let op = match op {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "replace" => Op::Replace,
        "delete" => Op::Delete,
        "invalidate" => return Ok(Decoded::Invalidate),
        "drop" | "rename" => {
            return Ok(Decoded::Dropped {
                op: op.to_owned(),
                collection: collection()?,
            });
        }
        "dropDatabase" => {
            return Ok(Decoded::Dropped {
                op: op.to_owned(),
                collection: String::new(),
            });
        }
        other => return Ok(Decoded::Other(other.to_owned())),
    };
    let collection = collection()?;
    let key = event
        .get_document("documentKey")
        .ok()
        .and_then(|k| k.get("_id"))
        .ok_or_else(|| format!("{op} event has no documentKey._id"))?;
    let key = scalar_to_string(&bson_to_json(key)).ok_or("documentKey._id is not a scalar")?;
    let image = |field: &str| match event.get(field) {
        Some(Bson::Document(d)) => Ok(Some(document_to_json(d))),
        None | Some(Bson::Null) => Ok(None),
        Some(_) => Err(format!("{field} is not a document")),
    };
    let after = image("fullDocument")?;
    let before = image("fullDocumentBeforeChange")?;
    let updated_fields = match op {
        Op::Update => {
            let desc = event
                .get_document("updateDescription")
                .map_err(|_| "update event has no updateDescription".to_string())?;
            let mut fields: Vec<String> = desc
                .get_document("updatedFields")
                .map(|u| u.keys().map(|k| top_level(k)).collect())
                .unwrap_or_default();
            if let Ok(removed) = desc.get_array("removedFields") {
                fields.extend(removed.iter().filter_map(Bson::as_str).map(top_level));
            }
            fields.sort();
            fields.dedup();
            Some(fields)
        }
        _ => None,
    };
    // Lookups for this change read a snapshot at its cluster time (see `lookup`).
    let as_of = match event.get("clusterTime") {
        Some(Bson::Timestamp(ts)) => Some(AsOf::ClusterTime {
            time: ts.time,
            increment: ts.increment,
        }),
        _ => None,
    };
    let at = match event.get("wallTime") {
        Some(Bson::DateTime(d)) => d.try_to_rfc3339_string().ok(),
        _ => match event.get("clusterTime") {
            Some(Bson::Timestamp(ts)) => {
                mongodb::bson::DateTime::from_millis(ts.time as i64 * 1000)
                    .try_to_rfc3339_string()
                    .ok()
            }
            _ => None,
        },
    };
    Ok(Decoded::Change(Box::new(Change {
        op,
        collection,
        key,
        after,
        before,
        updated_fields,
        position,
        at,
        as_of,
    })))
}

/// `a.b.c` → `a`.
fn top_level(path: &str) -> String {
    path.split('.').next().unwrap_or(path).to_owned()
}

pub fn document_to_json(d: &Document) -> Value {
    Value::Object(
        d.iter()
            .map(|(k, v)| (k.clone(), bson_to_json(v)))
            .collect::<Map<_, _>>(),
    )
}

pub fn bson_to_json(v: &Bson) -> Value {
    match v {
        Bson::Double(f) => Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Bson::String(s) => Value::String(s.clone()),
        Bson::Array(a) => Value::Array(a.iter().map(bson_to_json).collect()),
        Bson::Document(d) => document_to_json(d),
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Int32(i) => Value::from(*i),
        Bson::Int64(i) => Value::from(*i),
        Bson::ObjectId(oid) => Value::String(oid.to_hex()),
        Bson::DateTime(d) => d
            .try_to_rfc3339_string()
            .map(Value::String)
            .unwrap_or_else(|_| Value::from(d.timestamp_millis())),
        Bson::Decimal128(d) => Value::String(d.to_string()),
        Bson::Binary(b) => Value::String(b.bytes.iter().map(|x| format!("{x:02x}")).collect()),
        Bson::Timestamp(ts) => serde_json::json!({"t": ts.time, "i": ts.increment}),
        Bson::RegularExpression(r) => Value::String(format!("/{}/{}", r.pattern, r.options)),
        Bson::JavaScriptCode(c) => Value::String(c.clone()),
        Bson::JavaScriptCodeWithScope(c) => Value::String(c.code.clone()),
        Bson::Symbol(s) => Value::String(s.clone()),
        Bson::MaxKey => Value::String("MaxKey".into()),
        Bson::MinKey => Value::String("MinKey".into()),
        Bson::DbPointer(_) => Value::Null,
    }
}

/// A lookup value as a filter condition: 24-hex-digit strings match an ObjectId or the
/// string itself.
pub fn filter_value(v: &Value) -> Bson {
    match v {
        Value::String(s) if s.len() == 24 => match ObjectId::parse_str(s) {
            Ok(oid) => Bson::Document(doc! {"$in": [Bson::ObjectId(oid), Bson::String(s.clone())]}),
            Err(_) => Bson::String(s.clone()),
        },
        other => json_to_bson(other),
    }
}

pub fn json_to_bson(v: &Value) -> Bson {
    match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Bson::Int64(i),
            None => Bson::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(a) => Bson::Array(a.iter().map(json_to_bson).collect()),
        Value::Object(o) => Bson::Document(
            o.iter()
                .map(|(k, v)| (k.clone(), json_to_bson(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{DateTime, Timestamp};
    use serde_json::json;

    fn ev(op: &str, extra: Document) -> Document {
        let mut d = doc! {
            "_id": {"_data": "8264A1"},
            "operationType": op,
            "ns": {"db": "mercury", "coll": "orders"},
            "clusterTime": Timestamp { time: 1_764_064_800, increment: 1 },
            "wallTime": DateTime::from_millis(1_764_064_800_123),
        };
        d.extend(extra);
        d
    }

    fn change(d: Decoded) -> Change {
        match d {
            Decoded::Change(c) => *c,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn insert_with_object_ids() {
        let oid = ObjectId::parse_str("67a9f47786c624adede70001").unwrap();
        let biz = ObjectId::parse_str("67a9f47786c624adede70002").unwrap();
        let c = change(
            decode(&ev(
                "insert",
                doc! {"documentKey": {"_id": oid}, "fullDocument": {"_id": oid, "creator_id": biz, "quantity": 3_i32}},
            ))
            .unwrap(),
        );
        assert_eq!(c.op, Op::Insert);
        assert_eq!(c.collection, "orders");
        assert_eq!(c.key, "67a9f47786c624adede70001");
        assert_eq!(
            c.after.as_ref().unwrap()["creator_id"],
            "67a9f47786c624adede70002"
        );
        assert_eq!(c.after.as_ref().unwrap()["quantity"], 3);
        assert_eq!(c.at.as_deref(), Some("2025-11-25T10:00:00.123Z"));
        assert_eq!(c.position.0, token_bytes(&ev("insert", doc! {})).unwrap());
    }

    #[test]
    fn the_cluster_time_is_where_lookups_read() {
        let c = change(decode(&ev("insert", doc! {"documentKey": {"_id": "o1"}})).unwrap());
        assert_eq!(
            c.as_of,
            Some(AsOf::ClusterTime {
                time: 1_764_064_800,
                increment: 1
            })
        );
        let mut no_time = ev("insert", doc! {"documentKey": {"_id": "o1"}});
        no_time.remove("clusterTime");
        assert_eq!(change(decode(&no_time).unwrap()).as_of, None);
    }

    #[test]
    fn update_with_description_and_images() {
        let c = change(
            decode(&ev(
                "update",
                doc! {
                    "documentKey": {"_id": "o1"},
                    "updateDescription": {"updatedFields": {"status": "paid", "meta.a": 1}, "removedFields": ["note"], "truncatedArrays": []},
                    "fullDocument": {"_id": "o1", "status": "paid"},
                    "fullDocumentBeforeChange": {"_id": "o1", "status": "new", "note": "x"},
                },
            ))
            .unwrap(),
        );
        assert_eq!(
            c.updated_fields,
            Some(vec!["meta".into(), "note".into(), "status".into()])
        );
        assert_eq!(c.before.unwrap()["status"], "new");
        assert_eq!(c.after.unwrap()["status"], "paid");
    }

    #[test]
    fn replace_and_delete_with_and_without_pre_image() {
        let r = change(
            decode(&ev(
                "replace",
                doc! {"documentKey": {"_id": 7_i64}, "fullDocument": {"_id": 7_i64, "x": 1}},
            ))
            .unwrap(),
        );
        assert_eq!((r.op, r.key.as_str()), (Op::Replace, "7"));
        let d = change(
            decode(&ev(
                "delete",
                doc! {"documentKey": {"_id": "o19"}, "fullDocumentBeforeChange": {"_id": "o19", "creator_id": "b1"}},
            ))
            .unwrap(),
        );
        assert_eq!(d.doc(), Some(&json!({"_id": "o19", "creator_id": "b1"})));
        let bare = change(
            decode(&ev(
                "delete",
                doc! {"documentKey": {"_id": "o20"}, "fullDocumentBeforeChange": Bson::Null},
            ))
            .unwrap(),
        );
        assert_eq!(bare.doc(), None);
    }

    #[test]
    fn drop_rename_drop_database_and_invalidate() {
        assert_eq!(
            decode(&ev("drop", doc! {})).unwrap(),
            Decoded::Dropped {
                op: "drop".into(),
                collection: "orders".into()
            }
        );
        assert!(matches!(
            decode(&ev("rename", doc! {"to": {"db": "mercury", "coll": "o2"}})).unwrap(),
            Decoded::Dropped { .. }
        ));
        let mut dd = ev("dropDatabase", doc! {});
        dd.insert("ns", doc! {"db": "mercury"});
        assert!(matches!(decode(&dd).unwrap(), Decoded::Dropped { .. }));
        let mut inv = ev("invalidate", doc! {});
        inv.remove("ns");
        assert_eq!(decode(&inv).unwrap(), Decoded::Invalidate);
        assert_eq!(
            decode(&ev("createIndexes", doc! {})).unwrap(),
            Decoded::Other("createIndexes".into())
        );
    }

    #[test]
    fn malformed_events_are_errors() {
        let mut no_token = ev("insert", doc! {"documentKey": {"_id": 1}});
        no_token.remove("_id");
        assert!(decode(&no_token).is_err());
        assert!(decode(&ev("insert", doc! {})).is_err(), "no documentKey");
        assert!(
            decode(&ev(
                "insert",
                doc! {"documentKey": {"_id": 1}, "fullDocument": 5}
            ))
            .is_err()
        );
        assert!(
            decode(&ev("update", doc! {"documentKey": {"_id": 1}})).is_err(),
            "no updateDescription"
        );
        let mut no_op = ev("insert", doc! {"documentKey": {"_id": 1}});
        no_op.remove("operationType");
        assert!(decode(&no_op).is_err());
    }

    #[test]
    fn lookup_values_match_object_ids_or_strings() {
        let hex = "67a9f47786c624adede70002";
        let v = filter_value(&json!(hex));
        let oid = ObjectId::parse_str(hex).unwrap();
        assert_eq!(v, Bson::Document(doc! {"$in": [oid, hex]}));
        assert_eq!(filter_value(&json!("b1")), Bson::String("b1".into()));
        assert_eq!(filter_value(&json!(5)), Bson::Int64(5));
        assert_eq!(
            bson_to_json(&Bson::Decimal128("1.5".parse().unwrap())),
            json!("1.5")
        );
    }
}
