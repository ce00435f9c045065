//! Self-tests of the cluster fixtures (`tests/common/{nats,proxy}.rs`), so that a cluster
//! test's failure is the product's and not the harness's: the NATS server starts with
//! JetStream, its file store survives a SIGKILL and restart; the proxy forwards, a cut is
//! silent (nothing moves, nothing is closed) and a restore lets the client reconnect.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use common::WAIT;
use common::nats::NatsServer;
use common::proxy::Proxy;

/// How long "no answer" is waited for; a real answer on loopback takes milliseconds.
const SILENCE: Duration = Duration::from_millis(1500);

async fn stream(js: &jetstream::Context, name: &str) -> jetstream::stream::Stream {
    js.create_stream(jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{name}.>")],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn connect(url: &str) -> async_nats::Client {
    tokio::time::timeout(WAIT, async_nats::connect(url))
        .await
        .expect("connects in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_starts_and_a_jetstream_stream_survives_kill_and_restart() {
    let mut nats = NatsServer::start();
    let js = jetstream::new(connect(&nats.url()).await);
    stream(&js, "fixture").await;
    for i in 1..=3u64 {
        let ack = js
            .publish("fixture.x", format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, i);
    }
    let port = nats.addr().port();

    nats.restart();
    assert_eq!(nats.addr().port(), port, "same port after restart");
    // A new client: the old one's reconnect is not what is tested here.
    let js = jetstream::new(connect(&nats.url()).await);
    let mut stream = js.get_stream("fixture").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 3);
    for i in 1..=3u64 {
        let m = stream.get_raw_message(i).await.unwrap();
        assert_eq!(m.payload, format!("m{i}").as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_a_cut_is_silent_and_restore_reconnects() {
    let nats = NatsServer::start();
    let proxy = Proxy::start(nats.addr()).await;
    let client = connect(&proxy.url()).await;
    let js = jetstream::new(client.clone());
    stream(&js, "proxied").await;
    let ack = js
        .publish("proxied.x", "before".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 1, "forwarded both ways");

    // A core subscription made through the proxy before the cut.
    let mut sub = client.subscribe("core.x").await.unwrap();
    client.flush().await.unwrap();

    proxy.cut();
    // An existing connection: the publish is never acknowledged...
    let during = tokio::time::timeout(SILENCE, async {
        js.publish("proxied.x", "during".into())
            .await
            .unwrap()
            .await
    })
    .await;
    assert!(during.is_err(), "no ack through a cut: {during:?}");
    // It never reached the server (asked directly, not through the proxy).
    let direct_js = jetstream::new(connect(&nats.url()).await);
    let mut s = direct_js.get_stream("proxied").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 1);
    // ...and the client was not told: no FIN, no RST.
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    // A new connection is accepted but the server's INFO never comes through; the server
    // itself sends it at once (checked on the direct address).
    let mut direct = tokio::net::TcpStream::connect(nats.addr()).await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, direct.read_exact(&mut buf))
        .await
        .expect("the server greets at once")
        .unwrap();
    assert_eq!(&buf, b"INFO");
    let mut held = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let silent = tokio::time::timeout(SILENCE, held.read(&mut buf)).await;
    assert!(silent.is_err(), "nothing through a cut: {silent:?}");

    proxy.restore();
    // The held connection is closed, not forwarded.
    let closed = tokio::time::timeout(WAIT, held.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    // The client reconnects and publishes again.
    let ack = tokio::time::timeout(WAIT * 2, async {
        loop {
            match js.publish("proxied.x", "after".into()).await {
                Ok(f) => match f.await {
                    Ok(ack) => return ack,
                    Err(_) => continue,
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("publishes again after restore");
    assert!(ack.sequence >= 2, "{ack:?}");
    // The client subscribed again on its new connection: a message published directly to
    // the server reaches it (published until one arrives: the resubscription is async).
    let direct = connect(&nats.url()).await;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            direct.publish("core.x", "hello".into()).await.unwrap();
            direct.flush().await.unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await
            {
                return m;
            }
        }
    })
    .await
    .expect("the subscription works again after restore");
    assert_eq!(got.payload, "hello".as_bytes());
}
