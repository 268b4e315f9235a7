//! One simulated run: two nodes, a network, clients, faults and the
//! checkers. See the crate docs for what is modelled.

use crate::disk::DataDisk;
use crate::rng::Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::ops::Range;
use tandem_core::{
    Action, Attached, Config, ConnState, Core, DiskState, Event, IoErrorPolicy, OpId, Packet,
    Protocol, ReqId, Role, WriteKind,
};
use tandem_meta::layout::md_size_for;
use tandem_meta::superblock::flags;
use tandem_meta::{CrashDisk, CrashMode, Layout, Metadata, Placement};

mod checks;

/// Bytes per block of the data model (the bitmap's granularity).
pub const BLOCK: u64 = 4096;
/// Blocks per activity-log extent (4 MiB).
pub const EXTENT_BLOCKS: u64 = 1024;
/// Extents of the simulated device: more than [`AL_EXTENTS`], so the
/// activity log has to evict.
pub const EXTENTS: u64 = 10;
/// Blocks of the simulated device.
pub const BLOCKS: u64 = EXTENTS * EXTENT_BLOCKS;
/// Bytes of the simulated device (40 MiB; only a few hundred blocks around
/// the extent boundaries are ever written, so the model stays tiny).
pub const SIZE: u64 = BLOCKS * BLOCK;
/// Activity-log slots (the smallest DRBD allows).
pub const AL_EXTENTS: u32 = 7;
/// Client requests in flight per node at most.
pub const MAX_IN_FLIGHT: usize = 16;
/// Blocks either side of each extent boundary that clients write.
const HOT: u64 = 8;

/// The checkers, named after the design's invariants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// 1: a write completes only when its protocol's conditions hold.
    CompletionByProtocol,
    /// 2: the activity log covers a write before it reaches the disk.
    AlBeforeData,
    /// 3: whatever the peer may lack is in an out-of-sync bitmap.
    NothingForgotten,
    /// 4: a flush (or FUA write) reply means stable (on the peer too under C).
    FlushIsBarrier,
    /// 5: a new current generation is persisted before new data.
    GenerationsBeforeData,
    /// 6: never two Primaries on a connected pair.
    OnePrimary,
    /// 7: a daemon crash loses no acknowledged write and no bit.
    AcknowledgedDataSurvives,
    /// 8: diverged data is reported as split brain at connect.
    SplitBrainNeverSilent,
    /// The converse of 8: split brain is reported only when both nodes
    /// began a data generation of their own while apart.
    NoFalseSplitBrain,
    /// Every request is answered and the pair drains once faults stop.
    Liveness,
    /// The simulation itself or the metadata failed (not a core finding).
    Driver,
}

impl Check {
    /// The checker's name.
    pub fn name(self) -> &'static str {
        match self {
            Check::CompletionByProtocol => "completion_by_protocol",
            Check::AlBeforeData => "al_before_data",
            Check::NothingForgotten => "nothing_forgotten",
            Check::FlushIsBarrier => "flush_is_barrier",
            Check::GenerationsBeforeData => "generations_before_data",
            Check::OnePrimary => "one_primary",
            Check::AcknowledgedDataSurvives => "acknowledged_data_survives",
            Check::SplitBrainNeverSilent => "split_brain_never_silent",
            Check::NoFalseSplitBrain => "no_false_split_brain",
            Check::Liveness => "liveness",
            Check::Driver => "driver",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Deliberate driver bugs, to prove that the checkers can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// `MarkOutOfSync` is not executed (caught by [`Check::NothingForgotten`]).
    SkipMarkOutOfSync,
    /// Peer writes are reported done without reaching the disk (caught by
    /// [`Check::CompletionByProtocol`] under protocol C).
    AckPeerWritesUnapplied,
    /// `AlReady` is answered without touching the activity log (caught by
    /// [`Check::AlBeforeData`]).
    SkipActivityLog,
    /// `PersistGenerations` is not executed (caught by
    /// [`Check::GenerationsBeforeData`]).
    SkipPersistGenerations,
    /// A local flush does nothing (caught by [`Check::FlushIsBarrier`]).
    FlushIsNoop,
    /// A daemon crash takes the page cache with it (caught by
    /// [`Check::AcknowledgedDataSurvives`]).
    DaemonCrashLosesPageCache,
}

/// What a run does. Rates are weights against the other choices of a step
/// (roughly per 10,000 steps when the pair is busy).
#[derive(Clone, Debug)]
pub struct Options {
    /// Replication protocol of both nodes.
    pub protocol: Protocol,
    /// Steps of the faulty phase (the quiescent phase follows).
    pub steps: usize,
    /// The link breaks.
    pub link_drop: u32,
    /// A broken link comes back.
    pub link_up: u32,
    /// A daemon is killed (`kill -9`), per node.
    pub daemon_crash: u32,
    /// A machine loses power, per node (0 = never; see the crate docs).
    pub machine_crash: u32,
    /// The Primary is demoted and the other node promoted.
    pub switchover: u32,
    /// While disconnected, the Secondary is promoted too (split brain).
    pub rogue_promote: u32,
    /// An operator repairs a degraded pair (`connect --discard-my-data`
    /// after a split brain, else a copy of the disks).
    pub repair: u32,
    /// When no node is Primary, both are promoted at once, as two HA
    /// managers racing would: per 10,000 such promotions (0 = never; see
    /// the crate docs).
    pub racing_promote: u32,
    /// A local write fails: per 10,000 local writes (0 = never; see the
    /// crate docs).
    pub disk_error: u32,
    /// A local operation is slow: it finishes 10 to 160 steps later at the
    /// earliest (per 10,000 operations).
    pub slow_io: u32,
    /// Clients may submit a write overlapping one of theirs in flight
    /// (found core bug 1, fixed; see `tests/core_bugs.rs`).
    pub overlapping_writes: bool,
    /// A node may be promoted while writes from the peer are still in its
    /// local I/O queue (found core bug 2, fixed).
    pub promote_during_peer_io: bool,
    /// A new link may come up while writes received on the previous one
    /// are still in the local I/O queue (found core bug 3, fixed).
    pub reconnect_during_peer_io: bool,
    /// A deliberate driver bug.
    pub sabotage: Option<Sabotage>,
    /// The split-brain recovery policies (the default schedule cycles
    /// through disconnect and two automatic recoveries).
    pub split_brain: tandem_core::SplitBrainPolicy,
    /// Keep the whole trace instead of its tail.
    pub full_trace: bool,
    /// A StandAlone pair is repaired with `connect --discard-my-data`
    /// (else, as before 2026-12-08, by copying the disks; the regression
    /// seeds of `tests/core_bugs.rs` replay with that, as they were found).
    pub discard_repair: bool,
    /// Half the seeds whose `after-sb-0pri` is `discard-least-changes` or
    /// `discard-zero-changes` use `discard-younger-primary` or
    /// `discard-older-primary` instead (off for the regression seeds, as
    /// above).
    pub age_policies: bool,
}

impl Options {
    /// The default schedule for `seed`: protocols cycle A, B, C over seeds.
    pub fn for_seed(seed: u64) -> Options {
        let protocol = [Protocol::A, Protocol::B, Protocol::C][(seed % 3) as usize];
        Options {
            protocol,
            steps: 2_000,
            link_drop: 40,
            link_up: 300,
            daemon_crash: 12,
            machine_crash: 6,
            switchover: 30,
            rogue_promote: 60,
            repair: 60,
            racing_promote: 300,
            disk_error: 10,
            slow_io: 300,
            overlapping_writes: true,
            promote_during_peer_io: true,
            reconnect_during_peer_io: true,
            sabotage: None,
            full_trace: false,
            discard_repair: true,
            age_policies: true,
            split_brain: match (seed / 3) % 3 {
                0 => tandem_core::SplitBrainPolicy::default(),
                1 => tandem_core::SplitBrainPolicy {
                    zero: tandem_core::AfterSb0Pri::DiscardLeastChanges,
                    one: tandem_core::AfterSb1Pri::DiscardSecondary,
                    two: tandem_core::AfterSb2Pri::Disconnect,
                },
                _ => tandem_core::SplitBrainPolicy {
                    zero: tandem_core::AfterSb0Pri::DiscardZeroChanges,
                    one: tandem_core::AfterSb1Pri::Consensus,
                    two: tandem_core::AfterSb2Pri::Disconnect,
                },
            },
        }
    }

    /// Apply `key=value` settings separated by commas (the field names;
    /// `protocol=A|B|C`), as given in `TANDEM_SIM_OPTS`.
    pub fn with(mut self, settings: &str) -> Result<Options, String> {
        for kv in settings.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?} is not key=value"))?;
            let num = || {
                v.parse::<u32>()
                    .map_err(|_| format!("{k}: {v:?} is not a number"))
            };
            let flag = || match v {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" => Ok(false),
                _ => Err(format!("{k}: {v:?} is not a boolean")),
            };
            match k {
                "protocol" => {
                    self.protocol = match v {
                        "A" => Protocol::A,
                        "B" => Protocol::B,
                        "C" => Protocol::C,
                        _ => return Err(format!("protocol {v:?} is not A, B or C")),
                    }
                }
                "steps" => self.steps = num()? as usize,
                "link_drop" => self.link_drop = num()?,
                "link_up" => self.link_up = num()?,
                "daemon_crash" => self.daemon_crash = num()?,
                "machine_crash" => self.machine_crash = num()?,
                "switchover" => self.switchover = num()?,
                "rogue_promote" => self.rogue_promote = num()?,
                "repair" => self.repair = num()?,
                "racing_promote" => self.racing_promote = num()?,
                "disk_error" => self.disk_error = num()?,
                "slow_io" => self.slow_io = num()?,
                "overlapping_writes" => self.overlapping_writes = flag()?,
                "promote_during_peer_io" => self.promote_during_peer_io = flag()?,
                "reconnect_during_peer_io" => self.reconnect_during_peer_io = flag()?,
                "discard_repair" => self.discard_repair = flag()?,
                "age_policies" => self.age_policies = flag()?,
                "all_bugs" => {
                    let on = flag()?;
                    self.overlapping_writes = on;
                    self.promote_during_peer_io = on;
                    self.reconnect_during_peer_io = on;
                }
                _ => return Err(format!("unknown option {k:?}")),
            }
        }
        Ok(self)
    }
}

/// What happened in a run (or, summed, in many).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Stats {
    pub runs: u64,
    pub steps: u64,
    pub writes_submitted: u64,
    pub writes_completed: u64,
    pub writes_failed: u64,
    pub flushes_completed: u64,
    pub requests_dropped: u64,
    pub frames_delivered: u64,
    pub link_drops: u64,
    pub link_ups: u64,
    pub connections: u64,
    pub daemon_crashes: u64,
    pub machine_crashes: u64,
    pub promotions: u64,
    pub demotions: u64,
    pub rogue_promotions: u64,
    pub split_brains: u64,
    pub repairs: u64,
    /// Repairs of a StandAlone pair by `connect --discard-my-data` on the
    /// victim (the rest copy the disks).
    pub discard_repairs: u64,
    /// Split brains resolved at a connect with the node told to discard
    /// its data as the SyncTarget.
    pub discarded_by_operator: u64,
    /// Split-brain victims resynced under `after-sb-0pri =
    /// discard-younger-primary / discard-older-primary`.
    pub age_policy_victims: u64,
    /// Resyncs that finished.
    pub resyncs: u64,
    /// Connects where a SyncSource that missed its resync's end resumed
    /// from its bitmap (rule `missed-resync-end`).
    pub missed_resync_ends: u64,
    /// Connects where an Inconsistent disk made its node the SyncTarget
    /// against what the generations alone said.
    pub disk_state_syncs: u64,
    /// Online verifies that finished.
    pub verifies: u64,
    /// `invalidate`s that started a full resync.
    pub invalidates: u64,
    pub al_busy: u64,
    /// Completions checked against the peer's receipt (B) or disk (C).
    pub peer_completion_checks: u64,
    /// Flushes/FUA writes checked for stability on the peer (C).
    pub peer_flush_checks: u64,
    /// Connects that had to report split brain (both wrote apart).
    pub split_brain_checks: u64,
    /// Disk comparisons (at repairs and at the end).
    pub diff_checks: u64,
    /// Blocks that differed at those comparisons (all found marked).
    pub diff_blocks: u64,
    /// Blocks marked by activity-log replay after crashes.
    pub replay_marked_blocks: u64,
    /// Disks detached after a disk error (`on-io-error = "detach"`).
    pub detaches: u64,
}

impl Stats {
    /// Add `o` to `self`.
    pub fn add(&mut self, o: &Stats) {
        macro_rules! sum { ($($f:ident),*) => { $( self.$f += o.$f; )* } }
        sum!(
            runs,
            steps,
            writes_submitted,
            writes_completed,
            writes_failed,
            flushes_completed,
            requests_dropped,
            frames_delivered,
            link_drops,
            link_ups,
            connections,
            daemon_crashes,
            machine_crashes,
            promotions,
            demotions,
            rogue_promotions,
            split_brains,
            repairs,
            discard_repairs,
            discarded_by_operator,
            age_policy_victims,
            resyncs,
            missed_resync_ends,
            disk_state_syncs,
            verifies,
            invalidates,
            al_busy,
            peer_completion_checks,
            peer_flush_checks,
            split_brain_checks,
            diff_checks,
            diff_blocks,
            replay_marked_blocks,
            detaches
        );
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "runs {}, steps {}, writes {} submitted / {} completed / {} failed, flushes {}, \
             requests dropped by crashes {}, frames {}, link drops {}, link ups {}, connections {}, \
             daemon crashes {}, machine crashes {}, promotions {}, demotions {}, rogue promotions {}, \
             split brains {} ({} victims decided by younger/older-primary), repairs {} ({} by discard-my-data, {} victims resynced so), resyncs {} (missed ends {}, by disk states {}), verifies {}, invalidates {}, AL busy {}, peer completion checks {}, peer flush checks {}, \
             split-brain checks {}, disk comparisons {} ({} differing blocks, all marked), \
             blocks marked by AL replay {}, disks detached after errors {}",
            self.runs,
            self.steps,
            self.writes_submitted,
            self.writes_completed,
            self.writes_failed,
            self.flushes_completed,
            self.requests_dropped,
            self.frames_delivered,
            self.link_drops,
            self.link_ups,
            self.connections,
            self.daemon_crashes,
            self.machine_crashes,
            self.promotions,
            self.demotions,
            self.rogue_promotions,
            self.split_brains,
            self.age_policy_victims,
            self.repairs,
            self.discard_repairs,
            self.discarded_by_operator,
            self.resyncs,
            self.missed_resync_ends,
            self.disk_state_syncs,
            self.verifies,
            self.invalidates,
            self.al_busy,
            self.peer_completion_checks,
            self.peer_flush_checks,
            self.split_brain_checks,
            self.diff_checks,
            self.diff_blocks,
            self.replay_marked_blocks,
            self.detaches
        )
    }
}

/// A checker fired (or the run could not go on).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The run's seed.
    pub seed: u64,
    /// The step at which it fired (`steps` and beyond: the quiescent phase).
    pub step: usize,
    /// Which checker.
    pub check: Check,
    /// What it saw.
    pub message: String,
    /// The last events and actions before it (all of them with `full_trace`).
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- trace ({} lines) ---", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "{line}")?;
        }
        writeln!(
            f,
            "seed {} failed at step {}: {}: {}",
            self.seed, self.step, self.check, self.message
        )?;
        write!(f, "replay with TANDEM_SIM_SEED={}", self.seed)
    }
}

type R<T = ()> = Result<T, Failure>;

/// Run one seed.
pub fn run(seed: u64, opts: &Options) -> Result<Stats, Failure> {
    let mut sim = Sim::new(seed, opts.clone())?;
    sim.run()?;
    Ok(sim.stats)
}

/// Run one seed keeping the whole trace, which is returned even when the
/// run passes.
pub fn run_traced(seed: u64, opts: &Options) -> (Result<Stats, Failure>, Vec<String>) {
    let mut opts = opts.clone();
    opts.full_trace = true;
    let mut sim = match Sim::new(seed, opts) {
        Ok(sim) => sim,
        Err(f) => return (Err(f), Vec::new()),
    };
    let r = sim.run().map(|()| sim.stats.clone());
    (r, sim.trace.into_iter().collect())
}

/// A client request as the sim remembers it until it is answered.
#[derive(Clone, Debug)]
struct ClientReq {
    kind: ClientKind,
    /// The link the node was Connected on at submission.
    sub_link: Option<u64>,
}

#[derive(Clone, Debug)]
enum ClientKind {
    Write { blocks: Range<u64>, fua: bool },
    Flush { before: Vec<Done> },
}

/// A write completed to its client, not yet covered by a completed flush.
#[derive(Clone, Debug)]
struct Done {
    req: ReqId,
    blocks: Range<u64>,
    /// Replicated on this link, and completed while it was still up.
    link: Option<u64>,
}

#[derive(Clone, Debug)]
struct LocalOp {
    op: OpId,
    what: LocalWhat,
    /// A slow disk: not done before this step.
    ready_at: usize,
}

#[derive(Clone, Debug)]
enum LocalWhat {
    Write {
        blocks: Range<u64>,
        value: u64,
        fua: bool,
    },
    /// A resync write: each block gets the source's content.
    WriteBlocks {
        first: u64,
        values: Vec<u64>,
    },
    /// A verify read: one digest per block.
    Digest {
        blocks: Range<u64>,
    },
    /// A resync read for the peer.
    Read {
        blocks: Range<u64>,
    },
    Flush,
}

/// One node: its core (None while the daemon is down), its metadata and
/// data disk, the I/O the core asked for, and what the checkers track.
struct Node {
    core: Option<Core>,
    md: Option<Metadata<CrashDisk>>,
    disk: DataDisk,
    /// Local writes and flushes submitted, not yet done.
    local: Vec<LocalOp>,
    /// `AlBegin`s not yet answered.
    al_wait: Vec<(ReqId, Range<u64>)>,
    /// Client requests not yet answered.
    clients: BTreeMap<ReqId, ClientReq>,
    /// Requests whose `AlReady { ok: true }` was sent and whose local write
    /// has not started.
    al_ready: BTreeSet<ReqId>,
    /// Client writes whose local write finished.
    local_done: BTreeSet<ReqId>,
    /// Client writes whose data frame went onto the link: req -> link.
    replicated: BTreeMap<ReqId, u64>,
    /// Data frames sent and not yet acknowledged (by a write ack under C,
    /// by their epoch's barrier ack under every protocol): req -> (link,
    /// epoch, blocks).
    unacked: BTreeMap<ReqId, (u64, u64, Range<u64>)>,
    /// (link, seq) -> req, to match acks.
    seq_req: BTreeMap<(u64, u64), ReqId>,
    /// Writes the peer NegAck'd.
    neg_acked: BTreeSet<ReqId>,
    /// Write ids received in data frames (as the peer).
    received: BTreeSet<u64>,
    /// Write ids applied to this disk.
    applied: BTreeSet<u64>,
    /// (link, seq) -> write id of received data frames.
    rx_payload: BTreeMap<(u64, u64), u64>,
    /// (link, resync id) -> block contents read for the peer.
    rs_out: BTreeMap<(u64, u64), Vec<u64>>,
    /// (link, resync id) -> block contents received from the peer.
    rs_in: BTreeMap<(u64, u64), Vec<u64>>,
    /// The link the core is on (WFReportParams or Connected), as far as the
    /// sim can tell.
    core_link: Option<u64>,
    /// block -> newest write known to be on this disk for good: acknowledged
    /// by this node as Primary, or by its Primary under protocol C.
    acked: BTreeMap<u64, u64>,
    /// Completed writes not yet covered by a flush.
    done: Vec<Done>,
    /// A new current generation must be persisted before the next write.
    gen_needed: bool,
    /// A client write reached the disk without reaching the peer since the
    /// pair was last connected.
    wrote_apart: bool,
    /// A new current generation was persisted while not connected since
    /// the pair last held the same data generation: only when both nodes
    /// did may a connect report split brain.
    gen_apart: bool,
    /// The last connect found split brain and left this node StandAlone:
    /// what `connect --discard-my-data` is for.
    split_brain_standalone: bool,
    /// The daemon restarts at this step.
    down_until: Option<usize>,
}

impl Node {
    fn new(md: Metadata<CrashDisk>) -> Node {
        Node {
            core: None,
            md: Some(md),
            disk: DataDisk::default(),
            local: Vec::new(),
            al_wait: Vec::new(),
            clients: BTreeMap::new(),
            al_ready: BTreeSet::new(),
            local_done: BTreeSet::new(),
            replicated: BTreeMap::new(),
            unacked: BTreeMap::new(),
            seq_req: BTreeMap::new(),
            neg_acked: BTreeSet::new(),
            received: BTreeSet::new(),
            applied: BTreeSet::new(),
            rx_payload: BTreeMap::new(),
            rs_out: BTreeMap::new(),
            rs_in: BTreeMap::new(),
            core_link: None,
            acked: BTreeMap::new(),
            done: Vec::new(),
            gen_needed: false,
            wrote_apart: false,
            gen_apart: false,
            split_brain_standalone: false,
            down_until: None,
        }
    }

    /// Forget everything the daemon held in memory.
    fn forget_daemon_state(&mut self) -> usize {
        let dropped = self.clients.len();
        self.core = None;
        self.local.clear();
        self.al_wait.clear();
        self.clients.clear();
        self.al_ready.clear();
        self.local_done.clear();
        self.replicated.clear();
        self.unacked.clear();
        self.seq_req.clear();
        self.neg_acked.clear();
        self.rx_payload.clear();
        self.rs_out.clear();
        self.rs_in.clear();
        self.core_link = None;
        self.done.clear();
        self.gen_needed = false;
        // A restarted daemon is not StandAlone.
        self.split_brain_standalone = false;
        dropped
    }

    fn role(&self) -> Option<Role> {
        self.core.as_ref().map(Core::role)
    }

    fn cstate(&self) -> Option<ConnState> {
        self.core.as_ref().map(Core::cstate)
    }

    fn is_primary(&self) -> bool {
        self.role() == Some(Role::Primary)
    }
}

#[derive(Clone, Copy, Debug)]
enum Choice {
    Deliver,
    Local,
    Al,
    Write(usize),
    Flush(usize),
    LinkDrop,
    LinkUp,
    Crash(usize),
    MachineCrash(usize),
    Switchover,
    Rogue,
    DemoteOne,
    EnsurePrimary,
    Repair,
    Tick(usize),
    Verify(usize),
    Invalidate(usize),
    TogglePause(usize),
    Idle,
}

struct Sim {
    seed: u64,
    opts: Options,
    rng: Rng,
    step: usize,
    nodes: [Node; 2],
    /// `fifo[i]`: frames from node i to the other, in order.
    fifo: [VecDeque<Packet>; 2],
    /// The link that is up, if any.
    link: Option<u64>,
    next_link: u64,
    /// Link events not yet fed.
    queue: VecDeque<(usize, Event)>,
    next_id: u64,
    stats: Stats,
    trace: VecDeque<String>,
    repair_pending: bool,
    quiescing: bool,
    /// Promote this node next (after a switchover or repair).
    preferred: Option<usize>,
    preferred_tries: u32,
    both_connected: bool,
}

fn blocks_of(offset: u64, len: u64) -> Range<u64> {
    offset / BLOCK..(offset + len).div_ceil(BLOCK)
}

fn extents_of(blocks: &Range<u64>) -> Range<u64> {
    blocks.start / EXTENT_BLOCKS..blocks.end.div_ceil(EXTENT_BLOCKS)
}

fn fresh_metadata(device_uuid: u64) -> Result<Metadata<CrashDisk>, String> {
    let meta_size = md_size_for(SIZE, AL_EXTENTS);
    let io = CrashDisk::new(meta_size as usize);
    let layout = Layout::external(SIZE, meta_size, AL_EXTENTS).map_err(|e| e.to_string())?;
    Metadata::create(&io, &layout, device_uuid).map_err(|e| e.to_string())?;
    let (md, _) = Metadata::open(io, Placement::External).map_err(|e| e.to_string())?;
    Ok(md)
}

impl Sim {
    fn new(seed: u64, opts: Options) -> R<Sim> {
        let fail = |m: String| Failure {
            seed,
            step: 0,
            check: Check::Driver,
            message: m,
            trace: Vec::new(),
        };
        let a = fresh_metadata(seed ^ 0xA).map_err(fail)?;
        let b = fresh_metadata(seed ^ 0xB).map_err(fail)?;
        Ok(Sim {
            seed,
            opts,
            rng: Rng::new(seed),
            step: 0,
            nodes: [Node::new(a), Node::new(b)],
            fifo: [VecDeque::new(), VecDeque::new()],
            link: None,
            next_link: 1,
            queue: VecDeque::new(),
            next_id: 1,
            stats: Stats::default(),
            trace: VecDeque::new(),
            repair_pending: false,
            quiescing: false,
            preferred: None,
            preferred_tries: 0,
            both_connected: false,
        })
    }

    fn run(&mut self) -> R {
        self.setup()?;
        for step in 0..self.opts.steps {
            self.step = step;
            self.step_once()?;
        }
        self.step = self.opts.steps;
        self.quiesce()?;
        self.stats.runs = 1;
        self.stats.steps = self.opts.steps as u64;
        Ok(())
    }

    // ---- plumbing ----

    fn fail(&self, check: Check, message: impl Into<String>) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            check,
            message: message.into(),
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if !self.opts.full_trace && self.trace.len() >= 300 {
            self.trace.pop_front();
        }
        let l = line();
        self.trace.push_back(format!("[{}] {l}", self.step));
    }

    fn md(&mut self, n: usize) -> &mut Metadata<CrashDisk> {
        self.nodes[n]
            .md
            .as_mut()
            .expect("the metadata is open except inside a crash or repair")
    }

    fn md_ref(&self, n: usize) -> &Metadata<CrashDisk> {
        self.nodes[n]
            .md
            .as_ref()
            .expect("the metadata is open except inside a crash or repair")
    }

    fn meta<T>(&self, r: Result<T, tandem_meta::MetaError>) -> R<T> {
        r.map_err(|e| self.fail(Check::Driver, format!("metadata: {e}")))
    }

    fn live(&self, n: usize) -> bool {
        self.nodes[n].core.is_some()
    }

    fn marked(&self, n: usize, blocks: &Range<u64>) -> bool {
        let bm = self.md_ref(n).bitmap();
        blocks.clone().all(|b| bm.get(b))
    }

    fn start_core(&mut self, n: usize) {
        let md = self.md_ref(n);
        let attached = Attached {
            gens: md.generations(),
            flags: md.flags(),
        };
        let mut core = Core::new(
            Config {
                protocol: self.opts.protocol,
                size: SIZE,
                resync_rate: 1 << 40,
                // A third of the seeds throttle the source under client I/O.
                c_min_rate: if self.seed % 3 == 2 { 1 << 20 } else { 1 << 40 },
                source_on_tie: n == 0,
                split_brain: self.split_brain_policy(),
                fencing: self.seed % 2 == 1,
                csums: self.seed % 4 >= 2,
                // Disk errors pass the error on for half the seeds and
                // detach the disk for the rest.
                on_io_error: if self.seed % 8 >= 4 {
                    IoErrorPolicy::Detach
                } else {
                    IoErrorPolicy::PassOn
                },
            },
            attached,
            self.rng.next_u64(),
        );
        core.connect();
        self.note(|| format!("n{n} daemon starts: {:?}", core.report()));
        let node = &mut self.nodes[n];
        node.core = Some(core);
        node.down_until = None;
    }

    /// The policies the cores run with (see [`Options::age_policies`]).
    fn split_brain_policy(&self) -> tandem_core::SplitBrainPolicy {
        use tandem_core::AfterSb0Pri as Z;
        let mut p = self.opts.split_brain;
        if self.opts.age_policies && (self.seed / 9) % 2 == 1 {
            p.zero = match p.zero {
                Z::DiscardLeastChanges => Z::DiscardYoungerPrimary,
                Z::DiscardZeroChanges => Z::DiscardOlderPrimary,
                z => z,
            };
        }
        p
    }

    // ---- feeding the cores ----

    /// Feed one event to node `n`, execute its actions, run the per-event
    /// checks; returns the actions.
    fn handle(&mut self, n: usize, ev: Event) -> R<Vec<Action>> {
        let node = &mut self.nodes[n];
        let Some(core) = node.core.as_mut() else {
            return Ok(Vec::new());
        };
        if let Event::LinkUp { link } = ev {
            node.core_link = Some(link);
        }
        let pre = core.cstate();
        let discarding = core.report().discard_my_data;
        let mut acts = Vec::new();
        core.handle(ev.clone(), &mut acts);
        let post = core.cstate();
        let role = core.role();
        let peer_role = Some(core.peer_role());
        if !(post.is_connected() || post == ConnState::WFReportParams) {
            node.core_link = None;
        }
        if pre.is_connected() && !post.is_connected() && role == Role::Primary {
            // Invariant 5: the writes from now on are a generation the peer lacks.
            node.gen_needed = true;
        }
        let live = if post.is_connected() {
            node.core_link
        } else {
            None
        };
        let lost: Vec<ReqId> = node
            .unacked
            .iter()
            .filter(|(_, (l, _, _))| Some(*l) != live)
            .map(|(&r, _)| r)
            .collect();
        let found_split_brain = acts.iter().any(|a| matches!(a, Action::SplitBrain { .. }));
        if found_split_brain && post == ConnState::StandAlone {
            self.nodes[n].split_brain_standalone = true;
        } else if post.is_connected() {
            self.nodes[n].split_brain_standalone = false;
        }
        if post == ConnState::WFBitMapT && found_split_brain {
            // Split brain resolved with this node as the victim: what it
            // acknowledged apart is discarded by design, and until the
            // resync is done it holds no consistent data to check. Its
            // Inconsistent disk is the target at every later connect too,
            // so the split brain is not reported again.
            self.nodes[n].acked.clear();
            self.nodes[n].wrote_apart = false;
            if discarding {
                self.stats.discarded_by_operator += 1;
            } else if matches!(
                self.split_brain_policy().zero,
                tandem_core::AfterSb0Pri::DiscardYoungerPrimary
                    | tandem_core::AfterSb0Pri::DiscardOlderPrimary
            ) && role != Role::Primary
                && peer_role != Some(Role::Primary)
                && !acts.iter().any(|a| {
                    matches!(a, Action::Log(l) if l.contains("both nodes or neither were Primary"))
                })
            {
                // Decided by the flag, with no Primary on either side.
                self.stats.age_policy_victims += 1;
            }
        }
        self.note(|| format!("n{n} <- {ev:?}  [{pre} -> {post}]"));
        self.exec_all(n, acts.clone(), &lost)?;
        // The core looks at the bitmap after every batch, as the engine's
        // driver lets it.
        for _ in 0..64 {
            let mut more = Vec::new();
            let node = &mut self.nodes[n];
            let (Some(core), Some(md)) = (node.core.as_mut(), node.md.as_ref()) else {
                break;
            };
            core.pump(md.bitmap(), &mut more);
            if more.is_empty() {
                break;
            }
            self.exec_all(n, more, &lost)?;
        }
        self.check_lost_writes_marked(n, &lost)?;
        self.post_event_checks()?;
        Ok(acts)
    }

    fn pump(&mut self) -> R {
        while let Some((n, ev)) = self.queue.pop_front() {
            self.handle(n, ev)?;
        }
        Ok(())
    }

    fn exec_all(&mut self, n: usize, acts: Vec<Action>, lost: &[ReqId]) -> R {
        for a in acts {
            self.note(|| format!("n{n} -> {a:?}"));
            self.exec(n, a, lost)?;
        }
        Ok(())
    }

    /// Execute one action the way the engine would (see the crate docs of
    /// tandem-core for the contract).
    fn exec(&mut self, n: usize, a: Action, lost: &[ReqId]) -> R {
        match a {
            Action::AlBegin { req, range } => self.nodes[n].al_wait.push((req, range)),
            Action::AlEnd { range } => self.md(n).end_io(range),
            // Trim and Zero store their id too: identical content on both nodes.
            Action::LocalWrite {
                op,
                offset,
                len,
                fua,
                ..
            } => {
                if offset % BLOCK != 0 || len % BLOCK != 0 {
                    return Err(self.fail(Check::Driver, "unaligned local write"));
                }
                let blocks = blocks_of(offset, len);
                let value = match op {
                    OpId::Client(req) => {
                        self.check_al_before_data(n, req, &blocks)?;
                        self.check_generations_before_data(n, req)?;
                        let node = &mut self.nodes[n];
                        node.al_ready.remove(&req);
                        if !node.replicated.contains_key(&req) {
                            node.wrote_apart = true;
                        }
                        req
                    }
                    OpId::Peer { link, seq } => {
                        let node = &self.nodes[n];
                        match node.rx_payload.get(&(link, seq)) {
                            Some(&v) => v,
                            None => {
                                return Err(self.fail(
                                    Check::Driver,
                                    format!("peer write {seq} was never received on this link"),
                                ))
                            }
                        }
                    }
                    OpId::Resync { link, id } => {
                        let Some(values) = self.nodes[n].rs_in.remove(&(link, id)) else {
                            return Err(self.fail(
                                Check::Driver,
                                format!("resync write {id} was never received on link {link}"),
                            ));
                        };
                        if values.len() as u64 != blocks.end - blocks.start {
                            return Err(self.fail(Check::Driver, "resync payload size"));
                        }
                        let ready_at = self.io_delay();
                        self.nodes[n].local.push(LocalOp {
                            op,
                            what: LocalWhat::WriteBlocks {
                                first: blocks.start,
                                values,
                            },
                            ready_at,
                        });
                        return Ok(());
                    }
                    OpId::PeerBarrier { .. }
                    | OpId::ResyncFlush { .. }
                    | OpId::ResyncRead { .. }
                    | OpId::VerifyRead { .. }
                    | OpId::CsumRead { .. } => {
                        return Err(self.fail(Check::Driver, "a local write with a non-write id"))
                    }
                };
                let ready_at = self.io_delay();
                self.nodes[n].local.push(LocalOp {
                    op,
                    what: LocalWhat::Write { blocks, value, fua },
                    ready_at,
                });
            }
            Action::LocalFlush { op } => {
                let ready_at = self.io_delay();
                self.nodes[n].local.push(LocalOp {
                    op,
                    what: LocalWhat::Flush,
                    ready_at,
                });
            }
            Action::LocalRead { op, offset, len } => {
                let ready_at = self.io_delay();
                self.nodes[n].local.push(LocalOp {
                    op,
                    what: LocalWhat::Read {
                        blocks: blocks_of(offset, len),
                    },
                    ready_at,
                });
            }
            Action::LocalDigest { op, offset, len } => {
                let ready_at = self.io_delay();
                self.nodes[n].local.push(LocalOp {
                    op,
                    what: LocalWhat::Digest {
                        blocks: blocks_of(offset, len),
                    },
                    ready_at,
                });
            }
            Action::VerifyFinished { .. } => self.stats.verifies += 1,
            Action::MarkInSync { range } => {
                let r = self.md(n).set_in_sync(range);
                self.meta(r)?;
            }
            Action::SendBitmap => {
                let bm = self.md_ref(n).bitmap();
                let runs: Vec<Range<u64>> = bm
                    .dirty_ranges(0..bm.len())
                    .map(|r| r.start * BLOCK..r.end * BLOCK)
                    .collect();
                for chunk in runs.chunks(64) {
                    self.send(n, Packet::Bitmap(chunk.to_vec()));
                }
                self.send(n, Packet::BitmapDone);
            }
            Action::FlushBitmap => {
                let r = self.md(n).flush_bitmap();
                self.meta(r)?;
            }
            Action::RunHandler(_) => {}
            // The model keeps the metadata open; a restart attaches again.
            Action::DetachDisk => self.stats.detaches += 1,
            // The handler outdates the peer (it answers at the next pump).
            Action::FencePeer => self
                .queue
                .push_back((n, Event::FenceDone { code: Some(4) })),
            Action::ResyncFinished => {
                self.stats.resyncs += 1;
                for x in &mut self.nodes {
                    x.wrote_apart = false;
                    x.gen_apart = false;
                }
            }
            Action::Send(p) => self.send(n, p),
            Action::Complete { req, result } => self.on_complete(n, req, result.is_ok(), lost)?,
            Action::MarkOutOfSync { range } => {
                if self.opts.sabotage == Some(Sabotage::SkipMarkOutOfSync) {
                    return Ok(());
                }
                let r = self.md(n).set_out_of_sync(range.clone());
                self.meta(r)?;
                // The bitmap lives in memory; after a crash the AL replay
                // re-marks its active extents. Bits outside them must be
                // written back now.
                let active = self.md_ref(n).activity_log().active();
                let outside = extents_of(&blocks_of(range.start, range.end - range.start))
                    .any(|e| !active.contains(&(e as u32)));
                if outside {
                    let r = self.md(n).flush_bitmap();
                    self.meta(r)?;
                }
            }
            Action::ClearBitmap => {
                let r = self.md(n).set_in_sync(0..SIZE);
                self.meta(r)?;
            }
            Action::PersistGenerations(g) => {
                if self.opts.sabotage == Some(Sabotage::SkipPersistGenerations) {
                    return Ok(());
                }
                let old = self.md_ref(n).generations().current;
                let r = self.md(n).set_generations(g);
                self.meta(r)?;
                if g.current != old {
                    self.nodes[n].gen_needed = false;
                    if !self.nodes[n].cstate().is_some_and(ConnState::is_connected) {
                        self.nodes[n].gen_apart = true;
                    }
                }
            }
            Action::PersistFlags { set, clear } => {
                let r = self.md(n).change_flags(set, clear);
                self.meta(r)?;
            }
            Action::Disconnect { .. } => self.drop_link(),
            Action::SplitBrain { .. } => self.stats.split_brains += 1,
            // Counted so a run shows these connect rules were exercised.
            Action::Log(l) if l.contains("rule missed-resync-end") => {
                self.stats.missed_resync_ends += 1
            }
            Action::Log(l) if l.contains("due to disk states") => self.stats.disk_state_syncs += 1,
            Action::Log(_) => {}
            Action::PromotionDone(r) => {
                self.note(|| format!("n{n} primary (after asking the peer): {r:?}"));
                if r.is_ok() {
                    self.stats.promotions += 1;
                    // Asked while connected; the check that a new
                    // generation precedes data applies only if the link
                    // dropped meanwhile or the peer has no disk.
                    let peer_ok = self.nodes[n]
                        .core
                        .as_ref()
                        .is_some_and(|c| c.cstate().is_connected() && !no_disk(c.peer_disk()));
                    if !peer_ok {
                        self.nodes[n].gen_needed = true;
                    }
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, n: usize, p: Packet) {
        let Some(l) = self.nodes[n].core_link else {
            return;
        };
        let up = self.link == Some(l);
        if let Packet::Data {
            req,
            seq,
            epoch,
            offset,
            len,
            ..
        } = p
        {
            let node = &mut self.nodes[n];
            node.unacked.insert(req, (l, epoch, blocks_of(offset, len)));
            node.seq_req.insert((l, seq), req);
            if up {
                node.replicated.insert(req, l);
            }
        }
        if let (Packet::RsData { id, .. }, true) = (&p, up) {
            let values = self.nodes[n].rs_out.remove(&(l, *id)).unwrap_or_default();
            self.nodes[1 - n].rs_in.insert((l, *id), values);
        }
        if up {
            self.fifo[n].push_back(p);
        }
    }

    // ---- the network ----

    fn drop_link(&mut self) {
        if let Some(l) = self.link.take() {
            self.note(|| format!("link {l} down"));
            self.fifo[0].clear();
            self.fifo[1].clear();
            for n in 0..2 {
                self.queue.push_back((
                    n,
                    Event::LinkDown {
                        link: l,
                        cause: ConnState::NetworkFailure,
                    },
                ));
            }
        }
    }

    fn can_link_up(&self) -> bool {
        self.link.is_none()
            && self
                .nodes
                .iter()
                .all(|x| matches!(x.cstate(), Some(c) if c != ConnState::StandAlone))
            && (self.opts.reconnect_during_peer_io || !(0..2).any(|n| self.peer_io_pending(n)))
    }

    /// Writes or barrier flushes received from the peer are still in node
    /// `n`'s local I/O queue.
    fn peer_io_pending(&self, n: usize) -> bool {
        self.nodes[n]
            .local
            .iter()
            .any(|o| matches!(o.op, OpId::Peer { .. } | OpId::PeerBarrier { .. }))
    }

    fn link_up(&mut self) -> R {
        if !self.can_link_up() {
            return Ok(());
        }
        let l = self.next_link;
        self.next_link += 1;
        self.link = Some(l);
        self.stats.link_ups += 1;
        self.note(|| format!("link {l} up"));
        for n in 0..2 {
            self.queue.push_back((n, Event::LinkUp { link: l }));
        }
        self.pump()
    }

    /// Deliver the oldest frame from node `from`.
    fn deliver(&mut self, from: usize) -> R {
        let Some(packet) = self.fifo[from].pop_front() else {
            return Ok(());
        };
        let Some(link) = self.link else {
            return Ok(());
        };
        self.stats.frames_delivered += 1;
        let to = 1 - from;
        let Some(cstate) = self.nodes[to].cstate() else {
            return Ok(());
        };
        let node = &mut self.nodes[to];
        match packet {
            Packet::Data { req, seq, .. } => {
                node.received.insert(req);
                node.rx_payload.insert((link, seq), req);
            }
            Packet::WriteAck(seq) | Packet::NegAck(seq) => {
                if let Some(req) = node.seq_req.remove(&(link, seq)) {
                    node.unacked.remove(&req);
                    if matches!(packet, Packet::NegAck(_)) {
                        node.neg_acked.insert(req);
                    }
                }
            }
            // Under A and B the barrier ack is the only one: the peer has
            // every write of the epochs it covers.
            Packet::BarrierAck { epoch, .. } => {
                node.unacked
                    .retain(|_, (l, e, _)| !(*l == link && *e <= epoch));
            }
            _ => {}
        }
        // Invariant 8: the first report on a link is where divergence must
        // be found.
        let armed = matches!(packet, Packet::State(_))
            && cstate == ConnState::WFReportParams
            && self.nodes.iter().all(|x| x.wrote_apart);
        let first_report =
            matches!(packet, Packet::State(_)) && cstate == ConnState::WFReportParams;
        let acts = self.handle(to, Event::Packet { link, packet })?;
        if armed {
            self.check_split_brain_reported(to, &acts)?;
        }
        if first_report && acts.iter().any(|a| matches!(a, Action::SplitBrain { .. })) {
            self.check_split_brain_real(to)?;
        }
        if first_report {
            self.check_never_unrelated(to, &acts)?;
        }
        self.forget_apart_when_equal();
        self.pump()
    }

    fn drain_frames(&mut self) -> R {
        for _ in 0..10_000 {
            if let Some(from) = (0..2).find(|&i| !self.fifo[i].is_empty()) {
                self.deliver(from)?;
            } else {
                return Ok(());
            }
        }
        Err(self.fail(Check::Liveness, "frames keep coming"))
    }

    // ---- local I/O and the activity log ----

    /// Most local I/O can finish at once; some is slow.
    fn io_delay(&mut self) -> usize {
        if self.opts.slow_io > 0 && self.rng.chance(self.opts.slow_io) {
            self.step + 10 + self.rng.below(150) as usize
        } else {
            0
        }
    }

    /// Local operations of node `n` that may finish now.
    fn ready_local(&self, n: usize) -> Vec<usize> {
        let step = self.step;
        let node = &self.nodes[n];
        (0..node.local.len())
            .filter(|&i| node.local[i].ready_at <= step)
            .collect()
    }

    fn complete_local(&mut self, n: usize, idx: usize) -> R {
        let op = self.nodes[n].local.remove(idx);
        let mut ok = true;
        match op.what {
            LocalWhat::Write { blocks, value, fua } => {
                if self.opts.disk_error > 0 && self.rng.chance(self.opts.disk_error) {
                    ok = false;
                } else if !(self.opts.sabotage == Some(Sabotage::AckPeerWritesUnapplied)
                    && matches!(op.op, OpId::Peer { .. }))
                {
                    self.check_no_older_overwrite(n, &blocks, value)?;
                    let node = &mut self.nodes[n];
                    node.disk.write(blocks, value, fua);
                    node.applied.insert(value);
                }
                if let (OpId::Client(req), true) = (op.op, ok) {
                    self.nodes[n].local_done.insert(req);
                }
            }
            LocalWhat::WriteBlocks { first, values } => {
                if self.opts.disk_error > 0 && self.rng.chance(self.opts.disk_error) {
                    ok = false;
                } else {
                    for (i, v) in values.into_iter().enumerate() {
                        let b = first + i as u64;
                        let node = &mut self.nodes[n];
                        node.disk.write(b..b + 1, v, false);
                        // The source's data replaces ours, including writes
                        // this node acknowledged that the newer generation
                        // lacks (protocol A after a failover).
                        if node.acked.get(&b).is_some_and(|&a| a > v) {
                            node.acked.insert(b, v);
                        }
                        // Likewise a completed write of this node not yet
                        // flushed: the next flush cannot make it stable.
                        node.done.retain(|d| !(d.blocks.contains(&b) && d.req > v));
                    }
                }
            }
            LocalWhat::Digest { blocks } => {
                let digests = blocks
                    .map(|b| {
                        let v = self.nodes[n].disk.read(b);
                        (v as u32) ^ ((v >> 32) as u32) ^ 0x9e37_79b9
                    })
                    .collect();
                self.handle(
                    n,
                    Event::Digests {
                        op: op.op,
                        digests: Some(digests),
                    },
                )?;
                return self.pump();
            }
            LocalWhat::Read { blocks } => {
                if let OpId::ResyncRead { link, id } = op.op {
                    if self.link != Some(link) && self.rng.chance(5_000) {
                        // Read straight from the disk into the link's
                        // frame (`sendfile`), which went with its link.
                        self.handle(n, Event::ReadUnsent { op: op.op })?;
                        return self.pump();
                    }
                    let values = blocks.map(|b| self.nodes[n].disk.read(b)).collect();
                    self.nodes[n].rs_out.insert((link, id), values);
                }
            }
            LocalWhat::Flush => {
                if self.opts.sabotage != Some(Sabotage::FlushIsNoop) {
                    self.nodes[n].disk.flush();
                }
            }
        }
        self.handle(n, Event::LocalDone { op: op.op, ok })?;
        self.pump()
    }

    fn answer_al(&mut self, n: usize, idx: usize) -> R {
        let (req, range) = self.nodes[n].al_wait[idx].clone();
        let ok = if self.opts.sabotage == Some(Sabotage::SkipActivityLog) {
            true
        } else {
            // A transaction that makes an extent hot may evict a cold one,
            // after which a crash no longer marks it: the writes completed
            // there must be stable first (DRBD's md-flushes do this for
            // internal metadata). Only a power loss can tell.
            let active = self.md_ref(n).activity_log().active();
            let blocks = blocks_of(range.start, range.end - range.start);
            if extents_of(&blocks).any(|e| !active.contains(&(e as u32))) {
                self.nodes[n].disk.flush();
            }
            let r = self.md(n).begin_io(range);
            match r {
                Ok(true) => true,
                Ok(false) => {
                    self.stats.al_busy += 1;
                    return Ok(());
                }
                Err(e) => return Err(self.fail(Check::Driver, format!("AL: {e}"))),
            }
        };
        let node = &mut self.nodes[n];
        node.al_wait.remove(idx);
        node.al_ready.insert(req);
        self.handle(n, Event::AlReady { req, ok })?;
        self.pump()
    }

    // ---- clients ----

    fn can_submit(&self, n: usize) -> bool {
        let node = &self.nodes[n];
        !self.repair_pending
            && !self.quiescing
            && node.is_primary()
            && node.clients.len() < MAX_IN_FLIGHT
    }

    /// The link a write submitted now is replicated on: none while the
    /// peer has no disk to write it to (it detached after a disk error).
    fn sub_link(&self, n: usize) -> Option<u64> {
        let node = &self.nodes[n];
        let peer_has_disk = node
            .core
            .as_ref()
            .is_some_and(|c| !matches!(c.peer_disk(), DiskState::Diskless | DiskState::Failed));
        if node.cstate().is_some_and(ConnState::is_connected) && peer_has_disk {
            node.core_link
        } else {
            None
        }
    }

    fn submit_write(&mut self, n: usize) -> R {
        let req = self.next_id;
        self.next_id += 1;
        let roll = self.rng.below(100);
        let kind = match roll {
            0..=6 => WriteKind::Trim,
            7..=13 => WriteKind::Zero {
                may_trim: roll % 2 == 0,
            },
            _ => WriteKind::Data,
        };
        let count = if kind == WriteKind::Data {
            1 + self.rng.below(4)
        } else {
            1 + self.rng.below(16)
        };
        let mut blocks = 0..0;
        for _ in 0..4 {
            let boundary = self.rng.below(EXTENTS + 1) * EXTENT_BLOCKS;
            let start = (boundary + self.rng.below(2 * HOT))
                .saturating_sub(HOT)
                .min(BLOCKS - count);
            let b = start..start + count;
            let busy = self.nodes[n].clients.values().any(|c| {
                matches!(&c.kind, ClientKind::Write { blocks, .. }
                    if blocks.start < b.end && b.start < blocks.end)
            });
            if self.opts.overlapping_writes || !busy {
                blocks = b;
                break;
            }
        }
        if blocks.is_empty() {
            return Ok(()); // every range tried overlaps a write in flight
        }
        let fua = self.rng.chance(1_000);
        let sub_link = self.sub_link(n);
        self.nodes[n].clients.insert(
            req,
            ClientReq {
                kind: ClientKind::Write {
                    blocks: blocks.clone(),
                    fua,
                },
                sub_link,
            },
        );
        self.stats.writes_submitted += 1;
        self.handle(
            n,
            Event::Write {
                req,
                offset: blocks.start * BLOCK,
                len: count * BLOCK,
                kind,
                fua,
            },
        )?;
        self.pump()
    }

    fn submit_flush(&mut self, n: usize) -> R {
        let req = self.next_id;
        self.next_id += 1;
        let sub_link = self.sub_link(n);
        let before = self.nodes[n].done.clone();
        self.nodes[n].clients.insert(
            req,
            ClientReq {
                kind: ClientKind::Flush { before },
                sub_link,
            },
        );
        self.handle(n, Event::Flush { req })?;
        self.pump()
    }

    /// The link a request was submitted on is still up and the node still
    /// Connected on it (no drop in between).
    fn up_throughout(&self, n: usize, sub_link: Option<u64>) -> bool {
        sub_link.is_some()
            && self.link == sub_link
            && self.nodes[n].core_link == sub_link
            && self.nodes[1 - n].core_link == sub_link
            && self.nodes[n].cstate().is_some_and(ConnState::is_connected)
    }

    fn on_complete(&mut self, n: usize, req: ReqId, ok: bool, lost: &[ReqId]) -> R {
        let Some(cr) = self.nodes[n].clients.remove(&req) else {
            return Err(self.fail(
                Check::CompletionByProtocol,
                format!("n{n} completed request {req}, which is not in flight (twice?)"),
            ));
        };
        let up = self.up_throughout(n, cr.sub_link);
        match cr.kind {
            ClientKind::Write { blocks, fua } => {
                if !ok {
                    self.nodes[n].local_done.remove(&req);
                    self.stats.writes_failed += 1;
                    return Ok(());
                }
                self.stats.writes_completed += 1;
                self.check_completion_by_protocol(n, req, up, &cr.sub_link)?;
                self.nodes[n].local_done.remove(&req);
                self.check_completed_write_marked(n, req, &blocks, lost)?;
                if fua {
                    let all = Done {
                        req,
                        blocks: blocks.clone(),
                        link: cr.sub_link,
                    };
                    self.check_stable(n, &[all], up, "FUA write")?;
                }
                let protocol_c = self.opts.protocol == Protocol::C;
                let peer_has_it = up && protocol_c && !self.nodes[n].neg_acked.contains(&req);
                let link = self.nodes[n].replicated.get(&req).copied();
                for b in blocks.clone() {
                    for x in std::iter::once(n).chain(peer_has_it.then_some(1 - n)) {
                        let e = self.nodes[x].acked.entry(b).or_insert(0);
                        *e = (*e).max(req);
                    }
                }
                self.nodes[n].done.push(Done {
                    req,
                    blocks,
                    link: if up { link } else { None },
                });
            }
            ClientKind::Flush { before } => {
                if !ok {
                    return Ok(());
                }
                self.stats.flushes_completed += 1;
                let what = format!("flush {req}");
                self.check_stable(n, &before, up, &what)?;
                let covered: BTreeSet<ReqId> = before.iter().map(|d| d.req).collect();
                self.nodes[n].done.retain(|d| !covered.contains(&d.req));
            }
        }
        Ok(())
    }

    // ---- faults and administration ----

    /// kill -9 of node `n`'s daemon (or, with `machine`, a power loss).
    fn crash(&mut self, n: usize, machine: bool) -> R {
        self.pump()?;
        let Some(core) = self.nodes[n].core.as_ref() else {
            return Ok(());
        };
        let was_primary = core.role() == Role::Primary;
        self.note(|| format!("n{n} {} crash", if machine { "machine" } else { "daemon" }));
        let bits_before: Vec<u64> = {
            let bm = self.md_ref(n).bitmap();
            let mut v = Vec::new();
            let mut at = 0;
            while let Some(b) = bm.next_set(at) {
                v.push(b);
                at = b + 1;
            }
            v
        };
        let al_before = self.md_ref(n).activity_log().active();
        // Writes in progress: with the daemon gone each block of them may or
        // may not have reached the page cache.
        let local = std::mem::take(&mut self.nodes[n].local);
        if !machine {
            for op in local {
                if let LocalWhat::Write { blocks, value, .. } = op.what {
                    for b in blocks {
                        if self.rng.chance(5_000) {
                            self.check_no_older_overwrite(n, &(b..b + 1), value)?;
                            self.nodes[n].disk.write_block(b, value);
                        }
                    }
                }
            }
        }
        if machine {
            let mut rng = Rng::new(self.rng.next_u64());
            self.nodes[n].disk.power_loss(&mut rng);
            self.nodes[n].acked.clear();
            self.stats.machine_crashes += 1;
        } else {
            if self.opts.sabotage == Some(Sabotage::DaemonCrashLosesPageCache) {
                self.nodes[n].disk.lose_page_cache();
            }
            self.stats.daemon_crashes += 1;
        }
        let dropped = self.nodes[n].forget_daemon_state();
        self.stats.requests_dropped += dropped as u64;
        let md = self.nodes[n]
            .md
            .take()
            .expect("the metadata is open while the daemon runs");
        let io = md.abandon();
        io.crash(if machine {
            CrashMode::Tear(self.rng.next_u64())
        } else {
            CrashMode::KeepAll
        });
        let opened = Metadata::open(io, Placement::External);
        let (md, report) = self.meta(opened)?;
        self.nodes[n].md = Some(md);
        self.note(|| format!("n{n} metadata reopened: {report:?}"));
        self.stats.replay_marked_blocks += report.marked_blocks;
        if report.was_clean {
            return Err(self.fail(Check::Driver, "metadata says clean after a crash"));
        }
        if !machine {
            self.check_acknowledged_present(n)?;
        }
        // Invariant 7, metadata side: no out-of-sync bit is lost and every
        // extent the AL held is marked.
        let bm = self.md_ref(n).bitmap();
        if let Some(b) = bits_before.iter().find(|&&b| !bm.get(b)) {
            return Err(self.fail(
                Check::AcknowledgedDataSurvives,
                format!("n{n} lost the out-of-sync bit of block {b} in the crash"),
            ));
        }
        for e in &al_before {
            let ext = u64::from(*e) * EXTENT_BLOCKS..(u64::from(*e) + 1) * EXTENT_BLOCKS;
            let ext = ext.start.min(BLOCKS)..ext.end.min(BLOCKS);
            if !ext.clone().all(|b| bm.get(b)) {
                return Err(self.fail(
                    Check::AcknowledgedDataSurvives,
                    format!("n{n}: extent {e} was in the activity log at the crash but is not marked after replay"),
                ));
            }
        }
        self.nodes[n].down_until = Some(self.step + 1 + self.rng.below(40) as usize);
        self.drop_link();
        self.pump()?;
        // The HA manager fails over to a survivor with good data.
        let o = 1 - n;
        if was_primary
            && self.nodes[o].role() == Some(Role::Secondary)
            && self.nodes[o].core.as_ref().map(Core::disk) == Some(DiskState::UpToDate)
            && self.rng.chance(8_000)
        {
            self.promote(o)?;
        }
        Ok(())
    }

    fn restart_due(&mut self) -> R {
        for n in 0..2 {
            if self.nodes[n]
                .down_until
                .is_some_and(|t| t <= self.step || self.quiescing)
            {
                self.start_core(n);
            }
        }
        Ok(())
    }

    /// `primary` (never forced); true if the node is Primary afterwards.
    fn promote(&mut self, n: usize) -> R<bool> {
        let Some(core) = self.nodes[n].core.as_mut() else {
            return Ok(false);
        };
        if core.role() == Role::Primary {
            return Ok(true);
        }
        if !self.opts.promote_during_peer_io && self.peer_io_pending(n) {
            return Ok(false);
        }
        let core = self.nodes[n]
            .core
            .as_mut()
            .expect("checked above that the daemon runs");
        let needed = !core.cstate().is_connected() || no_disk(core.peer_disk());
        let mut acts = Vec::new();
        let r = core.promote(false, &mut acts);
        self.note(|| format!("n{n} primary: {r:?}"));
        if r == Ok(tandem_core::Promotion::Done) {
            self.stats.promotions += 1;
            if needed {
                self.nodes[n].gen_needed = true;
            }
        }
        self.exec_all(n, acts, &[])?;
        self.pump()?;
        self.post_event_checks()?;
        Ok(r.is_ok())
    }

    /// `secondary`; true if it was done.
    fn demote(&mut self, n: usize) -> R<bool> {
        if !self.nodes[n].clients.is_empty() {
            return Ok(false);
        }
        let Some(core) = self.nodes[n].core.as_mut() else {
            return Ok(false);
        };
        if core.role() != Role::Primary {
            return Ok(false);
        }
        let mut acts = Vec::new();
        let r = core.demote(0, &mut acts);
        self.note(|| format!("n{n} secondary: {r:?}"));
        if r.is_ok() {
            self.stats.demotions += 1;
        }
        self.exec_all(n, acts, &[])?;
        self.pump()?;
        self.post_event_checks()?;
        Ok(r.is_ok())
    }

    fn ensure_primary(&mut self) -> R {
        if self.nodes.iter().any(Node::is_primary) {
            return Ok(());
        }
        if self.opts.racing_promote > 0
            && self.live(0)
            && self.live(1)
            && self.rng.chance(self.opts.racing_promote)
        {
            // Two HA managers decide at the same moment.
            self.note(|| "both nodes promoted at once".into());
            self.promote(0)?;
            self.promote(1)?;
            return Ok(());
        }
        if let Some(p) = self.preferred {
            if self.promote(p)? {
                self.preferred = None;
                return Ok(());
            }
            self.preferred_tries += 1;
            if self.preferred_tries < 20 {
                return Ok(());
            }
            self.preferred = None;
        }
        let first = self.rng.index(2);
        for n in [first, 1 - first] {
            if self.promote(n)? {
                return Ok(());
            }
        }
        Ok(())
    }

    fn degraded(&self) -> bool {
        self.nodes.iter().any(|x| {
            x.cstate() == Some(ConnState::StandAlone)
                || matches!(
                    x.core.as_ref().map(Core::disk),
                    Some(DiskState::Outdated | DiskState::Inconsistent)
                )
        })
    }

    fn repair_ready(&self) -> bool {
        self.nodes
            .iter()
            .all(|x| x.core.is_some() && x.clients.is_empty())
    }

    /// An operator repairs a degraded pair. The disks are compared first
    /// (every difference must be marked); a StandAlone pair is then
    /// reconnected with `connect --discard-my-data` on the victim
    /// ([`Sim::discard_repair`]); otherwise both daemons stop, the better
    /// node's data is copied over the other, both get the same generations
    /// and clean bitmaps, and they start again connected.
    fn repair(&mut self) -> R {
        self.note(|| "repair".into());
        self.drop_link();
        self.pump()?;
        for _ in 0..10_000 {
            let Some(n) = (0..2).find(|&n| !self.nodes[n].local.is_empty()) else {
                break;
            };
            self.complete_local(n, 0)?;
        }
        self.check_differences_marked("before repair")?;
        let primaries: Vec<usize> = (0..2).filter(|&n| self.nodes[n].is_primary()).collect();
        let source = match primaries[..] {
            [p] => p,
            [_, _] => self.rng.index(2),
            // An interrupted resync's target holds a mix: never the source.
            _ => [
                DiskState::UpToDate,
                DiskState::Consistent,
                DiskState::Outdated,
            ]
            .iter()
            .find_map(|d| (0..2).find(|&n| self.nodes[n].core.as_ref().map(Core::disk) == Some(*d)))
            .unwrap_or_else(|| self.rng.index(2)),
        };
        let target = 1 - source;
        if self.opts.discard_repair
            && self
                .nodes
                .iter()
                .any(|x| x.split_brain_standalone && x.cstate() == Some(ConnState::StandAlone))
            && self.discard_repair(target)?
        {
            if primaries.contains(&source) {
                self.preferred = Some(source);
                self.preferred_tries = 0;
            }
            return Ok(());
        }
        let src_disk = self.nodes[source].disk.clone();
        self.nodes[target].disk.copy_from(&src_disk);
        self.nodes[source].disk.flush();
        self.nodes[target].acked = self.nodes[source].acked.clone();
        let gens = self.md_ref(source).generations();
        for n in 0..2 {
            let dropped = self.nodes[n].forget_daemon_state();
            debug_assert_eq!(dropped, 0);
            self.nodes[n].wrote_apart = false;
            self.nodes[n].gen_apart = false;
            let md = self.md(n);
            let r = md
                .set_in_sync(0..SIZE)
                .and_then(|_| md.set_generations(gens))
                .and_then(|_| {
                    md.change_flags(
                        flags::CONSISTENT | flags::WAS_UP_TO_DATE,
                        flags::PRIMARY_IND | flags::CRASHED_PRIMARY | flags::PEER_OUT_DATED,
                    )
                });
            self.meta(r)?;
            let md = self.nodes[n]
                .md
                .take()
                .expect("the metadata is open while the daemon runs");
            let closed = md.close();
            let io = self.meta(closed)?;
            let opened = Metadata::open(io, Placement::External);
            let (md, report) = self.meta(opened)?;
            if !report.was_clean {
                return Err(self.fail(Check::Driver, "metadata unclean after a clean close"));
            }
            self.nodes[n].md = Some(md);
            self.start_core(n);
        }
        self.stats.repairs += 1;
        self.repair_pending = false;
        self.link_up()?;
        self.drain_frames()?;
        if primaries.contains(&source) {
            self.preferred = Some(source);
            self.preferred_tries = 0;
        }
        Ok(())
    }

    /// A StandAlone pair repaired the way an operator does it on real
    /// daemons: the victim (`target`) is demoted if it is Primary and
    /// reconnects with `connect --discard-my-data`, the survivor with
    /// `connect`; the core then finds the split brain (or whatever else
    /// the generations say), makes the victim the SyncTarget of the union
    /// of both bitmaps and the resync runs like any other, under the
    /// schedule's faults. False when the victim cannot be demoted: then
    /// the disks are copied instead.
    fn discard_repair(&mut self, target: usize) -> R<bool> {
        if self.nodes[target].is_primary() && !self.demote(target)? {
            return Ok(false);
        }
        self.note(|| format!("n{target} connect --discard-my-data"));
        for n in [target, 1 - target] {
            let Some(core) = self.nodes[n].core.as_mut() else {
                return Ok(false);
            };
            // As the verb does: `connect` sets the flag to what it is
            // given, so the survivor's plain `connect` clears one left
            // from an earlier attempt.
            core.set_discard_my_data(n == target);
            core.connect();
        }
        self.stats.repairs += 1;
        self.stats.discard_repairs += 1;
        self.repair_pending = false;
        self.link_up()?;
        self.drain_frames()?;
        Ok(true)
    }

    // ---- the schedule ----

    fn setup(&mut self) -> R {
        self.start_core(0);
        self.start_core(1);
        self.link_up()?;
        self.drain_frames()?;
        // A fresh pair skips the initial sync.
        let mut acts = Vec::new();
        let r = self.nodes[0]
            .core
            .as_mut()
            .map(|c| c.new_current_uuid_clear_bitmap(&mut acts));
        if !matches!(r, Some(Ok(()))) {
            return Err(self.fail(Check::Driver, format!("new-current-uuid: {r:?}")));
        }
        self.exec_all(0, acts, &[])?;
        self.pump()?;
        self.drain_frames()?;
        if !self.promote(0)? {
            return Err(self.fail(Check::Driver, "cannot promote the fresh pair"));
        }
        self.drain_frames()?;
        let ok = self.nodes.iter().all(|x| {
            x.core.as_ref().is_some_and(|c| {
                c.cstate() == ConnState::Connected && c.disk() == DiskState::UpToDate
            })
        });
        if !ok {
            return Err(self.fail(Check::Driver, "the fresh pair did not connect UpToDate"));
        }
        Ok(())
    }

    fn step_once(&mut self) -> R {
        self.restart_due()?;
        if self.repair_pending && self.repair_ready() {
            return self.repair();
        }
        let o = &self.opts;
        let mut menu: Vec<(u32, Choice)> = Vec::with_capacity(16);
        if self.fifo.iter().any(|f| !f.is_empty()) {
            menu.push((3_000, Choice::Deliver));
        }
        if (0..2).any(|n| !self.ready_local(n).is_empty()) {
            menu.push((2_500, Choice::Local));
        }
        if self.nodes.iter().any(|x| !x.al_wait.is_empty()) {
            menu.push((1_000, Choice::Al));
        }
        for n in 0..2 {
            if self.can_submit(n) {
                menu.push((1_500, Choice::Write(n)));
                menu.push((150, Choice::Flush(n)));
            }
            if self.live(n) {
                menu.push((300, Choice::Tick(n)));
                if self.nodes[n].cstate() == Some(ConnState::Connected) {
                    menu.push((20, Choice::Verify(n)));
                    menu.push((10, Choice::Invalidate(n)));
                }
                if self.nodes[n]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.sync_progress().is_some())
                {
                    menu.push((30, Choice::TogglePause(n)));
                }
                menu.push((o.daemon_crash, Choice::Crash(n)));
                menu.push((o.machine_crash, Choice::MachineCrash(n)));
            }
        }
        if self.link.is_some() {
            menu.push((o.link_drop, Choice::LinkDrop));
        } else if self.can_link_up() {
            menu.push((o.link_up, Choice::LinkUp));
        }
        let primaries = self.nodes.iter().filter(|x| x.is_primary()).count();
        let connected = self.both_connected;
        if connected && primaries == 1 {
            menu.push((o.switchover, Choice::Switchover));
        }
        if !connected && primaries == 1 && self.live(0) && self.live(1) {
            menu.push((o.rogue_promote, Choice::Rogue));
        }
        if primaries == 2 {
            menu.push((100, Choice::DemoteOne));
        }
        if primaries == 0 && !self.repair_pending {
            menu.push((200, Choice::EnsurePrimary));
        }
        if !self.repair_pending && self.degraded() {
            menu.push((o.repair, Choice::Repair));
        }
        menu.push((500, Choice::Idle));
        let total: u32 = menu.iter().map(|(w, _)| w).sum();
        let mut r = self.rng.below(u64::from(total)) as u32;
        let mut choice = Choice::Idle;
        for (w, c) in menu {
            if r < w {
                choice = c;
                break;
            }
            r -= w;
        }
        self.do_choice(choice)
    }

    fn do_choice(&mut self, choice: Choice) -> R {
        match choice {
            Choice::Deliver => {
                let ready: Vec<usize> = (0..2).filter(|&i| !self.fifo[i].is_empty()).collect();
                let from = ready[self.rng.index(ready.len())];
                self.deliver(from)
            }
            Choice::Local => {
                let ready: Vec<usize> = (0..2)
                    .filter(|&i| !self.ready_local(i).is_empty())
                    .collect();
                let n = ready[self.rng.index(ready.len())];
                let ops = self.ready_local(n);
                let idx = ops[self.rng.index(ops.len())];
                self.complete_local(n, idx)
            }
            Choice::Al => {
                let ready: Vec<usize> = (0..2)
                    .filter(|&i| !self.nodes[i].al_wait.is_empty())
                    .collect();
                let n = ready[self.rng.index(ready.len())];
                let idx = self.rng.index(self.nodes[n].al_wait.len());
                self.answer_al(n, idx)
            }
            Choice::Write(n) => self.submit_write(n),
            Choice::Flush(n) => self.submit_flush(n),
            Choice::LinkDrop => {
                self.stats.link_drops += 1;
                self.drop_link();
                self.pump()
            }
            Choice::LinkUp => self.link_up(),
            Choice::Crash(n) => self.crash(n, false),
            Choice::MachineCrash(n) => self.crash(n, true),
            Choice::Switchover => {
                let Some(p) = (0..2).find(|&n| self.nodes[n].is_primary()) else {
                    return Ok(());
                };
                if self.demote(p)? {
                    self.preferred = Some(1 - p);
                    self.preferred_tries = 0;
                    self.promote(1 - p)?;
                }
                Ok(())
            }
            Choice::Rogue => {
                let Some(s) = (0..2).find(|&n| self.nodes[n].role() == Some(Role::Secondary))
                else {
                    return Ok(());
                };
                if self.promote(s)? {
                    self.stats.rogue_promotions += 1;
                }
                Ok(())
            }
            Choice::DemoteOne => {
                let n = self.rng.index(2);
                self.demote(n).map(|_| ())
            }
            Choice::EnsurePrimary => self.ensure_primary(),
            Choice::Repair => {
                self.repair_pending = true;
                Ok(())
            }
            Choice::Tick(n) => {
                self.handle(n, Event::Tick)?;
                self.pump()
            }
            Choice::Invalidate(n) => {
                let mut acts = Vec::new();
                let r = self.nodes[n].core.as_mut().map(|c| c.invalidate(&mut acts));
                if matches!(r, Some(Ok(()))) {
                    self.note(|| format!("n{n} invalidate"));
                    self.stats.invalidates += 1;
                    self.exec_all(n, acts, &[])?;
                }
                self.pump()
            }
            Choice::TogglePause(n) => self.set_paused(n, None),
            Choice::Verify(n) => {
                let mut acts = Vec::new();
                let started = self.nodes[n]
                    .core
                    .as_mut()
                    .map(|c| c.start_verify(&mut acts).is_ok());
                if started == Some(true) {
                    self.note(|| format!("n{n} verify"));
                    self.exec_all(n, acts, &[])?;
                    // The first requests go out on the next batch's pump.
                    self.handle(n, Event::Tick)?;
                }
                self.pump()
            }
            Choice::Idle => Ok(()),
        }
    }

    /// Stop the faults and the clients, heal the link, drain everything;
    /// then every request must have been answered and every difference
    /// between the disks must be marked.
    /// `pause-sync` (Some(true)), `resume-sync` (Some(false)) or the
    /// opposite of the current state (None) on node `n`.
    fn set_paused(&mut self, n: usize, want: Option<bool>) -> R {
        let mut acts = Vec::new();
        let Some(core) = self.nodes[n].core.as_mut() else {
            return Ok(());
        };
        let paused = matches!(
            core.cstate(),
            ConnState::PausedSyncS | ConnState::PausedSyncT
        );
        let to = want.unwrap_or(!paused);
        if core.pause_sync(to, &mut acts).is_ok() {
            self.note(|| format!("n{n} pause-sync {to}"));
            self.exec_all(n, acts, &[])?;
        }
        self.pump()
    }

    fn quiesce(&mut self) -> R {
        // A resync held by an operator would never end.
        for n in 0..2 {
            self.set_paused(n, Some(false))?;
        }
        self.quiescing = true;
        self.repair_pending = false;
        self.note(|| "quiescent phase".into());
        // Ticks close epochs whose writes wait for stability; one round of
        // them may be needed each time nothing else is left to do.
        let mut ticked = false;
        for i in 0..200_000 {
            self.step = self.opts.steps + i;
            self.restart_due()?;
            if self.can_link_up() {
                self.link_up()?;
                continue;
            }
            if let Some(from) = (0..2).find(|&i| !self.fifo[i].is_empty()) {
                ticked = false;
                self.deliver(from)?;
                continue;
            }
            if let Some(n) = (0..2).find(|&n| !self.nodes[n].local.is_empty()) {
                let idx = self.rng.index(self.nodes[n].local.len());
                self.complete_local(n, idx)?;
                continue;
            }
            if let Some(n) = (0..2).find(|&n| !self.nodes[n].al_wait.is_empty()) {
                // Slots held by writes waiting for stability free up only
                // after a barrier: close the epochs before asking again.
                if !ticked {
                    ticked = true;
                    for n in 0..2 {
                        self.handle(n, Event::Tick)?;
                    }
                    self.pump()?;
                    continue;
                }
                let idx = self.rng.index(self.nodes[n].al_wait.len());
                self.answer_al(n, idx)?;
                continue;
            }
            let idle = self
                .nodes
                .iter()
                .all(|x| x.core.as_ref().is_some_and(Core::is_idle));
            let settled = if self.link.is_some() {
                self.both_connected
            } else {
                !self.can_link_up()
            };
            if !idle && !ticked {
                ticked = true;
                for n in 0..2 {
                    self.handle(n, Event::Tick)?;
                }
                self.pump()?;
                continue;
            }
            if idle && settled {
                for n in 0..2 {
                    if let Some((req, _)) = self.nodes[n].clients.first_key_value() {
                        return Err(self.fail(
                            Check::Liveness,
                            format!("n{n} never answered request {req}"),
                        ));
                    }
                }
                return self.check_differences_marked("after quiescence");
            }
            // Nothing to deliver or complete, yet not idle: stuck.
            let why: Vec<String> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(n, x)| match &x.core {
                    Some(c) => format!(
                        "n{n}: {} {} {} idle={} {:?} clients {:?}",
                        c.role(),
                        c.cstate(),
                        c.disk(),
                        c.is_idle(),
                        c.counters(),
                        x.clients.keys().collect::<Vec<_>>()
                    ),
                    None => format!("n{n}: down"),
                })
                .collect();
            return Err(self.fail(
                Check::Liveness,
                format!(
                    "the pair is stuck after the faults stopped: {}",
                    why.join("; ")
                ),
            ));
        }
        Err(self.fail(Check::Liveness, "the pair never quiesced"))
    }
}

/// Detached, or failed and being detached.
fn no_disk(d: DiskState) -> bool {
    matches!(d, DiskState::Diskless | DiskState::Failed)
}
