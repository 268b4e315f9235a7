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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::ConnState;
use tandem_wire::{FrameReader, HandshakeConfig, Message};
use tokio::io::AsyncWriteExt;
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
        tx: mpsc::Sender<Vec<Message>>,
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
}

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
    let (tx, mut rx) = mpsc::channel::<Vec<Message>>(SEND_QUEUE);
    if sh
        .events
        .send(T::from(LinkEvent::Up { id, tx: tx.clone() }))
        .await
        .is_err()
    {
        return;
    }
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        // Small frames are gathered into one buffer; a large payload is
        // written straight from the client's buffer after its header, so
        // it is not copied once more in user space.
        let mut next = rx.recv().await;
        while let Some(first) = next.take() {
            let mut batch = first;
            let mut closing = false;
            'gather: loop {
                for msg in batch.drain(..) {
                    closing = matches!(msg, Message::Disconnect { .. });
                    let big = msg.payload().filter(|d| d.len() > 64 * 1024).cloned();
                    match big {
                        Some(payload) => {
                            tandem_wire::encode_head(&msg, &mut buf);
                            if let Err(e) = w.write_all(&buf).await {
                                return format!("send failed: {e}");
                            }
                            buf.clear();
                            if let Err(e) = w.write_all(&payload).await {
                                return format!("send failed: {e}");
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
                    return format!("send failed: {e}");
                }
                buf.clear();
            }
            if closing {
                let _ = w.shutdown().await;
                return "closed by this node".into();
            }
            next = rx.recv().await;
        }
        "closed by this node".into()
    });
    let (cause, reason) = read_loop(&sh, id, &mut reader, &tx).await;
    writer.abort();
    sh.active.store(false, Ordering::Release);
    let _ = sh
        .events
        .send(T::from(LinkEvent::Down { id, cause, reason }))
        .await;
}

async fn read_loop<T: From<LinkEvent> + Send + 'static>(
    sh: &Shared<T>,
    id: u64,
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    tx: &mpsc::Sender<Vec<Message>>,
) -> (ConnState, String) {
    let mut ping = tokio::time::interval(sh.s.ping_int);
    ping.tick().await;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let wait_ping = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = reader.next() => {
                let first = match m {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return (ConnState::BrokenPipe, "the peer closed the connection".into()),
                    Err(e) => return (ConnState::ProtocolError, format!("receive failed: {e}")),
                };
                // Any frame proves the peer alive.
                deadline = None;
                // Every frame the same read brought in goes to the actor in
                // one event: one wake-up for many acks or writes.
                let mut msgs = Vec::new();
                let mut next = Some(first);
                let mut closing = false;
                while let Some(msg) = next.take() {
                    match msg {
                        Message::Ping => {
                            let _ = tx.try_send(vec![Message::PingAck]);
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
                if deadline.is_none() && tx.try_send(vec![Message::Ping]).is_ok() {
                    deadline = Some(tokio::time::Instant::now() + sh.s.ping_timeout);
                }
            }
            _ = wait_ping => {
                return (
                    ConnState::Timeout,
                    format!("no ping answer within ping-timeout {:?}", sh.s.ping_timeout),
                );
            }
        }
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
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Both nodes connect at the same moment, again and again: each ends up
    /// with exactly one link and keeps it (a mismatch would close both).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crossing_connections_settle_on_one_link() {
        for round in 0..4 {
            let (pa, pb) = (free_port(), free_port());
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut rxs = Vec::new();
            for (me, peer, mine, theirs) in [("alpha", "beta", pa, pb), ("beta", "alpha", pb, pa)] {
                let (tx, rx) = mpsc::channel::<LinkEvent>(64);
                rxs.push(rx);
                tokio::spawn(run(
                    settings(me, peer, mine, theirs),
                    tx,
                    Arc::new(AtomicBool::new(true)),
                    stop_rx.clone(),
                ));
            }
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
                    LinkEvent::Messages { .. } => {}
                }
            }
            let _ = stop_tx.send(true);
            assert_eq!(downs, [0, 0], "round {round}: a kept link was closed");
            assert_eq!(ups, [1, 1], "round {round}: each node keeps one link");
        }
    }
}
