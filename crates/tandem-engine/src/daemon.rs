//! The resource daemon: one actor task owns the [`Core`], the metadata and
//! the bookkeeping of payloads; everything else (NBD connections, local
//! I/O, the peer link, the control socket) talks to it through one bounded
//! channel.
//!
//! Why one actor: the core is a single state machine, and serialising its
//! inputs is what makes its decisions reproducible in the simulation. The
//! expensive parts — copying payloads, disk I/O, the network — run outside
//! it, so the actor only moves small messages.

use crate::control::{self, Request, Response, MAX_LINE};
use crate::link::{self, LinkEvent, LinkSettings};
use bytes::Bytes;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tandem_blockdev::{BlockDevice, Capabilities, Extent, FileDevice, FileOptions, ZeroFlags};
use tandem_config::{MetaDisk, ResourceConfig};
use tandem_core::{
    fmt_gens, Action, Attached, ConnState, Core, DiskState, Event, IoErrorPolicy, IoFailure, OpId,
    Packet, Protocol, ReqId, Role, WriteKind,
};
use tandem_meta::{FileIo, Metadata, Placement};
use tandem_nbd::{Gate, ListenAddr, Listener, ServerConfig, ServerStats};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{error, info, warn};

/// Inputs of the actor. Bounded: NBD connections wait when it is full.
const INPUT_QUEUE: usize = 4096;
/// Buffered writes up to this size run on the actor itself.
const INLINE_WRITE_MAX: usize = 64 * 1024;
/// Payload bytes the actor gathers for the link before handing them on
/// (with at most [`crate::link::BATCH_FRAMES`] frames): enough to make one
/// write call of many small frames, small enough not to delay big ones.
const OUTBOX_BYTES: usize = 1 << 20;
/// Event lines kept for slow `events` readers before they lose some.
const EVENT_BACKLOG: usize = 1024;
/// An HA script demotes right after its NBD client went away, but that
/// client's writes can still be in the pipeline (its connection ends at
/// once; what it submitted finishes on both nodes), and the server counts a
/// connection until it has closed. `secondary` and `down` wait this long
/// for both before refusing, so a switch-over does not fail in that window
/// (a client that stays connected is refused after the wait).
const CLIENTS_GONE_GRACE: Duration = Duration::from_secs(1);

/// What `run` needs.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The resource.
    pub cfg: ResourceConfig,
    /// This node's name.
    pub node: String,
    /// Control socket and pid file directory.
    pub run_dir: PathBuf,
}

/// A client operation from the NBD frontend.
enum ClientOp {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// A large write whose payload (after `head`) waits in pipes.
    WritePiped {
        offset: u64,
        head: Bytes,
        piped: link::Piped,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
    Flush,
}

impl From<LinkEvent> for Input {
    fn from(ev: LinkEvent) -> Self {
        Input::Link(ev)
    }
}

enum Input {
    Client(ClientOp, oneshot::Sender<io::Result<()>>),
    /// A local read for the peer finished (its bytes are kept for `RsData`).
    ReadDone(OpId, io::Result<Bytes>),
    /// A resync read went to the peer straight from the disk (`len` bytes).
    RsSent(OpId, u64, io::Result<()>),
    /// A digest read for verify finished.
    Digests(OpId, Option<Vec<u32>>),
    Core(Event),
    Link(LinkEvent),
    Admin(Request, oneshot::Sender<Response>),
    Subscribe(oneshot::Sender<(Vec<String>, broadcast::Receiver<String>)>),
    Tick,
}

/// Role, peer role, cstate, disk, peer disk.
type StateKey = (Role, Role, ConnState, DiskState, DiskState);

/// Shared with the NBD gate and the control socket without asking the actor.
#[derive(Default)]
struct Shared {
    primary: AtomicBool,
    /// An NBD read happened since the last tick (the dynamic resync
    /// controller counts reads, which bypass the actor).
    app_read: AtomicBool,
    stopping: AtomicBool,
}

/// The replicated device the NBD server serves.
struct Replicated {
    size: u64,
    /// The local disk; empty while detached. Reads only happen on the
    /// Primary, which cannot detach, but the slot lets `detach` close the
    /// file and `attach` open another.
    local: DiskSlot,
    /// What the device advertised at start (fixed for the NBD server).
    caps: Capabilities,
    tx: mpsc::Sender<Input>,
    shared: Arc<Shared>,
    /// Large payloads may stay in pipes: no per-write crc is computed
    /// over them (`data-integrity-alg`).
    takes_pipes: bool,
}

/// The local disk, shared between the actor and the NBD frontend.
type DiskSlot = Arc<std::sync::RwLock<Option<Arc<FileDevice>>>>;

fn payload(data: Bytes, piped: Option<link::Piped>) -> Payload {
    match piped {
        Some(p) => Payload::Piped(data, p),
        None => Payload::Mem(data),
    }
}

fn disk_of(slot: &DiskSlot) -> io::Result<Arc<FileDevice>> {
    slot.read()
        .ok()
        .and_then(|g| g.clone())
        .ok_or_else(|| io::Error::other("no local disk (detached)"))
}

impl Replicated {
    async fn submit(&self, op: ClientOp) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Client(op, tx))
            .await
            .map_err(|_| io::Error::other("resource is shutting down"))?;
        rx.await
            .map_err(|_| io::Error::other("resource is shutting down"))?
    }
}

impl BlockDevice for Replicated {
    fn size(&self) -> u64 {
        self.size
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = self.caps;
        // Zeroing must happen identically on both nodes; "fast only" would
        // need the peer's answer before ours.
        c.fast_zero = false;
        c.multi_conn = true;
        c
    }
    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        // Load first: a store on every read would bounce the cache line.
        if !self.shared.app_read.load(Ordering::Relaxed) {
            self.shared.app_read.store(true, Ordering::Relaxed);
        }
        disk_of(&self.local)?.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.submit(ClientOp::Write { offset, data, fua }).await
    }
    fn takes_pipes(&self) -> bool {
        self.takes_pipes
    }
    /// The payload stays in its pipes: `tee` gives the link and the local
    /// disk each their own view of the same pages, so its bytes are never
    /// copied through user space here (the page cache's copy is the one
    /// left).
    async fn write_piped(
        &self,
        offset: u64,
        head: Bytes,
        piped: link::Piped,
        fua: bool,
    ) -> io::Result<()> {
        self.submit(ClientOp::WritePiped {
            offset,
            head,
            piped,
            fua,
        })
        .await
    }
    async fn flush(&self) -> io::Result<()> {
        self.submit(ClientOp::Flush).await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        for (offset, len) in chunks(offset, len) {
            self.submit(ClientOp::Trim { offset, len, fua }).await?;
        }
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if flags.fast_only {
            return Err(io::Error::from_raw_os_error(libc_enotsup()));
        }
        for (offset, len) in chunks(offset, len) {
            self.submit(ClientOp::Zero {
                offset,
                len,
                may_trim: flags.may_trim,
                fua: flags.fua,
            })
            .await?;
        }
        Ok(())
    }
    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        disk_of(&self.local)?.cache(offset, len).await
    }
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        disk_of(&self.local)?
            .block_status(offset, len, max_extents)
            .await
    }
}

/// Trims and zeroing can name the whole device (mkfs discards it all); one
/// activity-log transaction covers at most 64 extents of 4 MiB, so they go
/// through the pipeline in pieces that never span more than 33.
const MAX_RANGE: u64 = 128 << 20;

fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = (end - at).min(MAX_RANGE);
        let piece = (at, n);
        at += n;
        Some(piece)
    })
}

/// Every write payload is a fresh buffer of up to 32 MiB. Above glibc's
/// mmap threshold each one would be a new mapping, faulted in and zeroed
/// page by page, then unmapped; keeping them in the heap makes them reuse
/// memory that is already mapped (measured: page faults and page clearing
/// were a tenth of the daemon's time on 1 MiB writes).
pub fn keep_payload_buffers() {
    // SAFETY: mallopt only changes allocator tuning; called before the
    // runtime's threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Payloads in flight hold pipes, two descriptors each (up to
/// `pipes::MAX_PIPES`, plus the spare ones), besides the sockets and the
/// disks: the soft limit of 1024 that service managers set by default is
/// too close, so it is raised to the hard limit, as a service may.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current.is_some() && lim.maximum.is_some() && lim.current < lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(
                "cannot raise the open files limit from {:?}: {e}",
                lim.current
            );
        }
    }
}

fn libc_enotsup() -> i32 {
    rustix::io::Errno::NOTSUP.raw_os_error()
}

/// Run the resource in the foreground until SIGTERM/SIGINT or `down`.
/// `ready` is called once the control socket accepts commands.
pub fn run(opts: DaemonOptions, ready: impl FnOnce() + Send + 'static) -> Result<(), String> {
    keep_payload_buffers();
    raise_open_files_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // One worker by default: the core is one actor, and with the NBD
    // connections and the link's tasks on the same thread a request's
    // hand-offs are wake-ups on that thread, not across CPUs. Measured on
    // two vCPUs (a pair, protocol A): QD1 write p50 46-48 -> 32-38 us and
    // 4 KiB QD32 35-38k -> 55-61k IOPS. Disk I/O runs on the blocking pool
    // and activity-log transactions move the worker off with
    // `block_in_place`, so neither holds it. TOKIO_WORKER_THREADS overrides.
    let workers = match std::env::var("TOKIO_WORKER_THREADS") {
        Err(_) => 1,
        Ok(v) if v.is_empty() => 1,
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "TOKIO_WORKER_THREADS: expected a number of threads above zero, found {v:?}"
                ))
            }
        },
    };
    let runtime = builder
        .worker_threads(workers)
        .enable_all()
        .thread_name("tandem")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(run_async(opts, ready))
}

async fn run_async(opts: DaemonOptions, ready: impl FnOnce()) -> Result<(), String> {
    let cfg = &opts.cfg;
    let res = cfg.name.clone();
    let me = cfg.node(&opts.node).map_err(|e| e.to_string())?.clone();
    let peer = cfg.peer_of(&opts.node).map_err(|e| e.to_string())?.clone();
    let secret = cfg.net.shared_secret.clone().ok_or_else(|| {
        format!(
            "{}: net.shared-secret: missing; the replication link must be authenticated",
            cfg.file.display()
        )
    })?;

    // Metadata first: it says how big the data area is and holds the lock
    // that keeps a second daemon (and create-md) away.
    let (md_path, placement) = match &me.meta_disk {
        MetaDisk::Internal => (me.disk.clone(), Placement::Internal),
        MetaDisk::External(p) => (p.clone(), Placement::External),
    };
    let md_err = |e: String| format!("{res}: {}: {e}", md_path.display());
    let io = FileIo::open(&md_path, false).map_err(|e| md_err(format!("cannot open: {e}")))?;
    io.lock(true).map_err(md_err)?;
    let (md, report) = Metadata::open(io, placement).map_err(|e| {
        md_err(format!(
            "{e} (run `tandem create-md {res}` on this node first)"
        ))
    })?;
    if !report.was_clean {
        warn!(
            crashed_primary = report.crashed_primary,
            "metadata was not closed cleanly: the activity log's extents are marked out of sync"
        );
    }
    let size = md.layout().data_size;
    let local =
        Arc::new(FileDevice::open(&me.disk, &FileOptions::default()).map_err(|e| e.to_string())?);
    if local.size() < size {
        return Err(format!(
            "{res}: {}: the disk is {} bytes, smaller than the metadata's data size {size}",
            me.disk.display(),
            local.size()
        ));
    }
    let slot: DiskSlot = Arc::new(std::sync::RwLock::new(Some(Arc::clone(&local))));
    let protocol = match cfg.protocol {
        tandem_config::Protocol::A => Protocol::A,
        tandem_config::Protocol::B => Protocol::B,
        tandem_config::Protocol::C => Protocol::C,
    };
    let seed = u64::from_le_bytes(
        tandem_wire::new_nonce().map_err(|e| format!("cannot read /dev/urandom: {e}"))?[..8]
            .try_into()
            .unwrap_or([7; 8]),
    );
    let mut core = Core::new(
        tandem_core::Config {
            protocol,
            size,
            resync_rate: cfg.disk.resync_rate,
            c_min_rate: cfg.disk.c_min_rate,
            source_on_tie: me.name < peer.name,
            split_brain: split_brain_policy(&cfg.net, &me.name),
            fencing: cfg.net.fencing,
            csums: cfg.net.csums,
            on_io_error: match cfg.disk.on_io_error {
                tandem_config::OnIoError::Detach => IoErrorPolicy::Detach,
                tandem_config::OnIoError::PassOn => IoErrorPolicy::PassOn,
                tandem_config::OnIoError::CallLocalIoError => IoErrorPolicy::CallLocalIoError,
            },
        },
        Attached {
            gens: md.generations(),
            flags: md.flags(),
        },
        seed,
    );
    core.connect();
    info!(
        resource = %res, node = %me.name, peer = %peer.name, %protocol, size,
        generations = %fmt_gens(&md.generations()),
        disk = %core.disk(),
        "attached"
    );

    std::fs::create_dir_all(&opts.run_dir)
        .map_err(|e| format!("cannot create run dir {}: {e}", opts.run_dir.display()))?;
    let sock_path = control::socket_path(&opts.run_dir, &res);
    if sock_path.exists() {
        if std::os::unix::net::UnixStream::connect(&sock_path).is_ok() {
            return Err(format!(
                "{res} is already up on this node ({})",
                sock_path.display()
            ));
        }
        let _ = std::fs::remove_file(&sock_path);
    }
    let ctl = UnixListener::bind(&sock_path)
        .map_err(|e| format!("cannot listen on {}: {e}", sock_path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod {}: {e}", sock_path.display()))?;
    }
    let pid_path = control::pid_path(&opts.run_dir, &res);
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .map_err(|e| format!("cannot write {}: {e}", pid_path.display()))?;

    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let shared = Arc::new(Shared::default());
    let nbd_stats = Arc::new(ServerStats::default());
    let (nbd_kick_tx, nbd_kick_rx) = mpsc::channel::<oneshot::Sender<()>>(4);
    let (stop_tx, stop_rx) = watch::channel(false);

    // The replication link: listen and connect, as DRBD does.
    let settings = LinkSettings {
        resource: res.clone(),
        me: me.name.clone(),
        peer: peer.name.clone(),
        my_address: me.address.clone(),
        peer_address: peer.address.clone(),
        secret: secret.into_bytes(),
        connect_int: cfg.net.connect_int,
        ping_int: cfg.net.ping_int,
        ping_timeout: cfg.net.ping_timeout,
        stagger: true,
        writer_thread: protocol == Protocol::A,
    };
    let want_link = Arc::new(AtomicBool::new(true));
    let linker = tokio::spawn(link::run(
        settings,
        tx.clone(),
        Arc::clone(&want_link),
        stop_rx.clone(),
    ));

    // NBD: one server for the life of the daemon; a gate refuses the export
    // while this node is not Primary.
    let device = Arc::new(Replicated {
        size,
        caps: local.capabilities(),
        local: Arc::clone(&slot),
        tx: tx.clone(),
        shared: Arc::clone(&shared),
        takes_pipes: !cfg.net.data_integrity,
    });
    let nbd_addr = ListenAddr::parse(&me.nbd).map_err(|e| format!("node.nbd: {e}"))?;
    let nbd = tokio::spawn(nbd_supervisor(
        nbd_addr,
        Arc::clone(&device),
        res.clone(),
        me.name.clone(),
        Arc::clone(&shared),
        Arc::clone(&nbd_stats),
        nbd_kick_rx,
        stop_rx.clone(),
    ));

    // Control socket.
    {
        let tx = tx.clone();
        let stats = Arc::clone(&nbd_stats);
        let kick = nbd_kick_tx.clone();
        let stop_tx = stop_tx.clone();
        let stop_rx = stop_rx.clone();
        tokio::spawn(control_server(ctl, tx, stats, kick, stop_tx, stop_rx));
    }
    // Timers for the request timeout and status refresh.
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(100));
            loop {
                t.tick().await;
                if tx.send(Input::Tick).await.is_err() {
                    break;
                }
            }
        });
    }
    // Signals, caught from here on (before `ready`): a SIGTERM sent the
    // moment `up` returns must stop the daemon cleanly, not kill it.
    {
        use tokio::signal::unix::{signal, SignalKind};
        let stop_tx = stop_tx.clone();
        let (mut term, mut int) = (
            signal(SignalKind::terminate()).map_err(|e| format!("cannot catch SIGTERM: {e}"))?,
            signal(SignalKind::interrupt()).map_err(|e| format!("cannot catch SIGINT: {e}"))?,
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            info!("signal received: shutting down");
            let _ = stop_tx.send(true);
        });
    }

    let (events_tx, _) = broadcast::channel(EVENT_BACKLOG);
    let actor = Actor {
        res: res.clone(),
        node: me.name.clone(),
        core,
        md: Some(md),
        slot: Arc::clone(&slot),
        disk_path: me.disk.clone(),
        md_path: md_path.clone(),
        placement,
        tx: tx.clone(),
        internal: VecDeque::new(),
        next_req: 1,
        clients: HashMap::new(),
        peer_payloads: HashMap::new(),
        rs_out: HashMap::new(),
        rs_sent: Default::default(),
        inline_writes: Vec::new(),
        no_sendfile: false,
        rs_in: HashMap::new(),
        sync_side: None,
        sync_rate: (Instant::now(), 0, 0),
        link: None,
        outbox: Vec::with_capacity(crate::link::BATCH_FRAMES),
        outbox_bytes: 0,
        outbox_link: None,
        last_rx: Instant::now(),
        timeout: cfg.net.timeout,
        shared: Arc::clone(&shared),
        nbd_stats: Arc::clone(&nbd_stats),
        events: events_tx,
        last_state: None,
        counters_extra: Extra::default(),
        handlers: cfg.handlers.clone(),
        peer_name: peer.name.clone(),
        want_link: Arc::clone(&want_link),
        integrity: cfg.net.data_integrity,
        al_retry: VecDeque::new(),
        external_md: placement == Placement::External,
        pending_promote: None,
        promotion_result: None,
        pending_demote: None,
    };
    ready();
    info!("{res} is up on {}", me.name);
    // The actor runs as a task on a worker, not on this thread: a task it
    // wakes (the NBD connection waiting for its reply, the link writer)
    // then usually runs next on the same worker instead of being handed
    // across threads. Measured on a pair on loopback (protocol C): QD1
    // write p50 185 -> 100-110 us, QD32 +20-35 % IOPS.
    let result = match tokio::spawn(actor.run(rx, stop_rx.clone())).await {
        Ok(r) => r,
        Err(e) => Err(format!("the resource's task failed: {e}")),
    };
    let _ = stop_tx.send(true);
    let _ = nbd.await;
    linker.abort();
    let _ = std::fs::remove_file(&sock_path);
    let _ = std::fs::remove_file(&pid_path);
    result
}

#[allow(clippy::too_many_arguments)]
async fn nbd_supervisor(
    addr: ListenAddr,
    device: Arc<Replicated>,
    res: String,
    node: String,
    shared: Arc<Shared>,
    stats: Arc<ServerStats>,
    mut kick: mpsc::Receiver<oneshot::Sender<()>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let listener = match Listener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                error!("cannot listen for NBD on {addr:?}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if *stop.borrow() {
                    return;
                }
                continue;
            }
        };
        info!("NBD frontend listening on {}", listener.local_addr());
        let gate_shared = Arc::clone(&shared);
        let (res2, node2) = (res.clone(), node.clone());
        let config = ServerConfig {
            export_name: res.clone(),
            description: Some(format!("tandem resource {res}")),
            gate: Some(Gate(Arc::new(move || {
                if gate_shared.stopping.load(Ordering::Relaxed) {
                    Some(format!("{res2} is shutting down on {node2}"))
                } else if !gate_shared.primary.load(Ordering::Relaxed) {
                    Some(format!(
                        "{res2} is Secondary on {node2}: only the Primary serves NBD clients"
                    ))
                } else {
                    None
                }
            }))),
            ..ServerConfig::default()
        };
        let (server_stop_tx, server_stop_rx) = watch::channel(false);
        let server = tokio::spawn(tandem_nbd::serve(
            Arc::clone(&device),
            config,
            listener,
            server_stop_rx,
            Arc::clone(&stats),
        ));
        let done: Option<oneshot::Sender<()>> = tokio::select! {
            k = kick.recv() => k,
            _ = stop.wait_for(|s| *s) => None,
        };
        let _ = server_stop_tx.send(true);
        let _ = server.await;
        match done {
            Some(ack) => {
                let _ = ack.send(());
            }
            None => return,
        }
    }
}

async fn control_server(
    listener: UnixListener,
    tx: mpsc::Sender<Input>,
    stats: Arc<ServerStats>,
    kick: mpsc::Sender<oneshot::Sender<()>>,
    stop_tx: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = conn else { continue };
        let tx = tx.clone();
        let stats = Arc::clone(&stats);
        let kick = kick.clone();
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r.take(MAX_LINE as u64)).lines();
            let Ok(Some(line)) = lines.next_line().await else {
                return;
            };
            let req: Request = match serde_json::from_str(&line) {
                Ok(r) => r,
                Err(e) => {
                    let _ = reply(&mut w, &Response::refused(format!("bad request: {e}"))).await;
                    return;
                }
            };
            if req.verb == "events" {
                let (stx, srx) = oneshot::channel();
                if tx.send(Input::Subscribe(stx)).await.is_err() {
                    return;
                }
                let Ok((dump, mut rx)) = srx.await else {
                    return;
                };
                for l in dump {
                    if w.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
                if req.now {
                    return;
                }
                loop {
                    match rx.recv().await {
                        Ok(l) => {
                            if w.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            warn!("events reader fell {n} lines behind; some were dropped");
                        }
                        Err(_) => return,
                    }
                }
            }
            let resp = admin(&req, &tx, &stats, &kick, &stop_tx).await;
            let _ = reply(&mut w, &resp).await;
        });
    }
}

async fn reply(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_string(resp).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

async fn ask(tx: &mpsc::Sender<Input>, req: Request) -> Response {
    let (rtx, rrx) = oneshot::channel();
    if tx.send(Input::Admin(req, rtx)).await.is_err() {
        return Response::refused("the resource is shutting down");
    }
    rrx.await
        .unwrap_or_else(|_| Response::refused("the resource is shutting down"))
}

/// The NBD clients still counted once those closing have had
/// [`CLIENTS_GONE_GRACE`] to finish.
async fn clients_after_grace(stats: &ServerStats) -> usize {
    let deadline = Instant::now() + CLIENTS_GONE_GRACE;
    loop {
        let n = stats.clients();
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Verbs that involve the NBD frontend are handled here, around the actor.
async fn admin(
    req: &Request,
    tx: &mpsc::Sender<Input>,
    stats: &ServerStats,
    kick: &mpsc::Sender<oneshot::Sender<()>>,
    stop_tx: &watch::Sender<bool>,
) -> Response {
    match req.verb.as_str() {
        "secondary" | "down" => {
            let clients = if req.force {
                stats.clients()
            } else {
                clients_after_grace(stats).await
            };
            if clients > 0 && !req.force {
                return Response::refused(format!("device is in use by {clients} NBD clients"));
            }
            if clients > 0 {
                // --force: drop the clients (drain, then ESHUTDOWN) first.
                let (atx, arx) = oneshot::channel();
                if kick.send(atx).await.is_ok() {
                    let _ = arx.await;
                }
            }
            if req.verb == "down" {
                let resp = ask(
                    tx,
                    Request {
                        verb: "prepare-down".into(),
                        ..Default::default()
                    },
                )
                .await;
                if !resp.ok {
                    return resp;
                }
                let _ = stop_tx.send(true);
                return Response::ok("");
            }
            ask(tx, req.clone()).await
        }
        _ => ask(tx, req.clone()).await,
    }
}

/// Counters the driver keeps beside the core's.
#[derive(Default, Clone, Copy)]
struct Extra {
    al_writes: u64,
    bm_writes: u64,
    disk_read: u64,
}

struct LinkHandle {
    id: u64,
    tx: mpsc::Sender<Vec<link::Out>>,
}

/// A small buffered write the actor makes itself (see `inline_writes`).
struct InlineWrite {
    op: OpId,
    offset: u64,
    /// Taken when the core asked, so a detach in the same wake-up does not
    /// move the write to another disk or fail it.
    dev: io::Result<Arc<FileDevice>>,
    data: Bytes,
}

struct Actor {
    res: String,
    node: String,
    core: Core,
    /// The metadata; `None` while detached.
    md: Option<Metadata<FileIo>>,
    slot: DiskSlot,
    disk_path: PathBuf,
    md_path: PathBuf,
    placement: Placement,
    tx: mpsc::Sender<Input>,
    /// Events the actor raises for itself, handled before new input.
    internal: VecDeque<Event>,
    next_req: ReqId,
    clients: HashMap<ReqId, (ClientPayload, oneshot::Sender<io::Result<()>>)>,
    /// Payloads of received writes, until they are written locally.
    peer_payloads: HashMap<u64, Payload>,
    /// Resync data read for the peer, by request id, until sent.
    rs_out: HashMap<u64, Bytes>,
    /// Resync requests whose `RsData` went out straight from the disk
    /// (`link::FileFrame`) before the core heard the read was done.
    rs_sent: std::collections::HashSet<u64>,
    /// Small buffered writes held until the end of this wake-up, after the
    /// outbox has gone to the link: the peer's copy of a client write then
    /// leaves before the local copy is made instead of after it, and the
    /// link is the longer leg of a protocol B or C write. (Protocol A
    /// writes locally at once: its writes complete on the local copy.)
    /// Bounded by the inputs one wake-up takes in.
    inline_writes: Vec<InlineWrite>,
    /// Set when sending resync data with `sendfile` failed on the disk's
    /// side.
    no_sendfile: bool,
    /// Resync data received, by request id, until written.
    rs_in: HashMap<u64, Payload>,
    /// The side of the resync running after the last batch.
    sync_side: Option<tandem_core::SyncSide>,
    /// Resync speed: (when, resync bytes moved then) at the last sample,
    /// and the bytes per second measured over the last seconds.
    sync_rate: (Instant, u64, u64),
    link: Option<LinkHandle>,
    /// Frames for `link` produced since the actor last waited for input:
    /// handed to the writer as one batch (see [`Actor::flush_outbox`]).
    outbox: Vec<link::Out>,
    /// Payload bytes in `outbox`.
    outbox_bytes: usize,
    /// The link `outbox` is for.
    outbox_link: Option<u64>,
    last_rx: Instant,
    timeout: Duration,
    shared: Arc<Shared>,
    nbd_stats: Arc<ServerStats>,
    events: broadcast::Sender<String>,
    /// The state last published, compared after every batch (cheap: no
    /// strings are built unless it changed).
    last_state: Option<StateKey>,
    counters_extra: Extra,
    handlers: std::collections::BTreeMap<String, String>,
    peer_name: String,
    want_link: Arc<AtomicBool>,
    /// `data-integrity-alg = "crc32c"`.
    integrity: bool,
    /// Writes waiting for a free activity-log slot, in order. Bounded by the
    /// requests the core has in flight.
    al_retry: VecDeque<(ReqId, std::ops::Range<u64>)>,
    /// Metadata on another device than the data.
    external_md: bool,
    /// The `primary` caller waiting for the peer's answer.
    pending_promote: Option<oneshot::Sender<Response>>,
    promotion_result: Option<Result<(), tandem_core::Refusal>>,
    /// The `secondary` caller waiting for requests in flight to finish,
    /// and until when it waits.
    pending_demote: Option<(oneshot::Sender<Response>, Instant)>,
}

enum ClientPayload {
    Data(Bytes),
    /// The first bytes in memory, the rest in pipes: each user gets a
    /// `tee` of them ([`Actor::client_payload`]).
    Piped(Bytes, link::Piped),
    None,
}

/// The bytes of a write to do locally.
enum Payload {
    /// In memory.
    Mem(Bytes),
    /// The first bytes in memory, the rest in a pipe (a large payload from
    /// the link, see [`link::SPLICE_MIN`]).
    Piped(Bytes, link::Piped),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Mem(d) => d.len(),
            Payload::Piped(head, p) => head.len() + p.len(),
        }
    }
}

impl Actor {
    /// A client write's payload for one of its users (the link, the local
    /// disk): its bytes, or a `tee` of its pipes. When no pipe is to be had
    /// for the `tee`, the pipes are read into memory once, for every user.
    fn client_payload(&mut self, req: ReqId) -> Option<Payload> {
        let (payload, _) = self.clients.get_mut(&req)?;
        match payload {
            ClientPayload::Data(d) => Some(Payload::Mem(d.clone())),
            ClientPayload::Piped(head, piped) => {
                if let Some(t) = piped.tee() {
                    return Some(Payload::Piped(head.clone(), t));
                }
                let ClientPayload::Piped(head, piped) =
                    std::mem::replace(payload, ClientPayload::None)
                else {
                    return None;
                };
                match piped.read_after(&head) {
                    Ok(all) => {
                        let d = Bytes::from(all);
                        *payload = ClientPayload::Data(d.clone());
                        Some(Payload::Mem(d))
                    }
                    Err(e) => {
                        error!("reading the payload of request {req} from its pipes: {e}");
                        None
                    }
                }
            }
            ClientPayload::None => None,
        }
    }

    fn out_of_sync(&self) -> u64 {
        self.md.as_ref().map_or(0, |md| md.bitmap().count() * 4096)
    }

    /// `detach`: the core agrees, then the metadata is closed cleanly and
    /// the disk released (lock included), so it can be replaced.
    async fn detach(&mut self) -> Response {
        let mut out = Vec::new();
        if let Err(e) = self.core.detach(&mut out) {
            return Response::refused(e.to_string());
        }
        self.execute(out).await;
        self.release_disk("by the operator");
        Response::ok("")
    }

    /// Close the metadata and drop the disk (its lock with it); I/O still
    /// running holds its own handle and finishes.
    fn release_disk(&mut self, why: &str) {
        if let Some(md) = self.md.take() {
            if let Err(e) = md.close() {
                error!("closing the metadata on detach failed: {e}");
            }
        }
        if let Ok(mut g) = self.slot.write() {
            *g = None;
        }
        info!("detached {} {why}", self.disk_path.display());
    }

    /// `attach`: open the disk and its metadata again (as `up` does).
    async fn attach(&mut self) -> Response {
        if self.md.is_some() {
            return Response::refused("a disk is attached already");
        }
        let res = self.res.clone();
        let md_err = |e: String| format!("{res}: {}: {e}", self.md_path.display());
        let io = match FileIo::open(&self.md_path, false) {
            Ok(io) => io,
            Err(e) => return Response::refused(md_err(format!("cannot open: {e}"))),
        };
        if let Err(e) = io.lock(true) {
            return Response::refused(md_err(e));
        }
        let (md, report) = match Metadata::open(io, self.placement) {
            Ok(m) => m,
            Err(e) => return Response::refused(md_err(e.to_string())),
        };
        if md.layout().data_size != self.core.size() {
            return Response::refused(md_err(format!(
                "the metadata's data size is {} bytes, the resource's {}",
                md.layout().data_size,
                self.core.size()
            )));
        }
        let dev = match FileDevice::open(&self.disk_path, &FileOptions::default()) {
            Ok(d) => Arc::new(d),
            Err(e) => return Response::refused(e.to_string()),
        };
        let attached = Attached {
            gens: md.generations(),
            flags: md.flags(),
        };
        let mut out = Vec::new();
        if let Err(e) = self.core.attach(attached, &mut out) {
            return Response::refused(e.to_string());
        }
        if !report.was_clean {
            warn!("the attached metadata was not closed cleanly: its activity log is marked out of sync");
        }
        self.md = Some(md);
        if let Ok(mut g) = self.slot.write() {
            *g = Some(dev);
        }
        info!("attached {}", self.disk_path.display());
        self.execute(out).await;
        Response::ok("")
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut stopping = false;
        let mut stop_deadline: Option<Instant> = None;
        self.publish_state();
        loop {
            // Before waiting: what this wake-up produced for the peer goes
            // out (which may itself raise an internal event).
            loop {
                while let Some(ev) = self.internal.pop_front() {
                    self.feed(ev).await;
                }
                let sent = self.flush_outbox().await;
                self.write_inline(sent).await;
                if self.internal.is_empty() {
                    break;
                }
            }
            if stopping
                && (self.core.is_idle() || stop_deadline.is_some_and(|d| Instant::now() > d))
            {
                break;
            }
            let input = tokio::select! {
                i = rx.recv() => i,
                _ = stop.wait_for(|s| *s), if !stopping => {
                    stopping = true;
                    self.shared.stopping.store(true, Ordering::Relaxed);
                    stop_deadline = Some(Instant::now() + Duration::from_secs(20));
                    info!("stopping: draining requests in flight");
                    continue;
                }
            };
            let Some(input) = input else { break };
            self.input(input).await;
            // Whatever else is queued is handled before waiting again: one
            // wake-up, many inputs (bounded, so stop and internal events
            // are never starved).
            for _ in 0..64 {
                while let Some(ev) = self.internal.pop_front() {
                    self.feed(ev).await;
                }
                match rx.try_recv() {
                    Ok(input) => self.input(input).await,
                    Err(_) => break,
                }
            }
            self.retry_demote().await;
        }
        self.flush_outbox().await;
        // Orderly goodbye so the peer logs why, then a clean close.
        if let Some(l) = self.link.take() {
            let _ =
                l.tx.send(vec![link::Out::Frame(tandem_wire::Message::Disconnect {
                    reason: format!("{} is going down", self.node),
                })])
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let busy = self.core.requests_in_flight();
        for (_, (_, reply)) in self.clients.drain() {
            let _ = reply.send(Err(io::Error::other("resource went down")));
        }
        if busy > 0 {
            warn!("{busy} requests were still in flight at shutdown; leaving the metadata unclean so the activity log is replayed");
            if let Some(md) = self.md.as_mut() {
                let _ = md.flush_bitmap();
            }
            return Ok(());
        }
        let Some(mut md) = self.md.take() else {
            info!("{} is down (it was detached)", self.res);
            return Ok(());
        };
        // A clean stop ends the Primary role, as `drbdadm down` demotes.
        if self.core.role() == Role::Primary {
            if let Err(e) = md.change_flags(0, tandem_meta::superblock::flags::PRIMARY_IND) {
                warn!("cannot clear the primary flag: {e}");
            }
        }
        md.close()
            .map_err(|e| format!("closing the metadata failed: {e}"))?;
        info!("{} is down", self.res);
        Ok(())
    }

    async fn input(&mut self, input: Input) {
        match input {
            Input::Client(op, reply) => self.client(op, reply).await,
            Input::Digests(op, digests) => self.feed(Event::Digests { op, digests }).await,
            Input::ReadDone(op, r) => {
                let ok = match (op, r) {
                    (OpId::ResyncRead { link, id }, Ok(data)) => {
                        self.counters_extra.disk_read += data.len() as u64;
                        // Ids restart with every resync: a read finishing
                        // for a link that is gone must not stand in for the
                        // new resync's read of the same id.
                        if self.link.as_ref().is_some_and(|l| l.id == link) {
                            self.rs_out.insert(id, data);
                        }
                        true
                    }
                    (_, Err(e)) => {
                        error!("local read for the peer failed: {e}");
                        false
                    }
                    _ => false,
                };
                self.feed(Event::LocalDone { op, ok }).await;
            }
            Input::RsSent(op, len, r) => {
                let ok = match (op, r) {
                    (OpId::ResyncRead { link, id }, Ok(())) => {
                        self.counters_extra.disk_read += len;
                        if self.link.as_ref().is_some_and(|l| l.id == link) {
                            self.rs_sent.insert(id);
                        }
                        true
                    }
                    (_, Err(e)) if link::link_side(&e) => {
                        // The link's writer logs why it stopped; a frame
                        // dropped with its link needs no line of its own,
                        // and is no disk error (`on-io-error = "detach"`
                        // would otherwise detach a SyncSource's good disk
                        // whenever its link dropped mid-resync).
                        tracing::debug!("resync data not sent: {e}");
                        self.feed(Event::ReadUnsent { op }).await;
                        return;
                    }
                    (_, Err(e)) => {
                        // The frame's header is out, so the link went down
                        // with it. Reading first tells a disk error apart
                        // before anything is sent (the peer then hears
                        // `RsNegAck`), so the resync after the reconnect
                        // reads instead of looping on the same error.
                        error!("resync data could not be sent from the disk: {e}; resync reads go through memory from now on");
                        self.no_sendfile = true;
                        false
                    }
                    _ => false,
                };
                self.feed(Event::LocalDone { op, ok }).await;
            }
            Input::Core(ev) => self.feed(ev).await,
            Input::Link(ev) => self.link_event(ev).await,
            Input::Admin(req, reply) if req.verb == "primary" => {
                self.promote(req.force, reply).await;
            }
            Input::Admin(req, reply) if req.verb == "secondary" => {
                if let Some((earlier, _)) = self.pending_demote.take() {
                    let _ = earlier.send(Response::refused(
                        "a later secondary request took over this one",
                    ));
                }
                self.pending_demote = Some((reply, Instant::now() + CLIENTS_GONE_GRACE));
                self.retry_demote().await;
            }
            Input::Admin(req, reply) => {
                let resp = self.admin(&req).await;
                let _ = reply.send(resp);
            }
            Input::Subscribe(reply) => {
                let _ = reply.send((self.dump_lines(), self.events.subscribe()));
            }
            Input::Tick => self.tick().await,
        }
    }

    async fn client(&mut self, op: ClientOp, reply: oneshot::Sender<io::Result<()>>) {
        let req = self.next_req;
        self.next_req += 1;
        let (ev, payload) = match op {
            ClientOp::Write { offset, data, fua } => (
                Event::Write {
                    req,
                    offset,
                    len: data.len() as u64,
                    kind: WriteKind::Data,
                    fua,
                },
                ClientPayload::Data(data),
            ),
            ClientOp::WritePiped {
                offset,
                head,
                piped,
                fua,
            } => (
                Event::Write {
                    req,
                    offset,
                    len: (head.len() + piped.len()) as u64,
                    kind: WriteKind::Data,
                    fua,
                },
                ClientPayload::Piped(head, piped),
            ),
            ClientOp::Trim { offset, len, fua } => (
                Event::Write {
                    req,
                    offset,
                    len,
                    kind: WriteKind::Trim,
                    fua,
                },
                ClientPayload::None,
            ),
            ClientOp::Zero {
                offset,
                len,
                may_trim,
                fua,
            } => (
                Event::Write {
                    req,
                    offset,
                    len,
                    kind: WriteKind::Zero { may_trim },
                    fua,
                },
                ClientPayload::None,
            ),
            ClientOp::Flush => (Event::Flush { req }, ClientPayload::None),
        };
        if let Event::Write { len: 0, .. } = ev {
            let _ = reply.send(Ok(()));
            return;
        }
        self.clients.insert(req, (payload, reply));
        self.feed(ev).await;
    }

    async fn feed(&mut self, ev: Event) {
        let mut actions = Vec::new();
        self.core.handle(ev, &mut actions);
        self.execute(actions).await;
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        let mut actions = actions;
        // The core looks at the bitmap after every batch (resync requests,
        // its end); what it asks for then is one more batch.
        for _ in 0..64 {
            for a in actions {
                self.action(a).await;
            }
            let mut more = Vec::new();
            match self.md.as_ref() {
                Some(md) => self.core.pump(md.bitmap(), &mut more),
                None => self.core.pump(&tandem_meta::Bitmap::new(0), &mut more),
            }
            if more.is_empty() {
                break;
            }
            actions = more;
        }
        let side = self.core.sync_progress().map(|p| p.side);
        if side == Some(tandem_core::SyncSide::Target) && self.sync_side != side {
            self.run_handler("before-resync-target");
        }
        self.sync_side = side;
        self.shared
            .primary
            .store(self.core.role() == Role::Primary, Ordering::Relaxed);
        self.publish_state();
        if let Some(r) = self.promotion_result.take() {
            if let Some(reply) = self.pending_promote.take() {
                let _ = reply.send(match r {
                    Ok(()) => Response::ok(""),
                    Err(e) => Response::refused(e.to_string()),
                });
            }
        }
    }

    async fn action(&mut self, a: Action) {
        match a {
            Action::AlBegin { req, range } => {
                if self.al_retry.is_empty() {
                    if !self.al_begin(req, range.clone()).await {
                        self.al_retry.push_back((req, range));
                    }
                } else {
                    // Keep AL requests in order behind those already waiting.
                    self.al_retry.push_back((req, range));
                }
            }
            Action::AlEnd { range } => {
                if let Some(md) = self.md.as_mut() {
                    md.end_io(range);
                }
                // Slots may have freed up for writes that found them all busy.
                while let Some((req, range)) = self.al_retry.pop_front() {
                    if !self.al_begin(req, range.clone()).await {
                        self.al_retry.push_front((req, range));
                        break;
                    }
                }
            }
            Action::LocalWrite {
                op,
                offset,
                len,
                kind,
                fua,
            } => {
                let data = match (op, kind) {
                    (OpId::Client(req), WriteKind::Data) => self.client_payload(req),
                    (OpId::Peer { seq, .. }, WriteKind::Data) => self.peer_payloads.remove(&seq),
                    (OpId::Resync { id, .. }, WriteKind::Data) => self.rs_in.remove(&id),
                    _ => None,
                };
                if kind == WriteKind::Data && data.is_none() {
                    // The core asked for a write whose payload we do not have:
                    // fail it rather than write garbage.
                    error!("no payload for {op:?}; failing it");
                    self.internal.push_back(Event::LocalDone { op, ok: false });
                    return;
                }
                // Small buffered writes are a copy into the page cache:
                // cheaper in the actor than a task and two channel hops.
                if let (WriteKind::Data, Some(Payload::Mem(d)), false) = (kind, &data, fua) {
                    if d.len() <= INLINE_WRITE_MAX {
                        let w = InlineWrite {
                            op,
                            offset,
                            dev: disk_of(&self.slot),
                            data: d.clone(),
                        };
                        if self.core.protocol() == Protocol::A {
                            // Protocol A completes a write once it is
                            // written here (and queued to the peer): local
                            // copy first.
                            self.write_small(w).await;
                        } else {
                            self.inline_writes.push(w);
                        }
                        return;
                    }
                }
                let dev = match disk_of(&self.slot) {
                    Ok(d) => d,
                    Err(e) => {
                        error!("local write at {offset}+{len}: {e}");
                        self.internal.push_back(Event::LocalDone { op, ok: false });
                        return;
                    }
                };
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let r = match kind {
                        WriteKind::Data => match data {
                            Some(Payload::Mem(d)) => dev.write(offset, d, fua).await,
                            Some(Payload::Piped(head, p)) => {
                                let pipes = p.into_pipes();
                                // The peer's writes are flushed soon (its
                                // barriers); a client's are not.
                                let writeback = !matches!(op, OpId::Client(_));
                                dev.write_from_pipes(offset, head, pipes, fua, writeback)
                                    .await
                            }
                            None => Err(io::Error::other("no payload")),
                        },
                        // Trim must leave identical bytes on both nodes, so it
                        // zeroes (punching a hole where the file system can).
                        WriteKind::Trim => {
                            dev.write_zeroes(
                                offset,
                                len,
                                ZeroFlags {
                                    may_trim: true,
                                    fast_only: false,
                                    fua,
                                },
                            )
                            .await
                        }
                        WriteKind::Zero { may_trim } => {
                            dev.write_zeroes(
                                offset,
                                len,
                                ZeroFlags {
                                    may_trim,
                                    fast_only: false,
                                    fua,
                                },
                            )
                            .await
                        }
                    };
                    if let Err(e) = &r {
                        error!("local write at {offset}+{len} failed: {e}");
                    }
                    let _ = tx
                        .send(Input::Core(Event::LocalDone { op, ok: r.is_ok() }))
                        .await;
                });
            }
            Action::LocalFlush { op } => {
                let Ok(dev) = disk_of(&self.slot) else {
                    // Detached: nothing local to make stable.
                    self.internal.push_back(Event::LocalDone { op, ok: true });
                    return;
                };
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let r = dev.flush().await;
                    if let Err(e) = &r {
                        error!("local flush failed: {e}");
                    }
                    let _ = tx
                        .send(Input::Core(Event::LocalDone { op, ok: r.is_ok() }))
                        .await;
                });
            }
            Action::LocalRead { op, offset, len } => {
                let dev = match disk_of(&self.slot) {
                    Ok(d) => d,
                    Err(e) => {
                        error!("local read at {offset}+{len}: {e}");
                        self.internal.push_back(Event::LocalDone { op, ok: false });
                        return;
                    }
                };
                // A large resync read goes from the page cache to the link
                // socket (through pipes, or with `sendfile`) as the next
                // frame on the wire, and is done, for the core, once it is
                // sent: client writes that overlap it wait until then, as
                // for any read (the pipes hold the page cache's pages, not
                // a copy of them).
                if let OpId::ResyncRead { link, id } = op {
                    let big = usize::try_from(len)
                        .ok()
                        .filter(|n| (link::SPLICE_MIN..=tandem_wire::MAX_DATA).contains(n));
                    let current = self.link.as_ref().is_some_and(|l| l.id == link);
                    if let (Some(n), true, false) =
                        (big, current, dev.is_direct() || self.no_sendfile)
                    {
                        let tx = self.tx.clone();
                        // The daemon's runtime, not the writer's: a writer
                        // on a thread of its own (protocol A) drops the
                        // tasks left on its runtime when it ends, and with
                        // them a report of frames dropped then.
                        let rt = tokio::runtime::Handle::current();
                        let done = Box::new(move |r: io::Result<()>| {
                            // Called from the writer (or wherever the frame
                            // is dropped), which must not wait on the actor.
                            rt.spawn(async move {
                                let _ = tx.send(Input::RsSent(op, len, r)).await;
                            });
                        });
                        // The frame reads its payload into pipes as soon
                        // as it exists, ahead of the writer (or starts
                        // readahead when no pipes are left).
                        let frame = link::FileFrame::rs_data(id, offset, n, dev, done);
                        self.push_out(link, link::Out::File(frame), n).await;
                        return;
                    }
                }
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let r = match usize::try_from(len) {
                        Ok(n) => dev.read(offset, n).await,
                        Err(_) => Err(io::Error::other("read too long")),
                    };
                    let _ = tx.send(Input::ReadDone(op, r)).await;
                });
            }
            Action::LocalDigest { op, offset, len } => {
                let dev = disk_of(&self.slot);
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let data = match (dev, usize::try_from(len)) {
                        (Ok(dev), Ok(n)) => dev.read(offset, n).await.ok(),
                        _ => None,
                    };
                    let digests = data.map(|d| d.chunks(4096).map(tandem_wire::data_crc).collect());
                    let _ = tx.send(Input::Digests(op, digests)).await;
                });
            }
            Action::VerifyFinished { found } => {
                let line = json!({"type": "verify-done", "resource": self.res, "found": found, "time": now_rfc3339()});
                let _ = self.events.send(line.to_string());
            }
            Action::MarkInSync { range } => {
                let Some(md) = self.md.as_mut() else { return };
                if let Err(e) = md.set_in_sync(range) {
                    error!("cannot mark in sync: {e}");
                }
            }
            Action::SendBitmap => self.send_bitmap().await,
            Action::FlushBitmap => {
                let Some(md) = self.md.as_mut() else { return };
                match md.flush_bitmap() {
                    Ok(n) => self.counters_extra.bm_writes += n as u64,
                    Err(e) => error!("cannot write the bitmap: {e}"),
                }
            }
            Action::ResyncFinished => {
                if self.sync_side == Some(tandem_core::SyncSide::Target) {
                    self.run_handler("after-resync-target");
                }
                if let Some(md) = self.md.as_mut() {
                    if let Err(e) = md.flush_bitmap() {
                        error!("cannot write the bitmap: {e}");
                    }
                }
            }
            Action::Send(p) => self.send(p).await,
            Action::Complete { req, result } => {
                if let Some((_, reply)) = self.clients.remove(&req) {
                    let _ = reply.send(result.map_err(|f| match f {
                        IoFailure::Io => io::Error::from_raw_os_error(5),
                        IoFailure::NotPrimary => io::Error::from_raw_os_error(30),
                    }));
                }
            }
            Action::MarkOutOfSync { range } => {
                let Some(md) = self.md.as_mut() else { return };
                if let Err(e) = md.set_out_of_sync(range) {
                    error!("cannot mark out of sync: {e}");
                }
            }
            Action::ClearBitmap => {
                let size = self.core.size();
                let Some(md) = self.md.as_mut() else { return };
                if let Err(e) = md.set_in_sync(0..size) {
                    error!("cannot clear the bitmap: {e}");
                }
                match md.flush_bitmap() {
                    Ok(n) => self.counters_extra.bm_writes += n as u64,
                    Err(e) => error!("cannot write the bitmap: {e}"),
                }
            }
            Action::PersistGenerations(g) => {
                info!("new generations {}", fmt_gens(&g));
                let Some(md) = self.md.as_mut() else { return };
                if let Err(e) = md.set_generations(g) {
                    error!("cannot persist generations: {e}");
                }
            }
            Action::PersistFlags { set, clear } => {
                let Some(md) = self.md.as_mut() else { return };
                if let Err(e) = md.change_flags(set, clear) {
                    error!("cannot persist flags: {e}");
                }
            }
            Action::Disconnect { reason, standalone } => {
                warn!("disconnecting from {}: {reason}", self.peer_name);
                self.flush_outbox().await;
                if let Some(l) = self.link.take() {
                    let _ =
                        l.tx.try_send(vec![link::Out::Frame(tandem_wire::Message::Disconnect {
                            reason,
                        })]);
                }
                if standalone {
                    self.want_link.store(false, Ordering::Relaxed);
                }
            }
            Action::SplitBrain { rule } => {
                error!("split brain detected ({rule})");
                let line = json!({"type": "split-brain", "resource": self.res, "rule": rule, "time": now_rfc3339()});
                let _ = self.events.send(line.to_string());
                self.run_handler("split-brain");
            }
            Action::Log(s) => info!("{s}"),
            Action::RunHandler(name) => self.run_handler(name),
            Action::DetachDisk => self.release_disk("after a local disk error"),
            Action::FencePeer => match self.spawn_handler("fence-peer") {
                Some(child) => {
                    let tx = self.tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let code = child.and_then(|mut c| c.wait().ok()).and_then(|s| s.code());
                        info!("fence-peer handler exited with {code:?}");
                        let _ = tx.blocking_send(Input::Core(Event::FenceDone { code }));
                    });
                }
                None => {
                    warn!("fencing is resource-only but no fence-peer handler is configured");
                    self.internal.push_back(Event::FenceDone { code: None });
                }
            },
            // Answered at the end of the batch, once the role is visible
            // to the NBD gate.
            Action::PromotionDone(r) => self.promotion_result = Some(r),
        }
    }

    /// Ask the activity log to cover `range`; false when every slot is
    /// busy (the caller queues the request; it is retried as writes
    /// finish).
    async fn al_begin(&mut self, req: ReqId, range: std::ops::Range<u64>) -> bool {
        let Some(md) = self.md.as_ref() else {
            error!("a write reached a node without a disk");
            self.internal.push_back(Event::AlReady { req, ok: false });
            return true;
        };
        if self.external_md && !range.is_empty() {
            // A transaction that makes an extent hot may evict a cold one,
            // after which a crash no longer marks it: writes completed there
            // must be stable first. With internal metadata the transaction's
            // own fdatasync of the same file does this.
            let active = md.activity_log().active();
            let cold = ((range.start >> 22)..=((range.end - 1) >> 22))
                .any(|e| !active.contains(&(e as u32)));
            if cold {
                let flushed = match disk_of(&self.slot) {
                    Ok(dev) => dev.flush().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = flushed {
                    error!("flushing the disk before an activity-log update failed: {e}");
                }
            }
        }
        let Some(md) = self.md.as_mut() else {
            return true;
        };
        let before = md.activity_log().seq();
        // A transaction is a write and an fdatasync of the metadata, which
        // can take long under writeback: the worker is handed over so
        // that the link's reader and writer (pings) and the NBD
        // connections keep running meanwhile.
        let planned = if md.is_hot(&range) {
            md.begin_io(range.clone())
        } else {
            tokio::task::block_in_place(|| md.begin_io(range.clone()))
        };
        let ok = match planned {
            Ok(true) => true,
            Ok(false) => {
                // The caller queues the request (at the front when it was
                // the head of the queue already).
                // Slots held by writes waiting for the peer's barrier ack
                // free up sooner if the epoch closes now.
                self.internal.push_back(Event::Tick);
                return false;
            }
            Err(e) => {
                error!("activity log update failed: {e}");
                false
            }
        };
        self.counters_extra.al_writes += md.activity_log().seq() - before;
        self.internal.push_back(Event::AlReady { req, ok });
        true
    }

    /// Our bitmap to the peer, as runs, then the end marker. Streamed a
    /// frame at a time: a fragmented bitmap of a large device has far more
    /// runs than should ever sit in memory at once.
    async fn send_bitmap(&mut self) {
        // What the core sent before the bitmap goes before it.
        self.flush_outbox().await;
        let Some(link) = &self.link else { return };
        let tx = link.tx.clone();
        let id = link.id;
        let mut cursor = 0u64;
        loop {
            let chunk: Vec<(u64, u64)> = match self.md.as_ref() {
                Some(md) => {
                    let bm = md.bitmap();
                    bm.dirty_ranges(cursor..bm.len())
                        .take(tandem_wire::MAX_BITMAP_RUNS)
                        .map(|r| (r.start, r.end - r.start))
                        .collect()
                }
                None => Vec::new(),
            };
            let Some(&(start, n)) = chunk.last() else {
                break;
            };
            cursor = start + n;
            if tx
                .send(vec![link::Out::Frame(tandem_wire::Message::Bitmap {
                    runs: chunk,
                })])
                .await
                .is_err()
            {
                self.internal.push_back(Event::LinkDown {
                    link: id,
                    cause: ConnState::BrokenPipe,
                });
                return;
            }
        }
        if tx
            .send(vec![link::Out::Frame(tandem_wire::Message::BitmapDone)])
            .await
            .is_err()
        {
            self.internal.push_back(Event::LinkDown {
                link: id,
                cause: ConnState::BrokenPipe,
            });
        }
    }

    fn run_handler(&self, name: &str) {
        if let Some(Some(mut child)) = self.spawn_handler(name) {
            let name = name.to_string();
            tokio::task::spawn_blocking(move || match child.wait() {
                Ok(s) => info!("{name} handler exited with {s}"),
                Err(e) => warn!("{name} handler: {e}"),
            });
        }
    }

    /// Start handler `name`: `None` when none is configured, `Some(None)`
    /// when it could not be started (logged).
    fn spawn_handler(&self, name: &str) -> Option<Option<std::process::Child>> {
        let cmd = self.handlers.get(name)?;
        let cstate = self.core.cstate().to_string();
        match std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .env("TANDEM_RESOURCE", &self.res)
            .env("TANDEM_NODE", &self.node)
            .env("TANDEM_PEER", &self.peer_name)
            .env("TANDEM_CSTATE", &cstate)
            .env("DRBD_RESOURCE", &self.res)
            .env("DRBD_PEER", &self.peer_name)
            .env("DRBD_MINOR", "0")
            .spawn()
        {
            Ok(child) => Some(Some(child)),
            Err(e) => {
                warn!("cannot run the {name} handler {cmd:?}: {e}");
                Some(None)
            }
        }
    }

    async fn send(&mut self, p: Packet) {
        let Some(link_id) = self.link.as_ref().map(|l| l.id) else {
            return;
        };
        use tandem_wire::Message as M;
        let msg = match p {
            Packet::State(r) => M::ReportState(wire_report(&r)),
            Packet::Data {
                req,
                seq,
                epoch,
                offset,
                len,
                kind,
                fua,
            } => match kind {
                WriteKind::Data => {
                    let d = match self.client_payload(req) {
                        Some(Payload::Mem(d)) => d,
                        Some(Payload::Piped(head, piped)) => {
                            // No crc: a device with `data-integrity-alg`
                            // takes no pipes.
                            let msg = M::Data {
                                seq,
                                epoch,
                                offset,
                                fua,
                                data: Bytes::new(),
                                crc: None,
                            };
                            let bytes = head.len() + piped.len();
                            let out = link::Out::Piped { msg, head, piped };

                            self.push_out(link_id, out, bytes).await;
                            return;
                        }
                        None => {
                            error!("no payload for request {req}; dropping the link");

                            self.internal.push_back(Event::LinkDown {
                                link: link_id,
                                cause: ConnState::ProtocolError,
                            });
                            return;
                        }
                    };
                    M::Data {
                        seq,
                        epoch,
                        offset,
                        fua,
                        crc: self.integrity.then(|| tandem_wire::data_crc(&d)),
                        data: d,
                    }
                }
                WriteKind::Trim => M::Trim {
                    seq,
                    epoch,
                    offset,
                    len,
                    zero: false,
                    may_trim: true,
                    fua,
                },
                WriteKind::Zero { may_trim } => M::Trim {
                    seq,
                    epoch,
                    offset,
                    len,
                    zero: true,
                    may_trim,
                    fua,
                },
            },
            Packet::RecvAck(seq) => M::RecvAck { seq },
            Packet::WriteAck(seq) => M::WriteAck { seq },
            Packet::NegAck(seq) => M::NegAck { seq },
            Packet::Barrier { epoch, flush } => M::Barrier { epoch, flush },
            Packet::BarrierAck { epoch, writes } => M::BarrierAck { epoch, writes },
            Packet::NewCurrentUuid { uuid } => M::NewCurrentUuid { uuid },
            Packet::PromoteRequest { token } => M::PromoteRequest { token },
            Packet::PromoteReply { granted } => M::PromoteReply { granted },
            Packet::SyncStart { source, full } => M::SyncStart { source, full },
            Packet::SyncUuid { uuid } => M::SyncUuid { uuid },
            Packet::Bitmap(runs) => M::Bitmap {
                runs: runs
                    .into_iter()
                    .map(|r| (r.start / 4096, (r.end - r.start).div_ceil(4096)))
                    .collect(),
            },
            Packet::BitmapDone => M::BitmapDone,
            Packet::SyncEnd => M::SyncEnd,
            Packet::RsRequest { id, offset, len } => M::RsRequest {
                id,
                offset,
                len: len as u32,
            },
            Packet::RsData { id, offset, .. } => {
                if self.rs_sent.remove(&id) {
                    // Its payload went from the disk to the socket already.
                    return;
                }
                let Some(data) = self.rs_out.remove(&id) else {
                    error!("no data read for resync request {id}; dropping the link");

                    self.internal.push_back(Event::LinkDown {
                        link: link_id,
                        cause: ConnState::ProtocolError,
                    });
                    return;
                };
                M::RsData { id, offset, data }
            }
            Packet::RsNegAck { id } => M::RsNegAck { id },
            Packet::CsumRequest {
                id,
                offset,
                digests,
            } => M::CsumRequest {
                id,
                offset,
                digests,
            },
            Packet::RsInSync { id, offset, len } => M::RsInSync {
                id,
                offset,
                len: len as u32,
            },
            Packet::RsAck { offset, len } => M::RsAck {
                offset,
                len: len as u32,
            },
            Packet::SyncPause { paused } => M::SyncPause { paused },
            Packet::OvRequest { id, offset, len } => M::OvRequest {
                id,
                offset,
                len: len as u32,
            },
            Packet::OvReply {
                id,
                offset,
                digests,
            } => M::OvReply {
                id,
                offset,
                digests,
            },
            Packet::OvDone { found } => M::OvDone { found },
        };
        let bytes = msg.payload().map_or(0, |d| d.len());

        self.push_out(link_id, link::Out::Frame(msg), bytes).await;
    }

    /// Queue `out` (`bytes` of payload) for link `id` behind the frames
    /// already in the outbox.
    async fn push_out(&mut self, id: u64, out: link::Out, bytes: usize) {
        if self.outbox_link != Some(id) {
            self.outbox.clear();
            self.outbox_bytes = 0;
            self.outbox_link = Some(id);
        }
        self.outbox_bytes += bytes;
        self.outbox.push(out);
        if self.outbox.len() >= crate::link::BATCH_FRAMES || self.outbox_bytes >= OUTBOX_BYTES {
            self.flush_outbox().await;
        }
    }

    /// The small writes held back in this wake-up (`inline_writes`). When
    /// frames have just gone to the link's writer, the actor yields first:
    /// with one runtime worker the writer would otherwise send them only
    /// after these writes, since a small buffered write has no await point.
    async fn write_inline(&mut self, frames_sent: bool) {
        if self.inline_writes.is_empty() {
            return;
        }
        if frames_sent {
            tokio::task::yield_now().await;
        }
        for w in std::mem::take(&mut self.inline_writes) {
            self.write_small(w).await;
        }
    }

    async fn write_small(&mut self, w: InlineWrite) {
        let (offset, len) = (w.offset, w.data.len());
        let r = match w.dev {
            Ok(dev) => dev.write(offset, w.data, false).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &r {
            error!("local write at {offset}+{len} failed: {e}");
        }
        self.internal.push_back(Event::LocalDone {
            op: w.op,
            ok: r.is_ok(),
        });
    }

    /// Hand the frames gathered since the last wait to the link's writer,
    /// as one batch. Called before the actor waits for input, when the
    /// batch is full, and before anything that must follow them on the
    /// wire. Frames for a link that has gone since are dropped. Whether a
    /// batch went to a writer.
    async fn flush_outbox(&mut self) -> bool {
        if self.outbox.is_empty() {
            return false;
        }
        let batch = std::mem::replace(
            &mut self.outbox,
            Vec::with_capacity(crate::link::BATCH_FRAMES),
        );
        self.outbox_bytes = 0;
        let Some(link) = self
            .link
            .as_ref()
            .filter(|l| Some(l.id) == self.outbox_link)
        else {
            return false;
        };
        // The writer task's queue is bounded; waiting here is the back
        // pressure protocol A needs when the link is slower than the disk.
        if link.tx.send(batch).await.is_err() {
            let id = link.id;
            self.internal.push_back(Event::LinkDown {
                link: id,
                cause: ConnState::BrokenPipe,
            });
            return false;
        }
        true
    }

    async fn link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Up { id, tx } => {
                if self.link.is_some() || !self.want_link.load(Ordering::Relaxed) {
                    let _ = tx.try_send(vec![link::Out::Frame(tandem_wire::Message::Disconnect {
                        reason: "already connected".into(),
                    })]);
                    return;
                }
                info!("connected to {}", self.peer_name);
                self.link = Some(LinkHandle { id, tx });
                self.last_rx = Instant::now();
                self.peer_payloads.clear();
                self.rs_in.clear();
                self.rs_out.clear();
                self.rs_sent.clear();
                self.feed(Event::LinkUp { link: id }).await;
            }
            LinkEvent::Down { id, cause, reason } => {
                if self.link.as_ref().is_some_and(|l| l.id == id) {
                    warn!("link to {} lost: {reason}", self.peer_name);
                    self.link = None;
                    self.peer_payloads.clear();
                    self.feed(Event::LinkDown { link: id, cause }).await;
                }
            }
            LinkEvent::Messages { id, msgs } => {
                for msg in msgs {
                    self.link_message(id, msg, None).await;
                }
            }
            LinkEvent::Bulk { id, msg, piped } => self.link_message(id, msg, Some(piped)).await,
        }
    }

    /// One frame from link `id` (ignored once that link is gone).
    /// `piped`: the rest of a `Data` or `RsData` payload ([`LinkEvent::Bulk`]).
    async fn link_message(
        &mut self,
        id: u64,
        msg: tandem_wire::Message,
        piped: Option<link::Piped>,
    ) {
        if !self.link.as_ref().is_some_and(|l| l.id == id) {
            return;
        }
        self.last_rx = Instant::now();
        use tandem_wire::Message as M;
        let packet = match msg {
            M::ReportState(r) => Packet::State(core_report(&r)),
            M::Data {
                seq,
                epoch,
                offset,
                fua,
                data,
                ..
            } => {
                let payload = payload(data, piped);
                let len = payload.len() as u64;
                self.peer_payloads.insert(seq, payload);
                Packet::Data {
                    req: 0,
                    seq,
                    epoch,
                    offset,
                    len,
                    kind: WriteKind::Data,
                    fua,
                }
            }
            M::Trim {
                seq,
                epoch,
                offset,
                len,
                zero,
                may_trim,
                fua,
            } => Packet::Data {
                req: 0,
                seq,
                epoch,
                offset,
                len,
                kind: if zero {
                    WriteKind::Zero { may_trim }
                } else {
                    WriteKind::Trim
                },
                fua,
            },
            M::RecvAck { seq } => Packet::RecvAck(seq),
            M::WriteAck { seq } => Packet::WriteAck(seq),
            M::NegAck { seq } => Packet::NegAck(seq),
            M::Barrier { epoch, flush } => Packet::Barrier { epoch, flush },
            M::BarrierAck { epoch, writes } => Packet::BarrierAck { epoch, writes },
            M::NewCurrentUuid { uuid } => Packet::NewCurrentUuid { uuid },
            M::PromoteRequest { token } => Packet::PromoteRequest { token },
            M::PromoteReply { granted } => Packet::PromoteReply { granted },
            M::SyncStart { source, full } => Packet::SyncStart { source, full },
            M::SyncUuid { uuid } => Packet::SyncUuid { uuid },
            M::Bitmap { runs } => {
                let mut v = Vec::with_capacity(runs.len());
                for (start, n) in runs {
                    let range = start
                        .checked_mul(4096)
                        .zip(start.checked_add(n).and_then(|e| e.checked_mul(4096)));
                    match range {
                        Some((a, b)) => v.push(a..b),
                        None => {
                            warn!("bitmap run {start}+{n} overflows; dropping the link");
                            self.link = None;
                            self.feed(Event::LinkDown {
                                link: id,
                                cause: ConnState::ProtocolError,
                            })
                            .await;
                            return;
                        }
                    }
                }
                Packet::Bitmap(v)
            }
            M::BitmapDone => Packet::BitmapDone,
            M::SyncEnd => Packet::SyncEnd,
            M::RsRequest { id, offset, len } => Packet::RsRequest {
                id,
                offset,
                len: len.into(),
            },
            M::RsData { id, offset, data } => {
                let payload = payload(data, piped);
                let len = payload.len() as u64;
                self.rs_in.insert(id, payload);
                Packet::RsData { id, offset, len }
            }
            M::RsNegAck { id } => Packet::RsNegAck { id },
            M::CsumRequest {
                id,
                offset,
                digests,
            } => Packet::CsumRequest {
                id,
                offset,
                digests,
            },
            M::RsInSync { id, offset, len } => Packet::RsInSync {
                id,
                offset,
                len: len.into(),
            },
            M::RsAck { offset, len } => Packet::RsAck {
                offset,
                len: len.into(),
            },
            M::SyncPause { paused } => Packet::SyncPause { paused },
            M::OvRequest { id, offset, len } => Packet::OvRequest {
                id,
                offset,
                len: len.into(),
            },
            M::OvReply {
                id,
                offset,
                digests,
            } => Packet::OvReply {
                id,
                offset,
                digests,
            },
            M::OvDone { found } => Packet::OvDone { found },
            // Liveness only (last_rx is updated above).
            M::Ping | M::PingAck => return,
            M::Disconnect { reason } => {
                warn!("{} closes the link: {reason}", self.peer_name);
                self.link = None;
                self.feed(Event::LinkDown {
                    link: id,
                    cause: ConnState::Unconnected,
                })
                .await;
                return;
            }
            other => {
                warn!(
                    "unexpected {} frame after the handshake; dropping the link",
                    other.name()
                );
                self.link = None;
                self.feed(Event::LinkDown {
                    link: id,
                    cause: ConnState::ProtocolError,
                })
                .await;
                return;
            }
        };
        self.feed(Event::Packet { link: id, packet }).await;
    }

    async fn tick(&mut self) {
        if self.shared.app_read.swap(false, Ordering::Relaxed) {
            self.core.note_app_io();
        }
        self.feed(Event::Tick).await;
        let c = self.core.counters();
        let moved = c.resync_sent + c.resync_received;
        let (at, before, _) = self.sync_rate;
        let dt = at.elapsed().as_secs_f64();
        if dt >= 1.0 {
            let rate = (moved.saturating_sub(before) as f64 / dt) as u64;
            self.sync_rate = (Instant::now(), moved, rate);
        }
        // DRBD's `timeout`: a peer that acknowledges nothing for this long
        // while writes wait on it is treated as gone.
        if let Some(l) = &self.link {
            let waiting = self.core.counters().peer_pending > 0;
            if waiting && self.last_rx.elapsed() > self.timeout {
                let id = l.id;
                warn!(
                    "{} acknowledged nothing for {:?} with writes pending: dropping the link",
                    self.peer_name, self.timeout
                );
                self.link = None;
                self.feed(Event::LinkDown {
                    link: id,
                    cause: ConnState::Timeout,
                })
                .await;
            }
        }
    }

    async fn admin(&mut self, req: &Request) -> Response {
        let mut out = Vec::new();
        let resp = match req.verb.as_str() {
            "role" => Response::ok(format!("{}/{}", self.core.role(), self.core.peer_role())),
            "cstate" => Response::ok(self.core.cstate().to_string()),
            "dstate" => Response::ok(format!("{}/{}", self.core.disk(), self.core.peer_disk())),
            "status" => {
                if req.json {
                    Response::ok(json!({"resources": [self.status_json()]}).to_string())
                } else {
                    Response::ok(self.status_text())
                }
            }
            "prepare-down" => {
                let clients = self.nbd_stats.clients();
                if clients > 0 {
                    Response::refused(format!("device is in use by {clients} NBD clients"))
                } else {
                    Response::ok("")
                }
            }
            "connect" => {
                self.want_link.store(true, Ordering::Relaxed);
                self.core.set_discard_my_data(req.discard_my_data);
                self.core.connect();
                Response::ok("")
            }
            "disconnect" => {
                self.want_link.store(false, Ordering::Relaxed);
                self.core.disconnect(&mut out);
                Response::ok("")
            }
            "new-current-uuid" => {
                let r = if req.clear_bitmap {
                    self.core.new_current_uuid_clear_bitmap(&mut out)
                } else {
                    self.core.new_current_uuid_verb(&mut out)
                };
                match r {
                    Ok(()) => Response::ok(""),
                    Err(e) => Response::refused(e.to_string()),
                }
            }
            "detach" => return self.detach().await,
            "attach" => return self.attach().await,
            "invalidate" => match self.core.invalidate(&mut out) {
                Ok(()) => Response::ok(""),
                Err(e) => Response::refused(e.to_string()),
            },
            "invalidate-remote" => match self.core.invalidate_remote(&mut out) {
                Ok(()) => Response::ok(""),
                Err(e) => Response::refused(e.to_string()),
            },
            "verify" => match self.core.start_verify(&mut out) {
                Ok(()) => {
                    Response::ok("online verify started; `status` shows its progress and result")
                }
                Err(e) => Response::refused(e.to_string()),
            },
            "pause-sync" | "resume-sync" => {
                match self.core.pause_sync(req.verb == "pause-sync", &mut out) {
                    Ok(()) => Response::ok(""),
                    Err(e) => Response::refused(e.to_string()),
                }
            }
            "outdate" => match self.core.outdate(&mut out) {
                Ok(()) => Response::ok(""),
                Err(e) => Response::refused(e.to_string()),
            },
            other => Response::refused(format!("{other}: not supported by this daemon")),
        };
        self.execute(out).await;
        resp
    }

    /// `primary`: answered at once, or when the peer has answered.
    /// Try the waiting `secondary` again: it succeeds once the requests in
    /// flight are done, or is refused when its time is up or for any other
    /// reason than those requests.
    async fn retry_demote(&mut self) {
        let Some((_, deadline)) = &self.pending_demote else {
            return;
        };
        let late = Instant::now() >= *deadline;
        let mut out = Vec::new();
        let r = self.core.demote(self.nbd_stats.clients(), &mut out);
        let resp = match r {
            Ok(()) => Response::ok(""),
            Err(tandem_core::Refusal::Busy(_) | tandem_core::Refusal::InUse(_)) if !late => {
                return;
            }
            Err(e) => Response::refused(e.to_string()),
        };
        if let Some((reply, _)) = self.pending_demote.take() {
            let _ = reply.send(resp);
        }
        self.execute(out).await;
    }

    async fn promote(&mut self, force: bool, reply: oneshot::Sender<Response>) {
        if self.pending_promote.is_some() {
            let _ = reply.send(Response::refused(
                "refusing to promote: a promotion is already in progress",
            ));
            return;
        }
        let mut out = Vec::new();
        let r = self.core.promote(force, &mut out);
        match r {
            Ok(tandem_core::Promotion::Done) => {
                self.pending_promote = Some(reply);
                self.promotion_result = Some(Ok(()));
            }
            Ok(tandem_core::Promotion::Pending) => self.pending_promote = Some(reply),
            Err(e) => {
                let _ = reply.send(Response::refused(e.to_string()));
            }
        }
        self.execute(out).await;
    }

    fn state_fields(&self) -> [String; 5] {
        [
            self.core.role().to_string(),
            self.core.peer_role().to_string(),
            self.core.cstate().to_string(),
            self.core.disk().to_string(),
            self.core.peer_disk().to_string(),
        ]
    }

    fn publish_state(&mut self) {
        let key = (
            self.core.role(),
            self.core.peer_role(),
            self.core.cstate(),
            self.core.disk(),
            self.core.peer_disk(),
        );
        let Some(before) = self.last_state.replace(key) else {
            return;
        };
        if before == key {
            return;
        }
        let before = [
            before.0.to_string(),
            before.1.to_string(),
            before.2.to_string(),
            before.3.to_string(),
            before.4.to_string(),
        ];
        let now = self.state_fields();
        let keys = ["role", "peer-role", "cstate", "disk", "peer-disk"];
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), "change".into());
        obj.insert("resource".into(), self.res.clone().into());
        for (i, k) in keys.iter().enumerate() {
            if before[i] != now[i] {
                obj.insert((*k).into(), now[i].clone().into());
            }
        }
        obj.insert("time".into(), now_rfc3339().into());
        info!(
            "state: role {}/{} cstate {} disk {}/{}",
            now[0], now[1], now[2], now[3], now[4]
        );
        let _ = self.events.send(serde_json::Value::Object(obj).to_string());
    }

    fn dump_lines(&self) -> Vec<String> {
        let s = self.state_fields();
        vec![
            json!({"type": "exists", "resource": self.res, "role": s[0], "peer-role": s[1],
                   "cstate": s[2], "disk": s[3], "peer-disk": s[4]})
            .to_string(),
            json!({"type": "exists-end"}).to_string(),
        ]
    }

    /// `sync` of `status --json`: null when no resync runs.
    fn sync_json(&self) -> serde_json::Value {
        let Some(p) = self.core.sync_progress() else {
            return serde_json::Value::Null;
        };
        let rate = self.sync_rate.2;
        let done = if p.total == 0 {
            1.0
        } else {
            1.0 - p.remaining as f64 / p.total as f64
        };
        json!({
            "side": match p.side { tandem_core::SyncSide::Source => "source", tandem_core::SyncSide::Target => "target" },
            "done-fraction": done,
            "bytes-per-sec": rate,
            "eta-sec": p.remaining.checked_div(rate),
            "remaining-bytes": p.remaining,
            "total-bytes": p.total,
            "paused": p.paused,
        })
    }

    fn status_json(&self) -> serde_json::Value {
        let c = self.core.counters();
        let oos = self.out_of_sync();
        let kib = |b: u64| b / 1024;
        json!({
            "name": self.res,
            "node": self.node,
            "role": self.core.role().to_string(),
            "peer-role": self.core.peer_role().to_string(),
            "cstate": self.core.cstate().to_string(),
            "disk": self.core.disk().to_string(),
            "peer-disk": self.core.peer_disk().to_string(),
            "protocol": self.core.protocol().to_string(),
            "out-of-sync-bytes": oos,
            "sync": self.sync_json(),
            "verify": self.core.verify_progress().map_or(serde_json::Value::Null, |v| json!({
                "side": if v.source { "source" } else { "target" },
                "done-fraction": v.done as f64 / self.core.size().max(1) as f64,
                "found": v.found,
            })),
            "last-verify-found": self.core.last_verify_found(),
            "nbd-clients": self.nbd_stats.clients(),
            "current-uuid": format!("{:016X}", self.core.generations().current),
            "generations": fmt_gens(&self.core.generations()),
            "size": self.core.size(),
            "counters": {
                "ns": kib(c.net_sent), "nr": kib(c.net_received),
                "dw": kib(c.disk_written), "dr": kib(self.counters_extra.disk_read),
                "al": self.counters_extra.al_writes, "bm": self.counters_extra.bm_writes,
                "lo": c.local_pending, "pe": c.peer_pending, "ua": c.unacked,
                "ap": c.app_pending, "ep": c.epochs, "oos": kib(oos),
                "resync-bytes-sent": c.resync_sent, "resync-bytes-received": c.resync_received,
            }
        })
    }

    fn status_text(&self) -> String {
        let c = self.core.counters();
        let oos = self.out_of_sync();
        let sync = match self.core.sync_progress() {
            None => String::new(),
            Some(p) => {
                let done = if p.total == 0 {
                    1.0
                } else {
                    1.0 - p.remaining as f64 / p.total as f64
                };
                let bar = (done * 20.0) as usize;
                let rate = self.sync_rate.2;
                let eta = p
                    .remaining
                    .checked_div(rate)
                    .map_or_else(|| "?".to_string(), |s| format!("{s}s"));
                format!(
                    "\n    [{}>{}] sync'ed: {:.1}% ({}/{} KiB) speed: {} KiB/s eta: {eta}{}",
                    "=".repeat(bar),
                    ".".repeat(20 - bar.min(20)),
                    done * 100.0,
                    p.remaining / 1024,
                    p.total / 1024,
                    rate / 1024,
                    if p.paused { " (paused)" } else { "" }
                )
            }
        };
        format!(
            "{res} role:{role}\n  disk:{disk}\n  {peer} role:{prole}\n    connection:{cs} peer-disk:{pdisk} protocol:{proto}\n    out-of-sync: {oos} KiB\n    ns:{ns} nr:{nr} dw:{dw} dr:{dr} al:{al} bm:{bm} lo:{lo} pe:{pe} ua:{ua} ap:{ap} ep:{ep} oos:{oos}{sync}\n    nbd-clients:{clients}",
            res = self.res,
            role = self.core.role(),
            disk = self.core.disk(),
            peer = self.peer_name,
            prole = self.core.peer_role(),
            cs = self.core.cstate(),
            pdisk = self.core.peer_disk(),
            proto = self.core.protocol(),
            oos = oos / 1024,
            ns = c.net_sent / 1024,
            nr = c.net_received / 1024,
            dw = c.disk_written / 1024,
            dr = self.counters_extra.disk_read / 1024,
            al = self.counters_extra.al_writes,
            bm = self.counters_extra.bm_writes,
            lo = c.local_pending,
            pe = c.peer_pending,
            ua = c.unacked,
            ap = c.app_pending,
            ep = c.epochs,
            clients = self.nbd_stats.clients(),
        )
    }
}

fn wire_report(r: &tandem_core::Report) -> tandem_wire::StateReport {
    use tandem_wire::{WireDisk, WireProtocol, WireRole};
    tandem_wire::StateReport {
        role: if r.role == Role::Primary {
            WireRole::Primary
        } else {
            WireRole::Secondary
        },
        disk: match r.disk {
            DiskState::UpToDate => WireDisk::UpToDate,
            DiskState::Consistent => WireDisk::Consistent,
            DiskState::Outdated => WireDisk::Outdated,
            DiskState::Diskless | DiskState::Failed | DiskState::DUnknown => WireDisk::Diskless,
            DiskState::Inconsistent | DiskState::Attaching | DiskState::Negotiating => {
                WireDisk::Inconsistent
            }
        },
        protocol: match r.protocol {
            Protocol::A => WireProtocol::A,
            Protocol::B => WireProtocol::B,
            Protocol::C => WireProtocol::C,
        },
        size: r.size,
        current_uuid: r.gens.current,
        bitmap_uuid: r.gens.bitmap,
        history_uuids: r.gens.history,
        flags: r.flags,
        out_of_sync: r.oos,
        discard_my_data: r.discard_my_data,
    }
}

fn core_report(r: &tandem_wire::StateReport) -> tandem_core::Report {
    use tandem_wire::{WireDisk, WireProtocol, WireRole};
    tandem_core::Report {
        role: match r.role {
            WireRole::Primary => Role::Primary,
            WireRole::Secondary => Role::Secondary,
        },
        disk: match r.disk {
            WireDisk::Diskless => DiskState::Diskless,
            WireDisk::Inconsistent => DiskState::Inconsistent,
            WireDisk::Outdated => DiskState::Outdated,
            WireDisk::Consistent => DiskState::Consistent,
            WireDisk::UpToDate => DiskState::UpToDate,
        },
        protocol: match r.protocol {
            WireProtocol::A => Protocol::A,
            WireProtocol::B => Protocol::B,
            WireProtocol::C => Protocol::C,
        },
        size: r.size,
        gens: tandem_meta::Generations {
            current: r.current_uuid,
            bitmap: r.bitmap_uuid,
            history: r.history_uuids,
        },
        flags: r.flags,
        oos: r.out_of_sync,
        discard_my_data: r.discard_my_data,
    }
}

/// The configuration's `after-sb-*pri` policies for the core.
fn split_brain_policy(net: &tandem_config::NetConfig, me: &str) -> tandem_core::SplitBrainPolicy {
    use tandem_config::{AfterSb0Pri as C0, AfterSb1Pri as C1, AfterSb2Pri as C2};
    use tandem_core::{AfterSb0Pri as P0, AfterSb1Pri as P1, AfterSb2Pri as P2};
    tandem_core::SplitBrainPolicy {
        zero: match &net.after_sb_0pri {
            C0::Disconnect => P0::Disconnect,
            C0::DiscardYoungerPrimary => P0::DiscardYoungerPrimary,
            C0::DiscardOlderPrimary => P0::DiscardOlderPrimary,
            C0::DiscardZeroChanges => P0::DiscardZeroChanges,
            C0::DiscardLeastChanges => P0::DiscardLeastChanges,
            C0::DiscardNode(n) => P0::DiscardNode(n == me),
        },
        one: match net.after_sb_1pri {
            C1::Disconnect => P1::Disconnect,
            C1::Consensus => P1::Consensus,
            C1::ViolentlyAs0p => P1::ViolentlyAs0p,
            C1::DiscardSecondary => P1::DiscardSecondary,
            C1::CallPriLostAfterSb => P1::CallPriLostAfterSb,
        },
        two: match net.after_sb_2pri {
            C2::Disconnect => P2::Disconnect,
            C2::ViolentlyAs0p => P2::ViolentlyAs0p,
            C2::CallPriLostAfterSb => P2::CallPriLostAfterSb,
        },
    }
}

/// UTC time as `2026-01-01T00:00:00.000Z`.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let ms = d.subsec_millis();
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let dd = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}
