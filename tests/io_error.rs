//! End-to-end tests of `on-io-error`: the Secondary's backing "file" is a
//! real disk that starts failing. It is an `nbdfuse` file over `nbdkit`'s
//! file plugin with the error filter: while a trigger file exists, every
//! write to it fails with EIO, exactly as a dying disk's would reach the
//! daemon (`pwrite` returns EIO). Nothing in tandem is mocked.
//!
//! What users rely on:
//! 1. with the default `detach`, the Secondary gives up the failing disk
//!    (Diskless), the Primary keeps serving, and after the disk is repaired
//!    `attach` resyncs it and the replicas end identical;
//! 2. with `call-local-io-error` the `local-io-error` handler runs; the
//!    disk stays attached but Inconsistent (so it is never promoted over
//!    holes), and a reconnect after the repair resyncs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/pair.rs"]
mod pair;

use common::require_tool;
use pair::{assert_same_range, nbdsh, Alpha, Beta, Pair, PairOptions, MIB, RES, STATE_TIMEOUT};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A backing file behind nbdkit's error filter, mounted as a file with
/// nbdfuse. Dropped after the pair (declared before it), so the daemons
/// are down before the file goes away.
struct FailingDisk {
    dir: tempfile::TempDir,
    nbdkit: Option<Child>,
    fuse: Option<Child>,
}

impl FailingDisk {
    fn new() -> FailingDisk {
        for tool in ["nbdkit", "nbdfuse", "fusermount3"] {
            require_tool(tool);
        }
        FailingDisk {
            dir: tempfile::tempdir().unwrap(),
            nbdkit: None,
            fuse: None,
        }
    }

    fn trigger(&self) -> PathBuf {
        self.dir.path().join("fail-writes")
    }

    fn read_trigger(&self) -> PathBuf {
        self.dir.path().join("fail-reads")
    }

    fn mountpoint(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// Serve `backing` and return the path of the file that fails on
    /// demand.
    fn serve(&mut self, backing: &Path) -> PathBuf {
        let filter = [
            "--filter=error".to_string(),
            "file".into(),
            format!("file={}", backing.display()),
            "error-pwrite=EIO".into(),
            "error-pwrite-rate=100%".into(),
            format!("error-pwrite-file={}", self.trigger().display()),
            "error-pread=EIO".into(),
            "error-pread-rate=100%".into(),
            format!("error-pread-file={}", self.read_trigger().display()),
        ];
        self.serve_with(backing, &filter)
    }

    /// Serve `backing` with every read of the disk taking `rdelay` longer
    /// (nbdkit's delay filter): a slow or overloaded disk.
    fn serve_slow(&mut self, backing: &Path, rdelay: &str) -> PathBuf {
        let filter = [
            "--filter=delay".to_string(),
            "file".into(),
            format!("file={}", backing.display()),
            format!("rdelay={rdelay}"),
        ];
        self.serve_with(backing, &filter)
    }

    /// Serve `backing` with nbdkit `args` (filters, plugin and parameters)
    /// and return the path of the file nbdfuse shows.
    fn serve_with(&mut self, backing: &Path, args: &[String]) -> PathBuf {
        let port = pair::free_port();
        let log = std::fs::File::create(self.dir.path().join("nbdkit.log")).unwrap();
        self.nbdkit = Some(
            Command::new("nbdkit")
                .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
                .args(args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let uri = format!("nbd://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Command::new("nbdinfo")
            .arg("--size")
            .arg(&uri)
            .env("PATH", pair::system_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::create_dir_all(self.mountpoint()).unwrap();
        self.fuse = Some(
            Command::new("nbdfuse")
                .arg(self.mountpoint())
                .arg(&uri)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let file = self.mountpoint().join("nbd");
        let want = std::fs::metadata(backing).unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&file).map_or(true, |m| m.len() != want) {
            assert!(Instant::now() < deadline, "nbdfuse did not mount");
            std::thread::sleep(Duration::from_millis(50));
        }
        file
    }

    fn fail_writes(&self, on: bool) {
        toggle(&self.trigger(), on);
    }

    fn fail_reads(&self, on: bool) {
        toggle(&self.read_trigger(), on);
    }
}

fn toggle(trigger: &Path, on: bool) {
    if on {
        std::fs::write(trigger, b"").unwrap();
    } else {
        std::fs::remove_file(trigger).unwrap();
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        if self.fuse.is_some() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(self.mountpoint())
                .status();
        }
        for child in [self.fuse.take(), self.nbdkit.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A pair whose beta writes through `disk`: beta's backing file moves
/// behind the failing disk and a symlink takes its place. Connected, in
/// sync, alpha Primary.
fn pair_on_failing_disk(
    disk: &mut FailingDisk,
    extra_disk: &'static str,
    extra_toml: String,
) -> (Pair, PathBuf) {
    pair_with_failing(disk, Beta, extra_disk, extra_toml)
}

/// As [`pair_on_failing_disk`], with `node`'s disk behind `disk`.
fn pair_with_failing(
    disk: &mut FailingDisk,
    node: pair::Node,
    extra_disk: &'static str,
    extra_toml: String,
) -> (Pair, PathBuf) {
    let options = PairOptions {
        disk_size: 64 * MIB,
        extra_disk,
        extra_toml,
        ..PairOptions::default()
    };
    pair_with_disk(options, node, |real| disk.serve(real))
}

/// A pair made with `options` whose `node` reads and writes its backing
/// file through what `serve` makes of it (the real file moves aside and a
/// symlink takes its place). Connected, in sync, alpha Primary.
fn pair_with_disk(
    options: PairOptions,
    node: pair::Node,
    serve: impl FnOnce(&Path) -> PathBuf,
) -> (Pair, PathBuf) {
    let pair = Pair::create(options);
    let real = pair.scratch().join(format!("{node}-real.img"));
    std::fs::rename(pair.disk(node), &real).unwrap();
    let file = serve(&real);
    std::os::unix::fs::symlink(&file, pair.disk(node)).unwrap();
    pair.up(Alpha);
    pair.up(Beta);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    pair.ok(Alpha, &["new-current-uuid", RES, "--clear-bitmap"]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", STATE_TIMEOUT);
    pair.ok(Alpha, &["primary", RES]);
    pair.wait_for(Beta, "role", "Secondary/Primary", STATE_TIMEOUT);
    (pair, real)
}

/// Drop `file` from the page cache, so that the next reads reach its disk.
fn drop_cache(file: &Path) {
    let out = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Write `len` bytes of `byte` at `off` through alpha's NBD export and
/// flush; panics if the client sees an error.
fn write_through_alpha(pair: &Pair, off: u64, len: u64, byte: u8) {
    let out = nbdsh(
        &pair.nbd_uri(Alpha),
        &format!("h.pwrite(bytes([{byte}]) * {len}, {off})\nh.flush()\nprint('DONE')"),
    );
    assert!(out.contains("DONE"), "{out}");
}

fn read_through_alpha(pair: &Pair, off: u64, len: u64) -> Vec<u8> {
    let out = nbdsh(
        &pair.nbd_uri(Alpha),
        &format!("import sys\nsys.stdout.write(h.pread({len}, {off}).hex())"),
    );
    (0..out.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&out[i..i + 2], 16).unwrap())
        .collect()
}

/// With alpha demoted for the attempt, `primary` on beta is refused with
/// `why`; alpha is Primary again afterwards.
fn assert_beta_not_promotable(pair: &Pair, why: &str) {
    pair.ok(Alpha, &["secondary", RES]);
    let refused = pair.refused(Beta, &["primary", RES]);
    assert!(refused.contains(why), "{refused}");
    pair.ok(Alpha, &["primary", RES]);
}

/// Both nodes UpToDate again after the repair, then, both down, beta's
/// repaired disk equals alpha's.
fn resynced_and_identical(pair: &Pair, beta_real: &Path) {
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", Duration::from_secs(60));
    pair.wait_for(Alpha, "dstate", "UpToDate/UpToDate", STATE_TIMEOUT);
    assert_identical_after_down(pair, beta_real);
}

fn assert_identical_after_down(pair: &Pair, beta_real: &Path) {
    pair.down(Alpha);
    pair.down(Beta);
    assert_same_range(
        &pair.disk(Alpha),
        beta_real,
        0,
        pair.data_size(),
        "alpha and beta's repaired disk",
    );
}

#[test]
fn a_failing_secondary_disk_is_detached_and_attach_resyncs_it() {
    let mut disk = FailingDisk::new();
    let (pair, beta_real) = pair_on_failing_disk(&mut disk, "", String::new());
    write_through_alpha(&pair, 0, 4 * MIB, 0x11);

    disk.fail_writes(true);
    // The client never sees the Secondary's disk error.
    write_through_alpha(&pair, 8 * MIB, 4 * MIB, 0x22);
    pair.wait_for(Beta, "dstate", "Diskless/UpToDate", STATE_TIMEOUT);
    pair.wait_for(Alpha, "dstate", "UpToDate/Diskless", STATE_TIMEOUT);
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);
    let log = pair.log(Beta);
    assert!(log.contains("on-io-error = detach"), "{log}");
    assert!(log.contains("this node is Diskless"), "{log}");
    let log = pair.log(Alpha);
    assert!(log.contains("not compared (a node has no disk)"), "{log}");
    // The Primary goes on serving, writes and reads.
    write_through_alpha(&pair, 16 * MIB, 2 * MIB, 0x33);
    assert!(read_through_alpha(&pair, 8 * MIB, 4 * MIB)
        .iter()
        .all(|&b| b == 0x22));
    // A Diskless node cannot be promoted.
    assert_beta_not_promotable(&pair, "no local disk");

    disk.fail_writes(false);
    pair.ok(Beta, &["attach", RES]);
    resynced_and_identical(&pair, &beta_real);
}

#[test]
fn call_local_io_error_runs_the_handler_and_leaves_the_disk_inconsistent() {
    let mut disk = FailingDisk::new();
    let marker = tempfile::NamedTempFile::new().unwrap();
    let (pair, beta_real) = pair_on_failing_disk(
        &mut disk,
        "on-io-error = \"call-local-io-error\"",
        format!(
            "[handlers]\nlocal-io-error = \"echo $TANDEM_RESOURCE $TANDEM_NODE >> {}\"\n",
            marker.path().display()
        ),
    );
    write_through_alpha(&pair, 0, 4 * MIB, 0x44);

    disk.fail_writes(true);
    write_through_alpha(&pair, 8 * MIB, 4 * MIB, 0x55);
    pair.wait_for(Beta, "dstate", "Inconsistent/UpToDate", STATE_TIMEOUT);
    pair.wait_for(Alpha, "dstate", "UpToDate/Inconsistent", STATE_TIMEOUT);
    // More failing writes: the handler ran once for the disk, not per write.
    write_through_alpha(&pair, 20 * MIB, MIB, 0x66);
    let deadline = Instant::now() + STATE_TIMEOUT;
    while std::fs::read_to_string(marker.path()).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "local-io-error never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_to_string(marker.path()).unwrap(),
        format!("{RES} beta\n")
    );
    // Inconsistent data is not promoted without --force.
    assert_beta_not_promotable(&pair, "no UpToDate data");

    disk.fail_writes(false);
    pair.ok(Beta, &["disconnect", RES]);
    pair.ok(Beta, &["connect", RES]);
    resynced_and_identical(&pair, &beta_real);
}

/// A SyncSource whose disk fails reads: the first resync data goes out
/// with `sendfile`, which fails on the disk's side; the link drops, the
/// daemon reads through memory from then on, so after the reconnect each
/// unreadable range is answered with a negative ack instead of dropping the
/// link again. The resync ends with the target still Inconsistent, nobody
/// crashes, and once the disk reads again a reconnect completes it.
#[test]
fn read_errors_on_the_sync_source_end_the_resync_cleanly() {
    require_tool("dd");
    let mut disk = FailingDisk::new();
    let (pair, alpha_real) = pair_with_failing(&mut disk, Alpha, "", String::new());
    write_through_alpha(&pair, 0, 8 * MIB, 0x77);
    // Make alpha's next reads reach the (failing) disk, not its page cache.
    drop_cache(&pair.disk(Alpha));

    disk.fail_reads(true);
    pair.ok(Alpha, &["invalidate-remote", RES]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pair.log(Beta).contains("still out of sync") {
        assert!(
            Instant::now() < deadline,
            "the resync never ended:\n{}",
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pair.wait_for(Beta, "dstate", "Inconsistent/UpToDate", STATE_TIMEOUT);
    let log = pair.log(Alpha);
    assert!(
        log.contains("resync reads go through memory from now on"),
        "{log}"
    );
    assert!(pair.pid(Alpha).is_some_and(pair::process_alive));
    assert!(pair.pid(Beta).is_some_and(pair::process_alive));
    pair.wait_for(Alpha, "cstate", "Connected", STATE_TIMEOUT);

    disk.fail_reads(false);
    pair.ok(Beta, &["disconnect", RES]);
    pair.ok(Beta, &["connect", RES]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", Duration::from_secs(60));
    pair.down(Alpha);
    pair.down(Beta);
    assert_same_range(
        &alpha_real,
        &pair.disk(Beta),
        0,
        pair.data_size(),
        "alpha's repaired disk and beta",
    );
}

/// A SyncSource whose disk is slow: each 1 MiB resync piece takes about a
/// second to read, longer than ping-timeout. The pings must not drop the
/// link meanwhile: this node's own ping, queued behind the frame being read
/// from the disk, is only due an answer once it has left, and the answer it
/// owes the peer goes ahead of the frames still queued. (Before, both sides
/// timed out: "no ping answer within ping-timeout", and the resync started
/// over from the bitmap after each reconnect.)
#[test]
fn a_slow_sync_source_disk_keeps_the_link_up() {
    require_tool("dd");
    let mut disk = FailingDisk::new();
    // The pair pings every second with a ping-timeout of 500 ms.
    let options = PairOptions {
        disk_size: 64 * MIB,
        ..PairOptions::default()
    };
    let (pair, alpha_real) = pair_with_disk(options, Alpha, |real| disk.serve_slow(real, "200ms"));
    pair.ok(Beta, &["disconnect", RES]);
    write_through_alpha(&pair, 0, 6 * MIB, 0x5a);
    // Make alpha's resync reads reach the slow disk, not its page cache.
    drop_cache(&pair.disk(Alpha));
    let lost_before = pair.logs().matches("lost:").count();
    let start = Instant::now();
    pair.ok(Beta, &["connect", RES]);
    pair.wait_for(Beta, "dstate", "UpToDate/UpToDate", Duration::from_secs(90));
    let took = start.elapsed();
    let logs = pair.logs();
    assert_eq!(
        logs.matches("lost:").count(),
        lost_before,
        "the link dropped during a {took:?} resync from a slow disk:\n{logs}"
    );
    pair.down(Alpha);
    pair.down(Beta);
    assert_same_range(
        &alpha_real,
        &pair.disk(Beta),
        0,
        6 * MIB,
        "alpha's slow disk and beta",
    );
}
