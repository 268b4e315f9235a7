//! `tandem create-md | dump-md | wipe-md` as an operator runs them: real
//! processes, a resource configuration on disk, backing files of real size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{backing_file, tandem_bin};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// A configuration directory with resource `r0`: alpha's disk is
    /// `alpha.img` with `meta` as its meta-disk, beta's `beta.img`, internal.
    fn new(alpha_meta: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            r#"protocol = "C"

[disk]
al-extents = 127

[[node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "{d}/alpha.img"
meta-disk = "{alpha_meta}"
nbd = "127.0.0.1:10809"

[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "{d}/beta.img"
meta-disk = "internal"
nbd = "127.0.0.1:10810"
"#
        );
        std::fs::write(dir.path().join("r0.toml"), conf).unwrap();
        Env { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, node: &str, args: &[&str]) -> Output {
        Command::new(tandem_bin())
            .arg("--config-dir")
            .arg(self.dir.path())
            .arg("--node")
            .arg(node)
            .args(args)
            .output()
            .unwrap()
    }
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The one-line error of a failed command.
fn fails(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    err
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).unwrap()
}

#[test]
fn create_dump_refuse_force_wipe_internal() {
    let env = Env::new("internal");
    backing_file(env.dir.path(), "beta.img", 256 * MIB);
    let out = ok(&env.run("beta", &["create-md", "r0"]));
    assert!(out.contains("created internal metadata"), "{out}");

    let d = json(&env.run("beta", &["dump-md", "r0", "--json"]));
    let md_size = d["md-size"].as_u64().unwrap();
    assert_eq!(d["data-size"].as_u64().unwrap() + md_size, 256 * MIB);
    assert_eq!(d["placement"], "internal");
    assert_eq!(d["current-uuid"], "0x0000000000000004");
    assert_eq!(d["al-extents"], 127);
    assert_eq!(d["clean-shutdown"], true);
    assert_eq!(d["out-of-sync-blocks"], 0);
    let uuid = d["device-uuid"].as_str().unwrap().to_string();

    let text = ok(&env.run("beta", &["dump-md", "r0"]));
    assert!(text.contains("placement:       internal"), "{text}");
    assert!(text.contains(&format!("device-uuid:     {uuid}")), "{text}");

    // Existing metadata is never overwritten by accident.
    let err = fails(&env.run("beta", &["create-md", "r0"]));
    assert!(
        err.contains("refusing to overwrite existing metadata") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        json(&env.run("beta", &["dump-md", "r0", "--json"]))["device-uuid"],
        uuid.as_str()
    );
    ok(&env.run("beta", &["create-md", "r0", "--force"]));
    let d2 = json(&env.run("beta", &["dump-md", "r0", "--json"]));
    assert_ne!(
        d2["device-uuid"],
        uuid.as_str(),
        "--force writes new metadata"
    );

    ok(&env.run("beta", &["wipe-md", "r0"]));
    let err = fails(&env.run("beta", &["dump-md", "r0"]));
    assert!(err.contains("no tandem metadata found"), "{err}");
    // Wiping again is harmless; creating works without --force.
    assert!(ok(&env.run("beta", &["wipe-md", "r0"])).contains("nothing to wipe"));
    ok(&env.run("beta", &["create-md", "r0"]));
}

#[test]
fn external_meta_disk_is_grown_and_the_data_keeps_its_size() {
    let env = Env::new("META");
    let meta = env.path("alpha.meta");
    let conf = std::fs::read_to_string(env.path("r0.toml")).unwrap();
    std::fs::write(
        env.path("r0.toml"),
        conf.replace("META", meta.to_str().unwrap()),
    )
    .unwrap();
    backing_file(env.dir.path(), "alpha.img", 64 * MIB);
    std::fs::File::create(&meta).unwrap();
    ok(&env.run("alpha", &["create-md", "r0"]));
    let d = json(&env.run("alpha", &["dump-md", "r0", "--json"]));
    assert_eq!(d["placement"], "external");
    assert_eq!(d["data-size"].as_u64().unwrap(), 64 * MIB);
    assert!(std::fs::metadata(&meta).unwrap().len() >= d["md-size"].as_u64().unwrap());
    assert_eq!(
        std::fs::metadata(env.path("alpha.img")).unwrap().len(),
        64 * MIB
    );
}

fn corrupt(path: &Path, at_from_end: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.write_all_at(bytes, len - at_from_end).unwrap();
}

#[test]
fn errors_are_one_clear_line() {
    let env = Env::new("internal");
    // Too small for metadata plus 1 MiB of data.
    backing_file(env.dir.path(), "beta.img", MIB);
    let err = fails(&env.run("beta", &["create-md", "r0"]));
    assert!(
        err.contains("beta.img") && err.contains("too small"),
        "{err}"
    );

    // Missing disk.
    std::fs::remove_file(env.path("beta.img")).unwrap();
    let err = fails(&env.run("beta", &["dump-md", "r0"]));
    assert!(
        err.contains("beta.img") && err.contains("No such file"),
        "{err}"
    );

    // A corrupted superblock says which slot is wrong and how.
    backing_file(env.dir.path(), "beta.img", 64 * MIB);
    ok(&env.run("beta", &["create-md", "r0"]));
    corrupt(&env.path("beta.img"), 4096 - 100, &[0xff; 8]);
    let err = fails(&env.run("beta", &["dump-md", "r0"]));
    assert!(
        err.contains("corrupted superblock") && err.contains("checksum mismatch"),
        "{err}"
    );
    // ... and create-md will not silently replace it.
    let err = fails(&env.run("beta", &["create-md", "r0"]));
    assert!(
        err.contains("refusing to overwrite damaged metadata"),
        "{err}"
    );

    // An unknown format version (with a valid checksum) is named.
    ok(&env.run("beta", &["create-md", "r0", "--force"]));
    let path = env.path("beta.img");
    let mut slot = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&path).unwrap();
        f.read_exact_at(&mut slot, 64 * MIB - 4096).unwrap();
    }
    slot[8..12].copy_from_slice(&9u32.to_le_bytes());
    let crc = crc32c(&slot[..4092]);
    slot[4092..].copy_from_slice(&crc.to_le_bytes());
    corrupt(&path, 4096, &slot);
    let err = fails(&env.run("beta", &["dump-md", "r0"]));
    assert!(err.contains("unknown metadata format version 9"), "{err}");

    // An unknown node and an unknown resource.
    let err = fails(&env.run("gamma", &["dump-md", "r0"]));
    assert!(err.contains("gamma"), "{err}");
    let err = fails(&env.run("beta", &["dump-md", "nope"]));
    assert!(err.contains("nope.toml"), "{err}");
}

/// CRC-32C (Castagnoli), bitwise: the test checks the format, so it does
/// not borrow the implementation under test.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn metadata_in_use_is_refused() {
    let env = Env::new("internal");
    backing_file(env.dir.path(), "beta.img", 64 * MIB);
    ok(&env.run("beta", &["create-md", "r0"]));
    // Hold the lock a running daemon would hold.
    let f = std::fs::File::open(env.path("beta.img")).unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let err = fails(&env.run("beta", &["wipe-md", "r0"]));
    assert!(err.contains("in use"), "{err}");
    drop(f);
    ok(&env.run("beta", &["wipe-md", "r0"]));
}
