//! Split-brain recovery at connect: DRBD's `after-sb-*pri` policies and the
//! manual `connect --discard-my-data`. Both nodes evaluate the same rules on
//! the same inputs (their reports), so they agree on the victim without
//! another round trip. The victim becomes SyncTarget: with equal bitmap
//! generations only the union of both bitmaps travels (each side's bitmap
//! holds what it changed since the split); when the relation is only
//! through history, the whole device.

use super::*;

/// `after-sb-0pri`: split brain, no node Primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AfterSb0Pri {
    /// Do not resolve; disconnect.
    #[default]
    Disconnect,
    /// The node promoted while apart loses; the one that was Primary
    /// when the link went wins (flag `BITMAP_WAS_PRIMARY`). When that does
    /// not tell them apart: `discard-zero-changes`, then
    /// `discard-least-changes`, as DRBD falls through.
    DiscardYoungerPrimary,
    /// The node that was Primary when the link went loses; the one
    /// promoted while apart wins. Falls through as above.
    DiscardOlderPrimary,
    /// A node that changed nothing loses; if both changed, disconnect.
    DiscardZeroChanges,
    /// The node with fewer changed blocks loses.
    DiscardLeastChanges,
    /// The named node loses: `true` when that is this node.
    DiscardNode(bool),
}

/// `after-sb-1pri`: split brain, one node Primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AfterSb1Pri {
    /// Do not resolve; disconnect.
    #[default]
    Disconnect,
    /// The 0pri policy, if its victim is the Secondary.
    Consensus,
    /// The 0pri policy whatever it picks (a Primary victim cannot be
    /// overwritten here, so that ends in a disconnect).
    ViolentlyAs0p,
    /// The Secondary loses.
    DiscardSecondary,
    /// The 0pri policy; a losing Primary runs `pri-lost-after-sb`.
    CallPriLostAfterSb,
}

/// `after-sb-2pri`: split brain, both nodes Primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AfterSb2Pri {
    /// Do not resolve; disconnect.
    #[default]
    Disconnect,
    /// The 0pri policy (a Primary cannot become SyncTarget: disconnect).
    ViolentlyAs0p,
    /// The 0pri policy; the losing Primary runs `pri-lost-after-sb`.
    CallPriLostAfterSb,
}

/// The three policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SplitBrainPolicy {
    /// No Primary.
    pub zero: AfterSb0Pri,
    /// One Primary.
    pub one: AfterSb1Pri,
    /// Two Primaries.
    pub two: AfterSb2Pri,
}

impl Core {
    /// Split brain was found at connect (and reported): who, if anyone, is
    /// the victim. `None` means disconnect and stay StandAlone.
    pub(crate) fn resolve_split_brain(
        &mut self,
        rule: gi::Rule,
        peer: &Report,
        out: &mut Vec<Action>,
    ) -> Option<gi::Decision> {
        let full = rule != gi::Rule::BitmapsEqual;
        let me_victim = match (self.discard_my_data, peer.discard_my_data) {
            (true, true) => {
                out.push(Action::Log(
                    "split brain: both nodes were told to discard their data; disconnecting".into(),
                ));
                return None;
            }
            (true, false) => true,
            (false, true) => false,
            (false, false) if rule != gi::Rule::BitmapsEqual => {
                out.push(Action::Log(
                    "split brain related only through history: no automatic recovery; use connect --discard-my-data on the victim".into(),
                ));
                return None;
            }
            (false, false) => self.split_brain_policy(peer, out)?,
        };
        let victim_role = if me_victim { self.role } else { peer.role };
        if victim_role == Role::Primary {
            out.push(Action::Log(format!(
                "split brain: the victim ({}) is Primary and cannot be overwritten; disconnecting",
                if me_victim { "this node" } else { "the peer" }
            )));
            return None;
        }
        out.push(Action::Log(format!(
            "split brain resolved: {} data is discarded and resynced ({})",
            if me_victim {
                "this node's"
            } else {
                "the peer's"
            },
            if full {
                "full sync"
            } else {
                "the blocks changed on either side"
            }
        )));
        Some(if me_victim {
            gi::Decision::Target { full }
        } else {
            gi::Decision::Source { full }
        })
    }

    /// The configured automatic policy; `Some(true)`: this node loses.
    fn split_brain_policy(&mut self, peer: &Report, out: &mut Vec<Action>) -> Option<bool> {
        let p = self.cfg.split_brain;
        let primaries =
            usize::from(self.role == Role::Primary) + usize::from(peer.role == Role::Primary);
        match primaries {
            0 => self.sb_0pri(peer, out),
            1 => {
                let secondary_is_me = self.role != Role::Primary;
                match p.one {
                    AfterSb1Pri::Disconnect => None,
                    AfterSb1Pri::DiscardSecondary => Some(secondary_is_me),
                    AfterSb1Pri::ViolentlyAs0p => self.sb_0pri(peer, out),
                    AfterSb1Pri::Consensus => {
                        let v = self.sb_0pri(peer, out)?;
                        (v == secondary_is_me).then_some(v)
                    }
                    AfterSb1Pri::CallPriLostAfterSb => {
                        let v = self.sb_0pri(peer, out)?;
                        if v == secondary_is_me {
                            Some(v)
                        } else {
                            if v {
                                out.push(Action::RunHandler("pri-lost-after-sb"));
                            }
                            None
                        }
                    }
                }
            }
            _ => match p.two {
                AfterSb2Pri::Disconnect | AfterSb2Pri::ViolentlyAs0p => None,
                AfterSb2Pri::CallPriLostAfterSb => {
                    if self.sb_0pri(peer, out)? {
                        out.push(Action::RunHandler("pri-lost-after-sb"));
                    }
                    None
                }
            },
        }
    }

    fn sb_0pri(&self, peer: &Report, out: &mut Vec<Action>) -> Option<bool> {
        let (mine, theirs) = (self.local_oos, peer.oos);
        match self.cfg.split_brain.zero {
            AfterSb0Pri::Disconnect => None,
            p @ (AfterSb0Pri::DiscardYoungerPrimary | AfterSb0Pri::DiscardOlderPrimary) => {
                let older = |f: u32| f & flags::BITMAP_WAS_PRIMARY != 0;
                match (older(self.flags), older(peer.flags)) {
                    (true, false) => Some(p == AfterSb0Pri::DiscardOlderPrimary),
                    (false, true) => Some(p == AfterSb0Pri::DiscardYoungerPrimary),
                    _ => {
                        out.push(Action::Log(
                            "after-sb-0pri: both nodes or neither were Primary when the link went; deciding by discard-zero-changes, then discard-least-changes".into(),
                        ));
                        self.zero_changes(mine, theirs)
                            .or_else(|| Some(self.least_changes(mine, theirs)))
                    }
                }
            }
            AfterSb0Pri::DiscardZeroChanges => self.zero_changes(mine, theirs),
            AfterSb0Pri::DiscardLeastChanges => Some(self.least_changes(mine, theirs)),
            AfterSb0Pri::DiscardNode(me) => Some(me),
        }
    }

    /// `discard-zero-changes`: whether this node loses, `None` when both
    /// changed something.
    fn zero_changes(&self, mine: u64, theirs: u64) -> Option<bool> {
        match (mine == 0, theirs == 0) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            // Neither changed anything: either may go.
            (true, true) => Some(!self.cfg.source_on_tie),
            (false, false) => None,
        }
    }

    /// `discard-least-changes`: whether this node loses.
    fn least_changes(&self, mine: u64, theirs: u64) -> bool {
        match mine.cmp(&theirs) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => !self.cfg.source_on_tie,
        }
    }
}
