//! The router lease against a real nats-server: one holder at a time; a holder that cannot
//! renew (cut off from NATS by a silent partition) stops before anyone else can take the
//! lease; a released lease is taken at once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use changecast::cluster::Nats;
use changecast::cluster::lease::Lease;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use common::nats::NatsServer;
use common::proxy::Proxy;

async fn node(url: &str, name: &str, stream: &str, ttl: &str) -> (Nats, Lease) {
    let nats = common::nats::connect(url, name, stream, ttl).await;
    let ttl = humantime::parse_duration(ttl).unwrap();
    let lease = Lease::new(nats.lease.clone(), name, ttl);
    (nats, lease)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_from_nats_stops_before_another_node_takes_the_lease() {
    let server = NatsServer::start();
    let proxy = Proxy::start(server.addr()).await;
    let (_a_nats, a) = node(&proxy.url(), "a", "lease1", "2s").await;
    let (_b_nats, b) = node(&server.url(), "b", "lease1", "2s").await;

    let held = Arc::new(a.acquire().await.unwrap().expect("a takes the free lease"));
    assert!(held.valid());
    assert!(
        b.acquire().await.unwrap().is_none(),
        "b cannot take a held lease"
    );
    assert_eq!(b.holder().await.unwrap().as_deref(), Some("a"));

    let term = CancellationToken::new();
    let keeper = {
        let (a, held, term) = (a.clone(), Arc::clone(&held), term.clone());
        tokio::spawn(async move { a.keep(&held, &term).await })
    };
    // Renewed past several TTLs: b still cannot take it.
    let renewing_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < renewing_until {
        assert!(
            b.acquire().await.unwrap().is_none(),
            "b took the lease while a renewed it"
        );
        assert!(!term.is_cancelled(), "a stopped while it could renew");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A silent partition: a's renewals go nowhere.
    let cut = Instant::now();
    proxy.cut();
    let stopped = {
        let term = term.clone();
        tokio::spawn(async move {
            term.cancelled().await;
            Instant::now()
        })
    };
    let taken = loop {
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "b never took the lease"
        );
        if let Some(h) = b.acquire().await.unwrap() {
            break (Instant::now(), h);
        }
        tokio::time::sleep(b.poll_interval()).await;
    };
    let stopped = tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("a's term was cancelled")
        .unwrap();
    assert!(
        stopped < taken.0,
        "a stopped routing {:?} after the cut, b took over {:?} after it: they overlapped",
        stopped - cut,
        taken.0 - cut
    );
    assert!(!held.valid(), "a still thinks it holds the lease");
    assert!(taken.1.valid());
    println!(
        "lease_ttl 2s: a stopped {:?} after the cut, b took over {:?} after it",
        stopped - cut,
        taken.0 - cut
    );
    keeper.abort();
    proxy.restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_without_waiting_for_it_to_lapse() {
    let server = NatsServer::start();
    // A TTL far longer than the test: b can only get the lease if a gave it up.
    let (_a_nats, a) = node(&server.url(), "a", "lease2", "10m").await;
    let (_b_nats, b) = node(&server.url(), "b", "lease2", "10m").await;
    let held = a.acquire().await.unwrap().expect("a takes the free lease");
    assert!(b.acquire().await.unwrap().is_none());
    let term = CancellationToken::new();
    term.cancel();
    let revision = a.keep(&held, &term).await;
    a.release(revision).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if b.acquire().await.unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "b never got the released lease");
        tokio::time::sleep(b.poll_interval()).await;
    }
    assert_eq!(b.holder().await.unwrap().as_deref(), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_lease_ttl_becomes_the_bucket_s_max_age() {
    let server = NatsServer::start();
    let (first, _) = node(&server.url(), "a", "lease3", "2s").await;
    assert_eq!(
        first.lease.status().await.unwrap().max_age(),
        Duration::from_secs(2)
    );
    // Every node restarted with a longer TTL: the lease must last that long, or a
    // renewal every TTL/4 would come after the key lapsed.
    let (second, _) = node(&server.url(), "a", "lease3", "7s").await;
    assert_eq!(
        second.lease.status().await.unwrap().max_age(),
        Duration::from_secs(7)
    );
}
