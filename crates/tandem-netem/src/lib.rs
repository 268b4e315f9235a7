//! A userspace TCP proxy that makes a link slower: a one-way delay, jitter
//! and a bandwidth cap per direction, with bounded buffers. This kernel
//! has no `netem`, so benchmarks and tests put this between two tandem
//! nodes to see what a WAN or a busy LAN does to protocols A, B and C.
//!
//! Each accepted connection is connected to the target, and each direction
//! is pumped by a reader and a writer. The reader stamps every chunk it
//! reads with the time it may leave (now + delay + a random part of the
//! jitter, never earlier than the chunk before, so bytes never reorder);
//! the writer sends it then, no faster than the bandwidth cap. Between the
//! two sits a bounded queue: when it is full the reader stops reading, and
//! TCP's own flow control pushes back on the sender, as a real link would.

use bytes::{Bytes, BytesMut};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

/// What the link does to every byte, in each direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// One-way delay.
    pub delay: Duration,
    /// Up to this much more delay, uniformly at random per chunk.
    pub jitter: Duration,
    /// Bytes per second; `None` for no cap.
    pub rate: Option<u64>,
    /// Bytes held per direction before the reader stops reading.
    pub buffer: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate: None,
            buffer: 4 << 20,
        }
    }
}

/// Largest chunk read at once: small enough that the bandwidth cap and the
/// delay apply smoothly, large enough not to cost a syscall per packet.
const CHUNK: usize = 64 * 1024;

/// Accept connections on `listener` and proxy each to `target` until
/// `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    target: String,
    shape: Shape,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(std::process::id());
    loop {
        let (client, peer) = tokio::select! {
            r = listener.accept() => r?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        seed = seed.wrapping_add(0x2545_F491_4F6C_DD1D);
        let target = target.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            match TcpStream::connect(&target).await {
                Ok(server) => {
                    debug!("proxying {peer} to {target}");
                    connection(client, server, shape, seed, stop).await;
                }
                Err(e) => warn!("cannot connect to {target} for {peer}: {e}"),
            }
        });
    }
}

/// tokio's timers tick in whole milliseconds and round up, which would add
/// up to a millisecond to every delay (measured: a 2 ms RTT became 4.7 ms).
/// So only the bulk of a wait is a tokio sleep; its last stretch is a
/// thread sleep on a blocking-pool thread (a high-resolution timer,
/// accurate to tens of microseconds) that costs no CPU while it waits.
async fn wait_until(at: Instant) {
    const COARSE: Duration = Duration::from_millis(2);
    let now = Instant::now();
    if at <= now {
        return;
    }
    if at - now > COARSE {
        tokio::time::sleep_until(at - COARSE).await;
    }
    let at = at.into_std();
    let _ = tokio::task::spawn_blocking(move || {
        let now = std::time::Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
    })
    .await;
}

/// Both directions of one proxied connection.
async fn connection(
    client: TcpStream,
    server: TcpStream,
    shape: Shape,
    seed: u64,
    stop: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = direction(cr, sw, shape, seed, stop.clone());
    let down = direction(sr, cw, shape, seed.rotate_left(17) | 1, stop);
    tokio::join!(up, down);
}

/// One direction: read, stamp, queue; wait, pace, write.
async fn direction(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    shape: Shape,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) {
    // The queue is counted in chunks; a chunk holds at most CHUNK bytes.
    let slots = (shape.buffer / CHUNK).max(1);
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(slots);
    let reader = async move {
        let mut rng = seed | 1;
        let mut last = Instant::now();
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let n = tokio::select! {
                n = r.read_buf(&mut buf) => n,
                _ = stop.wait_for(|s| *s) => break,
            };
            match n {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let jitter_ns = u64::try_from(shape.jitter.as_nanos()).unwrap_or(u64::MAX);
            let extra = Duration::from_nanos(if jitter_ns == 0 { 0 } else { rng % jitter_ns });
            // Never before the previous chunk: TCP bytes stay in order.
            let due = (Instant::now() + shape.delay + extra).max(last);
            last = due;
            if tx.send((due, buf.freeze())).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        let mut free_at = Instant::now();
        while let Some((due, chunk)) = rx.recv().await {
            let mut at = due.max(free_at);
            if let Some(rate) = shape.rate.filter(|r| *r > 0) {
                // The chunk occupies the link for len/rate; it leaves once
                // the link has carried it.
                let secs = chunk.len() as f64 / rate as f64;
                at = at.max(free_at) + Duration::from_secs_f64(secs);
                free_at = at;
            }
            wait_until(at).await;
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
