//! `tandem demo`: the embedded default. Two nodes of one resource on
//! loopback, each with a temporary backing file, connected, the fresh pair
//! declared in sync, alpha Primary and exported over NBD; a live status
//! line until Ctrl-C, then everything is stopped and removed.

use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_engine::control::{self, Request};

/// Options of `tandem demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of each backing file in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    size_mib: u64,
    /// Replication protocol.
    #[arg(long, value_name = "A|B|C", default_value = "C")]
    protocol: String,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long, value_name = "SECS")]
    seconds: Option<u64>,
}

struct Node {
    name: &'static str,
    run_dir: PathBuf,
    nbd: String,
    child: Option<Child>,
}

struct Demo {
    dir: PathBuf,
    etc: PathBuf,
    nodes: Vec<Node>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                if let Ok(rt) = &rt {
                    let req = Request {
                        verb: "down".into(),
                        force: true,
                        ..Default::default()
                    };
                    let _ = rt.block_on(control::call(&n.run_dir, "r0", &req));
                }
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) => break,
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        _ => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn tandem(etc: &Path, node: &str, run_dir: &Path) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut c = Command::new(exe);
    c.arg("--config-dir")
        .arg(etc)
        .arg("--node")
        .arg(node)
        .arg("--run-dir")
        .arg(run_dir);
    Ok(c)
}

/// Run the demo.
pub fn run(args: DemoArgs) -> Result<(), String> {
    let protocol = match args.protocol.as_str() {
        "A" | "B" | "C" => args.protocol.clone(),
        other => return Err(format!("--protocol {other:?}: expected A, B or C")),
    };
    if args.size_mib < 16 {
        return Err(format!(
            "--size-mib {}: expected at least 16",
            args.size_mib
        ));
    }
    let dir = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).map_err(|e| format!("cannot create {}: {e}", etc.display()))?;
    let mut demo = Demo {
        dir: dir.clone(),
        etc: etc.clone(),
        nodes: Vec::new(),
    };
    let mut toml = format!(
        "protocol = \"{protocol}\"\n\n[net]\nshared-secret = \"demo-{}\"\nconnect-int = \"1s\"\n\n",
        std::process::id()
    );
    for name in ["alpha", "beta"] {
        let disk = dir.join(format!("{name}.img"));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(args.size_mib << 20))
            .map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
        let run_dir = dir.join(name);
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let nbd = format!("127.0.0.1:{}", free_port()?);
        toml.push_str(&format!(
            "[[node]]\nname = \"{name}\"\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nmeta-disk = \"internal\"\nnbd = \"{nbd}\"\n\n",
            free_port()?,
            disk.display()
        ));
        demo.nodes.push(Node {
            name,
            run_dir,
            nbd,
            child: None,
        });
    }
    let cfg_path = etc.join("r0.toml");
    std::fs::write(&cfg_path, toml)
        .map_err(|e| format!("cannot write {}: {e}", cfg_path.display()))?;

    for n in &mut demo.nodes {
        let out = tandem(&demo.etc, n.name, &n.run_dir)?
            .args(["create-md", "r0"])
            .output()
            .map_err(|e| format!("create-md: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "create-md on {}: {}",
                n.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let log = std::fs::File::create(n.run_dir.join("r0.log"))
            .map_err(|e| format!("cannot create the log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("log: {e}"))?;
        use std::os::unix::process::CommandExt;
        let child = tandem(&demo.etc, n.name, &n.run_dir)?
            .args(["run", "r0"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Ctrl-C is for the demo, which then stops the nodes in order.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", n.name))?;
        n.child = Some(child);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let ask = |n: &Node, verb: &str, clear_bitmap: bool| -> Result<control::Response, String> {
        let req = Request {
            verb: verb.into(),
            clear_bitmap,
            ..Default::default()
        };
        rt.block_on(control::call(&n.run_dir, "r0", &req))
            .map_err(|e| e.to_string())
    };
    let wait = |n: &Node, verb: &str, want: &str| -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = ask(n, verb, false) {
                if r.output == want {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: {verb} did not become {want} within 30 s (log: {})",
                    n.name,
                    n.run_dir.join("r0.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    println!("starting two nodes of resource r0 in {}", dir.display());
    for n in &demo.nodes {
        wait(n, "cstate", "Connected")?;
    }
    let r = ask(&demo.nodes[0], "new-current-uuid", true)?;
    if !r.ok {
        return Err(format!("new-current-uuid --clear-bitmap: {}", r.error));
    }
    for n in &demo.nodes {
        wait(n, "dstate", "UpToDate/UpToDate")?;
    }
    let r = ask(&demo.nodes[0], "primary", false)?;
    if !r.ok {
        return Err(format!("primary: {}", r.error));
    }
    let nbd = &demo.nodes[0].nbd;
    println!(
        "alpha is Primary, beta Secondary, protocol {protocol}, {} MiB.\n\
         The device is exported at nbd://{nbd}/r0 — try:\n  \
         nbdinfo nbd://{nbd}/r0\n  \
         qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://{nbd}/r0\n  \
         tandem --config-dir {} --node alpha --run-dir {} status r0\n\
         Press Ctrl-C to stop.",
        args.size_mib,
        demo.etc.display(),
        demo.nodes[0].run_dir.display()
    );
    let deadline = args
        .seconds
        .map(|s| Instant::now() + Duration::from_secs(s));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    // Ctrl-C, or a supervisor's SIGTERM: stop the nodes in order.
                    match signal(SignalKind::terminate()) {
                        Ok(mut term) => tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        },
                        Err(_) => {
                            let _ = tokio::signal::ctrl_c().await;
                        }
                    }
                });
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && !deadline.is_some_and(|d| Instant::now() >= d)
    {
        let line: Vec<String> = demo
            .nodes
            .iter()
            .map(|n| {
                let role = ask(n, "role", false).map(|r| r.output).unwrap_or_default();
                let cs = ask(n, "cstate", false)
                    .map(|r| r.output)
                    .unwrap_or_default();
                let ds = ask(n, "dstate", false)
                    .map(|r| r.output)
                    .unwrap_or_default();
                format!("{}: {role} {cs} {ds}", n.name)
            })
            .collect();
        println!("{}", line.join("  |  "));
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("stopping both nodes and removing {}", dir.display());
    drop(demo);
    Ok(())
}
