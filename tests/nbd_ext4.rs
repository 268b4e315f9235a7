//! A real kernel ext4 on a `tandem serve` export, without the kernel NBD
//! client: `nbdfuse` exposes the export as a file, and a loop mount puts ext4
//! on top of it, so every block the kernel writes travels over NBD.
//!
//! Needs root (mount, loop devices, FUSE). As non-root the test fails with a
//! clear message, unless TANDEM_SKIP_ROOT_TESTS=1 is set.
mod common;
use common::*;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 256 * 1024 * 1024;
const BIG_FILES: usize = 3;
const BIG_LEN: usize = 3 * 1024 * 1024 + 12345;
const SMALL_DIRS: usize = 8;
const SMALL_PER_DIR: usize = 40;

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// Returns false when the test should be skipped (not root, and skipping was
/// asked for); panics when not root and skipping was not asked for.
fn root_or_skip() -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("TANDEM_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping the ext4-over-NBD test: not root and TANDEM_SKIP_ROOT_TESTS=1");
        return false;
    }
    panic!(
        "the ext4-over-NBD test needs root (loop mounts and FUSE): run it as root \
         (e.g. `sudo scripts/test.sh`), or set TANDEM_SKIP_ROOT_TESTS=1 to skip it"
    );
}

/// Everything mounted or attached during the test, undone in reverse order on
/// drop, also when the test fails half-way.
struct Mounts {
    fuse_dir: PathBuf,
    mnt_dir: PathBuf,
    nbdfuse: Option<Child>,
    fuse_log: PathBuf,
    mounted: bool,
}

impl Mounts {
    fn device(&self) -> PathBuf {
        self.fuse_dir.join("nbd")
    }

    /// Start `nbdfuse FUSE_DIR URI` and wait until it serves.
    fn start_nbdfuse(&mut self, uri: &str) {
        let pidfile = self.fuse_dir.with_extension("pid");
        let _ = fs::remove_file(&pidfile);
        let log = fs::File::create(&self.fuse_log).expect("create nbdfuse log");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&self.fuse_dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn nbdfuse");
        self.nbdfuse = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if pidfile.exists() && self.device().exists() {
                break;
            }
            if let Some(st) = self
                .nbdfuse
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.nbdfuse = None;
                panic!(
                    "nbdfuse exited with {st} before serving; output:\n{}",
                    fs::read_to_string(&self.fuse_log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not become ready within 10 s; output:\n{}",
                fs::read_to_string(&self.fuse_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let len = fs::metadata(self.device())
            .expect("stat nbdfuse file")
            .len();
        assert_eq!(
            len,
            SIZE,
            "size of {} as seen through nbdfuse",
            self.device().display()
        );
    }

    /// Unmount FUSE and wait for nbdfuse to exit.
    fn stop_nbdfuse(&mut self) {
        run_ok(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir));
        if let Some(mut child) = self.nbdfuse.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(st) = child.try_wait().expect("wait nbdfuse") {
                    assert!(
                        st.success(),
                        "nbdfuse exited with {st}; output:\n{}",
                        fs::read_to_string(&self.fuse_log).unwrap_or_default()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("nbdfuse did not exit within 10 s of fusermount3 -u");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn mount(&mut self) {
        run_ok(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop"])
                .arg(self.device())
                .arg(&self.mnt_dir),
        );
        self.mounted = true;
    }

    fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mnt_dir));
        self.mounted = false;
    }

    /// Loop devices still attached to the nbdfuse file.
    fn detach_loops(&self) {
        let Ok(out) = Command::new("losetup")
            .arg("-j")
            .arg(self.device())
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((dev, _)) = line.split_once(':') {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.mnt_dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt_dir).status();
            }
        }
        if self.nbdfuse.is_some() {
            self.detach_loops();
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.fuse_dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.fuse_dir)
                    .status();
            }
            if let Some(mut child) = self.nbdfuse.take() {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if child.try_wait().ok().flatten().is_some() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn big_name(i: usize) -> String {
    format!("big-{i}.bin")
}

fn small_path(d: usize, f: usize) -> String {
    format!("dir-{d}/file-{f:03}")
}

fn small_len(d: usize, f: usize) -> usize {
    // 0 bytes up to ~9 KiB: empty files, inline-sized ones, several blocks.
    ((d * 7919 + f * 104_729) % 9300) * usize::from((d + f) % 11 != 0)
}

fn seed(d: usize, f: usize) -> u64 {
    (d as u64) << 32 | f as u64 | 0x5eed
}

fn write_files(root: &Path) {
    for i in 0..BIG_FILES {
        let mut f = fs::File::create(root.join(big_name(i))).expect("create big file");
        f.write_all(&pseudo_random(BIG_LEN, 1000 + i as u64))
            .expect("write big file");
        f.sync_all().expect("fsync big file");
    }
    for d in 0..SMALL_DIRS {
        let dir = root.join(format!("dir-{d}"));
        fs::create_dir(&dir).expect("mkdir");
        for f in 0..SMALL_PER_DIR {
            let mut file = fs::File::create(root.join(small_path(d, f))).expect("create file");
            file.write_all(&pseudo_random(small_len(d, f), seed(d, f)))
                .expect("write small file");
        }
        fs::File::open(&dir)
            .and_then(|dir| dir.sync_all())
            .expect("fsync dir");
    }
    // Overwrite the middle of one big file in place, then fsync: the
    // rewrite must win.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(root.join(big_name(0)))
        .expect("open big file");
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(1 << 20)).expect("seek");
    f.write_all(&pseudo_random(65536, 77)).expect("rewrite");
    f.sync_all().expect("fsync rewrite");
    run_ok(&mut Command::new("sync"));
}

fn expected_big(i: usize) -> Vec<u8> {
    let mut data = pseudo_random(BIG_LEN, 1000 + i as u64);
    if i == 0 {
        data[1 << 20..(1 << 20) + 65536].copy_from_slice(&pseudo_random(65536, 77));
    }
    data
}

fn verify_files(root: &Path) {
    for i in 0..BIG_FILES {
        let got = fs::read(root.join(big_name(i))).expect("read big file");
        assert!(
            got == expected_big(i),
            "{} differs after remount ({} bytes read, {BIG_LEN} expected)",
            big_name(i),
            got.len()
        );
    }
    for d in 0..SMALL_DIRS {
        let entries = fs::read_dir(root.join(format!("dir-{d}")))
            .expect("read dir")
            .count();
        assert_eq!(entries, SMALL_PER_DIR, "files in dir-{d} after remount");
        for f in 0..SMALL_PER_DIR {
            let got = fs::read(root.join(small_path(d, f))).expect("read small file");
            assert!(
                got == pseudo_random(small_len(d, f), seed(d, f)),
                "{} differs after remount",
                small_path(d, f)
            );
        }
    }
}

fn e2fsck_clean(target: &Path, when: &str) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(target)
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn {} {when}: exit {}\n{}{}",
        target.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kernel_ext4_over_nbdfuse_survives_fsck_and_remount() {
    if !root_or_skip() {
        return;
    }
    for tool in [
        "nbdfuse",
        "fusermount3",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "losetup",
    ] {
        require_tool(tool);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = backing_file(dir.path(), "disk.img", SIZE);
    let mut server = Server::start(&file, &[]);
    let fuse_dir = dir.path().join("fuse");
    let mnt_dir = dir.path().join("mnt");
    fs::create_dir(&fuse_dir).expect("mkdir fuse");
    fs::create_dir(&mnt_dir).expect("mkdir mnt");
    // Declared after the server: dropped (unmounted) before the server stops.
    let mut m = Mounts {
        fuse_dir,
        mnt_dir: mnt_dir.clone(),
        nbdfuse: None,
        fuse_log: dir.path().join("nbdfuse.log"),
        mounted: false,
    };

    m.start_nbdfuse(&server.uri());
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(m.device()));
    m.mount();
    write_files(&mnt_dir);
    m.umount();
    e2fsck_clean(&m.device(), "after the first unmount (through nbdfuse)");

    // Remount through a fresh nbdfuse (a new FUSE file, so no page cache
    // survives): the read-back really comes from the server.
    m.stop_nbdfuse();
    m.start_nbdfuse(&server.uri());
    m.mount();
    verify_files(&mnt_dir);
    m.umount();
    m.stop_nbdfuse();

    // Everything went through the server into its backing file.
    e2fsck_clean(&file, "on the server's backing file");
    assert!(
        server.is_running(),
        "tandem serve exited; log:\n{}",
        server.log()
    );
    let log = server.log();
    assert!(
        !log.contains("panicked"),
        "tandem serve panicked; log:\n{log}"
    );
}
