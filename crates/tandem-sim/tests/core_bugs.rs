//! What the simulation found in `tandem-core`, one seed each. All are fixed
//! and these are their regression tests; the default schedule exercises
//! each of the situations too.
//!
//! Run an open one with `cargo test -p tandem-sim --test core_bugs <name> --
//! --ignored --nocapture`, or replay its seed with the whole trace:
//! `TANDEM_SIM_OPTS=discard_repair=0,age_policies=0,<opts> TANDEM_SIM_SEED=<seed> cargo test -p tandem-sim
//! --test seeds many_seeds -- --nocapture`.

#![allow(clippy::unwrap_used)]

use tandem_sim::{run, Options};

/// The seeds replay the schedule they were found with: repairs by copying
/// the disks and the split-brain policies of that time.
fn replay(seed: u64, opts: &str) {
    let o = Options::for_seed(seed)
        .with("discard_repair=0,age_policies=0")
        .and_then(|o| o.with(opts))
        .unwrap();
    if let Err(f) = run(seed, &o) {
        panic!("{f}\nwith TANDEM_SIM_OPTS={opts}");
    }
}

/// Bug 1: a write waiting to start (it overlaps a write in flight) is
/// completed `Ok` when the link drops, although it was never written
/// anywhere, never got an `AlBegin` and is not marked out of sync.
///
/// `link_lost` calls `finish` on every request; a request that has not
/// started has `pending == completion == 0`, so `finish` completes it
/// successfully and drops it (the `waiting` queue later skips the missing
/// id). Seed 9 (protocol A): write 3 overlaps write 2 and waits; at step 11
/// the link drops and write 3 completes `Ok` without a `LocalWrite`.
/// Checker: `completion_by_protocol` ("completed before its local write
/// finished"). Workaround: clients never overlap their own writes in flight.
#[test]
fn bug1_link_loss_completes_writes_that_never_started() {
    replay(9, "overlapping_writes=1");
}

/// Bug 2: a node promoted while writes received from the peer are still in
/// its local I/O queue lets its own client writes overlap them; the older
/// peer write can land after the newer acknowledged client write and
/// overwrite it.
///
/// `start_waiting` checks overlaps only against client requests, not
/// against `rx.inflight`, and neither `link_lost` nor `promote` waits for
/// those writes (DRBD waits for the peer's requests to drain before the
/// connection is torn down). Seed 28 (protocol B): n1 (Primary) completes
/// write 343 on the receive ack while n0 is still writing it (slow disk);
/// n1's daemon dies at step 1493, n0 is promoted at once, acknowledges its
/// own write 392 over the same blocks, and at step 1587 the stale peer
/// write 343 lands on top of it. Checker: `acknowledged_data_survives`.
/// Workaround: promote only once the peer's writes are drained.
#[test]
fn bug2_promotion_races_peer_writes_in_flight() {
    replay(28, "promote_during_peer_io=1");
}

/// Bug 3: a new link resets the receiver while writes received on the
/// previous link are still in the local I/O queue. (a) Overlapping writes
/// of the new link are no longer serialised against them, so an old write
/// can land after a newer one; (b) `OpId::Peer(seq)` and
/// `OpId::PeerBarrier(epoch)` carry no link number and sequence numbers and
/// epochs restart at 1 per link, so the old write's completion is taken for
/// the new link's write with the same number: a `WriteAck` goes out for a
/// write that is not on disk, and under protocol C the Primary completes it.
///
/// Seed 35 (protocol C) shows (a): n1 overwrites the acknowledged write 12
/// with the older write 4 at step 74 (`acknowledged_data_survives`).
#[test]
fn bug3a_reconnect_reorders_peer_writes() {
    replay(35, "reconnect_during_peer_io=1");
}

/// Bug 3 (b): seed 380 (protocol C): at step 1327 the completion of link
/// 17's `Peer(7)` makes n1 send `WriteAck(7)` on link 18, and n0 completes
/// write 273 (link 18's seq 7) although n1 has not written it
/// (`completion_by_protocol`). Numbering that keeps counting across links
/// is not enough: the same happens when the peer's daemon restarts (and
/// numbers from 1 again) while this node still writes the old incarnation's
/// data; the op ids need the link. Workaround for both: no new link while
/// the old link's peer writes are in flight.
#[test]
fn bug3b_stale_completion_acks_new_write() {
    replay(380, "reconnect_during_peer_io=1");
}

/// Finding 4 (power loss, outside invariant 7's daemon-crash scope): a
/// Secondary acknowledges a write once it is in its page cache, the Primary
/// then drops it from the transfer log (on the write ack, not on the
/// flushing barrier ack) and the Secondary keeps no activity log of its
/// own for peer writes. When the Secondary loses power before the next
/// flush, the write is gone from it and no bitmap on either node says so.
/// DRBD keeps requests in the transfer log until the barrier ack and lets
/// the Secondary use its activity log for peer writes. Seed 109 (protocol
/// B): n1 loses power at step 115, the disks differ unmarked at the next
/// comparison (`nothing_forgotten`). Fixed: the transfer log keeps
/// writes until the barrier ack.
#[test]
fn finding4_secondary_power_loss_is_not_tracked() {
    replay(109, "machine_crash=12");
}

/// Finding 5: a local write error on the Primary completes the request
/// with an error but leaves the peer holding the write, and nothing is
/// marked out of sync (the core neither marks the range nor fails the
/// disk). Seed 27 (protocol A): disks differ unmarked at the repair at
/// step 216 (`nothing_forgotten`). Fixed: the failed range is
/// marked out of sync.
#[test]
fn finding5_local_write_error_diverges_unmarked() {
    replay(27, "disk_error=50");
}

/// Finding 6: promotion is decided locally, so two nodes promoted at the
/// same moment while connected both succeed (each still sees the other as
/// Secondary); the pair is Primary/Primary and Connected until the state
/// reports cross and both-primary split brain disconnects it. DRBD makes
/// promotion a cluster-wide two-phase state change. Seed 7 (protocol B),
/// `one_primary` at step 73. Fixed: a connected node asks
/// its peer before promoting (PromoteRequest / PromoteReply).
#[test]
fn finding6_racing_promotions() {
    replay(7, "racing_promote=3000");
}

/// Resync findings (2026-11-25), each found by the default schedule while
/// resync, split-brain recovery and checksums were being built, and fixed
/// before they were committed. The seeds replay the situations.
///
/// - Seed 1853: a Primary that rotated its current generation while its
///   bitmap generation was already set dropped the old current one, so a
///   later split brain from it looked like unrelated data. Now the old
///   current generation moves into history.
/// - Seed 7: a late `RsAck` cleared a bit that a failed local write had set
///   again after the range was served. Now such ranges are dropped from the
///   served set.
/// - Seed 411: the source read a range while a peer write of an older link
///   was still landing there, and sent the older data. Now such writes hold
///   the read back like client writes.
/// - Seed 484: every full sync took a fresh sync generation, which pushed
///   the pair's common ancestor out of the two history slots. Now an
///   existing bitmap generation serves.
/// - Seed 12: a split-brain victim kept its own generation until the end of
///   the resync, so an interrupted recovery found split brain again. Now
///   the source always hands the target its bitmap generation.
/// - Seed 326: a range re-marked while its checksum request was still
///   queued was later acknowledged as in sync. Now queued requests are
///   poisoned too.
/// - Seed 955: the target took its digests under a write of an older link
///   still landing, then called the range identical. Now it waits for such
///   writes.
/// - Seed 5367: the source's own write failed while the same write was
///   still on its way to the target, whose digests (taken before it
///   arrived) then matched the source's; the range was called identical
///   and the target kept the write the source lacks. Now ranges marked
///   again during a resync always travel as data.
#[test]
fn resync_findings() {
    for seed in [1853, 7, 411, 484, 12, 326, 955, 5367] {
        replay(seed, "");
    }
}

/// Generation findings (2026-12-06).
///
/// - Seed 11049 (found with 20,000 seeds): after a split brain both nodes
///   were promoted again after every crash while apart, and each promotion
///   moved the current generation into history although no peer had ever
///   seen it; the shared ancestors left the two history slots and the next
///   connect found `unrelated-data` instead of split brain. Now a rotation
///   replaces a current generation begun since the last accepted connect
///   (superblock flag `current-shared`).
/// - The chaos soak of real daemons (`tests/soak.rs`, seed
///   0x164f71599b55c957) found the same crowding from the Primary's side:
///   an Inconsistent SyncTarget's generation left the source's history and
///   the connect read `split-brain-history-match`. Now an Inconsistent node
///   is the SyncTarget whatever the generations say; the core unit test
///   `an_inconsistent_node_is_the_sync_target_whatever_the_generations_say`
///   holds the situation.
/// - Seed 156 (found by `no_false_split_brain`, the checker added for the
///   soak's finding): a Primary connected again and again to a peer whose
///   disk had failed and detached, and counted each connect as sharing its
///   current generation, so its rotations pushed the peer's generation out
///   of history; when the peer came back with its disk, the connect said
///   split brain. A diskless peer now shares nothing.
/// - Seed 13044 (the same checker, 40,000 seeds): a SyncSource whose link
///   dropped right after each connect counted its current generation as
///   shared at every connect and pushed it into history at every drop,
///   until the target's generation was gone. A source's current generation
///   now counts as shared only once the target took it (the resync's end),
///   and `missed-resync-end` no longer needs the source to remember it.
/// - Seed 57558 (the same checker, 200,000 seeds): a node promoted while
///   its SyncTarget was finishing started a new generation (the peer was
///   not UpToDate yet), the target took the old one at its end, and the
///   source counted the new one as shared; after a failover the pair saw
///   split brain. Now, as in DRBD, a promotion with a connected peer that
///   has a disk begins no generation (the peer gets every write), and the
///   source counts its generation as shared only if the target reports it.
#[test]
fn generation_findings() {
    for seed in [11049, 156, 13044, 57558] {
        replay(seed, "");
    }
}
