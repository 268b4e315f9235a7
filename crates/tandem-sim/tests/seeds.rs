//! The simulation over many seeds, and proof that its checkers can fail.
//!
//! `TANDEM_SIM_SEEDS=<n>` runs n seeds instead of 1,000;
//! `TANDEM_SIM_SEED=<seed>` replays one seed and prints its whole trace.

#![allow(clippy::unwrap_used)]

use std::time::Instant;
use tandem_core::Protocol;
use tandem_sim::{run_seeds, run_traced, Check, Options, Sabotage, Stats};

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

/// The default options for `seed`, changed by `TANDEM_SIM_OPTS`
/// (`key=value,...`, see `Options::with`).
fn options(seed: u64) -> Options {
    let o = Options::for_seed(seed);
    match std::env::var("TANDEM_SIM_OPTS") {
        Ok(s) => o
            .with(&s)
            .unwrap_or_else(|e| panic!("TANDEM_SIM_OPTS: {e}")),
        Err(_) => o,
    }
}

/// Replaying needs the same options.
fn opts_hint() -> String {
    std::env::var("TANDEM_SIM_OPTS")
        .map(|o| format!(" TANDEM_SIM_OPTS={o}"))
        .unwrap_or_default()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

#[test]
fn many_seeds() {
    if let Some(seed) = env_u64("TANDEM_SIM_SEED") {
        let (r, trace) = run_traced(seed, &options(seed));
        match r {
            Ok(stats) => {
                for line in trace {
                    println!("{line}");
                }
                println!("seed {seed} passed: {stats}");
            }
            Err(f) => panic!("{f}{}", opts_hint()),
        }
        return;
    }
    let n = env_u64("TANDEM_SIM_SEEDS").unwrap_or(1_000);
    let start = Instant::now();
    let (stats, failure) = run_seeds(0..n, options, threads(), false);
    println!("{n} seeds in {:.1?}: {stats}", start.elapsed());
    if let Some(f) = failure {
        panic!("{f}{}", opts_hint());
    }
    assert_explores(&stats, n);
}

/// The schedule really explores: every kind of fault and check happened.
fn assert_explores(s: &Stats, seeds: u64) {
    if seeds < 100 {
        return;
    }
    let checks = [
        ("writes completed", s.writes_completed),
        ("flushes completed", s.flushes_completed),
        ("link drops", s.link_drops),
        ("daemon crashes", s.daemon_crashes),
        ("requests dropped by crashes", s.requests_dropped),
        ("promotions", s.promotions),
        ("demotions", s.demotions),
        ("rogue promotions", s.rogue_promotions),
        ("split brains", s.split_brains),
        ("split-brain checks", s.split_brain_checks),
        ("repairs", s.repairs),
        ("repairs by discard-my-data", s.discard_repairs),
        ("discard-my-data victims resynced", s.discarded_by_operator),
        (
            "victims decided by younger/older-primary",
            s.age_policy_victims,
        ),
        ("AL busy", s.al_busy),
        ("peer completion checks", s.peer_completion_checks),
        ("peer flush checks", s.peer_flush_checks),
        ("differing blocks compared", s.diff_blocks),
        ("blocks marked by AL replay", s.replay_marked_blocks),
        ("disks detached after errors", s.detaches),
    ];
    for (what, v) in checks {
        assert!(v > 0, "no {what} in {seeds} seeds: {s}");
    }
    assert!(
        s.writes_completed > 100 * seeds,
        "too few writes completed: {s}"
    );
}

/// A broken driver must be caught by the checker that guards what it
/// breaks, within 1,000 seeds.
fn caught(sabotage: Sabotage, expect: Check, protocol: Option<Protocol>) {
    let (_, failure) = run_seeds(
        0..1_000,
        |seed| {
            let mut o = Options::for_seed(seed);
            o.sabotage = Some(sabotage);
            if let Some(p) = protocol {
                o.protocol = p;
            }
            o
        },
        threads(),
        true,
    );
    let f = failure.unwrap_or_else(|| panic!("{sabotage:?} went unnoticed in 1,000 seeds"));
    assert_eq!(
        f.check, expect,
        "{sabotage:?} was caught by the wrong checker: {}",
        f.message
    );
    println!(
        "{sabotage:?}: caught by {} at seed {} step {}: {}",
        f.check, f.seed, f.step, f.message
    );
}

#[test]
fn skipping_mark_out_of_sync_is_caught() {
    caught(Sabotage::SkipMarkOutOfSync, Check::NothingForgotten, None);
}

#[test]
fn acking_unapplied_peer_writes_is_caught() {
    caught(
        Sabotage::AckPeerWritesUnapplied,
        Check::CompletionByProtocol,
        Some(Protocol::C),
    );
}

#[test]
fn skipping_the_activity_log_is_caught() {
    caught(Sabotage::SkipActivityLog, Check::AlBeforeData, None);
}

#[test]
fn skipping_generations_is_caught() {
    caught(
        Sabotage::SkipPersistGenerations,
        Check::GenerationsBeforeData,
        None,
    );
}

#[test]
fn a_flush_that_does_nothing_is_caught() {
    caught(Sabotage::FlushIsNoop, Check::FlushIsBarrier, None);
}

#[test]
fn losing_the_page_cache_in_a_daemon_crash_is_caught() {
    caught(
        Sabotage::DaemonCrashLosesPageCache,
        Check::AcknowledgedDataSurvives,
        None,
    );
}

/// Not a check: lists every failing seed with its checker and message, to
/// tell distinct bugs apart. `cargo test -p tandem-sim --test seeds survey
/// -- --ignored --nocapture`.
#[test]
#[ignore = "a survey tool, not a test"]
fn survey() {
    let n = env_u64("TANDEM_SIM_SEEDS").unwrap_or(300);
    let mut by_check: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for seed in 0..n {
        if let Err(f) = tandem_sim::run(seed, &options(seed)) {
            println!(
                "seed {seed} ({:?}) step {}: {}: {}",
                options(seed).protocol,
                f.step,
                f.check,
                f.message
            );
            by_check.entry(f.check.to_string()).or_default().push(seed);
        }
    }
    for (check, seeds) in by_check {
        println!(
            "{check}: {} seeds, first {:?}",
            seeds.len(),
            &seeds[..seeds.len().min(10)]
        );
    }
}

/// A seed fixes the whole run: the same trace twice.
#[test]
fn a_seed_replays_exactly() {
    for seed in [1, 2, 3] {
        let (a, ta) = run_traced(seed, &Options::for_seed(seed));
        let (b, tb) = run_traced(seed, &Options::for_seed(seed));
        assert_eq!(a.ok(), b.ok());
        assert!(ta == tb, "seed {seed}: the traces differ");
        assert!(ta.len() > 1_000, "seed {seed}: a short trace");
    }
}
