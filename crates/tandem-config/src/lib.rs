//! The resource configuration: one TOML file per resource,
//! `<config-dir>/<resource>.toml`, parsed into typed values at the edge.
//!
//! Every problem is one line naming the file, the key and what was
//! expected; unknown keys are errors (a typo must not silently fall back to
//! a default). The keys are DRBD's option names so that an operator's
//! `drbd.conf` knowledge carries over. Reference: `docs/configuration.md`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod read;
mod values;

use read::{describe, Section};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use values::{parse_duration, parse_rate};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {}{}", file.display(), io_reason(source), read_hint(source))]
    Read {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML (the line and column of the first problem).
    #[error("{}: line {line}, column {column}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// A key that is unknown, missing, of the wrong type or with a value
    /// that cannot be used.
    #[error("{}: {key}: {message}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key, e.g. `node[1].meta-disk`.
        key: String,
        /// What was expected.
        message: String,
    },
    /// A resource name that cannot name a file.
    #[error("invalid resource name {0:?}: expected {NAME_RULE}")]
    BadResourceName(String),
}

/// Replication protocol: when a write completes to the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Local write done and handed to the link.
    A,
    /// Local write done and received by the peer.
    B,
    /// Local write done and written by the peer.
    C,
}

/// `after-sb-0pri`: split brain detected, no node Primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterSb0Pri {
    /// Do not resolve; disconnect.
    Disconnect,
    /// The node that became Primary later loses.
    DiscardYoungerPrimary,
    /// The node that became Primary earlier loses.
    DiscardOlderPrimary,
    /// A node without changes loses; else disconnect.
    DiscardZeroChanges,
    /// The node with fewer changes loses.
    DiscardLeastChanges,
    /// The named node loses.
    DiscardNode(String),
}

/// `after-sb-1pri`: split brain detected, one node Primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterSb1Pri {
    /// Do not resolve; disconnect.
    Disconnect,
    /// Apply the 0pri policy if it picks the Secondary as victim.
    Consensus,
    /// Apply the 0pri policy whatever it picks.
    ViolentlyAs0p,
    /// The Secondary loses.
    DiscardSecondary,
    /// Apply the 0pri policy; a losing Primary calls pri-lost-after-sb.
    CallPriLostAfterSb,
}

/// `after-sb-2pri`: split brain detected, both nodes Primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterSb2Pri {
    /// Do not resolve; disconnect.
    Disconnect,
    /// Apply the 0pri policy whatever it picks.
    ViolentlyAs0p,
    /// Apply the 0pri policy; the losing Primary calls pri-lost-after-sb.
    CallPriLostAfterSb,
}

/// `on-io-error`: what a local disk error does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnIoError {
    /// Become Diskless; a Primary keeps serving through the peer.
    Detach,
    /// Report the error to the application.
    PassOn,
    /// Run the local-io-error handler.
    CallLocalIoError,
}

/// `[net]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// HMAC challenge-response secret.
    pub shared_secret: Option<String>,
    /// Idle time before a ping.
    pub ping_int: Duration,
    /// How long a ping may go unanswered.
    pub ping_timeout: Duration,
    /// How long a request may go unanswered.
    pub timeout: Duration,
    /// Time between connection attempts.
    pub connect_int: Duration,
    /// Split-brain policy with no Primary.
    pub after_sb_0pri: AfterSb0Pri,
    /// Split-brain policy with one Primary.
    pub after_sb_1pri: AfterSb1Pri,
    /// Split-brain policy with two Primaries.
    pub after_sb_2pri: AfterSb2Pri,
    /// `data-integrity-alg = "crc32c"`: every replicated write carries a
    /// checksum the receiver verifies (a mismatch drops the link).
    pub data_integrity: bool,
    /// `fencing = "resource-only"`: when a Primary loses its peer, new
    /// writes wait until the `fence-peer` handler has returned.
    pub fencing: bool,
    /// `csums-alg = "crc32c"`: a resync compares block checksums first and
    /// sends only the blocks that differ.
    pub csums: bool,
}

/// `[disk]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Activity-log extents (4 MiB each).
    pub al_extents: u32,
    /// Resync rate in bytes per second.
    pub resync_rate: u64,
    /// Resync rate while application I/O is seen (DRBD's `c-min-rate`).
    pub c_min_rate: u64,
    /// What a local I/O error does.
    pub on_io_error: OnIoError,
}

/// Where a node's metadata lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaDisk {
    /// At the end of the backing device.
    Internal,
    /// On this device or file.
    External(PathBuf),
}

/// One `[[node]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's name (`--node`, or the host name).
    pub name: String,
    /// Replication link address as written, `host:port` or `[v6]:port`
    /// (checked: a host name or IP address and a port from 1 to 65535).
    pub address: String,
    /// Backing file or block device.
    pub disk: PathBuf,
    /// Metadata placement.
    pub meta_disk: MetaDisk,
    /// NBD listen address as written: `host:port` or `unix:/absolute/path`
    /// (checked; the syntax of `tandem_nbd::ListenAddr::parse`).
    pub nbd: String,
}

/// DRBD's handler names.
pub const HANDLERS: [&str; 7] = [
    "split-brain",
    "fence-peer",
    "before-resync-target",
    "after-resync-target",
    "out-of-sync",
    "local-io-error",
    "pri-lost-after-sb",
];

/// One resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceConfig {
    /// Resource name.
    pub name: String,
    /// The file it was read from.
    pub file: PathBuf,
    /// Replication protocol.
    pub protocol: Protocol,
    /// `[net]`.
    pub net: NetConfig,
    /// `[disk]`.
    pub disk: DiskConfig,
    /// The two nodes, in file order.
    pub nodes: Vec<NodeConfig>,
    /// Handler name → program.
    pub handlers: BTreeMap<String, String>,
}

impl ResourceConfig {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            ConfigError::Invalid {
                file: self.file.clone(),
                key: "node".into(),
                message: format!(
                    "this node, {name:?}, is not configured (nodes: {}; set --node or TANDEM_NODE)",
                    known.join(", ")
                ),
            }
        })
    }

    /// The other node of `name`.
    pub fn peer_of(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.node(name)?;
        self.nodes
            .iter()
            .find(|n| n.name != name)
            .ok_or_else(|| ConfigError::Invalid {
                file: self.file.clone(),
                key: "node".into(),
                message: "no peer node configured".into(),
            })
    }
}

/// Where configuration and runtime files are, and which node this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// Directory of `<resource>.toml` files.
    pub config_dir: PathBuf,
    /// This node's name.
    pub node: String,
    /// Control sockets and pid files.
    pub run_dir: PathBuf,
}

impl Paths {
    /// Command-line flag, else environment (`TANDEM_CONFIG_DIR`,
    /// `TANDEM_NODE`, `TANDEM_RUN_DIR`), else the default (`/etc/tandem`,
    /// the host name, `/run/tandem`).
    pub fn resolve(
        config_dir: Option<PathBuf>,
        node: Option<String>,
        run_dir: Option<PathBuf>,
    ) -> Self {
        Self::resolve_with(config_dir, node, run_dir, |k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })
    }

    /// [`Paths::resolve`] with the environment given as a function.
    pub fn resolve_with(
        config_dir: Option<PathBuf>,
        node: Option<String>,
        run_dir: Option<PathBuf>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        Self {
            config_dir: config_dir
                .or_else(|| env("TANDEM_CONFIG_DIR").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("/etc/tandem")),
            node: node
                .or_else(|| env("TANDEM_NODE"))
                .unwrap_or_else(default_node_name),
            run_dir: run_dir
                .or_else(|| env("TANDEM_RUN_DIR").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("/run/tandem")),
        }
    }
}

/// The host name (`uname -n`), DRBD's default node name.
pub fn default_node_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// What a name (resource or node) may be: safe as a file name
/// (`<name>.toml`, `<name>.sock`) and in a message.
const NAME_RULE: &str = "1 to 64 letters, digits, '_', '-' or '.', not starting with '.'";

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Read `<dir>/<resource>.toml`.
pub fn load(dir: &Path, resource: &str) -> Result<ResourceConfig, ConfigError> {
    if !valid_name(resource) {
        return Err(ConfigError::BadResourceName(resource.to_string()));
    }
    let file = dir.join(format!("{resource}.toml"));
    let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file, resource)
}

/// The keys of each table.
const TOP_KEYS: &[&str] = &["protocol", "net", "disk", "node", "handlers"];
const NET_KEYS: &[&str] = &[
    "shared-secret",
    "ping-int",
    "ping-timeout",
    "timeout",
    "connect-int",
    "after-sb-0pri",
    "after-sb-1pri",
    "after-sb-2pri",
    "data-integrity-alg",
    "fencing",
    "csums-alg",
    "verify-alg",
];
const DISK_KEYS: &[&str] = &["al-extents", "resync-rate", "c-min-rate", "on-io-error"];
const NODE_KEYS: &[&str] = &["name", "address", "disk", "meta-disk", "nbd"];

/// Parse the text of `file`, the configuration of `resource`. `file` is
/// only named in errors and kept in [`ResourceConfig::file`].
pub fn parse(text: &str, file: &Path, resource: &str) -> Result<ResourceConfig, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        ConfigError::Syntax {
            file: file.to_path_buf(),
            line,
            column,
            message: one_line(e.message()),
        }
    })?;
    let mut top = Section::new(file, String::new(), table, TOP_KEYS, "key")?;

    let protocol = choose(
        &mut top,
        "protocol",
        &[("A", Protocol::A), ("B", Protocol::B), ("C", Protocol::C)],
        Protocol::C,
    )?;
    let net = match top.table("net", NET_KEYS, "key")? {
        Some(mut s) => read_net(&mut s)?,
        None => NetConfig::default(),
    };
    let disk = match top.table("disk", DISK_KEYS, "key")? {
        Some(mut s) => read_disk(&mut s)?,
        None => DiskConfig::default(),
    };
    let nodes = read_nodes(&mut top)?;
    if let AfterSb0Pri::DiscardNode(name) = &net.after_sb_0pri {
        if !nodes.iter().any(|n| &n.name == name) {
            let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            return Err(invalid(
                file,
                "net.after-sb-0pri",
                format!(
                    "\"discard-node-{name}\" names no configured node (nodes: {})",
                    known.join(", ")
                ),
            ));
        }
    }
    let handlers = match top.table("handlers", HANDLERS.as_slice(), "handler")? {
        Some(s) => read_handlers(s)?,
        None => BTreeMap::new(),
    };
    Ok(ResourceConfig {
        name: resource.to_string(),
        file: file.to_path_buf(),
        protocol,
        net,
        disk,
        nodes,
        handlers,
    })
}

impl Default for NetConfig {
    /// DRBD's defaults.
    fn default() -> Self {
        Self {
            shared_secret: None,
            ping_int: Duration::from_secs(10),
            ping_timeout: Duration::from_millis(500),
            timeout: Duration::from_secs(6),
            connect_int: Duration::from_secs(10),
            after_sb_0pri: AfterSb0Pri::Disconnect,
            after_sb_1pri: AfterSb1Pri::Disconnect,
            after_sb_2pri: AfterSb2Pri::Disconnect,
            data_integrity: false,
            fencing: false,
            csums: false,
        }
    }
}

impl Default for DiskConfig {
    /// DRBD's defaults, and 100 MiB/s for the resync.
    fn default() -> Self {
        Self {
            al_extents: 1237,
            resync_rate: 100 << 20,
            c_min_rate: 250 << 10,
            on_io_error: OnIoError::Detach,
        }
    }
}

/// `[net]`. `discard-node-NAME` is checked against the nodes by the caller.
fn read_net(s: &mut Section<'_>) -> Result<NetConfig, ConfigError> {
    let d = NetConfig::default();
    let secret_expected = "a non-empty string (leave the key out for no authentication)";
    let shared_secret = match s.string("shared-secret", secret_expected)? {
        Some(secret) if secret.is_empty() => {
            return Err(s.error(
                "shared-secret",
                format!("expected {secret_expected}, found \"\""),
            ))
        }
        other => other,
    };
    const SB0: &[&str] = &[
        "disconnect",
        "discard-younger-primary",
        "discard-older-primary",
        "discard-zero-changes",
        "discard-least-changes",
        "discard-node-NAME",
    ];
    let sb0_expected = one_of(SB0);
    // Verify always compares crc32c digests; the key exists so that a
    // configuration carried over from DRBD says what it gets.
    choose(s, "verify-alg", &[("crc32c", ())], ())?;
    let after_sb_0pri = match s.string("after-sb-0pri", &sb0_expected)? {
        None => d.after_sb_0pri,
        Some(v) => match v.as_str() {
            "disconnect" => AfterSb0Pri::Disconnect,
            "discard-younger-primary" => AfterSb0Pri::DiscardYoungerPrimary,
            "discard-older-primary" => AfterSb0Pri::DiscardOlderPrimary,
            "discard-zero-changes" => AfterSb0Pri::DiscardZeroChanges,
            "discard-least-changes" => AfterSb0Pri::DiscardLeastChanges,
            _ => match v.strip_prefix("discard-node-") {
                Some(name) if !name.is_empty() => AfterSb0Pri::DiscardNode(name.to_string()),
                _ => {
                    return Err(s.error(
                        "after-sb-0pri",
                        format!("expected {sb0_expected}, found {v:?}"),
                    ))
                }
            },
        },
    };
    Ok(NetConfig {
        shared_secret,
        ping_int: duration(s, "ping-int", d.ping_int)?,
        ping_timeout: {
            let t = duration(s, "ping-timeout", d.ping_timeout)?;
            // DRBD's floor (its unit is a tenth of a second). Below it a
            // link drops whenever a wake-up or a frame boundary comes late
            // (the link writer may hold an owed ping for up to 20 ms).
            if t < Duration::from_millis(100) {
                return Err(s.error(
                    "ping-timeout",
                    format!("must be at least \"100ms\", found \"{}ms\"", t.as_millis()),
                ));
            }
            t
        },
        timeout: duration(s, "timeout", d.timeout)?,
        connect_int: duration(s, "connect-int", d.connect_int)?,
        data_integrity: choose(
            s,
            "data-integrity-alg",
            &[("none", false), ("crc32c", true)],
            d.data_integrity,
        )?,
        fencing: choose(
            s,
            "fencing",
            &[("dont-care", false), ("resource-only", true)],
            d.fencing,
        )?,
        csums: choose(
            s,
            "csums-alg",
            &[("none", false), ("crc32c", true)],
            d.csums,
        )?,
        after_sb_0pri,
        after_sb_1pri: choose(
            s,
            "after-sb-1pri",
            &[
                ("disconnect", AfterSb1Pri::Disconnect),
                ("consensus", AfterSb1Pri::Consensus),
                ("violently-as0p", AfterSb1Pri::ViolentlyAs0p),
                ("discard-secondary", AfterSb1Pri::DiscardSecondary),
                ("call-pri-lost-after-sb", AfterSb1Pri::CallPriLostAfterSb),
            ],
            d.after_sb_1pri,
        )?,
        after_sb_2pri: choose(
            s,
            "after-sb-2pri",
            &[
                ("disconnect", AfterSb2Pri::Disconnect),
                ("violently-as0p", AfterSb2Pri::ViolentlyAs0p),
                ("call-pri-lost-after-sb", AfterSb2Pri::CallPriLostAfterSb),
            ],
            d.after_sb_2pri,
        )?,
    })
}

/// `[disk]`.
fn read_disk(s: &mut Section<'_>) -> Result<DiskConfig, ConfigError> {
    let d = DiskConfig::default();
    // DRBD's limits: fewer than 7 extents cannot hold a request spanning
    // extents; 65534 fills the on-disk AL format.
    let al_expected = "an integer from 7 to 65534";
    let al_extents = match s.value("al-extents") {
        None => d.al_extents,
        Some(toml::Value::Integer(n)) => match u32::try_from(n) {
            Ok(n) if (7..=65534).contains(&n) => n,
            _ => return Err(s.error("al-extents", format!("expected {al_expected}, found {n}"))),
        },
        Some(other) => {
            return Err(s.error(
                "al-extents",
                format!("expected {al_expected}, found {}", describe(&other)),
            ))
        }
    };
    let resync_rate = match s.value("resync-rate") {
        None => d.resync_rate,
        Some(toml::Value::String(v)) => parse_rate(&v).map_err(|m| s.error("resync-rate", m))?,
        // A bare integer is bytes per second, like the string without a unit.
        Some(toml::Value::Integer(n)) => match u64::try_from(n) {
            Ok(n) if n > 0 => n,
            _ => return Err(s.error("resync-rate", format!("must be more than zero, found {n}"))),
        },
        Some(other) => {
            return Err(s.error(
                "resync-rate",
                format!("expected {}, found {}", values::RATE, describe(&other)),
            ))
        }
    };
    let c_min_rate = match s.value("c-min-rate") {
        None => d.c_min_rate,
        Some(toml::Value::String(v)) => parse_rate(&v).map_err(|m| s.error("c-min-rate", m))?,
        Some(toml::Value::Integer(n)) => match u64::try_from(n) {
            Ok(n) if n > 0 => n,
            _ => return Err(s.error("c-min-rate", format!("must be more than zero, found {n}"))),
        },
        Some(other) => {
            return Err(s.error(
                "c-min-rate",
                format!("expected {}, found {}", values::RATE, describe(&other)),
            ))
        }
    };
    let on_io_error = choose(
        s,
        "on-io-error",
        &[
            ("detach", OnIoError::Detach),
            ("pass_on", OnIoError::PassOn),
            ("call-local-io-error", OnIoError::CallLocalIoError),
        ],
        d.on_io_error,
    )?;
    Ok(DiskConfig {
        al_extents,
        resync_rate,
        c_min_rate,
        on_io_error,
    })
}

/// A node with its addresses parsed, for the checks between the two.
struct ParsedNode {
    config: NodeConfig,
    address: values::HostPort,
    nbd: values::Listen,
}

/// The `[[node]]` array: exactly two nodes, each valid, not in each other's
/// way.
fn read_nodes(top: &mut Section<'_>) -> Result<Vec<NodeConfig>, ConfigError> {
    let file = top.file();
    let count_expected = "exactly two [[node]] tables (tandem pairs two nodes)";
    let list = match top.value("node") {
        None => Vec::new(),
        Some(toml::Value::Array(list)) => list,
        Some(other) => {
            return Err(top.error(
                "node",
                format!("expected {count_expected}, found {}", describe(&other)),
            ))
        }
    };
    if list.len() != 2 {
        return Err(top.error(
            "node",
            format!("expected {count_expected}, found {}", list.len()),
        ));
    }
    let mut nodes = Vec::with_capacity(2);
    for (i, value) in list.into_iter().enumerate() {
        let path = format!("node[{i}]");
        let toml::Value::Table(table) = value else {
            return Err(invalid(
                file,
                &path,
                format!("expected a [[node]] table, found {}", describe(&value)),
            ));
        };
        let mut s = Section::new(file, path, table, NODE_KEYS, "key")?;
        nodes.push(read_node(&mut s)?);
    }
    check_pair(file, &nodes)?;
    Ok(nodes.into_iter().map(|n| n.config).collect())
}

/// One `[[node]]`.
fn read_node(s: &mut Section<'_>) -> Result<ParsedNode, ConfigError> {
    let name_expected = format!("a node name of {NAME_RULE}");
    let name = s.required_string("name", &name_expected)?;
    if !valid_name(&name) {
        return Err(s.error("name", format!("expected {name_expected}, found {name:?}")));
    }
    let address_text = s.required_string("address", values::HOST_PORT)?;
    let address = values::parse_host_port(&address_text).map_err(|m| s.error("address", m))?;
    let disk_expected = "the absolute path of the backing file or block device";
    let disk_text = s.required_string("disk", disk_expected)?;
    let disk = PathBuf::from(&disk_text);
    if !disk.is_absolute() {
        return Err(s.error(
            "disk",
            format!("expected {disk_expected}, found {disk_text:?}"),
        ));
    }
    let meta_expected = "\"internal\" or the absolute path of a metadata file or device";
    let meta_text = s.required_string("meta-disk", meta_expected)?;
    let meta_disk = match meta_text.as_str() {
        "internal" => MetaDisk::Internal,
        p if Path::new(p).is_absolute() => MetaDisk::External(PathBuf::from(p)),
        p => {
            return Err(s.error(
                "meta-disk",
                format!("expected {meta_expected}, found {p:?}"),
            ))
        }
    };
    if meta_disk == MetaDisk::External(disk.clone()) {
        return Err(s.error(
            "meta-disk",
            format!(
                "{meta_text:?} is this node's disk itself (use \"internal\" for metadata on the data disk)"
            ),
        ));
    }
    let nbd_text = s.required_string("nbd", values::NBD)?;
    let nbd = values::parse_listen(&nbd_text).map_err(|m| s.error("nbd", m))?;
    if nbd == values::Listen::Tcp(address.clone()) {
        return Err(s.error(
            "nbd",
            format!("{nbd_text:?} is this node's replication address too; use another port"),
        ));
    }
    Ok(ParsedNode {
        config: NodeConfig {
            name,
            address: address_text,
            disk,
            meta_disk,
            nbd: nbd_text,
        },
        address,
        nbd,
    })
}

/// The two nodes must be told apart and, when they share a host (tests,
/// demos), must not listen on one port or write one file.
fn check_pair(file: &Path, nodes: &[ParsedNode]) -> Result<(), ConfigError> {
    let [a, b] = nodes else {
        return Ok(());
    };
    let (ac, bc) = (&a.config, &b.config);
    if ac.name == bc.name {
        return Err(invalid(
            file,
            "node[1].name",
            format!("{:?} is used by node[0] too", bc.name),
        ));
    }
    if a.address == b.address {
        return Err(invalid(
            file,
            "node[1].address",
            format!("{:?} is node[0].address too", bc.address),
        ));
    }
    if a.address.host != b.address.host {
        // Different hosts: the same NBD address or disk path on both is
        // normal (each node exports its own device).
        return Ok(());
    }
    let same_host = format!("both nodes are on host {}", a.address.host);
    let conflict = |key: &str, value: &str, other: &str| {
        invalid(
            file,
            key,
            format!("{value:?} is {other} too, and {same_host}"),
        )
    };
    if a.nbd == b.nbd {
        return Err(conflict("node[1].nbd", &bc.nbd, "node[0].nbd"));
    }
    if b.nbd == values::Listen::Tcp(a.address.clone()) {
        return Err(conflict("node[1].nbd", &bc.nbd, "node[0].address"));
    }
    if a.nbd == values::Listen::Tcp(b.address.clone()) {
        return Err(conflict("node[0].nbd", &ac.nbd, "node[1].address"));
    }
    let files = |n: &NodeConfig| {
        let mut v = vec![("disk", n.disk.clone())];
        if let MetaDisk::External(p) = &n.meta_disk {
            v.push(("meta-disk", p.clone()));
        }
        v
    };
    for (bkey, bpath) in files(bc) {
        for (akey, apath) in files(ac) {
            if apath == bpath {
                return Err(conflict(
                    &format!("node[1].{bkey}"),
                    &bpath.display().to_string(),
                    &format!("node[0].{akey}"),
                ));
            }
        }
    }
    Ok(())
}

/// `[handlers]` (names already checked against [`HANDLERS`]).
fn read_handlers(s: Section<'_>) -> Result<BTreeMap<String, String>, ConfigError> {
    let file = s.file();
    let expected = "a program to run (a non-empty string)";
    let mut handlers = BTreeMap::new();
    for (name, value) in s.into_entries() {
        match value {
            toml::Value::String(program) if !program.trim().is_empty() => {
                handlers.insert(name, program);
            }
            other => {
                return Err(invalid(
                    file,
                    &format!("handlers.{name}"),
                    format!("expected {expected}, found {}", describe(&other)),
                ))
            }
        }
    }
    Ok(handlers)
}

/// A duration at `key`, or `default`.
fn duration(s: &mut Section<'_>, key: &str, default: Duration) -> Result<Duration, ConfigError> {
    match s.string(key, values::DURATION)? {
        None => Ok(default),
        Some(v) => parse_duration(&v).map_err(|m| s.error(key, m)),
    }
}

/// One of a fixed set of words at `key`, or `default`.
fn choose<T: Clone>(
    s: &mut Section<'_>,
    key: &str,
    options: &[(&str, T)],
    default: T,
) -> Result<T, ConfigError> {
    let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
    let expected = one_of(&names);
    let Some(v) = s.string(key, &expected)? else {
        return Ok(default);
    };
    options
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, value)| value.clone())
        .ok_or_else(|| s.error(key, format!("expected {expected}, found {v:?}")))
}

/// `"a, b or c"`.
fn one_of(names: &[&str]) -> String {
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

fn invalid(file: &Path, key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_string(),
        message,
    }
}

/// A parser message on one line.
fn one_line(message: &str) -> String {
    message
        .split(|c: char| c.is_control())
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = text.get(..end).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// An I/O error's description without the "(os error 2)" suffix, which
/// says nothing the words do not.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    let words = s
        .strip_suffix(')')
        .and_then(|t| t.rsplit_once(" (os error "))
        .map(|(words, _)| words.to_string());
    words.unwrap_or(s)
}

/// A hint for an unreadable configuration file.
fn read_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::NotFound {
        " (is the resource configured?)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests;
