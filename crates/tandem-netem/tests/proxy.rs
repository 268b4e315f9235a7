//! The proxy against a real echo server on loopback: bytes arrive intact
//! and in order, and the delay and the bandwidth cap are at least what was
//! asked (lower bounds only: a busy machine can only make things slower).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use tandem_netem::{serve, Shape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// An echo server and a proxy in front of it; returns the proxy's address
/// and the stop switch.
async fn setup(shape: Shape) -> (String, watch::Sender<bool>) {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = proxy.local_addr().unwrap().to_string();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(serve(proxy, echo_addr, shape, rx));
    (addr, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_takes_at_least_twice_the_delay() {
    let (addr, _stop) = setup(Shape {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        ..Shape::default()
    })
    .await;
    for rtt in ping_times(&addr, 5).await {
        assert!(
            rtt >= Duration::from_millis(40),
            "round trip {rtt:?} < 2 × 20 ms"
        );
    }
}

/// Round trips of `n` one-byte pings through the proxy to the echo server.
async fn ping_times(addr: &str, n: u8) -> Vec<Duration> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut b = [0u8; 1];
    let mut rtts = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        s.write_all(&[i]).await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i, "the echo came back out of order");
        rtts.push(t.elapsed());
    }
    rtts
}

/// The delay is what was asked for, not rounded up to tokio's millisecond
/// timer ticks: the RTT benchmarks' limits are computed from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_millisecond_delay_is_kept_to_within_a_fraction() {
    let (addr, _stop) = setup(Shape {
        delay: Duration::from_micros(1500),
        ..Shape::default()
    })
    .await;
    let mut rtts = ping_times(&addr, 21).await;
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    assert!(
        median >= Duration::from_millis(3) && median < Duration::from_micros(3600),
        "median round trip {median:?} for 2 × 1.5 ms (all: {rtts:?})"
    );
}

/// Send `data` through the proxy to the echo server, half-close, and read
/// everything that comes back.
async fn echo(addr: &str, data: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_in_order_and_no_faster_than_the_cap() {
    let (addr, _stop) = setup(Shape {
        jitter: Duration::from_millis(2),
        rate: Some(8 << 20),
        buffer: 256 * 1024,
        ..Shape::default()
    })
    .await;
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    let back = echo(&addr, &data).await;
    let took = t.elapsed();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs from what was sent");
    // 4 MiB at 8 MiB/s each way (the two directions overlap): at least 0.5 s.
    assert!(
        took >= Duration::from_millis(490),
        "4 MiB through an 8 MiB/s link took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_accept_loop() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(serve(listener, "127.0.0.1:9".into(), Shape::default(), rx));
    tx.send(true).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(matches!(r, Ok(Ok(Ok(())))), "{r:?}");
}

/// At full speed the pieces fill whole pipes, several wait in the queue at
/// once, and a small buffer holds the reader back: the bytes still arrive
/// intact and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_stream_through_a_small_buffer_arrives_intact() {
    let (addr, _stop) = setup(Shape {
        delay: Duration::from_micros(500),
        buffer: 1 << 20,
        ..Shape::default()
    })
    .await;
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let back = echo(&addr, &data).await;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs from what was sent");
}
