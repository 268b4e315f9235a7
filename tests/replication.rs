//! End-to-end tests of replication: two real `tandem` daemons (`alpha` and
//! `beta`) on loopback, set up and driven only through the CLI as an operator
//! or an HA manager would (`create-md`, `up`, `new-current-uuid
//! --clear-bitmap`, `primary`, ...), with real NBD clients (`nbdcopy`, fio's
//! `nbd` engine, `nbdinfo`, libnbd's Python binding) writing to the Primary's
//! export, and the two backing files compared byte for byte afterwards.
//!
//! What users rely on:
//! 1. every acknowledged write reaches the peer, under protocols A, B and C;
//! 2. the role rules: one Primary, a Secondary refuses to export, no demotion
//!    under a connected client;
//! 3. a wrong shared secret never connects and says so in both logs;
//! 4. losing the Secondary (`kill -9`) does not disturb the Primary's clients,
//!    and the Primary tracks what the peer missed;
//! 5. under protocol C, data acknowledged by the Primary survives its
//!    `kill -9` on the Secondary, which can take over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/pair.rs"]
mod pair;

use common::{pseudo_random, require_tool};
use pair::{
    assert_same_range, counter, nbdsh, run_with_timeout, stderr_of, stdout_of, u64_field, Alpha,
    Beta, Pair, PairOptions, MIB, RES, STATE_TIMEOUT,
};

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const KIB: u64 = 1024;

/// Long-running client tools (a 256 MiB copy through a debug build) may take
/// this long before the test gives up on them.
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A file of `size` bytes (sparse) holding `parts` (offset, bytes).
fn image_file(path: &Path, size: u64, parts: &[(u64, &[u8])]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in parts {
        f.write_all_at(data, *off).unwrap();
    }
}

/// `nbdinfo ARGS...`, unchecked.
fn nbdinfo(args: &[&str]) -> std::process::Output {
    require_tool("nbdinfo");
    // LIBNBD_DEBUG: libnbd prints a server's refusal reason only there.
    Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .args(args)
        .output()
        .unwrap()
}

/// An NBD flush on a fresh connection.
fn nbd_flush(uri: &str) {
    let out = nbdsh(uri, "h.flush()\nprint('FLUSHED')");
    assert!(out.contains("FLUSHED"), "nbdsh flush printed {out:?}");
}

/// The common fio options: nbd engine, crc32c verification of every block
/// written, JSON report to `out`.
fn fio_command(dir: &Path, uri: &str, name: &str, out: &Path, args: &[&str]) -> Command {
    let mut cmd = common::fio_verify(dir, uri, name);
    cmd.arg(format!("--output={}", out.display())).args(args);
    cmd
}

/// Check a finished fio run: exit 0, job error 0, something written and
/// read back (verified). Returns the job's JSON.
fn check_fio(name: &str, status: std::process::ExitStatus, stderr: &str, out: &Path) -> String {
    let json = std::fs::read_to_string(out).unwrap_or_default();
    assert!(
        status.success(),
        "fio job {name} failed with {status}\nstderr:\n{stderr}\nreport:\n{json}"
    );
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("fio job {name}: report is not JSON ({e}):\n{json}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio job {name}:\n{json}");
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let read = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(written > 0, "fio job {name} wrote nothing:\n{json}");
    assert!(read > 0, "fio job {name} verified nothing:\n{json}");
    eprintln!("fio {name}: wrote {written} bytes, verified {read} bytes");
    json
}

/// Run fio to completion and check it.
fn fio(pair: &Pair, uri: &str, name: &str, args: &[&str]) -> String {
    let out = pair.scratch().join(format!("fio-{name}.json"));
    let o = run_with_timeout(
        &mut fio_command(&pair.scratch(), uri, name, &out, args),
        &pair.scratch(),
        TOOL_TIMEOUT,
    );
    check_fio(name, o.status, &stderr_of(&o), &out)
}

/// Kills (by pid) and reaps a client process the test started, when the test
/// ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Forward a child's output lines to a channel.
fn lines_of(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A libnbd client (Python) that keeps one connection open and takes
/// commands on stdin: `write OFF LEN BYTE`, `read OFF LEN BYTE` (checks the
/// pattern), `quit` (NBD_CMD_DISC). It prints `connected` once the handshake
/// is done and `ok` (or `mismatch`) after each command.
struct HeldClient {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Receiver<String>,
}

const HELD_CLIENT: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "quit":
        h.shutdown()
        print("bye", flush=True)
        break
    off, n, b = int(cmd[1]), int(cmd[2]), int(cmd[3], 0)
    if cmd[0] == "write":
        h.pwrite(bytes([b]) * n, off)
        h.flush()
        print("ok", flush=True)
    elif cmd[0] == "read":
        print("ok" if h.pread(n, off) == bytes([b]) * n else "mismatch", flush=True)
"#;

impl HeldClient {
    fn connect(uri: &str) -> HeldClient {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", HELD_CLIENT, uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start /usr/bin/python3 (python3-libnbd)");
        let stdin = child.stdin.take();
        let lines = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        let mut client = HeldClient {
            guard: ChildGuard(child),
            stdin,
            lines,
            stderr,
        };
        client.expect_line("connected", &format!("connecting to {uri}"));
        client
    }

    fn expect_line(&mut self, expected: &str, after: &str) {
        match self.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line == expected => {}
            other => {
                std::thread::sleep(Duration::from_millis(200));
                let err: Vec<String> = self.stderr.try_iter().collect();
                panic!(
                    "NBD client: expected {expected:?} after {after}, got {other:?}; stderr:\n{}",
                    err.join("\n")
                );
            }
        }
    }

    fn command(&mut self, cmd: &str, expected: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        self.expect_line(expected, cmd);
    }

    /// Disconnect cleanly and wait for the process to exit.
    fn quit(mut self) {
        self.command("quit", "bye");
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.guard.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "NBD client did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Every write reaches the peer (protocols A, B, C)
// ---------------------------------------------------------------------------

/// 256 MiB of pseudo-random data through nbdcopy (4 connections), a fio
/// random-write job with verification on top, an NBD flush; once the Primary
/// reports nothing pending and nothing out of sync, both nodes go down
/// cleanly and the two backing files must be identical over the data area,
/// and hold what the clients wrote.
fn writes_reach_the_peer(protocol: &'static str) {
    require_tool("nbdcopy");
    require_tool("fio");
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions {
        protocol,
        // Protocol B's run also checksums every replicated write on the link.
        extra_net: if protocol == "B" {
            "data-integrity-alg = \"crc32c\""
        } else {
            ""
        },
        ..PairOptions::default()
    });
    let size = pair.data_size();
    let uri = pair.nbd_uri(Alpha);

    // The export is the data area.
    let o = nbdinfo(&["--size", &uri]);
    assert!(
        o.status.success(),
        "nbdinfo --size {uri} on the Primary failed: {}",
        stderr_of(&o)
    );
    assert_eq!(stdout_of(&o), size.to_string(), "export size vs data-size");
    assert_eq!(
        pair.status(Alpha)["protocol"],
        protocol,
        "status --json protocol"
    );

    // Source: 256 MiB of pseudo-random bytes, the rest of the export a hole
    // (nbdcopy writes zeroes there).
    const RANDOM: u64 = 256 * MIB;
    assert!(size > RANDOM, "data area {size} smaller than 256 MiB");
    let seed = 0x7a6d_0000 + u64::from(protocol.as_bytes()[0]);
    let src = pair.scratch().join("source.img");
    image_file(
        &src,
        size,
        &[(0, &pseudo_random(RANDOM as usize, seed)[..])],
    );
    let started = Instant::now();
    let o = run_with_timeout(
        Command::new("nbdcopy")
            .args(["--connections=4", "--flush"])
            .arg(&src)
            .arg(&uri),
        &pair.scratch(),
        TOOL_TIMEOUT,
    );
    assert!(
        o.status.success(),
        "nbdcopy into the Primary failed with {}: {}\n{}",
        o.status,
        stderr_of(&o),
        pair.logs()
    );
    eprintln!("protocol {protocol}: nbdcopy took {:?}", started.elapsed());

    // Random writes, mixed sizes, in the middle of the random data; fio reads
    // every block back and checks it.
    let (fio_off, fio_len) = (96 * MIB, 64 * MIB);
    fio(
        &pair,
        &uri,
        "randwrite",
        &[
            "--rw=randwrite",
            "--bssplit=4k/50:64k/50",
            "--iodepth=16",
            &format!("--offset={fio_off}"),
            &format!("--size={fio_len}"),
        ],
    );
    nbd_flush(&uri);

    // Quiesced and in sync: nothing pending on the link, no application
    // request outstanding, nothing out of sync, both disks UpToDate.
    pair.wait_status(
        Alpha,
        "Connected, UpToDate/UpToDate, out-of-sync-bytes 0, pe 0, ap 0, no NBD clients",
        Duration::from_secs(120),
        |s| {
            s["cstate"] == "Connected"
                && s["disk"] == "UpToDate"
                && s["peer-disk"] == "UpToDate"
                && u64_field(s, "out-of-sync-bytes") == 0
                && counter(s, "pe") == 0
                && counter(s, "ap") == 0
                && u64_field(s, "nbd-clients") == 0
        },
    );

    // Clean shutdown, as an operator does it: demote, then down both.
    pair.ok(Alpha, &["secondary", RES]);
    pair.down(Alpha);
    pair.down(Beta);

    let (a, b) = (pair.disk(Alpha), pair.disk(Beta));
    assert_same_range(
        &a,
        &b,
        0,
        size,
        &format!("protocol {protocol}: Primary and Secondary backing files"),
    );
    // What the clients wrote is there (so the comparison above did not pass
    // on two untouched disks): the source outside the fio range.
    assert_same_range(
        &src,
        &a,
        0,
        fio_off,
        &format!("protocol {protocol}: nbdcopy data on the Primary"),
    );
    assert_same_range(
        &src,
        &a,
        fio_off + fio_len,
        size,
        &format!("protocol {protocol}: nbdcopy data on the Primary"),
    );

    // The metadata of both agrees that nothing is out of sync.
    for node in [Alpha, Beta] {
        let json = pair.ok(node, &["dump-md", RES, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["out-of-sync-blocks"], 0,
            "protocol {protocol}: dump-md on {node} after a clean down:\n{json}"
        );
    }
}

#[test]
fn protocol_a_writes_reach_the_peer() {
    writes_reach_the_peer("A");
}

#[test]
fn protocol_b_writes_reach_the_peer() {
    writes_reach_the_peer("B");
}

#[test]
fn protocol_c_writes_reach_the_peer() {
    writes_reach_the_peer("C");
}

// ---------------------------------------------------------------------------
// 2. Role rules
// ---------------------------------------------------------------------------

#[test]
fn role_rules_one_primary_secondary_refuses_export_no_demotion_in_use() {
    require_tool("nbdinfo");
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions::default());
    let size = pair.data_size().to_string();

    // One Primary: beta may not promote while alpha is Primary.
    let err = pair.refused(Beta, &["primary", RES]);
    assert!(
        err.contains("refusing to promote: peer is Primary"),
        "primary on beta while alpha is Primary: {err}"
    );
    assert_eq!(pair.query(Beta, "role"), "Secondary/Primary");
    assert_eq!(pair.query(Alpha, "role"), "Primary/Secondary");

    // The Secondary accepts the connection but refuses the export with
    // NBD_REP_ERR_POLICY; libnbd prints the server's reason text only in
    // its debug output, which is where an operator would look.
    require_tool("nbdinfo");
    let o = Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .args(["--size", &pair.nbd_uri(Beta)])
        .output()
        .unwrap();
    assert!(
        stderr_of(&o).contains("server policy prevents"),
        "the Secondary must refuse with NBD_REP_ERR_POLICY: {}",
        stderr_of(&o)
    );
    assert!(
        !o.status.success(),
        "nbdinfo against the Secondary succeeded: {}",
        stdout_of(&o)
    );
    assert!(
        stderr_of(&o).contains("Secondary"),
        "nbdinfo against the Secondary: the refusal should say Secondary: {}",
        stderr_of(&o)
    );
    let o = nbdinfo(&["--size", &pair.nbd_uri(Alpha)]);
    assert!(o.status.success(), "nbdinfo on alpha: {}", stderr_of(&o));
    assert_eq!(stdout_of(&o), size);

    // A connected client pins the role: no demotion, no down.
    let mut client = HeldClient::connect(&pair.nbd_uri(Alpha));
    client.command(&format!("write {} {} 0x5a", MIB, 64 * KIB), "ok");
    pair.wait_status(Alpha, "nbd-clients 1", STATE_TIMEOUT, |s| {
        s["nbd-clients"] == 1
    });
    let err = pair.refused(Alpha, &["secondary", RES]);
    assert!(
        err.contains("device is in use by 1 NBD clients"),
        "secondary with a connected client: {err}"
    );
    let err = pair.refused(Alpha, &["down", RES]);
    assert!(
        err.contains("device is in use by 1 NBD clients"),
        "down with a connected client: {err}"
    );
    assert_eq!(pair.query(Alpha, "role"), "Primary/Secondary");
    assert_eq!(pair.query(Alpha, "cstate"), "Connected");
    // ... and the client is still served.
    client.command(&format!("read {} {} 0x5a", MIB, 64 * KIB), "ok");
    client.command(&format!("write {} {} 0xa5", 2 * MIB, 4 * KIB), "ok");

    // Once it is gone, demotion works, at once: an HA script demotes the
    // moment its client has exited, while the server may still be closing
    // that connection.
    client.quit();
    pair.ok(Alpha, &["secondary", RES]);
    // The hardest case: a client that leaves with writes in flight (it
    // crashed, or an HA script killed it), which the server still finishes
    // on both nodes before the connection ends.
    for round in 0..5u8 {
        pair.ok(Alpha, &["primary", RES]);
        nbdsh(
            &pair.nbd_uri(Alpha),
            &format!(
                "buf = b'{}' * {MIB}\nfor i in range(16): h.aio_pwrite(buf, {} + i * {MIB})",
                (b'a' + round) as char,
                4 * MIB,
            ),
        );
        pair.ok(Alpha, &["secondary", RES]);
    }
    assert_eq!(pair.query(Alpha, "role"), "Secondary/Secondary");
    pair.wait_for(Beta, "role", "Secondary/Secondary", STATE_TIMEOUT);

    // Planned switch-over: beta promotes, exports the same data, and now
    // alpha is the one refused.
    pair.ok(Beta, &["primary", RES]);
    assert_eq!(pair.query(Beta, "role"), "Primary/Secondary");
    pair.wait_for(Alpha, "role", "Secondary/Primary", STATE_TIMEOUT);
    let out = nbdsh(
        &pair.nbd_uri(Beta),
        &format!(
            "print(h.pread({}, {}) == b'\\x5a' * {}, h.pread({}, {}) == b'\\xa5' * {})",
            64 * KIB,
            MIB,
            64 * KIB,
            4 * KIB,
            2 * MIB,
            4 * KIB
        ),
    );
    assert_eq!(
        out.trim(),
        "True True",
        "data written through alpha, read through beta after switch-over"
    );
    let o = nbdinfo(&["--size", &pair.nbd_uri(Alpha)]);
    assert!(
        !o.status.success() && stderr_of(&o).contains("Secondary"),
        "nbdinfo against alpha, now Secondary: exit {}, stderr {}",
        o.status,
        stderr_of(&o)
    );
    let err = pair.refused(Alpha, &["primary", RES]);
    assert!(
        err.contains("refusing to promote: peer is Primary"),
        "primary on alpha while beta is Primary: {err}"
    );
}

// ---------------------------------------------------------------------------
// 3. Wrong shared secret
// ---------------------------------------------------------------------------

#[test]
fn wrong_shared_secret_never_connects_and_both_logs_say_why() {
    const SECRETS: [&str; 2] = ["alpha-says-open-sesame", "beta-says-swordfish"];
    let pair = Pair::create(PairOptions {
        secrets: [Some(SECRETS[0]), Some(SECRETS[1])],
        ..PairOptions::default()
    });
    assert_ne!(pair.config_dir(Alpha), pair.config_dir(Beta));
    pair.up(Alpha);
    pair.up(Beta);

    // Both sides log the authentication failure and name the setting.
    let deadline = Instant::now() + STATE_TIMEOUT;
    let says_why = |log: &str| {
        log.lines()
            .any(|l| l.contains("authentication") && l.contains("shared-secret"))
    };
    while !(says_why(&pair.log(Alpha)) && says_why(&pair.log(Beta))) {
        assert!(
            Instant::now() < deadline,
            "after {STATE_TIMEOUT:?}, not both logs have a line with `authentication` and `shared-secret`\n{}",
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // For 3 s (several connect-int rounds), neither ever reports Connected.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for node in [Alpha, Beta] {
            let cstate = pair.query(node, "cstate");
            assert_ne!(
                cstate,
                "Connected",
                "{node} connected with a peer whose shared-secret differs\n{}",
                pair.logs()
            );
            let role = pair.query(node, "role");
            assert!(
                role.ends_with("/Unknown"),
                "{node} knows the role of an unauthenticated peer: {role}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // The secret itself is never written to a log.
    for node in [Alpha, Beta] {
        let log = pair.log(node);
        for secret in SECRETS {
            assert!(
                !log.contains(secret),
                "{node}'s log contains a shared-secret in clear text"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 4. The Secondary dies under load
// ---------------------------------------------------------------------------

#[test]
fn kill_9_of_the_secondary_under_load_primary_keeps_serving() {
    require_tool("fio");
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions::default());
    let uri = pair.nbd_uri(Alpha);

    // 8 s of verified random writes (verify_backlog: fio reads back and checks
    // while writing, since a time-based write phase leaves no time after it).
    let report = pair.scratch().join("fio-under-failure.json");
    let fio_err = pair.scratch().join("fio-under-failure.stderr");
    let mut fio_cmd = fio_command(
        &pair.scratch(),
        &uri,
        "under-failure",
        &report,
        &[
            "--rw=randwrite",
            "--bssplit=4k/50:64k/50",
            "--iodepth=16",
            "--offset=0",
            "--size=64m",
            "--time_based",
            "--runtime=8",
            "--verify_backlog=512",
        ],
    );
    let fio = fio_cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&fio_err).unwrap())
        .spawn()
        .unwrap();
    let mut fio = ChildGuard(fio);

    // Writes are flowing (at least 1 MiB written locally) ...
    pair.wait_status(Alpha, "dw >= 1024 KiB", STATE_TIMEOUT, |s| {
        counter(s, "dw") >= 1024
    });
    assert!(
        fio.0.try_wait().unwrap().is_none(),
        "fio ended before the failure was injected"
    );
    // ... when the Secondary dies.
    pair.kill9(Beta);

    // The Primary notices while fio keeps writing.
    pair.wait_until(Alpha, "cstate", "not Connected", STATE_TIMEOUT, |c| {
        c != "Connected"
    });

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = fio.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "fio still running 120 s after an 8 s job\n{}",
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&fio_err).unwrap_or_default();
    check_fio("under-failure", status, &stderr, &report);

    // Still Primary, waiting for the peer to come back, peer disk unknown,
    // and it knows what the peer missed.
    assert!(
        pair.query(Alpha, "role").starts_with("Primary/"),
        "alpha's role after losing beta: {}",
        pair.query(Alpha, "role")
    );
    pair.wait_for(Alpha, "cstate", "WFConnection", STATE_TIMEOUT);
    pair.wait_until(
        Alpha,
        "dstate",
        "UpToDate/DUnknown or UpToDate/Outdated",
        STATE_TIMEOUT,
        |d| d == "UpToDate/DUnknown" || d == "UpToDate/Outdated",
    );
    let s = pair.status(Alpha);
    assert!(
        u64_field(&s, "out-of-sync-bytes") > 0,
        "alpha wrote for seconds without its peer but reports nothing out of sync:\n{s:#}"
    );

    // The Primary keeps serving new clients.
    let out = nbdsh(
        &uri,
        &format!(
            "h.pwrite(b'\\x3c' * 65536, {o}, nbd.CMD_FLAG_FUA)\nh.flush()\nprint(h.pread(65536, {o}) == b'\\x3c' * 65536)",
            o = 100 * MIB
        ),
    );
    assert_eq!(
        out.trim(),
        "True",
        "write+read on the Primary after the failure"
    );
}

// ---------------------------------------------------------------------------
// 5. Protocol C: acknowledged data survives the Primary's death
// ---------------------------------------------------------------------------

#[test]
fn protocol_c_acknowledged_writes_survive_kill_9_of_the_primary() {
    require_tool("nbdsh");
    require_tool("nbdcopy");
    let pair = Pair::connected(PairOptions {
        protocol: "C",
        ..PairOptions::default()
    });
    let size = pair.data_size();

    // Known data: 16 MiB at the start, 8 MiB ending at the last byte of the
    // export, 4 KiB with FUA at a 512-aligned (not 4 KiB-aligned) offset.
    let big = pseudo_random((16 * MIB) as usize, 0xc0ffee);
    let tail = pseudo_random((8 * MIB) as usize, 0xdecade);
    let small = vec![0xa5u8; (4 * KIB) as usize];
    let (big_off, tail_off, small_off) = (0, size - 8 * MIB, 100 * MIB + 512);
    let data_path = pair.scratch().join("payload.bin");
    std::fs::write(&data_path, [&big[..], &tail[..]].concat()).unwrap();
    let out = nbdsh(
        &pair.nbd_uri(Alpha),
        &format!(
            r#"
data = open({path:?}, "rb").read()
h.pwrite(data[:{b}], {big_off})
h.pwrite(data[{b}:], {tail_off})
h.pwrite(b"\xa5" * {s}, {small_off}, nbd.CMD_FLAG_FUA)
h.flush()
print("WRITTEN")
"#,
            path = data_path.display().to_string(),
            b = big.len(),
            s = small.len(),
        ),
    );
    assert!(out.contains("WRITTEN"), "nbdsh printed {out:?}");
    let expected = pair.scratch().join("expected.img");
    image_file(
        &expected,
        size,
        &[(big_off, &big), (tail_off, &tail), (small_off, &small)],
    );

    // The Primary dies; the Secondary notices and takes over without
    // --force: its data is UpToDate and its peer is gone.
    pair.kill9(Alpha);
    pair.wait_until(Beta, "cstate", "not Connected", STATE_TIMEOUT, |c| {
        c != "Connected"
    });
    pair.ok(Beta, &["primary", RES]);
    let role = pair.query(Beta, "role");
    assert!(role.starts_with("Primary/"), "beta after promotion: {role}");
    let dstate = pair.query(Beta, "dstate");
    assert!(
        dstate.starts_with("UpToDate/"),
        "beta after promotion: {dstate}"
    );

    // Everything alpha acknowledged is on beta, read through beta's export.
    let copy: PathBuf = pair.scratch().join("beta-export.img");
    let o = run_with_timeout(
        Command::new("nbdcopy").arg(pair.nbd_uri(Beta)).arg(&copy),
        &pair.scratch(),
        TOOL_TIMEOUT,
    );
    assert!(
        o.status.success(),
        "nbdcopy out of beta's export failed: {}\n{}",
        stderr_of(&o),
        pair.logs()
    );
    assert_eq!(
        std::fs::metadata(&copy).unwrap().len(),
        size,
        "beta's export size"
    );
    assert_same_range(
        &expected,
        &copy,
        0,
        size,
        "data acknowledged by alpha (protocol C) read back through beta's export",
    );
}

/// `tandem demo`, the README's first command: two nodes come up connected
/// and UpToDate, the Primary's export answers a real client with the
/// advertised size, and on exit both daemons are gone and the temporary
/// directory is removed.
#[test]
fn demo_serves_the_primary_and_cleans_up() {
    require_tool("nbdinfo");
    let mut child = Command::new(common::tandem_bin())
        .args(["demo", "--size-mib", "64", "--seconds", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut dir = None;
    let mut uri = None;
    let mut transcript = String::new();
    let mut statuses = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        transcript.push_str(&line);
        transcript.push('\n');
        if let Some(rest) = line.strip_prefix("starting two nodes of resource r0 in ") {
            dir = Some(PathBuf::from(rest.trim()));
        }
        if uri.is_none() {
            if let Some(i) = line.find("nbd://") {
                let u: String = line[i..].split_whitespace().next().unwrap().to_string();
                let o = Command::new("nbdinfo")
                    .args(["--size", &u])
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "nbdinfo {u}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                let size: u64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
                assert!(
                    size > 60 << 20 && size < 64 << 20,
                    "a 64 MiB disk minus its metadata, got {size}"
                );
                uri = Some(u);
            }
        }
        if line.contains("alpha: Primary/Secondary Connected UpToDate/UpToDate")
            && line.contains("beta: Secondary/Primary Connected UpToDate/UpToDate")
        {
            statuses += 1;
        }
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "demo failed: {err}\n{transcript}");
    assert!(uri.is_some(), "no NBD address printed:\n{transcript}");
    assert!(
        statuses >= 1,
        "no live status line showed the pair in sync:\n{transcript}"
    );
    let dir = dir.expect("the demo names its directory");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

/// What mkfs does first: discard and zero the whole device in one request
/// each. Both succeed, reach the peer, and leave the replicas identical.
#[test]
fn whole_device_trim_and_zero_are_replicated() {
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions {
        disk_size: 600 * MIB,
        ..PairOptions::default()
    });
    let size = pair.data_size();
    let uri = pair.nbd_uri(Alpha);
    let script = format!(
        "import os\nh.pwrite(os.urandom(1 << 20), 0)\nh.pwrite(os.urandom(1 << 20), {})\n\
         h.trim({size}, 0)\nh.pwrite(b'x' * 4096, 8192)\nh.zero({size}, 0)\n\
         h.pwrite(b'y' * 4096, 1 << 20)\nh.flush()\nprint('DONE')",
        size - (1 << 20)
    );
    assert!(nbdsh(&uri, &script).contains("DONE"));
    pair.wait_status(Alpha, "nothing pending", Duration::from_secs(30), |s| {
        let c = &s["counters"];
        c["pe"] == 0 && c["ap"] == 0 && s["out-of-sync-bytes"] == 0
    });
    pair.ok(Alpha, &["secondary", RES]);
    pair.down(Alpha);
    pair.down(Beta);
    let a = std::fs::read(pair.disk(Alpha)).unwrap();
    let b = std::fs::read(pair.disk(Beta)).unwrap();
    let n = size as usize;
    assert!(
        a[..n] == b[..n],
        "replicas differ after whole-device trim/zero"
    );
    assert!(a[..n].iter().all(|&x| x == 0 || x == b'y'));
    assert!(a[(1 << 20)..(1 << 20) + 4096].iter().all(|&x| x == b'y'));
}

/// `detach` / `attach` on the Secondary, as when replacing its disk: the
/// Primary keeps serving and marks what beta misses; the detached disk is
/// released (its metadata can be dumped); after `attach` the pair
/// reconnects and finds beta behind (Outdated), never silently UpToDate.
/// The Primary cannot detach.
#[test]
fn detach_and_attach_the_secondary_disk() {
    require_tool("nbdsh");
    let pair = Pair::connected(PairOptions::default());
    let err = pair.refused(Alpha, &["detach", RES]);
    assert!(err.contains("Primary"), "{err}");
    pair.ok(Beta, &["detach", RES]);
    pair.wait_for(Beta, "dstate", "Diskless/UpToDate", STATE_TIMEOUT);
    pair.wait_for(Alpha, "dstate", "UpToDate/Diskless", STATE_TIMEOUT);
    // Released: the metadata verbs may open it again.
    let dump = pair.ok(Beta, &["dump-md", RES]);
    assert!(dump.contains("clean"), "{dump}");
    let uri = pair.nbd_uri(Alpha);
    assert!(nbdsh(
        &uri,
        "h.pwrite(b'z' * 65536, 1 << 20)\nh.flush()\nprint('OK')"
    )
    .contains("OK"));
    let s = pair.status(Alpha);
    assert_eq!(s["out-of-sync-bytes"], 65536, "{s:#}");
    pair.ok(Beta, &["attach", RES]);
    // The reattached disk is behind: it is resynced, only the block written
    // meanwhile travels, and the replicas end identical.
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", STATE_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    let s = pair.status(Alpha);
    assert_eq!(s["out-of-sync-bytes"], 0, "{s:#}");
    assert_eq!(counter(&s, "resync-bytes-sent"), 65536, "{s:#}");
    pair.down(Beta);
    assert_same_range(
        &pair.disk(Alpha),
        &pair.disk(Beta),
        0,
        pair.data_size(),
        "after the resync of the reattached disk",
    );
    pair.up(Beta);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", STATE_TIMEOUT);
    let err = pair.refused(Beta, &["primary", RES]);
    assert!(err.contains("peer is Primary"), "{err}");
}

/// `events`: the current state first (`exists` … `exists-end`), then one
/// JSON line per change — what an HA manager's monitor reads.
#[test]
fn events_dump_then_stream_changes() {
    let pair = Pair::connected(PairOptions::default());
    let now = pair.ok(Alpha, &["events", RES, "--now"]);
    let lines: Vec<serde_json::Value> = now
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{now}");
    assert_eq!(lines[0]["type"], "exists");
    assert_eq!(lines[0]["resource"], RES);
    assert_eq!(lines[0]["role"], "Primary");
    assert_eq!(lines[0]["peer-role"], "Secondary");
    assert_eq!(lines[0]["cstate"], "Connected");
    assert_eq!(lines[0]["disk"], "UpToDate");
    assert_eq!(lines[0]["peer-disk"], "UpToDate");
    assert_eq!(lines[1]["type"], "exists-end");

    let mut stream = Command::new(common::tandem_bin())
        .arg("--config-dir")
        .arg(pair.config_dir(Alpha))
        .args(["--node", "alpha", "--run-dir"])
        .arg(pair.run_dir(Alpha))
        .args(["events", RES])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = stream.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> serde_json::Value {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no events line ({what})"));
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next("exists")["type"], "exists");
    assert_eq!(next("exists-end")["type"], "exists-end");
    pair.ok(Alpha, &["secondary", RES]);
    let change = next("role change");
    assert_eq!(change["type"], "change", "{change}");
    assert_eq!(change["role"], "Secondary", "{change}");
    assert!(change["time"].as_str().unwrap().ends_with('Z'), "{change}");
    let _ = stream.kill();
    let _ = stream.wait();
}
