use super::*;
use proptest::prelude::*;

const EXAMPLE: &str = r#"protocol = "C"

[net]
shared-secret = "s3cret"            # HMAC challenge-response on connect
# ping-int = "10s", ping-timeout = "500ms", timeout = "6s", connect-int = "10s"

[disk]
# al-extents = 1237, resync-rate = "100MiB", on-io-error = "detach"

[[node]]
name = "alpha"
address = "127.0.0.1:7789"          # replication link
disk = "/var/lib/tandem/alpha.img"  # backing file or block device
meta-disk = "internal"              # or a path to an external metadata file/device
nbd = "127.0.0.1:10809"             # NBD listen address; "unix:/path" for a Unix socket

[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "/var/lib/tandem/beta.img"
meta-disk = "internal"
nbd = "127.0.0.1:10810"
"#;

fn file() -> &'static Path {
    Path::new("/etc/tandem/r0.toml")
}

fn parse_err(text: &str) -> String {
    parse(text, file(), "r0").unwrap_err().to_string()
}

#[test]
fn the_interface_example_parses_with_drbd_defaults() {
    let c = parse(EXAMPLE, file(), "r0").unwrap();
    assert_eq!(c.protocol, Protocol::C);
    assert_eq!(c.net.shared_secret.as_deref(), Some("s3cret"));
    assert_eq!(c.net.ping_int, Duration::from_secs(10));
    assert_eq!(c.net.ping_timeout, Duration::from_millis(500));
    assert_eq!(c.net.timeout, Duration::from_secs(6));
    assert_eq!(c.net.connect_int, Duration::from_secs(10));
    assert_eq!(c.net.after_sb_0pri, AfterSb0Pri::Disconnect);
    assert_eq!(c.disk.al_extents, 1237);
    assert_eq!(c.disk.resync_rate, 100 << 20);
    assert_eq!(c.disk.on_io_error, OnIoError::Detach);
    assert_eq!(c.nodes.len(), 2);
    let a = c.node("alpha").unwrap();
    assert_eq!(a.meta_disk, MetaDisk::Internal);
    assert_eq!(a.disk, PathBuf::from("/var/lib/tandem/alpha.img"));
    assert_eq!(c.peer_of("alpha").unwrap().name, "beta");
    let e = c.node("gamma").unwrap_err().to_string();
    assert_eq!(e, "/etc/tandem/r0.toml: node: this node, \"gamma\", is not configured (nodes: alpha, beta; set --node or TANDEM_NODE)");
}

#[test]
fn every_option_is_read() {
    let text = EXAMPLE
        .replace("protocol = \"C\"", "protocol = \"A\"")
        .replace(
            "# ping-int = \"10s\", ping-timeout = \"500ms\", timeout = \"6s\", connect-int = \"10s\"",
            "ping-int = \"3s\"\nping-timeout = \"250ms\"\ntimeout = \"2m\"\nconnect-int = \"1h\"\nafter-sb-0pri = \"discard-node-beta\"\nafter-sb-1pri = \"consensus\"\nafter-sb-2pri = \"violently-as0p\"",
        )
        .replace(
            "# al-extents = 1237, resync-rate = \"100MiB\", on-io-error = \"detach\"",
            "al-extents = 7\nresync-rate = \"250K\"\non-io-error = \"pass_on\"",
        )
        .replace("meta-disk = \"internal\"              #", "meta-disk = \"/dev/vg/meta\" #")
        .replace("nbd = \"127.0.0.1:10810\"", "nbd = \"unix:/run/tandem/r0.sock\"")
        + "\n[handlers]\nsplit-brain = \"/usr/lib/tandem/notify.sh\"\n";
    let c = parse(&text, file(), "r0").unwrap();
    assert_eq!(c.protocol, Protocol::A);
    assert_eq!(c.net.ping_int, Duration::from_secs(3));
    assert_eq!(c.net.ping_timeout, Duration::from_millis(250));
    assert_eq!(c.net.timeout, Duration::from_secs(120));
    assert_eq!(c.net.connect_int, Duration::from_secs(3600));
    assert_eq!(c.net.after_sb_0pri, AfterSb0Pri::DiscardNode("beta".into()));
    assert_eq!(c.net.after_sb_1pri, AfterSb1Pri::Consensus);
    assert_eq!(c.net.after_sb_2pri, AfterSb2Pri::ViolentlyAs0p);
    assert_eq!(c.disk.al_extents, 7);
    assert_eq!(c.disk.resync_rate, 250 << 10);
    assert_eq!(c.disk.on_io_error, OnIoError::PassOn);
    assert_eq!(
        c.nodes[0].meta_disk,
        MetaDisk::External("/dev/vg/meta".into())
    );
    assert_eq!(c.nodes[1].nbd, "unix:/run/tandem/r0.sock");
    assert_eq!(c.handlers["split-brain"], "/usr/lib/tandem/notify.sh");
}

#[test]
fn errors_name_file_key_and_expectation() {
    let cases: &[(&str, &str, &str)] = &[
        ("protocol = \"C\"", "protocol = \"D\"", "/etc/tandem/r0.toml: protocol: expected \"A\", \"B\" or \"C\", found \"D\""),
        ("shared-secret = \"s3cret\"", "shared-secret = \"s3cret\"\nping-int = \"ten\"", "/etc/tandem/r0.toml: net.ping-int: expected a duration like \"10s\" or \"500ms\", found \"ten\""),
        ("shared-secret = \"s3cret\"", "shared-secret = \"s3cret\"\ntimeout = \"0s\"", "/etc/tandem/r0.toml: net.timeout: must be longer than zero, found \"0s\""),
        ("shared-secret = \"s3cret\"", "shared-secret = \"\"", "/etc/tandem/r0.toml: net.shared-secret: is empty (leave it out for no authentication)"),
        ("shared-secret = \"s3cret\"", "shared-secret = \"s3cret\"\nafter-sb-0pri = \"discard-node-gamma\"", "/etc/tandem/r0.toml: net.after-sb-0pri: \"discard-node-gamma\" names no configured node"),
        ("shared-secret = \"s3cret\"", "shared-secret = \"s3cret\"\nafter-sb-2pri = \"consensus\"", "/etc/tandem/r0.toml: net.after-sb-2pri: expected disconnect, violently-as0p or call-pri-lost-after-sb, found \"consensus\""),
        ("# al-extents = 1237", "al-extents = 6\n#", "/etc/tandem/r0.toml: disk.al-extents: expected 7 to 65534, found 6"),
        ("# al-extents = 1237", "resync-rate = \"fast\"\n#", "/etc/tandem/r0.toml: disk.resync-rate: expected a rate like \"100MiB\" or \"250K\", found \"fast\""),
        ("# al-extents = 1237", "on-io-error = \"panic\"\n#", "/etc/tandem/r0.toml: disk.on-io-error: expected detach, pass_on or call-local-io-error, found \"panic\""),
        ("address = \"127.0.0.1:7790\"", "address = \"127.0.0.1\"", "/etc/tandem/r0.toml: node[1].address: expected HOST:PORT (e.g. \"10.0.0.1:7789\" or \"[::1]:7789\"), found \"127.0.0.1\""),
        ("address = \"127.0.0.1:7790\"", "address = \"127.0.0.1:7789\"", "/etc/tandem/r0.toml: node[1].address: \"127.0.0.1:7789\" is used by node[0] too"),
        ("name = \"beta\"", "name = \"alpha\"", "/etc/tandem/r0.toml: node[1].name: \"alpha\" is used by node[0] too"),
        ("name = \"beta\"", "name = \"be ta\"", "/etc/tandem/r0.toml: node[1].name: \"be ta\" is not a node name: use 1 to 64 letters, digits, '_', '-' or '.'"),
        ("disk = \"/var/lib/tandem/beta.img\"", "disk = \"beta.img\"", "/etc/tandem/r0.toml: node[1].disk: expected an absolute path, found \"beta.img\""),
        ("meta-disk = \"internal\"\nnbd = \"127.0.0.1:10810\"", "meta-disk = \"meta\"\nnbd = \"127.0.0.1:10810\"", "/etc/tandem/r0.toml: node[1].meta-disk: expected \"internal\" or an absolute path, found \"meta\""),
        ("nbd = \"127.0.0.1:10810\"", "nbd = \"unix:r0.sock\"", "/etc/tandem/r0.toml: node[1].nbd: expected \"unix:\" and an absolute path, found \"unix:r0.sock\""),
        ("shared-secret = \"s3cret\"", "shared-secret = \"s3cret\"\n[handlers]\nfence = \"x\"\n[disk2]", "/etc/tandem/r0.toml: handlers.fence: unknown handler (known: split-brain, fence-peer, before-resync-target, after-resync-target, out-of-sync, local-io-error, pri-lost-after-sb)"),
    ];
    for (from, to, want) in cases {
        let text = EXAMPLE.replacen(from, to, 1);
        assert_ne!(text, EXAMPLE, "{from}");
        let text = text.replace("[disk2]", "");
        assert_eq!(&parse_err(&text), want);
    }
}

#[test]
fn syntax_errors_and_unknown_keys_give_the_line() {
    let e = parse_err(&EXAMPLE.replace("shared-secret", "shared-secrt"));
    assert!(
        e.starts_with("/etc/tandem/r0.toml: line 4, column 1: unknown field `shared-secrt`"),
        "{e}"
    );
    let e = parse_err(&EXAMPLE.replace("protocol = \"C\"", "protocol = "));
    assert!(e.starts_with("/etc/tandem/r0.toml: line 1, column"), "{e}");
    let e = parse_err(&EXAMPLE.replace("# al-extents = 1237", "al-extents = \"many\"\n#"));
    assert!(
        e.starts_with("/etc/tandem/r0.toml: line 8, column 14: invalid type: string \"many\""),
        "{e}"
    );
    let one_node = &EXAMPLE[..EXAMPLE.rfind("[[node]]").unwrap()];
    assert_eq!(parse_err(one_node), "/etc/tandem/r0.toml: node: expected exactly two [[node]] tables (tandem pairs two nodes), found 1");
}

#[test]
fn load_reads_the_file_and_checks_the_name() {
    let dir = std::env::temp_dir().join(format!("tandem-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("r0.toml"), EXAMPLE).unwrap();
    assert_eq!(load(&dir, "r0").unwrap().name, "r0");
    let e = load(&dir, "r1").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "cannot read {}/r1.toml: No such file",
            dir.display()
        )),
        "{e}"
    );
    assert!(e.ends_with("(is the resource configured?)"), "{e}");
    for bad in ["", "../etc/passwd", ".hidden", "a/b", &"x".repeat(65)] {
        assert!(
            matches!(load(&dir, bad), Err(ConfigError::BadResourceName(_))),
            "{bad}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn paths_take_flag_then_environment_then_default() {
    let env = |k: &str| match k {
        "TANDEM_CONFIG_DIR" => Some("/env/conf".to_string()),
        "TANDEM_NODE" => Some("envnode".to_string()),
        _ => None,
    };
    let p = Paths::resolve_with(Some("/flag".into()), None, None, env);
    assert_eq!(p.config_dir, PathBuf::from("/flag"));
    assert_eq!(p.node, "envnode");
    assert_eq!(p.run_dir, PathBuf::from("/run/tandem"));
    let p = Paths::resolve_with(None, Some("flagnode".into()), None, |_| None);
    assert_eq!(p.config_dir, PathBuf::from("/etc/tandem"));
    assert_eq!(p.node, "flagnode");
    assert_eq!(
        Paths::resolve_with(None, None, None, |_| None).node,
        default_node_name()
    );
}

#[test]
fn value_parsers() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration(" 7s "), Ok(Duration::from_secs(7)));
    for bad in [
        "",
        "s",
        "10",
        "-1s",
        "1.5s",
        "10 parsecs",
        "99999999999999999999h",
        "200h",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
    assert_eq!(parse_rate("100MiB"), Ok(100 << 20));
    assert_eq!(parse_rate("1G"), Ok(1 << 30));
    assert_eq!(parse_rate("4096"), Ok(4096));
    for bad in [
        "",
        "0M",
        "1.5M",
        "99999999999999999999T",
        "16777216T",
        "10 MB/s",
    ] {
        assert!(parse_rate(bad).is_err(), "{bad}");
    }
    for good in ["10.0.0.1:7789", "[::1]:7789", "node-a.example:1"] {
        assert!(values::check_host_port(good).is_ok(), "{good}");
    }
    for bad in [
        "", ":1", "h:0", "h:65536", "::1:7789", "[::1]", "[zz]:1", "h:x",
    ] {
        assert!(values::check_host_port(bad).is_err(), "{bad}");
    }
}

proptest! {
    #[test]
    fn parse_never_panics(text in ".{0,400}") {
        let _ = parse(&text, file(), "r0");
    }

    #[test]
    fn parse_never_panics_on_mutated_examples(at in 0usize..EXAMPLE.len(), len in 0usize..20, insert in "[ -~\n]{0,12}") {
        let mut s = EXAMPLE.as_bytes().to_vec();
        let end = (at + len).min(s.len());
        s.splice(at..end, insert.bytes());
        if let Ok(text) = String::from_utf8(s) {
            let _ = parse(&text, file(), "r0");
        }
    }
}
