//! One connection's queue: the hub pushes frames in, the connection's task takes them out.
//!
//! In: frames from [`Hub::deliver`](super::Hub::deliver) (under the user's shard lock, never
//! waiting), kicks (4008 for a queue over its limits, 1012 on shutdown). Out: frames in
//! order to the one task that reads the connection, or the kick's reason.
//!
//! Why not `tokio::sync::mpsc` plus a cancellation token, as before: an idle connection
//! held a channel (512 bytes), its first block (288), a token (112) and two futures in its
//! task waiting on them; here it holds one allocation of under 100 bytes, and the queue's
//! buffer exists only while frames are queued. Under fan-out the hub's push is one
//! uncontended lock and, only when the reader is waiting, one wake: a reader that is busy
//! writing is not woken again for every frame, and it takes what queued meanwhile with one
//! lock ([`Mailbox::pop`] per frame is cheap: the lock is the reader's own).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::Frame;
use crate::event::CloseReason;

/// Frames kept by a queue's buffer once it empties; a larger buffer (after a burst) is
/// given back. As many as a connection writes at once (64): a busy connection, which
/// empties its queue a batch at a time, does not give its buffer back and grow it again
/// for every batch (512 bytes kept by a connection that has received events; one that
/// never has holds none).
const KEEP_EMPTY: usize = 64;

/// A connection's queue and kick, shared by the hub and the connection.
#[derive(Debug, Default)]
pub struct Mailbox {
    inner: Mutex<Inbox>,
    /// Live frames up to this sequence are skipped: the client has them already (it
    /// resumed on a cluster node that had not read that far yet). Fixed at subscription.
    seen: u64,
}

#[derive(Debug, Default)]
struct Inbox {
    frames: VecDeque<Arc<Frame>>,
    /// JSON bytes of `frames`.
    bytes: usize,
    /// Set once; the first reason wins.
    kicked: Option<CloseReason>,
    /// The connection is gone: nothing more is queued.
    closed: bool,
    /// The reader's task, when it found nothing to do.
    waker: Option<Waker>,
}

/// What became of a frame offered to a connection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Offer {
    Sent,
    /// The connection is gone or leaving (kicked); its registration removes it shortly.
    Gone,
    /// The queue is full (events or bytes): the connection was kicked with 4008.
    TooSlow,
}

impl Mailbox {
    pub(super) fn new(seen: u64) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            inner: Mutex::default(),
            seen,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame` without waiting. Over `max_frames` or `max_bytes` the connection is
    /// kicked with 4008 (it resumes from history) and nothing more is queued for it.
    pub(super) fn offer(&self, frame: &Arc<Frame>, max_frames: usize, max_bytes: usize) -> Offer {
        let mut inbox = self.lock();
        // Kicked (for whatever reason) or gone: it is leaving, nothing more for it.
        if inbox.closed || inbox.kicked.is_some() {
            return Offer::Gone;
        }
        let bytes = inbox.bytes.saturating_add(frame.json.len());
        if inbox.frames.len() >= max_frames || bytes > max_bytes {
            let waker = inbox.kick(CloseReason::TooSlow);
            drop(inbox);
            wake(waker);
            return Offer::TooSlow;
        }
        inbox.frames.push_back(Arc::clone(frame));
        inbox.bytes = bytes;
        let waker = inbox.waker.take();
        drop(inbox);
        wake(waker);
        Offer::Sent
    }

    /// Asks the connection to close with `reason`. The first reason given wins.
    pub fn kick(&self, reason: CloseReason) {
        let waker = self.lock().kick(reason);
        wake(waker);
    }

    /// Why the connection was kicked, if it was.
    pub fn kicked_for(&self) -> Option<CloseReason> {
        self.lock().kicked
    }

    /// The next frame, `Ready(None)` once kicked, or `Pending` (the task is woken by the
    /// next frame or kick).
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Arc<Frame>>> {
        let mut inbox = self.lock();
        if inbox.kicked.is_some() {
            return Poll::Ready(None);
        }
        match self.take(&mut inbox) {
            Some(frame) => Poll::Ready(Some(frame)),
            None => {
                inbox.register(cx.waker());
                Poll::Pending
            }
        }
    }

    /// The next frame if one is queued (and the connection was not kicked).
    pub fn pop(&self) -> Option<Arc<Frame>> {
        let mut inbox = self.lock();
        if inbox.kicked.is_some() {
            return None;
        }
        self.take(&mut inbox)
    }

    /// Moves queued frames into `out` until it holds `max`: [`Mailbox::pop`] in a loop, with
    /// one lock.
    pub fn pop_into(&self, out: &mut Vec<Arc<Frame>>, max: usize) {
        let mut inbox = self.lock();
        if inbox.kicked.is_some() {
            return;
        }
        while out.len() < max {
            match self.take(&mut inbox) {
                Some(frame) => out.push(frame),
                None => break,
            }
        }
    }

    /// Resolves with the reason once the connection is kicked.
    pub fn poll_kicked(&self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let mut inbox = self.lock();
        match inbox.kicked {
            Some(reason) => Poll::Ready(reason),
            None => {
                inbox.register(cx.waker());
                Poll::Pending
            }
        }
    }

    /// The connection is gone: frees the queue; later offers say `Gone`.
    pub(super) fn close(&self) {
        let mut inbox = self.lock();
        inbox.closed = true;
        inbox.waker = None;
        let frames = std::mem::take(&mut inbox.frames);
        inbox.bytes = 0;
        drop(inbox);
        drop(frames); // frames freed outside the lock
    }

    fn take(&self, inbox: &mut Inbox) -> Option<Arc<Frame>> {
        while let Some(frame) = inbox.frames.pop_front() {
            inbox.bytes = inbox.bytes.saturating_sub(frame.json.len());
            if inbox.frames.is_empty() && inbox.frames.capacity() > KEEP_EMPTY {
                inbox.frames.shrink_to(KEEP_EMPTY);
            }
            if frame.seq > self.seen {
                return Some(frame);
            }
        }
        None
    }
}

impl Inbox {
    /// Records the kick; returns the waker to wake once the lock is released.
    fn kick(&mut self, reason: CloseReason) -> Option<Waker> {
        if self.kicked.is_none() {
            self.kicked = Some(reason);
        }
        self.waker.take()
    }

    fn register(&mut self, waker: &Waker) {
        match &self.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => self.waker = Some(waker.clone()),
        }
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, json: &str) -> Arc<Frame> {
        Arc::new(Frame::new(format!("e-{seq}"), seq, json.to_owned()))
    }

    #[test]
    fn frames_come_out_in_order_and_what_the_client_has_seen_is_skipped() {
        let m = Mailbox::new(2);
        for seq in 1..=4 {
            assert_eq!(m.offer(&frame(seq, "{}"), 10, 1000), Offer::Sent);
        }
        assert_eq!(m.pop().map(|f| f.seq), Some(3));
        assert_eq!(m.pop().map(|f| f.seq), Some(4));
        assert!(m.pop().is_none());
    }

    #[test]
    fn over_either_limit_the_connection_is_kicked_and_takes_nothing_more() {
        let by_count = Mailbox::new(0);
        assert_eq!(by_count.offer(&frame(1, "{}"), 1, 1000), Offer::Sent);
        assert_eq!(by_count.offer(&frame(2, "{}"), 1, 1000), Offer::TooSlow);
        assert_eq!(by_count.kicked_for(), Some(CloseReason::TooSlow));
        // Kicked: nothing is read any more, and later offers drop it quietly.
        assert!(by_count.pop().is_none());
        assert_eq!(by_count.offer(&frame(3, "{}"), 10, 1000), Offer::Gone);

        let by_bytes = Mailbox::new(0);
        assert_eq!(by_bytes.offer(&frame(1, "0123456789"), 10, 15), Offer::Sent);
        assert_eq!(
            by_bytes.offer(&frame(2, "0123456789"), 10, 15),
            Offer::TooSlow
        );
    }

    #[test]
    fn a_kick_keeps_its_first_reason_and_a_closed_mailbox_is_gone() {
        let m = Mailbox::new(0);
        m.kick(CloseReason::Restarting);
        m.kick(CloseReason::TooSlow);
        assert_eq!(m.kicked_for(), Some(CloseReason::Restarting));
        let c = Mailbox::new(0);
        c.offer(&frame(1, "{}"), 10, 1000);
        c.close();
        assert!(c.lock().frames.is_empty(), "closing frees what was queued");
        assert_eq!(c.offer(&frame(2, "{}"), 10, 1000), Offer::Gone);
    }

    #[test]
    fn a_queue_that_empties_after_a_burst_gives_its_buffer_back() {
        let m = Mailbox::new(0);
        for seq in 1..=200 {
            m.offer(&frame(seq, "{}"), 1000, 1 << 20);
        }
        while m.pop().is_some() {}
        assert!(m.lock().frames.capacity() <= KEEP_EMPTY);
        assert_eq!(m.lock().bytes, 0);
    }
}
