//! The `tandem` command.
//!
//! Exit codes: 0 success; 1 the operation failed (the message says why);
//! 2 bad command line; 3 the resource is not up on this node; 11 a state
//! change was refused (the line says why, in DRBD's words where it can).

mod daemon_cmd;
mod demo;
mod meta_cmd;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tandem_blockdev::{BlockDevice, FileDevice, FileOptions};
use tandem_nbd::{ListenAddr, Listener, ServerConfig, ServerStats};
use tokio::sync::watch;
use tracing::{info, warn};

/// tandem: a DRBD-style replicated block device in userspace.
#[derive(Parser, Debug)]
#[command(name = "tandem", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    verb: Verb,
}

/// Where configuration and runtime files are, and who this node is.
#[derive(Args, Debug)]
struct Globals {
    /// Directory of resource configuration files [env: TANDEM_CONFIG_DIR] [default: /etc/tandem]
    #[arg(long, global = true, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// This node's name [env: TANDEM_NODE] [default: the host name]
    #[arg(long, global = true, value_name = "NAME")]
    node: Option<String>,
    /// Directory for control sockets and pid files [env: TANDEM_RUN_DIR] [default: /run/tandem]
    #[arg(long, global = true, value_name = "DIR")]
    run_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Write fresh metadata on this node's disk.
    CreateMd {
        /// Resource name (its configuration is CONFIG_DIR/RESOURCE.toml).
        resource: String,
        /// Overwrite existing metadata.
        #[arg(long)]
        force: bool,
    },
    /// Print the metadata: superblock, generation ids, flags, activity log,
    /// out-of-sync count.
    DumpMd {
        /// Resource name.
        resource: String,
        /// Machine-readable JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Destroy the metadata.
    WipeMd {
        /// Resource name.
        resource: String,
    },
    /// Serve a file or block device over NBD, without replication
    /// (a baseline and a debugging aid).
    Serve(ServeArgs),
    /// Start the resource's daemon in the background.
    Up {
        /// Resource name.
        resource: String,
    },
    /// Run the resource's daemon in the foreground.
    Run {
        /// Resource name.
        resource: String,
    },
    /// Stop the resource's daemon.
    Down {
        /// Resource name.
        resource: String,
        /// Disconnect NBD clients first.
        #[arg(long)]
        force: bool,
    },
    /// Promote this node to Primary.
    Primary {
        /// Resource name.
        resource: String,
        /// Promote without UpToDate data.
        #[arg(long)]
        force: bool,
    },
    /// Demote this node to Secondary.
    Secondary {
        /// Resource name.
        resource: String,
        /// Disconnect NBD clients first.
        #[arg(long)]
        force: bool,
    },
    /// Connect to the peer (leave StandAlone).
    Connect {
        /// Resource name.
        resource: String,
        /// If split brain is found, this node's changes are discarded and
        /// it is resynced from the peer.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the link to the peer and stay StandAlone.
    Disconnect {
        /// Resource name.
        resource: String,
    },
    /// Start a new data generation; with --clear-bitmap on a fresh
    /// connected pair, skip the initial sync.
    NewCurrentUuid {
        /// Resource name.
        resource: String,
        /// Declare both nodes' data identical.
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Resync this node's whole device from the peer.
    Invalidate {
        /// Resource name.
        resource: String,
    },
    /// Resync the peer's whole device from this node.
    InvalidateRemote {
        /// Resource name.
        resource: String,
    },
    /// Compare both nodes' data online; differing blocks are counted and
    /// marked out of sync.
    Verify {
        /// Resource name.
        resource: String,
    },
    /// Pause the running resync.
    PauseSync {
        /// Resource name.
        resource: String,
    },
    /// Resume a paused resync.
    ResumeSync {
        /// Resource name.
        resource: String,
    },
    /// Give up the local disk (Secondary only): the metadata is closed
    /// cleanly and the disk released; the peer marks what it writes.
    Detach {
        /// Resource name.
        resource: String,
    },
    /// Take the local disk again and renegotiate with the peer.
    Attach {
        /// Resource name.
        resource: String,
    },
    /// Mark this node's data Outdated.
    Outdate {
        /// Resource name.
        resource: String,
    },
    /// Print Local/Peer roles.
    Role {
        /// Resource name.
        resource: String,
    },
    /// Print the connection state.
    Cstate {
        /// Resource name.
        resource: String,
    },
    /// Print Local/Peer disk states.
    Dstate {
        /// Resource name.
        resource: String,
    },
    /// Show the status of one or every resource.
    Status {
        /// Resource name (all configured resources when omitted).
        resource: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print one JSON line per state change, after the current state.
    Events {
        /// Resource name.
        resource: String,
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
    },
    /// Two nodes on loopback with temporary disks, the Primary exported
    /// over NBD, live status until Ctrl-C.
    Demo(demo::DemoArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Backing file or block device.
    path: PathBuf,
    /// Listen address: HOST:PORT (port 0 picks a free one) or unix:/path.
    #[arg(long, value_name = "ADDR", value_parser = ListenAddr::parse)]
    listen: ListenAddr,
    /// Refuse writes, trims and zeroing.
    #[arg(long)]
    read_only: bool,
    /// Export name offered to clients (the empty name also works).
    #[arg(long, value_name = "NAME", default_value = "")]
    export_name: String,
    /// Export description shown by `nbdinfo`.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Bypass the page cache (O_DIRECT) for aligned requests.
    #[arg(long)]
    direct: bool,
    /// Most clients served at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_connections: usize,
    /// Longest busy-poll, in microseconds, of a connection with nothing in
    /// flight before it sleeps (adaptive; 0 never polls).
    #[arg(long, value_name = "US", default_value_t = tandem_nbd::DEFAULT_IDLE_POLL.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    idle_poll_us: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let g = &cli.globals;
    let paths =
        || tandem_config::Paths::resolve(g.config_dir.clone(), g.node.clone(), g.run_dir.clone());
    let simple = |resource: &str, verb: &str, force: bool| {
        daemon_cmd::simple(
            &paths(),
            resource,
            tandem_engine::control::Request {
                verb: verb.into(),
                force,
                ..Default::default()
            },
        )
    };
    let result: Result<(), daemon_cmd::Failure> = match cli.verb {
        Verb::Serve(args) => serve(args).map_err(Into::into),
        Verb::CreateMd { resource, force } => meta_target(g, &resource)
            .and_then(|t| meta_cmd::create_md(&t, force).map(say))
            .map_err(Into::into),
        Verb::DumpMd { resource, json } => meta_target(g, &resource)
            .and_then(|t| meta_cmd::dump_md(&t, json).map(say))
            .map_err(Into::into),
        Verb::WipeMd { resource } => meta_target(g, &resource)
            .and_then(|t| meta_cmd::wipe_md(&t).map(say))
            .map_err(Into::into),
        Verb::Up { resource } => daemon_cmd::up(&paths(), &resource),
        Verb::Run { resource } => daemon_cmd::run(&paths(), &resource),
        Verb::Down { resource, force } => daemon_cmd::down(&paths(), &resource, force),
        Verb::Primary { resource, force } => simple(&resource, "primary", force),
        Verb::Secondary { resource, force } => simple(&resource, "secondary", force),
        Verb::Connect {
            resource,
            discard_my_data,
        } => daemon_cmd::simple(
            &paths(),
            &resource,
            tandem_engine::control::Request {
                verb: "connect".into(),
                discard_my_data,
                ..Default::default()
            },
        ),
        Verb::Disconnect { resource } => simple(&resource, "disconnect", false),
        Verb::Outdate { resource } => simple(&resource, "outdate", false),
        Verb::Detach { resource } => simple(&resource, "detach", false),
        Verb::Invalidate { resource } => simple(&resource, "invalidate", false),
        Verb::InvalidateRemote { resource } => simple(&resource, "invalidate-remote", false),
        Verb::PauseSync { resource } => simple(&resource, "pause-sync", false),
        Verb::Verify { resource } => simple(&resource, "verify", false),
        Verb::ResumeSync { resource } => simple(&resource, "resume-sync", false),
        Verb::Attach { resource } => simple(&resource, "attach", false),
        Verb::Role { resource } => simple(&resource, "role", false),
        Verb::Cstate { resource } => simple(&resource, "cstate", false),
        Verb::Dstate { resource } => simple(&resource, "dstate", false),
        Verb::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => daemon_cmd::simple(
            &paths(),
            &resource,
            tandem_engine::control::Request {
                verb: "new-current-uuid".into(),
                clear_bitmap,
                ..Default::default()
            },
        ),
        Verb::Status { resource, json } => daemon_cmd::status(&paths(), resource.as_deref(), json),
        Verb::Events { resource, now } => daemon_cmd::events(&paths(), &resource, now),
        Verb::Demo(args) => demo::run(args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("tandem: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn say(line: String) {
    println!("{line}");
}

/// This node's metadata location for `resource`, from its configuration.
fn meta_target(g: &Globals, resource: &str) -> Result<meta_cmd::MetaTarget, String> {
    let paths =
        tandem_config::Paths::resolve(g.config_dir.clone(), g.node.clone(), g.run_dir.clone());
    let cfg = tandem_config::load(&paths.config_dir, resource).map_err(|e| e.to_string())?;
    let node = cfg.node(&paths.node).map_err(|e| e.to_string())?;
    Ok(meta_cmd::MetaTarget {
        resource: resource.to_string(),
        disk: node.disk.clone(),
        meta_disk: match &node.meta_disk {
            tandem_config::MetaDisk::Internal => None,
            tandem_config::MetaDisk::External(p) => Some(p.clone()),
        },
        al_extents: cfg.disk.al_extents,
    })
}

/// How long a graceful shutdown may take before the process gives up on
/// connections that will not drain.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

fn serve(args: ServeArgs) -> Result<(), String> {
    let opts = FileOptions {
        read_only: args.read_only,
        direct: args.direct,
        ..FileOptions::default()
    };
    let device = FileDevice::open(&args.path, &opts).map_err(|e| e.to_string())?;
    tandem_engine::keep_payload_buffers();
    // A server whose client is the local kernel must keep making progress
    // when the kernel reclaims memory by writing to this very device.
    if let Err(e) = rustix::process::configure_io_flusher_behavior(true) {
        tracing::debug!("PR_SET_IO_FLUSHER not set: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tandem")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = Listener::bind(&args.listen)
            .await
            .map_err(|e| format!("cannot listen on {:?}: {e}", args.listen))?;
        let addr = listener.local_addr();
        // Signals are caught from before the ready line: a SIGTERM sent the
        // moment a script sees it must drain, not kill.
        let signals = Signals::new()?;
        info!(
            path = %args.path.display(),
            size = device.size(),
            read_only = args.read_only,
            direct = args.direct,
            "serving on {addr}"
        );
        // The ready line: scripts wait for it and read the bound address.
        println!("listening on {addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();

        let (tx, rx) = watch::channel(false);
        let config = ServerConfig {
            export_name: args.export_name,
            description: args.description,
            max_connections: args.max_connections,
            idle_poll: Duration::from_micros(args.idle_poll_us),
            ..ServerConfig::default()
        };
        let stats = Arc::new(ServerStats::default());
        let server = tokio::spawn(tandem_nbd::serve(
            Arc::new(device),
            config,
            listener,
            rx,
            Arc::clone(&stats),
        ));
        signals.wait().await;
        info!(
            clients = stats.clients(),
            "shutting down: draining connections"
        );
        let _ = tx.send(true);
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, server).await {
            Ok(Ok(Ok(()))) => {
                info!("stopped");
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(format!("server failed: {e}")),
            Ok(Err(e)) => Err(format!("server task failed: {e}")),
            Err(_) => {
                warn!("connections did not drain within {SHUTDOWN_TIMEOUT:?}");
                Err(format!(
                    "shutdown timed out after {SHUTDOWN_TIMEOUT:?} with clients still busy"
                ))
            }
        }
    })
}

/// SIGTERM and SIGINT, caught from creation on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| format!("cannot catch SIGTERM: {e}"))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| format!("cannot catch SIGINT: {e}"))?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
