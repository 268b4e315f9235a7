//! Two replicating `tandem` daemons on loopback, as an operator sets them up:
//! one resource `r0`, nodes `alpha` and `beta`, each with its own run
//! directory and sparse backing file, both driven only through the CLI.
//!
//! Include it next to `mod common;` with
//! `#[path = "common/pair.rs"] mod pair;` (it uses `crate::common`).
//!
//! Every daemon a [`Pair`] starts is stopped when the `Pair` is dropped, pass
//! or fail: first `down r0 --force`, then, for a daemon still alive, SIGKILL
//! by the pid recorded when it was started (never any other process). When
//! the test is failing, the tail of both daemons' logs is printed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use crate::common::{backing_file, require_tool, run_ok, tandem_bin};
use std::os::unix::fs::FileExt;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// The resource every test uses.
pub const RES: &str = "r0";

/// How long any single CLI command may take before the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a connected, idle pair may take to reach a state.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// The two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Node {
    Alpha,
    Beta,
}

pub use Node::{Alpha, Beta};

impl Node {
    pub fn name(self) -> &'static str {
        match self {
            Alpha => "alpha",
            Beta => "beta",
        }
    }

    pub fn peer(self) -> Node {
        match self {
            Alpha => Beta,
            Beta => Alpha,
        }
    }

    fn index(self) -> usize {
        match self {
            Alpha => 0,
            Beta => 1,
        }
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to configure a pair.
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// `"A"`, `"B"` or `"C"`.
    pub protocol: &'static str,
    /// `net.shared-secret` in alpha's and in beta's configuration. When they
    /// differ, each node gets its own configuration directory (the files are
    /// otherwise identical).
    pub secrets: [Option<&'static str>; 2],
    /// Size of each sparse backing file (data area + internal metadata).
    pub disk_size: u64,
    /// More `[net]` lines for both nodes.
    pub extra_net: &'static str,
    /// `[disk]` lines for both nodes.
    pub extra_disk: &'static str,
    /// Appended to both nodes' files (e.g. a `[handlers]` table).
    pub extra_toml: String,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            protocol: "C",
            secrets: [Some("tandem-test-secret"); 2],
            disk_size: 300 * MIB,
            extra_net: "",
            extra_disk: "",
            extra_toml: String::new(),
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Run a command with its stdout and stderr going to files (not pipes: a
/// daemon that `up` leaves behind may inherit them and would keep a pipe open
/// forever), kill it and fail the test if it takes longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, scratch: &Path, timeout: Duration) -> Output {
    try_run_with_timeout(cmd, scratch, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_with_timeout`] that reports a timeout instead of panicking (for
/// cleanup, which must not panic while a failing test unwinds).
pub fn try_run_with_timeout(
    cmd: &mut Command,
    scratch: &Path,
    timeout: Duration,
) -> Result<Output, String> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let out_path = scratch.join(format!("cmd-{n}.stdout"));
    let err_path = scratch.join(format!("cmd-{n}.stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok(output)
}

/// `stdout`, trimmed.
pub fn stdout_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `stderr`, trimmed.
pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !stat[i + 1..].trim_start().starts_with(['Z', 'X']),
            None => true,
        },
        Err(_) => false,
    }
}

/// Whether process `pid` runs the `tandem` binary of this test run (guards
/// the fallback kill against a recycled pid).
fn runs_tandem(pid: u32) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let exe = exe.to_string_lossy();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
    let ours = std::fs::canonicalize(tandem_bin())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| tandem_bin().to_string());
    exe == ours
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A two-node resource on loopback.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub opts: PairOptions,
    /// Replication ports of alpha and beta.
    pub repl_ports: [u16; 2],
    /// NBD ports of alpha and beta.
    pub nbd_ports: [u16; 2],
    data_size: u64,
    /// Nodes on which `up` succeeded and no `down` or kill happened since.
    running: RefCell<BTreeSet<Node>>,
    /// Every daemon pid this pair started (read from the pid file after `up`).
    started_pids: RefCell<Vec<u32>>,
}

impl Pair {
    /// Configuration, backing files and `create-md` on both nodes; no daemon
    /// is started.
    pub fn create(opts: PairOptions) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        for d in ["alpha/run", "beta/run", "scratch"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let mut pair = Pair {
            repl_ports: [free_port(), free_port()],
            nbd_ports: [free_port(), free_port()],
            dir,
            opts,
            data_size: 0,
            running: RefCell::new(BTreeSet::new()),
            started_pids: RefCell::new(Vec::new()),
        };
        for node in [Alpha, Beta] {
            let etc = pair.config_dir(node);
            std::fs::create_dir_all(&etc).unwrap();
            std::fs::write(etc.join(format!("{RES}.toml")), pair.config_text(node)).unwrap();
            backing_file(pair.dir.path(), &format!("{node}.img"), pair.opts.disk_size);
        }
        for node in [Alpha, Beta] {
            pair.ok(node, &["create-md", RES]);
        }
        let size_of = |node| {
            let json = pair.ok(node, &["dump-md", RES, "--json"]);
            let v: serde_json::Value = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("dump-md --json on {node}: {e}:\n{json}"));
            v["data-size"]
                .as_u64()
                .unwrap_or_else(|| panic!("dump-md --json on {node}: no data-size:\n{json}"))
        };
        let (a, b) = (size_of(Alpha), size_of(Beta));
        assert_eq!(
            a, b,
            "alpha and beta have equal disks but data sizes differ"
        );
        assert!(a > 0 && a <= pair.opts.disk_size, "data-size {a}");
        pair.data_size = a;
        pair
    }

    /// The usual starting point: both nodes up and Connected, the fresh pair
    /// marked in sync without a resync (`new-current-uuid --clear-bitmap`),
    /// alpha Primary and serving NBD.
    pub fn connected(opts: PairOptions) -> Pair {
        let pair = Pair::create(opts);
        pair.up(Alpha);
        pair.up(Beta);
        pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
        pair.wait_for(Beta, "cstate", "Connected", STATE_TIMEOUT);
        pair.ok(Alpha, &["new-current-uuid", RES, "--clear-bitmap"]);
        pair.wait_for(Alpha, "dstate", "UpToDate/UpToDate", STATE_TIMEOUT);
        pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", STATE_TIMEOUT);
        pair.ok(Alpha, &["primary", RES]);
        pair.wait_for(Alpha, "role", "Primary/Secondary", STATE_TIMEOUT);
        pair.wait_for(Beta, "role", "Secondary/Primary", STATE_TIMEOUT);
        pair
    }

    /// The configuration file `node` reads.
    pub fn config_text(&self, node: Node) -> String {
        let d = self.dir.path().display();
        let protocol = self.opts.protocol;
        let secret = match self.opts.secrets[node.index()] {
            Some(s) => format!("shared-secret = \"{s}\"\n"),
            None => String::new(),
        };
        let [ra, rb] = self.repl_ports;
        let [na, nb] = self.nbd_ports;
        let extra = self.opts.extra_net;
        let disk = self.opts.extra_disk;
        let tail = &self.opts.extra_toml;
        format!(
            r#"protocol = "{protocol}"

[net]
{secret}connect-int = "1s"
ping-int = "1s"
ping-timeout = "500ms"
timeout = "2s"
{extra}

[disk]
{disk}

[[node]]
name = "alpha"
address = "127.0.0.1:{ra}"
disk = "{d}/alpha.img"
meta-disk = "internal"
nbd = "127.0.0.1:{na}"

[[node]]
name = "beta"
address = "127.0.0.1:{rb}"
disk = "{d}/beta.img"
meta-disk = "internal"
nbd = "127.0.0.1:{nb}"

{tail}
"#
        )
    }

    /// `etc/`, or `etc-NODE/` when the nodes' secrets differ.
    pub fn config_dir(&self, node: Node) -> PathBuf {
        if self.opts.secrets[0] == self.opts.secrets[1] {
            self.dir.path().join("etc")
        } else {
            self.dir.path().join(format!("etc-{node}"))
        }
    }

    pub fn run_dir(&self, node: Node) -> PathBuf {
        self.dir.path().join(node.name()).join("run")
    }

    /// The backing file of `node`.
    pub fn disk(&self, node: Node) -> PathBuf {
        self.dir.path().join(format!("{node}.img"))
    }

    /// A scratch directory for the test's own files.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    /// Size of the replicated data area (the export size), from `dump-md`.
    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    /// The NBD URI of `node`'s export.
    pub fn nbd_uri(&self, node: Node) -> String {
        format!("nbd://127.0.0.1:{}/{RES}", self.nbd_ports[node.index()])
    }

    /// Everything `node`'s daemon logged so far.
    pub fn log(&self, node: Node) -> String {
        std::fs::read_to_string(self.run_dir(node).join(format!("{RES}.log"))).unwrap_or_default()
    }

    /// The tails of both logs, for failure messages.
    pub fn logs(&self) -> String {
        [Alpha, Beta]
            .iter()
            .map(|&n| match self.log(n) {
                log if log.is_empty() => format!("--- {n} log: empty or missing ---\n"),
                log => format!("--- {n} log (tail) ---\n{}\n", tail(&log, 60)),
            })
            .collect()
    }

    /// The pid in `node`'s pid file, if there is one.
    pub fn pid(&self, node: Node) -> Option<u32> {
        std::fs::read_to_string(self.run_dir(node).join(format!("{RES}.pid")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// `tandem --config-dir .. --node NODE --run-dir .. ARGS...`, with a
    /// timeout.
    pub fn cli(&self, node: Node, args: &[&str]) -> Output {
        self.cli_timeout(node, args, CLI_TIMEOUT)
    }

    fn cli_timeout(&self, node: Node, args: &[&str], timeout: Duration) -> Output {
        run_with_timeout(&mut self.cli_command(node, args), &self.scratch(), timeout)
    }

    fn cli_command(&self, node: Node, args: &[&str]) -> Command {
        let mut cmd = Command::new(tandem_bin());
        cmd.arg("--config-dir")
            .arg(self.config_dir(node))
            .arg("--node")
            .arg(node.name())
            .arg("--run-dir")
            .arg(self.run_dir(node))
            .args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }

    /// Run a verb that must succeed; returns its stdout.
    pub fn ok(&self, node: Node, args: &[&str]) -> String {
        let o = self.cli(node, args);
        assert!(
            o.status.success(),
            "`tandem {args:?}` on {node} failed with {}\nstdout: {}\nstderr: {}\n{}",
            o.status,
            stdout_of(&o),
            stderr_of(&o),
            self.logs()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run a verb that must be refused: non-zero exit and exactly one line
    /// on stderr, which is returned.
    pub fn refused(&self, node: Node, args: &[&str]) -> String {
        let o = self.cli(node, args);
        let err = stderr_of(&o);
        assert!(
            !o.status.success(),
            "`tandem {args:?}` on {node} succeeded but must be refused\nstdout: {}\nstderr: {err}",
            stdout_of(&o)
        );
        assert_eq!(
            err.lines().count(),
            1,
            "`tandem {args:?}` on {node}: a refusal is one line on stderr, got:\n{err}"
        );
        err
    }

    /// `up r0` on `node`; records the daemon's pid for cleanup.
    pub fn up(&self, node: Node) {
        // Mark the node as started before `up` can fail, so that cleanup
        // covers a daemon that started but did not report success.
        self.running.borrow_mut().insert(node);
        let o = self.cli(node, &["up", RES]);
        if let Some(pid) = self.pid(node) {
            self.started_pids.borrow_mut().push(pid);
        }
        assert!(
            o.status.success(),
            "`up {RES}` on {node} failed with {}\nstdout: {}\nstderr: {}\n{}",
            o.status,
            stdout_of(&o),
            stderr_of(&o),
            self.logs()
        );
        assert!(
            self.pid(node).is_some(),
            "`up` on {node} returned but there is no pid file {}",
            self.run_dir(node).join(format!("{RES}.pid")).display()
        );
    }

    /// `down r0` on `node` (must succeed), then wait until its daemon has
    /// exited.
    pub fn down(&self, node: Node) {
        let pid = self.pid(node);
        self.ok(node, &["down", RES]);
        self.running.borrow_mut().remove(&node);
        if let Some(pid) = pid {
            self.wait_exited(node, pid, STATE_TIMEOUT);
        }
    }

    /// SIGKILL `node`'s daemon (by the pid in its pid file, which must be a
    /// daemon this pair started) and wait until it is gone.
    pub fn kill9(&self, node: Node) {
        let pid = self.pid(node).expect("no pid file");
        assert!(
            self.started_pids.borrow().contains(&pid),
            "pid file of {node} names {pid}, which this test did not start"
        );
        let st = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -KILL {pid} failed");
        self.running.borrow_mut().remove(&node);
        self.wait_exited(node, pid, Duration::from_secs(5));
    }

    /// Send signal `sig` (`"STOP"`, `"CONT"`, ...) to `node`'s daemon (by the
    /// pid in its pid file, which must be a daemon this pair started).
    pub fn signal(&self, node: Node, sig: &str) {
        let pid = self.pid(node).expect("no pid file");
        assert!(
            self.started_pids.borrow().contains(&pid),
            "pid file of {node} names {pid}, which this test did not start"
        );
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {pid} failed");
    }

    fn wait_exited(&self, node: Node, pid: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while process_alive(pid) {
            assert!(
                Instant::now() < deadline,
                "{node}'s daemon (pid {pid}) still runs {timeout:?} after down/kill\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Poll `VERB r0` on `node` until `pred(stdout)` holds; returns that
    /// stdout. Fails with the last output and both logs after `timeout`.
    pub fn wait_until(
        &self,
        node: Node,
        verb: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let o = self.cli(node, &[verb, RES]);
            let out = stdout_of(&o);
            if o.status.success() && pred(&out) {
                return out;
            }
            if Instant::now() > deadline {
                panic!(
                    "`{verb} {RES}` on {node}: expected {what} within {timeout:?}; last exit {}, stdout {out:?}, stderr {:?}\n{}",
                    o.status,
                    stderr_of(&o),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Poll `VERB r0` on `node` until it prints exactly `expected`.
    pub fn wait_for(&self, node: Node, verb: &str, expected: &str, timeout: Duration) {
        self.wait_until(node, verb, &format!("{expected:?}"), timeout, |out| {
            out == expected
        });
    }

    /// `VERB r0` on `node` (must succeed), trimmed stdout.
    pub fn query(&self, node: Node, verb: &str) -> String {
        self.ok(node, &[verb, RES]).trim().to_string()
    }

    /// This resource's object from `status r0 --json` on `node`.
    pub fn status(&self, node: Node) -> serde_json::Value {
        let out = self.ok(node, &["status", RES, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("status --json on {node} is not JSON ({e}):\n{out}"));
        let res = v["resources"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == RES))
            .unwrap_or_else(|| panic!("status --json on {node}: no resource {RES}:\n{out}"))
            .clone();
        assert_eq!(res["node"], node.name(), "status --json on {node}:\n{out}");
        res
    }

    /// Poll `status r0 --json` on `node` until `pred` holds; returns it.
    pub fn wait_status(
        &self,
        node: Node,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(node);
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "status --json on {node}: expected {what} within {timeout:?}; last:\n{s:#}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let running: Vec<Node> = self.running.borrow().iter().copied().collect();
        for node in running {
            let mut down = self.cli_command(node, &["down", RES, "--force"]);
            let _ = try_run_with_timeout(&mut down, &self.scratch(), Duration::from_secs(15));
        }
        // Whatever is still alive (a hung `down`, a failed test): SIGKILL,
        // but only daemons this pair started (recorded after `up`, or named
        // by a pid file in this pair's own fresh run directories) and only
        // if the pid still runs the tandem binary.
        let mut pids = self.started_pids.borrow().clone();
        pids.extend([Alpha, Beta].iter().filter_map(|&n| self.pid(n)));
        for pid in pids {
            if process_alive(pid) && runs_tandem(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

// Comparing replicas and reading status (shared by the end-to-end tests).

/// PATH with /usr/bin first: Debian's libnbd Python module is installed for
/// the system interpreter, which another python3 (pyenv, venv) may shadow.
pub fn system_path() -> String {
    format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default())
}

/// The first offset in `[start, end)` at which the two files differ (a file
/// that ends early reads as differing there).
pub fn first_difference(a: &Path, b: &Path, start: u64, end: u64) -> Option<u64> {
    const CHUNK: u64 = 4 * MIB;
    let fa = std::fs::File::open(a).unwrap();
    let fb = std::fs::File::open(b).unwrap();
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut pos = start;
    while pos < end {
        let n = CHUNK.min(end - pos) as usize;
        let ra = read_up_to(&fa, &mut ba[..n], pos);
        let rb = read_up_to(&fb, &mut bb[..n], pos);
        if ra != rb || ba[..ra] != bb[..rb] {
            let i = ba[..ra.min(rb)]
                .iter()
                .zip(&bb[..ra.min(rb)])
                .position(|(x, y)| x != y)
                .unwrap_or(ra.min(rb));
            return Some(pos + i as u64);
        }
        pos += n as u64;
    }
    None
}

/// Read into `buf` at `off` until it is full or the file ends; the count.
pub fn read_up_to(f: &std::fs::File, buf: &mut [u8], off: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}

/// `len` bytes of `path` at `off`, zero-padded past its end (for messages).
pub fn bytes_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    let n = read_up_to(&f, &mut buf, off);
    buf.truncate(n);
    buf
}

/// Fail with the first differing offset (and the bytes there) if the files
/// differ anywhere in `[start, end)`.
pub fn assert_same_range(a: &Path, b: &Path, start: u64, end: u64, what: &str) {
    if let Some(off) = first_difference(a, b, start, end) {
        panic!(
            "{what}: {} and {} differ in [{start}, {end}); first difference at byte {off} (0x{off:x}, {} MiB): {:02x?} vs {:02x?}",
            a.display(),
            b.display(),
            off / MIB,
            bytes_at(a, off, 16),
            bytes_at(b, off, 16)
        );
    }
}

/// `nbdsh -u URI -c SCRIPT`, which must succeed; its stdout.
pub fn nbdsh(uri: &str, script: &str) -> String {
    require_tool("nbdsh");
    let out = run_ok(
        Command::new("nbdsh")
            .env("PATH", system_path())
            .args(["-u", uri, "-c", script]),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn u64_field(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status --json: {key} is not a number:\n{v:#}"))
}

pub fn counter(v: &serde_json::Value, key: &str) -> u64 {
    v["counters"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("status --json: counters.{key} is not a number:\n{v:#}"))
}
