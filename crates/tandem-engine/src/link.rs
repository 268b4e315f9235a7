//! The replication link: listen and connect (as DRBD does), authenticate,
//! then one reader and one writer task per link.
//!
//! Only one link is up at a time. While one is up the connector pauses and
//! the listener turns newcomers away. Duplicates are resolved the same way
//! on both nodes: a connection initiated by the node whose name sorts first
//! (`keep_outgoing`) is "preferred" at both of its ends and is used at once;
//! any other waits [`DUPLICATE_GRACE`] after its handshake and is dropped
//! with `Disconnect{"duplicate connection"}` if a preferred one came up
//! meanwhile. When both nodes connect at the same moment, both therefore
//! keep the same connection. The node that sorts second also makes its first
//! attempt half a connect-int late, so crossings are rare to begin with.

use bytes::BytesMut;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_blockdev::pipes::{self, stalled, MAX_CHAIN, PIPE_MAX};
use tandem_core::ConnState;
use tandem_wire::{Frame, FrameReader, HandshakeConfig, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Batches of frames queued for the writer. Bounded: a full queue makes
/// the actor wait, which is the back pressure a slow link must exert. The
/// actor's batches hold at most [`BATCH_FRAMES`] frames and about 1 MiB
/// of payload.
const SEND_QUEUE: usize = 256;
/// Frames the actor puts in one batch, and the reader in one event.
pub const BATCH_FRAMES: usize = 64;
/// The writer gathers up to this many bytes of queued frames per syscall.
const WRITE_BATCH: usize = 1 << 20;
/// A handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a non-preferred connection waits for a crossing preferred one.
pub const DUPLICATE_GRACE: Duration = Duration::from_millis(200);

/// What the link needs to know.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// Resource name.
    pub resource: String,
    /// This node.
    pub me: String,
    /// The peer.
    pub peer: String,
    /// Listen address.
    pub my_address: String,
    /// Peer address.
    pub peer_address: String,
    /// Shared secret.
    pub secret: Vec<u8>,
    /// Retry interval.
    pub connect_int: Duration,
    /// Ping interval.
    pub ping_int: Duration,
    /// How long a ping may go unanswered.
    pub ping_timeout: Duration,
    /// The node that sorts second makes its first attempt half a
    /// connect-int late (tests turn this off to force crossings).
    pub stagger: bool,
    /// Send from a thread of its own (protocol A: see [`start_writer`]).
    pub writer_thread: bool,
}

/// What the link tells the actor.
pub enum LinkEvent {
    /// A link is authenticated; frames for it go to `tx`.
    Up {
        /// Link number.
        id: u64,
        /// The writer's queue, one batch of frames per item (the actor
        /// gathers what one wake-up produced, so the writer makes one
        /// write call for it instead of waking per frame).
        tx: mpsc::Sender<Vec<Out>>,
    },
    /// The link is gone.
    Down {
        /// Link number.
        id: u64,
        /// The state name for the cause.
        cause: ConnState,
        /// Log line.
        reason: String,
    },
    /// Frames arrived: those one read brought in, in order.
    Messages {
        /// Link number.
        id: u64,
        /// The frames (at most [`BATCH_FRAMES`]).
        msgs: Vec<Message>,
    },
    /// A `Data` or `RsData` frame whose payload did not pass through user
    /// space: `msg`'s `data` holds its first bytes, `piped` the rest.
    Bulk {
        /// Link number.
        id: u64,
        /// The frame, with the payload's first part.
        msg: Message,
        /// The payload's rest.
        piped: Piped,
    },
}

/// What the writer sends, in order.
pub enum Out {
    /// A frame.
    Frame(Message),
    /// An `RsData` frame whose payload goes from the disk to the socket
    /// with `sendfile`.
    File(FileFrame),
    /// A `Data` frame (`msg`, its payload empty) whose payload is `head`
    /// then what `piped` holds: the pipes go to the socket with `splice`.
    Piped {
        /// The frame with an empty payload.
        msg: Message,
        /// The payload's first bytes.
        head: bytes::Bytes,
        /// The rest.
        piped: Piped,
    },
}

/// A frame whose payload is a range of the local disk, sent without a
/// copy through user space. `done` hears how the send went exactly once:
/// when it finished, or with an error when the frame is dropped unsent
/// (its link went away).
pub struct FileFrame {
    /// The frame with an empty payload.
    head: Message,
    dev: Arc<tandem_blockdev::FileDevice>,
    offset: u64,
    len: usize,
    done: Option<Box<dyn FnOnce(io::Result<()>) + Send>>,
    /// The payload read into pipes on the blocking pool since the frame
    /// was queued (`None` inside: no pipes; it goes with `sendfile`).
    prefetch: Option<tokio::sync::oneshot::Receiver<Option<Piped>>>,
    /// What `prefetch` gave, once taken.
    fetched: Option<Piped>,
}

/// How long the writer waits, at the head of the queue, for a file
/// frame's payload to be in its pipes. Meanwhile nothing goes out, not
/// even an owed ping ack, so this stays far below any ping-timeout; a
/// payload not ready by then comes from a slow disk, and is sent with
/// `sendfile` after its header (the peer allows silence inside a frame).
const PREFETCH_WAIT: Duration = Duration::from_millis(20);

impl FileFrame {
    /// `RsData` for request `id`: `len` bytes of `dev` at `offset`.
    pub fn rs_data(
        id: u64,
        offset: u64,
        len: usize,
        dev: Arc<tandem_blockdev::FileDevice>,
        done: Box<dyn FnOnce(io::Result<()>) + Send>,
    ) -> Self {
        // Reading into pipes starts now, on the blocking pool: the whole
        // window of requests reads ahead while the writer sends one frame
        // at a time, and the writer then only moves pages to the socket.
        // Sending with `sendfile` from the blocking pool instead cost two
        // hand-offs between threads per frame, and a full 4 GiB resync
        // left both vCPUs a fifth idle.
        let prefetch = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let dev = Arc::clone(&dev);
            rt.spawn_blocking(move || {
                // A failed read is left to `sendfile`, which reports it
                // as it always did.
                let _ = tx.send(dev.read_into_pipes(offset, len).ok().flatten());
            });
            rx
        });
        Self {
            head: Message::RsData {
                id,
                offset,
                data: bytes::Bytes::new(),
            },
            dev,
            offset,
            len,
            done: Some(done),
            prefetch,
            fetched: None,
        }
    }

    /// Whether the payload is still being read into pipes (taking it if
    /// it is there).
    fn fetching(&mut self) -> bool {
        use tokio::sync::oneshot::error::TryRecvError;
        let Some(rx) = self.prefetch.as_mut() else {
            return false;
        };
        match rx.try_recv() {
            Ok(p) => self.fetched = p,
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Closed) => {}
        }
        self.prefetch = None;
        false
    }

    /// The payload in pipes, if they were filled within [`PREFETCH_WAIT`].
    async fn take_piped(&mut self) -> Option<Piped> {
        let piped = match self.prefetch.take() {
            Some(rx) => match tokio::time::timeout(PREFETCH_WAIT, rx).await {
                Ok(Ok(p)) => p,
                _ => None,
            },
            None => self.fetched.take(),
        };
        piped.filter(|p| p.len() == self.len)
    }

    fn finish(&mut self, r: io::Result<()>) {
        if let Some(done) = self.done.take() {
            done(r);
        }
    }
}

impl Drop for FileFrame {
    fn drop(&mut self) {
        self.finish(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the link closed before the data was sent",
        )));
    }
}

/// Whether a failed [`FileFrame`] failed on the link's side (the socket, or
/// the link going away) rather than on the disk's.
pub fn link_side(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// Send a file frame's payload. `sendfile` waits for the disk on a page
/// cache miss, so it runs on the blocking pool, waiting for room in the
/// socket with `poll`; if the writer is dropped meanwhile (the link is
/// gone) the loop notices within a poll interval and stops.
async fn send_file_range(
    sock: &TcpStream,
    dev: Arc<tandem_blockdev::FileDevice>,
    mut offset: u64,
    mut left: usize,
) -> io::Result<()> {
    use rustix::fd::AsFd;
    struct Abandon(Arc<AtomicBool>);
    impl Drop for Abandon {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    // Its own descriptor: the link's may be closed while this runs.
    let fd = sock.as_fd().try_clone_to_owned()?;
    let guard = Abandon(Arc::new(AtomicBool::new(false)));
    let abandoned = Arc::clone(&guard.0);
    let r = tokio::task::spawn_blocking(move || {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let interval = Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        while left > 0 {
            match dev.sendfile_to(fd.as_fd(), &mut offset, left) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if abandoned.load(Ordering::Relaxed) {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "the link closed",
                        ));
                    }
                    let mut p = [PollFd::new(&fd, PollFlags::OUT)];
                    match poll(&mut p, Some(&interval)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // `sendfile` fails for the file or for the socket, and
                    // the error's kind does not say which (a FUSE file whose
                    // server died says ENOTCONN): a socket in error or hung
                    // up decides that the link failed, otherwise the disk.
                    let mut p = [PollFd::new(&fd, PollFlags::OUT)];
                    let now = Timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    };
                    let broken = poll(&mut p, Some(&now)).is_ok()
                        && p[0].revents().intersects(PollFlags::ERR | PollFlags::HUP);
                    return Err(if broken {
                        io::Error::new(io::ErrorKind::ConnectionReset, e)
                    } else {
                        io::Error::other(format!("reading the disk: {e}"))
                    });
                }
            }
        }
        Ok(())
    })
    .await;
    drop(guard);
    r.map_err(|e| io::Error::other(format!("the sendfile task failed: {e}")))?
}

pub use tandem_blockdev::pipes::{Piped, SPLICE_MIN};

struct Shared<T> {
    s: LinkSettings,
    events: mpsc::Sender<T>,
    /// A link is up (or being set up past the handshake).
    active: AtomicBool,
    /// The operator wants a link (not `disconnect`ed).
    want: Arc<AtomicBool>,
    next_id: AtomicU64,
    last_error: std::sync::Mutex<String>,
}

impl<T> Shared<T> {
    /// Log a connection problem once, not every connect-int.
    fn note(&self, msg: String) {
        if let Ok(mut last) = self.last_error.lock() {
            if *last != msg {
                warn!("{msg}");
                *last = msg;
            } else {
                debug!("{msg}");
            }
        }
    }
}

/// Run the listener and the connector until `stop`.
/// Events go to `events` as `T` (the daemon's input type, so no task sits
/// in between).
pub async fn run<T: From<LinkEvent> + Send + 'static>(
    s: LinkSettings,
    events: mpsc::Sender<T>,
    want: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        s,
        events,
        active: AtomicBool::new(false),
        want,
        next_id: AtomicU64::new(1),
        last_error: std::sync::Mutex::new(String::new()),
    });
    let listener = {
        let sh = Arc::clone(&shared);
        tokio::spawn(async move { listen(sh).await })
    };
    let connector = {
        let sh = Arc::clone(&shared);
        tokio::spawn(async move { connect_loop(sh).await })
    };
    let _ = stop.wait_for(|s| *s).await;
    listener.abort();
    connector.abort();
}

async fn listen<T: From<LinkEvent> + Send + 'static>(sh: Arc<Shared<T>>) {
    let listener = loop {
        match TcpListener::bind(&sh.s.my_address).await {
            Ok(l) => break l,
            Err(e) => {
                sh.note(format!(
                    "cannot listen for the peer on {}: {e}; retrying",
                    sh.s.my_address
                ));
                tokio::time::sleep(sh.s.connect_int).await;
            }
        }
    };
    info!("listening for {} on {}", sh.s.peer, sh.s.my_address);
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let sh = Arc::clone(&sh);
        tokio::spawn(async move {
            if sh.active.load(Ordering::Relaxed) || !sh.want.load(Ordering::Relaxed) {
                debug!("turning away a connection from {from}: already connected or StandAlone");
                return;
            }
            establish(sh, stream, false, format!("from {from}")).await;
        });
    }
}

async fn connect_loop<T: From<LinkEvent> + Send + 'static>(sh: Arc<Shared<T>>) {
    if sh.s.stagger && !tandem_wire::keep_outgoing(&sh.s.me, &sh.s.peer) {
        tokio::time::sleep(sh.s.connect_int / 2).await;
    }
    loop {
        if !sh.active.load(Ordering::Relaxed) && sh.want.load(Ordering::Relaxed) {
            match tokio::time::timeout(
                sh.s.connect_int.max(Duration::from_millis(500)),
                TcpStream::connect(&sh.s.peer_address),
            )
            .await
            {
                Ok(Ok(stream)) => {
                    establish(
                        Arc::clone(&sh),
                        stream,
                        true,
                        format!("to {}", sh.s.peer_address),
                    )
                    .await
                }
                Ok(Err(e)) => debug!("connecting to {}: {e}", sh.s.peer_address),
                Err(_) => debug!("connecting to {}: timed out", sh.s.peer_address),
            }
        }
        tokio::time::sleep(sh.s.connect_int).await;
    }
}

async fn establish<T: From<LinkEvent> + Send + 'static>(
    sh: Arc<Shared<T>>,
    stream: TcpStream,
    outgoing: bool,
    how: String,
) {
    // Replication frames are latency-critical and already batched by us.
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r);
    let cfg = HandshakeConfig {
        resource: &sh.s.resource,
        me: &sh.s.me,
        peer: &sh.s.peer,
        secret: &sh.s.secret,
    };
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tandem_wire::handshake(&mut reader, &mut w, &cfg),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) if outgoing && e.is_unanswered() => {
            // The peer is not up yet behind whatever accepted the connect:
            // as routine as a refused connect, logged the same way.
            debug!("connection {how}: {e}");
            return;
        }
        Ok(Err(e)) => {
            sh.note(format!("connection {how}: {e}"));
            return;
        }
        Err(_) => {
            sh.note(format!("connection {how}: handshake timed out"));
            return;
        }
    }
    let preferred = outgoing == tandem_wire::keep_outgoing(&sh.s.me, &sh.s.peer);
    if !preferred {
        tokio::time::sleep(DUPLICATE_GRACE).await;
    }
    if sh
        .active
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        debug!("dropping the duplicate connection {how}");
        let _ = tandem_wire::write_message(
            &mut w,
            &Message::Disconnect {
                reason: "duplicate connection".into(),
            },
        )
        .await;
        return;
    }
    if let Ok(mut last) = sh.last_error.lock() {
        last.clear();
    }
    let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
    info!("link {id} to {} authenticated ({how})", sh.s.peer);
    let (tx, rx) = mpsc::channel::<Vec<Out>>(SEND_QUEUE);
    if sh
        .events
        .send(T::from(LinkEvent::Up { id, tx: tx.clone() }))
        .await
        .is_err()
    {
        return;
    }
    let ping = Arc::new(PingState::default());
    let stop = match start_writer(id, &w, rx, Arc::clone(&ping), sh.s.writer_thread) {
        Ok(stop) => stop,
        Err(e) => {
            sh.note(format!("link {id}: cannot start its writer thread: {e}"));
            sh.active.store(false, Ordering::Release);
            let _ = sh
                .events
                .send(T::from(LinkEvent::Down {
                    id,
                    cause: ConnState::NetworkFailure,
                    reason: format!("cannot start the writer thread: {e}"),
                }))
                .await;
            return;
        }
    };
    // The writer thread holds its own descriptor of the socket; dropping
    // this half would shut the socket's sending side down under it.
    w.forget();
    let (cause, reason) = read_loop(&sh, id, &mut reader, &tx, &ping).await;
    drop(stop);
    sh.active.store(false, Ordering::Release);
    let _ = sh
        .events
        .send(T::from(LinkEvent::Down { id, cause, reason }))
        .await;
}

/// Start the link's writer, on the runtime or on a thread of its own
/// (`own_thread`), over its own descriptor of the socket. On its own thread
/// the send (on loopback the whole receive path of the peer's TCP stack
/// runs inside it) no longer sits between a protocol A write's local copy
/// and its NBD reply on the daemon's one runtime thread: A completes a
/// write once its frame is queued here, so the two proceed in parallel.
/// Protocols B and C wait for the peer anyway, and for them the hop to
/// another thread is one more wake-up on the write's path. Measured on two
/// vCPUs (4 KiB QD1 p50, `benches/replication-bench.sh`, binaries
/// alternated; docs/benchmarks.md): A/serve 1.17-1.49, median 1.26, over
/// 10 runs on the runtime, 0.90-1.46, median 1.14, over 13 on a thread;
/// C's p50 136-146 us on the runtime, 187-189 on a thread.
/// Dropping the returned sender stops the writer; a writer that stops on
/// its own shuts the socket down, so that the peer sees the end and, after
/// a failed send, the reader stops at once instead of at the ping timeout.
fn start_writer(
    id: u64,
    w: &tokio::net::tcp::OwnedWriteHalf,
    rx: mpsc::Receiver<Vec<Out>>,
    ping: Arc<PingState>,
    own_thread: bool,
) -> io::Result<tokio::sync::oneshot::Sender<()>> {
    use rustix::fd::AsFd;
    let fd = w.as_ref().as_fd().try_clone_to_owned()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Registered where it runs, so that waiting for room in the socket
    // does not depend on another runtime's reactor.
    let task = async move {
        let mut w = match TcpStream::from_std(std::net::TcpStream::from(fd)) {
            Ok(w) => w,
            Err(e) => {
                warn!("link {id}: cannot register the socket for sending: {e}");
                return;
            }
        };
        let ended = tokio::select! {
            _ = stop_rx => return,
            r = write_frames(&mut w, rx, ping) => r,
        };
        let how = match ended {
            Ok(()) => rustix::net::Shutdown::Write,
            Err(why) => {
                info!("link {id}: {why}");
                rustix::net::Shutdown::Both
            }
        };
        let _ = rustix::net::shutdown(&w, how);
    };
    if !own_thread {
        tokio::spawn(task);
        return Ok(stop_tx);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("tandem-link{id}-tx"))
        .spawn(move || {
            rt.block_on(task);
            // A `sendfile` still waiting on the blocking pool notices the
            // abandoned flag by itself; do not wait for it here.
            rt.shutdown_background();
        })?;
    Ok(stop_tx)
}

/// Send what the actor queues, in order, until the queue closes, a
/// `Disconnect` has gone out (the sending side is then shut down), or a
/// send fails (the error says which and why).
async fn write_frames(
    w: &mut TcpStream,
    mut rx: mpsc::Receiver<Vec<Out>>,
    ping: Arc<PingState>,
) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // Small frames are gathered into one buffer; a large payload is
    // written straight from the client's buffer after its header, so
    // it is not copied once more in user space.
    let mut next = rx.recv().await;
    while let Some(first) = next.take() {
        let mut batch = first;
        let mut closing = false;
        'gather: loop {
            ping.owed_frames(&mut buf);
            for out in batch.drain(..) {
                // An owed ping or ping ack goes at the next frame
                // boundary, ahead of the frames still queued.
                ping.owed_frames(&mut buf);
                let msg = match out {
                    Out::Frame(msg) => msg,
                    Out::Piped { msg, head, piped } => {
                        tandem_wire::encode_bulk_head(&msg, head.len() + piped.len(), &mut buf);
                        buf.extend_from_slice(&head);
                        if let Err(e) = send_with_pipes(w, &mut buf, piped).await {
                            return Err(format!("send failed: {e}"));
                        }
                        continue;
                    }
                    Out::File(mut f) => {
                        // Frames gathered ahead of it (acks, a replicated
                        // write) do not wait for its payload.
                        if f.fetching() && !buf.is_empty() {
                            if let Err(e) = w.write_all(&buf).await {
                                return Err(format!("send failed: {e}"));
                            }
                            buf.clear();
                        }
                        if let Some(piped) = f.take_piped().await {
                            tandem_wire::encode_bulk_head(&f.head, f.len, &mut buf);
                            let r = send_with_pipes(w, &mut buf, piped).await;
                            let failed = r.as_ref().err().map(|e| e.to_string());
                            // The disk was read already: whatever failed
                            // now is the link's.
                            f.finish(
                                r.map_err(|e| io::Error::new(io::ErrorKind::ConnectionAborted, e)),
                            );
                            if let Some(e) = failed {
                                return Err(format!("send failed: {e}"));
                            }
                            continue;
                        }
                        tandem_wire::encode_bulk_head(&f.head, f.len, &mut buf);
                        if let Err(e) = w.write_all(&buf).await {
                            return Err(format!("send failed: {e}"));
                        }
                        buf.clear();
                        let r = send_file_range(&*w, Arc::clone(&f.dev), f.offset, f.len).await;
                        let failed = r.as_ref().err().map(|e| e.to_string());
                        f.finish(r);
                        if let Some(e) = failed {
                            return Err(format!("sending resync data from the disk failed: {e}"));
                        }
                        continue;
                    }
                };
                closing = matches!(msg, Message::Disconnect { .. });
                let big = msg.payload().filter(|d| d.len() > 64 * 1024).cloned();
                match big {
                    Some(payload) => {
                        tandem_wire::encode_head(&msg, &mut buf);
                        if let Err(e) = w.write_all(&buf).await {
                            return Err(format!("send failed: {e}"));
                        }
                        buf.clear();
                        if let Err(e) = w.write_all(&payload).await {
                            return Err(format!("send failed: {e}"));
                        }
                    }
                    None => tandem_wire::encode(&msg, &mut buf),
                }
                if closing {
                    break 'gather;
                }
            }
            if buf.len() >= WRITE_BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(more) => batch = more,
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            if let Err(e) = w.write_all(&buf).await {
                return Err(format!("send failed: {e}"));
            }
            buf.clear();
        }
        if closing {
            let _ = w.shutdown().await;
            return Ok(());
        }
        next = rx.recv().await;
    }
    Ok(())
}

/// Send `buf` (a bulk frame's header and whatever precedes it) and then
/// the payload's rest from `piped`, and clear `buf`.
async fn send_with_pipes(w: &mut TcpStream, buf: &mut BytesMut, piped: Piped) -> io::Result<()> {
    // Held back for the payload's first segment; a payload with nothing
    // in its pipes (never made) must not leave the header corked.
    if !piped.is_empty() {
        pipes::send_more(&*w, buf).await?;
    } else {
        w.write_all(buf).await?;
    }
    buf.clear();
    pipes::splice_out(&*w, piped).await
}

async fn read_loop<T: From<LinkEvent> + Send + 'static>(
    sh: &Shared<T>,
    id: u64,
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    tx: &mpsc::Sender<Vec<Out>>,
    state: &PingState,
) -> (ConnState, String) {
    let mut ping = tokio::time::interval(sh.s.ping_int);
    ping.tick().await;
    let mut deadline: Option<tokio::time::Instant> = None;
    // Our ping is owed to the writer but not yet written: the peer cannot
    // answer it yet.
    let mut queued = false;
    // When the last frame from the peer arrived.
    let mut heard = tokio::time::Instant::now();
    // The peer's silence that ends the link while our ping waits to leave
    // (the writer may be stuck behind a full socket to a dead peer): what
    // the peer allows us in the middle of a frame.
    let backstop = sh.s.ping_int + sh.s.ping_timeout;
    loop {
        let wait_ping = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = reader.next_frame(SPLICE_MIN) => {
                let first = match m {
                    Ok(Some(Frame::Whole(msg))) => msg,
                    Ok(Some(Frame::Bulk { head, rest })) => {
                        // The rest of the frame is the peer's to send now. It
                        // may take long (a slow link, or a payload the peer
                        // reads from a slow disk as it sends), but a peer
                        // that sends nothing inside it for ping-int +
                        // ping-timeout is dead.
                        let event = match take_bulk(reader, head, rest, backstop).await {
                            Ok((msg, None)) => LinkEvent::Messages { id, msgs: vec![msg] },
                            Ok((msg, Some(piped))) => LinkEvent::Bulk { id, msg, piped },
                            Err(e) if e.kind() == io::ErrorKind::TimedOut => return (
                                ConnState::Timeout,
                                format!("the peer stopped sending in the middle of a frame for {backstop:?}"),
                            ),
                            Err(e) => return (ConnState::BrokenPipe, format!("receive failed: {e}")),
                        };
                        // The frame proves the peer alive when it ends: our
                        // ping may have left while it arrived, and the peer
                        // answers that ping only after the frame.
                        heard = tokio::time::Instant::now();
                        deadline = queued.then(|| heard + backstop);
                        if sh.events.send(T::from(event)).await.is_err() {
                            return (ConnState::Unconnected, "the resource is stopping".into());
                        }
                        continue;
                    }
                    Ok(None) => return (ConnState::BrokenPipe, "the peer closed the connection".into()),
                    Err(e) => return (ConnState::ProtocolError, format!("receive failed: {e}")),
                };
                // Any frame proves the peer alive.
                heard = tokio::time::Instant::now();
                deadline = queued.then(|| heard + backstop);
                // Every frame the same read brought in goes to the actor in
                // one event: one wake-up for many acks or writes.
                let mut msgs = Vec::new();
                let mut next = Some(first);
                let mut closing = false;
                while let Some(msg) = next.take() {
                    match msg {
                        Message::Ping => {
                            // Owed, not queued: frames already queued (a
                            // resync frame read from a cold disk can take
                            // a while) must not delay it past ping-timeout.
                            // The empty batch wakes an idle writer.
                            state.ack_owed.store(true, Ordering::Release);
                            let _ = tx.try_send(Vec::new());
                        }
                        msg => {
                            closing = matches!(msg, Message::Disconnect { .. });
                            msgs.push(msg);
                        }
                    }
                    if closing || msgs.len() >= BATCH_FRAMES {
                        break;
                    }
                    match reader.next_buffered() {
                        Ok(m) => next = m,
                        Err(e) => return (ConnState::ProtocolError, format!("receive failed: {e}")),
                    }
                }
                if msgs.is_empty() {
                    continue;
                }
                // A ping ack alone must not wait behind a full queue: the
                // actor's `timeout` counts from the last sign of life, and a
                // peer busy flushing still answers pings.
                let only_ping_ack = msgs.len() == 1 && matches!(msgs[0], Message::PingAck);
                if only_ping_ack {
                    let _ = sh.events.try_send(T::from(LinkEvent::Messages { id, msgs }));
                    continue;
                }
                if sh.events.send(T::from(LinkEvent::Messages { id, msgs })).await.is_err() || closing {
                    return (ConnState::Unconnected, "peer said goodbye".into());
                }
            },
            _ = ping.tick() => {
                if deadline.is_none() && !queued {
                    // Owed, not queued, as the peer's ping ack: it leaves at
                    // the writer's next frame boundary. The empty batch
                    // wakes an idle writer.
                    state.ping_owed.store(true, Ordering::Release);
                    let _ = tx.try_send(Vec::new());
                    queued = true;
                    deadline = Some(tokio::time::Instant::now() + backstop);
                }
            }
            // The answer is due ping-timeout after the ping left, not after
            // it waited for a frame this node is still sending; a frame
            // heard since it left answers it.
            _ = state.sent.notified(), if queued => {
                queued = false;
                let sent = state.sent_at.lock().ok().and_then(|t| *t);
                deadline = match sent {
                    Some(at) if heard < at => Some(at + sh.s.ping_timeout),
                    _ => None,
                };
            }
            _ = wait_ping => {
                let why = if queued {
                    format!("the peer sent nothing for {backstop:?} while our ping waited to be sent")
                } else {
                    format!("no ping answer within ping-timeout {:?}", sh.s.ping_timeout)
                };
                return (ConnState::Timeout, why);
            }
        }
    }
}

/// The ping exchange between a link's reader and its writer.
#[derive(Default)]
struct PingState {
    /// The peer pinged and is owed an answer.
    ack_owed: AtomicBool,
    /// Our ping is to go out.
    ping_owed: AtomicBool,
    /// When the writer put our last ping on the wire.
    sent_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The writer has sent our ping.
    sent: tokio::sync::Notify,
}

impl PingState {
    /// Put the owed ping and ping ack in `buf`, between two frames: it is
    /// written before anything else waits, on the disk or the socket.
    fn owed_frames(&self, buf: &mut BytesMut) {
        if self.ack_owed.load(Ordering::Relaxed) && self.ack_owed.swap(false, Ordering::AcqRel) {
            tandem_wire::encode(&Message::PingAck, buf);
        }
        if self.ping_owed.load(Ordering::Relaxed) && self.ping_owed.swap(false, Ordering::AcqRel) {
            tandem_wire::encode(&Message::Ping, buf);
            if let Ok(mut at) = self.sent_at.lock() {
                *at = Some(tokio::time::Instant::now());
            }
            self.sent.notify_one();
        }
    }
}

/// Take the `rest` bytes of a bulk frame's payload from the socket: into
/// pipes with `splice` (the part already read stays in memory and is
/// written first), else (no pipe to be had, or a payload that outgrows
/// [`MAX_CHAIN`] pipes) read into memory after the part already taken.
async fn take_bulk(
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    msg: Message,
    rest: usize,
    stall: Duration,
) -> io::Result<(Message, Option<Piped>)> {
    let total = msg.payload().map_or(0, |d| d.len()) + rest;
    let pipe_size = if total <= PIPE_MAX { total } else { 0 };
    take_bulk_via(reader, msg, rest, pipe_size, MAX_CHAIN, stall).await
}

/// [`take_bulk`] with a first pipe of `pipe_size` bytes and at most
/// `max_chain` pipes (tests use fewer and smaller ones, to see a payload
/// spread over pipes and one that outgrows them).
async fn take_bulk_via(
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    mut msg: Message,
    rest: usize,
    pipe_size: usize,
    max_chain: usize,
    stall: Duration,
) -> io::Result<(Message, Option<Piped>)> {
    if bulk_data(&mut msg).is_none() {
        return Err(io::Error::other("bulk frame without a payload"));
    }
    let sock: &TcpStream = reader.get_ref().as_ref();
    let (parts, spliced) = pipes::splice_in(sock, rest, pipe_size, max_chain, stall).await?;
    if spliced == rest && !parts.is_empty() {
        return Ok((msg, Some(Piped { parts })));
    }
    // In memory: the head, what the pipes hold, then the rest of the
    // socket.
    let head = bulk_data(&mut msg).map(std::mem::take).unwrap_or_default();
    let mut all = Piped { parts }.read_after(&head)?;
    let mut at = all.len();
    all.resize(head.len() + rest, 0);
    while at < all.len() {
        match stalled(stall, reader.get_mut().read(&mut all[at..])).await?? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => at += n,
        }
    }
    if let Some(data) = bulk_data(&mut msg) {
        *data = bytes::Bytes::from(all);
    }
    Ok((msg, None))
}

/// The payload of a `Data` or `RsData` message.
pub fn bulk_data(msg: &mut Message) -> Option<&mut bytes::Bytes> {
    match msg {
        Message::Data { data, .. } | Message::RsData { data, .. } => Some(data),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(me: &str, peer: &str, mine: u16, theirs: u16) -> LinkSettings {
        LinkSettings {
            resource: "r0".into(),
            me: me.into(),
            peer: peer.into(),
            my_address: format!("127.0.0.1:{mine}"),
            peer_address: format!("127.0.0.1:{theirs}"),
            secret: b"s".to_vec(),
            connect_int: Duration::from_millis(30),
            ping_int: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(5),
            stagger: false,
            writer_thread: false,
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Start the links of alpha (its writer on a thread if `alpha_thread`)
    /// and beta towards each other; their events, alpha's first. Sending
    /// `true` stops both.
    fn start_pair(alpha_thread: bool) -> (watch::Sender<bool>, Vec<mpsc::Receiver<LinkEvent>>) {
        let (pa, pb) = (free_port(), free_port());
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut rxs = Vec::new();
        for (me, peer, mine, theirs) in [("alpha", "beta", pa, pb), ("beta", "alpha", pb, pa)] {
            let (tx, rx) = mpsc::channel::<LinkEvent>(64);
            rxs.push(rx);
            let mut s = settings(me, peer, mine, theirs);
            s.writer_thread = alpha_thread && me == "alpha";
            tokio::spawn(run(s, tx, Arc::new(AtomicBool::new(true)), stop_rx.clone()));
        }
        (stop_tx, rxs)
    }

    /// Wait (at most 5 s) until both links of a [`start_pair`] are up;
    /// alpha's writer queue.
    async fn both_up(
        rxs: &mut [mpsc::Receiver<LinkEvent>],
        own_thread: bool,
    ) -> mpsc::Sender<Vec<Out>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut alpha_tx = None;
        let mut beta_up = false;
        loop {
            if beta_up {
                if let Some(tx) = alpha_tx.take() {
                    return tx;
                }
            }
            let (a, b) = rxs.split_at_mut(1);
            tokio::select! {
                Some(LinkEvent::Up { tx, .. }) = a[0].recv() => alpha_tx = Some(tx),
                Some(LinkEvent::Up { .. }) = b[0].recv() => beta_up = true,
                _ = tokio::time::sleep_until(deadline) => panic!("thread {own_thread}: no link came up"),
            }
        }
    }

    /// Both nodes connect at the same moment, again and again: each ends up
    /// with exactly one link and keeps it (a mismatch would close both).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crossing_connections_settle_on_one_link() {
        for round in 0..4 {
            let (stop_tx, mut rxs) = start_pair(false);
            let mut ups = [0, 0];
            let mut downs = [0, 0];
            let mut keep = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
            loop {
                let (a, b) = rxs.split_at_mut(1);
                let ev = tokio::select! {
                    e = a[0].recv() => e.map(|e| (0, e)),
                    e = b[0].recv() => e.map(|e| (1, e)),
                    _ = tokio::time::sleep_until(deadline) => None,
                };
                let Some((i, ev)) = ev else { break };
                match ev {
                    LinkEvent::Up { tx, .. } => {
                        ups[i] += 1;
                        keep.push(tx);
                    }
                    LinkEvent::Down { reason, .. } => {
                        downs[i] += 1;
                        eprintln!("round {round}: node {i} lost a link: {reason}");
                    }
                    LinkEvent::Messages { .. } | LinkEvent::Bulk { .. } => {}
                }
            }
            let _ = stop_tx.send(true);
            assert_eq!(downs, [0, 0], "round {round}: a kept link was closed");
            assert_eq!(ups, [1, 1], "round {round}: each node keeps one link");
        }
    }

    /// Frames queued on one node arrive at the other in order, whether the
    /// writer runs on the runtime or on its own thread (protocol A), and a
    /// `Disconnect` takes both nodes' links down at once, not at the ping
    /// timeout: the writer shuts the socket's sending side down after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_arrive_in_order_and_disconnect_ends_both_links() {
        for own_thread in [false, true] {
            let (stop_tx, mut rxs) = start_pair(own_thread);
            let within = |secs| tokio::time::Instant::now() + Duration::from_secs(secs);
            let alpha_tx = both_up(&mut rxs, own_thread).await;
            const N: u64 = 5_000;
            let sender = tokio::spawn(async move {
                for first in (0..N).step_by(50) {
                    let batch = (first..first + 50)
                        .map(|epoch| {
                            Out::Frame(Message::Barrier {
                                epoch,
                                flush: false,
                            })
                        })
                        .collect();
                    alpha_tx
                        .send(batch)
                        .await
                        .expect("alpha's writer queue closed while its link was up");
                }
                alpha_tx
                    .send(vec![Out::Frame(Message::Disconnect {
                        reason: "test over".into(),
                    })])
                    .await
                    .expect("alpha's writer queue closed before the Disconnect");
                alpha_tx
            });
            let mut next = 0;
            let mut disconnected = false;
            let mut downs = [None, None];
            let deadline = within(3);
            while downs.iter().any(Option::is_none) {
                let (a, b) = rxs.split_at_mut(1);
                let (i, ev) = tokio::select! {
                    Some(e) = a[0].recv() => (0, e),
                    Some(e) = b[0].recv() => (1, e),
                    _ = tokio::time::sleep_until(deadline) => {
                        panic!("thread {own_thread}: links still up after the Disconnect: {downs:?}, {next} frames arrived")
                    }
                };
                match ev {
                    LinkEvent::Messages { msgs, .. } if i == 1 => {
                        for m in msgs {
                            match m {
                                Message::Barrier { epoch, .. } => {
                                    assert_eq!(epoch, next, "thread {own_thread}: out of order");
                                    next += 1;
                                }
                                Message::Disconnect { .. } if next == N => disconnected = true,
                                other => panic!("thread {own_thread}: unexpected {}", other.name()),
                            }
                        }
                    }
                    LinkEvent::Down { reason, .. } => downs[i] = Some(reason),
                    _ => {}
                }
            }
            assert_eq!(next, N, "thread {own_thread}: frames lost");
            assert!(disconnected, "thread {own_thread}: the Disconnect was lost");
            let _keep_queue_open = sender.await.expect("the sending task failed");
            let _ = stop_tx.send(true);
        }
    }

    /// A send that fails (here a payload whose pipe holds less than its
    /// frame announced) takes the link down on both nodes at once: the
    /// writer shuts the socket down, so the peer hears of it and both
    /// readers end, instead of each waiting for its ping timeout while the
    /// socket stays open with nothing more coming.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_send_ends_both_links_at_once() {
        // Its pipe is not to be had while another test holds every one.
        let _slots = bulk_tests::SLOTS.lock().await;
        for own_thread in [false, true] {
            let (stop_tx, mut rxs) = start_pair(own_thread);
            let alpha_tx = both_up(&mut rxs, own_thread).await;
            let pipe = tandem_blockdev::pipes::new_pipe(tandem_blockdev::pipes::DEFAULT_PIPE)
                .expect("a pipe for the test");
            rustix::io::write(pipe.writer(), &[9u8; 100]).expect("fill the pipe");
            let short = Out::Piped {
                msg: Message::Data {
                    seq: 1,
                    epoch: 1,
                    offset: 0,
                    fua: false,
                    crc: None,
                    data: bytes::Bytes::new(),
                },
                head: bytes::Bytes::new(),
                piped: Piped {
                    parts: vec![tandem_blockdev::pipes::PipePart { pipe, len: 5000 }],
                },
            };
            alpha_tx
                .send(vec![short])
                .await
                .expect("alpha's writer queue closed while its link was up");
            // Well inside ping-int + ping-timeout (10 s), which is when a
            // reader left running would notice.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            let mut downs = [false, false];
            while !(downs[0] && downs[1]) {
                let (a, b) = rxs.split_at_mut(1);
                tokio::select! {
                    Some(LinkEvent::Down { .. }) = a[0].recv() => downs[0] = true,
                    Some(LinkEvent::Down { .. }) = b[0].recv() => downs[1] = true,
                    _ = tokio::time::sleep_until(deadline) => {
                        panic!("thread {own_thread}: links still up after a failed send (down: {downs:?})")
                    }
                }
            }
            drop(alpha_tx);
            let _ = stop_tx.send(true);
        }
    }
}

#[cfg(test)]
mod bulk_tests {
    use super::*;
    use bytes::Bytes;
    use tandem_blockdev::pipes::{PipeSlot, MAX_PIPES, PAGE};

    /// A stall limit no test's healthy sender comes near.
    const LONG: Duration = Duration::from_secs(30);

    /// Pipe slots are counted per process, and one test takes them all:
    /// under `cargo test` (one process, tests in parallel) the tests that
    /// take slots run one at a time.
    pub(super) static SLOTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn pattern(n: usize, seed: u8) -> Bytes {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    /// An `RsData` frame of `data`, then a `Ping`, encoded.
    fn rs_data_then_ping(id: u64, data: &Bytes) -> BytesMut {
        let mut buf = BytesMut::new();
        tandem_wire::encode(
            &Message::RsData {
                id,
                offset: 0,
                data: data.clone(),
            },
            &mut buf,
        );
        tandem_wire::encode(&Message::Ping, &mut buf);
        buf
    }

    /// Append what `piped`'s pipes hold to `all`; how many pipes it had.
    fn read_piped(all: &mut Vec<u8>, piped: Piped) -> usize {
        let pipes = piped.into_pipes();
        let n = pipes.len();
        for p in pipes {
            let start = all.len();
            all.resize(start + p.len, 0);
            tandem_blockdev::read_pipe_exact(p.pipe.reader(), &mut all[start..])
                .unwrap_or_else(|e| panic!("reading a payload pipe: {e}"));
        }
        n
    }

    /// Large payloads arrive byte for byte whether they go through a pipe
    /// or (when the pipe fills early, as with a peer dribbling small
    /// segments) through memory, and the frames after them stay in step.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_payloads_arrive_whole_through_a_pipe_or_memory() {
        let _slots = SLOTS.lock().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // (payload size, bytes per write call): whole frames, then 1000-byte
        // segments with Nagle off.
        let cases = [
            (600_000, usize::MAX),
            (SPLICE_MIN, usize::MAX),
            (300_000, 1000),
            (3 << 20, usize::MAX),
            // More pipe slots than a pipe-max-size pipe has (a slot per
            // segment): the overflow goes into a second pipe.
            (PIPE_MAX, 4000),
        ];
        let sender = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            for (i, &(n, chunk)) in cases.iter().enumerate() {
                let msg = if i % 2 == 0 {
                    Message::Data {
                        seq: i as u64,
                        epoch: 1,
                        offset: 0,
                        fua: false,
                        crc: None,
                        data: pattern(n, i as u8),
                    }
                } else {
                    Message::RsData {
                        id: i as u64,
                        offset: 0,
                        data: pattern(n, i as u8),
                    }
                };
                let mut buf = BytesMut::new();
                tandem_wire::encode(&msg, &mut buf);
                tandem_wire::encode(&Message::Ping, &mut buf);
                for part in buf.chunks(chunk) {
                    s.write_all(part).await.unwrap();
                    if chunk < 4096 {
                        tokio::task::yield_now().await;
                    }
                }
            }
            s
        });
        let (sock, _) = listener.accept().await.unwrap();
        let (rd, _wr) = sock.into_split();
        let mut reader = FrameReader::new(rd);
        let mut piped_cases = 0;
        for (i, &(n, _)) in cases.iter().enumerate() {
            let (head, rest) = match reader.next_frame(SPLICE_MIN).await.unwrap() {
                Some(Frame::Bulk { head, rest }) => (head, rest),
                other => panic!("case {i}: expected a bulk frame, got {other:?}"),
            };
            let (mut msg, piped) = take_bulk(&mut reader, head, rest, LONG).await.unwrap();
            let mut all = bulk_data(&mut msg).unwrap().to_vec();
            eprintln!(
                "case {i}: {n} bytes, {}",
                if piped.is_some() { "piped" } else { "read" }
            );
            assert!(
                piped.is_some() || n != PIPE_MAX,
                "case {i}: a 1 MiB payload in small segments must still be piped"
            );
            if let Some(p) = piped {
                piped_cases += 1;
                read_piped(&mut all, p);
            }
            assert_eq!(all.len(), n, "case {i}: payload length");
            assert!(all == pattern(n, i as u8), "case {i}: payload bytes differ");
            match reader.next_frame(SPLICE_MIN).await.unwrap() {
                Some(Frame::Whole(Message::Ping)) => {}
                other => panic!("case {i}: expected the Ping after the payload, got {other:?}"),
            }
        }
        // The 3 MiB payload does not fit a default-size pipe and is read;
        // the whole 600 KiB frame fits one and is spliced.
        assert!(piped_cases >= 1, "no payload went through a pipe");
        let mut s = sender.await.unwrap();
        // A payload larger than its first pipe can hold (one slot: a slot
        // holds one fragment, and TCP may coalesce segments into
        // fragments of up to 32 KiB, never 600 KB): it fills that pipe and
        // continues in the next ones, bytes in order.
        let data = pattern(600_000, 8);
        let buf = rs_data_then_ping(8, &data);
        let late = tokio::spawn(async move {
            for part in buf.chunks(4000) {
                s.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            s
        });
        let Some(Frame::Bulk { head, rest }) = reader.next_frame(SPLICE_MIN).await.unwrap() else {
            panic!("expected a bulk frame");
        };
        let (mut msg, piped) = take_bulk_via(&mut reader, head, rest, PAGE, MAX_CHAIN, LONG)
            .await
            .unwrap();
        let mut all = bulk_data(&mut msg).unwrap().to_vec();
        let pipes = read_piped(&mut all, piped.expect("spread over pipes"));
        assert!(pipes >= 2, "600 KB cannot fit a one-slot pipe");
        assert!(all == data, "payload spread over pipes differs");
        assert!(matches!(
            reader.next_frame(SPLICE_MIN).await.unwrap(),
            Some(Frame::Whole(Message::Ping))
        ));
        let mut s = late.await.unwrap();
        // A payload that fills all the pipes it may take before it is
        // complete: what they hold and the rest of the socket are read into
        // memory.
        // One pipe of 32 slots takes at most 4 MiB even of 64 KiB segments.
        let data = pattern(8 << 20, 9);
        let buf = rs_data_then_ping(9, &data);
        // From another task: 4 MiB may not fit the socket buffers.
        let late = tokio::spawn(async move {
            s.write_all(&buf).await.unwrap();
            s
        });
        let Some(Frame::Bulk { head, rest }) = reader.next_frame(SPLICE_MIN).await.unwrap() else {
            panic!("expected a bulk frame");
        };
        let (mut msg, piped) = take_bulk_via(&mut reader, head, rest, 128 * 1024, 1, LONG)
            .await
            .unwrap();
        assert!(
            piped.is_none(),
            "a payload larger than its pipe must come back in memory"
        );
        assert!(
            bulk_data(&mut msg).unwrap() == &data,
            "spilled payload bytes differ"
        );
        assert!(matches!(
            reader.next_frame(SPLICE_MIN).await.unwrap(),
            Some(Frame::Whole(Message::Ping))
        ));
        let mut s = late.await.unwrap();
        // With every pipe slot taken, a payload is read into memory.
        let held: Vec<PipeSlot> = std::iter::from_fn(PipeSlot::take).collect();
        assert_eq!(held.len(), MAX_PIPES);
        let data = pattern(600_000, 11);
        let mut buf = BytesMut::new();
        tandem_wire::encode(
            &Message::RsData {
                id: 11,
                offset: 0,
                data: data.clone(),
            },
            &mut buf,
        );
        let late = tokio::spawn(async move {
            s.write_all(&buf).await.unwrap();
            s
        });
        let Some(Frame::Bulk { head, rest }) = reader.next_frame(SPLICE_MIN).await.unwrap() else {
            panic!("expected a bulk frame");
        };
        let (mut msg, piped) = take_bulk(&mut reader, head, rest, LONG).await.unwrap();
        assert!(piped.is_none(), "no pipe beyond MAX_PIPES");
        assert!(bulk_data(&mut msg).unwrap() == &data);
        drop(held);
        assert!(PipeSlot::take().is_some(), "slots come back when released");
        drop(late.await.unwrap());
    }

    /// A payload that trickles in for longer than the stall limit is taken
    /// whole as long as bytes keep coming (a slow link, or a peer reading
    /// it from a slow disk as it sends); a sender silent for the whole
    /// limit in the middle of it is reported as timed out, through a pipe
    /// and through memory alike.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_payload_arrives_and_a_stalled_one_times_out() {
        let _slots = SLOTS.lock().await;
        let stall = Duration::from_millis(300);
        for (case, pipe_size) in [("pipe", PIPE_MAX), ("memory", 0)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let data = pattern(256 * 1024, 3);
            let buf = rs_data_then_ping(3, &data);
            let sender = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                // 8 pieces 100 ms apart: 700 ms in all, never 300 ms silent.
                for part in buf.chunks(buf.len().div_ceil(8)) {
                    s.write_all(part).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // A second frame that stops halfway for longer than the limit.
                let buf = rs_data_then_ping(4, &pattern(256 * 1024, 4));
                s.write_all(&buf[..buf.len() / 2]).await.unwrap();
                tokio::time::sleep(stall * 3).await;
                s
            });
            let (sock, _) = listener.accept().await.unwrap();
            let (rd, _wr) = sock.into_split();
            let mut reader = FrameReader::new(rd);
            let start = tokio::time::Instant::now();
            let Some(Frame::Bulk { head, rest }) = reader.next_frame(SPLICE_MIN).await.unwrap()
            else {
                panic!("{case}: expected a bulk frame");
            };
            let (mut msg, piped) =
                take_bulk_via(&mut reader, head, rest, pipe_size, MAX_CHAIN, stall)
                    .await
                    .unwrap_or_else(|e| panic!("{case}: a steady slow payload failed: {e}"));
            assert!(
                start.elapsed() > stall,
                "{case}: the payload came too fast to test anything"
            );
            let mut all = bulk_data(&mut msg).unwrap().to_vec();
            assert_eq!(piped.is_some(), pipe_size > 0, "{case}: the path taken");
            if let Some(p) = piped {
                read_piped(&mut all, p);
            }
            assert!(all == data, "{case}: payload bytes differ");
            assert!(matches!(
                reader.next_frame(SPLICE_MIN).await.unwrap(),
                Some(Frame::Whole(Message::Ping))
            ));
            let Some(Frame::Bulk { head, rest }) = reader.next_frame(SPLICE_MIN).await.unwrap()
            else {
                panic!("{case}: expected the second bulk frame");
            };
            match take_bulk_via(&mut reader, head, rest, pipe_size, MAX_CHAIN, stall).await {
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{case}: {e}"),
                Ok(_) => panic!("{case}: a payload that stopped halfway was taken"),
            }
            drop(sender.await.unwrap());
        }
    }
}
