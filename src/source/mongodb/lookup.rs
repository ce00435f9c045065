//! Lookups for the rules through the driver's `find`.
//!
//! In: a [`Query`] (equality on dotted paths). Out: matching documents as JSON. Results
//! are cached by the router and invalidated from the same change stream.

use futures_util::future::BoxFuture;
use mongodb::Database;
use mongodb::bson::Document;

use super::decode::{document_to_json, filter_value};
use crate::source::{Lookup, LookupError, Query};

/// `find` on the watched database.
#[derive(Clone)]
pub struct MongoLookup {
    db: Database,
}

impl MongoLookup {
    pub fn new(db: Database) -> Self {
        MongoLookup { db }
    }
}

/// The filter document of a query.
pub fn filter_of(query: &Query) -> Document {
    query
        .filter
        .iter()
        .map(|(path, value)| (path.to_string(), filter_value(value)))
        .collect()
}

impl Lookup for MongoLookup {
    fn find(&self, query: Query) -> BoxFuture<'_, Result<Vec<serde_json::Value>, LookupError>> {
        Box::pin(async move {
            let fail = |e: mongodb::error::Error| LookupError::Failed {
                collection: query.collection.clone(),
                message: e.to_string(),
            };
            let coll = self.db.collection::<Document>(&query.collection);
            let mut find = coll.find(filter_of(&query));
            if let Some(limit) = query.limit {
                find = find.limit(limit as i64);
            }
            let mut cursor = find.await.map_err(fail)?;
            let mut out = Vec::new();
            while cursor.advance().await.map_err(fail)? {
                let doc = cursor.deserialize_current().map_err(fail)?;
                out.push(document_to_json(&doc));
            }
            Ok(out)
        })
    }
}
