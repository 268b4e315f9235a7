//! The async NBD server: listeners, one task per connection, pipelined
//! requests with out-of-order replies, graceful shutdown.
//!
//! Each connection is served by a single task that owns both halves of the
//! socket. Requests are parsed from a read buffer, dispatched to the device as
//! futures polled together (so replies go out in completion order), and the
//! replies are gathered into vectored writes. Keeping one task per connection
//! means a request that the device completes inline costs no thread hand-off
//! at all — the same single wake-up per request a thread-per-request server
//! pays, without the lock traffic.

use crate::codec::{encode_reply, Decoder, Frame, Op, Outcome, Session, REQUEST_HEADER_LEN};
use crate::handshake::{Export, Handshake, Progress};
use crate::proto::{cmd, Errno};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rustix::net::RecvFlags;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_blockdev::{pipes, BlockDevice};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Limits and identity of one served export.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Export name ("" is always accepted too).
    pub export_name: String,
    /// Export description.
    pub description: Option<String>,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests in flight per connection (including replies not yet sent).
    pub max_inflight: usize,
    /// Payload bytes in flight per connection (reads and writes together).
    pub max_inflight_bytes: usize,
    /// A client must finish the handshake within this time.
    pub handshake_timeout: Duration,
    /// After shutdown begins, how long a drained connection stays open to
    /// answer late requests with ESHUTDOWN before it is closed.
    pub shutdown_linger: Duration,
    /// Asked at each handshake: `Some(reason)` refuses the export.
    pub gate: Option<Gate>,
    /// Longest busy-poll of an idle connection before its task blocks; zero
    /// never polls. See [`IdlePoll`].
    pub idle_poll: Duration,
}

/// Decides per connection whether the export may be used now.
#[derive(Clone)]
pub struct Gate(pub Arc<dyn Fn() -> Option<String> + Send + Sync>);

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            description: None,
            max_connections: 64,
            // The Linux client queues up to 128 requests per connection.
            max_inflight: 128,
            max_inflight_bytes: 256 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
            shutdown_linger: Duration::from_millis(500),
            gate: None,
            idle_poll: DEFAULT_IDLE_POLL,
        }
    }
}

/// Long enough to cover a QD1 client's turnaround on an otherwise idle
/// machine (fio's nbd engine: 20–30 µs), short enough that a missed guess
/// costs little.
pub const DEFAULT_IDLE_POLL: Duration = Duration::from_micros(50);

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// TCP `host:port`.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parse `HOST:PORT` or `unix:/path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("expected a socket path after \"unix:\"".into());
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Self::Tcp(s.to_string()))
            }
            _ => Err(format!(
                "{s:?} is not HOST:PORT (e.g. 127.0.0.1:10809) or unix:/path"
            )),
        }
    }
}

/// A bound listener.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket; the file is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind `addr`. A stale Unix socket file (nobody listening) is replaced;
    /// a live one is an error.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Self::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(p) => {
                if p.exists() {
                    if std::os::unix::net::UnixStream::connect(p).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running server", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?;
                }
                Ok(Self::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// The address actually bound, in the `--listen` syntax.
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Live counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    clients: AtomicUsize,
}

impl ServerStats {
    /// Clients connected right now (past the handshake or in it).
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }
}

/// Serve `device` on `listener` until `shutdown` becomes true; then stop
/// accepting, let every connection drain, and return.
pub async fn serve<D: BlockDevice>(
    device: Arc<D>,
    config: ServerConfig,
    listener: Listener,
    mut shutdown: watch::Receiver<bool>,
    stats: Arc<ServerStats>,
) -> io::Result<()> {
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut tasks = JoinSet::new();
    let unix_path = match &listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            // A dropped sender means nobody can stop us any more: stop now.
            r = shutdown.changed() => if r.is_err() { break } else { continue },
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            r = shutdown.changed() => if r.is_err() { break } else { continue },
            // Reap finished connection tasks so the set stays small.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let device = Arc::clone(&device);
        let config = Arc::clone(&config);
        let shutdown = shutdown.clone();
        let stats = Arc::clone(&stats);
        tasks.spawn(async move {
            stats.clients.fetch_add(1, Ordering::Relaxed);
            info!(%peer, "client connected");
            let r = match stream {
                Stream::Tcp(s) => {
                    let (r, w) = s.into_split();
                    let r = Polled(r);
                    connection(&*device, &config, r, w, shutdown).await
                }
                Stream::Unix(s) => {
                    let (r, w) = s.into_split();
                    let r = Polled(r);
                    connection(&*device, &config, r, w, shutdown).await
                }
            };
            match r {
                Ok(()) => info!(%peer, "client disconnected"),
                Err(e) => warn!(%peer, "connection closed: {e}"),
            }
            stats.clients.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    if let Some(p) = unix_path {
        let _ = std::fs::remove_file(&p);
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            // Replies are latency-critical and already batched by us.
            s.set_nodelay(true)?;
            Ok((Stream::Tcp(s), a.to_string()))
        }
        Listener::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), p.display().to_string()))
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Handshake violation.
    #[error("handshake: {0}")]
    Handshake(#[from] crate::handshake::HandshakeError),
    /// Transmission violation.
    #[error("{0}")]
    Decode(#[from] crate::codec::DecodeError),
    /// The client took too long to negotiate.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    /// The client vanished in the middle of a request.
    #[error("client disconnected in the middle of a request ({0} bytes of it received)")]
    Truncated(usize),
}

/// Serve one client: handshake, then transmission.
pub async fn connection<D, R, W>(
    device: &D,
    config: &ServerConfig,
    mut r: R,
    mut w: W,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    D: BlockDevice,
    R: AsyncRead + TryRecv + Unpin,
    W: AsyncWrite + Unpin,
{
    let caps = device.capabilities();
    let export = Export {
        name: config.export_name.clone(),
        description: config.description.clone(),
        size: device.size(),
        caps,
        unavailable: config.gate.as_ref().and_then(|g| (g.0)()),
    };
    let mut out = BytesMut::with_capacity(512);
    let mut input = BytesMut::with_capacity(64 * 1024);
    let mut hs = Handshake::new(export, &mut out);
    let deadline = Instant::now() + config.handshake_timeout;
    let mut linger: Option<Instant> = None;
    let negotiated = loop {
        if !out.is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
        let n = tokio::select! {
            n = r.read_buf(&mut input) => n?,
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ConnError::HandshakeTimeout(config.handshake_timeout))
            }
            _ = shutdown.changed(), if linger.is_none() => {
                hs.set_shutting_down();
                linger = Some(Instant::now() + config.shutdown_linger);
                continue;
            }
            _ = sleep_until_opt(linger) => return Ok(()),
        };
        if n == 0 {
            // Clients that only list exports or probe may just hang up.
            return Ok(());
        }
        match hs.feed(&mut input, &mut out)? {
            Progress::NeedMore => {}
            Progress::Aborted => {
                w.write_all(&out).await?;
                let _ = w.shutdown().await;
                return Ok(());
            }
            Progress::Done(n) => {
                w.write_all(&out).await?;
                out.clear();
                break n;
            }
        }
    };
    let session = Session {
        size: device.size(),
        transmission_flags: negotiated.transmission_flags,
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation,
        max_payload: caps.block_sizes.maximum_payload,
    };
    debug!(?negotiated, "transmission phase");
    transmission(device, config, session, input, r, w, shutdown).await
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

type OpFuture<'a> = Pin<Box<dyn Future<Output = (u64, usize, Outcome)> + Send + 'a>>;

/// Replies waiting to be written, as a list of byte chunks for writev.
struct OutQueue {
    /// Small reply headers accumulate here contiguously.
    head: BytesMut,
    chunks: VecDeque<Bytes>,
    bytes: usize,
}

/// Most iovecs handed to one writev.
const MAX_IOV: usize = 64;

impl OutQueue {
    fn new() -> Self {
        Self {
            head: BytesMut::with_capacity(16 * 1024),
            chunks: VecDeque::new(),
            bytes: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn push(&mut self, structured: bool, cookie: u64, outcome: Outcome) {
        let before = self.head.len();
        let data = encode_reply(&mut self.head, structured, cookie, outcome);
        self.bytes += self.head.len() - before;
        if let Some(data) = data {
            self.chunks.push_back(self.head.split().freeze());
            self.bytes += data.len();
            self.chunks.push_back(data);
        }
    }

    /// One vectored write; cancel-safe (nothing is consumed until it returns).
    async fn write_some<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        if !self.head.is_empty() {
            self.chunks.push_back(self.head.split().freeze());
        }
        let n = {
            let iov: Vec<IoSlice<'_>> = self
                .chunks
                .iter()
                .take(MAX_IOV)
                .map(|c| IoSlice::new(c))
                .collect();
            w.write_vectored(&iov).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.bytes -= n;
        let mut left = n;
        while left > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(left);
                left = 0;
            }
        }
        Ok(())
    }
}

/// Read-buffer growth step: enough for a burst of small requests or a
/// good slice of a large write.
const READ_CHUNK: usize = 256 * 1024;

async fn transmission<D, R, W>(
    device: &D,
    config: &ServerConfig,
    session: Session,
    mut rbuf: BytesMut,
    mut r: R,
    mut w: W,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    D: BlockDevice,
    R: AsyncRead + TryRecv + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut decoder = Decoder::new(session.max_payload);
    if device.takes_pipes() && r.splice_socket().is_some() {
        // Larger payloads than a pipe holds are rare and read as before.
        decoder.set_bulk(pipes::SPLICE_MIN..=pipes::PIPE_MAX);
    }
    let mut inflight: FuturesUnordered<OpFuture<'_>> = FuturesUnordered::new();
    let mut inflight_bytes = 0usize;
    // After a spliced write the next request is likely another: reading
    // only its header leaves its whole payload in the socket to splice,
    // where a full read would copy up to READ_CHUNK of it through memory
    // (and from there into the page cache and the peer's socket).
    let mut header_only = false;
    let mut out = OutQueue::new();
    let mut eof = false;
    let mut disconnecting = false;
    let mut shutting_down = *shutdown.borrow();
    let mut linger: Option<Instant> =
        shutting_down.then(|| Instant::now() + config.shutdown_linger);
    let mut poll = IdlePoll::new(config.idle_poll);
    // When the task blocked with nothing in flight: the wait that follows
    // is what the poller learns from.
    let mut idle_since: Option<std::time::Instant> = None;

    loop {
        // Parse and dispatch while there is room. Replies not yet written
        // count against the limits too, so a client that never reads its
        // replies cannot make us buffer without bound.
        while !disconnecting
            && inflight.len() < config.max_inflight
            && inflight_bytes + out.bytes < config.max_inflight_bytes
        {
            let Some(frame) = decoder.decode(&mut rbuf)? else {
                break;
            };
            // A flush between large writes keeps the next one spliced whole.
            header_only = match &frame {
                Frame::Bulk { .. } => true,
                Frame::Request { header, .. } => header_only && header.typ == cmd::FLUSH,
                Frame::Oversized(_) => false,
            };
            let (header, payload) = match frame {
                Frame::Request { header, payload } => (header, payload),
                Frame::Oversized(header) => {
                    out.push(
                        session.structured,
                        header.cookie,
                        Outcome::Error(Errno::Inval),
                    );
                    continue;
                }
                Frame::Bulk {
                    header,
                    raw,
                    head,
                    rest,
                } => {
                    let Some(sock) = r.splice_socket() else {
                        return Err(
                            io::Error::other("a bulk write without a socket to splice").into()
                        );
                    };
                    // The payload's rest goes from the socket into pipes
                    // while replies keep going out and shutdown is heard.
                    let taken = {
                        let fut = pipes::splice_in(sock, rest, rest, pipes::MAX_CHAIN, BULK_STALL);
                        tokio::pin!(fut);
                        loop {
                            tokio::select! {
                                biased;
                                t = &mut fut => break Some(t),
                                Some((cookie, cost, outcome)) = inflight.next(), if !inflight.is_empty() => {
                                    inflight_bytes -= cost;
                                    out.push(session.structured, cookie, outcome);
                                }
                                res = out.write_some(&mut w), if !out.is_empty() => res?,
                                _ = shutdown.changed(), if !shutting_down => {
                                    shutting_down = true;
                                    linger = Some(Instant::now() + config.shutdown_linger);
                                }
                                _ = sleep_until_opt(linger), if linger.is_some() => break None,
                            }
                        }
                    };
                    let (parts, spliced) = match taken {
                        None => {
                            debug!("closing connection after shutdown linger, in the middle of a write");
                            return Ok(());
                        }
                        Some(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            return Err(ConnError::Truncated(REQUEST_HEADER_LEN + head.len()))
                        }
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(t)) => t,
                    };
                    let piped = pipes::Piped { parts };
                    if spliced < rest {
                        // Out of pipes: the request goes back into the
                        // buffer to be read the ordinary way.
                        rbuf.extend_from_slice(&raw);
                        rbuf.extend_from_slice(&piped.read_after(&head)?);
                        decoder.skip_bulk_once();
                        continue;
                    }
                    let op = match session.validate(&header, None) {
                        Ok(_) if shutting_down => Err(Errno::Shutdown),
                        other => other,
                    };
                    match op {
                        Ok(Op::Write { offset, fua, .. }) => {
                            let cost = (header.length as usize).max(REQUEST_HEADER_LEN);
                            inflight_bytes += cost;
                            inflight.push(run_piped(
                                device,
                                header.cookie,
                                cost,
                                offset,
                                head,
                                piped,
                                fua,
                            ));
                            poll.requests += 1;
                        }
                        Ok(_) => out.push(
                            session.structured,
                            header.cookie,
                            Outcome::Error(Errno::Inval),
                        ),
                        Err(e) => out.push(session.structured, header.cookie, Outcome::Error(e)),
                    }
                    continue;
                }
            };
            let op = match session.validate(&header, payload) {
                Ok(Op::Disconnect) => {
                    disconnecting = true;
                    break;
                }
                Ok(_) if shutting_down => Err(Errno::Shutdown),
                other => other,
            };
            match op {
                Err(e) => out.push(session.structured, header.cookie, Outcome::Error(e)),
                Ok(op) => {
                    let cost = op_bytes(&op);
                    inflight_bytes += cost;
                    inflight.push(run(device, header.cookie, cost, op));
                    poll.requests += 1;
                }
            }
        }

        if (eof || disconnecting) && inflight.is_empty() && out.is_empty() {
            if eof && !rbuf.is_empty() && !disconnecting {
                return Err(ConnError::Truncated(rbuf.len()));
            }
            return Ok(());
        }

        let room = inflight.len() < config.max_inflight
            && inflight_bytes + out.bytes < config.max_inflight_bytes;
        let want_read = !eof && !disconnecting && room;
        if want_read {
            let want = decoder.wanted(&rbuf).max(READ_CHUNK.min(64 * 1024));
            if rbuf.capacity() - rbuf.len() < want {
                rbuf.reserve(want.max(READ_CHUNK));
            }
        }

        let read_limit = if header_only && rbuf.len() < REQUEST_HEADER_LEN {
            REQUEST_HEADER_LEN - rbuf.len()
        } else {
            usize::MAX
        };
        let idle = want_read && inflight.is_empty() && out.is_empty() && !shutting_down;
        if idle {
            match poll.spin(&r, &mut rbuf, read_limit) {
                Some(Ok(0)) => {
                    eof = true;
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => idle_since = Some(std::time::Instant::now()),
            }
        }

        let mut into = (&mut rbuf).limit(read_limit);
        tokio::select! {
            biased;
            Some((cookie, cost, outcome)) = inflight.next(), if !inflight.is_empty() => {
                inflight_bytes -= cost;
                out.push(session.structured, cookie, outcome);
            }
            res = out.write_some(&mut w), if !out.is_empty() => {
                res?;
                if out.is_empty() {
                    poll.replied_at = std::time::Instant::now();
                }
            }
            res = r.read_buf(&mut into), if want_read => {
                if let Some(t) = idle_since.take() {
                    poll.blocked_for(t.elapsed());
                }
                if res? == 0 {
                    eof = true;
                }
            }
            _ = shutdown.changed(), if !shutting_down => {
                shutting_down = true;
                linger = Some(Instant::now() + config.shutdown_linger);
            }
            _ = sleep_until_opt(linger), if linger.is_some() => {
                if inflight.is_empty() && out.is_empty() {
                    debug!("closing connection after shutdown linger");
                    return Ok(());
                }
                // Keep draining; check again shortly.
                linger = Some(Instant::now() + Duration::from_millis(50));
            }
        }
    }
}

/// A socket read half the idle poller can try without blocking. It goes
/// around tokio's readiness tracking on purpose: tokio only retries the
/// system call after its reactor has seen a readiness edge, and the reactor
/// does not run while this task spins.
pub trait TryRecv {
    /// The socket large write payloads are spliced from.
    type Sock: pipes::SpliceSocket;

    /// Receive at most `limit` bytes into `buf`'s spare capacity;
    /// `WouldBlock` when nothing is queued, `Ok(0)` at end of stream.
    fn try_recv(&self, buf: &mut BytesMut, limit: usize) -> io::Result<usize>;

    /// The socket to splice large write payloads from, if there is one.
    fn splice_socket(&self) -> Option<&Self::Sock>;
}

/// How long a client may send nothing in the middle of a large write's
/// payload before the connection fails: as long as it likes, as with any
/// other request (shutdown still ends the wait).
const BULK_STALL: Duration = Duration::from_secs(24 * 3600);

/// A tokio read half with [`TryRecv`].
pub struct Polled<T>(pub T);

impl TryRecv for Polled<tokio::net::tcp::OwnedReadHalf> {
    type Sock = tokio::net::TcpStream;

    fn try_recv(&self, buf: &mut BytesMut, limit: usize) -> io::Result<usize> {
        recv_now(self.0.as_ref(), buf, limit)
    }

    fn splice_socket(&self) -> Option<&Self::Sock> {
        Some(self.0.as_ref())
    }
}

impl TryRecv for Polled<tokio::net::unix::OwnedReadHalf> {
    type Sock = tokio::net::UnixStream;

    fn try_recv(&self, buf: &mut BytesMut, limit: usize) -> io::Result<usize> {
        recv_now(self.0.as_ref(), buf, limit)
    }

    fn splice_socket(&self) -> Option<&Self::Sock> {
        Some(self.0.as_ref())
    }
}

fn recv_now(fd: impl AsFd, buf: &mut BytesMut, limit: usize) -> io::Result<usize> {
    let len = buf.len();
    let spare = buf.spare_capacity_mut();
    let room = spare.len().min(limit);
    let ((got, _), _) = rustix::net::recv(fd, &mut spare[..room], RecvFlags::DONTWAIT)?;
    let n = got.len();
    // SAFETY: recv initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(len + n) };
    Ok(n)
}

impl<T: AsyncRead + Unpin> AsyncRead for Polled<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

/// Adaptive busy-polling of an idle connection, in the manner of KVM's halt
/// polling. A QD1 client sends its next request a few tens of microseconds
/// after our reply; if this task blocks in the meantime, its vCPU goes idle
/// and waking it again costs more than the request itself (see "QD1
/// latency" in docs/benchmarks.md). So a connection that has just gone
/// idle first spins for a short window. The window grows (to the configured
/// maximum) while blocking waits stay short, and drops to zero after a long
/// wait, so an idle or slow client costs no CPU. Only a connection that
/// goes idle after every single request polls: a client with more requests
/// in flight keeps the task busy anyway, and polling between its bursts
/// takes CPU time it needs (measured: −17 % IOPS at QD32 on two vCPUs).
///
/// A client can also look like QD1 to us while it is not waiting for us:
/// fio at QD32 against a fast server sends its requests one at a time, each
/// independent of our last reply. Polling then catches every request within
/// a few microseconds and serves it alone, where blocking would have let a
/// batch gather (fewer, larger reads and writes on both sides; the same
/// −17 %). A QD1 client cannot answer that fast, because its next request
/// needs our reply first, so a majority of quick catches turns polling off
/// for a while.
struct IdlePoll {
    window: Duration,
    max: Duration,
    /// Requests dispatched since the connection was last idle.
    requests: u32,
    /// Whether the current idle period follows a single request, so its
    /// length says something about a QD1 client's turnaround.
    lone: bool,
    /// Moving share of polls that caught a request quickly, in 1/1024.
    quick_share: u32,
    /// Idle periods left before polling may start again.
    cooldown: u32,
    /// When the last reply left: a catch is timed from here, not from the
    /// start of polling, so that time this task spent descheduled (say,
    /// while the client ran on this CPU) does not count as quick.
    replied_at: std::time::Instant,
}

/// A request caught sooner than this after our last reply left was on its
/// way before that reply reached the client. Measured here: a QD1 fio's next
/// request comes 14–30 µs after our reply (1 % within 8 µs); at QD32, 75 %
/// come within 8 µs.
const POLL_QUICK: Duration = Duration::from_micros(8);

/// Idle periods polling stays off after a run of quick catches: long enough
/// that the probing in between costs little, short enough (a few tens of
/// milliseconds at these rates) to notice a client changing its pattern.
const POLL_COOLDOWN: u32 = 512;

/// A blocking wait at most this long means the client is turning requests
/// around quickly and polling would have caught the next one (the wait
/// includes the cost of the wake-up that polling saves).
const POLL_WORTH_IT: Duration = Duration::from_micros(200);

/// The first window after polling was off.
const POLL_START: Duration = Duration::from_micros(10);

impl IdlePoll {
    fn new(max: Duration) -> Self {
        Self {
            window: Duration::ZERO,
            max,
            requests: 0,
            lone: false,
            quick_share: 0,
            cooldown: 0,
            replied_at: std::time::Instant::now(),
        }
    }

    /// Spin for the current window; `None` if nothing arrived.
    fn spin<R: TryRecv>(
        &mut self,
        r: &R,
        buf: &mut BytesMut,
        limit: usize,
    ) -> Option<io::Result<usize>> {
        self.lone = self.requests <= 1;
        self.requests = 0;
        if self.cooldown > 0 {
            self.cooldown -= 1;
            self.lone = false;
            return None;
        }
        if self.window.is_zero() || !self.lone {
            return None;
        }
        if buf.capacity() == buf.len() {
            buf.reserve(READ_CHUNK);
        }
        let start = std::time::Instant::now();
        loop {
            match r.try_recv(buf, limit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => {
                    self.caught(self.replied_at.elapsed());
                    return Some(other);
                }
            }
            if start.elapsed() >= self.window {
                return None;
            }
            std::hint::spin_loop();
        }
    }

    fn caught(&mut self, after: Duration) {
        // The share of quick catches, in 1/1024, as a moving average over
        // about the last 16: a QD1 client has the odd quick one too.
        let quick = if after < POLL_QUICK { 1024 / 16 } else { 0 };
        self.quick_share = self.quick_share - self.quick_share / 16 + quick;
        if self.quick_share > 768 {
            self.window = Duration::ZERO;
            self.cooldown = POLL_COOLDOWN;
            self.quick_share = 0;
        }
    }

    /// The task blocked for `waited` before the next request arrived.
    fn blocked_for(&mut self, waited: Duration) {
        if !self.lone {
            return;
        }
        self.window = if waited + self.window <= POLL_WORTH_IT {
            (self.window * 2).max(POLL_START).min(self.max)
        } else {
            Duration::ZERO
        };
    }
}

/// Payload bytes an operation holds while in flight.
fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Read { length, .. } => *length as usize,
        Op::Write { data, .. } => data.len(),
        _ => 0,
    }
    .max(REQUEST_HEADER_LEN)
}

/// Most extents in one block-status reply: bounds the reply size while
/// still describing a fragmented file in useful detail.
const MAX_EXTENTS: usize = 1024;

fn run<D: BlockDevice>(device: &D, cookie: u64, cost: usize, op: Op) -> OpFuture<'_> {
    Box::pin(async move {
        let result = match op {
            Op::Read { offset, length } => device
                .read(offset, length as usize)
                .await
                .map(|data| Outcome::Data { offset, data }),
            Op::Write { offset, data, fua } => device
                .write(offset, data, fua)
                .await
                .map(|()| Outcome::Done),
            Op::Flush => device.flush().await.map(|()| Outcome::Done),
            Op::Trim {
                offset,
                length,
                fua,
            } => device
                .trim(offset, length as u64, fua)
                .await
                .map(|()| Outcome::Done),
            Op::WriteZeroes {
                offset,
                length,
                flags,
            } => device
                .write_zeroes(offset, length as u64, flags)
                .await
                .map(|()| Outcome::Done),
            Op::Cache { offset, length } => device
                .cache(offset, length as u64)
                .await
                .map(|()| Outcome::Done),
            Op::BlockStatus {
                offset,
                length,
                req_one,
            } => {
                let max = if req_one { 1 } else { MAX_EXTENTS };
                device
                    .block_status(offset, length as u64, max)
                    .await
                    .map(|mut extents| {
                        // Descriptors must be non-empty and, with REQ_ONE,
                        // within the request; a device that returned nothing
                        // gets the safe answer "all data".
                        extents.retain(|e| e.length > 0);
                        extents.truncate(max);
                        if extents.is_empty() {
                            extents.push(tandem_blockdev::Extent {
                                length: length as u64,
                                hole: false,
                                zero: false,
                            });
                        }
                        for e in &mut extents {
                            e.length = e.length.min(length as u64);
                        }
                        Outcome::Extents(extents)
                    })
            }
            Op::Disconnect => Ok(Outcome::Done),
        };
        (cookie, cost, outcome_of(result))
    })
}

/// A WRITE whose payload (after `head`) waits in pipes.
fn run_piped<D: BlockDevice>(
    device: &D,
    cookie: u64,
    cost: usize,
    offset: u64,
    head: Bytes,
    piped: pipes::Piped,
    fua: bool,
) -> OpFuture<'_> {
    Box::pin(async move {
        let result = device.write_piped(offset, head, piped, fua).await;
        (cookie, cost, outcome_of(result.map(|()| Outcome::Done)))
    })
}

/// The reply to a request that ended with `result`.
fn outcome_of(result: io::Result<Outcome>) -> Outcome {
    result.unwrap_or_else(|e| {
        let errno = Errno::from_io(&e);
        if errno == Errno::Io {
            warn!("I/O error: {e}");
        }
        Outcome::Error(errno)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A socket whose next request is queued after `ready` empty polls.
    struct Arrives {
        ready: Cell<u32>,
    }

    impl TryRecv for Arrives {
        type Sock = tokio::net::TcpStream;

        fn splice_socket(&self) -> Option<&Self::Sock> {
            None
        }

        fn try_recv(&self, buf: &mut BytesMut, _limit: usize) -> io::Result<usize> {
            match self.ready.get() {
                0 => {
                    buf.extend_from_slice(&[0; REQUEST_HEADER_LEN]);
                    Ok(REQUEST_HEADER_LEN)
                }
                n => {
                    self.ready.set(n - 1);
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }
        }
    }

    fn never() -> Arrives {
        Arrives {
            ready: Cell::new(u32::MAX),
        }
    }

    /// One request, then the connection idles: what a QD1 client does.
    fn idle_after_one(p: &mut IdlePoll, r: &Arrives, buf: &mut BytesMut) -> bool {
        p.requests += 1;
        p.spin(r, buf, usize::MAX).is_some()
    }

    #[test]
    fn polling_starts_only_after_short_waits_and_stops_after_a_long_one() {
        let mut p = IdlePoll::new(Duration::from_micros(50));
        let mut buf = BytesMut::new();
        // Off at first: the first idle period blocks.
        assert!(!idle_after_one(&mut p, &never(), &mut buf));
        p.blocked_for(Duration::from_micros(60));
        assert_eq!(p.window, POLL_START);
        for _ in 0..4 {
            assert!(!idle_after_one(&mut p, &never(), &mut buf));
            p.blocked_for(Duration::from_micros(60));
        }
        assert_eq!(p.window, Duration::from_micros(50), "grows to the maximum");
        // A client that went quiet: one long wait turns polling off.
        assert!(!idle_after_one(&mut p, &never(), &mut buf));
        p.blocked_for(Duration::from_millis(5));
        assert_eq!(p.window, Duration::ZERO);
    }

    #[test]
    fn a_request_arriving_within_the_window_is_caught_without_blocking() {
        let mut p = IdlePoll::new(Duration::from_millis(100));
        p.window = Duration::from_millis(100);
        p.replied_at = std::time::Instant::now() - Duration::from_micros(30);
        let mut buf = BytesMut::new();
        let r = Arrives {
            ready: Cell::new(50),
        };
        assert_eq!(
            idle_after_one(&mut p, &r, &mut buf).then(|| buf.len()),
            Some(REQUEST_HEADER_LEN)
        );
        assert_eq!(
            p.window,
            Duration::from_millis(100),
            "a slow catch keeps polling on"
        );
    }

    #[test]
    fn zero_maximum_never_polls() {
        let mut p = IdlePoll::new(Duration::ZERO);
        let mut buf = BytesMut::new();
        for _ in 0..10 {
            let r = Arrives {
                ready: Cell::new(0),
            };
            assert!(!idle_after_one(&mut p, &r, &mut buf));
            p.blocked_for(Duration::from_micros(1));
        }
        assert_eq!(buf.len(), 0, "the socket was never read by the poller");
    }

    #[test]
    fn a_busier_client_is_not_polled() {
        let mut p = IdlePoll::new(Duration::from_micros(50));
        p.window = Duration::from_micros(50);
        let mut buf = BytesMut::new();
        p.requests = 5;
        let r = Arrives {
            ready: Cell::new(0),
        };
        assert!(
            p.spin(&r, &mut buf, usize::MAX).is_none(),
            "five requests before going idle"
        );
        p.blocked_for(Duration::from_micros(1));
        assert_eq!(
            p.window,
            Duration::from_micros(50),
            "and nothing learnt from it"
        );
    }

    #[test]
    fn requests_that_were_already_on_their_way_turn_polling_off_for_a_while() {
        let mut p = IdlePoll::new(Duration::from_micros(50));
        p.window = Duration::from_micros(50);
        let mut buf = BytesMut::new();
        let mut caught = 0;
        // Each request is there right after our reply: the client did not
        // wait for it (fio at QD32 against a fast server).
        for _ in 0..100 {
            p.replied_at = std::time::Instant::now();
            let r = Arrives {
                ready: Cell::new(0),
            };
            if idle_after_one(&mut p, &r, &mut buf) {
                caught += 1;
            } else {
                break;
            }
        }
        assert!(caught < 100, "polling never stopped");
        assert_eq!(p.window, Duration::ZERO);
        // The cooldown (its first idle period was the one that ended the
        // loop above): even short waits do not start polling again...
        for _ in 1..POLL_COOLDOWN {
            let r = Arrives {
                ready: Cell::new(0),
            };
            assert!(!idle_after_one(&mut p, &r, &mut buf));
            p.blocked_for(Duration::from_micros(1));
        }
        // ...until it is over.
        assert!(!idle_after_one(&mut p, &never(), &mut buf));
        p.blocked_for(Duration::from_micros(1));
        assert_eq!(p.window, POLL_START);
    }

    /// A file that takes large payloads in pipes, as the replicated
    /// device does, noting how many bytes of each came in memory.
    struct PipeTaker(tandem_blockdev::FileDevice, std::sync::Mutex<Vec<usize>>);

    impl PipeTaker {
        fn open(path: &std::path::Path) -> Self {
            let opts = tandem_blockdev::FileOptions::default();
            let file = tandem_blockdev::FileDevice::open(path, &opts).expect("open the test file");
            PipeTaker(file, Default::default())
        }

        fn heads(&self) -> Vec<usize> {
            self.1.lock().map(|h| h.clone()).unwrap_or_default()
        }
    }

    impl BlockDevice for PipeTaker {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn capabilities(&self) -> tandem_blockdev::Capabilities {
            self.0.capabilities()
        }
        async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
            self.0.read(offset, len).await
        }
        async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
            self.0.write(offset, data, fua).await
        }
        async fn flush(&self) -> io::Result<()> {
            self.0.flush().await
        }
        async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
            self.0.trim(offset, len, fua).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            flags: tandem_blockdev::ZeroFlags,
        ) -> io::Result<()> {
            self.0.write_zeroes(offset, len, flags).await
        }
        async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
            self.0.cache(offset, len).await
        }
        async fn block_status(
            &self,
            offset: u64,
            len: u64,
            max: usize,
        ) -> io::Result<Vec<tandem_blockdev::Extent>> {
            self.0.block_status(offset, len, max).await
        }
        fn takes_pipes(&self) -> bool {
            true
        }
        async fn write_piped(
            &self,
            offset: u64,
            head: Bytes,
            piped: pipes::Piped,
            fua: bool,
        ) -> io::Result<()> {
            if let Ok(mut h) = self.1.lock() {
                h.push(head.len());
            }
            self.0.write_piped(offset, head, piped, fua).await
        }
    }

    /// A bare NBD client on `sock`: fixed newstyle, `NBD_OPT_EXPORT_NAME`.
    async fn nbd_client(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.set_nodelay(true).unwrap();
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
        // FIXED_NEWSTYLE | NO_ZEROES, then the export-name option ("").
        c.write_all(&3u32.to_be_bytes()).await.unwrap();
        c.write_all(b"IHAVEOPT").await.unwrap();
        c.write_all(&1u32.to_be_bytes()).await.unwrap();
        c.write_all(&0u32.to_be_bytes()).await.unwrap();
        let mut info = [0u8; 10];
        c.read_exact(&mut info).await.unwrap();
        c
    }

    fn request(typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut r = Vec::with_capacity(REQUEST_HEADER_LEN);
        r.extend_from_slice(&crate::proto::REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&typ.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    }

    /// The next simple reply's (cookie, error).
    async fn reply(c: &mut tokio::net::TcpStream) -> (u64, u32) {
        let mut r = [0u8; 16];
        c.read_exact(&mut r).await.unwrap();
        // Fixed-length slices of a 16-byte array: the conversions cannot fail.
        (
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
        )
    }

    /// Large writes to a device that takes pipes arrive byte for byte:
    /// spliced whole, spliced while the payload trickles in, and, with
    /// every pipe of the process taken, put back and read the ordinary
    /// way; small requests around them stay in step.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_writes_arrive_whole_through_pipes_or_memory() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(8 << 20).unwrap();
        let device = PipeTaker::open(file.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, w) = sock.into_split();
            connection(&device, &ServerConfig::default(), Polled(r), w, stop_rx).await
        });
        let mut c = nbd_client(addr).await;
        let mut expected = vec![0u8; 8 << 20];
        // (offset, length, bytes per send, with every pipe taken)
        let cases: [(u64, usize, usize, bool); 4] = [
            (0, 1 << 20, usize::MAX, false),
            (3 << 20, 600_000, 50_000, false),
            (5 << 20, 512 * 1024, 100_000, true),
            (6 << 20, 200_000, usize::MAX, false),
        ];
        for (i, &(offset, len, piece, starve)) in cases.iter().enumerate() {
            let held: Vec<pipes::PipeSlot> = if starve {
                std::iter::from_fn(pipes::PipeSlot::take).collect()
            } else {
                Vec::new()
            };
            let data: Vec<u8> = (0..len)
                .map(|j| (j as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ i as u8)
                .collect();
            expected[offset as usize..offset as usize + len].copy_from_slice(&data);
            let mut msg = request(1, i as u64, offset, len as u32);
            msg.extend_from_slice(&data);
            // A small request right behind the large one.
            msg.extend_from_slice(&request(3, 100 + i as u64, 0, 0));
            for part in msg.chunks(piece) {
                c.write_all(part).await.unwrap();
                if piece != usize::MAX {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            // A flush covers only the writes already answered, so the
            // server may answer it before the write still in flight.
            let mut answers = [reply(&mut c).await, reply(&mut c).await];
            answers.sort();
            assert_eq!(
                answers,
                [(i as u64, 0), (100 + i as u64, 0)],
                "case {i}: the write and the flush behind it, as (cookie, error)"
            );
            drop(held);
        }
        c.write_all(&request(0, 7, 0, 8 << 20)).await.unwrap();
        assert_eq!(reply(&mut c).await, (7, 0));
        let mut got = vec![0u8; 8 << 20];
        c.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "the export reads back differently");
        c.write_all(&request(2, 8, 0, 0)).await.unwrap();
        server.await.unwrap().unwrap();
        assert!(
            std::fs::read(file.path()).unwrap() == expected,
            "the file differs"
        );
    }

    /// Large writes queued back to back (a flush among them): after the
    /// first, the server reads only each request's header and leaves the
    /// whole payload in the socket to splice, none of it copied through
    /// memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn back_to_back_large_writes_leave_their_payloads_in_the_socket() {
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        file.as_file().set_len(2 << 20).expect("size the file");
        let device = std::sync::Arc::new(PipeTaker::open(file.path()));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen on loopback");
        let addr = listener.local_addr().expect("the listener's address");
        let (_stop, stop_rx) = watch::channel(false);
        let dev = std::sync::Arc::clone(&device);
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.expect("the client connects");
            let (r, w) = sock.into_split();
            connection(&*dev, &ServerConfig::default(), Polled(r), w, stop_rx).await
        });
        let mut c = nbd_client(addr).await;
        let len = 512 * 1024;
        let mut expected = Vec::with_capacity(4 * len);
        let mut msg = Vec::new();
        for i in 0..4u64 {
            let data: Vec<u8> = (0..len).map(|j| (j % 251) as u8 ^ (i as u8 * 37)).collect();
            msg.extend_from_slice(&request(1, i, i * len as u64, len as u32));
            msg.extend_from_slice(&data);
            expected.extend_from_slice(&data);
            if i == 1 {
                // A flush among them changes nothing.
                msg.extend_from_slice(&request(3, 4, 0, 0));
            }
        }
        c.write_all(&msg).await.expect("send the writes");
        let mut cookies: Vec<u64> = Vec::new();
        for _ in 0..5 {
            let (cookie, err) = reply(&mut c).await;
            assert_eq!(err, 0, "write {cookie} failed");
            cookies.push(cookie);
        }
        cookies.sort();
        assert_eq!(cookies, [0, 1, 2, 3, 4]);
        c.write_all(&request(2, 9, 0, 0))
            .await
            .expect("send the disconnect");
        server
            .await
            .expect("the server task")
            .expect("the connection ends cleanly");
        let heads = device.heads();
        assert_eq!(heads.len(), 4, "every write took the pipe path: {heads:?}");
        assert_eq!(
            heads[1..],
            [0, 0, 0],
            "payload bytes read into memory behind the first write: {heads:?}"
        );
        assert!(
            std::fs::read(file.path()).expect("read the file back") == expected,
            "the file differs"
        );
    }
}
