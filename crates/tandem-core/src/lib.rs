//! The per-resource replication state machine, without I/O.
//!
//! [`Core`] consumes [`Event`]s (a client write, a local write finished, a
//! frame from the peer, the link going up or down) and answers with
//! [`Action`]s (write locally, send to the peer, complete a client request,
//! mark blocks out of sync, persist generations). It never touches a socket,
//! a file or a clock, so the engine drives it over tokio and the simulation
//! drives two of them through crashes and partitions from a seed.
//!
//! The driver's contract:
//! - Actions are executed in the order given. Metadata actions
//!   ([`Action::MarkOutOfSync`], [`Action::PersistGenerations`],
//!   [`Action::PersistFlags`], [`Action::AlEnd`]) are done before the next
//!   action; that ordering is what makes "out of sync before reported" and
//!   "new generation before new data" hold.
//! - [`Action::AlBegin`] is answered with [`Event::AlReady`] once the
//!   activity-log transaction naming the range is durable.
//! - Every [`Action::LocalWrite`] / [`Action::LocalFlush`] is answered with
//!   [`Event::LocalDone`] carrying the same [`OpId`].
//! - Frames are sent in the order of the [`Action::Send`]s; the payload of a
//!   data frame is the driver's copy of the client request's (or the
//!   received frame's) data.
//! - Events from a link other than the current one ([`Event::LinkUp`]'s
//!   number) are ignored, so a slow reader of a dead link cannot confuse the
//!   new one.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod gi;
mod resync;
mod split_brain;
mod state;
mod verify;

pub use resync::{
    OutOfSync, SyncProgress, SyncSide, RESYNC_REQUEST_MAX, RESYNC_SOURCE_QUEUE, RESYNC_WINDOW,
};
pub use split_brain::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, SplitBrainPolicy};
pub use state::{ConnState, DiskState, Protocol, Role};
pub use verify::VerifyProgress;

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use tandem_meta::superblock::{flags, UUID_JUST_CREATED};
use tandem_meta::Generations;

/// A client request, numbered by the driver.
pub type ReqId = u64;

/// Most writes sent to the peer and not yet acknowledged as written (the
/// transfer log). Beyond it new writes wait: protocol A must not let the
/// send side run arbitrarily far ahead of the peer.
pub const MAX_TRANSFER_LOG: usize = 32768;

/// Most frames the receiving side holds that cannot start yet (next epoch,
/// or overlapping a write in flight). The sender's transfer log bounds this
/// in practice; beyond it the link is dropped as a protocol error.
pub const MAX_PEER_QUEUE: usize = MAX_TRANSFER_LOG + 1024;

/// Identifies a local operation so its completion finds its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpId {
    /// A client request on the Primary.
    Client(ReqId),
    /// A write received from the peer: the link it came on and its
    /// sequence number (numbers restart on every link, and a write from a
    /// dead link may still be running when the next link is up).
    Peer {
        /// Link number.
        link: u64,
        /// Sequence number on that link.
        seq: u64,
    },
    /// The flush that answers the peer's barrier closing this epoch.
    PeerBarrier {
        /// Link number.
        link: u64,
        /// The epoch.
        epoch: u64,
    },
    /// SyncTarget: writing the source's data for request `id`.
    Resync {
        /// Link number.
        link: u64,
        /// The resync request.
        id: u64,
    },
    /// SyncTarget: the flush before resynced ranges are acknowledged.
    ResyncFlush {
        /// Link number.
        link: u64,
        /// Flush number.
        n: u64,
    },
    /// Checksum-based resync: digests of resync request `id`'s range
    /// (the target's own, or the source's to compare).
    CsumRead {
        /// Link number.
        link: u64,
        /// The resync request.
        id: u64,
    },
    /// Verify: digests of the range of verify request `id` (ours or the
    /// peer's).
    VerifyRead {
        /// Link number.
        link: u64,
        /// The verify request.
        id: u64,
    },
    /// SyncSource: reading the range the peer's request `id` asked for.
    ResyncRead {
        /// Link number.
        link: u64,
        /// The peer's request id.
        id: u64,
    },
}

/// What a write does to its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Writes the request's payload.
    Data,
    /// Deallocates (contents unspecified but identical on both nodes only
    /// if the backing stores agree; tandem zeroes on both, see the engine).
    Trim,
    /// Writes zeroes; `may_trim` allows punching a hole.
    Zero {
        /// Holes are acceptable.
        may_trim: bool,
    },
}

/// Why a client request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoFailure {
    /// The local disk failed the write.
    Io,
    /// This node is not Primary.
    NotPrimary,
}

/// What a node tells its peer about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Its role.
    pub role: Role,
    /// Its disk state.
    pub disk: DiskState,
    /// Its protocol setting (both must agree).
    pub protocol: Protocol,
    /// Its data size in bytes.
    pub size: u64,
    /// Its generation identifiers.
    pub gens: Generations,
    /// Its superblock flags.
    pub flags: u32,
    /// Its out-of-sync bytes.
    pub oos: u64,
    /// It was told to discard its data if split brain is found.
    pub discard_my_data: bool,
}

/// A frame between the cores. The engine maps these to the wire format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// State report (after connecting and on every role/disk change).
    State(Report),
    /// A write; its payload travels beside it (see the crate docs).
    Data {
        /// The client request whose payload to send (sender side only).
        req: ReqId,
        /// Per-link sequence number.
        seq: u64,
        /// Epoch the write belongs to.
        epoch: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// What it does.
        kind: WriteKind,
        /// Stable before the write ack.
        fua: bool,
    },
    /// Received (protocol B).
    RecvAck(u64),
    /// Written.
    WriteAck(u64),
    /// The peer's local write failed.
    NegAck(u64),
    /// Closes an epoch; with `flush`, stable before acknowledged.
    Barrier {
        /// The epoch closed.
        epoch: u64,
        /// Make it stable.
        flush: bool,
    },
    /// Every write of the epoch is done (and stable when asked).
    BarrierAck {
        /// The epoch.
        epoch: u64,
        /// How many writes it held.
        writes: u32,
    },
    /// May the sender become Primary? `token` breaks the tie when both
    /// nodes ask at once: the lower one wins.
    PromoteRequest {
        /// Random tie-breaker.
        token: u64,
    },
    /// The answer to [`Packet::PromoteRequest`].
    PromoteReply {
        /// Yes: the sender now counts this node's peer as Primary.
        granted: bool,
    },
    /// A fresh pair skips its initial sync: adopt this current generation
    /// and consider the data UpToDate.
    NewCurrentUuid {
        /// The generation both nodes now share.
        uuid: u64,
    },
    /// Start a resync now; `source`: the sender is SyncSource.
    SyncStart {
        /// The sender is SyncSource.
        source: bool,
        /// Every block travels.
        full: bool,
    },
    /// The SyncSource's new bitmap generation, the target's new current.
    SyncUuid {
        /// The generation.
        uuid: u64,
    },
    /// Part of the sender's bitmap, as byte ranges.
    Bitmap(Vec<Range<u64>>),
    /// The sender's bitmap is complete.
    BitmapDone,
    /// The SyncTarget ended the resync without every block (some could not
    /// be read or written): the source ends it too.
    SyncEnd,
    /// SyncTarget asks for a range.
    RsRequest {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// SyncSource's data for a request (payload beside it, as for `Data`).
    RsData {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Checksum-based resync: the target's digests of a range; the source
    /// answers with `RsData` for the span that differs (if any), then
    /// `RsInSync` for the whole request.
    CsumRequest {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// crc32c of every 4 KiB block.
        digests: Vec<u32>,
    },
    /// Checksum-based resync: every block of the request not sent as data
    /// is identical on both nodes.
    RsInSync {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// SyncSource could not read the request's range.
    RsNegAck {
        /// Request id.
        id: u64,
    },
    /// SyncTarget has the range on stable storage.
    RsAck {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// `pause-sync` / `resume-sync` on the sender.
    SyncPause {
        /// Paused now.
        paused: bool,
    },
    /// VerifyS asks for the digests of a range.
    OvRequest {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// VerifyT's crc32c per 4 KiB block of the range (empty: unreadable).
    OvReply {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// One digest per block.
        digests: Vec<u32>,
    },
    /// The verify is over.
    OvDone {
        /// Blocks found different.
        found: u64,
    },
}

/// Inputs to the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A client write, trim or write-zeroes.
    Write {
        /// Request id.
        req: ReqId,
        /// Byte offset.
        offset: u64,
        /// Byte length (non-zero).
        len: u64,
        /// What it does.
        kind: WriteKind,
        /// Force unit access.
        fua: bool,
    },
    /// A client flush.
    Flush {
        /// Request id.
        req: ReqId,
    },
    /// The activity log covers the request's range durably (or could not).
    AlReady {
        /// Request id.
        req: ReqId,
        /// The AL transaction was written.
        ok: bool,
    },
    /// A local write or flush finished.
    LocalDone {
        /// Which one.
        op: OpId,
        /// It succeeded.
        ok: bool,
    },
    /// A resync read that was to go out as a frame read straight from the
    /// disk (`sendfile`) was dropped with its link before it was sent: not
    /// a disk error, and nothing more for the peer.
    ReadUnsent {
        /// Which one.
        op: OpId,
    },
    /// A new authenticated link to the peer.
    LinkUp {
        /// Link number, increasing.
        link: u64,
    },
    /// The link broke (or timed out).
    LinkDown {
        /// Link number.
        link: u64,
        /// Why, for the state name.
        cause: ConnState,
    },
    /// Time passes (the engine sends one every 100 ms): an epoch whose
    /// writes wait for stability is closed with a barrier.
    Tick,
    /// The `fence-peer` handler returned with this exit code (`None`: no
    /// handler, or it could not run).
    FenceDone {
        /// Exit code; 4 (peer outdated) and 7 (peer fenced) outdate the peer.
        code: Option<i32>,
    },
    /// An [`Action::LocalDigest`] finished (`None`: the read failed).
    Digests {
        /// Which one.
        op: OpId,
        /// crc32c of every 4 KiB block.
        digests: Option<Vec<u32>>,
    },
    /// A frame from the peer.
    Packet {
        /// Link number.
        link: u64,
        /// The frame (for `Data`, `req` is meaningless on receipt).
        packet: Packet,
    },
}

/// Outputs of the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Make the AL cover `range`, then answer [`Event::AlReady`].
    AlBegin {
        /// Request id.
        req: ReqId,
        /// Byte range.
        range: Range<u64>,
    },
    /// The range's writes are finished everywhere; its extents may go cold.
    AlEnd {
        /// Byte range.
        range: Range<u64>,
    },
    /// Write locally, then answer [`Event::LocalDone`].
    LocalWrite {
        /// Which operation.
        op: OpId,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// What it does.
        kind: WriteKind,
        /// Stable before done.
        fua: bool,
    },
    /// Flush the local disk, then answer [`Event::LocalDone`].
    LocalFlush {
        /// Which operation.
        op: OpId,
    },
    /// Read locally for the peer (keep the bytes for the `RsData` that
    /// follows), then answer [`Event::LocalDone`].
    LocalRead {
        /// Which operation.
        op: OpId,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Read a range and compute the crc32c of every 4 KiB block, then
    /// answer [`Event::Digests`].
    LocalDigest {
        /// Which operation.
        op: OpId,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// An online verify this node ran has finished.
    VerifyFinished {
        /// Blocks found different (now marked out of sync).
        found: u64,
    },
    /// These bytes are now identical on both nodes: clear their bits.
    MarkInSync {
        /// Byte range.
        range: Range<u64>,
    },
    /// Send this node's whole bitmap (`Bitmap` frames, then `BitmapDone`).
    SendBitmap,
    /// Write the bitmap's changed pages to stable storage.
    FlushBitmap,
    /// A resync ended (the after-resync handlers run).
    ResyncFinished,
    /// Run this handler (`pri-lost-after-sb`, `out-of-sync`).
    RunHandler(&'static str),
    /// Run the `fence-peer` handler and answer [`Event::FenceDone`].
    FencePeer,
    /// The failed disk is given up (`on-io-error = "detach"`): close the
    /// metadata and release the disk as `detach` does.
    DetachDisk,
    /// Send a frame on the current link.
    Send(Packet),
    /// Answer a client request.
    Complete {
        /// Request id.
        req: ReqId,
        /// Outcome.
        result: Result<(), IoFailure>,
    },
    /// The peer may lack these bytes: set their bits.
    MarkOutOfSync {
        /// Byte range.
        range: Range<u64>,
    },
    /// The data is identical on both nodes: clear every bit (fresh pair).
    ClearBitmap,
    /// Write the generation identifiers to the superblock.
    PersistGenerations(Generations),
    /// Change superblock flags.
    PersistFlags {
        /// Bits to set.
        set: u32,
        /// Bits to clear.
        clear: u32,
    },
    /// Close the current link; with `standalone`, do not reconnect.
    Disconnect {
        /// Log line.
        reason: String,
        /// Stay StandAlone until `connect`.
        standalone: bool,
    },
    /// Diverged data detected: run the split-brain handler, emit the event.
    SplitBrain {
        /// The rule that found it.
        rule: &'static str,
    },
    /// A pending promotion ended.
    PromotionDone(Result<(), Refusal>),
    /// Something an operator should read in the log.
    Log(String),
}

/// How a `promote` went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Promotion {
    /// This node is Primary now.
    Done,
    /// The peer was asked; [`Action::PromotionDone`] says how it ended.
    Pending,
}

/// Static configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Replication protocol.
    pub protocol: Protocol,
    /// Data size in bytes.
    pub size: u64,
    /// Resync rate limit in bytes per second.
    pub resync_rate: u64,
    /// The SyncSource's rate while application I/O is seen.
    pub c_min_rate: u64,
    /// When nothing else decides the direction of a resync (equal
    /// generations, both consistent, neither crashed nor Primary), the node
    /// with this set is the source; the driver sets it on exactly one node
    /// (the one whose name sorts first).
    pub source_on_tie: bool,
    /// What to do when split brain is found at connect.
    pub split_brain: SplitBrainPolicy,
    /// `fencing = "resource-only"`: a Primary that loses its peer holds
    /// new writes until the `fence-peer` handler answers.
    pub fencing: bool,
    /// `csums-alg`: as SyncTarget, send block digests and receive only the
    /// blocks that differ.
    pub csums: bool,
    /// `on-io-error`: what a local disk error does beyond failing the I/O.
    pub on_io_error: IoErrorPolicy,
}

/// `on-io-error`. Whatever the policy, the failed I/O itself is reported
/// (a client gets EIO, the peer a negative ack) and its range is marked
/// out of sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoErrorPolicy {
    /// The disk goes Failed, then Diskless once its I/O in flight is done;
    /// the peer starts a new generation and tracks what this node misses.
    /// A Primary cannot (tandem does not read through the peer): it
    /// passes the error on instead and says so.
    #[default]
    Detach,
    /// The disk stays attached; a Secondary's goes Inconsistent, so that
    /// it is not promoted over holes and is resynced on the next connect.
    PassOn,
    /// Run the `local-io-error` handler, then as [`IoErrorPolicy::PassOn`].
    CallLocalIoError,
}

/// What the metadata said when the disk was attached.
#[derive(Clone, Copy, Debug)]
pub struct Attached {
    /// Generation identifiers.
    pub gens: Generations,
    /// Superblock flags.
    pub flags: u32,
}

/// Why a role change was refused. Display is the line the CLI prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The connected peer is Primary.
    PeerIsPrimary,
    /// No UpToDate data and no `--force`.
    NoUpToDateData,
    /// NBD clients hold the device open.
    InUse(usize),
    /// Writes are still in flight.
    Busy(usize),
    /// The operation needs a connected peer.
    NotConnected,
    /// The operation needs something else first.
    Other(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::PeerIsPrimary => write!(f, "refusing to promote: peer is Primary"),
            Refusal::NoUpToDateData => {
                write!(f, "refusing to promote: no UpToDate data (use --force)")
            }
            Refusal::InUse(n) => write!(f, "device is in use by {n} NBD clients"),
            Refusal::Busy(n) => write!(f, "device is busy: {n} requests in flight"),
            Refusal::NotConnected => write!(f, "not connected to the peer"),
            Refusal::Other(s) => f.write_str(s),
        }
    }
}

/// DRBD's `/proc/drbd` counters that the core can know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes of write payload sent to the peer.
    pub net_sent: u64,
    /// Bytes of write payload received from the peer.
    pub net_received: u64,
    /// Bytes written to the local disk.
    pub disk_written: u64,
    /// Local operations in flight.
    pub local_pending: u64,
    /// Writes sent to the peer and not yet acknowledged.
    pub peer_pending: u64,
    /// Writes received from the peer and not yet acknowledged.
    pub unacked: u64,
    /// Client requests in flight.
    pub app_pending: u64,
    /// Epochs closed.
    pub epochs: u64,
    /// Bytes of resync data sent.
    pub resync_sent: u64,
    /// Bytes of resync data received.
    pub resync_received: u64,
}

// Conditions a client request waits for.
const LOCAL: u8 = 1;
const RECV_ACK: u8 = 2;
const WRITE_ACK: u8 = 4;
const BARRIER_ACK: u8 = 8;
const AL: u8 = 16;
/// The peer has the write on stable storage (its epoch's barrier ack).
const STABLE: u8 = 32;

/// An epoch closes by itself after this many replicated writes, so the
/// transfer log drains under a write load that never flushes.
pub const MAX_EPOCH_WRITES: usize = 16384;

#[derive(Clone, Debug)]
enum ReqKind {
    Write {
        offset: u64,
        len: u64,
        kind: WriteKind,
        fua: bool,
    },
    Flush,
}

#[derive(Clone, Debug)]
struct Request {
    kind: ReqKind,
    /// Conditions still outstanding.
    pending: u8,
    /// Those of them that completion waits for (the rest only keep the
    /// request in the transfer log / activity log).
    completion: u8,
    started: bool,
    completed: bool,
    failed: bool,
    seq: Option<u64>,
    /// For a flush under protocol C: the epoch whose barrier ack it awaits.
    barrier: Option<u64>,
}

impl Request {
    fn range(&self) -> Option<Range<u64>> {
        match self.kind {
            ReqKind::Write { offset, len, .. } => Some(offset..offset + len),
            ReqKind::Flush => None,
        }
    }
}

#[derive(Clone, Debug)]
enum Incoming {
    Write {
        seq: u64,
        offset: u64,
        len: u64,
        kind: WriteKind,
        fua: bool,
    },
    Barrier {
        epoch: u64,
        flush: bool,
    },
    Resync {
        id: u64,
        offset: u64,
        len: u64,
    },
}

/// The receiving side of the link: applies the peer's writes in epoch
/// order, never two overlapping ones at once.
#[derive(Debug, Default)]
struct Receiver {
    queue: VecDeque<Incoming>,
    /// Peer writes submitted locally, by (link, seq). Survives a link
    /// change: a write of the old link still running must keep later
    /// overlapping writes (the new link's, or the client's after a
    /// promotion) from landing before it.
    inflight: BTreeMap<OpId, Range<u64>>,
    /// Writes applied in the epoch being received.
    epoch_writes: u32,
    /// An ordering barrier's flush is running for this (link, epoch):
    /// nothing of the next epoch starts before it is done.
    flushing: Option<(u64, u64)>,
    /// Stability barriers' flushes running; later epochs go on meanwhile.
    stabilizing: std::collections::BTreeSet<(u64, u64)>,
    /// The epoch the next frame must belong to: frames arrive in order, so
    /// anything else is a broken or hostile sender.
    epoch: u64,
}

/// The state machine of one resource on one node.
#[derive(Debug)]
pub struct Core {
    cfg: Config,
    role: Role,
    peer_role: Role,
    cstate: ConnState,
    disk: DiskState,
    peer_disk: DiskState,
    gens: Generations,
    flags: u32,
    /// Current link, if any.
    link: Option<u64>,
    /// The peer's state report on this link (after WFReportParams).
    peer: Option<Report>,
    reqs: BTreeMap<ReqId, Request>,
    /// Client writes on their way to the local disk (AL or LOCAL pending),
    /// as (start, request) -> end. Requests stay in `reqs` until their
    /// epoch's barrier ack, thousands of them at 30k writes/s, so the
    /// overlap test a new write needs must not scan `reqs`. The live
    /// entries never overlap each other (a write starts only when none
    /// overlaps it), which makes the one with the greatest start below a
    /// range's end the only candidate. Entries are dropped when the local
    /// write finishes or the request goes; one that outlived its request
    /// by another path is dropped when a lookup meets it.
    writing: BTreeMap<(u64, ReqId), u64>,
    /// Writes waiting to start, in arrival order.
    waiting: VecDeque<ReqId>,
    /// Transfer log: seq -> request, until the peer wrote it.
    tl: BTreeMap<u64, ReqId>,
    /// Epoch of writes being sent; barriers close it.
    epoch: u64,
    next_seq: u64,
    rx: Receiver,
    /// Flushes waiting for their barrier ack, by epoch.
    barrier_waiters: BTreeMap<u64, Vec<ReqId>>,
    /// Replicated writes whose epoch's barrier ack has not come, by epoch.
    /// A write ack only says the peer's page cache has it; a power loss of
    /// the peer could still lose it, so it stays in the transfer log (and
    /// is marked out of sync if the link drops) until the barrier ack.
    unstable: BTreeMap<u64, Vec<ReqId>>,
    /// Generations must change before the next write (Primary lost its
    /// peer, or promoted without one).
    rng: u64,
    counters: Counters,
    /// A promotion waiting for the peer's answer: (token, force).
    promoting: Option<(u64, bool)>,
    /// The resync on the current link.
    sync: Option<resync::Sync>,
    /// Out-of-sync bytes as of the driver's last [`Core::pump`].
    local_oos: u64,
    /// `connect --discard-my-data`: lose a split brain on the next connect.
    discard_my_data: bool,
    /// The online verify on the current link.
    verify: Option<verify::Verify>,
    /// Blocks the last finished verify found different.
    last_verify: Option<u64>,
    /// The `fence-peer` handler runs; new writes wait for it.
    fencing: bool,
    /// A local I/O error of the attached disk was handled: the policy acts
    /// once per disk, not once per failed request.
    io_error: bool,
    /// Application I/O seen since the last tick / in the last tick.
    app_seen: bool,
    app_active: bool,
    /// SyncSource: bytes it may still read for the peer in this tick while
    /// application I/O is active (may run into debt by one request).
    source_budget: i64,
}

impl Core {
    /// A core for an attached disk, Secondary, not connected.
    /// `seed` feeds the generator of new generation identifiers.
    pub fn new(cfg: Config, attached: Attached, seed: u64) -> Core {
        let disk = disk_from_flags(attached.flags);
        Core {
            cfg,
            role: Role::Secondary,
            peer_role: Role::Unknown,
            cstate: ConnState::StandAlone,
            disk,
            peer_disk: DiskState::DUnknown,
            gens: attached.gens,
            flags: attached.flags,
            link: None,
            peer: None,
            reqs: BTreeMap::new(),
            writing: BTreeMap::new(),
            waiting: VecDeque::new(),
            tl: BTreeMap::new(),
            epoch: 1,
            next_seq: 1,
            rx: Receiver::default(),
            barrier_waiters: BTreeMap::new(),
            unstable: BTreeMap::new(),
            rng: seed | 1,
            promoting: None,
            sync: None,
            local_oos: 0,
            discard_my_data: false,
            verify: None,
            last_verify: None,
            fencing: false,
            io_error: false,
            app_seen: false,
            app_active: false,
            source_budget: 0,
            counters: Counters::default(),
        }
    }

    // ---- read-only views ----

    /// This node's role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The peer's role (Unknown while not connected).
    pub fn peer_role(&self) -> Role {
        self.peer_role
    }
    /// Connection state.
    pub fn cstate(&self) -> ConnState {
        self.cstate
    }
    /// Local disk state.
    pub fn disk(&self) -> DiskState {
        self.disk
    }
    /// The peer's disk state (DUnknown while not connected).
    pub fn peer_disk(&self) -> DiskState {
        self.peer_disk
    }
    /// Generation identifiers.
    pub fn generations(&self) -> Generations {
        self.gens
    }
    /// Superblock flags as the core last set them.
    pub fn flags(&self) -> u32 {
        self.flags
    }
    /// Protocol.
    pub fn protocol(&self) -> Protocol {
        self.cfg.protocol
    }
    /// Data size in bytes.
    pub fn size(&self) -> u64 {
        self.cfg.size
    }
    /// Counters.
    pub fn counters(&self) -> Counters {
        let mut c = self.counters;
        c.peer_pending = self.tl.len() as u64;
        c.unacked = (self.rx.inflight.len() + self.rx.queue.len()) as u64;
        c.app_pending = self.reqs.values().filter(|r| !r.completed).count() as u64;
        c
    }
    /// Client requests not yet answered.
    pub fn requests_in_flight(&self) -> usize {
        self.reqs.values().filter(|r| !r.completed).count()
    }
    /// Nothing is in flight in either direction.
    pub fn is_idle(&self) -> bool {
        self.reqs.is_empty()
            && self.tl.is_empty()
            && self.rx.inflight.is_empty()
            && self.rx.queue.is_empty()
            && self.rx.flushing.is_none()
            && self.rx.stabilizing.is_empty()
    }
    /// The report this node sends its peer.
    pub fn report(&self) -> Report {
        Report {
            role: self.role,
            disk: self.disk,
            protocol: self.cfg.protocol,
            size: self.cfg.size,
            gens: self.gens,
            flags: self.flags,
            oos: self.local_oos,
            discard_my_data: self.discard_my_data,
        }
    }

    // ---- administration ----

    /// `connect --discard-my-data`: if the next connect finds split brain,
    /// this node's changes are the ones thrown away.
    pub fn set_discard_my_data(&mut self, on: bool) {
        self.discard_my_data = on;
    }

    /// Start connecting (leave StandAlone).
    pub fn connect(&mut self) {
        if self.cstate == ConnState::StandAlone {
            self.cstate = ConnState::WFConnection;
        }
    }

    /// Drop the link and stay StandAlone.
    pub fn disconnect(&mut self, out: &mut Vec<Action>) {
        if let Some(link) = self.link {
            self.link_lost(link, ConnState::StandAlone, out);
            out.push(Action::Disconnect {
                reason: "disconnect requested".into(),
                standalone: true,
            });
        }
        self.cstate = ConnState::StandAlone;
    }

    /// `primary [--force]`. While connected, promotion is a state change
    /// of the pair: the peer is asked first (invariant 6 must hold even when
    /// both nodes are told to promote at the same moment), so the answer may
    /// be [`Promotion::Pending`], settled later by
    /// [`Action::PromotionDone`].
    pub fn promote(&mut self, force: bool, out: &mut Vec<Action>) -> Result<Promotion, Refusal> {
        if self.role == Role::Primary {
            return Ok(Promotion::Done);
        }
        if self.promoting.is_some() {
            return Err(Refusal::Other(
                "refusing to promote: a promotion is already in progress".into(),
            ));
        }
        // A connected peer answers for its own role: the one this node last
        // heard may be stale, as when an HA manager demotes the peer and
        // promotes this node the moment the demotion returned, before the
        // peer's state report arrived. Its answer comes after that report
        // (one ordered link), and the checks run again then.
        self.check_promotion(force, false)?;
        if self.cstate.is_connected() {
            let token = self.fresh_uuid();
            self.promoting = Some((token, force));
            out.push(Action::Send(Packet::PromoteRequest { token }));
            return Ok(Promotion::Pending);
        }
        self.do_promote(out);
        Ok(Promotion::Done)
    }

    fn check_promotion(&self, force: bool, peer_role_known: bool) -> Result<(), Refusal> {
        let connected = self.cstate.is_connected();
        if peer_role_known && connected && self.peer_role == Role::Primary {
            return Err(Refusal::PeerIsPrimary);
        }
        if self.cstate == ConnState::WFReportParams {
            return Err(Refusal::Other(
                "refusing to promote: still exchanging state with the peer".into(),
            ));
        }
        let usable = match self.disk {
            DiskState::UpToDate => true,
            // DRBD promotes a Consistent disk whose peer is unknown: nobody
            // can be newer as far as this node can tell.
            DiskState::Consistent => !connected,
            _ => false,
        };
        // `--force` cannot help a node without a disk: say so first.
        if no_disk(self.disk) {
            return Err(Refusal::Other("refusing to promote: no local disk".into()));
        }
        if !usable && !force {
            return Err(Refusal::NoUpToDateData);
        }
        if matches!(&self.sync, Some(s) if s.side == SyncSide::Target) {
            return Err(Refusal::Other(
                "refusing to promote: this node is the target of a running resync (disconnect first)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn do_promote(&mut self, out: &mut Vec<Action>) {
        let connected = self.cstate.is_connected();
        let usable = match self.disk {
            DiskState::UpToDate => true,
            DiskState::Consistent => !connected,
            _ => false,
        };
        // As DRBD: a connected peer with a disk receives every write from
        // now on (one behind is resynced by the bitmap it is already
        // tracked in), so only a promotion without one, or of data that is
        // not usable (forced), begins a new data generation. Rotating while
        // a SyncTarget finishes would hand it a generation we then leave.
        let peer_follows = connected && !no_disk(self.peer_disk) && usable;
        if !peer_follows {
            // Invariant 5: a new data generation begins before its first write.
            self.new_current_uuid(out);
        }
        if self.disk != DiskState::UpToDate {
            self.set_disk(DiskState::UpToDate, out);
        }
        let overwrite_peer = connected && self.peer_disk != DiskState::UpToDate && !usable;
        self.role = Role::Primary;
        self.persist_flags(flags::PRIMARY_IND, 0, out);
        if overwrite_peer && self.sync.is_none() {
            // Forced over a peer that may hold anything (a never-synced
            // pair): all of it differs, and the initial sync starts now.
            out.push(Action::Send(Packet::SyncStart {
                source: true,
                full: true,
            }));
            self.begin_sync(SyncSide::Source, true, out);
        }
        self.send_state(out);
    }

    /// `secondary [--force]`; `nbd_clients` is how many clients the
    /// frontend holds (with `force` the driver has already dropped them).
    pub fn demote(&mut self, nbd_clients: usize, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if self.role != Role::Primary {
            return Ok(());
        }
        if nbd_clients > 0 {
            return Err(Refusal::InUse(nbd_clients));
        }
        let busy = self.requests_in_flight();
        if busy > 0 {
            return Err(Refusal::Busy(busy));
        }
        self.role = Role::Secondary;
        self.persist_flags(0, flags::PRIMARY_IND, out);
        self.send_state(out);
        Ok(())
    }

    /// `new-current-uuid --clear-bitmap` on a connected fresh pair: both
    /// nodes take one new generation and count as UpToDate without a sync.
    pub fn new_current_uuid_clear_bitmap(&mut self, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if !self.cstate.is_connected() {
            return Err(Refusal::NotConnected);
        }
        if self.gens.current != UUID_JUST_CREATED
            || !matches!(self.peer, Some(p) if p.gens.current == UUID_JUST_CREATED)
        {
            return Err(Refusal::Other(
                "refusing to skip the initial sync: the pair has been used (its generations are not just-created)".into(),
            ));
        }
        if self.role == Role::Primary || self.peer_role == Role::Primary {
            return Err(Refusal::Other(
                "refusing to skip the initial sync while a node is Primary".into(),
            ));
        }
        let uuid = self.fresh_uuid();
        self.adopt_uuid(uuid, out);
        out.push(Action::Send(Packet::NewCurrentUuid { uuid }));
        self.send_state(out);
        Ok(())
    }

    /// `new-current-uuid` (without `--clear-bitmap`): begin a new data
    /// generation here, as DRBD does; the one left behind becomes the
    /// bitmap generation (when none is set yet), so the peer, still on it,
    /// is found behind by this node's bitmap at the next connect and
    /// resynced from it. Only without a peer (a rotation while connected
    /// would make the two nodes' generations disagree about data they
    /// both hold) and only on UpToDate data (a generation on anything less
    /// would later pass for good data).
    pub fn new_current_uuid_verb(&mut self, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if self.cstate.is_connected() || self.cstate == ConnState::WFReportParams {
            return Err(Refusal::Other(
                "refusing to start a new generation while connected (disconnect first; --clear-bitmap is for a fresh connected pair)".into(),
            ));
        }
        if self.disk != DiskState::UpToDate {
            return Err(Refusal::Other(format!(
                "refusing to start a new generation: the local data is {}, not UpToDate",
                self.disk
            )));
        }
        self.new_current_uuid(out);
        out.push(Action::Log(format!(
            "new current generation; generations now {}",
            fmt_gens(&self.gens)
        )));
        Ok(())
    }

    /// `detach`: give up the local disk. Only a Secondary can (a Primary
    /// would have to read through its peer, which tandem does not do yet),
    /// and only when no peer write is in flight; the driver closes the
    /// metadata cleanly afterwards. The peer marks everything from now on
    /// out of sync and starts a new generation, so the reattached disk is
    /// found to be behind.
    pub fn detach(&mut self, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if self.disk == DiskState::Diskless {
            return Ok(());
        }
        if self.disk == DiskState::Failed {
            return Err(Refusal::Other(
                "the disk failed and is detached as soon as its I/O in flight is done".into(),
            ));
        }
        if self.role == Role::Primary {
            return Err(Refusal::Other(
                "refusing to detach: this node is Primary (demote it first)".into(),
            ));
        }
        self.no_sync_running()?;
        if !(self.rx.inflight.is_empty()
            && self.rx.queue.is_empty()
            && self.rx.flushing.is_none()
            && self.rx.stabilizing.is_empty())
        {
            return Err(Refusal::Busy(self.rx.inflight.len() + self.rx.queue.len()));
        }
        self.disk = DiskState::Diskless;
        self.send_state(out);
        Ok(())
    }

    /// `attach`: take a disk (again) with what its metadata says. When
    /// connected, the link is renegotiated so that the generation
    /// identifiers decide who is ahead, as on any connect.
    pub fn attach(&mut self, attached: Attached, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if self.disk != DiskState::Diskless {
            return Err(Refusal::Other("a disk is attached already".into()));
        }
        self.gens = attached.gens;
        self.flags = attached.flags;
        self.disk = disk_from_flags(attached.flags);
        self.io_error = false;
        if let Some(link) = self.link {
            out.push(Action::Disconnect {
                reason: "renegotiating after attach".into(),
                standalone: false,
            });
            self.link_lost(link, ConnState::Unconnected, out);
        }
        Ok(())
    }

    /// `outdate`: mark the local data Outdated (fencing).
    pub fn outdate(&mut self, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if self.role == Role::Primary {
            return Err(Refusal::Other(
                "refusing to outdate: this node is Primary".into(),
            ));
        }
        if matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
            self.set_disk(DiskState::Outdated, out);
            self.send_state(out);
        }
        Ok(())
    }

    // ---- events ----

    /// Feed one event; append what the driver must do to `out`.
    pub fn handle(&mut self, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::Write {
                req,
                offset,
                len,
                kind,
                fua,
            } => self.client_write(req, offset, len, kind, fua, out),
            Event::Flush { req } => self.client_flush(req, out),
            Event::AlReady { req, ok } => self.al_ready(req, ok, out),
            Event::LocalDone { op, ok } => self.local_done(op, ok, out),
            Event::ReadUnsent { op } => {
                self.counters.local_pending = self.counters.local_pending.saturating_sub(1);
                if let OpId::ResyncRead { link, id } = op {
                    self.rs_read_done(link, id, false, out);
                }
            }
            Event::LinkUp { link } => self.link_up(link, out),
            Event::Digests { op, digests } => self.digests_done(op, digests, out),
            Event::FenceDone { code } => {
                if !self.fencing {
                    return;
                }
                self.fencing = false;
                if matches!(code, Some(4 | 7)) {
                    out.push(Action::Log(format!(
                        "fence-peer returned {}: the peer is outdated; writes resume",
                        code.unwrap_or_default()
                    )));
                    self.persist_flags(flags::PEER_OUT_DATED, 0, out);
                    if !self.cstate.is_connected() {
                        self.peer_disk = DiskState::Outdated;
                    }
                } else {
                    out.push(Action::Log(format!(
                        "fence-peer returned {}: the peer was not outdated; writes resume (resource-only fencing)",
                        code.map_or("nothing".to_string(), |c| c.to_string())
                    )));
                }
                self.start_waiting(out);
            }
            Event::LinkDown { link, cause } => self.link_lost(link, cause, out),
            Event::Tick => {
                // Measured on 4 KiB QD32 random writes: a barrier every tick
                // (100 ms) beats one a second by a fifth (smaller flushes on
                // the peer stall less) and one every 1024 writes by a third.
                if self.cstate.is_connected() && self.unstable.contains_key(&self.epoch) {
                    self.close_epoch(false, out);
                }
                self.sync_tick(out);
            }
            Event::Packet { link, packet } => {
                if self.link == Some(link) {
                    self.packet(packet, out);
                }
            }
        }
    }

    fn client_write(
        &mut self,
        req: ReqId,
        offset: u64,
        len: u64,
        kind: WriteKind,
        fua: bool,
        out: &mut Vec<Action>,
    ) {
        if self.role != Role::Primary {
            out.push(Action::Complete {
                req,
                result: Err(IoFailure::NotPrimary),
            });
            return;
        }
        self.app_seen = true;
        self.reqs.insert(
            req,
            Request {
                kind: ReqKind::Write {
                    offset,
                    len,
                    kind,
                    fua,
                },
                pending: 0,
                completion: 0,
                started: false,
                completed: false,
                failed: false,
                seq: None,
                barrier: None,
            },
        );
        self.waiting.push_back(req);
        self.start_waiting(out);
    }

    /// Start waiting writes in order while they can: a write overlapping an
    /// earlier one that has not finished locally waits, so both nodes apply
    /// overlapping writes in the same order; a full transfer log holds
    /// everything back.
    fn start_waiting(&mut self, out: &mut Vec<Action>) {
        if self.fencing {
            // Until fence-peer answers, the peer may be promoted elsewhere:
            // no new write may land that it would not have.
            return;
        }
        while let Some(&req) = self.waiting.front() {
            let Some(range) = self.reqs.get(&req).and_then(Request::range) else {
                self.waiting.pop_front();
                continue;
            };
            if self.tl.len() >= MAX_TRANSFER_LOG {
                return;
            }
            let conflict = self.overlaps_local_write(&range);
            // After a promotion the old Primary's writes may still be
            // running or queued here; a newer client write must land after.
            let overlaps = |o: &Range<u64>| o.start < range.end && range.start < o.end;
            let peer_conflict = self.rx.inflight.values().any(overlaps)
                || self
                    .sync
                    .as_ref()
                    .is_some_and(|s| s.reads.values().any(overlaps))
                || self.rx.queue.iter().any(|i| match i {
                    Incoming::Write { offset, len, .. } | Incoming::Resync { offset, len, .. } => {
                        overlaps(&(*offset..offset + len))
                    }
                    Incoming::Barrier { .. } => false,
                });
            if conflict || peer_conflict {
                return;
            }
            self.waiting.pop_front();
            if let Some(r) = self.reqs.get_mut(&req) {
                r.started = true;
                r.pending = AL | LOCAL;
                r.completion = AL | LOCAL;
                self.writing.insert((range.start, req), range.end);
            }
            out.push(Action::AlBegin { req, range });
        }
    }

    /// Whether a started client write still on its way to the local disk
    /// overlaps `range`.
    fn overlaps_local_write(&mut self, range: &Range<u64>) -> bool {
        loop {
            let Some((&(start, id), &end)) =
                self.writing.range(..(range.end, ReqId::MIN)).next_back()
            else {
                return false;
            };
            let live = self
                .reqs
                .get(&id)
                .is_some_and(|r| r.started && r.pending & (LOCAL | AL) != 0);
            if live {
                return end > range.start;
            }
            self.writing.remove(&(start, id));
        }
    }

    /// `req` no longer writes locally (done, failed or gone).
    fn left_disk(&mut self, req: ReqId, range: Option<Range<u64>>) {
        if let Some(range) = range {
            self.writing.remove(&(range.start, req));
        }
    }

    fn al_ready(&mut self, req: ReqId, ok: bool, out: &mut Vec<Action>) {
        let replicate = self.cstate.is_connected() && self.peer_accepts_writes();
        let protocol = self.cfg.protocol;
        let Some(r) = self.reqs.get_mut(&req) else {
            return;
        };
        if r.pending & AL == 0 {
            return;
        }
        r.pending &= !AL;
        r.completion &= !AL;
        let ReqKind::Write {
            offset,
            len,
            kind,
            fua,
        } = r.kind
        else {
            return;
        };
        if !ok {
            // Without the AL entry a crash could forget this write: refuse it.
            r.failed = true;
            r.pending = 0;
            out.push(Action::Log(format!(
                "activity log update failed; write at {offset}+{len} refused"
            )));
            self.finish(req, out);
            self.local_io_error("an activity log update", out);
            return;
        }
        if replicate {
            let seq = self.next_seq;
            self.next_seq += 1;
            r.seq = Some(seq);
            r.pending |= STABLE;
            match protocol {
                // As in DRBD (and docs/wire-protocol.md), only protocol C
                // has a write ack: under A and B the barrier ack retires a
                // write (a failed one still gets a negative ack). A write
                // ack there would cost both nodes a frame and a wake-up per
                // write for nothing the Primary waits on.
                Protocol::A => {}
                Protocol::B => {
                    r.pending |= RECV_ACK;
                    r.completion |= RECV_ACK;
                }
                Protocol::C => {
                    r.pending |= WRITE_ACK;
                    r.completion |= WRITE_ACK;
                }
            }
            self.tl.insert(seq, req);
            if kind == WriteKind::Data {
                self.counters.net_sent += len;
            }
            out.push(Action::Send(Packet::Data {
                req,
                seq,
                epoch: self.epoch,
                offset,
                len,
                kind,
                fua,
            }));
            let members = self.unstable.entry(self.epoch).or_default();
            members.push(req);
            if members.len() >= MAX_EPOCH_WRITES {
                self.close_epoch(false, out);
            }
        } else {
            // Invariant 3: the peer will not see this write.
            out.push(Action::MarkOutOfSync {
                range: offset..offset + len,
            });
        }
        self.counters.local_pending += 1;
        out.push(Action::LocalWrite {
            op: OpId::Client(req),
            offset,
            len,
            kind,
            fua,
        });
    }

    /// Application I/O the core does not see (reads) happened: the dynamic
    /// resync controller counts it.
    pub fn note_app_io(&mut self) {
        self.app_seen = true;
    }

    fn client_flush(&mut self, req: ReqId, out: &mut Vec<Action>) {
        self.app_seen = true;
        let mut r = Request {
            kind: ReqKind::Flush,
            pending: LOCAL,
            completion: LOCAL,
            started: true,
            completed: false,
            failed: false,
            seq: None,
            barrier: None,
        };
        if self.cstate.is_connected() && self.role == Role::Primary {
            let epoch = self.close_epoch(true, out);
            // Invariant 4: under C a flush means stable on the peer too.
            if self.cfg.protocol == Protocol::C {
                r.pending |= BARRIER_ACK;
                r.completion |= BARRIER_ACK;
                r.barrier = Some(epoch);
                self.barrier_waiters.entry(epoch).or_default().push(req);
            }
        }
        self.reqs.insert(req, r);
        self.counters.local_pending += 1;
        out.push(Action::LocalFlush {
            op: OpId::Client(req),
        });
    }

    /// Send the barrier that closes the current epoch; its ack says every
    /// write of it is stable on the peer. A client's flush orders
    /// (`ordering`: the peer starts nothing of the next epoch before the
    /// flush is done); a barrier that only tracks stability lets the peer
    /// go on writing while it flushes.
    fn close_epoch(&mut self, ordering: bool, out: &mut Vec<Action>) -> u64 {
        let epoch = self.epoch;
        self.epoch += 1;
        self.counters.epochs += 1;
        out.push(Action::Send(Packet::Barrier {
            epoch,
            flush: ordering,
        }));
        epoch
    }

    fn local_done(&mut self, op: OpId, ok: bool, out: &mut Vec<Action>) {
        if !ok {
            let what = match op {
                OpId::Client(_) => Some("an application request"),
                OpId::Peer { .. } => Some("a write from the peer"),
                OpId::PeerBarrier { .. } => Some("a flush for the peer's barrier"),
                OpId::Resync { .. } => Some("a resync write"),
                OpId::ResyncFlush { .. } => Some("a resync flush"),
                OpId::ResyncRead { .. } => Some("a resync read"),
                // Digests only compare; a read that fails there is retried
                // by the resync or verify that follows.
                OpId::VerifyRead { .. } | OpId::CsumRead { .. } => None,
            };
            if let Some(what) = what {
                self.local_io_error(what, out);
            }
        }
        self.counters.local_pending = self.counters.local_pending.saturating_sub(1);
        match op {
            OpId::Client(req) => {
                let mut poisoned = None;
                let Some(r) = self.reqs.get_mut(&req) else {
                    return;
                };
                r.pending &= !LOCAL;
                let range = r.range();
                self.left_disk(req, range);
                let Some(r) = self.reqs.get_mut(&req) else {
                    return;
                };
                if !ok {
                    r.failed = true;
                    // The peer may have written what this disk could not:
                    // the replicas differ there.
                    if let Some(range) = r.range() {
                        out.push(Action::MarkOutOfSync {
                            range: range.clone(),
                        });
                        poisoned = Some(range);
                    }
                }
                if let (true, ReqKind::Write { len, kind, .. }) = (ok, &r.kind) {
                    if *kind == WriteKind::Data {
                        self.counters.disk_written += len;
                    }
                }
                if let Some(range) = poisoned {
                    self.poison_served(&range);
                }
                self.finish(req, out);
                self.start_waiting(out);
                self.start_rs_reads(out);
            }
            OpId::Resync { link, .. } => {
                if let Some(range) = self.rx.inflight.remove(&op) {
                    self.rs_write_done(link, range, ok, out);
                }
                self.drain_incoming(out);
                self.start_waiting(out);
            }
            OpId::ResyncFlush { link, n } => self.rs_flush_done(link, n, ok, out),
            OpId::ResyncRead { link, id } => self.rs_read_done(link, id, ok, out),
            OpId::VerifyRead { .. } | OpId::CsumRead { .. } => {}
            OpId::Peer { link, seq } => {
                if let Some(range) = self.rx.inflight.remove(&op) {
                    if !ok {
                        // This disk may hold anything there now; the peer
                        // marks it too when the negative ack arrives.
                        out.push(Action::MarkOutOfSync {
                            range: range.clone(),
                        });
                    }
                    self.counters.disk_written += range.end - range.start;
                    if self.link == Some(link) {
                        if !ok {
                            out.push(Action::Send(Packet::NegAck(seq)));
                        } else if self.cfg.protocol == Protocol::C {
                            out.push(Action::Send(Packet::WriteAck(seq)));
                        }
                    }
                }
                self.drain_incoming(out);
                self.start_waiting(out);
                self.start_rs_reads(out);
            }
            OpId::PeerBarrier { link, epoch } if self.rx.stabilizing.remove(&(link, epoch)) => {
                if self.link == Some(link) {
                    if ok {
                        // A later flush also covers earlier epochs, so acks
                        // may overtake each other: each covers all before it.
                        out.push(Action::Send(Packet::BarrierAck { epoch, writes: 0 }));
                    } else {
                        out.push(Action::Disconnect {
                            reason: format!("local flush for epoch {epoch} failed"),
                            standalone: false,
                        });
                    }
                }
                self.drain_incoming(out);
            }
            OpId::PeerBarrier { link, epoch } => {
                if self.rx.flushing == Some((link, epoch)) {
                    self.rx.flushing = None;
                    if self.link == Some(link) {
                        // A failed flush is not an ack: the primary's flush
                        // waits until the link drops and marks the epoch.
                        if ok {
                            out.push(Action::Send(Packet::BarrierAck {
                                epoch,
                                writes: self.rx.epoch_writes,
                            }));
                        } else {
                            out.push(Action::Disconnect {
                                reason: format!("local flush for epoch {epoch} failed"),
                                standalone: false,
                            });
                        }
                    }
                    if self.link == Some(link) {
                        self.rx.epoch_writes = 0;
                    }
                    self.drain_incoming(out);
                }
                self.start_waiting(out);
            }
        }
    }

    /// Complete and retire a client request as its conditions clear.
    fn finish(&mut self, req: ReqId, out: &mut Vec<Action>) {
        let protocol = self.cfg.protocol;
        let Some(r) = self.reqs.get_mut(&req) else {
            return;
        };
        // A write still waiting to start has nothing pending yet: it is not done.
        if !r.started {
            return;
        }
        if !r.completed && (r.pending & r.completion == 0 || (r.failed && r.pending & LOCAL == 0)) {
            r.completed = true;
            // Invariant 1: a successful replicated write under C completes
            // only once the peer wrote it, under B once it received it.
            debug_assert!(
                r.failed
                    || r.seq.is_none()
                    || match protocol {
                        Protocol::C => r.pending & WRITE_ACK == 0,
                        Protocol::B => r.pending & RECV_ACK == 0,
                        Protocol::A => true,
                    }
            );
            out.push(Action::Complete {
                req,
                result: if r.failed { Err(IoFailure::Io) } else { Ok(()) },
            });
        }
        if r.completed && r.pending == 0 {
            let range = r.range();
            let started = r.started;
            let seq = r.seq;
            self.reqs.remove(&req);
            self.left_disk(req, range.clone());
            if let Some(seq) = seq {
                self.tl.remove(&seq);
            }
            if let (Some(range), true) = (range, started) {
                out.push(Action::AlEnd { range });
            }
        }
    }

    fn peer_accepts_writes(&self) -> bool {
        !matches!(
            self.peer_disk,
            DiskState::Diskless | DiskState::Failed | DiskState::DUnknown
        )
    }

    // ---- the link ----

    fn link_up(&mut self, link: u64, out: &mut Vec<Action>) {
        if self.cstate == ConnState::StandAlone {
            out.push(Action::Disconnect {
                reason: "StandAlone: not accepting a link".into(),
                standalone: true,
            });
            return;
        }
        if let Some(old) = self.link {
            self.link_lost(old, ConnState::NetworkFailure, out);
        }
        self.link = Some(link);
        self.peer = None;
        self.epoch = 1;
        self.next_seq = 1;
        self.rx = Receiver {
            epoch: 1,
            inflight: std::mem::take(&mut self.rx.inflight),
            flushing: self.rx.flushing,
            stabilizing: std::mem::take(&mut self.rx.stabilizing),
            ..Receiver::default()
        };
        self.cstate = ConnState::WFReportParams;
        out.push(Action::Send(Packet::State(self.report())));
    }

    /// The link is gone: whatever the peer has not confirmed is out of sync.
    fn link_lost(&mut self, link: u64, cause: ConnState, out: &mut Vec<Action>) {
        if self.link != Some(link) {
            return;
        }
        self.link = None;
        self.peer = None;
        let was_connected = self.cstate.is_connected();
        let peer_was_up_to_date = self.peer_disk == DiskState::UpToDate;
        self.cstate = if cause == ConnState::StandAlone {
            ConnState::StandAlone
        } else {
            // The driver retries every connect-int; DRBD shows the cause
            // only transiently.
            ConnState::WFConnection
        };
        self.peer_role = Role::Unknown;
        self.peer_disk = DiskState::DUnknown;
        if self.verify.take().is_some() {
            out.push(Action::Log(
                "online verify interrupted by the link loss".into(),
            ));
        }
        if let Some(s) = self.sync.take() {
            out.push(Action::Log(format!(
                "resync interrupted as {:?}; it resumes from the bitmap on the next connect",
                s.side
            )));
        }
        if self.promoting.take().is_some() {
            out.push(Action::PromotionDone(Err(Refusal::Other(
                "refusing to promote: the link to the peer dropped while asking it; try again"
                    .into(),
            ))));
        }
        // Invariant 3: every write the peer did not confirm as written.
        let tl: Vec<(u64, ReqId)> = std::mem::take(&mut self.tl).into_iter().collect();
        for (_, req) in tl {
            if let Some(r) = self.reqs.get_mut(&req) {
                if let Some(range) = r.range() {
                    out.push(Action::MarkOutOfSync { range });
                }
                r.pending &= !(WRITE_ACK | RECV_ACK | STABLE);
                r.completion &= !(WRITE_ACK | RECV_ACK);
                r.seq = None;
            }
        }
        self.unstable.clear();
        for (_, reqs) in std::mem::take(&mut self.barrier_waiters) {
            for req in reqs {
                if let Some(r) = self.reqs.get_mut(&req) {
                    r.pending &= !BARRIER_ACK;
                    r.completion &= !BARRIER_ACK;
                }
            }
        }
        // Peer writes not yet started are dropped: the sender marks them.
        self.rx.queue.clear();
        let ids: Vec<ReqId> = self.reqs.keys().copied().collect();
        for req in ids {
            self.finish(req, out);
        }
        if self.role == Role::Primary && (was_connected || peer_was_up_to_date) {
            // Invariant 5: writes from now on are a generation the peer lacks.
            self.new_current_uuid(out);
            if self.cfg.fencing && !self.fencing {
                self.fencing = true;
                out.push(Action::Log(
                    "lost the peer while Primary: new writes wait for the fence-peer handler"
                        .into(),
                ));
                out.push(Action::FencePeer);
            }
        }
        self.start_waiting(out);
    }

    fn packet(&mut self, packet: Packet, out: &mut Vec<Action>) {
        match packet {
            Packet::State(report) => self.peer_state(report, out),
            Packet::Data {
                seq,
                epoch,
                offset,
                len,
                kind,
                fua,
                ..
            } => {
                if self.role == Role::Primary {
                    self.protocol_error("peer sent data to a Primary", out);
                    return;
                }
                let inside = matches!(offset.checked_add(len), Some(end) if end <= self.cfg.size);
                if !inside || len == 0 {
                    self.protocol_error(
                        &format!("peer write {offset}+{len} is outside the device"),
                        out,
                    );
                    return;
                }
                if matches!(self.disk, DiskState::Diskless | DiskState::Failed) {
                    // Nowhere to write it: the sender marks it out of sync.
                    out.push(Action::Send(Packet::NegAck(seq)));
                    return;
                }
                if !self.frame_fits(epoch, "write", out) {
                    return;
                }
                if kind == WriteKind::Data {
                    self.counters.net_received += len;
                }
                if self.cfg.protocol == Protocol::B {
                    out.push(Action::Send(Packet::RecvAck(seq)));
                }
                self.rx.queue.push_back(Incoming::Write {
                    seq,
                    offset,
                    len,
                    kind,
                    fua,
                });
                self.drain_incoming(out);
            }
            Packet::Barrier { epoch, flush } => {
                if !self.frame_fits(epoch, "barrier", out) {
                    return;
                }
                self.rx.epoch += 1;
                self.rx.queue.push_back(Incoming::Barrier { epoch, flush });
                self.drain_incoming(out);
            }
            Packet::RecvAck(seq) => {
                if let Some(&req) = self.tl.get(&seq) {
                    if let Some(r) = self.reqs.get_mut(&req) {
                        r.pending &= !RECV_ACK;
                    }
                    self.finish(req, out);
                }
            }
            Packet::WriteAck(seq) => {
                if let Some(&req) = self.tl.get(&seq) {
                    if let Some(r) = self.reqs.get_mut(&req) {
                        r.pending &= !(WRITE_ACK | RECV_ACK);
                    }
                    self.finish(req, out);
                }
            }
            Packet::NegAck(seq) => {
                if let Some(req) = self.tl.remove(&seq) {
                    if let Some(r) = self.reqs.get_mut(&req) {
                        let range = r.range();
                        r.pending &= !(WRITE_ACK | RECV_ACK | STABLE);
                        r.seq = None;
                        if let Some(range) = range {
                            out.push(Action::MarkOutOfSync {
                                range: range.clone(),
                            });
                            self.poison_served(&range);
                        }
                    }
                    self.finish(req, out);
                    self.start_waiting(out);
                }
            }
            Packet::BarrierAck { epoch, .. } => {
                // Acks come in epoch order; this one covers every epoch up
                // to it.
                let later_unstable = self.unstable.split_off(&(epoch + 1));
                let done = std::mem::replace(&mut self.unstable, later_unstable);
                let later_waiters = self.barrier_waiters.split_off(&(epoch + 1));
                let flushes = std::mem::replace(&mut self.barrier_waiters, later_waiters);
                for req in done.into_values().flatten() {
                    if let Some(r) = self.reqs.get_mut(&req) {
                        r.pending &= !STABLE;
                    }
                    self.finish(req, out);
                }
                for req in flushes.into_values().flatten() {
                    if let Some(r) = self.reqs.get_mut(&req) {
                        r.pending &= !BARRIER_ACK;
                    }
                    self.finish(req, out);
                }
                self.start_waiting(out);
            }
            Packet::PromoteRequest { token } => {
                let grant = match self.promoting {
                    _ if self.role == Role::Primary => false,
                    Some((mine, _)) if token < mine => {
                        self.promoting = None;
                        out.push(Action::PromotionDone(Err(Refusal::PeerIsPrimary)));
                        true
                    }
                    Some(_) => false,
                    None => true,
                };
                if grant {
                    // From now on this node refuses its own promotion.
                    self.peer_role = Role::Primary;
                }
                out.push(Action::Send(Packet::PromoteReply { granted: grant }));
            }
            Packet::PromoteReply { granted } => {
                if let Some((_, force)) = self.promoting.take() {
                    if !granted {
                        out.push(Action::PromotionDone(Err(Refusal::PeerIsPrimary)));
                    } else {
                        match self.check_promotion(force, true) {
                            Ok(()) => {
                                // Reported first: the driver answers the
                                // operator, and the actions that follow
                                // (new generation, flags, state) run before
                                // anything else can reach the core.
                                out.push(Action::PromotionDone(Ok(())));
                                self.do_promote(out);
                            }
                            Err(e) => {
                                // The peer counts us as Primary: correct it.
                                self.send_state(out);
                                out.push(Action::PromotionDone(Err(e)));
                            }
                        }
                    }
                }
            }
            p @ (Packet::SyncStart { .. }
            | Packet::SyncUuid { .. }
            | Packet::Bitmap(_)
            | Packet::BitmapDone
            | Packet::SyncEnd
            | Packet::RsRequest { .. }
            | Packet::RsData { .. }
            | Packet::RsNegAck { .. }
            | Packet::CsumRequest { .. }
            | Packet::RsInSync { .. }
            | Packet::RsAck { .. }
            | Packet::SyncPause { .. }) => self.sync_packet(p, out),
            p @ (Packet::OvRequest { .. } | Packet::OvReply { .. } | Packet::OvDone { .. }) => {
                self.verify_packet(p, out)
            }
            Packet::NewCurrentUuid { uuid } => {
                if self.gens.current == UUID_JUST_CREATED && self.role == Role::Secondary {
                    self.adopt_uuid(uuid, out);
                    self.send_state(out);
                } else {
                    out.push(Action::Log(format!(
                        "ignoring the peer's new-current-uuid {uuid:016X}: this node's data is not just-created"
                    )));
                }
            }
        }
    }

    /// Start what the receive queue allows: writes of the current epoch
    /// that overlap nothing in flight, and a barrier once its epoch drained.
    fn drain_incoming(&mut self, out: &mut Vec<Action>) {
        while let Some(head) = self.rx.queue.front() {
            if self.rx.flushing.is_some() {
                return;
            }
            match *head {
                Incoming::Write {
                    seq,
                    offset,
                    len,
                    kind,
                    fua,
                    ..
                } => {
                    let started = self.start_incoming(
                        |link| OpId::Peer { link, seq },
                        offset,
                        len,
                        kind,
                        fua,
                        out,
                    );
                    if !started {
                        return;
                    }
                    self.rx.epoch_writes += 1;
                }
                Incoming::Resync { id, offset, len } => {
                    let started = self.start_incoming(
                        |link| OpId::Resync { link, id },
                        offset,
                        len,
                        WriteKind::Data,
                        false,
                        out,
                    );
                    if !started {
                        return;
                    }
                }
                Incoming::Barrier { epoch, flush } => {
                    // Flush is a barrier: nothing of the next epoch starts
                    // before this one is done (and stable when asked).
                    if !self.rx.inflight.is_empty() {
                        return;
                    }
                    let Some(link) = self.link else {
                        return;
                    };
                    self.rx.queue.pop_front();
                    self.counters.local_pending += 1;
                    out.push(Action::LocalFlush {
                        op: OpId::PeerBarrier { link, epoch },
                    });
                    self.rx.epoch_writes = 0;
                    if flush {
                        self.rx.flushing = Some((link, epoch));
                        return;
                    }
                    self.rx.stabilizing.insert((link, epoch));
                }
            }
        }
    }

    /// Start the write at the head of the receive queue unless it overlaps
    /// one still running here (or there is no link); true when started.
    fn start_incoming(
        &mut self,
        op: impl FnOnce(u64) -> OpId,
        offset: u64,
        len: u64,
        kind: WriteKind,
        fua: bool,
        out: &mut Vec<Action>,
    ) -> bool {
        let range = offset..offset + len;
        let overlap = self
            .rx
            .inflight
            .values()
            .any(|o| o.start < range.end && range.start < o.end);
        let Some(link) = self.link.filter(|_| !overlap) else {
            return false;
        };
        let op = op(link);
        self.rx.queue.pop_front();
        self.rx.inflight.insert(op, range);
        self.counters.local_pending += 1;
        out.push(Action::LocalWrite {
            op,
            offset,
            len,
            kind,
            fua,
        });
        true
    }

    /// A received write or barrier must belong to the open epoch (frames
    /// arrive in order) and find room in the bounded receive queue;
    /// otherwise the link is dropped as a protocol error.
    fn frame_fits(&mut self, epoch: u64, what: &str, out: &mut Vec<Action>) -> bool {
        if self.rx.queue.len() >= MAX_PEER_QUEUE {
            self.protocol_error("peer overran the receive queue", out);
            return false;
        }
        if epoch != self.rx.epoch {
            let open = self.rx.epoch;
            self.protocol_error(
                &format!("peer {what} in epoch {epoch} while epoch {open} is open"),
                out,
            );
            return false;
        }
        true
    }

    fn protocol_error(&mut self, why: &str, out: &mut Vec<Action>) {
        if let Some(link) = self.link {
            out.push(Action::Disconnect {
                reason: format!("protocol error: {why}"),
                standalone: false,
            });
            self.link_lost(link, ConnState::ProtocolError, out);
        }
    }

    fn refuse_peer(&mut self, why: String, out: &mut Vec<Action>) {
        if let Some(link) = self.link {
            self.link_lost(link, ConnState::StandAlone, out);
            out.push(Action::Disconnect {
                reason: why,
                standalone: true,
            });
        }
    }

    fn peer_state(&mut self, report: Report, out: &mut Vec<Action>) {
        let first = self.peer.is_none();
        self.peer = Some(report);
        if first {
            if report.size != self.cfg.size {
                return self.refuse_peer(
                    format!(
                        "the peer's data size is {} bytes, this node's {}: refusing to connect",
                        report.size, self.cfg.size
                    ),
                    out,
                );
            }
            if report.protocol != self.cfg.protocol {
                return self.refuse_peer(
                    format!(
                        "the peer uses protocol {}, this node {}: refusing to connect",
                        report.protocol, self.cfg.protocol
                    ),
                    out,
                );
            }
            if report.role == Role::Primary && self.role == Role::Primary {
                out.push(Action::SplitBrain {
                    rule: "both-primary",
                });
                return self.refuse_peer(
                    "split brain: both nodes are Primary; disconnecting".into(),
                    out,
                );
            }
            // No data on one side: nothing to compare, nothing to resync.
            let diskless = no_disk(self.disk) || no_disk(report.disk);
            let (rule, decision) = if diskless {
                (gi::Rule::Equal, gi::Decision::NoSync)
            } else {
                gi::compare(&self.gens, &report.gens)
            };
            let decision =
                if rule == gi::Rule::Equal && decision == gi::Decision::NoSync && !diskless {
                    self.equal_direction(&report)
                } else {
                    decision
                };
            out.push(Action::Log(format!(
                "generations: mine {}, peer {}: {}",
                fmt_gens(&self.gens),
                fmt_gens(&report.gens),
                if diskless {
                    "not compared (a node has no disk)".to_string()
                } else {
                    format!("rule {}", rule.name())
                }
            )));
            let decision = if diskless {
                decision
            } else {
                self.by_disk_states(rule, decision, report.disk, out)
            };
            let decision = match decision {
                gi::Decision::SplitBrain => {
                    out.push(Action::SplitBrain { rule: rule.name() });
                    match self.resolve_split_brain(rule, &report, out) {
                        Some(d) => d,
                        None => {
                            return self.refuse_peer(
                                format!("split brain detected ({}); disconnecting", rule.name()),
                                out,
                            )
                        }
                    }
                }
                d => d,
            };
            match decision {
                gi::Decision::SplitBrain => {}
                gi::Decision::Unrelated => {
                    return self.refuse_peer(
                        "unrelated data: the peer's generations share nothing with ours; refusing to connect".into(),
                        out,
                    );
                }
                gi::Decision::NoSync => {
                    if matches!(self.disk, DiskState::Consistent | DiskState::Outdated)
                        && matches!(report.disk, DiskState::UpToDate | DiskState::Consistent)
                    {
                        self.set_disk(DiskState::UpToDate, out);
                    }
                }
                gi::Decision::Source { .. } if self.disk == DiskState::Inconsistent => {
                    return self.refuse_peer(
                        "the peer needs a resync but this node's data is Inconsistent too; refusing to connect (use primary --force on the node to keep)".into(),
                        out,
                    );
                }
                gi::Decision::Target { .. } if self.role == Role::Primary => {
                    return self.refuse_peer(
                        "the peer has newer data, but this node is Primary and cannot become SyncTarget; demote it first".into(),
                        out,
                    );
                }
                gi::Decision::Target { .. } if report.disk == DiskState::Inconsistent => {
                    return self.refuse_peer(
                        "this node needs a resync but the peer's data is Inconsistent; refusing to connect".into(),
                        out,
                    );
                }
                gi::Decision::Source { .. } | gi::Decision::Target { .. } => {}
            }
            self.cstate = ConnState::Connected;
            // A peer with a disk on our current generation holds it, so a
            // later rotation keeps it. A SyncTarget adopts it only at the
            // resync's end (`take_current` and `finish_sync_source` mark it
            // then; a source that missed the end is recognised by the rule
            // `missed-resync-end`); a diskless peer holds no generation.
            let shared = if !diskless && report.gens.current == self.gens.current {
                flags::CURRENT_SHARED
            } else {
                0
            };
            out.push(Action::PersistFlags {
                set: flags::CONNECTED_IND | shared,
                clear: 0,
            });
            self.flags |= flags::CONNECTED_IND | shared;
            self.persist_flags(0, flags::PEER_OUT_DATED, out);
            // Used once, as DRBD does.
            self.discard_my_data = false;
            match decision {
                gi::Decision::Source { full } => {
                    if self.disk == DiskState::Consistent {
                        self.set_disk(DiskState::UpToDate, out);
                    }
                    self.begin_sync(SyncSide::Source, full, out);
                }
                gi::Decision::Target { full } => self.begin_sync(SyncSide::Target, full, out),
                _ => {}
            }
            self.send_state(out);
        } else if report.role == Role::Primary && self.role == Role::Primary {
            out.push(Action::SplitBrain {
                rule: "both-primary",
            });
            return self.refuse_peer(
                "split brain: both nodes are Primary; disconnecting".into(),
                out,
            );
        }
        let peer_lost_disk =
            no_disk(report.disk) && !no_disk(self.peer_disk) && self.role == Role::Primary;
        self.peer_role = report.role;
        self.peer_disk = report.disk;
        if peer_lost_disk {
            // Invariant 5: from here on the peer's disk misses writes; when
            // it comes back the generations must say so.
            self.new_current_uuid(out);
        }
        let source_done = matches!(&self.sync, Some(s) if s.side == SyncSide::Source && s.running);
        if !first && source_done && report.disk == DiskState::UpToDate {
            self.finish_sync_source(report.gens.current, out);
        }
        self.start_waiting(out);
    }

    /// DRBD's "becoming sync target due to disk states": when exactly one
    /// node is Inconsistent, its data is worth nothing (a resync's target
    /// cut short, an invalidated disk), so it is the target whatever the
    /// generations say. They can have moved past it: the source starts a
    /// new generation at every link loss while Primary, and its two history
    /// slots forget the one the target was on, which would otherwise read as
    /// split brain (a split-brain victim cut short in its resync is also
    /// Inconsistent: the recovery already chose it). Only unrelated data
    /// still refuses. The sync is full unless the generations already
    /// named this direction with a bitmap, or both bitmaps together name
    /// the difference.
    fn by_disk_states(
        &self,
        rule: gi::Rule,
        decision: gi::Decision,
        peer_disk: DiskState,
        out: &mut Vec<Action>,
    ) -> gi::Decision {
        use DiskState::{Consistent, Inconsistent, Outdated, UpToDate};
        let usable = |d: DiskState| matches!(d, Outdated | Consistent | UpToDate);
        // Equal bitmap generations: both bitmaps together hold every
        // block either side changed since, as for a split-brain victim.
        let full = rule != gi::Rule::BitmapsEqual;
        let forced = match (self.disk, peer_disk) {
            (Inconsistent, p) if usable(p) => match decision {
                gi::Decision::Target { full: false } => return decision,
                gi::Decision::Unrelated | gi::Decision::NoSync => return decision,
                _ => gi::Decision::Target { full },
            },
            (me, Inconsistent) if usable(me) => match decision {
                gi::Decision::Source { full: false } => return decision,
                gi::Decision::Unrelated | gi::Decision::NoSync => return decision,
                _ => gi::Decision::Source { full },
            },
            _ => return decision,
        };
        if forced != decision {
            out.push(Action::Log(format!(
                "rule {} alone would say {}, but {} disk is Inconsistent: becoming {} due to disk states",
                rule.name(),
                decision_name(decision),
                if self.disk == Inconsistent { "this node's" } else { "the peer's" },
                decision_name(forced),
            )));
        }
        forced
    }

    /// Equal current generations: a resync is needed only when either node
    /// has bits set (a crashed Primary's activity log, a failed write) or
    /// one is Inconsistent (an interrupted resync). The direction: the
    /// consistent node; then the crashed Primary (its activity-log extents
    /// may hold writes it acknowledged under protocol A); then the better
    /// disk state; then the Primary; then the tie-breaker.
    fn equal_direction(&self, peer: &Report) -> gi::Decision {
        use DiskState::Inconsistent as I;
        let source = gi::Decision::Source { full: false };
        let target = gi::Decision::Target { full: false };
        match (self.disk == I, peer.disk == I) {
            (true, true) => return gi::Decision::NoSync,
            (false, true) => return source,
            (true, false) => return target,
            (false, false) => {}
        }
        if self.local_oos == 0 && peer.oos == 0 {
            return gi::Decision::NoSync;
        }
        let crashed = |f: u32| f & flags::CRASHED_PRIMARY != 0;
        let rank = |d: DiskState| match d {
            DiskState::UpToDate => 3,
            DiskState::Consistent => 2,
            _ => 1,
        };
        let me_first = if crashed(self.flags) != crashed(peer.flags) {
            crashed(self.flags)
        } else if rank(self.disk) != rank(peer.disk) {
            rank(self.disk) > rank(peer.disk)
        } else if self.role != peer.role {
            self.role == Role::Primary
        } else {
            self.cfg.source_on_tie
        };
        if me_first {
            source
        } else {
            target
        }
    }

    fn send_state(&mut self, out: &mut Vec<Action>) {
        if self.cstate.is_connected() {
            out.push(Action::Send(Packet::State(self.report())));
        }
    }

    // ---- generations and flags ----

    fn fresh_uuid(&mut self) -> u64 {
        // splitmix64: the engine seeds it from the OS, the simulation from
        // its seed. The low bits stay clear of the reserved small values.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) | 0x100
    }

    fn new_current_uuid(&mut self, out: &mut Vec<Action>) {
        let mut g = self.gens;
        if g.current != UUID_JUST_CREATED {
            if g.bitmap == 0 {
                g.bitmap = g.current;
                // Who was Primary on the generation left behind, for the
                // split-brain policies; written before the generations, so
                // a crash in between leaves it describing a bitmap
                // generation that is still 0 (and means nothing).
                if self.role == Role::Primary {
                    self.persist_flags(flags::BITMAP_WAS_PRIMARY, 0, out);
                } else {
                    self.persist_flags(0, flags::BITMAP_WAS_PRIMARY, out);
                }
            } else if self.flags & flags::CURRENT_SHARED != 0 {
                // The bitmap already tracks changes since an older
                // generation (a superset); the current one must stay known
                // so a peer still on it, or diverged from it, is related.
                g.history = [g.current, g.history[0]];
            }
            // Otherwise the current generation began after the last
            // accepted connect: no peer holds it or diverged from it, so it
            // is simply replaced. Pushing it would only crowd out of the two
            // history slots the generations a peer does share, and a pair
            // promoted and crashed over and over while apart would end up
            // looking unrelated instead of split brain.
        }
        g.current = self.fresh_uuid();
        self.gens = g;
        out.push(Action::PersistGenerations(g));
        // No peer holds a generation just begun. Written after the
        // generations: a crash in between leaves the flag set, which only
        // keeps one generation more.
        self.persist_flags(0, flags::CURRENT_SHARED, out);
    }

    fn adopt_uuid(&mut self, uuid: u64, out: &mut Vec<Action>) {
        self.gens = Generations {
            current: uuid,
            bitmap: 0,
            history: [0, 0],
        };
        out.push(Action::PersistGenerations(self.gens));
        self.persist_flags(flags::CURRENT_SHARED, 0, out);
        out.push(Action::ClearBitmap);
        self.set_disk(DiskState::UpToDate, out);
    }

    /// A local data I/O failed: apply `on-io-error`, once per attached
    /// disk (the failed request's own bookkeeping is done by its caller).
    fn local_io_error(&mut self, what: &str, out: &mut Vec<Action>) {
        if self.io_error || no_disk(self.disk) {
            return;
        }
        self.io_error = true;
        let policy = self.cfg.on_io_error;
        if policy == IoErrorPolicy::CallLocalIoError {
            out.push(Action::RunHandler("local-io-error"));
        }
        if policy == IoErrorPolicy::Detach && self.role != Role::Primary {
            out.push(Action::Log(format!(
                "local disk error in {what}; on-io-error = detach: the disk is Failed and is detached once its I/O in flight is done"
            )));
            self.disk = DiskState::Failed;
            self.send_state(out);
            // Writes this disk took but has not made stable may be lost
            // with it, and only a link drop makes the peer mark them (its
            // unacknowledged epochs); it also ends a resync on both sides.
            // The reconnect then finds this node without a disk.
            out.push(Action::Disconnect {
                reason: "the local disk failed; reconnecting without it".into(),
                standalone: false,
            });
            self.detach_failed(out);
            return;
        }
        let name = match policy {
            IoErrorPolicy::Detach => "detach (a Primary cannot detach: tandem does not read through its peer; fail over to it)",
            IoErrorPolicy::PassOn => "pass_on",
            IoErrorPolicy::CallLocalIoError => "call-local-io-error (handler started)",
        };
        if self.role == Role::Primary {
            out.push(Action::Log(format!(
                "local disk error in {what}; on-io-error = {name}: each failed request is reported (EIO to a client, a negative ack to the peer) and stays marked out of sync"
            )));
            return;
        }
        out.push(Action::Log(format!(
            "local disk error in {what}; on-io-error = {name}: the disk is Inconsistent until a resync"
        )));
        if matches!(
            self.disk,
            DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
        ) {
            self.set_disk(DiskState::Inconsistent, out);
            self.send_state(out);
        }
    }

    /// A Failed disk with nothing of it in flight any more is detached.
    pub(crate) fn detach_failed(&mut self, out: &mut Vec<Action>) {
        if self.disk != DiskState::Failed {
            return;
        }
        let idle = self.rx.inflight.is_empty()
            && self.rx.queue.is_empty()
            && self.rx.flushing.is_none()
            && self.rx.stabilizing.is_empty()
            && self.sync.is_none();
        if !idle {
            return;
        }
        self.disk = DiskState::Diskless;
        out.push(Action::DetachDisk);
        out.push(Action::Log(
            "the failed disk is detached: this node is Diskless (attach a repaired disk with `attach`)".into(),
        ));
        self.send_state(out);
    }

    fn set_disk(&mut self, disk: DiskState, out: &mut Vec<Action>) {
        self.disk = disk;
        let (set, clear) = match disk {
            DiskState::UpToDate => (flags::CONSISTENT | flags::WAS_UP_TO_DATE, 0),
            DiskState::Outdated => (flags::CONSISTENT, flags::WAS_UP_TO_DATE),
            DiskState::Inconsistent => (0, flags::CONSISTENT | flags::WAS_UP_TO_DATE),
            _ => return,
        };
        self.persist_flags(set, clear, out);
    }

    fn persist_flags(&mut self, set: u32, clear: u32, out: &mut Vec<Action>) {
        let new = (self.flags | set) & !clear;
        if new != self.flags {
            self.flags = new;
            out.push(Action::PersistFlags { set, clear });
        }
    }
}

/// What a connect-time decision means, for logs.
fn decision_name(d: gi::Decision) -> &'static str {
    match d {
        gi::Decision::NoSync => "no resync",
        gi::Decision::Source { full: false } => "SyncSource of the bitmap",
        gi::Decision::Source { full: true } => "SyncSource of a full sync",
        gi::Decision::Target { full: false } => "SyncTarget of the bitmap",
        gi::Decision::Target { full: true } => "SyncTarget of a full sync",
        gi::Decision::SplitBrain => "split brain",
        gi::Decision::Unrelated => "unrelated data",
    }
}

/// No local data to read, compare or write: detached, or failed and being
/// detached.
fn no_disk(d: DiskState) -> bool {
    matches!(d, DiskState::Diskless | DiskState::Failed)
}

/// The disk state a disk attaches in, from its superblock flags.
fn disk_from_flags(f: u32) -> DiskState {
    if f & flags::CONSISTENT == 0 {
        DiskState::Inconsistent
    } else if f & flags::WAS_UP_TO_DATE == 0 {
        DiskState::Outdated
    } else {
        DiskState::Consistent
    }
}

/// Generations as DRBD prints them: current:bitmap:history:history.
pub fn fmt_gens(g: &Generations) -> String {
    format!(
        "{:016X}:{:016X}:{:016X}:{:016X}",
        g.current, g.bitmap, g.history[0], g.history[1]
    )
}

#[cfg(test)]
mod tests;
