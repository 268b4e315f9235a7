//! The activity log: which 4 MiB extents may have writes in flight.
//!
//! In memory, a table of `al-extents` slots, each empty or naming an extent,
//! with a use counter per slot (writes in flight) and an LRU clock. On disk,
//! a ring of 4 KiB transactions; transaction `seq` lives in ring slot
//! `seq % ring`. Each transaction carries
//!
//! * the slot changes it makes (at most [`AL_UPDATES_PER_TX`]), and
//! * a rolling window of [`AL_CONTEXT_PER_TX`] table entries, the next
//!   window in each transaction, so that the newest `ring - 1`
//!   transactions together describe every slot.
//!
//! Replay applies the longest run of consecutive valid transactions that
//! ends at the newest one, oldest first, onto an empty table: windows and
//! changes each record the slot's value at their time, so the last record of
//! every slot is its value at the crash. A torn write can only hit the
//! newest transaction, whose writes were never started (data waits for its
//! transaction to be durable), so skipping it is correct. A ring that cannot
//! describe every slot — which the write order rules out, so only corruption
//! — makes replay report itself incomplete, and the caller then treats the
//! whole device as out of sync.
//!
//! Transaction layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `TAL1` |
//! | 4 | 4 | CRC-32C of the slot with this field zero |
//! | 8 | 8 | sequence number (from 1) |
//! | 16 | 8 | device UUID (transactions of older metadata are stale) |
//! | 24 | 4 | al-extents |
//! | 28 | 2 | number of changes |
//! | 30 | 2 | number of window entries |
//! | 32 | 4 | first table slot of the window |
//! | 36 | 4 | zero |
//! | 40 | 512 | changes: 64 × (slot u32, extent u32) |
//! | 552 | 3520 | window: 880 × extent u32 |
//! | 4072 | 24 | zero |
//!
//! An extent of `0xffffffff` means an empty slot.

use crate::layout::{AL_CONTEXT_PER_TX, AL_EXTENTS_MAX, AL_EXTENTS_MIN, SLOT};
use std::collections::HashMap;

/// Slot changes one transaction can carry.
pub const AL_UPDATES_PER_TX: usize = 64;
const MAGIC: [u8; 4] = *b"TAL1";
const EMPTY: u32 = u32::MAX;
const UPDATES_AT: usize = 40;
const CONTEXT_AT: usize = UPDATES_AT + AL_UPDATES_PER_TX * 8;

/// One decoded transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Sequence number.
    pub seq: u64,
    /// Device UUID of the metadata it belongs to.
    pub device_uuid: u64,
    /// Table size.
    pub al_extents: u32,
    /// (slot, extent or EMPTY).
    pub updates: Vec<(u32, u32)>,
    /// First slot of the window.
    pub context_start: u32,
    /// Window entries (extent or EMPTY).
    pub context: Vec<u32>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl Transaction {
    /// Encode into one 4 KiB slot.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT as usize];
        b[0..4].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.device_uuid.to_le_bytes());
        b[24..28].copy_from_slice(&self.al_extents.to_le_bytes());
        let nu = self.updates.len().min(AL_UPDATES_PER_TX);
        let nc = self.context.len().min(AL_CONTEXT_PER_TX as usize);
        b[28..30].copy_from_slice(&(nu as u16).to_le_bytes());
        b[30..32].copy_from_slice(&(nc as u16).to_le_bytes());
        b[32..36].copy_from_slice(&self.context_start.to_le_bytes());
        for (i, (slot, ext)) in self.updates.iter().take(nu).enumerate() {
            let at = UPDATES_AT + i * 8;
            b[at..at + 4].copy_from_slice(&slot.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&ext.to_le_bytes());
        }
        for (i, ext) in self.context.iter().take(nc).enumerate() {
            let at = CONTEXT_AT + i * 4;
            b[at..at + 4].copy_from_slice(&ext.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode one slot; `None` when it is not a valid transaction (never
    /// written, torn, or corrupt). Fields are checked against themselves
    /// only; the caller checks them against the superblock.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != SLOT as usize || b[0..4] != MAGIC {
            return None;
        }
        let stored = u32_at(b, 4);
        let mut copy = b.to_vec();
        copy[4..8].fill(0);
        if crc32c::crc32c(&copy) != stored {
            return None;
        }
        let nu = usize::from(u16::from_le_bytes([b[28], b[29]]));
        let nc = usize::from(u16::from_le_bytes([b[30], b[31]]));
        if nu > AL_UPDATES_PER_TX || nc > AL_CONTEXT_PER_TX as usize {
            return None;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        let mut uuid = [0u8; 8];
        uuid.copy_from_slice(&b[16..24]);
        Some(Self {
            seq: u64::from_le_bytes(seq),
            device_uuid: u64::from_le_bytes(uuid),
            al_extents: u32_at(b, 24),
            updates: (0..nu)
                .map(|i| {
                    let at = UPDATES_AT + i * 8;
                    (u32_at(b, at), u32_at(b, at + 4))
                })
                .collect(),
            context_start: u32_at(b, 32),
            context: (0..nc).map(|i| u32_at(b, CONTEXT_AT + i * 4)).collect(),
        })
    }
}

/// What replaying the ring found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// The table: slot → extent.
    pub slots: Vec<Option<u32>>,
    /// Newest valid sequence number (0 when none).
    pub last_seq: u64,
    /// Where the next window starts.
    pub next_context: u32,
    /// Valid transactions in the run that was applied.
    pub applied: usize,
    /// False when the ring could not describe every slot: treat every
    /// extent as possibly written.
    pub complete: bool,
}

impl Replay {
    /// The extents in the table.
    pub fn active(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.slots.iter().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Replay the ring (`ring` holds the ring's slots back to back).
pub fn replay(ring: &[u8], device_uuid: u64, al_extents: u32, extents: u64) -> Replay {
    let n_slots = ring.len() / SLOT as usize;
    // The table is allocated at this size, so a count no layout can hold
    // (a damaged superblock) must not reach the allocation.
    if !(AL_EXTENTS_MIN..=AL_EXTENTS_MAX).contains(&al_extents) {
        return Replay {
            slots: Vec::new(),
            last_seq: 0,
            next_context: 0,
            applied: 0,
            complete: false,
        };
    }
    let n = al_extents as usize;
    let valid_extent = |e: u32| e == EMPTY || u64::from(e) < extents;
    let mut txs: HashMap<u64, Transaction> = HashMap::new();
    for (i, slot) in ring.chunks_exact(SLOT as usize).enumerate() {
        let Some(tx) = Transaction::decode(slot) else {
            continue;
        };
        let fits = tx.device_uuid == device_uuid
            && tx.al_extents == al_extents
            && tx.seq != 0
            && n_slots > 0
            && tx.seq % n_slots as u64 == i as u64
            && (tx.context_start as usize) < n
            && tx.context.len() <= n
            && tx
                .updates
                .iter()
                .all(|&(s, e)| (s as usize) < n && valid_extent(e))
            && tx.context.iter().all(|&e| valid_extent(e));
        if fits {
            txs.insert(tx.seq, tx);
        }
    }
    let mut table: Vec<Option<Option<u32>>> = vec![None; n];
    let Some(&last) = txs.keys().max() else {
        return Replay {
            slots: vec![None; n],
            last_seq: 0,
            next_context: 0,
            applied: 0,
            complete: false,
        };
    };
    let mut first = last;
    while first > 1 && txs.contains_key(&(first - 1)) {
        first -= 1;
    }
    let mut next_context = 0;
    for seq in first..=last {
        let Some(tx) = txs.get(&seq) else { continue };
        for (i, &e) in tx.context.iter().enumerate() {
            let slot = (tx.context_start as usize + i) % n;
            table[slot] = Some((e != EMPTY).then_some(e));
        }
        for &(slot, e) in &tx.updates {
            table[slot as usize] = Some((e != EMPTY).then_some(e));
        }
        next_context = ((tx.context_start as usize + tx.context.len()) % n) as u32;
    }
    let complete = table.iter().all(Option::is_some);
    Replay {
        slots: table.into_iter().map(Option::flatten).collect(),
        last_seq: last,
        next_context,
        applied: (last - first + 1) as usize,
        complete,
    }
}

/// The result of asking for extents to be active.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// All extents are active; their use counts were raised.
    Hot,
    /// A transaction must be made durable first. `evict` are the extents
    /// leaving the AL: their bitmap pages must be durable before it.
    Commit {
        /// The transaction to write to ring slot `seq % ring`.
        tx: Transaction,
        /// Extents leaving the table.
        evict: Vec<u32>,
    },
    /// Every slot has writes in flight: wait for some to complete.
    Busy,
}

/// The in-memory activity log.
#[derive(Clone, Debug)]
pub struct ActivityLog {
    device_uuid: u64,
    slots: Vec<Option<u32>>,
    refs: Vec<u32>,
    last_use: Vec<u64>,
    index: HashMap<u32, usize>,
    clock: u64,
    seq: u64,
    next_context: u32,
    ring: u32,
    /// Slots reserved by a planned, not yet committed transaction.
    pending: Option<Vec<(usize, Option<u32>)>>,
}

impl ActivityLog {
    /// Resume from a replayed ring (an incomplete replay starts empty).
    pub fn resume(device_uuid: u64, ring: u32, r: &Replay) -> Self {
        let slots = if r.complete {
            r.slots.clone()
        } else {
            vec![None; r.slots.len()]
        };
        let mut index = HashMap::new();
        for (i, s) in slots.iter().enumerate() {
            if let Some(e) = s {
                index.insert(*e, i);
            }
        }
        let n = slots.len();
        Self {
            device_uuid,
            slots,
            refs: vec![0; n],
            last_use: vec![0; n],
            index,
            clock: 0,
            seq: r.last_seq,
            next_context: r.next_context,
            ring,
            pending: None,
        }
    }

    /// The transactions that initialise a ring with an empty table,
    /// described window by window, numbered from `after_seq + 1`, filling
    /// every ring slot.
    pub fn initial_ring(
        device_uuid: u64,
        al_extents: u32,
        ring: u32,
        after_seq: u64,
    ) -> Vec<Transaction> {
        let mut al = Self::resume(
            device_uuid,
            ring,
            &Replay {
                slots: vec![None; al_extents as usize],
                last_seq: after_seq,
                next_context: 0,
                applied: 0,
                complete: true,
            },
        );
        (0..ring)
            .map(|_| {
                let tx = al.transaction(Vec::new());
                al.seq = tx.seq;
                al.next_context = next_window(&tx, al_extents);
                tx
            })
            .collect()
    }

    fn transaction(&self, updates: Vec<(u32, u32)>) -> Transaction {
        let n = self.slots.len() as u32;
        let count = n.min(AL_CONTEXT_PER_TX);
        let start = self.next_context % n.max(1);
        // The window shows the table as it will be after `updates`.
        let mut table = self.slots.clone();
        for &(s, e) in &updates {
            table[s as usize] = (e != EMPTY).then_some(e);
        }
        Transaction {
            seq: self.seq + 1,
            device_uuid: self.device_uuid,
            al_extents: n,
            updates,
            context_start: start,
            context: (0..count)
                .map(|i| table[((start + i) % n) as usize].unwrap_or(EMPTY))
                .collect(),
        }
    }

    /// Sequence number of the last committed transaction.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Extents in the table, sorted.
    pub fn active(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.index.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether extent `e` is in the table (a write there needs no
    /// transaction).
    pub fn is_active(&self, e: u32) -> bool {
        self.index.contains_key(&e)
    }

    /// Writes in flight in extent `e`.
    pub fn in_flight(&self, e: u32) -> u32 {
        self.index.get(&e).map_or(0, |&s| self.refs[s])
    }

    /// Ask for `extents` (sorted, distinct, at most [`AL_UPDATES_PER_TX`]
    /// of them cold) to be active. Only one transaction may be planned at a
    /// time: while one is, further cold requests are `Busy`.
    pub fn plan(&mut self, extents: &[u32]) -> Plan {
        self.clock += 1;
        let cold: Vec<u32> = extents
            .iter()
            .copied()
            .filter(|e| !self.index.contains_key(e))
            .collect();
        if cold.is_empty() {
            for e in extents {
                if let Some(&s) = self.index.get(e) {
                    self.refs[s] += 1;
                    self.last_use[s] = self.clock;
                }
            }
            return Plan::Hot;
        }
        if self.pending.is_some() || cold.len() > AL_UPDATES_PER_TX {
            return Plan::Busy;
        }
        // Victims: empty slots first, then the least recently used idle
        // ones, never one this request itself needs.
        let mut candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.refs[s] == 0)
            .filter(|&s| !matches!(self.slots[s], Some(e) if extents.contains(&e)))
            .collect();
        if candidates.len() < cold.len() {
            return Plan::Busy;
        }
        candidates.sort_by_key(|&s| (self.slots[s].is_some(), self.last_use[s]));
        let mut updates = Vec::with_capacity(cold.len());
        let mut evict = Vec::new();
        let mut pending = Vec::with_capacity(cold.len());
        for (&e, &s) in cold.iter().zip(&candidates) {
            if let Some(old) = self.slots[s] {
                evict.push(old);
            }
            updates.push((s as u32, e));
            pending.push((s, Some(e)));
        }
        let tx = self.transaction(updates);
        self.pending = Some(pending);
        Plan::Commit { tx, evict }
    }

    /// The planned transaction is durable: apply it and take the references
    /// of the request that planned it (`extents`, as given to `plan`).
    pub fn committed(&mut self, tx: &Transaction, extents: &[u32]) {
        if let Some(pending) = self.pending.take() {
            for (s, e) in pending {
                if let Some(old) = self.slots[s] {
                    self.index.remove(&old);
                }
                self.slots[s] = e;
                if let Some(e) = e {
                    self.index.insert(e, s);
                }
            }
        }
        self.seq = tx.seq;
        self.next_context = next_window(tx, self.slots.len() as u32);
        for e in extents {
            if let Some(&s) = self.index.get(e) {
                self.refs[s] += 1;
                self.last_use[s] = self.clock;
            }
        }
    }

    /// The planned transaction failed: forget it.
    pub fn abandon(&mut self) {
        self.pending = None;
    }

    /// Writes to `extents` completed.
    pub fn release(&mut self, extents: &[u32]) {
        for e in extents {
            if let Some(&s) = self.index.get(e) {
                self.refs[s] = self.refs[s].saturating_sub(1);
            }
        }
    }

    /// Ring slots.
    pub fn ring(&self) -> u32 {
        self.ring
    }
}

pub(crate) fn next_window(tx: &Transaction, al_extents: u32) -> u32 {
    ((u64::from(tx.context_start) + tx.context.len() as u64) % u64::from(al_extents.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::al_ring_slots;
    use proptest::prelude::*;

    fn ring_bytes(ring: u32, txs: &[Transaction]) -> Vec<u8> {
        let mut b = vec![0u8; ring as usize * SLOT as usize];
        for tx in txs {
            let at = (tx.seq % u64::from(ring)) as usize * SLOT as usize;
            b[at..at + SLOT as usize].copy_from_slice(&tx.encode());
        }
        b
    }

    #[test]
    fn transaction_round_trip_and_corruption() {
        let tx = Transaction {
            seq: 9,
            device_uuid: 77,
            al_extents: 1237,
            updates: vec![(3, 1000), (4, EMPTY)],
            context_start: 880,
            context: vec![5; 357],
        };
        let b = tx.encode();
        assert_eq!(Transaction::decode(&b), Some(tx));
        let mut bad = b.clone();
        bad[600] ^= 1;
        assert_eq!(Transaction::decode(&bad), None);
        assert_eq!(Transaction::decode(&b[..100]), None);
    }

    #[test]
    fn fresh_ring_replays_to_an_empty_complete_table() {
        for al in [7u32, 1237, 3000] {
            let ring = al_ring_slots(al);
            let txs = ActivityLog::initial_ring(1, al, ring, 0);
            let r = replay(&ring_bytes(ring, &txs), 1, al, 1 << 20);
            assert!(r.complete, "{al}");
            assert!(r.active().is_empty());
            assert_eq!(r.last_seq, u64::from(ring));
            // Another device's ring is stale.
            assert!(!replay(&ring_bytes(ring, &txs), 2, al, 1 << 20).complete);
        }
    }

    /// Drive an AL through random activations; at a random point "crash":
    /// keep the ring as written so far, optionally tearing the newest
    /// transaction. Every extent that had a write in flight (or whose
    /// transaction was durable) must be active after replay.
    fn crash_run(
        al_extents: u32,
        ops: Vec<(Vec<u32>, bool)>,
        tear: bool,
    ) -> Result<(), TestCaseError> {
        let ring = al_ring_slots(al_extents);
        let extents = 10_000u64;
        let init = ActivityLog::initial_ring(5, al_extents, ring, 0);
        let mut disk = ring_bytes(ring, &init);
        let mut al = ActivityLog::resume(5, ring, &replay(&disk, 5, al_extents, extents));
        let mut in_flight: Vec<Vec<u32>> = Vec::new();
        for (mut req, complete_one) in ops {
            req.sort_unstable();
            req.dedup();
            if complete_one && !in_flight.is_empty() {
                let done = in_flight.remove(0);
                al.release(&done);
            }
            match al.plan(&req) {
                Plan::Hot => in_flight.push(req),
                Plan::Busy => {}
                Plan::Commit { tx, evict } => {
                    for e in &evict {
                        prop_assert_eq!(al.in_flight(*e), 0, "evicting a busy extent");
                    }
                    let at = (tx.seq % u64::from(ring)) as usize * SLOT as usize;
                    disk[at..at + SLOT as usize].copy_from_slice(&tx.encode());
                    al.committed(&tx, &req);
                    in_flight.push(req);
                }
            }
        }
        let mut crashed = disk.clone();
        if tear {
            // A transaction being written when the power went: it replaces
            // the oldest slot with garbage.
            let next = (al.seq() + 1) % u64::from(ring);
            let at = next as usize * SLOT as usize;
            crashed[at + 100..at + 200].fill(0xa5);
        }
        let r = replay(&crashed, 5, al_extents, extents);
        prop_assert!(r.complete);
        let active = r.active();
        prop_assert_eq!(&active, &al.active(), "replay must reproduce the table");
        for req in &in_flight {
            for e in req {
                prop_assert!(
                    active.binary_search(e).is_ok(),
                    "extent {} in flight but not replayed",
                    e
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn replay_covers_every_extent_in_flight(
            al_extents in 7u32..2000,
            ops in proptest::collection::vec(
                (proptest::collection::vec(0u32..3000, 1..4), any::<bool>()), 1..400),
            tear in any::<bool>(),
        ) {
            crash_run(al_extents, ops, tear)?;
        }

        #[test]
        fn replay_never_panics_on_garbage(
            ring in proptest::collection::vec(any::<u8>(), 0..20000),
            al_extents in 0u32..70000,
        ) {
            let _ = replay(&ring, 1, al_extents, 1 << 20);
        }
    }

    /// Found by the metadata fuzz target: a count of 620 million extents
    /// from damaged bytes allocated gigabytes before any check.
    #[test]
    fn replay_of_an_impossible_extent_count_is_incomplete_not_an_allocation() {
        for al_extents in [
            0,
            AL_EXTENTS_MIN - 1,
            AL_EXTENTS_MAX + 1,
            0x2501_24b8,
            u32::MAX,
        ] {
            let r = replay(&[], 1, al_extents, 1 << 20);
            assert!(!r.complete, "{al_extents}");
            assert!(r.slots.is_empty(), "{al_extents}");
        }
    }
}
