//! The lookup cache: one query per owner, not one per change.
//!
//! In: lookups the rules make ([`CachedLookup::find`]) and every change the source reads
//! ([`CachedLookup::invalidate`], called by the router before it routes the change). Out:
//! lookup answers, from the cache when nothing that could change them has happened.
//!
//! An answer to "documents of C where f1 = v1 and …" can change only through a change to
//! a document of C that matches the query before or after the change, or that the answer
//! returned. So each answer is indexed by its first condition (`f1 = v1`) and by the `_id`s
//! it returned; a change to C drops the answers whose first condition its pre- or
//! post-image satisfies, and those that returned its key. Nothing else is dropped, so a
//! burst of order changes for one business costs one lookup of that business.
//!
//! A miss reads as of the change being routed (`Query::as_of`, not part of the key): the
//! answer is exact at that change, and stays exact until a later change of the stream drops
//! it here, because changes are routed, and invalidate, strictly in order.
//!
//! The cache is bounded: past `capacity` answers it starts over (and counts that).
//! The lock is never held across an await.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::spec::pick_ids;
use crate::change::{Change, Recipients};
use crate::path::{FieldPath, scalar_to_string};
use crate::source::{Lookup, LookupError, Query};

/// Canonical text of a query's filter and limit.
type QueryKey = String;

struct CollectionCache {
    hits: metrics::Counter,
    misses: metrics::Counter,
    answers: HashMap<QueryKey, Answer>,
    /// (first filter field, canonical value) → answers with that first condition.
    by_condition: HashMap<(FieldPath, String), HashSet<QueryKey>>,
    /// The first-condition fields in use, to read from a changed document.
    fields: HashSet<FieldPath>,
    /// `_id` of a returned document → answers that returned it.
    by_id: HashMap<String, HashSet<QueryKey>>,
}

impl CollectionCache {
    fn clear(&mut self) {
        self.answers.clear();
        self.by_condition.clear();
        self.fields.clear();
        self.by_id.clear();
    }

    fn new(collection: &str) -> Self {
        CollectionCache {
            hits: metrics::counter!("changecast_lookups_total",
                "collection" => collection.to_owned(), "result" => "hit"),
            misses: metrics::counter!("changecast_lookups_total",
                "collection" => collection.to_owned(), "result" => "miss"),
            answers: HashMap::new(),
            by_condition: HashMap::new(),
            fields: HashSet::new(),
            by_id: HashMap::new(),
        }
    }
}

/// A cached answer, with the user ids rules picked from it, so that routing a change to
/// the hundreds of users an answer names copies nothing but one pointer.
struct Answer {
    docs: Arc<Vec<Value>>,
    picks: Vec<(FieldPath, Recipients)>,
}

impl Answer {
    fn ids(&mut self, pick: &FieldPath) -> Recipients {
        if let Some((_, ids)) = self.picks.iter().find(|(p, _)| p == pick) {
            return Arc::clone(ids);
        }
        let ids = pick_ids(&self.docs, pick);
        self.picks.push((pick.clone(), Arc::clone(&ids)));
        ids
    }
}

#[derive(Default)]
struct Inner {
    collections: HashMap<String, CollectionCache>,
    len: usize,
}

/// The source's lookups behind a cache.
pub struct CachedLookup {
    lookup: Arc<dyn Lookup>,
    capacity: usize,
    inner: Mutex<Inner>,
}

fn canonical(v: &Value) -> String {
    v.to_string()
}

fn query_key(q: &Query) -> QueryKey {
    use std::fmt::Write;
    let mut k = String::with_capacity(64);
    for (f, v) in &q.filter {
        // Writing into one buffer: no string per part.
        let _ = write!(k, "{f}={v}\u{1f}");
    }
    if let Some(l) = q.limit {
        let _ = write!(k, "limit={l}");
    }
    k
}

impl CachedLookup {
    /// `capacity` 0 turns caching off.
    pub fn new(lookup: Arc<dyn Lookup>, capacity: usize) -> Self {
        CachedLookup {
            lookup,
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers `query`, from the cache when possible.
    pub async fn find(&self, query: Query) -> Result<Arc<Vec<Value>>, LookupError> {
        let key = query_key(&query);
        if let Some(docs) = self.hit(&query.collection, &key, |a| Arc::clone(&a.docs)) {
            return Ok(docs);
        }
        self.miss(query, key).await
    }

    /// The distinct user ids at `pick` in the answer to `query`, sorted; from the cache
    /// when possible, where they are kept with the answer.
    pub async fn find_ids(
        &self,
        query: Query,
        pick: &FieldPath,
    ) -> Result<Recipients, LookupError> {
        let key = query_key(&query);
        if let Some(ids) = self.hit(&query.collection, &key, |a| a.ids(pick)) {
            return Ok(ids);
        }
        let collection = query.collection.clone();
        let docs = self.miss(query, key.clone()).await?;
        // Picked once, and kept with the answer just stored (unless caching is off).
        let mut inner = self.lock();
        match inner
            .collections
            .get_mut(&collection)
            .and_then(|c| c.answers.get_mut(&key))
        {
            Some(answer) if Arc::ptr_eq(&answer.docs, &docs) => Ok(answer.ids(pick)),
            _ => Ok(pick_ids(&docs, pick)),
        }
    }

    /// Answers `query` without changing the cache or its counters (explain's dry run):
    /// the cached answer when there is one (`true`), else the source's, not stored.
    pub async fn find_uncounted(
        &self,
        query: Query,
    ) -> Result<(Arc<Vec<Value>>, bool), LookupError> {
        let key = query_key(&query);
        let cached = self
            .lock()
            .collections
            .get(&query.collection)
            .and_then(|c| c.answers.get(&key))
            .map(|a| Arc::clone(&a.docs));
        match cached {
            Some(docs) => Ok((docs, true)),
            None => Ok((Arc::new(self.lookup.find(query).await?), false)),
        }
    }

    /// `read` of the cached answer to `key`, counting the hit or the miss.
    fn hit<T>(
        &self,
        collection: &str,
        key: &str,
        read: impl FnOnce(&mut Answer) -> T,
    ) -> Option<T> {
        let mut inner = self.lock();
        let c = match inner.collections.get_mut(collection) {
            Some(c) => c,
            None => inner
                .collections
                .entry(collection.to_owned())
                .or_insert_with(|| CollectionCache::new(collection)),
        };
        match c.answers.get_mut(key) {
            Some(answer) => {
                c.hits.increment(1);
                Some(read(answer))
            }
            None => {
                c.misses.increment(1);
                None
            }
        }
    }

    /// Asks the source, and keeps the answer.
    async fn miss(&self, query: Query, key: QueryKey) -> Result<Arc<Vec<Value>>, LookupError> {
        let collection = query.collection.clone();
        let first = query.filter.first().cloned();
        let answer = Arc::new(self.lookup.find(query).await?);
        if self.capacity > 0 {
            self.store(collection, key, first, &answer);
        }
        Ok(answer)
    }

    fn store(
        &self,
        collection: String,
        key: QueryKey,
        first: Option<(FieldPath, Value)>,
        answer: &Arc<Vec<Value>>,
    ) {
        let mut inner = self.lock();
        if inner.len >= self.capacity {
            inner
                .collections
                .values_mut()
                .for_each(CollectionCache::clear);
            inner.len = 0;
            metrics::counter!("changecast_lookup_cache_resets_total").increment(1);
        }
        let c = inner
            .collections
            .entry(collection)
            .or_insert_with_key(|k| CollectionCache::new(k));
        if c.answers.contains_key(&key) {
            return; // a concurrent miss stored it first
        }
        c.answers.insert(
            key.clone(),
            Answer {
                docs: Arc::clone(answer),
                picks: Vec::new(),
            },
        );
        if let Some((field, value)) = first {
            c.fields.insert(field.clone());
            c.by_condition
                .entry((field, canonical(&value)))
                .or_default()
                .insert(key.clone());
        }
        for doc in answer.iter() {
            if let Some(id) = doc.get("_id").and_then(scalar_to_string) {
                c.by_id.entry(id).or_default().insert(key.clone());
            }
        }
        inner.len += 1;
    }

    /// Drops every answer `change` could have changed.
    pub fn invalidate(&self, change: &Change) {
        if self.capacity == 0 {
            return;
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(c) = inner.collections.get_mut(&change.collection) else {
            return;
        };
        let mut stale: HashSet<QueryKey> = c.by_id.remove(&change.key).unwrap_or_default();
        let fields: Vec<FieldPath> = c.fields.iter().cloned().collect();
        for doc in [change.before.as_ref(), change.after.as_ref()]
            .into_iter()
            .flatten()
        {
            for f in &fields {
                if let Some(v) = f.get(doc)
                    && let Some(keys) = c.by_condition.remove(&(f.clone(), canonical(v)))
                {
                    stale.extend(keys);
                }
            }
        }
        let removed = stale
            .iter()
            .filter(|k| c.answers.remove(*k).is_some())
            .count();
        inner.len -= removed;
        if removed > 0 {
            metrics::counter!("changecast_lookup_invalidations_total").increment(removed as u64);
        }
    }

    /// Answers currently cached.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Op, Position};
    use futures_util::future::BoxFuture;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the queries that reach the source.
    struct Counting(AtomicUsize, Mutex<Vec<Value>>);
    impl Lookup for Counting {
        fn find(&self, q: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let docs = self.1.lock().unwrap().clone();
            Box::pin(async move {
                Ok(docs
                    .into_iter()
                    .filter(|d| q.filter.iter().all(|(p, v)| p.get(d) == Some(v)))
                    .collect())
            })
        }
    }

    fn q(field: &str, v: Value) -> Query {
        Query {
            collection: "businesses".into(),
            filter: vec![(FieldPath::parse(field).unwrap(), v)],
            limit: Some(1),
            as_of: None,
        }
    }

    fn change(key: &str, before: Option<Value>, after: Option<Value>) -> Change {
        Change {
            op: Op::Update,
            collection: "businesses".into(),
            key: key.into(),
            after,
            before,
            updated_fields: None,
            position: Position::from_seq(1),
            at: None,
            as_of: None,
        }
    }

    fn setup() -> (Arc<Counting>, CachedLookup) {
        let source = Arc::new(Counting(
            AtomicUsize::new(0),
            Mutex::new(vec![
                json!({"_id": "b1", "owner": {"_id": "u1"}}),
                json!({"_id": "b2", "owner": {"_id": "u2"}}),
            ]),
        ));
        let cache = CachedLookup::new(source.clone(), 100);
        (source, cache)
    }

    fn ids(list: &Recipients) -> Vec<&str> {
        list.iter().map(|u| &**u).collect()
    }

    #[tokio::test]
    async fn picked_ids_are_kept_with_the_answer_and_dropped_with_it() {
        let (source, cache) = setup();
        source
            .1
            .lock()
            .unwrap()
            .push(json!({"_id": "b3", "owner": {"_id": "u1"}, "tag": "x"}));
        source.1.lock().unwrap()[0]["tag"] = json!("x");
        let by_tag = || Query {
            collection: "businesses".into(),
            filter: vec![(FieldPath::parse("tag").unwrap(), json!("x"))],
            limit: None,
            as_of: None,
        };
        let owner = FieldPath::parse("owner._id").unwrap();
        let first = cache.find_ids(by_tag(), &owner).await.unwrap();
        assert_eq!(ids(&first), ["u1"], "distinct: two businesses, one owner");
        let again = cache.find_ids(by_tag(), &owner).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the same list, not a copy");
        assert_eq!(source.0.load(Ordering::SeqCst), 1);

        // b2 joins the tag with another owner: the answer and its picked ids are dropped.
        let b2 = json!({"_id": "b2", "owner": {"_id": "u2"}});
        let mut tagged = b2.clone();
        tagged["tag"] = json!("x");
        source.1.lock().unwrap()[1] = tagged.clone();
        cache.invalidate(&change("b2", Some(b2), Some(tagged)));
        let after = cache.find_ids(by_tag(), &owner).await.unwrap();
        assert_eq!(ids(&after), ["u1", "u2"]);
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn repeated_lookups_hit_the_cache() {
        let (source, cache) = setup();
        for _ in 0..1000 {
            let a = cache.find(q("_id", json!("b1"))).await.unwrap();
            assert_eq!(a[0]["owner"]["_id"], "u1");
        }
        assert_eq!(source.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_change_to_the_looked_up_document_invalidates_only_its_answers() {
        let (source, cache) = setup();
        cache.find(q("_id", json!("b1"))).await.unwrap();
        cache.find(q("_id", json!("b2"))).await.unwrap();
        // An unrelated change.
        cache.invalidate(&change(
            "b9",
            Some(json!({"_id": "b9"})),
            Some(json!({"_id": "b9", "x": 1})),
        ));
        assert_eq!(cache.len(), 2);
        // b1 changes owner.
        *source.1.lock().unwrap() = vec![json!({"_id": "b1", "owner": {"_id": "u7"}})];
        cache.invalidate(&change(
            "b1",
            Some(json!({"_id": "b1", "owner": {"_id": "u1"}})),
            Some(json!({"_id": "b1", "owner": {"_id": "u7"}})),
        ));
        assert_eq!(cache.len(), 1, "b2's answer stays");
        let a = cache.find(q("_id", json!("b1"))).await.unwrap();
        assert_eq!(a[0]["owner"]["_id"], "u7");
        assert_eq!(source.0.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_new_matching_document_invalidates_the_answer_it_would_join() {
        let (_, cache) = setup();
        let by_owner = || q("owner._id", json!("u1"));
        assert_eq!(cache.find(by_owner()).await.unwrap().len(), 1);
        // Inserted (no pre-image): matches the cached condition by its post-image.
        cache.invalidate(&change(
            "b3",
            None,
            Some(json!({"_id": "b3", "owner": {"_id": "u1"}})),
        ));
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn without_images_the_key_still_invalidates() {
        let (_, cache) = setup();
        cache.find(q("_id", json!("b1"))).await.unwrap();
        cache.invalidate(&change("b1", None, None));
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn capacity_bounds_the_cache_and_zero_disables_it() {
        let (source, _) = setup();
        let queries = || source.0.load(Ordering::SeqCst);
        let small = CachedLookup::new(source.clone(), 2);
        let find = async |id: &str| small.find(q("_id", json!(id))).await.unwrap();
        // Up to the bound, answers are kept: asking again reaches nothing.
        find("b1").await;
        find("b2").await;
        assert_eq!((queries(), small.len()), (2, 2));
        find("b1").await;
        find("b2").await;
        assert_eq!(queries(), 2, "hits below the bound");
        // A third answer at the bound starts over: only it is kept.
        find("b3").await;
        assert_eq!((queries(), small.len()), (3, 1), "reset at the bound");
        find("b3").await;
        assert_eq!(queries(), 3, "the new answer is kept");
        find("b1").await;
        assert_eq!(
            (queries(), small.len()),
            (4, 2),
            "b1 was dropped by the reset"
        );
        let off = CachedLookup::new(source.clone(), 0);
        let before = source.0.load(Ordering::SeqCst);
        off.find(q("_id", json!("b1"))).await.unwrap();
        off.find(q("_id", json!("b1"))).await.unwrap();
        assert_eq!(source.0.load(Ordering::SeqCst), before + 2);
    }
}
