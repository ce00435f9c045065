//! The hub: per-user fan-out, history and resume.
//!
//! In: routed events from the one router task — [`Hub::prepare`] gives each its id and
//! encoding, the router stores them durably ([`store`]), then [`Hub::deliver`] fans them
//! out — and subscriptions ([`Hub::subscribe_from`], one per client connection: live
//! only, resuming after `since`, or opening on the newest `last` events). Out: [`Frame`]s
//! on each connection's bounded queue, and the opening of each connection (`ready`, then
//! `gap`, the replay after `since`, or the user's newest events).
//!
//! - Every event gets one id, `<epoch>-<seq>`, from a sequence that only grows, so ids
//!   increase for every user in delivery order. It is encoded to JSON once, and the same
//!   bytes (`Arc<Frame>`) go to every connection of every recipient.
//! - Users live in sharded maps behind `std` mutexes, each user's state behind its own. A
//!   lock is held only to touch the map, the user's recent events and its queues; never
//!   across an `.await`, never while writing to a socket. An audience the router hands on
//!   again (the same shared list: every user of an account) is resolved to its users'
//!   entries once and remembered, so delivering to it hashes and looks up nobody. A connection whose queue is full (events or bytes) is
//!   kicked with 4008 and resumes from history.
//! - Subscribing registers the queue and notes the published head under the user's own
//!   lock, which delivery takes too: every event up to the head is in history (memory or store), every
//!   later one arrives in the queue. Nothing lost at the seam, nothing repeated. A
//!   `last` opening is cut at the same place: the user's newest events up to the head
//!   (memory, then the store for older ones), then the queue.
//! - The epoch names a history's lifetime. With the durable store it survives restarts; in
//!   memory, a new process is a new epoch and older ids get `gap`.

mod mailbox;
pub mod store;

use mailbox::{Mailbox, Offer};

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

// Per-process seeded, and several times cheaper than SipHash on short ids: every delivery
// hashes its user twice (the shard, then the map).
use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::extract::ws::Utf8Bytes;
use bytes::{Bytes, BytesMut};

use crate::change::{Recipients, UserId};
use crate::event::{CloseReason, ServerEvent};
use store::HistoryStore;

const SHARDS: usize = 64;

/// The most events a `last` opening serves: larger requests get this many.
pub const MAX_LAST: usize = 1000;

/// One encoded event, shared by every connection it goes to.
#[derive(Debug)]
pub struct Frame {
    pub seq: u64,
    /// `<epoch>-<seq>`; SSE sends it as `id:`.
    pub id: Box<str>,
    /// The event's JSON text.
    pub json: Utf8Bytes,
    /// The SSE encoding (`id:` and `data:` lines), made by the first SSE connection that
    /// sends this frame and shared by the rest.
    sse: OnceLock<Bytes>,
}

impl Frame {
    pub fn new(id: String, seq: u64, json: String) -> Frame {
        Frame {
            seq,
            id: id.into_boxed_str(),
            json: Utf8Bytes::from(json),
            sse: OnceLock::new(),
        }
    }

    /// The frame as an SSE event.
    pub fn sse(&self) -> Bytes {
        self.sse
            .get_or_init(|| {
                let mut b = BytesMut::with_capacity(self.json.len() + self.id.len() + 16);
                b.extend_from_slice(b"id: ");
                b.extend_from_slice(self.id.as_bytes());
                b.extend_from_slice(b"\ndata: ");
                b.extend_from_slice(self.json.as_bytes());
                b.extend_from_slice(b"\n\n");
                b.freeze()
            })
            .clone()
    }
}

/// Limits the hub enforces.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// Recent events kept in memory per user (with the durable store: a cache in front of
    /// it; without: all the history there is).
    pub history_per_user: usize,
    /// Events a connection may have queued before it is kicked with 4008.
    pub queue_capacity: usize,
    /// Bytes a connection may have queued before it is kicked with 4008.
    pub queue_bytes: usize,
    /// Most connections at once, and per user.
    pub max_connections: usize,
    pub max_connections_per_user: usize,
}

/// Per-user fan-out and history. Shared as `Arc<Hub>`.
pub struct Hub {
    epoch: Box<str>,
    /// Sequence number of the newest event given an id.
    assigned: AtomicU64,
    /// Sequence number of the newest delivered event: every event up to it is in history.
    head: AtomicU64,
    /// The newest sequence known to exist (a cluster node: in the stream, maybe not read
    /// yet). A `since` up to it is valid here; one node may be a few events behind another.
    known: AtomicU64,
    /// Resuming needs `since >= floor` for everyone (history lost or pruned below it).
    floor: AtomicU64,
    /// The highest floor of any user entry dropped from memory: a user without an entry
    /// may have had events up to it, so a new entry starts there (resumes from before it
    /// read the store, or get `gap`), and dropping entries never loses an event. Starts
    /// at the head the process opened with: older events are in the store only.
    forgotten: AtomicU64,
    /// User entries in the shards (for the `changecast_hub_users` gauge and tests).
    users: AtomicUsize,
    store: Option<Arc<HistoryStore>>,
    /// Serialises delivery so that sequence order is history order for every user, and
    /// holds the audiences seen lately, resolved to their users' entries.
    deliver_lock: Mutex<Audiences>,
    shards: Box<[Mutex<Users>]>,
    hasher: RandomState,
    config: HubConfig,
    /// Set by [`Hub::kick_all`]: connections that subscribe later are kicked with it too.
    closed_with: OnceLock<CloseReason>,
    /// Connections registered now.
    connections: AtomicUsize,
    /// Metric handles, resolved once: looking a metric up by name costs a hash per call.
    published: metrics::Counter,
    deliveries: metrics::Counter,
    slow_disconnects: metrics::Counter,
}

/// One shard of the user map.
type Users = HashMap<Box<str>, Arc<UserEntry>, RandomState>;

/// A user's state, shared by its shard (which owns it) and the audiences that name it.
/// Lock order: the shard, then the entry.
type UserEntry = Mutex<UserState>;

struct UserState {
    /// Taken out of its shard: whoever still holds it (an audience) looks the user up again.
    removed: bool,
    recent: VecDeque<Arc<Frame>>,
    /// Events with `seq <= floor` are not in `recent` (dropped, or from before this process).
    floor: u64,
    /// Each connection's queue.
    conns: Vec<Arc<Mailbox>>,
}

/// Audiences with at least this many users are resolved once and remembered.
const CACHED_AUDIENCE: usize = 8;
/// Audiences remembered at most (the router hands on one shared list per account).
const AUDIENCES: usize = 64;

/// Recipient lists seen lately (the router hands the same `Arc` on for every change of
/// an account), each resolved to its users' entries: delivering to one of them needs no
/// hash, shard lock or map lookup per user. An entry taken out of its shard is marked
/// `removed` under its own lock and looked up again; connections come and go inside the
/// entry, so the list stays valid until then. Only the delivering thread touches it.
#[derive(Default)]
struct Audiences {
    /// By the list's address; the list is held, so the address is not reused meanwhile.
    by_list: HashMap<usize, (Recipients, Vec<Arc<UserEntry>>), RandomState>,
}

fn lock_entry(entry: &UserEntry) -> MutexGuard<'_, UserState> {
    // Every mutation under the lock leaves the state whole: a poisoned lock is usable.
    entry.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one delivery did.
#[derive(Default)]
struct Tally {
    delivered: u64,
    kicked: u64,
}

/// An event with its id and encoding, not yet delivered.
#[derive(Debug)]
pub struct Prepared {
    pub frame: Arc<Frame>,
    pub recipients: Recipients,
}

/// What a connection starts with, before live events.
pub enum Opening {
    /// A control event (`ready`, `gap`) without an id.
    Control(String),
    /// A replayed event.
    Event(Arc<Frame>),
}

/// Where a new connection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start<'a> {
    /// Live events only.
    Live,
    /// After this event id (`?since=`, `Last-Event-ID`): exactly what was missed.
    Since(&'a str),
    /// On the user's newest `n` events (`?last=`; at most [`MAX_LAST`]), then live.
    Last(usize),
}

impl<'a> Start<'a> {
    /// From a connection's parameters: `since` wins over `last`.
    pub fn new(since: Option<&'a str>, last: Option<usize>) -> Start<'a> {
        match (since, last) {
            (Some(since), _) => Start::Since(since),
            (None, Some(n)) => Start::Last(n),
            (None, None) => Start::Live,
        }
    }
}

enum Resume {
    Fresh,
    /// A `last` opening: `memory` (the newest, oldest first), preceded by up to `more`
    /// older ones read from the store (`seq <= upto`).
    Recent {
        memory: Vec<Arc<Frame>>,
        more: usize,
        upto: u64,
    },
    Replay(Vec<Arc<Frame>>),
    Gap(String),
    /// Older than memory: read the store for `after < seq <= upto`.
    Store {
        since: String,
        after: u64,
        upto: u64,
    },
}

/// A registered connection; dropping it unsubscribes.
pub struct Subscription {
    /// What `opening` sends, until it has: boxed and then freed, so an open connection
    /// keeps only what its live events need.
    start: Option<Box<(String, Resume)>>,
    /// Live events, each newer than everything in the opening, and the kick.
    mailbox: Arc<Mailbox>,
    registration: Registration,
}

impl Subscription {
    /// `ready`, then `gap` or the replay. Reads the durable store when `since` is older
    /// than what memory holds. Called once; later calls give nothing.
    pub async fn opening(&mut self) -> Vec<Opening> {
        let Some(start) = self.start.take() else {
            return Vec::new();
        };
        let (position, resume) = *start;
        let hub = Arc::clone(&self.registration.hub);
        let mut last = None;
        let (resumed, replay, gap) = match resume {
            Resume::Fresh => (false, Vec::new(), None),
            Resume::Recent { memory, more, upto } => {
                let mut recent = if more > 0 {
                    hub.latest(&self.registration.user, more, upto).await
                } else {
                    Vec::new()
                };
                recent.extend(memory);
                last = Some(recent.len());
                (false, recent, None)
            }
            Resume::Replay(r) => (true, r, None),
            Resume::Gap(since) => (false, Vec::new(), Some(since)),
            Resume::Store { since, after, upto } => {
                match hub.load(&self.registration.user, after, upto).await {
                    Some(r) => (true, r, None),
                    None => (false, Vec::new(), Some(since)),
                }
            }
        };
        let mut out = Vec::with_capacity(2 + replay.len());
        out.push(Opening::Control(
            ServerEvent::Ready {
                user: &self.registration.user,
                position: &position,
                resumed,
                last,
            }
            .to_json(),
        ));
        if let Some(since) = gap {
            metrics::counter!("changecast_gaps_total").increment(1);
            out.push(Opening::Control(
                ServerEvent::Gap {
                    since: &since,
                    position: &position,
                }
                .to_json(),
            ));
        }
        metrics::counter!("changecast_replayed_events_total").increment(replay.len() as u64);
        out.extend(replay.into_iter().map(Opening::Event));
        out
    }

    /// Receives the next live event; `None` once the connection is kicked
    /// ([`Subscription::kicked_for`] says why).
    pub fn recv(&self) -> impl Future<Output = Option<Arc<Frame>>> + '_ {
        std::future::poll_fn(|cx| self.mailbox.poll_recv(cx))
    }

    /// The next live event if one is already queued (and the connection was not kicked).
    pub fn try_recv(&self) -> Option<Arc<Frame>> {
        self.mailbox.pop()
    }

    /// Moves the live events already queued into `out` (one lock), until it holds `max`.
    pub fn try_recv_into(&self, out: &mut Vec<Arc<Frame>>, max: usize) {
        self.mailbox.pop_into(out, max)
    }

    /// Resolves with the reason once the connection is kicked: by the hub (4008, too slow),
    /// on shutdown ([`Hub::kick_all`]), or by [`Subscription::kick`].
    pub fn kicked(&self) -> impl Future<Output = CloseReason> + '_ {
        std::future::poll_fn(|cx| self.mailbox.poll_kicked(cx))
    }

    /// Why the connection was kicked, if it was.
    pub fn kicked_for(&self) -> Option<CloseReason> {
        self.mailbox.kicked_for()
    }

    /// Asks this connection to close (the first reason given wins).
    pub fn kick(&self, reason: CloseReason) {
        self.mailbox.kick(reason);
    }
}

/// Removes the connection from the hub when dropped.
struct Registration {
    hub: Arc<Hub>,
    user: Box<str>,
    mailbox: Arc<Mailbox>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut shard = self.hub.shard(&self.user);
        if let Some(entry) = shard.get(&*self.user) {
            let mut state = lock_entry(entry);
            state.conns.retain(|c| !Arc::ptr_eq(c, &self.mailbox));
            if state.conns.is_empty() && state.recent.is_empty() {
                state.removed = true;
                self.hub.forget(state.floor);
                drop(state);
                shard.remove(&*self.user);
            }
        }
        drop(shard);
        self.mailbox.close();
        self.hub.connections.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("changecast_connections").decrement(1.0);
    }
}

impl Hub {
    /// A hub whose history lives in memory, with a fresh epoch.
    pub fn new(config: HubConfig) -> Self {
        Hub::with_epoch(new_epoch(), config)
    }

    /// An in-memory hub with the given epoch (no `-` allowed in it).
    pub fn with_epoch(epoch: impl Into<String>, config: HubConfig) -> Self {
        Hub::build(epoch.into(), 0, 0, None, config)
    }

    /// A hub backed by a durable store, continuing its epoch and sequence.
    pub fn durable(opened: &store::Opened, config: HubConfig) -> Self {
        Hub::build(
            opened.epoch.clone(),
            opened.head,
            opened.floor,
            Some(Arc::clone(&opened.store)),
            config,
        )
    }

    fn build(
        epoch: String,
        head: u64,
        floor: u64,
        store: Option<Arc<HistoryStore>>,
        config: HubConfig,
    ) -> Self {
        assert!(!epoch.contains('-'), "epoch must not contain '-'");
        Hub {
            epoch: epoch.into_boxed_str(),
            assigned: AtomicU64::new(head),
            head: AtomicU64::new(head),
            known: AtomicU64::new(head),
            floor: AtomicU64::new(floor),
            forgotten: AtomicU64::new(head),
            users: AtomicUsize::new(0),
            store,
            deliver_lock: Mutex::new(Audiences::default()),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(RandomState::default())))
                .collect(),
            hasher: RandomState::default(),
            config,
            closed_with: OnceLock::new(),
            connections: AtomicUsize::new(0),
            published: metrics::counter!("changecast_events_published_total"),
            deliveries: metrics::counter!("changecast_deliveries_total"),
            slow_disconnects: metrics::counter!("changecast_slow_disconnects_total"),
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The durable store, when there is one.
    pub fn store(&self) -> Option<&Arc<HistoryStore>> {
        self.store.as_ref()
    }

    /// Sequence number of the newest delivered event.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, Users> {
        let i = (self.hasher.hash_one(user) as usize) % SHARDS;
        // Every mutation under a shard lock is a single push/retain, so a panic while one
        // is held cannot leave state half-written: a poisoned lock is still usable.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives an event for `recipients` (distinct user ids) its id; `encode` receives the id
    /// and returns the JSON, once. `None` when there is nobody to send it to. Events must
    /// be delivered in the order they were prepared (the router is the one caller).
    pub fn prepare(
        &self,
        recipients: Recipients,
        encode: impl FnOnce(&str) -> String,
    ) -> Option<Prepared> {
        if recipients.is_empty() {
            return None;
        }
        let seq = self.assigned.fetch_add(1, Ordering::AcqRel) + 1;
        let id = format!("{}-{seq}", self.epoch);
        let json = encode(&id);
        Some(Prepared {
            frame: Arc::new(Frame::new(id, seq, json)),
            recipients,
        })
    }

    /// Like [`Hub::prepare`], with the sequence number given (a cluster node numbers events
    /// by their stream sequence). `seq` must be above every earlier one.
    pub fn prepare_at(
        &self,
        seq: u64,
        recipients: Recipients,
        encode: impl FnOnce(&str) -> String,
    ) -> Option<Prepared> {
        debug_assert!(seq > self.assigned.load(Ordering::Acquire));
        self.assigned.store(seq, Ordering::Release);
        if recipients.is_empty() {
            return None;
        }
        let id = format!("{}-{seq}", self.epoch);
        let json = encode(&id);
        Some(Prepared {
            frame: Arc::new(Frame::new(id, seq, json)),
            recipients,
        })
    }

    /// Notes that the stream holds events up to `seq` (a cluster node's gateway).
    pub fn stream_holds(&self, seq: u64) {
        self.known.fetch_max(seq, Ordering::AcqRel);
    }

    /// The newest sequence known to exist (see [`Hub::stream_holds`]).
    pub fn known(&self) -> u64 {
        self.head().max(self.known.load(Ordering::Acquire))
    }

    /// Resuming needs `since` at or above this.
    pub fn floor_seq(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Fans a prepared (and, with a store, stored) event out to its recipients' connections.
    pub fn deliver(&self, event: &Prepared) {
        let mut audiences = self.deliver_lock.lock().unwrap_or_else(|p| p.into_inner());
        let frame = &event.frame;
        self.head.store(frame.seq, Ordering::Release);
        let mut tally = Tally::default();
        let recipients = &event.recipients;
        if recipients.len() >= CACHED_AUDIENCE {
            let key = recipients.as_ptr() as usize;
            if !audiences.by_list.contains_key(&key) {
                if audiences.by_list.len() >= AUDIENCES {
                    audiences.by_list.clear();
                }
                let entries = recipients.iter().map(|u| self.entry(u)).collect();
                audiences
                    .by_list
                    .insert(key, (Arc::clone(recipients), entries));
            }
            if let Some((_, entries)) = audiences.by_list.get_mut(&key) {
                for (user, entry) in recipients.iter().zip(entries.iter_mut()) {
                    let mut state = lock_entry(entry);
                    if !state.removed {
                        self.deliver_to(&mut state, frame, &mut tally);
                        continue;
                    }
                    drop(state);
                    // Left memory since: the user's new entry (made now if need be).
                    let mut shard = self.shard(user);
                    let current = Arc::clone(self.entry_in(&mut shard, user));
                    self.deliver_to(&mut lock_entry(&current), frame, &mut tally);
                    drop(shard);
                    *entry = current;
                }
            }
        } else {
            for user in recipients.iter() {
                let mut shard = self.shard(user);
                let entry = self.entry_in(&mut shard, user);
                self.deliver_to(&mut lock_entry(entry), frame, &mut tally);
            }
        }
        drop(audiences);
        self.published.increment(1);
        self.deliveries.increment(tally.delivered);
        if tally.kicked > 0 {
            self.slow_disconnects.increment(tally.kicked);
        }
    }

    /// `user`'s entry, made if it has none.
    fn entry(&self, user: &str) -> Arc<UserEntry> {
        Arc::clone(self.entry_in(&mut self.shard(user), user))
    }

    /// `user`'s entry in its (locked) shard, made if it has none.
    fn entry_in<'s>(&self, shard: &'s mut Users, user: &str) -> &'s Arc<UserEntry> {
        if !shard.contains_key(user) {
            shard.insert(user.into(), Arc::new(Mutex::new(self.new_user())));
        }
        &shard[user]
    }

    /// Adds `frame` to one user's recent events and offers it to each of its connections.
    fn deliver_to(&self, state: &mut UserState, frame: &Arc<Frame>, tally: &mut Tally) {
        state.recent.push_back(Arc::clone(frame));
        while state.recent.len() > self.config.history_per_user {
            if let Some(old) = state.recent.pop_front() {
                state.floor = old.seq;
            }
        }
        state.conns.retain(|c| match self.offer(c, frame) {
            Offer::Sent => {
                tally.delivered += 1;
                true
            }
            Offer::Gone => false,
            Offer::TooSlow => {
                tally.kicked += 1;
                false
            }
        });
    }

    /// Prepares and delivers in one step: for in-memory use (tests, tools). The router
    /// stores prepared events before delivering them.
    pub fn publish<S: AsRef<str>>(
        &self,
        recipients: &[S],
        encode: impl FnOnce(&str) -> String,
    ) -> Option<u64> {
        let recipients = recipients
            .iter()
            .map(|s| UserId::from(s.as_ref()))
            .collect();
        let event = self.prepare(recipients, encode)?;
        self.deliver(&event);
        Some(event.frame.seq)
    }

    /// Queues `frame` on a connection within the queue limits.
    fn offer(&self, conn: &Mailbox, frame: &Arc<Frame>) -> Offer {
        let max_frames = self.config.queue_capacity.max(1);
        conn.offer(frame, max_frames, self.config.queue_bytes)
    }

    /// A new user entry (the caller inserts it into its shard).
    fn new_user(&self) -> UserState {
        self.users.fetch_add(1, Ordering::Relaxed);
        UserState {
            removed: false,
            recent: VecDeque::new(),
            floor: self.forgotten.load(Ordering::Acquire),
            conns: Vec::new(),
        }
    }

    /// Notes that a user entry with this floor leaves memory (the caller removes it).
    fn forget(&self, floor: u64) {
        self.forgotten.fetch_max(floor, Ordering::AcqRel);
        self.users.fetch_sub(1, Ordering::Relaxed);
    }

    /// Retention: events with `seq <= upto` have expired (pruned from the store, or older
    /// than `max_age`). Nobody can resume from before `upto` any more; they leave memory,
    /// and so does every user left with no event and no connection. Returns the number of
    /// user entries left. Called by the pruning task, not per event.
    pub fn expire(&self, upto: u64) -> usize {
        // Shard by shard, without the delivery lock: the router is never held up for the
        // whole map. The floor is raised first, so a resume from before `upto` is a `gap`
        // whether or not its user's shard has been visited yet.
        self.floor.fetch_max(upto, Ordering::AcqRel);
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, entry| {
                let mut state = lock_entry(entry);
                while state.recent.front().is_some_and(|f| f.seq <= upto) {
                    if let Some(old) = state.recent.pop_front() {
                        state.floor = state.floor.max(old.seq);
                    }
                }
                let keep = !(state.conns.is_empty() && state.recent.is_empty());
                if !keep {
                    state.removed = true;
                    self.forget(state.floor);
                }
                keep
            });
        }
        let left = self.user_count();
        metrics::gauge!("changecast_hub_users").set(left as f64);
        left
    }

    /// User entries held in memory: users with a connection or recent events.
    pub fn user_count(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Registers a connection of `user`, resuming after `since` when given. Refused with
    /// [`CloseReason::TryAgainLater`] past the connection limits.
    pub fn subscribe(
        self: &Arc<Self>,
        user: &str,
        since: Option<&str>,
    ) -> Result<Subscription, CloseReason> {
        self.subscribe_from(user, since.map_or(Start::Live, Start::Since))
    }

    /// Registers a connection of `user` that starts at `start`. Refused with
    /// [`CloseReason::TryAgainLater`] past the connection limits.
    pub fn subscribe_from(
        self: &Arc<Self>,
        user: &str,
        start: Start<'_>,
    ) -> Result<Subscription, CloseReason> {
        if self.connections.fetch_add(1, Ordering::AcqRel) >= self.config.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("changecast_connections_refused_total", "limit" => "total")
                .increment(1);
            return Err(CloseReason::TryAgainLater);
        }

        let mut shard = self.shard(user);
        let entry = Arc::clone(self.entry_in(&mut shard, user));
        let mut state = lock_entry(&entry);
        // Read under the entry's lock, which delivery holds while it adds an event to this
        // user (a shared audience's delivery takes no shard lock): every event up to the
        // head is in `recent` or the store, every later one will be offered to the queue
        // registered below.
        let head = self.head();
        let position = format!("{}-{head}", self.epoch);
        if state.conns.len() >= self.config.max_connections_per_user {
            drop(state);
            drop(shard);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("changecast_connections_refused_total", "limit" => "per_user")
                .increment(1);
            return Err(CloseReason::TryAgainLater);
        }
        // A cluster node a few events behind the one the client came from: what it has
        // seen is skipped when it arrives here.
        let mut seen = 0;
        let resume = match start {
            Start::Live => Resume::Fresh,
            Start::Last(n) => {
                let n = n.min(MAX_LAST);
                let skip = state.recent.len().saturating_sub(n);
                let memory: Vec<Arc<Frame>> = state.recent.iter().skip(skip).cloned().collect();
                // Older events of this user are all at or below its floor, in the store
                // (stored before delivery); later ones come through the queue.
                let more = match &self.store {
                    Some(_) if state.floor > 0 => n - memory.len(),
                    _ => 0,
                };
                Resume::Recent {
                    memory,
                    more,
                    upto: state.floor,
                }
            }
            Start::Since(since) => match self.resume_point(since, head) {
                Some(after) if after > head => {
                    seen = after;
                    Resume::Replay(Vec::new())
                }
                None => Resume::Gap(since.to_owned()),
                Some(after) if after >= state.floor => Resume::Replay(
                    state
                        .recent
                        .iter()
                        .filter(|f| f.seq > after)
                        .cloned()
                        .collect(),
                ),
                // Up to the last event already handed to this user's connections: later
                // ones (even if stored) come through the queue, so none arrives twice.
                Some(after) if self.store.is_some() => Resume::Store {
                    since: since.to_owned(),
                    after,
                    upto: state.recent.back().map_or(state.floor, |f| f.seq),
                },
                Some(_) => Resume::Gap(since.to_owned()),
            },
        };
        let mailbox = Mailbox::new(seen);
        // Under the shard lock `kick_all` takes after setting this: a connection is either
        // kicked by it or sees it here.
        if let Some(&reason) = self.closed_with.get() {
            mailbox.kick(reason);
        }
        // Exact growth: most users have one or two connections, and the list lives as long
        // as the user is connected.
        state.conns.reserve_exact(1);
        state.conns.push(Arc::clone(&mailbox));
        drop(state);
        drop(shard);
        metrics::gauge!("changecast_connections").increment(1.0);
        let position = if seen > head {
            format!("{}-{seen}", self.epoch)
        } else {
            position
        };
        Ok(Subscription {
            start: Some(Box::new((position, resume))),
            mailbox: Arc::clone(&mailbox),
            registration: Registration {
                hub: Arc::clone(self),
                user: user.into(),
                mailbox,
            },
        })
    }

    /// The sequence number to replay after, or `None` when `since` cannot be honoured:
    /// malformed, from another epoch, from the future, or below the floor.
    fn resume_point(&self, since: &str, head: u64) -> Option<u64> {
        let seq = self.seq_of(since)?;
        let floor = self.floor.load(Ordering::Acquire);
        let newest = head.max(self.known.load(Ordering::Acquire));
        (seq <= newest && seq >= floor).then_some(seq)
    }

    /// The sequence number of `id` when it is an id of this history (`<epoch>-<seq>` with
    /// this epoch); `None` for anything else.
    pub fn seq_of(&self, id: &str) -> Option<u64> {
        let (epoch, seq) = id.rsplit_once('-')?;
        (epoch == &*self.epoch).then(|| seq.parse().ok()).flatten()
    }

    /// Reads `user`'s events `after < seq <= upto` from the store; `None` when history
    /// does not reach back that far.
    async fn load(&self, user: &str, after: u64, upto: u64) -> Option<Vec<Arc<Frame>>> {
        let store = Arc::clone(self.store.as_ref()?);
        let (user, epoch) = (user.to_owned(), self.epoch.to_string());
        let floor = self.floor.load(Ordering::Acquire);
        match tokio::task::spawn_blocking(move || store.replay(&user, after, upto, floor, &epoch))
            .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "history: replay failed; the client is sent gap");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "history: replay task failed; the client is sent gap");
                None
            }
        }
    }

    /// `user`'s newest `n` events with `seq <= upto` from the store, oldest first. A failed
    /// read is logged and serves none: the connection still opens, with what memory had.
    async fn latest(&self, user: &str, n: usize, upto: u64) -> Vec<Arc<Frame>> {
        let Some(store) = self.store.as_ref().map(Arc::clone) else {
            return Vec::new();
        };
        let (user, epoch) = (user.to_owned(), self.epoch.to_string());
        match tokio::task::spawn_blocking(move || store.latest(&user, n, upto, &epoch)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "history: reading recent events failed; the client gets fewer");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "history: recent events task failed; the client gets fewer");
                Vec::new()
            }
        }
    }

    /// The source lost changes: nobody can resume from before now, and every connected
    /// client is sent `gap` so it refetches its state. Returns the new floor (for the
    /// store to keep).
    pub fn history_lost(&self) -> u64 {
        let _order = self.deliver_lock.lock().unwrap_or_else(|p| p.into_inner());
        let head = self.head();
        // Whoever has seen `head` (or less) missed the lost changes after it.
        let floor = head + 1;
        self.floor.store(floor, Ordering::Release);
        let position = format!("{}-{head}", self.epoch);
        let gap = Arc::new(Frame::new(
            position.clone(),
            head,
            ServerEvent::Gap {
                since: &position,
                position: &position,
            }
            .to_json(),
        ));
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for entry in shard.values() {
                lock_entry(entry)
                    .conns
                    .retain(|c| self.offer(c, &gap) == Offer::Sent);
            }
        }
        metrics::counter!("changecast_gaps_total").increment(1);
        floor
    }

    /// Kicks every connection with `reason` (shutdown), and every one that subscribes
    /// from now on.
    pub fn kick_all(&self, reason: CloseReason) {
        let _ = self.closed_with.set(reason);
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for entry in shard.values() {
                lock_entry(entry).conns.iter().for_each(|c| c.kick(reason));
            }
        }
    }

    /// Connections holding a slot of `max_connections`: subscribed and not yet dropped.
    pub fn registered(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Connections currently registered.
    pub fn connection_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.values().map(|u| lock_entry(u).conns.len()).sum::<usize>()
            })
            .sum()
    }
}

/// A short, probably-unique epoch name: `e` and base-36 digits, no `-`.
pub fn new_epoch() -> String {
    epoch_name('e', u128::from(fastrand::u64(..) >> 24)) // 40 bits: 8 base-36 digits
}

/// An epoch name: `letter` and `n` in base 36 (no `-`, as ids need).
pub fn epoch_name(letter: char, mut n: u128) -> String {
    let mut digits = Vec::new();
    while n > 0 || digits.is_empty() {
        digits.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
    }
    std::iter::once(letter)
        .chain(digits.into_iter().rev())
        .collect()
}

#[cfg(test)]
mod tests;
