//! Resync: after the connect-time decision (or `invalidate`,
//! `invalidate-remote`, a forced promotion) both nodes exchange their
//! out-of-sync bitmaps, merge them, and the SyncTarget pulls every dirty
//! block from the SyncSource.
//!
//! Why these rules:
//! - The target drives (it requests, the source answers), so the rate limit
//!   and the window of requests in flight live in one place.
//! - A source reads a range only when no client write overlapping it is
//!   between "sent to the peer" and "written locally", and client writes
//!   overlapping a read in flight wait for it. With one ordered link, the
//!   peer then always applies the newer data last.
//! - The target applies resync data through the same receive queue as
//!   replicated writes, in arrival order, never two overlapping at once.
//! - The target acknowledges resynced ranges only after a flush, and only
//!   then does the source clear its bits: a power loss of the target can
//!   lose nothing the source considers done.
//! - The source gives a full sync a fresh bitmap generation (`SyncUuid`)
//!   that the target adopts as its current one, so an interrupted sync
//!   resumes from the bitmap rather than starting over.

use super::*;

/// Largest resync request: 1 MiB (256 blocks of 4 KiB).
pub const RESYNC_REQUEST_MAX: u64 = 1 << 20;
/// Resync requests the target keeps in flight.
pub const RESYNC_WINDOW: usize = 32;
/// Resync requests the source holds (waiting for conflicting client writes,
/// or being read) before it calls the peer a protocol violator: a target
/// honours [`RESYNC_WINDOW`].
pub const RESYNC_SOURCE_QUEUE: usize = 4 * RESYNC_WINDOW;
/// The target flushes (and acknowledges) written resync data at least this
/// often.
const FLUSH_BATCH: u64 = 256 << 20;
/// Bytes per bitmap bit.
pub const BLOCK: u64 = 4096;

/// Read-only view of the out-of-sync bitmap the driver keeps.
pub trait OutOfSync {
    /// Out-of-sync bytes in total.
    fn dirty_bytes(&self) -> u64;
    /// The first run of out-of-sync bytes at or after `from`, at most
    /// `max` long.
    fn next_dirty(&self, from: u64, max: u64) -> Option<Range<u64>>;
}

impl OutOfSync for tandem_meta::Bitmap {
    fn dirty_bytes(&self) -> u64 {
        self.count() * BLOCK
    }
    fn next_dirty(&self, from: u64, max: u64) -> Option<Range<u64>> {
        let first = from / BLOCK;
        let r = self.dirty_ranges(first..self.len()).next()?;
        let end = r.end.min(r.start + (max / BLOCK).max(1));
        Some(r.start * BLOCK..end * BLOCK)
    }
}

/// Which side of a resync this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncSide {
    /// Sends data.
    Source,
    /// Receives data.
    Target,
}

/// What `status` shows about a running resync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncProgress {
    /// This node's side.
    pub side: SyncSide,
    /// Out-of-sync bytes when the resync started (after the bitmaps merged).
    pub total: u64,
    /// Out-of-sync bytes now.
    pub remaining: u64,
    /// Paused by either node.
    pub paused: bool,
    /// Still exchanging bitmaps.
    pub starting: bool,
}

/// A resync in progress on the current link.
#[derive(Debug)]
pub(crate) struct Sync {
    pub(crate) side: SyncSide,
    /// The peer's whole bitmap has arrived (merged into ours).
    pub(crate) running: bool,
    pub(crate) paused_here: bool,
    pub(crate) paused_peer: bool,
    pub(crate) total: Option<u64>,
    // --- target ---
    cursor: u64,
    next_id: u64,
    /// Requested, no reply yet.
    requested: BTreeMap<u64, Range<u64>>,
    /// Written, not yet flushed and acknowledged.
    written: Vec<Range<u64>>,
    written_bytes: u64,
    /// A flush of written ranges is running.
    flushing: Option<(u64, Vec<Range<u64>>)>,
    next_flush: u64,
    /// Bytes the rate limit still allows before the next tick.
    budget: u64,
    /// A block could not be resynced on this pass: finish without UpToDate.
    failed: bool,
    // --- source ---
    /// Peer requests being read locally, by id.
    pub(crate) reads: BTreeMap<u64, Range<u64>>,
    /// Peer requests waiting for overlapping client writes, with the
    /// target's digests for a checksum-based one.
    queued: VecDeque<(u64, Range<u64>, Option<Vec<u32>>)>,
    /// Checksum-based requests: the target's digests while ours are
    /// computed (source).
    theirs: BTreeMap<u64, Vec<u32>>,
    /// Checksum-based requests: the span that differs and is being read
    /// (source), or has arrived as data (target).
    span: BTreeMap<u64, Range<u64>>,
    /// Checksum-based resync (target).
    csums: bool,
    /// Requests being read or compared (source) when their range was
    /// marked out of sync again: served without clearing the bits later.
    poisoned: std::collections::BTreeSet<u64>,
    /// Ranges marked out of sync again during this resync (source): the
    /// peer may have received a write there that this node failed, perhaps
    /// after it took its digests, so checksums cannot call them identical.
    redirtied: Vec<Range<u64>>,
    /// Requests sent plain although `csums` is on (our digests failed).
    plain: std::collections::BTreeSet<u64>,
    /// Ranges sent, by start, until the target acknowledges them stable.
    /// A range marked out of sync again meanwhile (a failed local write)
    /// is dropped from here, so the late ack cannot clear the new bit.
    served: BTreeMap<u64, u64>,
    /// Requests the target acknowledged stable while their read was still
    /// open here: a frame sent straight from the disk is on the wire before
    /// the driver reports the read done, so the ack can overtake that
    /// report; the bits clear when it comes.
    acked_early: std::collections::BTreeSet<u64>,
}

impl Sync {
    fn new(side: SyncSide, budget: u64) -> Sync {
        Sync {
            side,
            running: false,
            paused_here: false,
            paused_peer: false,
            total: None,
            cursor: 0,
            next_id: 1,
            requested: BTreeMap::new(),
            written: Vec::new(),
            written_bytes: 0,
            flushing: None,
            next_flush: 1,
            budget,
            failed: false,
            reads: BTreeMap::new(),
            queued: VecDeque::new(),
            theirs: BTreeMap::new(),
            span: BTreeMap::new(),
            csums: false,
            plain: std::collections::BTreeSet::new(),
            poisoned: std::collections::BTreeSet::new(),
            redirtied: Vec::new(),
            served: BTreeMap::new(),
            acked_early: std::collections::BTreeSet::new(),
        }
    }
    fn paused(&self) -> bool {
        self.paused_here || self.paused_peer
    }

    /// Source: request `id` was answered; its bits clear on the target's
    /// ack (now, if that came first), unless the range was marked again
    /// meanwhile.
    fn served(&mut self, id: u64, range: &Range<u64>, out: &mut Vec<Action>) {
        let acked = self.acked_early.remove(&id);
        if self.poisoned.remove(&id) {
            return;
        }
        if acked {
            out.push(Action::MarkInSync {
                range: range.clone(),
            });
        } else {
            self.served.insert(range.start, range.end);
        }
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl Core {
    /// Bytes the resync may move per tick (the engine ticks every 100 ms).
    fn tick_budget(&self) -> u64 {
        (self.cfg.resync_rate / 10).max(BLOCK)
    }

    /// The running resync, if any.
    pub fn sync_progress(&self) -> Option<SyncProgress> {
        let s = self.sync.as_ref()?;
        Some(SyncProgress {
            side: s.side,
            total: s.total.unwrap_or(self.local_oos).max(self.local_oos),
            remaining: self.local_oos,
            paused: s.paused(),
            starting: !s.running,
        })
    }

    pub(crate) fn sync_cstate(&self) -> ConnState {
        match &self.sync {
            None => ConnState::Connected,
            Some(s) => match (s.side, s.running, s.paused()) {
                (SyncSide::Source, false, _) => ConnState::WFBitMapS,
                (SyncSide::Target, false, _) => ConnState::WFBitMapT,
                (SyncSide::Source, true, false) => ConnState::SyncSource,
                (SyncSide::Target, true, false) => ConnState::SyncTarget,
                (SyncSide::Source, true, true) => ConnState::PausedSyncS,
                (SyncSide::Target, true, true) => ConnState::PausedSyncT,
            },
        }
    }

    /// Start a resync on the current link: mark everything for a full one,
    /// give a full one a fresh bitmap generation (source), become
    /// Inconsistent (target), and send our bitmap.
    pub(crate) fn begin_sync(&mut self, side: SyncSide, full: bool, out: &mut Vec<Action>) {
        if full {
            out.push(Action::MarkOutOfSync {
                range: 0..self.cfg.size,
            });
            // Durable before any generation says a resync is under way: a
            // crash must find every bit set, or the resumed resync would
            // skip blocks (DRBD keeps a full-sync flag for this).
            out.push(Action::FlushBitmap);
            self.local_oos = self.cfg.size;
        }
        match side {
            SyncSide::Source => {
                // The target takes our bitmap generation as its current
                // one: whatever it held before (a split-brain victim's
                // changes, a half-done full sync) is then described by our
                // bitmap, so a resync interrupted by a link drop resumes
                // from the bitmap. A bitmap generation already tracking
                // changes serves; reusing it keeps the history slots.
                let uuid = if self.gens.bitmap != 0 {
                    self.gens.bitmap
                } else {
                    let uuid = self.fresh_uuid();
                    // A bitmap generation begun here describes this node's
                    // role on it too (see `new_current_uuid`).
                    if self.role == Role::Primary {
                        self.persist_flags(flags::BITMAP_WAS_PRIMARY, 0, out);
                    } else {
                        self.persist_flags(0, flags::BITMAP_WAS_PRIMARY, out);
                    }
                    self.gens.bitmap = uuid;
                    out.push(Action::PersistGenerations(self.gens));
                    uuid
                };
                out.push(Action::Send(Packet::SyncUuid { uuid }));
            }
            SyncSide::Target => {
                self.set_disk(DiskState::Inconsistent, out);
            }
        }
        let budget = self.tick_budget();
        let mut sync = Sync::new(side, budget);
        sync.csums = self.cfg.csums;
        self.sync = Some(sync);
        self.cstate = self.sync_cstate();
        out.push(Action::Log(format!(
            "resync starts: this node is {}{}",
            self.cstate,
            if full { " (full sync)" } else { "" }
        )));
        out.push(Action::SendBitmap);
    }

    /// `invalidate`: this node's data is to be replaced by the peer's.
    pub fn invalidate(&mut self, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if self.role == Role::Primary {
            return Err(Refusal::Other(
                "refusing to invalidate: this node is Primary (demote it first)".into(),
            ));
        }
        self.no_sync_running()?;
        if no_disk(self.disk) {
            return Err(Refusal::Other(
                "refusing to invalidate: no local disk".into(),
            ));
        }
        if self.cstate.is_connected() {
            if !matches!(self.peer_disk, DiskState::UpToDate | DiskState::Consistent) {
                return Err(Refusal::Other(format!(
                    "refusing to invalidate: the peer's disk is {}, it cannot be the source",
                    self.peer_disk
                )));
            }
            out.push(Action::Send(Packet::SyncStart {
                source: false,
                full: true,
            }));
            self.begin_sync(SyncSide::Target, true, out);
            self.send_state(out);
        } else {
            // Resynced from the peer on the next connect: an Inconsistent
            // node is always the target.
            out.push(Action::MarkOutOfSync {
                range: 0..self.cfg.size,
            });
            out.push(Action::FlushBitmap);
            self.set_disk(DiskState::Inconsistent, out);
        }
        Ok(())
    }

    /// `invalidate-remote`: the peer's data is to be replaced by ours.
    pub fn invalidate_remote(&mut self, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if !self.cstate.is_connected() {
            return Err(Refusal::NotConnected);
        }
        self.no_sync_running()?;
        if self.disk != DiskState::UpToDate {
            return Err(Refusal::Other(format!(
                "refusing to invalidate the peer: this node's disk is {}, not UpToDate",
                self.disk
            )));
        }
        if self.peer_role == Role::Primary {
            return Err(Refusal::Other(
                "refusing to invalidate the peer: it is Primary".into(),
            ));
        }
        if no_disk(self.peer_disk) {
            return Err(Refusal::Other(format!(
                "refusing to invalidate the peer: its disk is {} (attach it first)",
                self.peer_disk
            )));
        }
        out.push(Action::Send(Packet::SyncStart {
            source: true,
            full: true,
        }));
        self.begin_sync(SyncSide::Source, true, out);
        Ok(())
    }

    /// `pause-sync` / `resume-sync`.
    pub fn pause_sync(&mut self, paused: bool, out: &mut Vec<Action>) -> Result<(), Refusal> {
        let Some(s) = self.sync.as_mut() else {
            return Err(Refusal::Other("no resync is running".into()));
        };
        if s.paused_here != paused {
            s.paused_here = paused;
            out.push(Action::Send(Packet::SyncPause { paused }));
        }
        self.cstate = self.sync_cstate();
        self.start_rs_reads(out);
        Ok(())
    }

    /// A range was marked out of sync again (source side): an ack for
    /// data sent before must not clear it.
    pub(crate) fn poison_served(&mut self, range: &Range<u64>) {
        if let Some(s) = self.sync.as_mut() {
            // Bounded by the failed writes of one resync; merged as they come.
            match s
                .redirtied
                .iter_mut()
                .find(|r| overlaps(r, range) || r.end == range.start)
            {
                Some(r) => *r = r.start.min(range.start)..r.end.max(range.end),
                None => s.redirtied.push(range.clone()),
            }
            s.served.retain(|&a, &mut e| !overlaps(&(a..e), range));
            let hit: Vec<u64> = s
                .reads
                .iter()
                .map(|(&id, r)| (id, r))
                .chain(s.queued.iter().map(|q| (q.0, &q.1)))
                .filter(|(_, r)| overlaps(r, range))
                .map(|(id, _)| id)
                .collect();
            s.poisoned.extend(hit);
        }
    }

    pub(crate) fn no_sync_running(&self) -> Result<(), Refusal> {
        if self.verify.is_some() {
            return Err(Refusal::Other(format!(
                "an online verify is running ({}); wait for it or disconnect",
                self.cstate
            )));
        }
        if self.sync.is_some() {
            return Err(Refusal::Other(format!(
                "a resync is running ({}); wait for it or disconnect",
                self.cstate
            )));
        }
        Ok(())
    }

    /// Frames of the resync protocol.
    pub(crate) fn sync_packet(&mut self, packet: Packet, out: &mut Vec<Action>) {
        match packet {
            Packet::SyncStart { source, full } => {
                if self.sync.is_some() {
                    return self.protocol_error("peer started a resync while one is running", out);
                }
                if source && self.role == Role::Primary {
                    return self.protocol_error("peer wants to overwrite this Primary", out);
                }
                if no_disk(self.disk) {
                    // The peer asked before it heard of our detach: the
                    // next connect finds no disk to resync.
                    return self
                        .protocol_error("peer started a resync but this node has no disk", out);
                }
                let side = if source {
                    SyncSide::Target
                } else {
                    SyncSide::Source
                };
                self.begin_sync(side, full, out);
                self.send_state(out);
            }
            Packet::SyncUuid { uuid } => {
                if !matches!(&self.sync, Some(s) if s.side == SyncSide::Target) {
                    return self.protocol_error("SyncUuid outside a resync as target", out);
                }
                self.take_current(uuid, out);
            }
            Packet::Bitmap(runs) => {
                if !matches!(&self.sync, Some(s) if !s.running) {
                    return self.protocol_error("bitmap outside a resync start", out);
                }
                for r in runs {
                    if r.start >= r.end || r.end > self.cfg.size {
                        return self.protocol_error(
                            &format!("bitmap run {}..{} is outside the device", r.start, r.end),
                            out,
                        );
                    }
                    out.push(Action::MarkOutOfSync { range: r });
                }
            }
            Packet::BitmapDone => {
                let Some(s) = self.sync.as_mut().filter(|s| !s.running) else {
                    return self.protocol_error("bitmap end outside a resync start", out);
                };
                s.running = true;
                // The merged bitmap is what an interrupted resync resumes
                // from: make it durable before any block moves.
                out.push(Action::FlushBitmap);
                self.cstate = self.sync_cstate();
            }
            Packet::SyncEnd => {
                let Some(s) = self.sync.take() else {
                    return self.protocol_error("resync end outside a resync", out);
                };
                if s.side != SyncSide::Source {
                    return self.protocol_error("resync end sent to the SyncTarget", out);
                }
                self.cstate = ConnState::Connected;
                out.push(Action::Log(format!(
                    "the peer ended the resync without every block; {} bytes stay out of sync here and resync on the next connect",
                    self.local_oos
                )));
                self.start_waiting(out);
            }
            Packet::SyncPause { paused } => {
                if let Some(s) = self.sync.as_mut() {
                    s.paused_peer = paused;
                    self.cstate = self.sync_cstate();
                }
                self.start_rs_reads(out);
            }
            Packet::RsRequest { id, offset, len } => self.rs_request(id, offset, len, None, out),
            Packet::CsumRequest {
                id,
                offset,
                digests,
            } => {
                let len = digests.len() as u64 * BLOCK;
                self.rs_request(id, offset, len, Some(digests), out)
            }
            Packet::RsInSync { id, offset, len } => self.rs_in_sync(id, offset, len, out),
            Packet::RsData { id, offset, len } => self.rs_data(id, offset, len, out),
            Packet::RsNegAck { id } => {
                let Some(s) = self.sync.as_mut().filter(|s| s.side == SyncSide::Target) else {
                    return;
                };
                if let Some(r) = s.requested.remove(&id) {
                    s.failed = true;
                    out.push(Action::Log(format!(
                        "the peer could not read {}+{} for the resync; it stays out of sync",
                        r.start,
                        r.end - r.start
                    )));
                }
            }
            Packet::RsAck { offset, len } => {
                let Some(s) = self.sync.as_mut().filter(|s| s.side == SyncSide::Source) else {
                    return;
                };
                let end = offset.saturating_add(len);
                let done: Vec<(u64, u64)> = s
                    .served
                    .range(offset..end)
                    .filter(|(_, &e)| e <= end)
                    .map(|(&a, &e)| (a, e))
                    .collect();
                for (a, e) in done {
                    s.served.remove(&a);
                    out.push(Action::MarkInSync { range: a..e });
                }
                let early: Vec<u64> = s
                    .reads
                    .iter()
                    .filter(|(_, r)| r.start >= offset && r.end <= end)
                    .map(|(&id, _)| id)
                    .collect();
                s.acked_early.extend(early);
            }
            _ => {}
        }
    }

    /// Source: the target asks for a range.
    fn rs_request(
        &mut self,
        id: u64,
        offset: u64,
        len: u64,
        digests: Option<Vec<u32>>,
        out: &mut Vec<Action>,
    ) {
        let size = self.cfg.size;
        let Some(s) = self.sync.as_mut().filter(|s| s.side == SyncSide::Source) else {
            return self.protocol_error("resync request to a node that is not SyncSource", out);
        };
        let inside = matches!(offset.checked_add(len), Some(end) if end <= size);
        if !inside || len == 0 || len > RESYNC_REQUEST_MAX {
            return self.protocol_error(&format!("resync request {offset}+{len} is invalid"), out);
        }
        if s.reads.len() + s.queued.len() >= RESYNC_SOURCE_QUEUE {
            return self.protocol_error("peer overran the resync request queue", out);
        }
        s.queued.push_back((id, offset..offset + len, digests));
        self.start_rs_reads(out);
    }

    /// Source: start queued reads that no client write in flight overlaps,
    /// in order.
    pub(crate) fn start_rs_reads(&mut self, out: &mut Vec<Action>) {
        let Some(link) = self.link else { return };
        loop {
            let Some((id, range)) = self
                .sync
                .as_ref()
                .and_then(|s| s.queued.front().map(|q| (q.0, q.1.clone())))
            else {
                return;
            };
            // Writes from the peer still landing here (from before a
            // promotion or a reconnect) count as much as client writes.
            let busy = self.reqs.values().any(|r| {
                r.started
                    && r.pending & (LOCAL | AL) != 0
                    && r.range().is_some_and(|o| overlaps(&o, &range))
            }) || self.rx.inflight.values().any(|o| overlaps(o, &range));
            if busy || self.sync.as_ref().is_some_and(Sync::paused) {
                return;
            }
            if self.app_active {
                if self.source_budget <= 0 {
                    return;
                }
                let cost = i64::try_from(range.end - range.start).unwrap_or(i64::MAX);
                self.source_budget = self.source_budget.saturating_sub(cost);
            }
            let Some(s) = self.sync.as_mut() else { return };
            let digests = s.queued.pop_front().and_then(|q| q.2);
            s.reads.insert(id, range.clone());
            let len = range.end - range.start;
            match digests {
                Some(d) => {
                    s.theirs.insert(id, d);
                    out.push(Action::LocalDigest {
                        op: OpId::CsumRead { link, id },
                        offset: range.start,
                        len,
                    });
                }
                None => {
                    self.counters.local_pending += 1;
                    out.push(Action::LocalRead {
                        op: OpId::ResyncRead { link, id },
                        offset: range.start,
                        len,
                    });
                }
            }
        }
    }

    /// Source: a read for the peer finished.
    pub(crate) fn rs_read_done(&mut self, link: u64, id: u64, ok: bool, out: &mut Vec<Action>) {
        if self.link != Some(link) {
            // That link's resync went with it; ids restart with every
            // resync, so this one's read of the same id is not ours.
            return;
        }
        let Some(range) = self.sync.as_mut().and_then(|s| s.reads.remove(&id)) else {
            return;
        };
        let span = self.sync.as_mut().and_then(|s| s.span.remove(&id));
        if ok {
            let data = span.clone().unwrap_or(range.clone());
            self.counters.resync_sent += data.end - data.start;
            if let Some(s) = self.sync.as_mut() {
                s.served(id, &range, out);
            }
            out.push(Action::Send(Packet::RsData {
                id,
                offset: data.start,
                len: data.end - data.start,
            }));
            if span.is_some() {
                out.push(Action::Send(Packet::RsInSync {
                    id,
                    offset: range.start,
                    len: range.end - range.start,
                }));
            }
        } else {
            if let Some(s) = self.sync.as_mut() {
                s.acked_early.remove(&id);
            }
            out.push(Action::Send(Packet::RsNegAck { id }));
        }
        // Client writes overlapping the read may start now.
        self.start_waiting(out);
        self.start_rs_reads(out);
    }

    /// Target: the source's data for a request; applied in arrival order.
    fn rs_data(&mut self, id: u64, offset: u64, len: u64, out: &mut Vec<Action>) {
        let Some(s) = self.sync.as_mut().filter(|s| s.side == SyncSide::Target) else {
            return self.protocol_error("resync data to a node that is not SyncTarget", out);
        };
        let csum = s.csums && !s.plain.contains(&id);
        if !csum {
            s.plain.remove(&id);
        }
        let fits = match s.requested.get(&id) {
            // A checksum-based request is answered by the span that differs,
            // then RsInSync; a plain one by exactly its range.
            Some(r) if csum => {
                r.start <= offset
                    && offset.checked_add(len).is_some_and(|e| e <= r.end)
                    && !s.span.contains_key(&id)
            }
            Some(r) => r.start == offset && r.end - r.start == len,
            None => false,
        };
        if fits {
            if csum {
                s.span.insert(id, offset..offset + len);
            } else {
                s.requested.remove(&id);
            }
        }
        match fits {
            true => {}
            false => {
                return self.protocol_error(
                    &format!("resync data {offset}+{len} answers no request {id}"),
                    out,
                )
            }
        }
        self.counters.resync_received += len;
        self.rx
            .queue
            .push_back(Incoming::Resync { id, offset, len });
        self.drain_incoming(out);
    }

    /// Target: the rest of a checksum-based request is identical.
    fn rs_in_sync(&mut self, id: u64, offset: u64, len: u64, out: &mut Vec<Action>) {
        let Some(s) = self
            .sync
            .as_mut()
            .filter(|s| s.side == SyncSide::Target && s.csums)
        else {
            return self.protocol_error("RsInSync to a node not resyncing by checksums", out);
        };
        let range = match s.requested.remove(&id) {
            Some(r) if r.start == offset && r.end - r.start == len => r,
            _ => {
                return self.protocol_error(
                    &format!("RsInSync {offset}+{len} answers no request {id}"),
                    out,
                )
            }
        };
        let span = s.span.remove(&id);
        let same: Vec<Range<u64>> = match &span {
            None => vec![range],
            Some(d) => [range.start..d.start, d.end..range.end]
                .into_iter()
                .filter(|r| !r.is_empty())
                .collect(),
        };
        for r in same {
            out.push(Action::MarkInSync { range: r.clone() });
            s.written_bytes += r.end - r.start;
            s.written.push(r);
        }
    }

    /// Checksum-based resync: our digests of request `id` are ready.
    pub(crate) fn csum_digests_done(
        &mut self,
        link: u64,
        id: u64,
        digests: Option<Vec<u32>>,
        out: &mut Vec<Action>,
    ) {
        if self.link != Some(link) {
            return;
        }
        let Some(s) = self.sync.as_mut() else { return };
        match s.side {
            SyncSide::Target => {
                let Some(r) = s.requested.get(&id).cloned() else {
                    return;
                };
                out.push(Action::Send(match digests {
                    Some(digests) => Packet::CsumRequest {
                        id,
                        offset: r.start,
                        digests,
                    },
                    // Unreadable here: ask for the data itself.
                    None => {
                        s.plain.insert(id);
                        Packet::RsRequest {
                            id,
                            offset: r.start,
                            len: r.end - r.start,
                        }
                    }
                }));
            }
            SyncSide::Source => {
                let Some(range) = s.reads.get(&id).cloned() else {
                    return;
                };
                let theirs = s.theirs.remove(&id).unwrap_or_default();
                let mine = digests.unwrap_or_default();
                let blocks = (range.end - range.start).div_ceil(BLOCK) as usize;
                let redirtied = &s.redirtied;
                let differs = |i: &usize| {
                    let start = range.start + *i as u64 * BLOCK;
                    let block = start..start + BLOCK;
                    mine.get(*i).is_none()
                        || mine.get(*i) != theirs.get(*i)
                        || redirtied.iter().any(|r| overlaps(r, &block))
                };
                let first = (0..blocks).find(differs);
                let last = (0..blocks).rev().find(differs);
                match (first, last) {
                    (Some(f), Some(l)) => {
                        let start = range.start + f as u64 * BLOCK;
                        let end = (range.start + (l as u64 + 1) * BLOCK).min(range.end);
                        s.span.insert(id, start..end);
                        self.counters.local_pending += 1;
                        out.push(Action::LocalRead {
                            op: OpId::ResyncRead { link, id },
                            offset: start,
                            len: end - start,
                        });
                    }
                    _ => {
                        s.reads.remove(&id);
                        s.served(id, &range, out);
                        out.push(Action::Send(Packet::RsInSync {
                            id,
                            offset: range.start,
                            len: range.end - range.start,
                        }));
                        self.start_waiting(out);
                        self.start_rs_reads(out);
                    }
                }
            }
        }
    }

    /// Target: a resync write finished.
    pub(crate) fn rs_write_done(
        &mut self,
        link: u64,
        range: Range<u64>,
        ok: bool,
        out: &mut Vec<Action>,
    ) {
        self.counters.disk_written += range.end - range.start;
        if self.link != Some(link) {
            return;
        }
        let Some(s) = self.sync.as_mut() else { return };
        if ok {
            out.push(Action::MarkInSync {
                range: range.clone(),
            });
            s.written_bytes += range.end - range.start;
            s.written.push(range);
        } else {
            s.failed = true;
            out.push(Action::Log(format!(
                "resync write at {}+{} failed; it stays out of sync",
                range.start,
                range.end - range.start
            )));
        }
    }

    /// Target: written ranges are stable; let the source clear its bits.
    pub(crate) fn rs_flush_done(&mut self, link: u64, n: u64, ok: bool, out: &mut Vec<Action>) {
        if self.link != Some(link) {
            return;
        }
        let Some(s) = self.sync.as_mut() else { return };
        let Some((m, ranges)) = s.flushing.take() else {
            return;
        };
        if m != n {
            s.flushing = Some((m, ranges));
            return;
        }
        if !ok {
            s.failed = true;
            for r in &ranges {
                out.push(Action::MarkOutOfSync { range: r.clone() });
            }
            out.push(Action::Log("flushing resynced data failed".into()));
            return;
        }
        for r in merge(ranges) {
            let mut at = r.start;
            while at < r.end {
                let len = (r.end - at).min(u64::from(u32::MAX) & !(BLOCK - 1));
                out.push(Action::Send(Packet::RsAck { offset: at, len }));
                at += len;
            }
        }
    }

    /// After every batch of actions: note the bitmap's size and, as
    /// SyncTarget, request more, flush what was written, or finish.
    pub fn pump(&mut self, bm: &dyn OutOfSync, out: &mut Vec<Action>) {
        self.local_oos = bm.dirty_bytes();
        self.detach_failed(out);
        self.pump_verify(out);
        let Some(link) = self.link else { return };
        // Nothing below matters on the write path without a target resync.
        if !matches!(&self.sync, Some(s) if s.running) {
            return;
        }
        let size = self.cfg.size;
        let writing = self
            .rx
            .inflight
            .keys()
            .any(|k| matches!(k, OpId::Resync { .. }))
            || self
                .rx
                .queue
                .iter()
                .any(|i| matches!(i, Incoming::Resync { .. }));
        let oos = self.local_oos;
        let landing: Vec<Range<u64>> = self
            .rx
            .inflight
            .values()
            .cloned()
            .chain(self.rx.queue.iter().filter_map(|i| match i {
                Incoming::Write { offset, len, .. } => Some(*offset..offset + len),
                _ => None,
            }))
            .collect();
        let Some(s) = self.sync.as_mut() else { return };
        if !s.running {
            return;
        }
        if s.total.is_none() {
            s.total = Some(oos);
        }
        if s.side == SyncSide::Source {
            return;
        }
        while !s.paused() && s.requested.len() < RESYNC_WINDOW && s.budget > 0 && s.cursor < size {
            let Some(r) = bm.next_dirty(s.cursor, RESYNC_REQUEST_MAX) else {
                s.cursor = size;
                break;
            };
            // Our digests must not be taken under a write still landing
            // here (from an earlier link): the data would change after
            // the comparison called it identical.
            if s.csums && landing.iter().any(|w| overlaps(w, &r)) {
                break;
            }
            // Ranges already asked for keep their bits until written.
            let pending = s.requested.values().any(|q| overlaps(q, &r));
            s.cursor = r.end;
            if pending {
                continue;
            }
            let id = s.next_id;
            s.next_id += 1;
            s.budget = s.budget.saturating_sub(r.end - r.start);
            s.requested.insert(id, r.clone());
            if s.csums {
                out.push(Action::LocalDigest {
                    op: OpId::CsumRead { link, id },
                    offset: r.start,
                    len: r.end - r.start,
                });
            } else {
                out.push(Action::Send(Packet::RsRequest {
                    id,
                    offset: r.start,
                    len: r.end - r.start,
                }));
            }
        }
        let idle = s.requested.is_empty() && !writing;
        if s.flushing.is_none() && !s.written.is_empty() && (s.written_bytes >= FLUSH_BATCH || idle)
        {
            let n = s.next_flush;
            s.next_flush += 1;
            s.written_bytes = 0;
            s.flushing = Some((n, std::mem::take(&mut s.written)));
            self.counters.local_pending += 1;
            out.push(Action::LocalFlush {
                op: OpId::ResyncFlush { link, n },
            });
            return;
        }
        if !(idle && s.flushing.is_none() && s.written.is_empty() && s.cursor >= size) {
            return;
        }
        if oos > 0 && !s.failed {
            // Bits set behind the cursor (a write that failed and was
            // marked again): one more pass.
            s.cursor = 0;
            return;
        }
        self.finish_sync_target(out);
    }

    fn finish_sync_target(&mut self, out: &mut Vec<Action>) {
        let failed = self.sync.as_ref().is_some_and(|s| s.failed) || self.local_oos > 0;
        self.sync = None;
        self.cstate = ConnState::Connected;
        if failed {
            out.push(Action::Log(format!(
                "resync ended with {} bytes still out of sync; this node stays Inconsistent",
                self.local_oos
            )));
            out.push(Action::Send(Packet::SyncEnd));
            self.send_state(out);
            return;
        }
        let peer_current = self.peer.map_or(self.gens.current, |p| p.gens.current);
        self.take_current(peer_current, out);
        self.set_disk(DiskState::UpToDate, out);
        out.push(Action::Log("resync finished: this node is UpToDate".into()));
        out.push(Action::ResyncFinished);
        self.send_state(out);
    }

    /// Target: adopt the source's generation `uuid` as current (the old
    /// current one goes to history unless it is the same or just-created).
    fn take_current(&mut self, uuid: u64, out: &mut Vec<Action>) {
        let g = self.gens;
        self.gens = Generations {
            current: uuid,
            bitmap: 0,
            history: if g.current == uuid || g.current == UUID_JUST_CREATED {
                g.history
            } else {
                [g.current, g.history[0]]
            },
        };
        out.push(Action::PersistGenerations(self.gens));
        // The source holds it (as its bitmap generation at a resync's
        // start, as its current one at the end).
        self.persist_flags(flags::CURRENT_SHARED, 0, out);
    }

    /// Source: the target reports UpToDate, so the resync is over.
    /// `peer_current` is the generation the target reports it took.
    pub(crate) fn finish_sync_source(&mut self, peer_current: u64, out: &mut Vec<Action>) {
        self.sync = None;
        self.cstate = ConnState::Connected;
        if self.local_oos == 0 {
            let mut g = self.gens;
            if g.bitmap != 0 {
                g.history = [g.bitmap, g.history[0]];
                g.bitmap = 0;
                self.gens = g;
                out.push(Action::PersistGenerations(g));
            }
        }
        // The target took our current generation at its end, unless we
        // started another one since the report it took it from.
        if peer_current == self.gens.current {
            self.persist_flags(flags::CURRENT_SHARED, 0, out);
        }
        self.persist_flags(0, flags::CRASHED_PRIMARY, out);
        out.push(Action::Log("resync finished: the peer is UpToDate".into()));
        out.push(Action::ResyncFinished);
        self.send_state(out);
    }

    /// The rate limit's tick, and the dynamic controller's: application
    /// I/O in the last tick limits the source to `c-min-rate`.
    pub(crate) fn sync_tick(&mut self, out: &mut Vec<Action>) {
        let b = self.tick_budget();
        if let Some(s) = self.sync.as_mut() {
            s.budget = b;
        }
        self.app_active = std::mem::take(&mut self.app_seen);
        let min = i64::try_from(self.cfg.c_min_rate / 10).unwrap_or(i64::MAX);
        // Debt from the last tick carries over; credit does not pile up.
        self.source_budget = (self.source_budget.min(0)).saturating_add(min.max(1));
        self.start_rs_reads(out);
    }
}

/// Adjacent ranges joined, in order.
fn merge(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}
