//! Write pacing: fewer, larger socket writes for connections that are busy.
//!
//! In: connections that wrote live events less than `server.write_delay` ago and have more
//! to write. Out: one wake-up for all of them at the next tick (every `write_delay`), after
//! which each writes everything queued for it in one vectored write.
//!
//! Why: under fan-out the cost that dominates is the kernel's per write (the system call,
//! the TCP segment, on loopback the receiver's processing too), not per byte. A connection
//! woken for every event writes one event per system call; one held back until the next
//! tick writes all of that tick's events at once. A connection that has not written for
//! `write_delay` (any connection at a human pace: a few events a second) is never held:
//! its event goes out at once. So the delay costs latency only where it buys throughput,
//! and it is bounded by one period. The ticks run only while someone waits: an idle server
//! does not wake up for them. One shared timer, not one per connection: a connection's
//! wait is one entry in a list, not a timer-wheel insertion and removal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Pacer {
    period: Duration,
    /// A connection waits: the ticker runs one more period.
    wanted: Notify,
    tick: Notify,
    /// The gateway stopped and so did the ticker: nobody waits any more.
    stopped: AtomicBool,
}

impl Pacer {
    /// Starts the ticker on the current runtime, until `shutdown`; `None` when `period` is
    /// zero (no pacing).
    pub fn start(period: Duration, shutdown: CancellationToken) -> Option<Arc<Pacer>> {
        if period.is_zero() {
            return None;
        }
        let pacer = Arc::new(Pacer {
            period,
            wanted: Notify::new(),
            tick: Notify::new(),
            stopped: AtomicBool::new(false),
        });
        let ticker = Arc::clone(&pacer);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticker.wanted.notified() => {}
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ticker.period) => {}
                }
                ticker.tick.notify_waiters();
            }
            // Whoever waits now is let go (and finds its kick), and nobody waits after.
            ticker.stopped.store(true, Ordering::SeqCst);
            ticker.tick.notify_waiters();
        });
        Some(pacer)
    }

    /// Waits for the next tick if the connection last wrote less than a period ago.
    pub async fn hold(&self, last_write: Option<Instant>) {
        if last_write.is_none_or(|t| t.elapsed() >= self.period) {
            return;
        }
        let tick = self.tick.notified();
        tokio::pin!(tick);
        // Registered before the ticker is asked for a tick (or checked for having stopped),
        // so that neither the tick nor the stop can be missed.
        tick.as_mut().enable();
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        self.wanted.notify_one();
        tick.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_a_connection_that_wrote_within_the_period_waits_and_then_for_one_tick() {
        let pacer = Pacer::start(Duration::from_millis(20), CancellationToken::new()).unwrap();
        // Never wrote, or wrote a period ago or more: no wait at all.
        let t0 = Instant::now();
        pacer.hold(None).await;
        pacer.hold(Some(t0 - Duration::from_millis(20))).await;
        assert_eq!(Instant::now(), t0, "not held");

        // Wrote just now: held until the next tick, which all waiters share.
        let now = Instant::now();
        let (a, b) = tokio::join!(
            async {
                pacer.hold(Some(now)).await;
                Instant::now()
            },
            async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                pacer.hold(Some(now)).await;
                Instant::now()
            }
        );
        assert_eq!(a, b, "one tick wakes every waiter");
        assert!(
            a > t0 && a - t0 <= Duration::from_millis(20),
            "{:?}",
            a - t0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_a_waiting_connection_go_and_nobody_waits_after_it() {
        let shutdown = CancellationToken::new();
        // A period far longer than the test: only the shutdown can end a wait.
        let pacer = Pacer::start(Duration::from_secs(3600), shutdown.clone()).unwrap();
        let t0 = Instant::now();
        let waiting = tokio::spawn({
            let pacer = Arc::clone(&pacer);
            async move { pacer.hold(Some(Instant::now())).await }
        });
        tokio::task::yield_now().await;
        shutdown.cancel();
        waiting.await.unwrap();
        pacer.hold(Some(Instant::now())).await;
        assert!(
            Instant::now() - t0 < Duration::from_secs(3600),
            "released by the shutdown, not by a tick"
        );
    }

    #[tokio::test]
    async fn a_zero_period_is_no_pacing() {
        assert!(Pacer::start(Duration::ZERO, CancellationToken::new()).is_none());
    }
}
