//! Chaos soak of a real pair: the I/O driver under a seeded random schedule.
//!
//! The simulation (tandem-sim) drives only the sans-IO core; the bugs it
//! cannot see live in the driver (sendfile resync frames cut by a link drop,
//! pings starved by a busy link, ...). Here two real daemons replicate while
//! a verified fio workload writes to the Primary without a pause, and a
//! seeded random schedule disturbs the link and the Secondary: `disconnect` /
//! `connect` on either node, `invalidate-remote`, `invalidate`, `pause-sync` /
//! `resume-sync`, `kill -9`, `down` and `up` of the Secondary, `detach` /
//! `attach`, `verify`, and SIGSTOP of the Secondary for up to 3 s (its pings
//! and acks stop while its sockets stay open). Random waits separate the
//! events.
//!
//! What must hold:
//! 1. the client never sees an error and reads back what it wrote (fio's
//!    crc32c verification, fatal on a mismatch);
//! 2. the Primary stays Primary and UpToDate throughout (its state lines),
//!    and no daemon panics, reports a local disk error, a split brain or a
//!    payload checksum mismatch;
//! 3. once the schedule ends and both nodes connect, the pair reaches
//!    UpToDate/UpToDate with nothing out of sync, and the two backing files
//!    are identical over the data area.
//!
//! A second soak moves the Primary (`roles_soak`): between verified fio jobs
//! it switches over, fails over by `kill -9` of the Primary, kills the
//! Secondary and cuts the link while the Primary writes alone; no split
//! brain may be reported and the replicas must end identical. It found that
//! a promotion right after the peer's `secondary` returned was refused with
//! the peer's stale role.
//!
//! `TANDEM_SOAK_SEED` replays a run (the seed, the schedule executed and the
//! daemons' logs are printed when a test fails); `TANDEM_SOAK_SECS` sets how
//! long the chaos lasts (default 30 s for protocol C, 20 s for protocol A).
//! The seed fixes the configuration, the workload and every random draw;
//! the events drawn also depend on the connection states the daemons
//! report, so a replay takes the same turns only as far as the timing
//! repeats (in practice a failing seed usually fails again).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/pair.rs"]
mod pair;

use common::require_tool;
use pair::{
    bytes_at, first_difference, nbdsh, stderr_of, u64_field, Alpha, Beta, Node, Pair, PairOptions,
    MIB, RES, STATE_TIMEOUT,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the pair may take to settle once the chaos ends.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one fio job (a few seconds of I/O) may take at most.
const FIO_JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Size of each backing file: data area + internal metadata.
const DISK_SIZE: u64 = 96 * MIB;

// ---------------------------------------------------------------------------
// Randomness and the journal
// ---------------------------------------------------------------------------

/// splitmix64: small, seedable, good enough for schedules.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    /// An independent generator (for the workload's thread).
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

/// The seed: `TANDEM_SOAK_SEED` (decimal or 0x-hex), else from the clock.
fn soak_seed() -> u64 {
    match std::env::var("TANDEM_SOAK_SEED") {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("TANDEM_SOAK_SEED={s:?}: {e}"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// How long the chaos lasts: `TANDEM_SOAK_SECS`, else `default`.
fn soak_duration(default: u64) -> Duration {
    let secs = match std::env::var("TANDEM_SOAK_SECS") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("TANDEM_SOAK_SECS={s:?}: {e}")),
        Err(_) => default,
    };
    Duration::from_secs(secs)
}

/// What happened so far, with times; shared with the workload's thread.
#[derive(Clone)]
struct Journal {
    start: Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Journal {
    fn new() -> Journal {
        Journal {
            start: Instant::now(),
            lines: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn note(&self, what: impl AsRef<str>) {
        let line = format!(
            "{:8.3}s  {}",
            self.start.elapsed().as_secs_f64(),
            what.as_ref()
        );
        eprintln!("soak: {line}");
        // A panicking holder poisons the lock; the lines are still good.
        match self.lines.lock() {
            Ok(mut l) => l.push(line),
            Err(p) => p.into_inner().push(line),
        }
    }

    fn text(&self) -> String {
        let lines = match self.lines.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        };
        lines.join("\n")
    }
}

/// When the test fails: the seed, the schedule executed so far, and both
/// logs (tails here, whole copies kept in the temporary directory); and the
/// workload is told to stop. Dropped before the pair, whose files it reads.
struct FailureReport<'a> {
    pair: &'a Pair,
    seed: u64,
    protocol: &'static str,
    journal: Journal,
    /// The workload's stop flag: a failing test stops it too.
    stop: Arc<AtomicBool>,
}

impl Drop for FailureReport<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if !std::thread::panicking() {
            return;
        }
        let keep = std::env::temp_dir();
        let mut kept = Vec::new();
        for node in [Alpha, Beta] {
            let path = keep.join(format!(
                "tandem-soak-{}-{:#x}-{node}.log",
                self.protocol, self.seed
            ));
            if std::fs::write(&path, self.pair.log(node)).is_ok() {
                kept.push(path.display().to_string());
            }
        }
        eprintln!(
            "\n=== soak FAILED: protocol {p}, seed {s:#x} (rerun: TANDEM_SOAK_SEED={s:#x}) ===\n\
             --- schedule executed ---\n{j}\n{logs}--- whole logs kept in: {kept} ---\n\
             === soak seed {s:#x} ===",
            p = self.protocol,
            s = self.seed,
            j = self.journal.text(),
            logs = self.pair.logs(),
            kept = kept.join(", ")
        );
    }
}

// ---------------------------------------------------------------------------
// The workload: verified fio jobs, one after the other, until told to stop
// ---------------------------------------------------------------------------

/// What the workload did.
#[derive(Debug, Default)]
struct Workload {
    jobs: u64,
    written: u64,
    verified: u64,
}

/// Run one fio job to its end (write phase, then the verify phase reads
/// everything back); `Err` with the whole story if it failed.
fn fio_job(
    scratch: &Path,
    uri: &str,
    n: u64,
    rng: &mut Rng,
    data_size: u64,
) -> Result<(u64, u64), String> {
    let size = (8 + rng.below(33)) * MIB; // 8..=40 MiB
    let max_off = (data_size - size) / MIB;
    let offset = rng.below(max_off + 1) * MIB;
    let rate = rng.pick(&["", "8m", "16m", "32m"]);
    let depth = rng.pick(&[1u32, 4, 16]);
    // fio parses its seed as a signed 64-bit number.
    let seed = rng.next() >> 1;
    let name = format!("soak{n}");
    let out = scratch.join(format!("{name}.json"));
    let mut cmd = common::fio_verify(scratch, uri, &name);
    cmd.args([
        "--rw=randwrite",
        "--bssplit=4k/40:16k/15:64k/15:256k/15:1m/15",
        "--verify_backlog=64",
    ])
    .arg(format!("--randseed={seed}"))
    .arg(format!("--iodepth={depth}"))
    .arg(format!("--offset={offset}"))
    .arg(format!("--size={size}"))
    .arg(format!("--output={}", out.display()));
    if !rate.is_empty() {
        cmd.arg(format!("--rate={rate}"));
    }
    let desc = format!(
        "fio job {name}: offset {} MiB, {} MiB, iodepth {depth}, rate {}",
        offset / MIB,
        size / MIB,
        if rate.is_empty() { "unlimited" } else { rate }
    );
    let run = pair::try_run_with_timeout(&mut cmd, scratch, FIO_JOB_TIMEOUT)
        .map_err(|e| format!("{desc}: client I/O stuck? {e}"))?;
    let status = run.status;
    let json = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    if !status.success() {
        return Err(format!(
            "{desc}: failed with {status}\nstderr:\n{stderr}\nreport:\n{json}"
        ));
    }
    let v: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| format!("{desc}: report is not JSON ({e}):\n{json}\nstderr:\n{stderr}"))?;
    let job = &v["jobs"][0];
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    if job["error"] != 0 || written == 0 || verified < size {
        return Err(format!(
            "{desc}: error {}, wrote {written} bytes, verified {verified} (expected >= {size})\nstderr:\n{stderr}\nreport:\n{json}",
            job["error"]
        ));
    }
    Ok((written, verified))
}

/// Start the workload thread: fio jobs back to back until `stop`.
fn start_workload(
    pair: &Pair,
    mut rng: Rng,
    journal: Journal,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Workload, String>> {
    require_tool("fio");
    let scratch = pair.scratch();
    let uri = pair.nbd_uri(Alpha);
    let data_size = pair.data_size();
    std::thread::spawn(move || {
        let mut w = Workload::default();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let (written, verified) = fio_job(&scratch, &uri, w.jobs, &mut rng, data_size)?;
            journal.note(format!(
                "workload: fio job {} done in {:.1}s: wrote {} KiB, verified {} KiB",
                w.jobs,
                t.elapsed().as_secs_f64(),
                written / 1024,
                verified / 1024
            ));
            w.jobs += 1;
            w.written += written;
            w.verified += verified;
        }
        Ok(w)
    })
}

// ---------------------------------------------------------------------------
// The schedule
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Event {
    Disconnect(Node),
    Connect(Node),
    InvalidateRemote,
    InvalidateBeta,
    PauseSync(Node),
    ResumeSync(Node),
    Kill9Beta,
    DownBeta,
    UpBeta,
    DetachBeta,
    AttachBeta,
    VerifyAlpha,
    /// SIGSTOP beta for this many milliseconds, then SIGCONT.
    FreezeBeta(u64),
}

/// What the test knows of beta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BetaState {
    Up { detached: bool },
    Down,
}

/// The next event, weighted, among those that make sense for beta's state
/// (a refused verb is fine; a verb for a daemon that is not running is not
/// chaos, it is a test bug). The connection states just read steer it: a
/// StandAlone node is likely told to connect (the chaos is meant for a
/// pair that mostly talks); while a resync runs, what cuts into it is
/// likelier; while none runs, what starts one.
fn next_event(rng: &mut Rng, beta: BetaState, alpha_cs: &str, beta_cs: &str) -> Event {
    use Event::*;
    let syncing = alpha_cs.contains("Sync");
    // (weight while no resync runs, weight while one runs)
    let w = |idle: u64, sync: u64| if syncing { sync } else { idle };
    let connect = |cs: &str| if cs == "StandAlone" { 30 } else { 2 };
    let mut table: Vec<(u64, Event)> = vec![
        (w(4, 5), Disconnect(Alpha)),
        (connect(alpha_cs), Connect(Alpha)),
        (w(1, 6), PauseSync(Alpha)),
        (w(1, 6), ResumeSync(Alpha)),
    ];
    match beta {
        BetaState::Down => table.push((25, UpBeta)),
        BetaState::Up { detached } => {
            table.extend([
                (w(4, 5), Disconnect(Beta)),
                (connect(beta_cs), Connect(Beta)),
                (w(8, 1), InvalidateRemote),
                (w(8, 1), InvalidateBeta),
                (w(1, 6), PauseSync(Beta)),
                (w(1, 6), ResumeSync(Beta)),
                (w(3, 5), Kill9Beta),
                (w(2, 2), DownBeta),
                (w(2, 1), VerifyAlpha),
                (w(3, 5), FreezeBeta(300 + rng.below(2700))),
            ]);
            if detached {
                table.push((8, AttachBeta));
            } else {
                table.push((w(3, 1), DetachBeta));
            }
        }
    }
    let total: u64 = table.iter().map(|(w, _)| w).sum();
    let mut r = rng.below(total);
    for (w, ev) in table {
        if r < w {
            return ev;
        }
        r -= w;
    }
    unreachable!()
}

/// A verb the schedule runs: success or a refusal (exit 11) are both
/// outcomes; anything else fails the test. Returns the outcome for the
/// journal.
fn chaos_verb(pair: &Pair, node: Node, verb: &str) -> String {
    let o = pair.cli(node, &[verb, RES]);
    match o.status.code() {
        Some(0) => "ok".into(),
        Some(11) => format!("refused: {}", stderr_of(&o)),
        _ => panic!(
            "`{verb} {RES}` on {node} failed with {} (neither done nor refused)\nstderr: {}\n{}",
            o.status,
            stderr_of(&o),
            pair.logs()
        ),
    }
}

/// Carry out one event; returns the outcome for the journal.
fn run_event(pair: &Pair, ev: Event, beta: &mut BetaState, verify_ran: &mut bool) -> String {
    match ev {
        Event::Disconnect(n) => chaos_verb(pair, n, "disconnect"),
        Event::Connect(n) => chaos_verb(pair, n, "connect"),
        Event::InvalidateRemote => chaos_verb(pair, Alpha, "invalidate-remote"),
        Event::InvalidateBeta => chaos_verb(pair, Beta, "invalidate"),
        Event::PauseSync(n) => chaos_verb(pair, n, "pause-sync"),
        Event::ResumeSync(n) => chaos_verb(pair, n, "resume-sync"),
        Event::VerifyAlpha => {
            let r = chaos_verb(pair, Alpha, "verify");
            if r == "ok" {
                *verify_ran = true;
            }
            r
        }
        Event::DetachBeta => {
            let r = chaos_verb(pair, Beta, "detach");
            if r == "ok" {
                *beta = BetaState::Up { detached: true };
            }
            r
        }
        Event::AttachBeta => {
            let r = chaos_verb(pair, Beta, "attach");
            if r == "ok" {
                *beta = BetaState::Up { detached: false };
            }
            r
        }
        Event::Kill9Beta => {
            pair.kill9(Beta);
            *beta = BetaState::Down;
            "killed".into()
        }
        Event::DownBeta => {
            pair.down(Beta);
            *beta = BetaState::Down;
            "down".into()
        }
        Event::UpBeta => {
            pair.up(Beta);
            // `up` attaches the disk, whatever happened before.
            *beta = BetaState::Up { detached: false };
            "up".into()
        }
        Event::FreezeBeta(ms) => {
            pair.signal(Beta, "STOP");
            std::thread::sleep(Duration::from_millis(ms));
            pair.signal(Beta, "CONT");
            "thawed".into()
        }
    }
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/// Connect everything, resume any paused resync, attach a Diskless beta,
/// and wait until both nodes are Connected, UpToDate/UpToDate, with no
/// resync or verify running. A node that stays StandAlone (the pair
/// refuses to connect, e.g. after a split brain) fails at once.
fn settle(pair: &Pair, journal: &Journal) {
    journal.note("settle: connect both, wait for UpToDate/UpToDate");
    pair.ok(Alpha, &["connect", RES]);
    pair.ok(Beta, &["connect", RES]);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut standalone_since: Option<Instant> = None;
    loop {
        let a = pair.status(Alpha);
        let b = pair.status(Beta);
        let fail = |why: &str| -> ! {
            panic!(
                "the pair did not settle after the chaos: {why}\nalpha:\n{a:#}\nbeta:\n{b:#}\n{}",
                log_problems(pair, journal, false).join("\n\n")
            )
        };
        if a["sync"]["paused"] == true || b["sync"]["paused"] == true {
            for n in [Alpha, Beta] {
                let r = chaos_verb(pair, n, "resume-sync");
                journal.note(format!("settle: {n} resume-sync -> {r}"));
            }
        }
        if b["disk"] == "Diskless" {
            // Only a disk error detaches it on its own; the logs say why.
            let r = chaos_verb(pair, Beta, "attach");
            journal.note(format!("settle: beta is Diskless; attach -> {r}"));
        }
        if a["cstate"] == "StandAlone" || b["cstate"] == "StandAlone" {
            let since = *standalone_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(10) {
                fail("a node stays StandAlone although both were told to connect");
            }
        } else {
            standalone_since = None;
        }
        let quiet = |s: &serde_json::Value| {
            s["cstate"] == "Connected"
                && s["disk"] == "UpToDate"
                && s["peer-disk"] == "UpToDate"
                && s["sync"].is_null()
                && s["verify"].is_null()
        };
        if quiet(&a) && quiet(&b) {
            journal.note("settle: both Connected, UpToDate/UpToDate");
            return;
        }
        if Instant::now() > deadline {
            fail(&format!(
                "not Connected UpToDate/UpToDate within {SETTLE_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The state lines of alpha's log: once Primary, always Primary and
/// UpToDate.
fn alpha_state_problem(log: &str) -> Option<String> {
    let mut primary = false;
    for line in log.lines() {
        let Some(i) = line.find("state: role ") else {
            continue;
        };
        // "state: role R/P cstate C disk D/P"
        let words: Vec<&str> = line[i..].split_whitespace().collect();
        let role = words.get(2).copied().unwrap_or("");
        let disk = words.get(6).copied().unwrap_or("");
        if role.starts_with("Primary/") {
            primary = true;
        }
        if primary && !(role.starts_with("Primary/") && disk.starts_with("UpToDate/")) {
            return Some(format!(
                "alpha left Primary/UpToDate during the soak: {line}"
            ));
        }
    }
    (!primary).then(|| "alpha's log has no state line as Primary".to_string())
}

/// No panic, no local disk error, no split brain, no payload mismatch in
/// either log; alpha never went Diskless (its own disk) and, when
/// `alpha_stays_primary`, never left Primary/UpToDate. ERROR lines that are
/// none of these go to the journal.
fn log_problems(pair: &Pair, journal: &Journal, alpha_stays_primary: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for node in [Alpha, Beta] {
        let log = pair.log(node);
        for bad in [
            "panicked",
            "local disk error",
            "split brain",
            "crc mismatch",
            "cannot write the bitmap",
            "cannot mark",
            "a write reached a node without a disk",
        ] {
            let hits: Vec<&str> = log.lines().filter(|l| l.contains(bad)).collect();
            if !hits.is_empty() {
                problems.push(format!(
                    "{node}'s log says {bad:?} ({} lines), first:\n{}",
                    hits.len(),
                    hits[..hits.len().min(5)].join("\n")
                ));
            }
        }
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        if !errors.is_empty() {
            journal.note(format!(
                "{node}'s log has {} ERROR lines, e.g.:\n{}",
                errors.len(),
                errors[..errors.len().min(5)].join("\n")
            ));
        }
    }
    let alpha = pair.log(Alpha);
    if alpha_stays_primary {
        problems.extend(alpha_state_problem(&alpha));
    }
    let diskless: Vec<&str> = alpha
        .lines()
        .filter(|l| l.contains("this node is Diskless") || l.contains("disk Diskless/"))
        .collect();
    if !diskless.is_empty() {
        problems.push(format!("alpha went Diskless:\n{}", diskless.join("\n")));
    }
    problems
}

// ---------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------

/// `[net]` and `[disk]` lines drawn from the seed: resync rates (a slow
/// resync is cut by more events), the resync controller, checksum-based
/// resync and payload checksums.
fn config_lines(rng: &mut Rng) -> (&'static str, &'static str) {
    let resync_rate = rng.pick(&["10MiB", "30MiB", "100MiB", "400MiB"]);
    let c_min_rate = rng.pick(&["250KiB", "4MiB", resync_rate, resync_rate]);
    let csums = rng.pick(&["none", "crc32c"]);
    let integrity = rng.pick(&["none", "crc32c"]);
    let net = format!("csums-alg = \"{csums}\"\ndata-integrity-alg = \"{integrity}\"");
    let disk = format!("resync-rate = \"{resync_rate}\"\nc-min-rate = \"{c_min_rate}\"");
    (
        Box::leak(net.into_boxed_str()),
        Box::leak(disk.into_boxed_str()),
    )
}

/// What every soak starts from: the seed (printed, for a replay), how long
/// it runs, its generator, and a connected pair configured from the seed.
struct Start {
    seed: u64,
    duration: Duration,
    rng: Rng,
    pair: Pair,
    /// The seeded `[net]` and `[disk]` lines, for the journal.
    config: String,
}

fn start(kind: &str, protocol: &'static str, default_secs: u64) -> Start {
    require_tool("fio");
    let seed = soak_seed();
    let duration = soak_duration(default_secs);
    eprintln!(
        "soak: {kind}, protocol {protocol}, seed {seed:#x} (TANDEM_SOAK_SEED={seed:#x}), {}s",
        duration.as_secs()
    );
    let mut rng = Rng(seed);
    let (extra_net, extra_disk) = config_lines(&mut rng);
    let pair = Pair::connected(PairOptions {
        protocol,
        disk_size: DISK_SIZE,
        extra_net,
        extra_disk,
        ..PairOptions::default()
    });
    let config = format!(
        "{kind}, protocol {protocol}, data size {} bytes; [net] {}; [disk] {}",
        pair.data_size(),
        extra_net.replace('\n', ", "),
        extra_disk.replace('\n', ", ")
    );
    Start {
        seed,
        duration,
        rng,
        pair,
        config,
    }
}

fn soak(protocol: &'static str, default_secs: u64) {
    require_tool("nbdsh");
    let Start {
        seed,
        duration,
        mut rng,
        pair,
        config,
    } = start("chaos", protocol, default_secs);
    let journal = Journal::new();
    let stop = Arc::new(AtomicBool::new(false));
    let _report = FailureReport {
        pair: &pair,
        seed,
        protocol,
        journal: journal.clone(),
        stop: stop.clone(),
    };
    journal.note(config);

    let workload = start_workload(&pair, rng.fork(), journal.clone(), stop.clone());

    let mut beta = BetaState::Up { detached: false };
    let mut verify_ran = false;
    let mut steps = 0u64;
    let end = Instant::now() + duration;
    while Instant::now() < end && !workload.is_finished() {
        let wait = if rng.below(3) == 0 {
            rng.below(50)
        } else {
            rng.below(1500)
        };
        std::thread::sleep(Duration::from_millis(wait));
        let alpha_cs = pair.query(Alpha, "cstate");
        let beta_cs = match beta {
            BetaState::Up { .. } => pair.query(Beta, "cstate"),
            BetaState::Down => "down".to_string(),
        };
        let ev = next_event(&mut rng, beta, &alpha_cs, &beta_cs);
        let outcome = run_event(&pair, ev, &mut beta, &mut verify_ran);
        journal.note(format!(
            "#{steps} [alpha {alpha_cs}, beta {beta_cs}] {ev:?} -> {outcome}"
        ));
        steps += 1;
    }

    // The workload ends with its current job (verified to its end).
    journal.note(format!(
        "chaos over after {steps} events; stopping the workload"
    ));
    stop.store(true, Ordering::Relaxed);
    let w = match workload.join() {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => panic!("the client saw a failure:\n{e}"),
        Err(_) => panic!("the workload thread panicked"),
    };
    journal.note(format!(
        "workload: {} jobs, wrote {} MiB, verified {} MiB",
        w.jobs,
        w.written / MIB,
        w.verified / MIB
    ));
    assert!(w.jobs > 0, "the workload finished no job");

    // Bring everything back and let it settle.
    match beta {
        BetaState::Down => {
            pair.up(Beta);
            journal.note("settle: beta up");
        }
        BetaState::Up { detached: true } => {
            pair.ok(Beta, &["attach", RES]);
            journal.note("settle: beta attach");
        }
        BetaState::Up { detached: false } => {}
    }
    settle(&pair, &journal);
    if verify_ran {
        // Verify marks blocks that writes raced as out of sync; as in DRBD a
        // reconnect resyncs them.
        let oos = u64_field(&pair.status(Alpha), "out-of-sync-bytes");
        if oos > 0 {
            journal.note(format!(
                "settle: {oos} bytes marked by verify; disconnect + connect"
            ));
            pair.ok(Beta, &["disconnect", RES]);
            settle(&pair, &journal);
        }
    }

    // From here on every check runs, and the failure lists all that failed.
    let mut problems = Vec::new();
    let mut oos_nodes = Vec::new();
    for node in [Alpha, Beta] {
        let s = pair.status(node);
        if u64_field(&s, "out-of-sync-bytes") != 0 {
            problems.push(format!(
                "{node} still has blocks out of sync after the pair settled (Connected, UpToDate/UpToDate, no resync):\n{s:#}"
            ));
            oos_nodes.push(node);
        }
    }
    let out = nbdsh(&pair.nbd_uri(Alpha), "h.flush()\nprint('FLUSHED')");
    assert!(out.contains("FLUSHED"), "nbdsh flush printed {out:?}");
    // The server counts a client until it has seen its connection close,
    // which may come a moment after the client process exited.
    pair.wait_status(Alpha, "no NBD client", STATE_TIMEOUT, |s| {
        s["nbd-clients"] == 0
    });

    pair.down(Alpha);
    pair.down(Beta);
    for node in oos_nodes {
        problems.push(format!(
            "{node}'s on-disk bitmap after down: {}",
            dirty_runs(&pair, node)
        ));
    }
    problems.extend(log_problems(&pair, &journal, true));
    problems.extend(replica_difference(&pair));
    assert_no_problems("chaos soak", &problems, &journal);
}

// ---------------------------------------------------------------------------
// The role-change soak
// ---------------------------------------------------------------------------

/// What the role-change soak does between two verified fio jobs.
#[derive(Debug, Clone, Copy)]
enum RoleEvent {
    /// `secondary` on the Primary, `primary` on the other node.
    Switchover,
    /// `kill -9` of the Primary, the survivor promoted, the dead node
    /// started again (as Secondary).
    Failover,
    /// `kill -9` of the Secondary, started again at once.
    Kill9Secondary,
    /// `disconnect` on either node: the next jobs write on one side only.
    Disconnect(Node),
    /// `connect` on both.
    Connect,
    /// Nothing: another job.
    Pause,
}

/// Both nodes Connected, UpToDate/UpToDate, nothing to resync: the only
/// state in which moving the Primary cannot diverge the data (the operator's
/// rule; moving it otherwise is a split brain on purpose, which the other
/// tests cover).
fn in_sync(pair: &Pair, node: Node) -> bool {
    let s = pair.status(node);
    s["cstate"] == "Connected"
        && s["disk"] == "UpToDate"
        && s["peer-disk"] == "UpToDate"
        && s["sync"].is_null()
        && s["out-of-sync-bytes"] == 0
}

/// Before moving the Primary, as an HA manager does: connect, and wait up
/// to 20 s for the pair to be in sync. Whether it got there.
fn bring_in_sync(pair: &Pair, node: Node) -> bool {
    if in_sync(pair, node) {
        return true;
    }
    for n in [Alpha, Beta] {
        chaos_verb(pair, n, "connect");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if in_sync(pair, node) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The Primary moves: switch-overs, failovers by `kill -9`, a Secondary
/// killed, the link cut while the Primary writes alone, every step between
/// two verified fio jobs on whichever node is Primary. The generations
/// must tell "behind" from "diverged" through all of it: no split brain is
/// ever reported (nobody writes on both sides), every reconnect resyncs
/// towards the node that missed writes, and the replicas end identical.
fn roles_soak(protocol: &'static str, default_secs: u64) {
    let Start {
        seed,
        duration,
        mut rng,
        pair,
        config,
    } = start("roles", protocol, default_secs);
    let journal = Journal::new();
    let _report = FailureReport {
        pair: &pair,
        seed,
        protocol,
        journal: journal.clone(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    journal.note(config);
    let other = |n: Node| if n == Alpha { Beta } else { Alpha };
    let mut primary = Alpha;
    let mut moves = 0u64;
    let mut jobs = 0u64;
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let (written, verified) = fio_job(
            &pair.scratch(),
            &pair.nbd_uri(primary),
            jobs,
            &mut rng,
            pair.data_size(),
        )
        .unwrap_or_else(|e| panic!("the client on {primary} saw a failure:\n{e}"));
        jobs += 1;
        let job_node = primary;
        let ev = rng.pick(&[
            RoleEvent::Switchover,
            RoleEvent::Switchover,
            RoleEvent::Failover,
            RoleEvent::Failover,
            RoleEvent::Kill9Secondary,
            RoleEvent::Disconnect(Alpha),
            RoleEvent::Disconnect(Beta),
            RoleEvent::Connect,
            RoleEvent::Connect,
            RoleEvent::Pause,
        ]);
        let secondary = other(primary);
        let outcome = match ev {
            RoleEvent::Switchover | RoleEvent::Failover if !bring_in_sync(&pair, primary) => {
                "skipped: the pair did not get in sync within 20 s".to_string()
            }
            RoleEvent::Switchover => {
                pair.ok(primary, &["secondary", RES]);
                pair.ok(secondary, &["primary", RES]);
                primary = secondary;
                moves += 1;
                format!("{primary} is Primary")
            }
            RoleEvent::Failover => {
                pair.kill9(primary);
                // As an HA manager does: promote once the survivor has
                // seen the peer go (asked before, it answers "try again").
                pair.wait_for(secondary, "cstate", "WFConnection", STATE_TIMEOUT);
                pair.ok(secondary, &["primary", RES]);
                let dead = primary;
                primary = secondary;
                pair.up(dead);
                moves += 1;
                format!("{dead} killed, {primary} promoted, {dead} up again")
            }
            RoleEvent::Kill9Secondary => {
                pair.kill9(secondary);
                pair.up(secondary);
                format!("{secondary} killed and up again")
            }
            RoleEvent::Disconnect(n) => chaos_verb(&pair, n, "disconnect"),
            RoleEvent::Connect => {
                let a = chaos_verb(&pair, Alpha, "connect");
                let b = chaos_verb(&pair, Beta, "connect");
                format!("{a}, {b}")
            }
            RoleEvent::Pause => {
                std::thread::sleep(Duration::from_millis(rng.below(1000)));
                "paused".into()
            }
        };
        journal.note(format!(
            "job {} on {} wrote {} KiB, verified {} KiB; {ev:?} -> {outcome}",
            jobs - 1,
            job_node,
            written / 1024,
            verified / 1024
        ));
    }
    journal.note(format!("{jobs} jobs, the Primary moved {moves} times"));
    assert!(jobs > 0, "no fio job ran");
    settle(&pair, &journal);

    let mut problems = Vec::new();
    pair.wait_status(primary, "no NBD client", STATE_TIMEOUT, |s| {
        s["nbd-clients"] == 0
    });
    pair.down(primary);
    pair.down(other(primary));
    problems.extend(log_problems(&pair, &journal, false));
    problems.extend(replica_difference(&pair));
    assert_no_problems("role-change soak", &problems, &journal);
}

/// Where the stopped replicas' data areas first differ, if they do.
fn replica_difference(pair: &Pair) -> Option<String> {
    let off = first_difference(&pair.disk(Alpha), &pair.disk(Beta), 0, pair.data_size())?;
    Some(format!(
        "the replicas differ: first difference at byte {off} ({} MiB + {}): alpha {:02x?}, beta {:02x?}; {} bytes differ in the 1 MiB there",
        off / MIB,
        off % MIB,
        bytes_at(&pair.disk(Alpha), off, 16),
        bytes_at(&pair.disk(Beta), off, 16),
        differing_bytes(pair, off / MIB * MIB, MIB)
    ))
}

/// Fail with every problem found, or note that the replicas are identical.
fn assert_no_problems(what: &str, problems: &[String], journal: &Journal) {
    assert!(
        problems.is_empty(),
        "{} problem(s) after the {what}:\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
    journal.note("replicas identical");
}

/// How many bytes of `[start, start + len)` differ between the replicas.
fn differing_bytes(pair: &Pair, start: u64, len: u64) -> usize {
    let a = bytes_at(&pair.disk(Alpha), start, len as usize);
    let b = bytes_at(&pair.disk(Beta), start, len as usize);
    a.iter().zip(&b).filter(|(x, y)| x != y).count()
}

/// The out-of-sync runs of `node`'s on-disk bitmap (internal metadata: the
/// bitmap follows the data area, one bit per 4 KiB block, least significant
/// bit first), as byte ranges; for failure messages, after `down`.
fn dirty_runs(pair: &Pair, node: Node) -> String {
    let blocks = DISK_SIZE / 4096;
    let bitmap = bytes_at(
        &pair.disk(node),
        pair.data_size(),
        blocks.div_ceil(8) as usize,
    );
    let bit = |i: u64| {
        bitmap
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    };
    let mut runs = Vec::new();
    let mut i = 0;
    while i < blocks {
        if bit(i) {
            let start = i;
            while i < blocks && bit(i) {
                i += 1;
            }
            runs.push(format!("{}+{}", start * 4096, (i - start) * 4096));
        } else {
            i += 1;
        }
    }
    let n = runs.len();
    runs.truncate(20);
    format!("{n} dirty runs (offset+len): {}", runs.join(", "))
}

#[test]
fn chaos_soak_protocol_c() {
    soak("C", 30);
}

#[test]
fn chaos_soak_protocol_a() {
    soak("A", 20);
}

#[test]
fn role_change_soak_protocol_c() {
    roles_soak("C", 30);
}

#[test]
fn role_change_soak_protocol_a() {
    roles_soak("A", 20);
}
