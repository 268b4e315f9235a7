//! End-to-end tests of `tandem serve` against hostile and broken clients.
//!
//! The clients are Python scripts in `tests/hostile/`: `hostile.py CASE` runs
//! one scenario with python3-libnbd (strict mode off, so it sends what the
//! server must refuse) and with a hand-written raw protocol client
//! (`nbdraw.py`) for what libnbd cannot send at all: unknown command types,
//! bad magic, truncated payloads, unknown handshake options and client flags.
//! The script prints one `FAIL:` line per mismatch (what, expected, got).
//!
//! After every scenario the test checks that the server process is alive,
//! never logged a panic, and still serves a fresh client correctly.
mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The export size: larger than the 32 MiB payload limit so that long TRIM and
/// WRITE_ZEROES requests fit inside it.
const SIZE: u64 = 64 * 1024 * 1024;

/// Longest a single scenario script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/hostile/hostile.py")
}

/// A Python interpreter that can `import nbd`. Debian's python3-libnbd lives
/// in the system interpreter, which is not always the first `python3` on PATH
/// (pyenv and virtualenvs shadow it).
fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        require_tool("nbdsh");
        for candidate in ["/usr/bin/python3", "python3"] {
            let ok = Command::new(candidate)
                .args(["-c", "import nbd"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return candidate.to_string();
            }
        }
        panic!("no python3 can `import nbd`: install python3-libnbd (run `sudo scripts/test.sh`)");
    })
}

/// A server on a fresh sparse backing file.
/// Fields drop in order: the server (printing its log on failure) before
/// the directory holding its log and backing file.
struct Fixture {
    server: Server,
    file: PathBuf,
    dir: tempfile::TempDir,
}

fn fixture(extra: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = backing_file(dir.path(), "disk.img", SIZE);
    let server = Server::start(&file, extra);
    Fixture { dir, file, server }
}

/// Run `hostile.py CASE` against the server; returns whether it passed and
/// its report (stdout and stderr).
fn run_case(fx: &Fixture, case: &str, extra: &[String]) -> (bool, String) {
    let out_path = fx.dir.path().join(format!("{case}.out"));
    let out = std::fs::File::create(&out_path).expect("create script log");
    let err = out.try_clone().expect("clone script log");
    let mut child = Command::new(python())
        .arg(script())
        .arg(case)
        .arg("--addr")
        .arg(&fx.server.addr)
        .arg("--uri")
        .arg(fx.server.uri())
        .args(extra)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn hostile.py");
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for hostile.py") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut report = std::fs::read_to_string(&out_path).unwrap_or_default();
    if status.is_none() {
        report.push_str(&format!(
            "\nhostile.py {case} did not finish within {SCRIPT_TIMEOUT:?} (killed)"
        ));
    }
    (status.is_some_and(|s| s.success()), report)
}

/// Run a scenario that must pass; returns its report.
fn hostile(fx: &mut Fixture, case: &str, extra: &[String]) -> String {
    let (ok, report) = run_case(fx, case, extra);
    assert!(
        ok,
        "hostile.py {case} against {} reported failures:\n{report}",
        fx.server.addr
    );
    report
}

/// The server survived: still running, no panic in its log, and a fresh
/// client can write and read back correctly.
fn assert_healthy(fx: &mut Fixture, after: &str) {
    assert!(
        fx.server.is_running(),
        "tandem serve exited after {after}; log:\n{}",
        fx.server.log()
    );
    let log = fx.server.log();
    assert!(
        !log.contains("panicked"),
        "tandem serve panicked during {after}; log:\n{log}"
    );
    let (ok, report) = run_case(fx, "healthy", &[]);
    assert!(
        ok,
        "a fresh client is not served correctly after {after}:\n{report}"
    );
}

fn scenario(case: &str) {
    let mut fx = fixture(&[]);
    hostile(&mut fx, case, &[]);
    assert_healthy(&mut fx, case);
}

#[test]
fn out_of_range_requests_get_einval_or_enospc() {
    // READ/TRIM/CACHE/BLOCK_STATUS past the end -> EINVAL, WRITE and
    // WRITE_ZEROES -> ENOSPC, also when offset+length overflows u64; simple
    // and structured replies; libnbd and raw.
    scenario("out-of-range");
}

#[test]
fn zero_length_requests_succeed_except_block_status() {
    scenario("zero-length");
}

#[test]
fn unknown_commands_and_bad_flags_get_einval_fua_is_accepted() {
    scenario("flags");
}

#[test]
fn oversized_payloads_are_discarded_with_einval_and_long_trims_succeed() {
    scenario("oversized");
}

#[test]
fn read_only_export_refuses_modifications_with_eperm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = backing_file(dir.path(), "disk.img", SIZE);
    // Known, non-zero contents so "unchanged" means something.
    std::fs::write(&file, pseudo_random(SIZE as usize, 42)).expect("fill backing file");
    let sock = dir.path().join("ro.sock");
    let listen = format!("unix:{}", sock.display());
    let server = Server::start_on(&file, &listen, &["--read-only"]);
    let mut fx = Fixture { dir, file, server };
    hostile(&mut fx, "read-only", &[]);
    assert_healthy(&mut fx, "writes to a read-only export");
    let data = std::fs::read(&fx.file).expect("read backing file");
    assert!(
        data == pseudo_random(SIZE as usize, 42),
        "the backing file of a read-only export changed"
    );
}

#[test]
fn garbage_request_magic_closes_only_that_connection() {
    scenario("bad-request-magic");
}

#[test]
fn garbage_handshake_closes_only_that_connection() {
    scenario("bad-handshake");
}

#[test]
fn disconnect_mid_payload_closes_only_that_connection() {
    scenario("mid-payload");
}

#[test]
fn handshake_unknown_option_is_unsupported_and_bad_client_flags_close() {
    scenario("handshake-options");
}

#[test]
fn concurrent_hostile_clients_do_not_disturb_each_other() {
    // Several hostile scenarios at once against one server, each with its
    // own well-behaved bystander connection.
    let mut fx = fixture(&[]);
    let cases = [
        "bad-request-magic",
        "bad-handshake",
        "mid-payload",
        "handshake-options",
        "healthy",
    ];
    let results: Vec<(String, bool, String)> = std::thread::scope(|s| {
        let fx = &fx;
        let handles: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(region, case)| {
                s.spawn(move || {
                    // Disjoint regions: each scenario reads back only its
                    // own writes.
                    let extra = ["--region".to_string(), region.to_string()];
                    let (ok, report) = run_case(fx, case, &extra);
                    (case.to_string(), ok, report)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("scenario thread"))
            .collect()
    });
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(case, _, report)| format!("--- {case} ---\n{report}"))
        .collect();
    assert!(
        failed.is_empty(),
        "concurrent hostile scenarios failed:\n{}",
        failed.join("\n")
    );
    assert_healthy(&mut fx, "concurrent hostile clients");
}

#[test]
fn sigterm_drains_in_flight_requests_then_refuses_and_exits_zero() {
    let mut fx = fixture(&[]);
    let extra = [
        "--pid".to_string(),
        fx.server.pid().to_string(),
        "--file".to_string(),
        fx.file.display().to_string(),
    ];
    let report = hostile(&mut fx, "shutdown", &extra);
    eprintln!("{report}");
    let code = fx.server.wait_exit(Duration::from_secs(5));
    assert_eq!(
        code,
        Some(0),
        "tandem serve after SIGTERM: expected exit code 0 within 5 s; log:\n{}",
        fx.server.log()
    );
    let log = fx.server.log();
    assert!(
        !log.contains("panicked"),
        "tandem serve panicked during shutdown; log:\n{log}"
    );
}
