//! End-to-end tests: `tandem serve` driven by real, independent NBD clients
//! (libnbd's `nbdinfo`/`nbdcopy`/`nbdsh`, qemu's `qemu-io`/`qemu-img`, fio's
//! `nbd` engine). Every test starts its own server on a fresh temporary backing
//! file and checks what users rely on: advertised capabilities, data written
//! through one client is read back byte-exactly by others and lands in the
//! backing file, sparse maps, Unix sockets, export names, many connections and
//! graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A backing file holding exactly `data`.
fn file_with(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// SIGTERM the server and require a clean exit (code 0) within 10 s.
fn stop(mut server: Server) {
    server.signal("TERM");
    let code = server.wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(0),
        "tandem serve did not exit with 0 within 10 s of SIGTERM; log:\n{}",
        server.log()
    );
}

/// Compare two buffers, reporting the first differing offset instead of
/// dumping megabytes.
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length {} != expected {}",
        actual.len(),
        expected.len()
    );
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(actual.len());
        panic!(
            "{what}: first difference at byte {i} (0x{i:x}): got {:02x?}, expected {:02x?}",
            &actual[i..end],
            &expected[i..end]
        );
    }
}

/// Run `qemu-io -f raw [-r] TARGET -c CMD...`; fail on a non-zero exit or any
/// failed command (pattern mismatch, I/O error).
fn qemu_io<S: AsRef<str>>(target: &str, read_only: bool, cmds: &[S]) -> String {
    require_tool("qemu-io");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    if read_only {
        cmd.arg("-r");
    }
    cmd.arg(target);
    for c in cmds {
        cmd.arg("-c").arg(c.as_ref());
    }
    let out = run_ok(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("failed") && !stderr.contains("failed"),
        "{cmd:?} reported a failure:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

/// `nbdinfo --can WHAT` / `--is WHAT`: exit 0 = true, 2 = false, anything else
/// is an error (e.g. could not connect).
fn nbdinfo_flag(uri: &str, kind: &str, what: &str) -> bool {
    require_tool("nbdinfo");
    let out = Command::new("nbdinfo")
        .args([kind, what, uri])
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "nbdinfo {kind} {what} {uri} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn nbdinfo(args: &[&str]) -> String {
    require_tool("nbdinfo");
    let out = run_ok(Command::new("nbdinfo").args(args));
    String::from_utf8(out.stdout).unwrap()
}

/// `nbdsh -u URI -c SCRIPT`. nbdsh runs `python3 -m nbd`, and the libnbd
/// Python module is installed for the system interpreter, so put /usr/bin
/// first in case another python3 (pyenv, venv) shadows it.
fn nbdsh(uri: &str, script: &str) -> String {
    require_tool("nbdsh");
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = run_ok(
        Command::new("nbdsh")
            .env("PATH", path)
            .args(["-u", uri, "-c", script]),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The number after `"key" :` (JSON, whitespace tolerant), first occurrence.
fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\"");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {pat} in JSON:\n{json}"))
        + pat.len();
    let rest = json[at..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .unwrap_or_else(|| panic!("malformed {pat} in JSON:\n{json}"))
        .trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("{pat} is not a number in JSON:\n{json}"))
}

/// The boolean after `"key" :`, first occurrence.
fn json_bool(json: &str, key: &str) -> bool {
    let pat = format!("\"{key}\"");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {pat} in JSON:\n{json}"))
        + pat.len();
    let rest = json[at..].trim_start();
    let rest = rest.strip_prefix(':').unwrap().trim_start();
    if rest.starts_with("true") {
        true
    } else if rest.starts_with("false") {
        false
    } else {
        panic!("{pat} is not a boolean in JSON:\n{json}")
    }
}

/// One extent of a block-status map.
#[derive(Debug, Clone, Copy)]
struct Extent {
    start: u64,
    len: u64,
    data: bool,
    zero: bool,
}

/// Check a map against the written ranges: the extents tile `[0, size)`, every
/// extent touching written data is data (not zero) and lies inside the written
/// range, every other extent is a hole that reads as zeroes.
fn check_map(tool: &str, map: &[Extent], size: u64, written: &[(u64, u64)], raw: &str) {
    let mut pos = 0;
    for e in map {
        assert_eq!(
            e.start, pos,
            "{tool}: extents do not tile the export:\n{raw}"
        );
        assert!(e.len > 0, "{tool}: empty extent:\n{raw}");
        let end = e.start + e.len;
        let overlap = written
            .iter()
            .find(|&&(off, len)| e.start < off + len && off < end);
        match overlap {
            Some(&(off, len)) => {
                assert!(
                    off <= e.start && end <= off + len,
                    "{tool}: extent {e:?} mixes written data [{off}, {}) with a never-written hole:\n{raw}",
                    off + len
                );
                assert!(
                    e.data && !e.zero,
                    "{tool}: extent {e:?} was written with non-zero data but is not reported as data:\n{raw}"
                );
            }
            None => assert!(
                !e.data && e.zero,
                "{tool}: extent {e:?} was never written (sparse hole) but is not reported as hole+zero:\n{raw}"
            ),
        }
        pos = end;
    }
    assert_eq!(pos, size, "{tool}: map does not cover the export:\n{raw}");
}

/// Kills (by pid) and reaps a client process when the test ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An interactive `qemu-io` session (commands on stdin, one connection held
/// open for the whole session).
struct QemuIoSession {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl QemuIoSession {
    fn open(target: &str) -> QemuIoSession {
        require_tool("qemu-io");
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        QemuIoSession {
            guard: ChildGuard(child),
            stdin,
            lines,
        }
    }

    /// Send one command and wait (up to 10 s) for an output line containing
    /// one of `expect`; returns that line.
    fn command(&mut self, cmd: &str, expect: &[&str]) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let mut seen = String::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(10)) {
                Ok(line) => {
                    if expect.iter().any(|e| line.contains(e)) {
                        return line;
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(e) => panic!(
                    "qemu-io: no line containing one of {expect:?} after {cmd:?} ({e}); output so far:\n{seen}"
                ),
            }
        }
    }

    /// Send `quit` and wait for qemu-io to exit.
    fn quit(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        for _ in 0..500 {
            if self.guard.0.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("qemu-io did not exit after quit");
    }
}

/// Apply a pattern write (`len` bytes of `byte` at `off`) to an expected image.
fn fill(buf: &mut [u8], off: u64, len: u64, byte: u8) {
    buf[off as usize..(off + len) as usize].fill(byte);
}

// ---------------------------------------------------------------------------
// 1. Capabilities as seen by nbdinfo
// ---------------------------------------------------------------------------

/// Every `nbdinfo --can` flag that libnbd 1.14 knows, with what tandem must
/// advertise on a writable export.
const CAN_FLAGS: &[&str] = &[
    "connect",
    "read",
    "write",
    "flush",
    "fua",
    "trim",
    "zero",
    "fast-zero",
    "multi-conn",
    "cache",
    "df",
    "structured-reply",
];

#[test]
fn nbdinfo_reports_advertised_capabilities_and_size() {
    let dir = tempdir();
    // Deliberately not a multiple of 4 KiB: the size must be reported exactly.
    let size = 5 * MIB + 1536;
    let data = pseudo_random(size as usize, 7);
    let path = file_with(dir.path(), "disk.img", &data);

    let server = Server::start(&path, &[]);
    let uri = server.uri();
    let wrong: Vec<&str> = CAN_FLAGS
        .iter()
        .copied()
        .filter(|what| !nbdinfo_flag(&uri, "--can", what))
        .collect();
    assert!(
        wrong.is_empty(),
        "writable export: nbdinfo --can {wrong:?} returned false (exit 2), expected true"
    );
    assert!(
        !nbdinfo_flag(&uri, "--is", "read-only"),
        "writable export: nbdinfo --is read-only returned true"
    );
    let json = nbdinfo(&["--json", &uri]);
    assert_eq!(json_u64(&json, "export-size"), size, "{json}");
    assert!(!json_bool(&json, "is_read_only"), "{json}");
    assert!(json_bool(&json, "structured"), "{json}");
    assert_eq!(
        nbdinfo(&["--size", &uri]).trim(),
        size.to_string(),
        "nbdinfo --size"
    );
    stop(server);

    // Read-only: the write-side capabilities disappear, the rest stays.
    let server = Server::start(&path, &["--read-only"]);
    let uri = server.uri();
    let write_side = ["write", "flush", "fua", "trim", "zero", "fast-zero"];
    for what in CAN_FLAGS {
        let expected = !write_side.contains(what);
        assert_eq!(
            nbdinfo_flag(&uri, "--can", what),
            expected,
            "read-only export: nbdinfo --can {what} should be {expected}"
        );
    }
    assert!(
        nbdinfo_flag(&uri, "--is", "read-only"),
        "read-only export: nbdinfo --is read-only returned false"
    );
    let json = nbdinfo(&["--json", &uri]);
    assert_eq!(json_u64(&json, "export-size"), size, "{json}");
    assert!(json_bool(&json, "is_read_only"), "{json}");

    // A write sent anyway (libnbd's client-side check disabled) must be
    // refused by the server with EPERM.
    let out = nbdsh(
        &uri,
        r#"
import errno
h.set_strict_mode(0)
try:
    h.pwrite(b"\xee" * 4096, 0)
    print("WRITE-ACCEPTED")
except nbd.Error as e:
    print("WRITE-REFUSED", errno.errorcode.get(e.errno, e.errno))
"#,
    );
    assert!(
        out.contains("WRITE-REFUSED EPERM"),
        "write to a read-only export: expected EPERM, nbdsh printed {out:?}"
    );

    // Reading works and returns the file's bytes.
    require_tool("nbdcopy");
    let out_path = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out_path));
    assert_same(
        &std::fs::read(&out_path).unwrap(),
        &data,
        "nbdcopy from read-only export",
    );
    stop(server);
    assert_same(
        &std::fs::read(&path).unwrap(),
        &data,
        "backing file after serving read-only",
    );
}

// ---------------------------------------------------------------------------
// 2. qemu-io: writes, FUA, write-zeroes, discard, flush
// ---------------------------------------------------------------------------

#[test]
fn qemu_io_write_read_fua_zero_discard_flush() {
    let dir = tempdir();
    let size = 8 * MIB;
    let initial = pseudo_random(size as usize, 11);
    let path = file_with(dir.path(), "disk.img", &initial);
    let server = Server::start(&path, &[]);
    let uri = server.uri();

    let discard = (5 * MIB + 256 * KIB, 512 * KIB);
    let unaligned = (7 * MIB + 100, 1000);
    qemu_io(
        &uri,
        false,
        &[
            format!("write -P 0xab 0 {}", MIB),
            format!("read -P 0xab 0 {}", MIB),
            format!("write -f -P 0xcd {} {}", MIB, 256 * KIB),
            format!("write -z {} {}", 2 * MIB, 512 * KIB),
            format!("write -z -u {} {}", 3 * MIB, 512 * KIB),
            format!("write -z -f {} {}", 3 * MIB + 512 * KIB, 64 * KIB),
            format!("write -P 0xef {} {}", 5 * MIB, MIB),
            format!("discard {} {}", discard.0, discard.1),
            format!("write -P 0x5a {} {}", unaligned.0, unaligned.1),
            "flush".to_string(),
            format!("read -P 0xcd {} {}", MIB, 256 * KIB),
            format!("read -P 0 {} {}", 2 * MIB, 512 * KIB),
            format!("read -P 0 {} {}", 3 * MIB, 512 * KIB),
            format!("read -P 0 {} {}", 3 * MIB + 512 * KIB, 64 * KIB),
            format!("read -P 0xef {} {}", 5 * MIB, 256 * KIB),
            format!("read -P 0xef {} {}", 5 * MIB + 768 * KIB, 256 * KIB),
            format!("read -P 0x5a {} {}", unaligned.0, unaligned.1),
        ],
    );

    // A fresh connection sees the same data.
    qemu_io(
        &uri,
        true,
        &[
            format!("read -P 0xab 0 {}", MIB),
            format!("read -P 0xcd {} {}", MIB, 256 * KIB),
            format!("read -P 0 {} {}", 2 * MIB, 512 * KIB),
            format!("read -P 0 {} {}", 3 * MIB, 576 * KIB),
            format!("read -P 0x5a {} {}", unaligned.0, unaligned.1),
        ],
    );
    stop(server);

    let mut expected = initial;
    fill(&mut expected, 0, MIB, 0xab);
    fill(&mut expected, MIB, 256 * KIB, 0xcd);
    fill(&mut expected, 2 * MIB, 512 * KIB, 0);
    fill(&mut expected, 3 * MIB, 576 * KIB, 0);
    fill(&mut expected, 5 * MIB, MIB, 0xef);
    fill(&mut expected, unaligned.0, unaligned.1, 0x5a);
    let mut actual = std::fs::read(&path).unwrap();
    // After a discard the contents of the range are unspecified; everything
    // around it must be intact.
    let (d0, d1) = (discard.0 as usize, (discard.0 + discard.1) as usize);
    actual[d0..d1].fill(0);
    expected[d0..d1].fill(0);
    assert_same(&actual, &expected, "backing file after qemu-io session");
}

// ---------------------------------------------------------------------------
// 3. nbdcopy, 4 connections, in and out
// ---------------------------------------------------------------------------

#[test]
fn nbdcopy_multi_connection_round_trip() {
    require_tool("nbdcopy");
    let dir = tempdir();
    let size = 64 * MIB;

    // Source: pseudo-random data with a sparse 8 MiB hole and 1 MiB of
    // explicit zero bytes, so the copy exercises writes and zeroing.
    let mut source = pseudo_random(size as usize, 3);
    let hole = (24 * MIB, 8 * MIB);
    let zeroes = (48 * MIB, MIB);
    fill(&mut source, hole.0, hole.1, 0);
    fill(&mut source, zeroes.0, zeroes.1, 0);
    let src_path = dir.path().join("src.img");
    {
        let f = std::fs::File::create(&src_path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&source[..hole.0 as usize], 0).unwrap();
        let after = (hole.0 + hole.1) as usize;
        f.write_all_at(&source[after..], after as u64).unwrap();
    }

    // The export starts out all 0xff, so zeroes must really be written.
    let path = file_with(dir.path(), "disk.img", &vec![0xff; size as usize]);
    let server = Server::start(&path, &[]);
    let uri = server.uri();

    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--flush"])
            .arg(&src_path)
            .arg(&uri),
    );
    let out_path = dir.path().join("out.img");
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(&uri)
            .arg(&out_path),
    );
    assert_same(
        &std::fs::read(&out_path).unwrap(),
        &source,
        "file copied out of the export with nbdcopy",
    );
    stop(server);
    assert_same(
        &std::fs::read(&path).unwrap(),
        &source,
        "backing file after nbdcopy into the export",
    );
}

// ---------------------------------------------------------------------------
// 4. fio with the nbd engine and verification
// ---------------------------------------------------------------------------

/// Run one fio job against `uri` and return its JSON output after checking
/// that it succeeded without errors.
fn fio(dir: &Path, uri: &str, name: &str, args: &[&str]) -> String {
    let out = run_ok(common::fio_verify(dir, uri, name).args(args));
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(json_u64(&json, "error"), 0, "fio job {name}:\n{json}");
    json
}

/// `io_bytes` of the `"read"`/`"write"` section of fio's JSON output.
fn fio_io_bytes(json: &str, dir: &str) -> u64 {
    let section = format!("\"{dir}\"");
    let at = json
        .find(&section)
        .unwrap_or_else(|| panic!("no {section} in fio output:\n{json}"));
    json_u64(&json[at..], "io_bytes")
}

#[test]
fn fio_random_and_sequential_verify() {
    let dir = tempdir();
    let path = backing_file(dir.path(), "disk.img", 64 * MIB);
    let server = Server::start(&path, &[]);
    let uri = server.uri();

    let json = fio(
        dir.path(),
        &uri,
        "randrw",
        &[
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=32m",
            "--offset=0",
        ],
    );
    assert!(
        fio_io_bytes(&json, "write") > 0,
        "randrw wrote nothing:\n{json}"
    );
    assert!(
        fio_io_bytes(&json, "read") > 0,
        "randrw read nothing:\n{json}"
    );

    let json = fio(
        dir.path(),
        &uri,
        "seqwrite",
        &[
            "--rw=write",
            "--bs=1m",
            "--iodepth=4",
            "--size=32m",
            "--offset=32m",
        ],
    );
    assert_eq!(fio_io_bytes(&json, "write"), 32 * MIB, "{json}");
    // The verify pass reads every block back.
    assert_eq!(fio_io_bytes(&json, "read"), 32 * MIB, "{json}");
    stop(server);
}

// ---------------------------------------------------------------------------
// 5. Block status maps of a sparse file
// ---------------------------------------------------------------------------

#[test]
fn block_status_map_of_sparse_file() {
    require_tool("qemu-img");
    let dir = tempdir();
    let size = 16 * MIB;
    let path = backing_file(dir.path(), "disk.img", size);
    let server = Server::start(&path, &[]);
    let uri = server.uri();

    let written = [(MIB, MIB), (8 * MIB, 512 * KIB), (15 * MIB, MIB)];
    let mut cmds: Vec<String> = written
        .iter()
        .enumerate()
        .map(|(i, (off, len))| format!("write -P 0x{:x} {off} {len}", 0x11 * (i + 1)))
        .collect();
    cmds.push("flush".into());
    qemu_io(&uri, false, &cmds);

    // nbdinfo --map: type bit 0 = hole, bit 1 = zero.
    let raw = nbdinfo(&["--map", "--json", &uri]);
    let map: Vec<Extent> = raw
        .split('{')
        .skip(1)
        .map(|obj| {
            let ty = json_u64(obj, "type");
            Extent {
                start: json_u64(obj, "offset"),
                len: json_u64(obj, "length"),
                data: ty & 1 == 0,
                zero: ty & 2 != 0,
            }
        })
        .collect();
    check_map("nbdinfo --map", &map, size, &written, &raw);

    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let raw = String::from_utf8(out.stdout).unwrap();
    let map: Vec<Extent> = raw
        .split('{')
        .skip(1)
        .map(|obj| Extent {
            start: json_u64(obj, "start"),
            len: json_u64(obj, "length"),
            data: json_bool(obj, "data"),
            zero: json_bool(obj, "zero"),
        })
        .collect();
    check_map("qemu-img map", &map, size, &written, &raw);

    // And the data itself.
    let mut reads: Vec<String> = written
        .iter()
        .enumerate()
        .map(|(i, (off, len))| format!("read -P 0x{:x} {off} {len}", 0x11 * (i + 1)))
        .collect();
    reads.push(format!("read -P 0 0 {MIB}"));
    reads.push(format!("read -P 0 {} {}", 2 * MIB, 6 * MIB));
    qemu_io(&uri, true, &reads);
    stop(server);
}

// ---------------------------------------------------------------------------
// 6. Unix socket
// ---------------------------------------------------------------------------

#[test]
fn unix_socket_listen_and_cleanup() {
    let dir = tempdir();
    let size = 4 * MIB;
    let path = backing_file(dir.path(), "disk.img", size);
    let sock = dir.path().join("s.sock");
    let listen = format!("unix:{}", sock.display());
    let server = Server::start_on(&path, &listen, &[]);
    assert_eq!(server.addr, listen, "ready line address");
    assert!(sock.exists(), "socket file {} missing", sock.display());
    let uri = server.uri();
    assert_eq!(uri, format!("nbd+unix:///?socket={}", sock.display()));

    assert_eq!(nbdinfo(&["--size", &uri]).trim(), size.to_string());
    assert!(nbdinfo_flag(&uri, "--can", "write"));
    qemu_io(
        &uri,
        false,
        &[
            format!("write -P 0x42 {} {}", MIB, 64 * KIB),
            "flush".to_string(),
            format!("read -P 0x42 {} {}", MIB, 64 * KIB),
        ],
    );
    qemu_io(&uri, true, &[format!("read -P 0x42 {} {}", MIB, 64 * KIB)]);

    stop(server);
    assert!(
        !sock.exists(),
        "socket file {} still exists after SIGTERM",
        sock.display()
    );
    let mut expected = vec![0u8; size as usize];
    fill(&mut expected, MIB, 64 * KIB, 0x42);
    assert_same(&std::fs::read(&path).unwrap(), &expected, "backing file");
}

// ---------------------------------------------------------------------------
// 7. Many concurrent connections
// ---------------------------------------------------------------------------

#[test]
fn sixteen_concurrent_clients() {
    const CLIENTS: u64 = 16;
    const REGION: u64 = MIB;
    const CHUNK: u64 = 128 * KIB;
    let dir = tempdir();
    let size = CLIENTS * REGION;
    let initial = pseudo_random(size as usize, 5);
    let path = file_with(dir.path(), "disk.img", &initial);
    let server = Server::start(&path, &[]);
    let uri = server.uri();

    let barrier = Arc::new(Barrier::new(CLIENTS as usize));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let uri = uri.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let base = i * REGION;
                let pattern = 0x10 + i as u8;
                // Pipelined writes (several in flight on one connection), one
                // with FUA, then flush and read the whole region back.
                let mut cmds: Vec<String> = (0..REGION / CHUNK)
                    .map(|k| {
                        let fua = if k == 3 { "-f " } else { "" };
                        format!(
                            "aio_write {fua}-P 0x{pattern:x} {} {CHUNK}",
                            base + k * CHUNK
                        )
                    })
                    .collect();
                cmds.push("aio_flush".into());
                cmds.push("flush".into());
                cmds.push(format!("read -P 0x{pattern:x} {base} {REGION}"));
                barrier.wait();
                qemu_io(&uri, false, &cmds);
            })
        })
        .collect();
    let mut failures = 0;
    for t in threads {
        if t.join().is_err() {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 0,
        "{failures} of {CLIENTS} concurrent clients failed"
    );

    let mut expected = initial;
    for i in 0..CLIENTS {
        fill(&mut expected, i * REGION, REGION, 0x10 + i as u8);
    }
    require_tool("nbdcopy");
    let out_path = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out_path));
    assert_same(
        &std::fs::read(&out_path).unwrap(),
        &expected,
        "export read back after concurrent writers",
    );
    stop(server);
    assert_same(
        &std::fs::read(&path).unwrap(),
        &expected,
        "backing file after concurrent writers",
    );
}

// ---------------------------------------------------------------------------
// 8. Export names
// ---------------------------------------------------------------------------

#[test]
fn export_names() {
    let dir = tempdir();
    let size = 2 * MIB;
    let path = backing_file(dir.path(), "disk.img", size);
    let server = Server::start(
        &path,
        &[
            "--export-name",
            "disk1",
            "--description",
            "tandem test disk",
        ],
    );
    let base = server.uri();

    let list = nbdinfo(&["--list", &base]);
    assert!(
        list.contains("export=\"disk1\":"),
        "nbdinfo --list does not show export disk1:\n{list}"
    );
    assert!(
        list.contains("description: tandem test disk"),
        "nbdinfo --list does not show the description:\n{list}"
    );

    let named = format!("{base}/disk1");
    assert_eq!(nbdinfo(&["--size", &named]).trim(), size.to_string());
    assert_eq!(nbdinfo(&["--size", &base]).trim(), size.to_string());

    // Same device under both names.
    qemu_io(&named, false, &[format!("write -P 0x77 0 {}", 64 * KIB)]);
    qemu_io(&base, true, &[format!("read -P 0x77 0 {}", 64 * KIB)]);

    let nope = format!("{base}/nope");
    let out = Command::new("nbdinfo")
        .args(["--size", &nope])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nbdinfo --size {nope} succeeded (stdout {:?}); an unknown export must be refused",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-r", &nope, "-c", "read 0 512"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-io on {nope} succeeded; an unknown export must be refused"
    );

    // SIGINT is a graceful shutdown too.
    let mut server = server;
    server.signal("INT");
    assert_eq!(
        server.wait_exit(Duration::from_secs(10)),
        Some(0),
        "tandem serve did not exit 0 after SIGINT; log:\n{}",
        server.log()
    );
}

// ---------------------------------------------------------------------------
// 9. Graceful shutdown with idle clients
// ---------------------------------------------------------------------------

/// SIGTERM, then require exit code 0 within 5 s.
fn sigterm_exits_quickly(server: &mut Server, situation: &str) {
    let start = std::time::Instant::now();
    server.signal("TERM");
    let code = server.wait_exit(Duration::from_secs(5));
    assert_eq!(
        code,
        Some(0),
        "{situation}: expected exit 0 within 5 s of SIGTERM, got {code:?} (None = still running); log:\n{}",
        server.log()
    );
    eprintln!("{situation}: exited after {:?}", start.elapsed());
}

#[test]
fn sigterm_with_idle_client_exits_cleanly() {
    let dir = tempdir();
    let path = backing_file(dir.path(), "disk.img", 4 * MIB);
    let mut server = Server::start(&path, &[]);

    // A client in transmission phase that wrote something and then idles.
    let mut session = QemuIoSession::open(&server.uri());
    let line = session.command(
        &format!("write -P 0x66 0 {}", 64 * KIB),
        &["wrote 65536/65536", "failed"],
    );
    assert!(line.contains("wrote 65536/65536"), "qemu-io: {line}");
    let line = session.command("read -P 0x66 0 512", &["read 512/512", "failed"]);
    assert!(line.contains("read 512/512"), "qemu-io: {line}");

    sigterm_exits_quickly(&mut server, "tandem serve with an idle qemu-io client");

    // The connection is gone.
    let line = session.command("read 0 512", &["read 512/512", "failed"]);
    assert!(
        line.contains("failed"),
        "qemu-io could still read after the server exited: {line}"
    );
    session.quit();

    // The acknowledged write reached the backing file.
    let data = std::fs::read(&path).unwrap();
    assert!(
        data[..64 * KIB as usize].iter().all(|&b| b == 0x66),
        "write acknowledged before SIGTERM is missing from the backing file"
    );
}

#[test]
fn sigterm_with_client_stuck_in_handshake_exits_cleanly() {
    let dir = tempdir();
    let path = backing_file(dir.path(), "disk.img", MIB);
    let mut server = Server::start(&path, &[]);

    // A client that connected, got the greeting and never answered it.
    let mut raw = TcpStream::connect(&server.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT", "server greeting");

    sigterm_exits_quickly(
        &mut server,
        "tandem serve with a client that never finished the handshake",
    );
    let mut rest = Vec::new();
    let n = raw.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes after the greeting: {rest:02x?}");
}
