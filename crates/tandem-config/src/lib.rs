//! The resource configuration: one TOML file per resource,
//! `<config-dir>/<resource>.toml`, parsed into typed values at the edge.
//!
//! Every problem is one line naming the file, the key and what was
//! expected; unknown keys are errors (a typo must not silently fall back to
//! a default). The keys are DRBD's option names so that an operator's
//! `drbd.conf` knowledge carries over. Reference: `docs/configuration.md`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod values;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use values::{parse_duration, parse_rate};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source} (is the resource configured?)", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
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
    /// A value that parses but cannot be used.
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
    #[error("invalid resource name {0:?}: use 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'")]
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
}

/// `[disk]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Activity-log extents (4 MiB each).
    pub al_extents: u32,
    /// Resync rate in bytes per second.
    pub resync_rate: u64,
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
    /// Replication link address, `host:port`.
    pub address: String,
    /// Backing file or block device.
    pub disk: PathBuf,
    /// Metadata placement.
    pub meta_disk: MetaDisk,
    /// NBD listen address: `host:port` or `unix:/path`.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    protocol: Option<String>,
    net: Option<RawNet>,
    disk: Option<RawDisk>,
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    handlers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNet {
    shared_secret: Option<String>,
    ping_int: Option<String>,
    ping_timeout: Option<String>,
    timeout: Option<String>,
    connect_int: Option<String>,
    after_sb_0pri: Option<String>,
    after_sb_1pri: Option<String>,
    after_sb_2pri: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDisk {
    al_extents: Option<i64>,
    resync_rate: Option<String>,
    on_io_error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    name: String,
    address: String,
    disk: String,
    meta_disk: String,
    nbd: String,
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary_compat(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, i: usize) -> usize {
        let mut i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Parse the text of `file`, the configuration of `resource`.
pub fn parse(text: &str, file: &Path, resource: &str) -> Result<ResourceConfig, ConfigError> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        ConfigError::Syntax {
            file: file.to_path_buf(),
            line,
            column,
            message: e.message().trim().replace('\n', " "),
        }
    })?;
    let bad = |key: &str, message: String| ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let protocol = match raw.protocol.as_deref() {
        None | Some("C") => Protocol::C,
        Some("A") => Protocol::A,
        Some("B") => Protocol::B,
        Some(other) => {
            return Err(bad(
                "protocol",
                format!("expected \"A\", \"B\" or \"C\", found {other:?}"),
            ))
        }
    };

    let rn = raw.net.unwrap_or_default();
    let dur = |key: &str, v: Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(s) => parse_duration(&s).map_err(|m| bad(&format!("net.{key}"), m)),
    };
    if rn.shared_secret.as_deref() == Some("") {
        return Err(bad(
            "net.shared-secret",
            "is empty (leave it out for no authentication)".into(),
        ));
    }

    let mut nodes = Vec::new();
    for (i, n) in raw.node.into_iter().enumerate() {
        let key = |k: &str| format!("node[{i}].{k}");
        if !valid_name(&n.name) {
            return Err(bad(
                &key("name"),
                format!(
                    "{:?} is not a node name: use 1 to 64 letters, digits, '_', '-' or '.'",
                    n.name
                ),
            ));
        }
        values::check_host_port(&n.address).map_err(|m| bad(&key("address"), m))?;
        let disk = PathBuf::from(&n.disk);
        if !disk.is_absolute() {
            return Err(bad(
                &key("disk"),
                format!("expected an absolute path, found {:?}", n.disk),
            ));
        }
        let meta_disk = match n.meta_disk.as_str() {
            "internal" => MetaDisk::Internal,
            p if Path::new(p).is_absolute() => MetaDisk::External(PathBuf::from(p)),
            p => {
                return Err(bad(
                    &key("meta-disk"),
                    format!("expected \"internal\" or an absolute path, found {p:?}"),
                ))
            }
        };
        if meta_disk == MetaDisk::External(disk.clone()) {
            return Err(bad(
                &key("meta-disk"),
                "is the data disk itself (use \"internal\" for metadata on the data disk)".into(),
            ));
        }
        match n.nbd.strip_prefix("unix:") {
            Some(p) if Path::new(p).is_absolute() => {}
            Some(p) => {
                return Err(bad(
                    &key("nbd"),
                    format!("expected \"unix:\" and an absolute path, found \"unix:{p}\""),
                ))
            }
            None => values::check_host_port(&n.nbd).map_err(|m| bad(&key("nbd"), m))?,
        }
        nodes.push(NodeConfig {
            name: n.name,
            address: n.address,
            disk,
            meta_disk,
            nbd: n.nbd,
        });
    }
    if nodes.len() != 2 {
        return Err(bad(
            "node",
            format!(
                "expected exactly two [[node]] tables (tandem pairs two nodes), found {}",
                nodes.len()
            ),
        ));
    }
    if nodes[0].name == nodes[1].name {
        return Err(bad(
            "node[1].name",
            format!("{:?} is used by node[0] too", nodes[1].name),
        ));
    }
    if nodes[0].address == nodes[1].address {
        return Err(bad(
            "node[1].address",
            format!("{:?} is used by node[0] too", nodes[1].address),
        ));
    }

    let after_sb_0pri = match rn.after_sb_0pri.as_deref() {
        None | Some("disconnect") => AfterSb0Pri::Disconnect,
        Some("discard-younger-primary") => AfterSb0Pri::DiscardYoungerPrimary,
        Some("discard-older-primary") => AfterSb0Pri::DiscardOlderPrimary,
        Some("discard-zero-changes") => AfterSb0Pri::DiscardZeroChanges,
        Some("discard-least-changes") => AfterSb0Pri::DiscardLeastChanges,
        Some(s) if s.starts_with("discard-node-") => {
            let name = &s["discard-node-".len()..];
            if !nodes.iter().any(|n| n.name == name) {
                return Err(bad(
                    "net.after-sb-0pri",
                    format!("{s:?} names no configured node"),
                ));
            }
            AfterSb0Pri::DiscardNode(name.to_string())
        }
        Some(s) => return Err(bad("net.after-sb-0pri", format!(
            "expected disconnect, discard-younger-primary, discard-older-primary, discard-zero-changes, discard-least-changes or discard-node-NAME, found {s:?}"
        ))),
    };
    let after_sb_1pri = match rn.after_sb_1pri.as_deref() {
        None | Some("disconnect") => AfterSb1Pri::Disconnect,
        Some("consensus") => AfterSb1Pri::Consensus,
        Some("violently-as0p") => AfterSb1Pri::ViolentlyAs0p,
        Some("discard-secondary") => AfterSb1Pri::DiscardSecondary,
        Some("call-pri-lost-after-sb") => AfterSb1Pri::CallPriLostAfterSb,
        Some(s) => return Err(bad("net.after-sb-1pri", format!(
            "expected disconnect, consensus, violently-as0p, discard-secondary or call-pri-lost-after-sb, found {s:?}"
        ))),
    };
    let after_sb_2pri = match rn.after_sb_2pri.as_deref() {
        None | Some("disconnect") => AfterSb2Pri::Disconnect,
        Some("violently-as0p") => AfterSb2Pri::ViolentlyAs0p,
        Some("call-pri-lost-after-sb") => AfterSb2Pri::CallPriLostAfterSb,
        Some(s) => {
            return Err(bad(
                "net.after-sb-2pri",
                format!(
                    "expected disconnect, violently-as0p or call-pri-lost-after-sb, found {s:?}"
                ),
            ))
        }
    };
    let net = NetConfig {
        shared_secret: rn.shared_secret,
        ping_int: dur("ping-int", rn.ping_int, Duration::from_secs(10))?,
        ping_timeout: dur("ping-timeout", rn.ping_timeout, Duration::from_millis(500))?,
        timeout: dur("timeout", rn.timeout, Duration::from_secs(6))?,
        connect_int: dur("connect-int", rn.connect_int, Duration::from_secs(10))?,
        after_sb_0pri,
        after_sb_1pri,
        after_sb_2pri,
    };

    let rd = raw.disk.unwrap_or_default();
    let al_extents = match rd.al_extents {
        None => 1237,
        Some(n) if (7..=65534).contains(&n) => n as u32,
        Some(n) => {
            return Err(bad(
                "disk.al-extents",
                format!("expected 7 to 65534, found {n}"),
            ))
        }
    };
    let resync_rate = match rd.resync_rate {
        None => 100 << 20,
        Some(s) => parse_rate(&s).map_err(|m| bad("disk.resync-rate", m))?,
    };
    let on_io_error = match rd.on_io_error.as_deref() {
        None | Some("detach") => OnIoError::Detach,
        Some("pass_on") | Some("pass-on") => OnIoError::PassOn,
        Some("call-local-io-error") => OnIoError::CallLocalIoError,
        Some(s) => {
            return Err(bad(
                "disk.on-io-error",
                format!("expected detach, pass_on or call-local-io-error, found {s:?}"),
            ))
        }
    };
    for (name, program) in &raw.handlers {
        if !HANDLERS.contains(&name.as_str()) {
            return Err(bad(
                &format!("handlers.{name}"),
                format!("unknown handler (known: {})", HANDLERS.join(", ")),
            ));
        }
        if program.trim().is_empty() {
            return Err(bad(&format!("handlers.{name}"), "is empty".into()));
        }
    }
    Ok(ResourceConfig {
        name: resource.to_string(),
        file: file.to_path_buf(),
        protocol,
        net,
        disk: DiskConfig {
            al_extents,
            resync_rate,
            on_io_error,
        },
        nodes,
        handlers: raw.handlers,
    })
}

#[cfg(test)]
mod tests;
