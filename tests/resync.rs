//! End-to-end tests of resync: two real `tandem` daemons on loopback,
//! driven through the CLI, real NBD clients writing to the Primary, the
//! backing files compared byte for byte afterwards.
//!
//! What users rely on:
//! 1. after an outage only what differs travels (the resync byte counters
//!    equal the out-of-sync bytes), and the replicas end identical;
//! 2. after `kill -9` of the Primary the resync is bounded by the activity
//!    log, not the device;
//! 3. `invalidate` resyncs the whole device, `pause-sync` / `resume-sync`
//!    hold and continue it, and `status` shows its progress;
//! 4. `primary --force` on a never-synced pair starts the initial sync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/pair.rs"]
mod pair;

use common::require_tool;
use pair::{
    assert_same_range, counter, nbdsh, u64_field, Alpha, Beta, Pair, PairOptions, MIB, RES,
    STATE_TIMEOUT,
};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A resync of a few hundred MiB through debug builds may take this long.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Both daemons down, then the data areas must be identical.
fn assert_replicas_identical(pair: &Pair, what: &str) {
    pair.down(Alpha);
    pair.down(Beta);
    assert_same_range(
        &pair.disk(Alpha),
        &pair.disk(Beta),
        0,
        pair.data_size(),
        what,
    );
}

/// Scattered writes through NBD: `count` writes of 4–64 KiB (not
/// 4 KiB-aligned lengths half of the time) spread over the device;
/// returns the bytes they cover, rounded out to 4 KiB blocks.
fn scattered_writes(pair: &Pair, count: u64, seed: u64) -> u64 {
    let size = pair.data_size();
    let mut blocks = std::collections::BTreeSet::new();
    let mut script = String::new();
    let mut x = seed | 1;
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 4096 * (1 + x % 16) - if i % 2 == 0 { 100 } else { 0 };
        let off = (x >> 20) % (size - 64 * 1024) / 512 * 512;
        script.push_str(&format!(
            "h.pwrite(bytes([{b}]) * {len}, {off})\n",
            b = (i % 250) + 1
        ));
        for b in off / 4096..(off + len).div_ceil(4096) {
            blocks.insert(b);
        }
    }
    script.push_str("h.flush()\nprint('DONE')\n");
    let out = nbdsh(&pair.nbd_uri(Alpha), &script);
    assert!(out.contains("DONE"), "{out}");
    blocks.len() as u64 * 4096
}

#[test]
fn outage_then_resync_moves_only_the_dirty_blocks() {
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions::default());
    // Some data both have.
    scattered_writes(&pair, 40, 0x1234);
    pair.wait_status(Alpha, "nothing pending", STATE_TIMEOUT, |s| {
        counter(s, "pe") == 0
    });

    // The Secondary goes away; the Primary keeps writing.
    pair.ok(Beta, &["disconnect", RES]);
    pair.wait_for(Alpha, "cstate", "WFConnection", STATE_TIMEOUT);
    let dirty = scattered_writes(&pair, 60, 0x9876);
    let s = pair.status(Alpha);
    assert_eq!(
        u64_field(&s, "out-of-sync-bytes"),
        dirty,
        "the Primary marks exactly the blocks written without its peer:\n{s:#}"
    );

    // Back: the resync moves exactly those blocks.
    pair.ok(Beta, &["connect", RES]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(Alpha, "dstate", "UpToDate/UpToDate", STATE_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    let a = pair.status(Alpha);
    let b = pair.status(Beta);
    assert_eq!(counter(&a, "resync-bytes-sent"), dirty, "{a:#}");
    assert_eq!(counter(&b, "resync-bytes-received"), dirty, "{b:#}");
    assert_eq!(u64_field(&a, "out-of-sync-bytes"), 0, "{a:#}");
    assert_eq!(u64_field(&b, "out-of-sync-bytes"), 0, "{b:#}");
    assert!(a["sync"].is_null(), "no resync runs any more: {a:#}");
    let log = pair.log(Beta);
    assert!(
        log.contains("rule my-bitmap-is-peer-current")
            || log.contains("rule peer-bitmap-is-my-current"),
        "the rule applied is logged by name:\n{log}"
    );
    assert_replicas_identical(&pair, "after the outage's resync");
}

#[test]
fn kill_9_of_the_primary_resyncs_at_most_the_activity_log() {
    require_tool("fio");
    let pair = Pair::connected(PairOptions {
        extra_disk: "al-extents = 7",
        ..PairOptions::default()
    });
    let uri = pair.nbd_uri(Alpha);
    // Random writes over 96 MiB: far more than 7 extents (28 MiB) are hot
    // over time, so a resync of the whole written area would show. (With
    // 7 slots nearly every write costs an activity-log transaction, so the
    // load is slow; a few MiB are enough.)
    let mut fio = Command::new("fio")
        .args([
            "--name=spread",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=96m",
            "--time_based",
            "--runtime=30",
        ])
        .current_dir(pair.scratch())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(pair.scratch().join("fio.out")).unwrap())
        .stderr(std::fs::File::create(pair.scratch().join("fio.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while counter(&pair.status(Alpha), "dw") < 3 * 1024 {
        assert!(
            std::time::Instant::now() < deadline && fio.try_wait().unwrap().is_none(),
            "fio did not write 3 MiB: {}{}",
            std::fs::read_to_string(pair.scratch().join("fio.out")).unwrap_or_default(),
            std::fs::read_to_string(pair.scratch().join("fio.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pair.kill9(Alpha);
    let _ = fio.kill();
    let _ = fio.wait();

    // Beta stays Secondary (no HA manager here); alpha comes back.
    pair.up(Alpha);
    pair.wait_for(Alpha, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    let a = pair.status(Alpha);
    let sent = counter(&a, "resync-bytes-sent");
    assert!(
        sent > 0 && sent <= 7 * 4 * MIB,
        "the crashed Primary resyncs its activity-log extents only (at most 28 MiB), sent {sent}:\n{a:#}"
    );
    let log = pair.log(Alpha);
    assert!(log.contains("rule current-equal"), "{log}");
    assert_replicas_identical(&pair, "after the crashed Primary's resync");
}

#[test]
fn invalidate_resyncs_everything_and_pause_holds_it() {
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions {
        extra_disk: "resync-rate = \"20MiB\"",
        ..PairOptions::default()
    });
    scattered_writes(&pair, 30, 0x55);
    pair.wait_status(Alpha, "nothing pending", STATE_TIMEOUT, |s| {
        counter(s, "pe") == 0
    });
    let err = pair.refused(Alpha, &["invalidate", RES]);
    assert!(err.contains("Primary"), "{err}");
    pair.ok(Beta, &["invalidate", RES]);
    pair.ok(Beta, &["pause-sync", RES]);
    pair.wait_for(Beta, "cstate", "PausedSyncT", STATE_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "PausedSyncS", STATE_TIMEOUT);
    let s = pair.status(Beta);
    assert_eq!(s["disk"], "Inconsistent", "{s:#}");
    assert_eq!(s["sync"]["paused"], true, "{s:#}");
    let held = counter(&s, "resync-bytes-received");
    std::thread::sleep(Duration::from_millis(1500));
    let s = pair.status(Beta);
    assert_eq!(
        counter(&s, "resync-bytes-received"),
        held,
        "nothing moves while paused:\n{s:#}"
    );
    let err = pair.refused(Beta, &["primary", RES, "--force"]);
    assert!(err.contains("Primary") || err.contains("resync"), "{err}");
    let text = pair.ok(Beta, &["status", RES]);
    assert!(text.contains("sync'ed:"), "a progress bar:\n{text}");

    pair.ok(Beta, &["resume-sync", RES]);
    pair.wait_for(Beta, "cstate", "SyncTarget", STATE_TIMEOUT);
    pair.wait_status(Beta, "progress and speed", STATE_TIMEOUT, |s| {
        s["sync"]["done-fraction"].as_f64().is_some_and(|f| f > 0.0)
            && s["sync"]["bytes-per-sec"].as_u64().is_some_and(|r| r > 0)
    });
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    let s = pair.status(Beta);
    assert_eq!(
        counter(&s, "resync-bytes-received"),
        pair.data_size(),
        "invalidate moves the whole device:\n{s:#}"
    );
    assert_replicas_identical(&pair, "after invalidate");
}

#[test]
fn primary_force_on_a_fresh_pair_starts_the_initial_sync() {
    require_tool("nbdsh");
    let pair = Pair::create(PairOptions::default());
    pair.up(Alpha);
    pair.up(Beta);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    pair.wait_for(Alpha, "dstate", "Inconsistent/Inconsistent", STATE_TIMEOUT);
    let err = pair.refused(Alpha, &["primary", RES]);
    assert!(err.contains("no UpToDate data"), "{err}");
    pair.ok(Alpha, &["primary", RES, "--force"]);
    pair.wait_until(Beta, "cstate", "a resync", STATE_TIMEOUT, |c| {
        c.contains("Sync") || c == "Connected"
    });
    // The Primary serves while the peer syncs.
    let out = nbdsh(
        &pair.nbd_uri(Alpha),
        &format!(
            "h.pwrite(b'\\x5a' * 65536, {})\nh.flush()\nprint('OK')",
            3 * MIB
        ),
    );
    assert!(out.contains("OK"), "{out}");
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(Alpha, "dstate", "UpToDate/UpToDate", STATE_TIMEOUT);
    pair.ok(Alpha, &["secondary", RES]);
    assert_replicas_identical(&pair, "after the initial sync");
}

/// Writes of one byte value to whole 4 KiB blocks; returns nothing (the
/// caller knows the blocks).
fn write_blocks(pair: &Pair, node: pair::Node, blocks: &[u64], value: u8) {
    let mut script = String::new();
    for b in blocks {
        script.push_str(&format!(
            "h.pwrite(bytes([{value}]) * 4096, {})\n",
            b * 4096
        ));
    }
    script.push_str("h.flush()\nprint('DONE')\n");
    let out = nbdsh(&pair.nbd_uri(node), &script);
    assert!(out.contains("DONE"), "{out}");
}

/// Both nodes write while apart: alpha stays Primary, beta is promoted on
/// its own, writes, and steps down again. Returns the union of the blocks
/// written apart.
fn make_split_brain(pair: &Pair) -> u64 {
    write_blocks(pair, Alpha, &[1, 2, 3, 1000], 0x11);
    pair.wait_status(Alpha, "nothing pending", STATE_TIMEOUT, |s| {
        counter(s, "pe") == 0
    });
    pair.ok(Alpha, &["disconnect", RES]);
    pair.ok(Beta, &["disconnect", RES]);
    pair.wait_for(Beta, "cstate", "StandAlone", STATE_TIMEOUT);
    write_blocks(pair, Alpha, &[2, 10, 11, 5000], 0xaa);
    pair.ok(Beta, &["primary", RES]);
    write_blocks(pair, Beta, &[3, 11, 12, 13, 7000], 0xbb);
    pair.ok(Beta, &["secondary", RES]);
    // Union of {2, 10, 11, 5000} and {3, 11, 12, 13, 7000}.
    8 * 4096
}

#[test]
fn split_brain_is_detected_and_discard_my_data_resyncs_the_union() {
    require_tool("nbdsh");
    let marker = tempfile::NamedTempFile::new().unwrap();
    let pair = Pair::connected(PairOptions {
        extra_toml: format!(
            "[handlers]\nsplit-brain = \"echo $TANDEM_NODE >> {}\"\n",
            marker.path().display()
        ),
        ..PairOptions::default()
    });
    let union = make_split_brain(&pair);
    pair.ok(Alpha, &["connect", RES]);
    pair.ok(Beta, &["connect", RES]);
    // Detected on both sides, never merged: both stay StandAlone.
    for node in [Alpha, Beta] {
        pair.wait_until(
            node,
            "cstate",
            "StandAlone after split brain",
            STATE_TIMEOUT,
            |c| c == "StandAlone",
        );
        let log = pair.log(node);
        assert!(log.contains("split brain detected"), "{node}:\n{log}");
    }
    let deadline = std::time::Instant::now() + STATE_TIMEOUT;
    loop {
        let ran = std::fs::read_to_string(marker.path()).unwrap_or_default();
        if ran.contains("alpha") && ran.contains("beta") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the split-brain handler ran on: {ran:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Manual recovery: beta's changes go.
    pair.ok(Beta, &["connect", RES, "--discard-my-data"]);
    pair.ok(Alpha, &["connect", RES]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    let a = pair.status(Alpha);
    assert_eq!(
        counter(&a, "resync-bytes-sent"),
        union,
        "only the blocks changed on either side travel:\n{a:#}"
    );
    assert_eq!(pair.query(Alpha, "role"), "Primary/Secondary");
    assert_replicas_identical(&pair, "after discard-my-data");
}

/// `after-sb-0pri = discard-younger-primary` keeps the data of the node
/// that was Primary when the link went (alpha); `discard-older-primary`
/// keeps the data of the one promoted while apart (beta). Only the union of
/// the changed blocks travels either way.
#[test]
fn after_sb_0pri_younger_and_older_primary_pick_their_victim() {
    require_tool("nbdsh");
    for (policy, extra_net, loser, winner) in [
        (
            "discard-younger-primary",
            "after-sb-0pri = \"discard-younger-primary\"",
            Beta,
            Alpha,
        ),
        (
            "discard-older-primary",
            "after-sb-0pri = \"discard-older-primary\"",
            Alpha,
            Beta,
        ),
    ] {
        let pair = Pair::connected(PairOptions {
            extra_net,
            ..PairOptions::default()
        });
        let union = make_split_brain(&pair);
        // No Primary left: the 0pri policy decides.
        pair.ok(Alpha, &["secondary", RES]);
        resolves_by_itself(&pair, loser, winner, union, policy);
    }
}

/// Connect a pair split by `make_split_brain`: the policy makes `loser` the
/// SyncTarget by itself, only the union of the changed blocks travels, and
/// the replicas end with `winner`'s data.
fn resolves_by_itself(pair: &Pair, loser: pair::Node, winner: pair::Node, union: u64, what: &str) {
    pair.ok(Alpha, &["connect", RES]);
    pair.ok(Beta, &["connect", RES]);
    pair.wait_for(loser, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(winner, "cstate", "Connected", STATE_TIMEOUT);
    let log = pair.log(loser);
    assert!(
        log.contains("split brain resolved: this node's data is discarded"),
        "{what}: {loser}:\n{log}"
    );
    let w = pair.status(winner);
    assert_eq!(counter(&w, "resync-bytes-sent"), union, "{what}: {w:#}");
    assert_replicas_identical(pair, what);
    // Block 2 was written by alpha apart, block 3 by beta.
    let img = std::fs::read(pair.disk(loser)).unwrap();
    let (b2, b3) = if matches!(winner, Alpha) {
        (0xaa, 0x11)
    } else {
        (0x11, 0xbb)
    };
    assert_eq!((img[2 * 4096], img[3 * 4096]), (b2, b3), "{what}");
}

/// `new-current-uuid` without `--clear-bitmap`: refused while connected;
/// on a Primary whose peer is away it begins a new generation, and the
/// peer is resynced from the bitmap at the next connect (no split brain).
#[test]
fn new_current_uuid_on_a_disconnected_primary_is_followed_by_the_peer() {
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions::default());
    let line = pair.refused(Alpha, &["new-current-uuid", RES]);
    assert!(line.contains("while connected"), "{line}");
    pair.ok(Beta, &["disconnect", RES]);
    pair.wait_for(Alpha, "cstate", "WFConnection", STATE_TIMEOUT);
    write_blocks(&pair, Alpha, &[5, 6], 0x5a);
    let before = pair.status(Alpha)["current-uuid"].clone();
    pair.ok(Alpha, &["new-current-uuid", RES]);
    let after = pair.status(Alpha)["current-uuid"].clone();
    assert!(before.is_string() && after.is_string(), "{before} {after}");
    assert_ne!(before, after, "a new current generation");
    write_blocks(&pair, Alpha, &[7], 0x5b);
    pair.ok(Beta, &["connect", RES]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    let a = pair.status(Alpha);
    assert_eq!(counter(&a, "resync-bytes-sent"), 3 * 4096, "{a:#}");
    assert!(!pair.log(Alpha).contains("split brain detected"));
    assert_replicas_identical(&pair, "after new-current-uuid");
}

#[test]
fn after_sb_1pri_discard_secondary_recovers_by_itself() {
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions {
        extra_net:
            "after-sb-0pri = \"discard-least-changes\"\nafter-sb-1pri = \"discard-secondary\"",
        ..PairOptions::default()
    });
    let union = make_split_brain(&pair);
    resolves_by_itself(&pair, Beta, Alpha, union, "after discard-secondary");
}

#[test]
fn verify_finds_a_flipped_byte_and_a_resync_repairs_it() {
    require_tool("nbdsh");
    let marker = tempfile::NamedTempFile::new().unwrap();
    let pair = Pair::connected(PairOptions {
        extra_toml: format!(
            "[handlers]\nout-of-sync = \"echo $TANDEM_NODE >> {}\"\n",
            marker.path().display()
        ),
        ..PairOptions::default()
    });
    scattered_writes(&pair, 20, 0x77);
    pair.wait_status(Alpha, "nothing pending", STATE_TIMEOUT, |s| {
        counter(s, "pe") == 0
    });
    // A clean pair verifies clean.
    pair.ok(Alpha, &["verify", RES]);
    let s = pair.wait_status(Alpha, "verify done", SYNC_TIMEOUT, |s| {
        s["verify"].is_null() && !s["last-verify-found"].is_null()
    });
    assert_eq!(s["last-verify-found"], 0, "{s:#}");

    // Bit rot on the Secondary's disk, behind tandem's back.
    let off = 5 * MIB + 7;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pair.disk(Beta))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], off).unwrap();
    }
    pair.ok(Alpha, &["verify", RES]);
    let s = pair.wait_status(Alpha, "verify done", SYNC_TIMEOUT, |s| {
        s["verify"].is_null() && s["last-verify-found"].as_u64().is_some_and(|n| n > 0)
    });
    assert_eq!(
        s["last-verify-found"], 1,
        "exactly one block differs:\n{s:#}"
    );
    assert_eq!(u64_field(&s, "out-of-sync-bytes"), 4096, "{s:#}");
    let deadline = std::time::Instant::now() + STATE_TIMEOUT;
    while !std::fs::read_to_string(marker.path())
        .unwrap_or_default()
        .contains("alpha")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the out-of-sync handler did not run on alpha"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // As in DRBD, a reconnect resyncs what verify marked.
    pair.ok(Beta, &["disconnect", RES]);
    pair.ok(Beta, &["connect", RES]);
    pair.wait_for(Alpha, "cstate", "Connected", SYNC_TIMEOUT);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    let s = pair.wait_status(Alpha, "resync done", SYNC_TIMEOUT, |s| {
        u64_field(s, "out-of-sync-bytes") == 0
    });
    assert_eq!(counter(&s, "resync-bytes-sent"), 4096, "{s:#}");
    assert_replicas_identical(&pair, "after verify and resync");
}

#[test]
fn resource_only_fencing_holds_new_writes_until_fence_peer_outdates_the_peer() {
    require_tool("nbdsh");
    let marker = tempfile::NamedTempFile::new().unwrap();
    let pair = Pair::connected(PairOptions {
        extra_net: "fencing = \"resource-only\"",
        extra_toml: format!(
            "[handlers]\nfence-peer = \"sleep 2; date +%s.%N > {}; exit 4\"\n",
            marker.path().display()
        ),
        ..PairOptions::default()
    });
    pair.kill9(Beta);
    pair.wait_until(Alpha, "cstate", "the loss noticed", STATE_TIMEOUT, |c| {
        c == "WFConnection"
    });
    let out = nbdsh(
        &pair.nbd_uri(Alpha),
        "import time\nh.pwrite(b'f' * 4096, 0)\nh.flush()\nprint(time.time())",
    );
    let written: f64 = out.trim().parse().unwrap();
    let fenced: f64 = std::fs::read_to_string(marker.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        written >= fenced,
        "the write completed at {written}, before fence-peer returned at {fenced}"
    );
    pair.wait_for(Alpha, "dstate", "UpToDate/Outdated", STATE_TIMEOUT);
    let log = pair.log(Alpha);
    assert!(log.contains("fence-peer returned 4"), "{log}");
}

#[test]
fn checksum_based_resync_sends_only_the_blocks_that_differ() {
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions {
        extra_net: "csums-alg = \"crc32c\"",
        ..PairOptions::default()
    });
    scattered_writes(&pair, 30, 0x99);
    pair.wait_status(Alpha, "nothing pending", STATE_TIMEOUT, |s| {
        counter(s, "pe") == 0
    });
    // One byte differs on beta's disk; invalidate marks all of it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(pair.disk(Beta))
            .unwrap();
        f.write_all_at(b"\xee", 17 * MIB + 3).unwrap();
    }
    pair.ok(Beta, &["invalidate", RES]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    let b = pair.status(Beta);
    assert_eq!(
        counter(&b, "resync-bytes-received"),
        4096,
        "a full resync by checksums moves only the one block that differs:\n{b:#}"
    );
    assert_replicas_identical(&pair, "after the checksum-based resync");
}

#[test]
fn an_interrupted_resync_resumes_where_it_stopped_and_runs_the_handlers() {
    require_tool("nbdsh");
    let marker = tempfile::NamedTempFile::new().unwrap();
    let m = marker.path().display();
    let pair = Pair::connected(PairOptions {
        extra_disk: "resync-rate = \"40MiB\"",
        extra_toml: format!(
            "[handlers]\nbefore-resync-target = \"echo before-$TANDEM_NODE >> {m}\"\nafter-resync-target = \"echo after-$TANDEM_NODE >> {m}\"\nout-of-sync = \"echo oos-$TANDEM_NODE >> {m}\"\n"
        ),
        ..PairOptions::default()
    });
    let size = pair.data_size();
    // The Primary overwrites the peer: a full resync at 40 MiB/s (~7 s).
    pair.ok(Alpha, &["invalidate-remote", RES]);
    pair.wait_for(Beta, "cstate", "SyncTarget", STATE_TIMEOUT);
    pair.wait_status(Beta, "a third done", SYNC_TIMEOUT, |s| {
        counter(s, "resync-bytes-received") > size / 3
    });
    // The link drops mid-resync and comes back.
    pair.ok(Beta, &["disconnect", RES]);
    let s = pair.status(Beta);
    assert_eq!(s["disk"], "Inconsistent", "{s:#}");
    let before = counter(&s, "resync-bytes-received");
    let err = pair.refused(Beta, &["primary", RES]);
    assert!(err.contains("no UpToDate data"), "{err}");
    pair.ok(Beta, &["connect", RES]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    let s = pair.status(Beta);
    let total = counter(&s, "resync-bytes-received");
    assert!(
        total < size + size / 10,
        "the resync resumed instead of starting over: {before} bytes before the drop, {total} in all, device {size}"
    );
    let log = pair.log(Beta);
    assert!(log.contains("rule peer-bitmap-is-my-current"), "{log}");
    let deadline = std::time::Instant::now() + STATE_TIMEOUT;
    loop {
        let ran = std::fs::read_to_string(marker.path()).unwrap_or_default();
        if ran.contains("before-beta") && ran.contains("after-beta") {
            assert!(!ran.contains("alpha"), "only the target runs them: {ran}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "handlers ran: {ran:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_replicas_identical(&pair, "after the resumed resync");
}

#[test]
fn a_fragmented_bitmap_travels_in_several_frames_and_resyncs_exactly() {
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions::default());
    pair.ok(Beta, &["disconnect", RES]);
    pair.wait_for(Alpha, "cstate", "WFConnection", STATE_TIMEOUT);
    // 5000 separate blocks (every other one): more runs than one Bitmap
    // frame holds (4096).
    let blocks = 5000u64;
    let out = nbdsh(
        &pair.nbd_uri(Alpha),
        &format!(
            "for i in range({blocks}):\n    h.pwrite(bytes([i % 251 + 1]) * 4096, i * 8192)\nh.flush()\nprint('DONE')"
        ),
    );
    assert!(out.contains("DONE"), "{out}");
    let s = pair.status(Alpha);
    assert_eq!(u64_field(&s, "out-of-sync-bytes"), blocks * 4096, "{s:#}");
    pair.ok(Beta, &["connect", RES]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    let s = pair.status(Alpha);
    assert_eq!(counter(&s, "resync-bytes-sent"), blocks * 4096, "{s:#}");
    assert_replicas_identical(&pair, "after resyncing a fragmented bitmap");
}

/// Client writes while the Primary is SyncSource: its resync data goes from
/// the page cache to the link with `sendfile` as the frames go out, so a
/// write may change a block between the read the core asked for and the
/// bytes on the wire. The rule that keeps it right (the write's own frame
/// follows the resync data on the one ordered link) is checked here with
/// real daemons: fio's verified writes overlap the resync all along, and
/// the replicas end identical.
#[test]
fn client_writes_during_a_full_resync_leave_identical_replicas() {
    require_tool("fio");
    let pair = Pair::connected(PairOptions {
        // Slow enough that the resync runs for the whole fio job, and not
        // held back by the controller while fio writes.
        extra_disk: "resync-rate = \"40MiB\"\nc-min-rate = \"40MiB\"",
        ..PairOptions::default()
    });
    // Something to resync everywhere: one pass of 1 MiB writes.
    let out = pair.scratch().join("fill.json");
    common::run_ok(
        common::fio_verify(&pair.scratch(), &pair.nbd_uri(Alpha), "fill")
            .args(["--rw=write", "--bs=1m", "--iodepth=4"])
            .arg(format!("--size={}", pair.data_size()))
            .arg(format!("--output={}", out.display())),
    );
    pair.ok(Beta, &["invalidate", RES]);
    pair.wait_for(Alpha, "cstate", "SyncSource", STATE_TIMEOUT);
    // Mixed sizes, so writes land inside, across and beside the 1 MiB
    // resync requests; verified as they go.
    let out = pair.scratch().join("during.json");
    common::run_ok(
        common::fio_verify(&pair.scratch(), &pair.nbd_uri(Alpha), "during")
            .args([
                "--rw=randwrite",
                "--bsrange=4k-256k",
                "--iodepth=8",
                "--time_based",
                "--runtime=3",
            ])
            .arg(format!("--size={}", pair.data_size()))
            .arg(format!("--output={}", out.display())),
    );
    let s = pair.status(Alpha);
    assert_eq!(
        s["cstate"], "SyncSource",
        "the resync must still be running when the writes stop, or they did not overlap it:\n{s:#}"
    );
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", SYNC_TIMEOUT);
    assert_replicas_identical(&pair, "after client writes during a full resync");
}
