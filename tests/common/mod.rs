//! Shared helpers for the end-to-end tests: start real `tandem` processes and
//! real client tools, and clean up after them.
//!
//! Every process a test starts is owned by a guard that kills it (by pid) when
//! the test ends, pass or fail.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the `tandem` binary cargo built for this test run.
pub fn tandem_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

/// Fail with a pointer to the test script when a client tool is missing:
/// a silently skipped test could never fail.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: run `sudo scripts/test.sh` (it installs the test tools) or install it by hand"
    );
}

/// A temporary backing file of `size` bytes (sparse).
pub fn backing_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    path
}

/// A running `tandem serve`.
pub struct Server {
    child: Child,
    /// The address the server reported, e.g. `127.0.0.1:40123` or `unix:/tmp/x.sock`.
    pub addr: String,
    stderr_log: PathBuf,
}

impl Server {
    /// Start `tandem serve PATH --listen 127.0.0.1:0 EXTRA...` and wait for its
    /// ready line.
    pub fn start(path: &Path, extra: &[&str]) -> Server {
        Self::start_on(path, "127.0.0.1:0", extra)
    }

    /// Start `tandem serve PATH --listen LISTEN EXTRA...`.
    pub fn start_on(path: &Path, listen: &str, extra: &[&str]) -> Server {
        let stderr_log = path.with_extension(format!("serve-{}.log", std::process::id()));
        let log = std::fs::File::create(&stderr_log).unwrap();
        let mut child = Command::new(tandem_bin())
            .arg("serve")
            .arg(path)
            .arg("--listen")
            .arg(listen)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn tandem serve");
        // The ready line is the only thing `serve` prints on stdout.
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        reader.read_line(&mut line).unwrap();
        let addr = match line.trim().strip_prefix("listening on ") {
            Some(a) => a.to_string(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tandem serve did not start (stdout {line:?}); stderr:\n{}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                );
            }
        };
        Server {
            child,
            addr,
            stderr_log,
        }
    }

    /// An NBD URI for libnbd-based tools (`nbdinfo`, `nbdcopy`, `nbdsh`, fio).
    pub fn uri(&self) -> String {
        match self.addr.strip_prefix("unix:") {
            Some(path) => format!("nbd+unix:///?socket={path}"),
            None => format!("nbd://{}", self.addr),
        }
    }

    /// The TCP port (panics for Unix sockets).
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// The pid, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Send a signal to the server.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Wait for the process to exit and return its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- tandem serve log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.stderr_log);
    }
}

/// fio through NBD with the options every test shares: crc32c verification
/// of every block written (fatal on mismatch), a fixed seed, JSON output.
/// Callers add the job's own options.
pub fn fio_verify(dir: &Path, uri: &str, name: &str) -> Command {
    require_tool("fio");
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir)
        .arg(format!("--name={name}"))
        .args(["--ioengine=nbd", &format!("--uri={uri}")])
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randseed=4242",
            "--output-format=json",
        ]);
    cmd
}

/// Run a command to completion; panic with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
