//! The checkers, one per invariant of `design.md`; each fails with the
//! seed, the step and the trace tail.

use super::{extents_of, Check, Done, Sim, R};
use std::collections::BTreeSet;
use std::ops::Range;
use tandem_core::{Action, ConnState, Protocol, ReqId, Role};

impl Sim {
    /// Invariant 1: at a write's completion its protocol's conditions hold.
    pub(super) fn check_completion_by_protocol(
        &mut self,
        n: usize,
        req: ReqId,
        up: bool,
        sub_link: &Option<u64>,
    ) -> R {
        let node = &self.nodes[n];
        if !node.local_done.contains(&req) {
            return Err(self.fail(
                Check::CompletionByProtocol,
                format!("n{n} completed write {req} before its local write finished"),
            ));
        }
        if !up || node.neg_acked.contains(&req) {
            return Ok(());
        }
        let peer = &self.nodes[1 - n];
        let (holds, what) = match self.opts.protocol {
            Protocol::A => (
                node.replicated.get(&req) == sub_link.as_ref(),
                "queued to the link",
            ),
            Protocol::B => (peer.received.contains(&req), "received by the peer"),
            Protocol::C => (peer.applied.contains(&req), "written by the peer"),
        };
        if !holds {
            return Err(self.fail(
                Check::CompletionByProtocol,
                format!(
                    "n{n} completed write {req} under protocol {} with the link up, but it was not {what}",
                    self.opts.protocol
                ),
            ));
        }
        if self.opts.protocol != Protocol::A {
            self.stats.peer_completion_checks += 1;
        }
        Ok(())
    }

    /// Invariant 2: a client write reaches the disk only once the activity
    /// log covers its extents.
    pub(super) fn check_al_before_data(&self, n: usize, req: ReqId, blocks: &Range<u64>) -> R {
        if !self.nodes[n].al_ready.contains(&req) {
            return Err(self.fail(
                Check::AlBeforeData,
                format!("n{n} wrote request {req} before its AlReady"),
            ));
        }
        let al = self.md_ref(n).activity_log();
        for e in extents_of(blocks) {
            let e = e as u32;
            if al.in_flight(e) == 0 {
                return Err(self.fail(
                    Check::AlBeforeData,
                    format!(
                        "n{n} wrote request {req} (blocks {blocks:?}) but extent {e} is not held in the activity log (active {:?})",
                        al.active()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Invariant 3 at a completion: a write that did not reach the peer on
    /// a live link is marked before it is reported.
    pub(super) fn check_completed_write_marked(
        &self,
        n: usize,
        req: ReqId,
        blocks: &Range<u64>,
        lost: &[ReqId],
    ) -> R {
        let node = &self.nodes[n];
        let never_sent = !node.replicated.contains_key(&req) && !node.unacked.contains_key(&req);
        let must = never_sent || lost.contains(&req) || node.neg_acked.contains(&req);
        if must && !self.marked(n, blocks) {
            return Err(self.fail(
                Check::NothingForgotten,
                format!(
                    "n{n} completed write {req} (blocks {blocks:?}) that the peer {} before marking it out of sync",
                    if never_sent { "never got" } else { "did not confirm" }
                ),
            ));
        }
        Ok(())
    }

    /// Invariant 3 at a link loss: every write sent and not acknowledged is
    /// marked once the loss has been handled.
    pub(super) fn check_lost_writes_marked(&mut self, n: usize, lost: &[ReqId]) -> R {
        for req in lost {
            let Some((_, _, blocks)) = self.nodes[n].unacked.remove(req) else {
                continue;
            };
            if !self.marked(n, &blocks) {
                return Err(self.fail(
                    Check::NothingForgotten,
                    format!(
                        "n{n} lost the link with write {req} (blocks {blocks:?}) unacknowledged and did not mark it"
                    ),
                ));
            }
        }
        if !lost.is_empty() {
            let live = self.nodes[n].core_link;
            self.nodes[n].seq_req.retain(|(l, _), _| Some(*l) == live);
        }
        Ok(())
    }

    /// Invariant 3 on the disks: every block that differs between the nodes
    /// is marked in at least one bitmap.
    pub(super) fn check_differences_marked(&mut self, when: &str) -> R {
        let blocks: BTreeSet<u64> = self.nodes[0]
            .disk
            .blocks()
            .chain(self.nodes[1].disk.blocks())
            .collect();
        let mut differ = 0;
        for b in blocks {
            let (x, y) = (self.nodes[0].disk.read(b), self.nodes[1].disk.read(b));
            if x == y {
                continue;
            }
            differ += 1;
            if !self.md_ref(0).bitmap().get(b) && !self.md_ref(1).bitmap().get(b) {
                return Err(self.fail(
                    Check::NothingForgotten,
                    format!(
                        "{when}: block {b} holds write {x} on n0 and {y} on n1, but neither bitmap marks it"
                    ),
                ));
            }
        }
        self.stats.diff_checks += 1;
        self.stats.diff_blocks += differ;
        Ok(())
    }

    /// Invariant 4: what a flush (or FUA write) covers is stable locally
    /// and, under C with the link up throughout, on the peer.
    pub(super) fn check_stable(&mut self, n: usize, writes: &[Done], up: bool, what: &str) -> R {
        let peer = up && self.opts.protocol == Protocol::C;
        let link = self.nodes[n].core_link;
        for d in writes {
            for b in d.blocks.clone() {
                let here = self.nodes[n].disk.durable(b);
                if here < d.req {
                    return Err(self.fail(
                        Check::FlushIsBarrier,
                        format!(
                            "n{n}: {what} completed but block {b} of write {} is stable only as {here}",
                            d.req
                        ),
                    ));
                }
                let replicated = d.link.is_some() && d.link == link;
                if peer && replicated && !self.nodes[n].neg_acked.contains(&d.req) {
                    let there = self.nodes[1 - n].disk.durable(b);
                    if there < d.req {
                        return Err(self.fail(
                            Check::FlushIsBarrier,
                            format!(
                                "n{n}: {what} completed under protocol C but block {b} of write {} is stable on the peer only as {there}",
                                d.req
                            ),
                        ));
                    }
                }
            }
        }
        if peer {
            self.stats.peer_flush_checks += 1;
        }
        Ok(())
    }

    /// Invariant 5: a write of a new data generation finds it persisted.
    pub(super) fn check_generations_before_data(&self, n: usize, req: ReqId) -> R {
        if self.nodes[n].gen_needed {
            return Err(self.fail(
                Check::GenerationsBeforeData,
                format!(
                    "n{n} wrote request {req} of a new data generation before persisting a new current UUID (persisted: {:?})",
                    self.md_ref(n).generations()
                ),
            ));
        }
        Ok(())
    }

    /// Invariant 6 (and bookkeeping for 8), after every event.
    pub(super) fn post_event_checks(&mut self) -> R {
        let [a, b] = &self.nodes;
        let (Some(a), Some(b)) = (&a.core, &b.core) else {
            self.both_connected = false;
            return Ok(());
        };
        let connected = a.cstate().is_connected() && b.cstate().is_connected();
        if connected && a.role() == Role::Primary && b.role() == Role::Primary {
            return Err(self.fail(
                Check::OnePrimary,
                "both nodes are Primary while connected to each other",
            ));
        }
        if connected {
            if !self.both_connected {
                self.stats.connections += 1;
            }
            for x in &mut self.nodes {
                x.wrote_apart = false;
            }
        }
        self.both_connected = connected;
        Ok(())
    }

    /// Invariant 7 (daemon crash): acknowledged writes are still on disk.
    pub(super) fn check_acknowledged_present(&self, n: usize) -> R {
        let node = &self.nodes[n];
        for (&b, &w) in &node.acked {
            let have = node.disk.read(b);
            if have < w {
                return Err(self.fail(
                    Check::AcknowledgedDataSurvives,
                    format!(
                        "n{n} restarted holding write {have} at block {b}, but write {w} there was acknowledged"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Invariant 7 between crashes: nothing older overwrites an
    /// acknowledged write (that would lose it just the same).
    pub(super) fn check_no_older_overwrite(&self, n: usize, blocks: &Range<u64>, value: u64) -> R {
        let node = &self.nodes[n];
        for b in blocks.clone() {
            if let Some(&w) = node.acked.get(&b) {
                if value < w {
                    return Err(self.fail(
                        Check::AcknowledgedDataSurvives,
                        format!(
                            "n{n} overwrote acknowledged write {w} at block {b} with the older write {value}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Invariant 8: both nodes wrote apart, so the first report on a link
    /// must be refused as split brain.
    /// A split brain reported at connect needs both nodes to have begun a
    /// generation of their own while apart; otherwise one node is merely
    /// behind and the pair must resync, not stand alone.
    pub(super) fn check_split_brain_real(&mut self, n: usize) -> R {
        if let Some(m) = (0..2).find(|&m| !self.nodes[m].gen_apart) {
            return Err(self.fail(
                Check::NoFalseSplitBrain,
                format!(
                    "n{n} reported split brain, but n{m} began no generation of its own since the pair last held the same one"
                ),
            ));
        }
        Ok(())
    }

    /// Both nodes descend from one just-created pair (repairs give them the
    /// same generations), so their data is never unrelated: a connect that
    /// says so has lost the relation from the generations.
    pub(super) fn check_never_unrelated(&mut self, n: usize, acts: &[Action]) -> R {
        let unrelated = acts.iter().any(
            |a| matches!(a, Action::Disconnect { reason, .. } if reason.contains("unrelated data")),
        );
        if unrelated {
            return Err(self.fail(
                Check::NoFalseSplitBrain,
                format!(
                    "n{n} called the peer's data unrelated, but both nodes descend from one pair"
                ),
            ));
        }
        Ok(())
    }

    /// Connected on the same current generation: neither node is apart.
    pub(super) fn forget_apart_when_equal(&mut self) {
        let same = self
            .nodes
            .iter()
            .all(|x| x.cstate() == Some(ConnState::Connected))
            && {
                let g: Vec<_> = self
                    .nodes
                    .iter()
                    .filter_map(|x| x.core.as_ref().map(|c| c.generations().current))
                    .collect();
                g.len() == 2 && g[0] == g[1]
            };
        if same {
            for x in &mut self.nodes {
                x.gen_apart = false;
            }
        }
    }

    pub(super) fn check_split_brain_reported(&mut self, n: usize, acts: &[Action]) -> R {
        self.stats.split_brain_checks += 1;
        let reported = acts.iter().any(|a| matches!(a, Action::SplitBrain { .. }));
        // Connecting is right only when a recovery policy picked a victim
        // and the resync that discards its changes starts.
        let connected = self.nodes[n].cstate().is_some_and(|c| {
            c.is_connected() && !matches!(c, ConnState::WFBitMapS | ConnState::WFBitMapT)
        });
        if !reported || connected {
            return Err(self.fail(
                Check::SplitBrainNeverSilent,
                format!(
                    "both nodes wrote while apart, yet n{n} {} on receiving the peer's report",
                    if connected {
                        "connected"
                    } else {
                        "reported no split brain"
                    }
                ),
            ));
        }
        Ok(())
    }
}
