//! The hub: per-user fan-out, history and resume.
//!
//! In: routed events (`publish`, from the one router task) and subscriptions (`subscribe`,
//! one per client connection). Out: [`Frame`]s on each connection's bounded queue.
//!
//! - Every event gets one id, `<epoch>-<seq>`, from a sequence that only grows, so ids
//!   increase for every user in delivery order. It is encoded to JSON once, and the same
//!   bytes (`Arc<Frame>`) go to every connection of every recipient.
//! - Users live in sharded maps behind `std` mutexes. A lock is held only to touch the map,
//!   the user's history and its queue senders (`try_send`); never across an `.await`, never
//!   while writing to a socket. A connection whose queue is full is kicked with 4008.
//! - Subscribing snapshots the user's history and registers the queue under the same lock
//!   that publishing takes, so every event is either in the replay or in the queue: none
//!   lost at the seam, none repeated.
//! - The epoch names this history's lifetime: history is in memory, so a new process has a
//!   new epoch and a client resuming with an id of another epoch gets `gap`.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::extract::ws::Utf8Bytes;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{CloseReason, ServerEvent};

const SHARDS: usize = 64;

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
    /// Events kept per user for resume.
    pub history_per_user: usize,
    /// Events a connection may have queued before it is kicked with 4008.
    pub queue_capacity: usize,
}

/// Per-user fan-out and history. Shared as `Arc<Hub>`.
pub struct Hub {
    epoch: Box<str>,
    /// Sequence number of the newest published event.
    head: AtomicU64,
    /// Resuming needs `since >= floor` for everyone: after the source lost history, only
    /// a client that has seen an event published since then is complete.
    floor: AtomicU64,
    /// Serialises publishers so that sequence order is history order for every user.
    publish_lock: Mutex<()>,
    shards: Box<[Mutex<Users>]>,
    hasher: RandomState,
    config: HubConfig,
    next_conn: AtomicU64,
    /// Metric handles, resolved once: looking a metric up by name costs a hash per call.
    published: metrics::Counter,
    deliveries: metrics::Counter,
    slow_disconnects: metrics::Counter,
}

/// One shard of the user map.
type Users = HashMap<Box<str>, UserState>;

#[derive(Default)]
struct UserState {
    history: VecDeque<Arc<Frame>>,
    /// Events with `seq <= floor` may have been dropped from history; resuming from
    /// before it is a gap.
    floor: u64,
    conns: Vec<Outbox>,
}

/// The hub's end of one connection.
struct Outbox {
    id: u64,
    tx: mpsc::Sender<Arc<Frame>>,
    kick: Arc<Kick>,
}

/// A request, from the hub or the server, that a connection close with a reason.
#[derive(Default, Debug)]
pub struct Kick {
    reason: OnceLock<CloseReason>,
    token: CancellationToken,
}

impl Kick {
    /// Asks the connection to close. The first reason given wins.
    pub fn kick(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Resolves once the connection has been kicked, with the reason.
    pub async fn kicked(&self) -> CloseReason {
        self.token.cancelled().await;
        self.reason.get().copied().unwrap_or(CloseReason::Internal)
    }
}

/// What a new connection starts with; dropping it unsubscribes.
pub struct Subscription {
    /// The `ready` event's JSON.
    pub ready: String,
    /// A `gap` event's JSON when the requested `since` could not be honoured.
    pub gap: Option<String>,
    /// Events after `since`, oldest first, to send before anything from `rx`.
    pub replay: Vec<Arc<Frame>>,
    /// Live events, each newer than every replayed one.
    pub rx: mpsc::Receiver<Arc<Frame>>,
    pub kick: Arc<Kick>,
    _guard: Registration,
}

/// Removes the connection from the hub when dropped.
struct Registration {
    hub: Arc<Hub>,
    user: Box<str>,
    conn: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut shard = self.hub.shard(&self.user);
        if let Some(state) = shard.get_mut(&*self.user) {
            state.conns.retain(|c| c.id != self.conn);
            if state.conns.is_empty() && state.history.is_empty() && state.floor == 0 {
                shard.remove(&*self.user);
            }
        }
        drop(shard);
        metrics::gauge!("changecast_connections").decrement(1.0);
    }
}

impl Hub {
    /// A hub with a fresh epoch.
    pub fn new(config: HubConfig) -> Self {
        Hub::with_epoch(new_epoch(), config)
    }

    /// A hub with the given epoch (no `-` allowed in it).
    pub fn with_epoch(epoch: impl Into<String>, config: HubConfig) -> Self {
        let epoch: String = epoch.into();
        assert!(!epoch.contains('-'), "epoch must not contain '-'");
        Hub {
            epoch: epoch.into_boxed_str(),
            head: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            publish_lock: Mutex::new(()),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            config,
            next_conn: AtomicU64::new(1),
            published: metrics::counter!("changecast_events_published_total"),
            deliveries: metrics::counter!("changecast_deliveries_total"),
            slow_disconnects: metrics::counter!("changecast_slow_disconnects_total"),
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Sequence number of the newest event published.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, Users> {
        let i = (self.hasher.hash_one(user) as usize) % SHARDS;
        // A panic while holding a shard lock cannot leave a user's state half-written in a
        // way later readers would misread (every mutation is a single push/retain), so a
        // poisoned lock is still usable.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes one event to `recipients` (distinct user ids). `encode` receives the
    /// event's id and returns its JSON; it is called once. Returns the event's sequence
    /// number, or `None` when there was nobody to send it to.
    pub fn publish<S: AsRef<str>>(
        &self,
        recipients: &[S],
        encode: impl FnOnce(&str) -> String,
    ) -> Option<u64> {
        if recipients.is_empty() {
            return None;
        }
        let _order = self.publish_lock.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.head.load(Ordering::Acquire) + 1;
        let id = format!("{}-{seq}", self.epoch);
        let json = Utf8Bytes::from(encode(&id));
        let frame = Arc::new(Frame {
            seq,
            id: id.into_boxed_str(),
            json,
            sse: OnceLock::new(),
        });
        self.head.store(seq, Ordering::Release);

        let mut delivered = 0u64;
        let mut kicked = 0u64;
        for user in recipients {
            let user = user.as_ref();
            let mut shard = self.shard(user);
            let state = match shard.get_mut(user) {
                Some(s) => s,
                None => shard.entry(user.into()).or_default(),
            };
            state.history.push_back(Arc::clone(&frame));
            while state.history.len() > self.config.history_per_user {
                if let Some(old) = state.history.pop_front() {
                    state.floor = old.seq;
                }
            }
            state
                .conns
                .retain(|c| match c.tx.try_send(Arc::clone(&frame)) {
                    Ok(()) => {
                        delivered += 1;
                        true
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        c.kick.kick(CloseReason::TooSlow);
                        kicked += 1;
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
        }
        self.published.increment(1);
        self.deliveries.increment(delivered);
        if kicked > 0 {
            self.slow_disconnects.increment(kicked);
        }
        Some(seq)
    }

    /// Registers a connection of `user`, resuming after `since` when given.
    pub fn subscribe(self: &Arc<Self>, user: &str, since: Option<&str>) -> Subscription {
        let (tx, rx) = mpsc::channel(self.config.queue_capacity.max(1));
        let kick = Arc::new(Kick::default());
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);

        let mut shard = self.shard(user);
        let head = self.head();
        let position = format!("{}-{head}", self.epoch);
        let state = match shard.get_mut(user) {
            Some(s) => s,
            None => shard.entry(user.into()).or_default(),
        };
        let floor = state.floor.max(self.floor.load(Ordering::Acquire));
        let (replay, resumed, gap) = match since.map(|s| (s, self.resume_point(s, head, floor))) {
            None => (Vec::new(), false, None),
            Some((_, Some(after))) => {
                let replay = state
                    .history
                    .iter()
                    .filter(|f| f.seq > after)
                    .cloned()
                    .collect();
                (replay, true, None)
            }
            Some((since, None)) => {
                let gap = ServerEvent::Gap {
                    since,
                    position: &position,
                }
                .to_json();
                (Vec::new(), false, Some(gap))
            }
        };
        state.conns.push(Outbox {
            id: conn,
            tx,
            kick: Arc::clone(&kick),
        });
        drop(shard);
        metrics::gauge!("changecast_connections").increment(1.0);
        if gap.is_some() {
            metrics::counter!("changecast_gaps_total").increment(1);
        }
        metrics::counter!("changecast_replayed_events_total").increment(replay.len() as u64);

        let ready = ServerEvent::Ready {
            user,
            position: &position,
            resumed,
        }
        .to_json();
        Subscription {
            ready,
            gap,
            replay,
            rx,
            kick,
            _guard: Registration {
                hub: Arc::clone(self),
                user: user.into(),
                conn,
            },
        }
    }

    /// The sequence number to replay after, or `None` when `since` cannot be honoured:
    /// malformed, from another epoch, from the future, or older than retained history.
    fn resume_point(&self, since: &str, head: u64, floor: u64) -> Option<u64> {
        let (epoch, seq) = since.rsplit_once('-')?;
        let seq: u64 = seq.parse().ok()?;
        (epoch == &*self.epoch && seq <= head && seq >= floor).then_some(seq)
    }

    /// The source lost changes: nobody can resume from before now, and every connected
    /// client is sent `gap` so it refetches its state.
    pub fn history_lost(&self) {
        let _order = self.publish_lock.lock().unwrap_or_else(|p| p.into_inner());
        let head = self.head();
        // Whoever has seen `head` (or less) missed the lost changes after it.
        self.floor.store(head + 1, Ordering::Release);
        let position = format!("{}-{head}", self.epoch);
        let gap = Arc::new(Frame {
            seq: head,
            id: position.clone().into_boxed_str(),
            json: Utf8Bytes::from(
                ServerEvent::Gap {
                    since: &position,
                    position: &position,
                }
                .to_json(),
            ),
            sse: OnceLock::new(),
        });
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for state in shard.values_mut() {
                state
                    .conns
                    .retain(|c| match c.tx.try_send(Arc::clone(&gap)) {
                        Ok(()) => true,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            c.kick.kick(CloseReason::TooSlow);
                            false
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => false,
                    });
            }
        }
        metrics::counter!("changecast_gaps_total").increment(1);
    }

    /// Kicks every connection with `reason` (shutdown).
    pub fn kick_all(&self, reason: CloseReason) {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for state in shard.values() {
                state.conns.iter().for_each(|c| c.kick.kick(reason));
            }
        }
    }

    /// Connections currently registered.
    pub fn connection_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.values().map(|u| u.conns.len()).sum::<usize>()
            })
            .sum()
    }
}

/// A short, probably-unique epoch name: `e` and base-36 digits, no `-`.
fn new_epoch() -> String {
    let mut n = fastrand::u64(..) >> 24; // 40 bits: 8 base-36 digits
    let mut digits = Vec::new();
    while n > 0 || digits.is_empty() {
        digits.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
    }
    std::iter::once('e')
        .chain(digits.into_iter().rev())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(history: usize, queue: usize) -> Arc<Hub> {
        Arc::new(Hub::with_epoch(
            "e1",
            HubConfig {
                history_per_user: history,
                queue_capacity: queue,
            },
        ))
    }

    fn publish(hub: &Hub, users: &[&str], n: u64) -> u64 {
        hub.publish(users, |id| format!("{{\"id\":\"{id}\",\"n\":{n}}}"))
            .unwrap()
    }

    #[test]
    fn every_connection_of_a_user_gets_the_same_bytes() {
        let hub = hub(10, 10);
        let mut a = hub.subscribe("u1", None);
        let mut b = hub.subscribe("u1", None);
        let mut other = hub.subscribe("u2", None);
        publish(&hub, &["u1"], 1);
        let fa = a.rx.try_recv().unwrap();
        let fb = b.rx.try_recv().unwrap();
        assert!(
            Arc::ptr_eq(&fa, &fb),
            "one encoding shared by all connections"
        );
        assert_eq!(fa.id.as_ref(), "e1-1");
        assert!(other.rx.try_recv().is_err());
    }

    #[test]
    fn resume_replays_exactly_what_was_missed() {
        let hub = hub(10, 10);
        for n in 1..=5 {
            publish(&hub, &["u1"], n);
        }
        publish(&hub, &["u2"], 6);
        let sub = hub.subscribe("u1", Some("e1-2"));
        let ids: Vec<&str> = sub.replay.iter().map(|f| &*f.id).collect();
        assert_eq!(ids, vec!["e1-3", "e1-4", "e1-5"]);
        assert!(sub.ready.contains("\"resumed\":true"));
        assert!(sub.ready.contains("\"position\":\"e1-6\""));
        assert!(sub.gap.is_none());
    }

    #[test]
    fn since_older_than_history_or_from_another_epoch_is_a_gap() {
        let hub = hub(2, 10);
        for n in 1..=5 {
            publish(&hub, &["u1"], n);
        }
        for since in ["e1-2", "e0-4", "e1-99", "garbage", "e1-x"] {
            let sub = hub.subscribe("u1", Some(since));
            assert!(sub.gap.is_some(), "{since} should be a gap");
            assert!(sub.replay.is_empty());
            assert!(sub.ready.contains("\"resumed\":false"));
        }
        // The oldest kept is e1-4, so resuming after e1-3 is complete.
        let sub = hub.subscribe("u1", Some("e1-3"));
        assert!(sub.gap.is_none());
        assert_eq!(sub.replay.len(), 2);
    }

    #[test]
    fn a_user_with_no_history_resumes_from_anywhere_in_the_epoch() {
        let hub = hub(2, 10);
        publish(&hub, &["u2"], 1);
        let sub = hub.subscribe("u1", Some("e1-0"));
        assert!(sub.gap.is_none());
        assert!(sub.replay.is_empty());
    }

    #[test]
    fn full_queue_kicks_only_that_connection() {
        let hub = hub(10, 2);
        let slow = hub.subscribe("u1", None);
        let mut fast = hub.subscribe("u1", None);
        for n in 1..=3 {
            publish(&hub, &["u1"], n);
            fast.rx.try_recv().unwrap();
        }
        assert!(slow.kick.token.is_cancelled());
        assert_eq!(slow.kick.reason.get(), Some(&CloseReason::TooSlow));
        assert!(!fast.kick.token.is_cancelled());
        assert_eq!(hub.connection_count(), 1);
    }

    #[test]
    fn dropping_a_subscription_unregisters_it() {
        let hub = hub(10, 10);
        let a = hub.subscribe("u1", None);
        assert_eq!(hub.connection_count(), 1);
        drop(a);
        assert_eq!(hub.connection_count(), 0);
        assert_eq!(hub.publish(&[] as &[&str], |_| String::new()), None);
    }

    #[test]
    fn lost_history_sends_gap_and_refuses_older_resumes() {
        let hub = hub(10, 10);
        publish(&hub, &["u1"], 1);
        let mut live = hub.subscribe("u1", None);
        hub.history_lost();
        let gap = live.rx.try_recv().unwrap();
        assert_eq!(
            &*gap.json,
            r#"{"type":"gap","since":"e1-1","position":"e1-1"}"#
        );
        assert!(hub.subscribe("u1", Some("e1-0")).gap.is_some());
        assert!(
            hub.subscribe("u2", Some("e1-0")).gap.is_some(),
            "also users with no history"
        );
        assert!(
            hub.subscribe("u1", Some("e1-1")).gap.is_some(),
            "saw the last event before the loss"
        );
        publish(&hub, &["u1"], 2);
        assert!(
            hub.subscribe("u1", Some("e1-2")).gap.is_none(),
            "saw an event after the loss"
        );
    }

    #[test]
    fn epochs_are_short_and_dashless() {
        let e = new_epoch();
        assert!(
            e.starts_with('e') && !e.contains('-') && e.len() <= 10,
            "{e}"
        );
    }
}
