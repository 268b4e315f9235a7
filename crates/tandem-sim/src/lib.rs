//! Deterministic two-node simulation of [`tandem_core::Core`] (dev only).
//!
//! A run takes a seed and drives two cores through a random schedule of
//! client writes and flushes, frame deliveries, local I/O completions, link
//! drops, daemon crashes and role changes, then a quiescent phase that
//! heals the link and drains everything. Every choice comes from one
//! splitmix64 generator, and nothing reads a clock or spawns a thread, so a
//! seed replays exactly: `TANDEM_SIM_SEED=<seed> cargo test -p tandem-sim
//! many_seeds -- --nocapture` prints the whole trace of one run.
//!
//! # What is modelled
//!
//! - **Each node** runs a real `Core` (the engine's driver contract is
//!   followed: actions in order, metadata actions done before the next one)
//!   over real [`tandem_meta::Metadata`] on a [`tandem_meta::CrashDisk`]
//!   (external layout, 7 AL extents for a 40 MiB device of 10 extents, so
//!   the activity log evicts). `AlBegin` is answered later, at a random
//!   step, by `begin_io` (retried while it says busy); `AlEnd` is `end_io`;
//!   `MarkOutOfSync` sets bits in memory and writes the bitmap back when the
//!   range is outside the active AL extents (inside them, AL replay re-marks
//!   them after a crash); `PersistGenerations` / `PersistFlags` /
//!   `ClearBitmap` go to the superblock and bitmap. Before an AL
//!   transaction that makes an extent hot the data disk is flushed, so the
//!   extent it may evict holds only stable writes (DRBD's md-flushes; only a
//!   power loss can tell the difference).
//! - **The data disk** is one `u64` per 4 KiB block holding the id of the
//!   write that last wrote it, in two layers: what readers see (page cache)
//!   and what is stable. Local writes and flushes wait in a queue and finish
//!   in random order (3% of them are slow: 10–160 steps); a write lands in
//!   the page cache when it finishes (FUA: stable too); a flush makes every
//!   finished write stable. Clients write
//!   1–4 blocks (trim/zero up to 16) within 8 blocks of an extent boundary,
//!   so writes overlap and cross extents; ids grow with submission order.
//! - **The network** is one FIFO per direction of `Packet`s, delivered in
//!   order at random steps. A link drop clears both FIFOs and feeds
//!   `LinkDown` to both cores; a later `LinkUp { link: n + 1 }` goes to both
//!   unless one is StandAlone. `Action::Disconnect` drops the link too.
//! - **Clients** keep at most 16 requests in flight per Primary: writes
//!   (10% FUA, 7% trim, 7% zero) and flushes.
//! - **Faults and roles**: link drops; `kill -9` of a daemon (its core and
//!   in-flight requests vanish, the page cache survives, each block of a
//!   write in progress may or may not have landed, the metadata device keeps
//!   unsynced writes and is reopened with AL replay, the daemon restarts a
//!   few steps later as Secondary); switchovers (demote when idle, promote
//!   the other, never forced); failover to an UpToDate survivor when the
//!   Primary dies; "rogue" promotion of the Secondary while disconnected
//!   (split brain), after which clients write to both Primaries.
//! - **Resync** runs in the core as on real daemons (bitmap exchange,
//!   resync requests and data, checksums, verify, `invalidate`,
//!   split-brain recovery by the cycled `after-sb-*` policies), with the
//!   blocks' contents moved by the simulation.
//! - **Repair**: a split brain left StandAlone stays so until an operator
//!   acts; at a random step one does, after comparing the disks (every
//!   differing block must be marked in a bitmap: invariant 3). A StandAlone
//!   pair is repaired as on real daemons: the victim is demoted if it is
//!   Primary and reconnects with `connect --discard-my-data`, the survivor
//!   with `connect`, and the core makes the victim the SyncTarget of the
//!   union of both bitmaps (a resync like any other, under the schedule's
//!   faults). Other degraded pairs (no usable UpToDate side), and a victim
//!   that cannot be demoted, are repaired by stopping both daemons, copying
//!   the better node's data to the other, giving both the same generations
//!   and clean bitmaps and restarting them connected.
//!
//! # Checkers (invariants of `design.md`)
//!
//! 1. `completion_by_protocol`: a write completes after its local write
//!    finished; with the link up from submission to completion it was also
//!    queued to the link (A), received by the peer (B), written by the peer
//!    (C).
//! 2. `al_before_data`: a client write reaches the disk only after its
//!    `AlReady` and while the metadata's activity log holds its extents.
//! 3. `nothing_forgotten`: a write completed without reaching the peer is
//!    marked before its completion; after a link loss every unacknowledged
//!    write is marked; disks compared at repairs and at the end differ only
//!    in marked blocks.
//! 4. `flush_is_barrier`: a flush completion finds every write completed
//!    before the flush stable locally and, under C with the link up
//!    throughout, on the peer; the same for FUA writes.
//! 5. `generations_before_data`: after a promotion without a connected
//!    peer that has a disk, or a Primary's link loss, no client write reaches the
//!    disk before a `PersistGenerations` changed the current UUID.
//! 6. `one_primary`: never both Primary while both Connected.
//! 7. `acknowledged_data_survives`: after a daemon crash every acknowledged
//!    write (by the node as Primary, or by its Primary under C) is still on
//!    its disk or overwritten by a newer one, no out-of-sync bit is lost and
//!    every extent of the AL is marked; and no write ever overwrites an
//!    acknowledged one with older data.
//! 8. `split_brain_never_silent`: when both nodes wrote while apart, the
//!    first state report of the next link makes the receiver report
//!    `SplitBrain` and not connect.
//!
//! 9. `no_false_split_brain`, the converse of 8: a connect reports split
//!    brain only when both nodes began a data generation of their own
//!    while apart (a new current generation persisted while not connected,
//!    since a resync, a repair or a connect on the same generation). A node
//!    that is merely behind must be resynced, not left StandAlone. And no
//!    connect ever finds the nodes' data unrelated: both descend from one
//!    pair.
//!
//! Plus `liveness`: once faults stop, the pair drains, every request is
//! answered and the link comes back unless a node is StandAlone.
//!
//! # What it found
//!
//! The simulation found three bugs in the core, now fixed, with a
//! regression seed each in `tests/core_bugs.rs`: link loss completed writes
//! that had not started; a client write after a promotion could land before
//! an older write of the former Primary still running here; a new link
//! forgot the old link's peer writes in flight (ids now carry the link).
//! Outside the default schedule it found that a Secondary's power loss
//! could lose writes it had acknowledged as written (fixed: the transfer
//! log keeps a write until its epoch's barrier ack, as DRBD does), that a
//! Primary's failed local write left the replicas diverged unmarked
//! (fixed), and that simultaneous promotions made two connected Primaries
//! (fixed: a connected node asks its peer before promoting).
//! [`Options`] can still turn off the schedule features that found the
//! fixed bugs (`overlapping_writes`, `promote_during_peer_io`,
//! `reconnect_during_peer_io`).
//!
//! # What is not modelled
//!
//! Payload bytes
//! (a block holds an id, so torn sectors within a block are invisible), the
//! wire encoding and authentication, timers, NBD, disk errors on the
//! metadata device, and reads. Power loss ([`Options::machine_crash`]:
//! the page cache is lost, each unstable block independently survives or
//! not; invariant 7 is checked only for daemon crashes), local write
//! errors ([`Options::disk_error`]) and racing promotions
//! ([`Options::racing_promote`]) are in the default schedule at low rates;
//! `tests/core_bugs.rs` has a seed for each at a higher one.
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![warn(missing_docs)]

mod disk;
mod rng;
mod sim;

pub use disk::DataDisk;
pub use rng::Rng;
pub use sim::{
    run, run_traced, Check, Failure, Options, Sabotage, Stats, AL_EXTENTS, BLOCK, BLOCKS, EXTENTS,
    EXTENT_BLOCKS, MAX_IN_FLIGHT, SIZE,
};

use std::ops::Range;

/// Run every seed of `seeds` with `opts(seed)` on `threads` threads; return
/// the summed statistics of the runs that passed and the failure of the
/// smallest failing seed. With `stop_early` each thread stops at its first
/// failure (then the smallest failing seed found is not necessarily the
/// smallest overall).
pub fn run_seeds(
    seeds: Range<u64>,
    opts: impl Fn(u64) -> Options + Sync,
    threads: usize,
    stop_early: bool,
) -> (Stats, Option<Failure>) {
    let threads = threads.max(1) as u64;
    let results: Vec<(Stats, Option<Failure>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let seeds = seeds.clone();
                let opts = &opts;
                s.spawn(move || {
                    let mut stats = Stats::default();
                    let mut first: Option<Failure> = None;
                    for seed in seeds.filter(|s| s % threads == t) {
                        match run(seed, &opts(seed)) {
                            Ok(st) => stats.add(&st),
                            Err(f) => {
                                if first.is_none() {
                                    first = Some(f);
                                }
                                if stop_early {
                                    break;
                                }
                            }
                        }
                    }
                    (stats, first)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    let mut stats = Stats::default();
    let mut first: Option<Failure> = None;
    for (st, f) in results {
        stats.add(&st);
        if let Some(f) = f {
            if first.as_ref().map_or(true, |g| f.seed < g.seed) {
                first = Some(f);
            }
        }
    }
    (stats, first)
}
