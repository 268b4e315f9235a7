use super::*;
use proptest::prelude::*;

/// The example of interface.md, verbatim.
const EXAMPLE: &str = r#"protocol = "C"                      # "A" | "B" | "C"

[net]
shared-secret = "s3cret"            # HMAC challenge-response on connect
# ping-int = "10s", ping-timeout = "500ms", timeout = "6s", connect-int = "10s"
# after-sb-0pri = "disconnect", after-sb-1pri = "disconnect", after-sb-2pri = "disconnect"

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

/// Where the `# al-extents` comment is: an edit point inside `[disk]`.
const IN_DISK: &str = "# al-extents = 1237";
/// An edit point inside `[net]`.
const IN_NET: &str = "# ping-int = \"10s\"";

fn file() -> &'static Path {
    Path::new("/etc/tandem/r0.toml")
}

fn parse_ok(text: &str) -> ResourceConfig {
    match parse(text, file(), "r0") {
        Ok(c) => c,
        Err(e) => panic!("{e}\n{text}"),
    }
}

fn parse_err(text: &str) -> String {
    match parse(text, file(), "r0") {
        Ok(_) => panic!("parsed:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// `EXAMPLE` with the first `from` replaced by `to` (which must change it).
fn edit(from: &str, to: &str) -> String {
    let text = EXAMPLE.replacen(from, to, 1);
    assert_ne!(text, EXAMPLE, "{from:?} is not in the example");
    text
}

/// `EXAMPLE` with `line` added at the top of `[net]`, `[disk]` or the file.
fn with_net(line: &str) -> String {
    edit(IN_NET, &format!("{line}\n{IN_NET}"))
}
fn with_disk(line: &str) -> String {
    edit(IN_DISK, &format!("{line}\n{IN_DISK}"))
}
fn with_handlers(lines: &str) -> String {
    format!("{EXAMPLE}\n[handlers]\n{lines}\n")
}

#[test]
fn the_interface_example_parses_with_drbd_defaults() {
    let c = parse_ok(EXAMPLE);
    assert_eq!(c.name, "r0");
    assert_eq!(c.file, file());
    assert_eq!(c.protocol, Protocol::C);
    assert_eq!(c.net.shared_secret.as_deref(), Some("s3cret"));
    assert_eq!(c.net.ping_int, Duration::from_secs(10));
    assert_eq!(c.net.ping_timeout, Duration::from_millis(500));
    assert_eq!(c.net.timeout, Duration::from_secs(6));
    assert_eq!(c.net.connect_int, Duration::from_secs(10));
    assert_eq!(c.net.after_sb_0pri, AfterSb0Pri::Disconnect);
    assert_eq!(c.net.after_sb_1pri, AfterSb1Pri::Disconnect);
    assert_eq!(c.net.after_sb_2pri, AfterSb2Pri::Disconnect);
    assert_eq!(c.disk.al_extents, 1237);
    assert_eq!(c.disk.resync_rate, 100 << 20);
    assert_eq!(c.disk.on_io_error, OnIoError::Detach);
    assert!(c.handlers.is_empty());
    assert_eq!(
        c.nodes,
        vec![
            NodeConfig {
                name: "alpha".into(),
                address: "127.0.0.1:7789".into(),
                disk: "/var/lib/tandem/alpha.img".into(),
                meta_disk: MetaDisk::Internal,
                nbd: "127.0.0.1:10809".into(),
            },
            NodeConfig {
                name: "beta".into(),
                address: "127.0.0.1:7790".into(),
                disk: "/var/lib/tandem/beta.img".into(),
                meta_disk: MetaDisk::Internal,
                nbd: "127.0.0.1:10810".into(),
            },
        ]
    );
}

#[test]
fn sections_may_be_left_out() {
    let text = &EXAMPLE[EXAMPLE.find("[[node]]").unwrap()..];
    let c = parse_ok(text);
    assert_eq!(c.protocol, Protocol::C);
    assert_eq!(c.net, NetConfig::default());
    assert_eq!(c.net.shared_secret, None);
    assert_eq!(c.disk, DiskConfig::default());
}

#[test]
fn every_option_is_read() {
    let text = edit("protocol = \"C\"", "protocol = \"A\"")
        .replacen(
            IN_NET,
            "ping-int = \"3s\"\nping-timeout = \"250ms\"\ntimeout = \"2m\"\nconnect-int = \"1h\"\n\
             after-sb-0pri = \"discard-node-beta\"\nafter-sb-1pri = \"consensus\"\n\
             after-sb-2pri = \"violently-as0p\"\n#",
            1,
        )
        .replacen(
            IN_DISK,
            "al-extents = 7\nresync-rate = \"250K\"\non-io-error = \"pass_on\"\n#",
            1,
        )
        .replacen("meta-disk = \"internal\" ", "meta-disk = \"/dev/vg/meta\" ", 1)
        .replacen("nbd = \"127.0.0.1:10810\"", "nbd = \"unix:/run/tandem/r0.sock\"", 1)
        + "\n[handlers]\nsplit-brain = \"/usr/lib/tandem/notify.sh\"\nfence-peer = \"/usr/lib/tandem/fence --x\"\n";
    let c = parse_ok(&text);
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
    assert_eq!(c.handlers.len(), 2);
    assert_eq!(c.handlers["split-brain"], "/usr/lib/tandem/notify.sh");
    assert_eq!(c.handlers["fence-peer"], "/usr/lib/tandem/fence --x");
}

#[test]
fn every_policy_name_is_accepted() {
    let cases_0: [(&str, AfterSb0Pri); 6] = [
        ("disconnect", AfterSb0Pri::Disconnect),
        (
            "discard-younger-primary",
            AfterSb0Pri::DiscardYoungerPrimary,
        ),
        ("discard-older-primary", AfterSb0Pri::DiscardOlderPrimary),
        ("discard-zero-changes", AfterSb0Pri::DiscardZeroChanges),
        ("discard-least-changes", AfterSb0Pri::DiscardLeastChanges),
        (
            "discard-node-alpha",
            AfterSb0Pri::DiscardNode("alpha".into()),
        ),
    ];
    for (word, want) in cases_0 {
        let c = parse_ok(&with_net(&format!("after-sb-0pri = \"{word}\"")));
        assert_eq!(c.net.after_sb_0pri, want);
    }
    for (word, want) in [
        ("disconnect", AfterSb1Pri::Disconnect),
        ("consensus", AfterSb1Pri::Consensus),
        ("violently-as0p", AfterSb1Pri::ViolentlyAs0p),
        ("discard-secondary", AfterSb1Pri::DiscardSecondary),
        ("call-pri-lost-after-sb", AfterSb1Pri::CallPriLostAfterSb),
    ] {
        let c = parse_ok(&with_net(&format!("after-sb-1pri = \"{word}\"")));
        assert_eq!(c.net.after_sb_1pri, want);
    }
    for (word, want) in [
        ("disconnect", AfterSb2Pri::Disconnect),
        ("violently-as0p", AfterSb2Pri::ViolentlyAs0p),
        ("call-pri-lost-after-sb", AfterSb2Pri::CallPriLostAfterSb),
    ] {
        let c = parse_ok(&with_net(&format!("after-sb-2pri = \"{word}\"")));
        assert_eq!(c.net.after_sb_2pri, want);
    }
    for (word, want) in [
        ("detach", OnIoError::Detach),
        ("pass_on", OnIoError::PassOn),
        ("call-local-io-error", OnIoError::CallLocalIoError),
    ] {
        let c = parse_ok(&with_disk(&format!("on-io-error = \"{word}\"")));
        assert_eq!(c.disk.on_io_error, want);
    }
    for (word, want) in [("A", Protocol::A), ("B", Protocol::B), ("C", Protocol::C)] {
        let c =
            parse_ok(&EXAMPLE.replacen("protocol = \"C\"", &format!("protocol = \"{word}\""), 1));
        assert_eq!(c.protocol, want);
    }
    for handler in HANDLERS {
        let c = parse_ok(&with_handlers(&format!("{handler} = \"/bin/true\"")));
        assert_eq!(c.handlers[handler], "/bin/true");
    }
}

#[test]
fn other_value_forms_are_accepted() {
    let c = parse_ok(&with_disk("resync-rate = 4096\nal-extents = 65534"));
    assert_eq!(c.disk.resync_rate, 4096);
    assert_eq!(c.disk.al_extents, 65534);
    // IPv6 and host names; on different hosts the NBD address and the disk
    // path may be the same on both nodes.
    let text = edit("address = \"127.0.0.1:7789\"", "address = \"[::1]:7789\"")
        .replacen(
            "address = \"127.0.0.1:7790\"",
            "address = \"node-b.example:7789\"",
            1,
        )
        .replacen("nbd = \"127.0.0.1:10810\"", "nbd = \"127.0.0.1:10809\"", 1)
        .replacen("/var/lib/tandem/beta.img", "/var/lib/tandem/alpha.img", 1);
    let c = parse_ok(&text);
    assert_eq!(c.nodes[0].address, "[::1]:7789");
    assert_eq!(c.nodes[1].address, "node-b.example:7789");
    // Unix sockets for NBD on a shared host, as long as they differ.
    let text = edit("nbd = \"127.0.0.1:10809\"", "nbd = \"unix:/run/a.sock\"").replacen(
        "nbd = \"127.0.0.1:10810\"",
        "nbd = \"unix:/run/b.sock\"",
        1,
    );
    parse_ok(&text);
}

/// Every rule, each with the exact message: file, key, what was expected.
#[test]
fn errors_name_file_key_and_expectation() {
    let f = "/etc/tandem/r0.toml";
    let long_sock = format!("unix:/{}", "s".repeat(107));
    let cases: Vec<(String, String)> = vec![
        // protocol
        (edit("protocol = \"C\"", "protocol = \"D\""), "protocol: expected A, B or C, found \"D\"".into()),
        (edit("protocol = \"C\"", "protocol = 3"), "protocol: expected A, B or C, found 3".into()),
        (edit("protocol = \"C\"", "protocol = \"c\""), "protocol: expected A, B or C, found \"c\"".into()),
        // [net]
        (edit("shared-secret = \"s3cret\"", "shared-secret = \"\""), "net.shared-secret: expected a non-empty string (leave the key out for no authentication), found \"\"".into()),
        (edit("shared-secret = \"s3cret\"", "shared-secret = 42"), "net.shared-secret: expected a non-empty string (leave the key out for no authentication), found 42".into()),
        (with_net("ping-int = \"ten\""), "net.ping-int: expected a duration like \"10s\" or \"500ms\", found \"ten\"".into()),
        (with_net("ping-int = 10"), "net.ping-int: expected a duration like \"10s\" or \"500ms\", found 10".into()),
        (with_net("ping-timeout = \"0ms\""), "net.ping-timeout: must be longer than zero, found \"0ms\"".into()),
        (with_net("ping-timeout = \"99ms\""), "net.ping-timeout: must be at least \"100ms\", found \"99ms\"".into()),
        (with_net("timeout = \"-1s\""), "net.timeout: expected a duration like \"10s\" or \"500ms\", found \"-1s\"".into()),
        (with_net("timeout = \"0s\""), "net.timeout: must be longer than zero, found \"0s\"".into()),
        (with_net("connect-int = \"10\""), "net.connect-int: expected a duration like \"10s\" or \"500ms\", found \"10\"".into()),
        (with_net("connect-int = \"200h\""), "net.connect-int: must be at most a week (\"168h\"), found \"200h\"".into()),
        (with_net("after-sb-0pri = \"discard-node-gamma\""), "net.after-sb-0pri: \"discard-node-gamma\" names no configured node (nodes: alpha, beta)".into()),
        (with_net("after-sb-0pri = \"discard-node-\""), "net.after-sb-0pri: expected disconnect, discard-younger-primary, discard-older-primary, discard-zero-changes, discard-least-changes or discard-node-NAME, found \"discard-node-\"".into()),
        (with_net("after-sb-0pri = \"consensus\""), "net.after-sb-0pri: expected disconnect, discard-younger-primary, discard-older-primary, discard-zero-changes, discard-least-changes or discard-node-NAME, found \"consensus\"".into()),
        (with_net("after-sb-1pri = \"discard-older-primary\""), "net.after-sb-1pri: expected disconnect, consensus, violently-as0p, discard-secondary or call-pri-lost-after-sb, found \"discard-older-primary\"".into()),
        (with_net("after-sb-2pri = \"consensus\""), "net.after-sb-2pri: expected disconnect, violently-as0p or call-pri-lost-after-sb, found \"consensus\"".into()),
        (with_net("after-sb-2pri = true"), "net.after-sb-2pri: expected disconnect, violently-as0p or call-pri-lost-after-sb, found true".into()),
        (edit("shared-secret", "shared-secrt"), "net.shared-secrt: unknown key; expected one of shared-secret, ping-int, ping-timeout, timeout, connect-int, after-sb-0pri, after-sb-1pri, after-sb-2pri, data-integrity-alg, fencing, csums-alg, verify-alg".into()),
        (with_net("data-integrity-alg = \"md5\""), "net.data-integrity-alg: expected none or crc32c, found \"md5\"".into()),
        (edit("[net]\nshared-secret", "net = 5\n# shared-secret"), "net: expected a table ([net]), found 5".into()),
        // [disk]
        (with_disk("al-extents = 6"), "disk.al-extents: expected an integer from 7 to 65534, found 6".into()),
        (with_disk("al-extents = 65535"), "disk.al-extents: expected an integer from 7 to 65534, found 65535".into()),
        (with_disk("al-extents = -1"), "disk.al-extents: expected an integer from 7 to 65534, found -1".into()),
        (with_disk("al-extents = \"1237\""), "disk.al-extents: expected an integer from 7 to 65534, found \"1237\"".into()),
        (with_disk("al-extents = 12.5"), "disk.al-extents: expected an integer from 7 to 65534, found 12.5".into()),
        (with_disk("resync-rate = \"fast\""), "disk.resync-rate: expected a rate like \"100MiB\" or \"250K\", found \"fast\"".into()),
        (with_disk("resync-rate = \"0M\""), "disk.resync-rate: must be more than zero, found \"0M\"".into()),
        (with_disk("resync-rate = 0"), "disk.resync-rate: must be more than zero, found 0".into()),
        (with_disk("resync-rate = \"99999999999999999999T\""), "disk.resync-rate: must be less than 16 EiB per second, found \"99999999999999999999T\"".into()),
        (with_disk("resync-rate = [1]"), "disk.resync-rate: expected a rate like \"100MiB\" or \"250K\", found an array".into()),
        (with_disk("on-io-error = \"panic\""), "disk.on-io-error: expected detach, pass_on or call-local-io-error, found \"panic\"".into()),
        (with_disk("al-extent = 7"), "disk.al-extent: unknown key; expected one of al-extents, resync-rate, c-min-rate, on-io-error".into()),
        // [[node]]: each field
        (edit("nbd = \"127.0.0.1:10810\"", ""), "node[1].nbd: missing; expected HOST:PORT (e.g. \"127.0.0.1:10809\") or \"unix:/ABSOLUTE/PATH\"".into()),
        (edit("name = \"alpha\"", ""), "node[0].name: missing; expected a node name of 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'".into()),
        (edit("nbd = \"127.0.0.1:10810\"", "nbdd = \"127.0.0.1:10810\""), "node[1].nbdd: unknown key; expected one of name, address, disk, meta-disk, nbd".into()),
        (edit("name = \"beta\"", "name = \"be ta\""), "node[1].name: expected a node name of 1 to 64 letters, digits, '_', '-' or '.', not starting with '.', found \"be ta\"".into()),
        (edit("name = \"beta\"", "name = \".beta\""), "node[1].name: expected a node name of 1 to 64 letters, digits, '_', '-' or '.', not starting with '.', found \".beta\"".into()),
        (edit("name = \"beta\"", "name = [\"beta\"]"), "node[1].name: expected a node name of 1 to 64 letters, digits, '_', '-' or '.', not starting with '.', found an array".into()),
        (edit("address = \"127.0.0.1:7790\"", "address = \"127.0.0.1\""), "node[1].address: expected HOST:PORT (e.g. \"10.0.0.1:7789\" or \"[::1]:7789\"), found \"127.0.0.1\"".into()),
        (edit("address = \"127.0.0.1:7790\"", "address = \"127.0.0.1:0\""), "node[1].address: expected HOST:PORT (e.g. \"10.0.0.1:7789\" or \"[::1]:7789\"), found \"127.0.0.1:0\"".into()),
        (edit("address = \"127.0.0.1:7790\"", "address = \"999.0.0.1:7790\""), "node[1].address: expected HOST:PORT (e.g. \"10.0.0.1:7789\" or \"[::1]:7789\"), found \"999.0.0.1:7790\"".into()),
        (edit("address = \"127.0.0.1:7790\"", "address = \"::1:7790\""), "node[1].address: expected HOST:PORT (e.g. \"10.0.0.1:7789\" or \"[::1]:7789\"), found \"::1:7790\"".into()),
        (edit("disk = \"/var/lib/tandem/beta.img\"", "disk = \"beta.img\""), "node[1].disk: expected the absolute path of the backing file or block device, found \"beta.img\"".into()),
        (edit("meta-disk = \"internal\"\nnbd = \"127.0.0.1:10810\"", "meta-disk = \"meta\"\nnbd = \"127.0.0.1:10810\""), "node[1].meta-disk: expected \"internal\" or the absolute path of a metadata file or device, found \"meta\"".into()),
        (edit("meta-disk = \"internal\"\nnbd = \"127.0.0.1:10810\"", "meta-disk = \"/var/lib/tandem/beta.img\"\nnbd = \"127.0.0.1:10810\""), "node[1].meta-disk: \"/var/lib/tandem/beta.img\" is this node's disk itself (use \"internal\" for metadata on the data disk)".into()),
        (edit("nbd = \"127.0.0.1:10810\"", "nbd = \"unix:r0.sock\""), "node[1].nbd: expected HOST:PORT (e.g. \"127.0.0.1:10809\") or \"unix:/ABSOLUTE/PATH\", found \"unix:r0.sock\"".into()),
        (edit("nbd = \"127.0.0.1:10810\"", "nbd = \"localhost\""), "node[1].nbd: expected HOST:PORT (e.g. \"127.0.0.1:10809\") or \"unix:/ABSOLUTE/PATH\", found \"localhost\"".into()),
        (edit("nbd = \"127.0.0.1:10810\"", &format!("nbd = \"{long_sock}\"")), format!("node[1].nbd: a Unix socket path has at most 107 bytes, found 108 in \"{long_sock}\"")),
        (edit("nbd = \"127.0.0.1:10810\"", "nbd = \"127.0.0.1:7790\""), "node[1].nbd: \"127.0.0.1:7790\" is this node's replication address too; use another port".into()),
        // [[node]]: the pair
        (edit("name = \"beta\"", "name = \"alpha\""), "node[1].name: \"alpha\" is used by node[0] too".into()),
        (edit("address = \"127.0.0.1:7790\"", "address = \"127.0.0.1:7789\""), "node[1].address: \"127.0.0.1:7789\" is node[0].address too".into()),
        (edit("address = \"127.0.0.1:7789\"", "address = \"[::1]:7789\"").replacen("address = \"127.0.0.1:7790\"", "address = \"[0:0::1]:7789\"", 1), "node[1].address: \"[0:0::1]:7789\" is node[0].address too".into()),
        (edit("nbd = \"127.0.0.1:10810\"", "nbd = \"127.0.0.1:10809\""), "node[1].nbd: \"127.0.0.1:10809\" is node[0].nbd too, and both nodes are on host 127.0.0.1".into()),
        (edit("nbd = \"127.0.0.1:10810\"", "nbd = \"127.0.0.1:7789\""), "node[1].nbd: \"127.0.0.1:7789\" is node[0].address too, and both nodes are on host 127.0.0.1".into()),
        (edit("nbd = \"127.0.0.1:10809\"", "nbd = \"127.0.0.1:7790\""), "node[0].nbd: \"127.0.0.1:7790\" is node[1].address too, and both nodes are on host 127.0.0.1".into()),
        (edit("/var/lib/tandem/beta.img", "/var/lib/tandem/alpha.img"), "node[1].disk: \"/var/lib/tandem/alpha.img\" is node[0].disk too, and both nodes are on host 127.0.0.1".into()),
        (edit("meta-disk = \"internal\"\nnbd = \"127.0.0.1:10810\"", "meta-disk = \"/var/lib/tandem/alpha.img\"\nnbd = \"127.0.0.1:10810\""), "node[1].meta-disk: \"/var/lib/tandem/alpha.img\" is node[0].disk too, and both nodes are on host 127.0.0.1".into()),
        (EXAMPLE[..EXAMPLE.rfind("[[node]]").unwrap()].to_string(), "node: expected exactly two [[node]] tables (tandem pairs two nodes), found 1".into()),
        (EXAMPLE[..EXAMPLE.find("[[node]]").unwrap()].to_string(), "node: expected exactly two [[node]] tables (tandem pairs two nodes), found 0".into()),
        (format!("{EXAMPLE}\n[[node]]\nname = \"gamma\"\n"), "node: expected exactly two [[node]] tables (tandem pairs two nodes), found 3".into()),
        (EXAMPLE[..EXAMPLE.rfind("[[node]]").unwrap()].replacen("[[node]]", "[node]", 1), "node: expected exactly two [[node]] tables (tandem pairs two nodes), found a table".into()),
        (format!("node = [1, 2]\n{}", &EXAMPLE[..EXAMPLE.find("[[node]]").unwrap()]), "node[0]: expected a [[node]] table, found 1".into()),
        // top level and [handlers]
        (edit("[disk]", "[disc]"), "disc: unknown key; expected one of protocol, net, disk, node, handlers".into()),
        (format!("\"a.b\" = 1\n{EXAMPLE}"), "\"a.b\": unknown key; expected one of protocol, net, disk, node, handlers".into()),
        (with_handlers("fence = \"x\""), "handlers.fence: unknown handler; expected one of split-brain, fence-peer, before-resync-target, after-resync-target, out-of-sync, local-io-error, pri-lost-after-sb".into()),
        (with_handlers("split-brain = \" \""), "handlers.split-brain: expected a program to run (a non-empty string), found \" \"".into()),
        (with_handlers("split-brain = 1"), "handlers.split-brain: expected a program to run (a non-empty string), found 1".into()),
        (format!("handlers = 1\n{EXAMPLE}"), "handlers: expected a table ([handlers]), found 1".into()),
    ];
    for (text, want) in &cases {
        assert_eq!(parse_err(text), format!("{f}: {want}"), "\n{text}");
    }
}

#[test]
fn syntax_errors_give_line_and_column() {
    let e = parse_err(&edit("protocol = \"C\"", "protocol = "));
    assert!(e.starts_with("/etc/tandem/r0.toml: line 1, column "), "{e}");
    let e = parse_err(&with_disk("al-extents = 7\nal-extents = 8"));
    assert!(
        e.starts_with("/etc/tandem/r0.toml: line 10, column 1: "),
        "{e}"
    );
    assert!(e.contains("duplicate key"), "{e}");
    let e = parse_err(&edit("name = \"beta\"", "name = \"beta"));
    assert!(
        e.starts_with("/etc/tandem/r0.toml: line 19, column "),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
    // Columns count characters, not bytes.
    let e = parse_err("# é\nä = = 1\n");
    assert!(e.starts_with("/etc/tandem/r0.toml: line 2, column "), "{e}");
}

#[test]
fn node_and_peer_lookup() {
    let c = parse_ok(EXAMPLE);
    assert_eq!(c.node("alpha").unwrap().name, "alpha");
    assert_eq!(c.peer_of("alpha").unwrap().name, "beta");
    assert_eq!(c.peer_of("beta").unwrap().name, "alpha");
    let want = "/etc/tandem/r0.toml: node: this node, \"gamma\", is not configured (nodes: alpha, beta; set --node or TANDEM_NODE)";
    assert_eq!(c.node("gamma").unwrap_err().to_string(), want);
    assert_eq!(c.peer_of("gamma").unwrap_err().to_string(), want);
}

#[test]
fn load_reads_the_file_and_checks_the_name() {
    let dir = std::env::temp_dir().join(format!("tandem-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("r0.toml"), EXAMPLE).unwrap();
    let c = load(&dir, "r0").unwrap();
    assert_eq!(c.name, "r0");
    assert_eq!(c.file, dir.join("r0.toml"));

    let e = load(&dir, "r1").unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "cannot read {}/r1.toml: No such file or directory (is the resource configured?)",
            dir.display()
        )
    );
    std::fs::create_dir_all(dir.join("r2.toml")).unwrap();
    let e = load(&dir, "r2").unwrap_err().to_string();
    assert_eq!(
        e,
        format!("cannot read {}/r2.toml: Is a directory", dir.display())
    );
    std::fs::write(dir.join("r3.toml"), "protocol = \"D\"").unwrap();
    let e = load(&dir, "r3").unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}/r3.toml: protocol: expected A, B or C, found \"D\"",
            dir.display()
        )
    );

    for bad in [
        "",
        "../etc/passwd",
        ".hidden",
        "a/b",
        "r 0",
        "r\n0",
        &"x".repeat(65),
    ] {
        let e = load(&dir, bad).unwrap_err();
        assert!(matches!(e, ConfigError::BadResourceName(_)), "{bad}");
        assert!(!e.to_string().contains('\n'), "{e}");
    }
    assert_eq!(
        load(&dir, "r/0").unwrap_err().to_string(),
        "invalid resource name \"r/0\": expected 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'"
    );
    for good in ["r0", "db.prod-1", "A_b", &"x".repeat(64)] {
        assert!(valid_name(good), "{good}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn paths_take_flag_then_environment_then_default() {
    let env = |k: &str| {
        Some(match k {
            "TANDEM_CONFIG_DIR" => "/env/conf".to_string(),
            "TANDEM_NODE" => "envnode".to_string(),
            "TANDEM_RUN_DIR" => "/env/run".to_string(),
            _ => return None,
        })
    };
    let flags = Paths::resolve_with(
        Some("/flag/conf".into()),
        Some("flagnode".into()),
        Some("/flag/run".into()),
        env,
    );
    assert_eq!(
        flags,
        Paths {
            config_dir: "/flag/conf".into(),
            node: "flagnode".into(),
            run_dir: "/flag/run".into(),
        }
    );
    let from_env = Paths::resolve_with(None, None, None, env);
    assert_eq!(
        from_env,
        Paths {
            config_dir: "/env/conf".into(),
            node: "envnode".into(),
            run_dir: "/env/run".into(),
        }
    );
    let defaults = Paths::resolve_with(None, None, None, |_| None);
    assert_eq!(
        defaults,
        Paths {
            config_dir: "/etc/tandem".into(),
            node: default_node_name(),
            run_dir: "/run/tandem".into(),
        }
    );
    // Mixed: each setting on its own.
    let mixed = Paths::resolve_with(Some("/flag/conf".into()), None, None, |k| {
        (k == "TANDEM_NODE").then(|| "envnode".to_string())
    });
    assert_eq!(mixed.config_dir, PathBuf::from("/flag/conf"));
    assert_eq!(mixed.node, "envnode");
    assert_eq!(mixed.run_dir, PathBuf::from("/run/tandem"));
    // The real environment is not consulted when every flag is given.
    assert_eq!(
        Paths::resolve(
            Some("/flag/conf".into()),
            Some("flagnode".into()),
            Some("/flag/run".into())
        ),
        flags
    );
}

#[test]
fn default_node_name_is_the_host_name() {
    let name = default_node_name();
    assert!(!name.is_empty());
    if let Ok(etc) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        assert_eq!(name, etc.trim());
    }
}

#[test]
fn durations() {
    for (text, ms) in [
        ("500ms", 500),
        ("10s", 10_000),
        (" 7s ", 7_000),
        ("10 s", 10_000),
        ("2m", 120_000),
        ("2min", 120_000),
        ("1h", 3_600_000),
        ("1ms", 1),
        ("168h", 604_800_000),
        ("0010s", 10_000),
    ] {
        assert_eq!(
            parse_duration(text),
            Ok(Duration::from_millis(ms)),
            "{text}"
        );
    }
    for bad in [
        "",
        "s",
        "10",
        "-1s",
        "+1s",
        "1.5s",
        "1e3ms",
        "10 parsecs",
        "10S",
        "10sec",
        "1d",
        "s10",
        "١s", // a non-ASCII digit
    ] {
        assert_eq!(
            parse_duration(bad),
            Err(format!(
                "expected a duration like \"10s\" or \"500ms\", found {bad:?}"
            )),
            "{bad}"
        );
    }
    for zero in ["0s", "0ms", "00h"] {
        assert_eq!(
            parse_duration(zero),
            Err(format!("must be longer than zero, found {zero:?}"))
        );
    }
    for long in [
        "169h",
        "604800001ms",
        "99999999999999999999h",
        "18446744073709551615h",
        "18446744073709551616ms",
    ] {
        assert_eq!(
            parse_duration(long),
            Err(format!("must be at most a week (\"168h\"), found {long:?}"))
        );
    }
}

#[test]
fn rates() {
    for (text, bytes) in [
        ("100MiB", 100u64 << 20),
        ("250K", 250 << 10),
        ("250k", 250 << 10),
        ("250KiB", 250 << 10),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("2T", 2 << 40),
        ("2TiB", 2 << 40),
        ("4096", 4096),
        ("4096B", 4096),
        (" 10 M ", 10 << 20),
        ("16777215T", 16_777_215 << 40),
        ("18446744073709551615", u64::MAX),
    ] {
        assert_eq!(parse_rate(text), Ok(bytes), "{text}");
    }
    for bad in ["", "M", "1.5M", "10 MB/s", "10MB", "-1M", "1P", "10m"] {
        assert_eq!(
            parse_rate(bad),
            Err(format!(
                "expected a rate like \"100MiB\" or \"250K\", found {bad:?}"
            )),
            "{bad}"
        );
    }
    assert_eq!(
        parse_rate("0M"),
        Err("must be more than zero, found \"0M\"".into())
    );
    for huge in [
        "99999999999999999999T",
        "16777216T",
        "18446744073709551616",
        "99999999999999999999999999999999999999999999",
    ] {
        assert_eq!(
            parse_rate(huge),
            Err(format!(
                "must be less than 16 EiB per second, found {huge:?}"
            ))
        );
    }
}

#[test]
fn host_ports() {
    use values::{parse_host_port, parse_listen, HostPort, Listen};
    let hp = |host: &str, port| HostPort {
        host: host.into(),
        port,
    };
    for (text, want) in [
        ("10.0.0.1:7789", hp("10.0.0.1", 7789)),
        ("[::1]:7789", hp("::1", 7789)),
        ("[0:0::1]:7789", hp("::1", 7789)),
        ("[fe80::1]:65535", hp("fe80::1", 65535)),
        ("Node-A.Example:1", hp("node-a.example", 1)),
        ("localhost:10809", hp("localhost", 10809)),
    ] {
        assert_eq!(parse_host_port(text), Ok(want), "{text}");
    }
    for bad in [
        "",
        ":1",
        "h",
        "h:",
        "h:0",
        "h:65536",
        "h:+1",
        "h:x",
        "::1:7789",
        "[::1]",
        "[zz]:1",
        "[::1:1",
        "a..b:1",
        ".a:1",
        "a b:1",
        "-a:1",
        "1.2.3.256:1",
        "1.2.3:1",
        "[10.0.0.1]:1",
    ] {
        assert!(parse_host_port(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_listen("unix:/run/x.sock"),
        Ok(Listen::Unix("/run/x.sock".into()))
    );
    assert_eq!(
        parse_listen("127.0.0.1:10809"),
        Ok(Listen::Tcp(hp("127.0.0.1", 10809)))
    );
    for bad in ["unix:", "unix:x.sock", "unix", "127.0.0.1", "tcp://h:1"] {
        assert!(parse_listen(bad).is_err(), "{bad}");
    }
    assert!(parse_listen(&format!("unix:/{}", "s".repeat(106))).is_ok());
    assert!(parse_listen(&format!("unix:/{}", "s".repeat(107))).is_err());
}

/// The reference page documents every key and handler.
#[test]
fn the_reference_documents_every_key() {
    let doc = include_str!("../../../docs/configuration.md");
    for key in TOP_KEYS {
        assert!(doc.contains(&format!("`{key}")), "{key}");
    }
    for (section, keys) in [
        ("net", NET_KEYS),
        ("disk", DISK_KEYS),
        ("node[]", NODE_KEYS),
    ] {
        for key in keys {
            assert!(
                doc.contains(&format!("`{section}.{key}`")),
                "{section}.{key}"
            );
        }
    }
    for handler in HANDLERS {
        assert!(doc.contains(&format!("`{handler}`")), "{handler}");
    }
}

/// An error from `parse` is one line that starts with the file.
fn check_error_shape(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = parse(text, file(), "r0") {
        let msg = e.to_string();
        prop_assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg:?}");
        prop_assert!(msg.starts_with("/etc/tandem/r0.toml: "), "{msg:?}");
    }
    Ok(())
}

/// Lines that a mutation may insert: valid keys with odd values, odd keys.
fn fragment() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "protocol",
        "shared-secret",
        "ping-int",
        "timeout",
        "after-sb-0pri",
        "al-extents",
        "resync-rate",
        "on-io-error",
        "name",
        "address",
        "disk",
        "meta-disk",
        "nbd",
        "split-brain",
        "[net]",
        "[disk]",
        "[[node]]",
        "[handlers]",
    ]);
    let values = prop::sample::select(vec![
        "\"\"",
        "0",
        "-1",
        "9223372036854775807",
        "1.5",
        "true",
        "[]",
        "{}",
        "\"0s\"",
        "\"99999999999999999999T\"",
        "\"[::1]:0\"",
        "\"unix:\"",
        "\"internal\"",
        "\"discard-node-\"",
        "1979-05-27",
    ]);
    (keys, values, any::<bool>()).prop_map(|(k, v, table)| {
        if table || k.starts_with('[') {
            format!("\n{k}\n")
        } else {
            format!("\n{k} = {v}\n")
        }
    })
}

proptest! {
    #[test]
    fn parse_never_panics(text in "\\PC{0,400}") {
        check_error_shape(&text)?;
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_error_shape(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn parse_never_panics_on_mutated_examples(
        at in 0usize..EXAMPLE.len(),
        len in 0usize..20,
        insert in "[ -~\n]{0,12}",
    ) {
        let mut s = EXAMPLE.as_bytes().to_vec();
        let end = (at + len).min(s.len());
        s.splice(at..end, insert.bytes());
        check_error_shape(&String::from_utf8_lossy(&s))?;
    }

    #[test]
    fn parse_never_panics_on_examples_with_odd_lines(
        edits in prop::collection::vec((0usize..=EXAMPLE.len(), fragment()), 1..4),
    ) {
        let mut text = EXAMPLE.to_string();
        for (at, line) in edits {
            let mut at = at.min(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.insert_str(at, &line);
        }
        check_error_shape(&text)?;
    }

    #[test]
    fn durations_agree_with_arithmetic(n in 0u64..1_000_000_000, unit in 0usize..4) {
        let (suffix, ms_per) = [("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000)][unit];
        let got = parse_duration(&format!("{n}{suffix}"));
        let ms = n * ms_per;
        if n > 0 && ms <= 7 * 24 * 3_600_000 {
            prop_assert_eq!(got, Ok(Duration::from_millis(ms)));
        } else {
            prop_assert!(got.is_err());
        }
    }

    #[test]
    fn rates_agree_with_arithmetic(n in any::<u64>(), unit in 0usize..5) {
        let (suffix, shift) = [("", 0u32), ("K", 10), ("M", 20), ("G", 30), ("T", 40)][unit];
        let got = parse_rate(&format!("{n}{suffix}"));
        match n.checked_mul(1 << shift) {
            Some(bytes) if n > 0 => prop_assert_eq!(got, Ok(bytes)),
            _ => prop_assert!(got.is_err()),
        }
    }
}
