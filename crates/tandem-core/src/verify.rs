//! Online verify: the node that runs `verify` (VerifyS) walks the device,
//! asks the peer (VerifyT) for crc32c digests of every 4 KiB block and
//! compares them with its own; a block that differs is marked out of sync,
//! so the next resync (after `disconnect` + `connect`, as in DRBD) repairs
//! it. Writes racing the comparison can make a block look different; that
//! only costs one block of resync, never a missed difference.

use super::resync::{BLOCK, RESYNC_REQUEST_MAX, RESYNC_WINDOW};
use super::*;

/// A request in flight: its range, our digests, the peer's.
type Pending = (Range<u64>, Option<Vec<u32>>, Option<Vec<u32>>);

/// A verify in progress on the current link.
#[derive(Debug)]
pub(crate) struct Verify {
    /// This node compares (VerifyS) or answers (VerifyT).
    pub(crate) source: bool,
    cursor: u64,
    next_id: u64,
    /// id -> (range, my digests, the peer's digests).
    pending: BTreeMap<u64, Pending>,
    /// Blocks found different so far.
    pub(crate) found: u64,
}

/// What `status` shows about a verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyProgress {
    /// This node compares.
    pub source: bool,
    /// Bytes compared (or answered) so far.
    pub done: u64,
    /// Blocks found different so far.
    pub found: u64,
}

impl Core {
    /// `verify`: compare the whole device with the peer's.
    pub fn start_verify(&mut self, out: &mut Vec<Action>) -> Result<(), Refusal> {
        if !self.cstate.is_connected() {
            return Err(Refusal::NotConnected);
        }
        self.no_sync_running()?;
        if self.verify.is_some() {
            return Err(Refusal::Other("a verify is running already".into()));
        }
        if no_disk(self.disk) || no_disk(self.peer_disk) {
            return Err(Refusal::Other("verify needs a disk on both nodes".into()));
        }
        self.verify = Some(Verify {
            source: true,
            cursor: 0,
            next_id: 1,
            pending: BTreeMap::new(),
            found: 0,
        });
        self.cstate = ConnState::VerifyS;
        out.push(Action::Log("online verify starts".into()));
        Ok(())
    }

    /// The running verify, if any.
    pub fn verify_progress(&self) -> Option<VerifyProgress> {
        self.verify.as_ref().map(|v| VerifyProgress {
            source: v.source,
            done: v.cursor,
            found: v.found,
        })
    }

    /// The last finished verify's count of different blocks.
    pub fn last_verify_found(&self) -> Option<u64> {
        self.last_verify
    }

    pub(crate) fn verify_packet(&mut self, packet: Packet, out: &mut Vec<Action>) {
        let Some(link) = self.link else { return };
        match packet {
            Packet::OvRequest { id, offset, len } => {
                let inside = matches!(offset.checked_add(len), Some(e) if e <= self.cfg.size);
                if !inside || len == 0 || len > RESYNC_REQUEST_MAX || offset % BLOCK != 0 {
                    return self
                        .protocol_error(&format!("verify request {offset}+{len} is invalid"), out);
                }
                if self.sync.is_some() {
                    return self.protocol_error("verify request during a resync", out);
                }
                if self.verify.is_none() {
                    self.verify = Some(Verify {
                        source: false,
                        cursor: 0,
                        next_id: 1,
                        pending: BTreeMap::new(),
                        found: 0,
                    });
                    self.cstate = ConnState::VerifyT;
                }
                let Some(v) = self.verify.as_mut().filter(|v| !v.source) else {
                    return self.protocol_error("verify requests cross", out);
                };
                if v.pending.len() >= 4 * RESYNC_WINDOW {
                    return self.protocol_error("peer overran the verify queue", out);
                }
                v.pending.insert(id, (offset..offset + len, None, None));
                v.cursor = v.cursor.max(offset + len);
                out.push(Action::LocalDigest {
                    op: OpId::VerifyRead { link, id },
                    offset,
                    len,
                });
            }
            Packet::OvReply {
                id,
                offset,
                digests,
            } => {
                let Some(v) = self.verify.as_mut().filter(|v| v.source) else {
                    return self.protocol_error("verify reply to a node not verifying", out);
                };
                match v.pending.get_mut(&id) {
                    Some((r, _, theirs)) if r.start == offset => *theirs = Some(digests),
                    _ => return self.protocol_error("verify reply to no request", out),
                }
                self.compare_verified(id, out);
            }
            Packet::OvDone { found } => {
                if matches!(&self.verify, Some(v) if !v.source) {
                    self.verify = None;
                    self.cstate = ConnState::Connected;
                    out.push(Action::Log(format!(
                        "online verify by the peer finished: {found} blocks differ"
                    )));
                }
            }
            _ => {}
        }
    }

    /// A local digest read finished (`None`: the read failed).
    pub(crate) fn digests_done(
        &mut self,
        op: OpId,
        digests: Option<Vec<u32>>,
        out: &mut Vec<Action>,
    ) {
        let (link, id) = match op {
            OpId::VerifyRead { link, id } => (link, id),
            OpId::CsumRead { link, id } => return self.csum_digests_done(link, id, digests, out),
            _ => return,
        };
        if self.link != Some(link) {
            return;
        }
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if v.source {
            if let Some(p) = v.pending.get_mut(&id) {
                // A failed read compares as different: better one block
                // resynced than a difference missed.
                p.1 = Some(digests.unwrap_or_default());
            }
            self.compare_verified(id, out);
        } else if let Some((r, _, _)) = v.pending.remove(&id) {
            out.push(Action::Send(Packet::OvReply {
                id,
                offset: r.start,
                digests: digests.unwrap_or_default(),
            }));
        }
    }

    fn compare_verified(&mut self, id: u64, out: &mut Vec<Action>) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let ready = matches!(v.pending.get(&id), Some((_, Some(_), Some(_))));
        if !ready {
            return;
        }
        let Some((range, Some(mine), Some(theirs))) = v.pending.remove(&id) else {
            return;
        };
        let blocks = (range.end - range.start).div_ceil(BLOCK) as usize;
        for i in 0..blocks {
            let same = matches!((mine.get(i), theirs.get(i)), (Some(a), Some(b)) if a == b);
            if !same {
                v.found += 1;
                let start = range.start + i as u64 * BLOCK;
                let end = (start + BLOCK).min(range.end);
                out.push(Action::MarkOutOfSync { range: start..end });
            }
        }
    }

    /// VerifyS: issue requests while the window allows; finish at the end.
    pub(crate) fn pump_verify(&mut self, out: &mut Vec<Action>) {
        let Some(link) = self.link else { return };
        let size = self.cfg.size;
        let Some(v) = self.verify.as_mut().filter(|v| v.source) else {
            return;
        };
        while v.pending.len() < RESYNC_WINDOW && v.cursor < size {
            let len = RESYNC_REQUEST_MAX.min(size - v.cursor);
            let id = v.next_id;
            v.next_id += 1;
            let offset = v.cursor;
            v.cursor += len;
            v.pending.insert(id, (offset..offset + len, None, None));
            out.push(Action::Send(Packet::OvRequest { id, offset, len }));
            out.push(Action::LocalDigest {
                op: OpId::VerifyRead { link, id },
                offset,
                len,
            });
        }
        if v.cursor >= size && v.pending.is_empty() {
            let found = v.found;
            self.verify = None;
            self.last_verify = Some(found);
            self.cstate = ConnState::Connected;
            out.push(Action::Send(Packet::OvDone { found }));
            out.push(Action::FlushBitmap);
            out.push(Action::Log(format!(
                "online verify finished: {found} blocks differ{}",
                if found > 0 {
                    " (marked out of sync; disconnect and connect to resync them)"
                } else {
                    ""
                }
            )));
            if found > 0 {
                out.push(Action::RunHandler("out-of-sync"));
            }
            out.push(Action::VerifyFinished { found });
        }
    }
}
