//! A userspace TCP proxy that makes a link slower: a one-way delay, jitter
//! and a bandwidth cap per direction, with bounded buffers. This kernel
//! has no `netem`, so benchmarks and tests put this between two tandem
//! nodes to see what a WAN or a busy LAN does to protocols A, B and C.
//!
//! Each accepted connection is connected to the target, and each direction
//! is pumped by a reader and a writer. The reader moves what arrives into a
//! pipe and stamps that piece with the time it may leave (now + delay + a
//! random part of the jitter, never earlier than the piece before, so bytes
//! never reorder); the writer sends it then, no faster than the bandwidth
//! cap. Between the two sits a queue bounded in bytes (`Shape::buffer`) and
//! in pieces: when it is full the reader stops reading, and TCP's own flow
//! control pushes back on the sender, as a real link would.

use rustix::fd::OwnedFd;
use rustix::io::ioctl_fionread;
use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
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

/// Most bytes one piece (a pipe) holds: the largest pipe an unprivileged
/// process may have (`/proc/sys/fs/pipe-max-size`).
const PIECE: usize = 1 << 20;

/// Most pieces queued per direction (two file descriptors each), whatever
/// their size: a trickle of small reads must not exhaust descriptors. A
/// connection then holds at most about 550 descriptors, within the usual
/// limit of 1,024, and 128 pieces still carry 3 GB/s of 64 KiB reads
/// across a 2.5 ms delay.
const MAX_PIECES: usize = 128;

/// Emptied pipes kept per direction for the next pieces.
const POOL: usize = 8;

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

/// Wait until `at`, then send what `pipe` holds (`len` bytes) to `to`:
/// the pipe comes back with the bytes still to send when the socket
/// filled up, for [`drain`].
///
/// tokio's timers tick in whole milliseconds and round up, which would add
/// up to a millisecond to every delay (measured: a 2 ms RTT became 4.7 ms).
/// So only the bulk of a wait is a tokio sleep; its last stretch is a
/// thread sleep on a blocking-pool thread (a high-resolution timer) that
/// costs no CPU while it waits, with a timer slack of a nanosecond instead
/// of Linux's default 50 µs, and that thread sends the piece itself:
/// handing it back to the runtime first was one more wake-up after the
/// deadline. Measured on this VM (a 4 KiB message and a 16-byte answer,
/// median of 200, five runs each): a 5 ms RTT came out as 5,408–5,558 µs
/// before both changes, and a 1 ms RTT as 1,314–1,410 µs.
async fn send_at(
    at: Instant,
    pipe: Pipe,
    len: usize,
    to: &Arc<TcpStream>,
) -> io::Result<(Pipe, usize)> {
    const COARSE: Duration = Duration::from_millis(2);
    let now = Instant::now();
    if at <= now {
        return Ok((pipe, len));
    }
    if at - now > COARSE {
        tokio::time::sleep_until(at - COARSE).await;
    }
    let at = at.into_std();
    let to = Arc::clone(to);
    let sent = tokio::task::spawn_blocking(move || {
        precise_sleeps();
        let now = std::time::Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let mut left = len;
        while left > 0 {
            match splice(
                &pipe.r,
                None,
                &*to,
                None,
                left,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => left -= n,
                Err(rustix::io::Errno::INTR) => {}
                // The socket is full: the runtime waits for room.
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok((pipe, left))
    })
    .await;
    sent.unwrap_or_else(|e| Err(io::Error::other(format!("the sending thread failed: {e}"))))
}

/// Make this thread's sleeps end on time (see [`wait_until`]); once per
/// thread.
fn precise_sleeps() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    DONE.with(|done| {
        if !done.replace(true) {
            // Failure only leaves the default slack.
            let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
        }
    });
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
    let (client, server) = (Arc::new(client), Arc::new(server));
    let up = direction(
        Arc::clone(&client),
        Arc::clone(&server),
        shape,
        seed,
        stop.clone(),
    );
    let down = direction(server, client, shape, seed.rotate_left(17) | 1, stop);
    tokio::join!(up, down);
}

/// Bytes taken from one side, waiting in a pipe until they may leave.
struct Piece {
    at: Instant,
    pipe: Pipe,
    len: usize,
    /// Its share of the direction's buffer, returned when it has left.
    _held: OwnedSemaphorePermit,
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

fn new_pipe() -> io::Result<Pipe> {
    let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    // A smaller pipe (the size may be capped lower here) only makes
    // smaller pieces.
    let cap = fcntl_setpipe_size(&w, PIECE)
        .or_else(|_| rustix::pipe::fcntl_getpipe_size(&w))
        .unwrap_or(4096);
    Ok(Pipe { r, w, cap })
}

type PipePool = Arc<std::sync::Mutex<Vec<Pipe>>>;

/// One direction: take what arrives into a pipe, stamp it, queue it; wait,
/// pace, send it on. The bytes move between the sockets with `splice`,
/// never through this process's memory: a proxy that copied each byte
/// twice would cost the machine under test as much CPU as the link it
/// stands in for (a stream through the copying version of this proxy
/// peaked near 1 GB/s here, against 2.7 GB/s direct).
async fn direction(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    shape: Shape,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<Piece>(MAX_PIECES);
    // The buffer in bytes: a piece holds a permit per byte it may take.
    let budget = shape.buffer.clamp(1, usize::MAX >> 4);
    let room = Arc::new(Semaphore::new(budget));
    let pool: PipePool = Arc::default();
    let reader = {
        let pool = Arc::clone(&pool);
        async move {
            let mut rng = seed | 1;
            let mut last = Instant::now();
            let mut spare: Option<Pipe> = None;
            loop {
                let pipe = match spare.take() {
                    Some(p) => p,
                    None => match pool.lock().ok().and_then(|mut p| p.pop()) {
                        Some(p) => p,
                        None => match new_pipe() {
                            Ok(p) => p,
                            Err(e) => {
                                // Out of descriptors (or pipe memory) for
                                // now: pieces in flight give theirs back.
                                warn!("cannot create a pipe: {e}; trying again");
                                tokio::select! {
                                    _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                                    _ = stop.wait_for(|s| *s) => break,
                                    _ = tx.closed() => break,
                                }
                            }
                        },
                    },
                };
                let most = pipe.cap.min(budget);
                let want = u32::try_from(most).unwrap_or(u32::MAX);
                let held = tokio::select! {
                    p = Arc::clone(&room).acquire_many_owned(want) => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tx.closed() => break,
                };
                let (len, eof) = tokio::select! {
                    r = fill(&from, &pipe, most) => match r {
                        Ok(r) => r,
                        Err(e) => {
                            debug!("proxy read ended: {e}");
                            (0, true)
                        }
                    },
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tx.closed() => break,
                };
                if len == 0 {
                    if eof {
                        break;
                    }
                    spare = Some(pipe);
                    continue;
                }
                let mut held = held;
                if let Some(unused) = held.num_permits().checked_sub(len) {
                    // Only the bytes taken count against the buffer.
                    drop(held.split(unused));
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let jitter_ns = u64::try_from(shape.jitter.as_nanos()).unwrap_or(u64::MAX);
                let extra = Duration::from_nanos(if jitter_ns == 0 { 0 } else { rng % jitter_ns });
                // Never before the previous piece: TCP bytes stay in order.
                let at = (Instant::now() + shape.delay + extra).max(last);
                last = at;
                let piece = Piece {
                    at,
                    pipe,
                    len,
                    _held: held,
                };
                if tx.send(piece).await.is_err() || eof {
                    break;
                }
            }
        }
    };
    let writer = async move {
        let mut free_at = Instant::now();
        while let Some(piece) = rx.recv().await {
            let mut at = piece.at.max(free_at);
            if let Some(rate) = shape.rate.filter(|r| *r > 0) {
                // The piece occupies the link for len/rate; it leaves once
                // the link has carried it.
                at += Duration::from_secs_f64(piece.len as f64 / rate as f64);
                free_at = at;
            }
            let sent = match send_at(at, piece.pipe, piece.len, &to).await {
                Ok((pipe, left)) => drain(&pipe, left, &to).await.map(|()| pipe),
                Err(e) => Err(e),
            };
            let pipe = match sent {
                Ok(pipe) => pipe,
                Err(e) => {
                    debug!("proxy write ended: {e}");
                    break;
                }
            };
            if let Ok(mut p) = pool.lock() {
                if p.len() < POOL {
                    p.push(pipe);
                }
            }
        }
        let _ = rustix::net::shutdown(&*to, rustix::net::Shutdown::Write);
    };
    tokio::join!(reader, writer);
}

/// Move what `from` has (as soon as it has something, at most `most`
/// bytes) into `pipe`: the bytes moved, and whether `from` reached its end.
async fn fill(from: &TcpStream, pipe: &Pipe, most: usize) -> io::Result<(usize, bool)> {
    let mut len = 0;
    loop {
        from.readable().await?;
        loop {
            match splice(
                from,
                None,
                &pipe.w,
                None,
                most - len,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            ) {
                Ok(0) => return Ok((len, true)),
                Ok(n) => {
                    len += n;
                    if len >= most {
                        return Ok((len, false));
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    // Either the socket is empty or the pipe is full (it
                    // runs out of slots before bytes when segments are
                    // small). Only an empty socket waits for readiness;
                    // asking inside `try_io` clears only the readiness seen
                    // before the question, so bytes arriving after it wake
                    // the next wait.
                    let full = from.try_io(Interest::READABLE, || match ioctl_fionread(from) {
                        Ok(n) if n > 0 => Ok(()),
                        _ => Err(io::ErrorKind::WouldBlock.into()),
                    });
                    if full.is_ok() || len > 0 {
                        return Ok((len, false));
                    }
                    break;
                }
                // What was taken still goes out before the end.
                Err(_) if len > 0 => return Ok((len, true)),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Send the `len` bytes in `pipe` to `to`.
async fn drain(pipe: &Pipe, mut len: usize, to: &TcpStream) -> io::Result<()> {
    while len > 0 {
        to.writable().await?;
        let r = to.try_io(Interest::WRITABLE, || {
            splice(
                &pipe.r,
                None,
                to,
                None,
                len,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            )
            .map_err(io::Error::from)
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
