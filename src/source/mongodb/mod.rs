//! The MongoDB source: one change stream per changecast process.
//!
//! In: the change stream of one database (`Database::watch`), with the `$match`/`$project`
//! pipeline generated from the rules ([`pipeline`]). Out: one [`Batch`] per event, and
//! lookups through `find` ([`lookup`]).
//!
//! - Resume tokens are checkpointed (as BSON bytes, in a collection of the watched
//!   database or a file) once the router has handed the events they cover to the hub;
//!   while the database is quiet the post-batch token is checkpointed too, so it never ages
//!   out of the oplog. A restart resumes right after the last handed-over event.
//! - Events are read as raw documents and decoded here: a malformed one is counted and
//!   skipped, never a stream error, and no token is persisted past an event not yet handed
//!   over.
//! - Failures: the driver resumes once by itself after network errors; when that fails
//!   too, the stream is reopened from the last token with capped exponential backoff and
//!   jitter. History lost (286, 136, 260) → a new stream from now and a `gap` to clients,
//!   never a retry of the dead token. `invalidate` (after drop/rename/dropDatabase) →
//!   reopened with `startAfter`. Not a replica set (40573) → a startup error that says how to
//!   start one.
//! - Events over 16 MB: the pipeline ends with `$changeStreamSplitLargeEvent`, and the
//!   fragments are reassembled ([`split`]); the checkpointed token is the last fragment's.
//!   A server that does not know the stage (before 6.0.9 / 7.0) refuses the `aggregate`,
//!   and the stream is opened without it. There an oversized event fails the read with
//!   10334 (`BSONObjectTooLarge`): the same stream is read once more, projected to what
//!   identifies the event, to learn its token; the event is skipped (counted, logged) and
//!   every client is told `gap` — never a retry of the same read.

pub mod decode;
pub mod lookup;
pub mod pipeline;
pub mod preflight;
pub mod split;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::future::BoxFuture;
use mongodb::bson::{Document, doc};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::ErrorKind;
use mongodb::{Client, Collection, Database};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Batch, ChangeCounters, Component, Health, Source, SourceError};
use crate::change::{Op, Position};
use crate::config::{CheckpointStore, Images, MongoSourceConfig};
use decode::{Decoded, decode, token_bytes};
pub use lookup::MongoLookup;
use pipeline::{SPLIT_STAGE, StreamSpec};
use split::{Fragments, Piece};

/// Checkpoints are written at most this often (and on shutdown).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long a read may take beyond `max_await_time` before the connection is presumed
/// dead and the stream reopened.
const READ_GRACE: Duration = Duration::from_secs(10);

/// How the stream starts.
#[derive(Debug, Clone)]
enum Start {
    /// From now.
    Now,
    /// Right after this event (`resumeAfter`).
    After(ResumeToken),
    /// Right after this invalidate event (`startAfter`).
    AfterInvalidate(ResumeToken),
}

/// What an error means for the stream.
#[derive(Debug, PartialEq)]
enum Failure {
    /// Stop: configuration or deployment problem that retrying cannot fix.
    Fatal(String),
    /// The resume point rolled off the oplog: start from now and report a gap.
    HistoryLost,
    /// Network and other passing errors: reopen from the last token after a backoff.
    Transient,
    /// The next event is over 16 MB and the server cannot send it (10334): pass it.
    TooLarge,
}

fn code(e: &mongodb::error::Error) -> Option<i32> {
    match &*e.kind {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

fn classify(e: &mongodb::error::Error, uri: &str) -> Failure {
    match code(e) {
        Some(40573) => Failure::Fatal(format!(
            "{uri} is not a replica set, and change streams need one. Start mongod with \
             --replSet rs0 and run rs.initiate() once in mongosh (see the README's MongoDB section)"
        )),
        Some(286 | 136 | 260) => Failure::HistoryLost,
        Some(10334) => Failure::TooLarge,
        Some(c @ (13 | 18 | 8000)) => Failure::Fatal(format!(
            "not authorised to watch the database (code {c}): {e}"
        )),
        Some(280) => Failure::Fatal(format!(
            "the server refuses to resume this change stream: {e}"
        )),
        _ => match &*e.kind {
            ErrorKind::InvalidArgument { .. } | ErrorKind::Authentication { .. } => {
                Failure::Fatal(e.to_string())
            }
            _ => Failure::Transient,
        },
    }
}

/// Whether an `aggregate` failed because the server does not know
/// `$changeStreamSplitLargeEvent` (40324: unrecognized pipeline stage).
fn split_unsupported(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Command(c) => {
            c.code == 40324 || (c.code != 280 && c.message.contains(SPLIT_STAGE))
        }
        _ => false,
    }
}

/// Where resume tokens are kept.
enum TokenStore {
    Collection {
        coll: Collection<Document>,
        id: String,
    },
    File(PathBuf),
}

impl TokenStore {
    async fn load(&self) -> Result<Option<Vec<u8>>, String> {
        match self {
            TokenStore::Collection { coll, id } => {
                let found = coll
                    .find_one(doc! {"_id": id})
                    .await
                    .map_err(|e| e.to_string())?;
                match found.and_then(|d| d.get_document("token").ok().cloned()) {
                    Some(token) => {
                        let mut bytes = Vec::new();
                        token.to_writer(&mut bytes).map_err(|e| e.to_string())?;
                        Ok(Some(bytes))
                    }
                    None => Ok(None),
                }
            }
            TokenStore::File(path) => match tokio::fs::read(path).await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", path.display())),
            },
        }
    }

    async fn save(&self, bytes: &[u8]) -> Result<(), String> {
        match self {
            TokenStore::Collection { coll, id } => {
                let token = Document::from_reader(bytes).map_err(|e| e.to_string())?;
                coll.update_one(
                    doc! {"_id": id},
                    doc! {"$set": {"token": token, "updated_at": mongodb::bson::DateTime::now()}},
                )
                .upsert(true)
                .await
                .map_err(|e| e.to_string())?;
                Ok(())
            }
            TokenStore::File(path) => {
                // Write then rename: a crash leaves the old token or the new one, never half.
                let tmp = path.with_extension("tmp");
                tokio::fs::write(&tmp, bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::fs::rename(&tmp, path)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// A token from checkpointed bytes.
fn token_from(bytes: &[u8]) -> Result<ResumeToken, String> {
    mongodb::bson::from_slice::<ResumeToken>(bytes)
        .map_err(|e| format!("unreadable resume token: {e}"))
}

fn bytes_of(token: &ResumeToken) -> Option<Vec<u8>> {
    mongodb::bson::to_vec(token).ok()
}

/// The MongoDB change feed. [`MongoSource::connect`] prepares it; [`Source::run`] runs it.
pub struct MongoSource {
    db: Database,
    config: MongoSourceConfig,
    spec: StreamSpec,
    store: TokenStore,
    start: Start,
    /// The stream opened by `connect` (so a misconfigured deployment fails the start).
    /// In a mutex only so that `&self` may cross awaits (a change stream is not `Sync`).
    first: std::sync::Mutex<Option<ChangeStream<Document>>>,
    /// The last checkpointed token.
    checkpointed: Option<Vec<u8>>,
    /// Whether the pipeline ends with `$changeStreamSplitLargeEvent`: until the server
    /// refuses the stage.
    split: AtomicBool,
}

impl MongoSource {
    /// Connects, enables pre- and post-images when told to, reads the checkpoint and opens
    /// the stream. Fails on what retrying cannot fix (not a replica set, bad URI, no
    /// permission); a deployment that is merely unreachable is retried by `run`.
    /// `resume_from` (the durable history's checkpoint, committed with the events it
    /// covers) wins over the source's own checkpoint when given.
    pub async fn connect(
        config: &MongoSourceConfig,
        spec: StreamSpec,
        resume_from: Option<Vec<u8>>,
    ) -> Result<MongoSource, SourceError> {
        let client = Client::with_uri_str(&config.uri)
            .await
            .map_err(|e| SourceError::Mongo(format!("bad uri: {e}")))?;
        let db = client.database(&config.database);
        let store = match config.checkpoint {
            CheckpointStore::Mongodb => TokenStore::Collection {
                coll: db.collection(&config.checkpoint_collection),
                id: config.stream_name.clone(),
            },
            CheckpointStore::File => TokenStore::File(config.checkpoint_file.clone()),
        };
        let mut source = MongoSource {
            db,
            config: config.clone(),
            spec,
            store,
            start: Start::Now,
            first: std::sync::Mutex::new(None),
            checkpointed: None,
            split: AtomicBool::new(true),
        };
        let saved = match resume_from {
            Some(bytes) => Ok(Some(bytes)),
            None => source.store.load().await,
        };
        match saved {
            Ok(Some(bytes)) => match token_from(&bytes) {
                Ok(token) => {
                    tracing::info!("mongodb: resuming after the checkpointed token");
                    source.start = Start::After(token);
                    source.checkpointed = Some(bytes);
                }
                Err(e) => tracing::warn!("mongodb: {e}; starting from now"),
            },
            Ok(None) => tracing::info!("mongodb: no checkpoint yet; starting from now"),
            Err(e) => tracing::warn!("mongodb: cannot read the checkpoint ({e}); will retry"),
        }
        if config.pre_and_post_images == Images::Ensure {
            source.ensure_images().await?;
        }
        match source.open(&source.start.clone()).await {
            Ok(stream) => source.first = std::sync::Mutex::new(Some(stream)),
            Err(e) => match classify(&e, &config.uri) {
                Failure::Fatal(msg) => return Err(SourceError::Mongo(msg)),
                Failure::HistoryLost => {
                    tracing::warn!(
                        "mongodb: the checkpoint is older than the oplog; starting from now"
                    );
                    source.start = Start::Now;
                }
                // `run` opens it again and passes the oversized event there.
                Failure::Transient | Failure::TooLarge => {
                    tracing::warn!(error = %e, "mongodb: cannot open the change stream yet; retrying")
                }
            },
        }
        Ok(source)
    }

    /// Lookups on the same database.
    pub fn lookup(&self) -> MongoLookup {
        MongoLookup::new(self.db.clone())
    }

    /// `collMod … changeStreamPreAndPostImages` on every watched collection, as the seed
    /// did by hand in mongosh.
    async fn ensure_images(&self) -> Result<(), SourceError> {
        for coll in self.spec.watched.keys() {
            let cmd = doc! {"collMod": coll, "changeStreamPreAndPostImages": {"enabled": true}};
            match self.db.run_command(cmd).await {
                Ok(_) => {
                    tracing::info!(collection = %coll, "mongodb: pre- and post-images enabled")
                }
                Err(e) if code(&e) == Some(26) => tracing::warn!(
                    collection = %coll,
                    "mongodb: collection does not exist yet; its images will be enabled on the next start"
                ),
                Err(e) => match classify(&e, &self.config.uri) {
                    Failure::Fatal(msg) => return Err(SourceError::Mongo(msg)),
                    _ => {
                        tracing::warn!(collection = %coll, error = %e, "mongodb: could not enable pre- and post-images")
                    }
                },
            }
        }
        Ok(())
    }

    /// Opens the stream from `start`; with `$changeStreamSplitLargeEvent` unless the server
    /// refused it once (then without, from then on).
    async fn open(&self, start: &Start) -> mongodb::error::Result<ChangeStream<Document>> {
        if self.split.load(Ordering::Relaxed) {
            match self.open_with(start, self.spec.pipeline(), true).await {
                Err(e) if split_unsupported(&e) => {
                    tracing::warn!(
                        error = %e,
                        "mongodb: the server does not know {SPLIT_STAGE} (MongoDB before 6.0.9 / \
                         7.0); an event over 16 MB will be skipped and clients told `gap`"
                    );
                    self.split.store(false, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        self.open_with(start, self.spec.pipeline_without_split(), true)
            .await
    }

    /// Opens a stream with `pipeline`; `images` asks for the pre- and post-images.
    async fn open_with(
        &self,
        start: &Start,
        pipeline: Vec<Document>,
        images: bool,
    ) -> mongodb::error::Result<ChangeStream<Document>> {
        let mut watch = self
            .db
            .watch()
            .pipeline(pipeline)
            .max_await_time(self.config.max_await_time);
        if images {
            watch = watch
                .full_document(self.spec.full_document())
                .full_document_before_change(self.spec.full_document_before_change());
        }
        watch = match start {
            Start::Now => watch,
            Start::After(t) => watch.resume_after(t.clone()),
            Start::AfterInvalidate(t) => watch.start_after(t.clone()),
        };
        Ok(watch.await?.with_type::<Document>())
    }

    /// The event after `start` that the server cannot send whole (10334), as a small
    /// document that identifies it: the same `$match` (so the same next event) without the
    /// images. `None` when nothing arrived within `limit`.
    async fn identify_too_large(
        &self,
        start: &Start,
        limit: Duration,
    ) -> mongodb::error::Result<Option<Document>> {
        let split = self.split.load(Ordering::Relaxed);
        let pipeline = self.spec.identify_pipeline(split);
        let mut s = self.open_with(start, pipeline, false).await?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, s.next_if_any()).await {
                Ok(Ok(Some(event))) => return Ok(Some(event)),
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(None),
            }
        }
    }

    async fn tail(
        mut self,
        out: mpsc::Sender<Batch>,
        mut acks: watch::Receiver<Option<Position>>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut start = self.start.clone();
        let mut stream = self.first.lock().ok().and_then(|mut f| f.take());
        let mut lost_history = false;
        let mut delays = backoff();
        let mut counters = ChangeCounters::default();
        let mut last_checkpoint = Instant::now();
        let read_limit = self.config.max_await_time + READ_GRACE;
        // The token of the last batch sent, so quiet post-batch tokens are sent once.
        let mut last_sent: Option<Vec<u8>> = self.checkpointed.clone();

        'streams: while !shutdown.is_cancelled() {
            // A new stream from `start` sends a split event's fragments from the first.
            let mut fragments = Fragments::default();
            let mut s = match stream.take() {
                Some(s) => s,
                None => match self.open(&start).await {
                    Ok(s) => {
                        metrics::counter!("changecast_source_resumes_total").increment(1);
                        s
                    }
                    Err(e) => match classify(&e, &self.config.uri) {
                        Failure::Fatal(msg) => return Err(fatal(&health, msg)),
                        Failure::HistoryLost => {
                            self.history_lost(&mut start, &mut lost_history);
                            continue;
                        }
                        Failure::TooLarge => {
                            // The resumed stream's first batch held the oversized event.
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'streams,
                                r = self.pass_too_large(&mut start, &mut last_sent, &out, &health, read_limit) => r?,
                            }
                            if health.is_down(Component::Source) {
                                let wait = delays.next().unwrap_or(Duration::from_secs(30));
                                tokio::select! {
                                    _ = shutdown.cancelled() => break 'streams,
                                    _ = tokio::time::sleep(wait) => {}
                                }
                            }
                            continue;
                        }
                        Failure::Transient => {
                            health.down(
                                Component::Source,
                                format!("mongodb: cannot open the change stream: {e}"),
                            );
                            tracing::warn!(error = %e, "mongodb: cannot open the change stream; retrying");
                            let wait = delays.next().unwrap_or(Duration::from_secs(30));
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'streams,
                                _ = tokio::time::sleep(wait) => continue,
                            }
                        }
                    },
                },
            };
            health.up(Component::Source);
            delays = backoff();
            if lost_history && let Some(bytes) = s.resume_token().as_ref().and_then(bytes_of) {
                // Tell clients now, and replace the dead checkpoint with the new stream's
                // token, rather than waiting for the next event.
                lost_history = false;
                last_sent = Some(bytes.clone());
                let batch = Batch {
                    changes: Vec::new(),
                    end: Position(bytes),
                    lost_history: true,
                };
                hand_over(&out, batch).await?;
            }
            if matches!(start, Start::Now)
                && let Some(token) = s.resume_token()
            {
                // Reopen from here rather than from a later "now": nothing in between is
                // skipped (an oversized next event included).
                start = Start::After(token);
            }

            loop {
                self.checkpoint(&mut acks, &mut last_checkpoint, false)
                    .await?;
                // The stream is dropped whenever this select does not finish the read (shutdown,
                // a dead connection): a half-done getMore is never resumed.
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break 'streams,
                    r = tokio::time::timeout(read_limit, s.next_if_any()) => r,
                };
                let next = match next {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            "mongodb: no answer from the server; reopening the change stream"
                        );
                        health.down(Component::Source, "mongodb: no answer from the server");
                        break;
                    }
                };
                match next {
                    Ok(Some(event)) => {
                        let (piece, dropped) = fragments.add(event);
                        if let Some(why) = dropped {
                            // Part of an event is lost: clients refetch (gap).
                            skipped("split_event", &why);
                            lost_history = true;
                        }
                        let event = match piece {
                            Piece::Whole(event) => event,
                            // No token advances until the last fragment.
                            Piece::Pending | Piece::Stray => continue,
                            Piece::LostEnd(token) => {
                                // The end of an event whose start was lost: pass it, with
                                // the gap set above.
                                let Ok(token) = token_bytes(&doc! {"_id": token}) else {
                                    continue;
                                };
                                start =
                                    Start::After(token_from(&token).map_err(SourceError::Mongo)?);
                                let batch = Batch {
                                    changes: Vec::new(),
                                    end: Position(token.clone()),
                                    lost_history: std::mem::take(&mut lost_history),
                                };
                                last_sent = Some(token);
                                hand_over(&out, batch).await?;
                                continue;
                            }
                        };
                        let token = match token_bytes(&event) {
                            Ok(t) => t,
                            Err(why) => {
                                // Cannot happen with the generated pipeline; count it anyway.
                                skipped("no_token", &why);
                                continue;
                            }
                        };
                        let mut changes = Vec::new();
                        match decode(&event) {
                            Ok(Decoded::Change(change)) => {
                                self.note_change(&change, &mut counters);
                                changes.push(*change);
                            }
                            Ok(Decoded::Invalidate) => {
                                // Its token is not checkpointed: resumeAfter cannot pass an
                                // invalidate, so a restart re-reads it and lands here again.
                                tracing::warn!(
                                    "mongodb: change stream invalidated; reopening with startAfter"
                                );
                                metrics::counter!("changecast_source_invalidations_total")
                                    .increment(1);
                                start = Start::AfterInvalidate(
                                    token_from(&token).map_err(SourceError::Mongo)?,
                                );
                                break;
                            }
                            Ok(Decoded::Dropped { op, collection }) => {
                                tracing::warn!(%op, %collection, "mongodb: documents went away without per-document events");
                                metrics::counter!("changecast_source_drops_total").increment(1);
                            }
                            Ok(Decoded::Other(op)) => {
                                tracing::debug!(%op, "mongodb: event type not routed")
                            }
                            Err(why) => skipped("malformed", &why),
                        }
                        start = Start::After(token_from(&token).map_err(SourceError::Mongo)?);
                        let batch = Batch {
                            changes,
                            end: Position(token.clone()),
                            lost_history: std::mem::take(&mut lost_history),
                        };
                        last_sent = Some(token);
                        hand_over(&out, batch).await?;
                    }
                    Ok(None) => {
                        // Quiet: hand over the post-batch token so it gets checkpointed.
                        if !fragments.pending()
                            && let Some(bytes) = s.resume_token().as_ref().and_then(bytes_of)
                            && last_sent.as_ref() != Some(&bytes)
                        {
                            start = Start::After(token_from(&bytes).map_err(SourceError::Mongo)?);
                            let batch = Batch {
                                changes: Vec::new(),
                                end: Position(bytes.clone()),
                                lost_history: std::mem::take(&mut lost_history),
                            };
                            last_sent = Some(bytes);
                            hand_over(&out, batch).await?;
                        }
                    }
                    Err(e) => match classify(&e, &self.config.uri) {
                        Failure::Fatal(msg) => return Err(fatal(&health, msg)),
                        Failure::HistoryLost => {
                            self.history_lost(&mut start, &mut lost_history);
                            break;
                        }
                        Failure::TooLarge => {
                            drop(s);
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'streams,
                                r = self.pass_too_large(&mut start, &mut last_sent, &out, &health, read_limit) => r?,
                            }
                            if health.is_down(Component::Source) {
                                let wait = delays.next().unwrap_or(Duration::from_secs(30));
                                tokio::select! {
                                    _ = shutdown.cancelled() => break 'streams,
                                    _ = tokio::time::sleep(wait) => {}
                                }
                            }
                            continue 'streams;
                        }
                        Failure::Transient => {
                            if code(&e) == Some(47) {
                                metrics::counter!("changecast_source_missing_preimages_total")
                                    .increment(1);
                            }
                            // The driver already tried to resume once; reopen from our token.
                            health.down(
                                Component::Source,
                                format!("mongodb: change stream failed: {e}"),
                            );
                            tracing::warn!(error = %e, "mongodb: change stream failed; reopening");
                            let wait = delays.next().unwrap_or(Duration::from_secs(30));
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'streams,
                                _ = tokio::time::sleep(wait) => break,
                            }
                        }
                    },
                }
            }
        }
        // Shutdown: stop reading, let the router drain, write the last checkpoint.
        drop(out);
        while acks.changed().await.is_ok() {}
        self.checkpoint(&mut acks, &mut last_checkpoint, true).await
    }

    /// Passes the event after `start` that the server cannot send (10334): learns its
    /// token from a stream without images, then hands over an empty batch at that token
    /// with a gap for every client (its audience is unknown without the document). On
    /// failure `health` is set down and `start` is unchanged: the caller backs off and
    /// reopens, which reaches this again; a failure is never retried without a wait.
    async fn pass_too_large(
        &self,
        start: &mut Start,
        last_sent: &mut Option<Vec<u8>>,
        out: &mpsc::Sender<Batch>,
        health: &Health,
        limit: Duration,
    ) -> Result<(), SourceError> {
        let event = match self.identify_too_large(start, limit).await {
            Ok(Some(event)) => event,
            Ok(None) => {
                health.down(
                    Component::Source,
                    "mongodb: an event over 16 MB could not be identified yet",
                );
                tracing::warn!(
                    "mongodb: the event over 16 MB did not arrive on the identifying stream; retrying"
                );
                return Ok(());
            }
            Err(e) => {
                health.down(
                    Component::Source,
                    format!("mongodb: an event over 16 MB could not be identified: {e}"),
                );
                tracing::warn!(error = %e, "mongodb: cannot identify the event over 16 MB; retrying");
                return Ok(());
            }
        };
        let token = match token_bytes(&event) {
            Ok(t) => t,
            Err(why) => {
                health.down(
                    Component::Source,
                    format!("mongodb: an event over 16 MB has no token: {why}"),
                );
                return Ok(());
            }
        };
        let ns = event.get_document("ns").ok();
        tracing::error!(
            db = ns.and_then(|n| n.get_str("db").ok()).unwrap_or(""),
            collection = ns.and_then(|n| n.get_str("coll").ok()).unwrap_or(""),
            key = %event.get("documentKey").map(ToString::to_string).unwrap_or_default(),
            operation = event.get_str("operationType").unwrap_or(""),
            "mongodb: an event over 16 MB cannot be sent by this server \
             (no {SPLIT_STAGE}); skipping it and telling clients (gap)"
        );
        metrics::counter!("changecast_source_skipped_total", "reason" => "too_large").increment(1);
        *start = Start::After(token_from(&token).map_err(SourceError::Mongo)?);
        *last_sent = Some(token.clone());
        health.up(Component::Source);
        let batch = Batch {
            changes: Vec::new(),
            end: Position(token),
            lost_history: true,
        };
        hand_over(out, batch).await
    }

    fn history_lost(&self, start: &mut Start, lost_history: &mut bool) {
        tracing::error!(
            "mongodb: the resume point is no longer in the oplog; changes in between are lost. \
             Starting from now and telling clients to refetch (gap)"
        );
        metrics::counter!("changecast_source_history_lost_total").increment(1);
        *start = Start::Now;
        *lost_history = true;
    }

    fn note_change(&self, change: &crate::change::Change, counters: &mut ChangeCounters) {
        counters.count(change);
        if let Some(at) = change.at.as_deref()
            && let Ok(t) = humantime::parse_rfc3339(at)
            && let Ok(lag) = std::time::SystemTime::now().duration_since(t)
        {
            metrics::gauge!("changecast_source_lag_seconds").set(lag.as_secs_f64());
        }
        let images = self.config.pre_and_post_images != Images::Off;
        if images
            && change.before.is_none()
            && matches!(change.op, Op::Delete | Op::Update | Op::Replace)
        {
            metrics::counter!("changecast_source_missing_preimages_total").increment(1);
            if change.op == Op::Delete {
                tracing::warn!(
                    collection = %change.collection, key = %change.key,
                    "mongodb: delete without its pre-image cannot be routed by owner; are pre-images enabled?"
                );
            }
        }
    }

    /// Writes the acknowledged token when it changed and the last write is old enough
    /// (or `force`).
    async fn checkpoint(
        &mut self,
        acks: &mut watch::Receiver<Option<Position>>,
        last: &mut Instant,
        force: bool,
    ) -> Result<(), SourceError> {
        if !force && last.elapsed() < CHECKPOINT_EVERY {
            return Ok(());
        }
        let acked = acks.borrow_and_update().as_ref().map(|p| p.0.clone());
        let Some(bytes) = acked else { return Ok(()) };
        if self.checkpointed.as_ref() == Some(&bytes) {
            return Ok(());
        }
        match self.store.save(&bytes).await {
            Ok(()) => {
                self.checkpointed = Some(bytes);
                *last = Instant::now();
            }
            Err(e) => {
                tracing::warn!(error = %e, "mongodb: checkpoint failed; will retry");
                metrics::counter!("changecast_source_errors_total", "kind" => "checkpoint")
                    .increment(1);
            }
        }
        Ok(())
    }
}

/// Sends a batch to the router; the router gone means the process is stopping abnormally.
async fn hand_over(out: &mpsc::Sender<Batch>, batch: Batch) -> Result<(), SourceError> {
    out.send(batch)
        .await
        .map_err(|_| SourceError::Setup("router stopped unexpectedly".into()))
}

/// Reports a fatal stream error on `/readyz` and turns it into the task's error.
fn fatal(health: &Health, msg: String) -> SourceError {
    health.down(Component::Source, msg.clone());
    SourceError::Mongo(msg)
}

fn skipped(reason: &'static str, why: &str) {
    tracing::warn!(reason, "mongodb: skipping an event: {why}");
    metrics::counter!("changecast_source_skipped_total", "reason" => reason).increment(1);
}

/// Reopen delays: 100 ms doubling to 30 s, with jitter, forever.
fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Source for MongoSource {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Batch>,
        acks: watch::Receiver<Option<Position>>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.tail(out, acks, health, shutdown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_checkpoint_bytes() {
        let event = doc! {"_id": {"_data": "826A1B2C3D000000012B"}, "operationType": "insert"};
        let bytes = token_bytes(&event).unwrap();
        let token = token_from(&bytes).unwrap();
        assert_eq!(bytes_of(&token).unwrap(), bytes);
        assert!(token_from(b"not bson").is_err());
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        // Documented: 100 ms doubling to 30 s, plus a jitter of up to the delay itself, so
        // attempt i waits in [base, 2 * base) with base = min(100 ms * 2^i, 30 s).
        let base = |i: u32| (Duration::from_millis(100) * 2u32.pow(i)).min(Duration::from_secs(30));
        let samples: Vec<Vec<Duration>> = (0..50).map(|_| backoff().take(20).collect()).collect();
        for delays in &samples {
            assert_eq!(delays.len(), 20, "retries forever");
            for (i, d) in delays.iter().enumerate() {
                let b = base(i as u32);
                assert!(
                    *d >= b && *d < 2 * b,
                    "attempt {i}: {d:?} outside [{b:?}, {:?})",
                    2 * b
                );
            }
        }
        // Jittered: 50 first delays (and 50 capped ones) are not all one value; with
        // uniform jitter, a repeat among 50 is vanishingly unlikely.
        for i in [0, 19] {
            let mut at_i: Vec<Duration> = samples.iter().map(|d| d[i]).collect();
            at_i.sort();
            at_i.dedup();
            assert!(
                at_i.len() > 40,
                "attempt {i}: {} distinct delays of 50",
                at_i.len()
            );
        }
    }
}
