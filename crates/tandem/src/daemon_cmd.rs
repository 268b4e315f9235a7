//! Verbs that start, stop and talk to a resource's daemon.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tandem_config::Paths;
use tandem_engine::control::{self, CallError, Request, EXIT_NOT_RUNNING};

/// A failed verb: exit code and the one line to print.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { code: 1, message }
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        let code = match e {
            CallError::NotRunning { .. } => EXIT_NOT_RUNNING,
            CallError::Failed { .. } => 1,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::from(format!("cannot start the runtime: {e}")))
}

fn load(paths: &Paths, resource: &str) -> Result<tandem_config::ResourceConfig, Failure> {
    let cfg = tandem_config::load(&paths.config_dir, resource).map_err(|e| e.to_string())?;
    cfg.node(&paths.node).map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// `run RES`: the daemon in the foreground.
pub fn run(paths: &Paths, resource: &str) -> Result<(), Failure> {
    let cfg = load(paths, resource)?;
    if let Err(e) = rustix::process::configure_io_flusher_behavior(true) {
        tracing::debug!("PR_SET_IO_FLUSHER not set: {e}");
    }
    tandem_engine::run(
        tandem_engine::DaemonOptions {
            cfg,
            node: paths.node.clone(),
            run_dir: paths.run_dir.clone(),
        },
        || {},
    )
    .map_err(Failure::from)
}

/// `up RES`: start the daemon in the background and return once it answers.
pub fn up(paths: &Paths, resource: &str) -> Result<(), Failure> {
    load(paths, resource)?;
    std::fs::create_dir_all(&paths.run_dir)
        .map_err(|e| format!("cannot create run dir {}: {e}", paths.run_dir.display()))?;
    let rt = runtime()?;
    let probe = Request {
        verb: "role".into(),
        ..Default::default()
    };
    if rt
        .block_on(control::call(&paths.run_dir, resource, &probe))
        .is_ok()
    {
        return Err(format!("{resource} is already up on {}", paths.node).into());
    }
    let log_path = control::log_path(&paths.run_dir, resource);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(exe)
            .arg("--config-dir")
            .arg(&paths.config_dir)
            .arg("--node")
            .arg(&paths.node)
            .arg("--run-dir")
            .arg(&paths.run_dir)
            .arg("run")
            .arg(resource)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: the terminal's Ctrl-C is not for it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the daemon exited ({status}) during start-up: {}",
                last_error_line(&log_path)
            )
            .into());
        }
        if rt
            .block_on(control::call(&paths.run_dir, resource, &probe))
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the daemon did not answer within 30 s; see {}",
                log_path.display()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last line of a daemon log that says what went wrong.
fn last_error_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("tandem:") || l.contains("ERROR"))
        .or_else(|| text.lines().last())
        .unwrap_or("no log output")
        .trim()
        .to_string()
}

/// `down RES [--force]`: stop the daemon and wait until it is gone.
pub fn down(paths: &Paths, resource: &str, force: bool) -> Result<(), Failure> {
    let rt = runtime()?;
    let req = Request {
        verb: "down".into(),
        force,
        ..Default::default()
    };
    // The daemon's pid, to wait for the process itself: it stops answering
    // on the control socket before it has closed the metadata, and a `up`
    // right after `down` must find the disk free.
    let pid = std::fs::read_to_string(control::pid_path(&paths.run_dir, resource))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let resp = rt.block_on(control::call(&paths.run_dir, resource, &req))?;
    if !resp.ok {
        return Err(Failure {
            code: resp.exit,
            message: resp.error,
        });
    }
    let probe = Request {
        verb: "role".into(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match rt.block_on(control::call(&paths.run_dir, resource, &probe)) {
            Err(CallError::NotRunning { .. }) if !pid.is_some_and(process_lives) => return Ok(()),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Err(format!("{resource} did not stop within 60 s").into())
}

/// A verb answered by the daemon: print its output, or its refusal.
pub fn simple(paths: &Paths, resource: &str, req: Request) -> Result<(), Failure> {
    let rt = runtime()?;
    let resp = rt.block_on(control::call(&paths.run_dir, resource, &req))?;
    if resp.ok {
        if !resp.output.is_empty() {
            println!("{}", resp.output);
        }
        Ok(())
    } else {
        Err(Failure {
            code: resp.exit,
            message: resp.error,
        })
    }
}

/// `status [RES] [--json]`: one resource, or every configured one.
pub fn status(paths: &Paths, resource: Option<&str>, json: bool) -> Result<(), Failure> {
    let req = Request {
        verb: "status".into(),
        json,
        ..Default::default()
    };
    let Some(resource) = resource else {
        let mut names: Vec<String> = std::fs::read_dir(&paths.config_dir)
            .map_err(|e| format!("cannot read {}: {e}", paths.config_dir.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_suffix(".toml").map(str::to_string)
            })
            .collect();
        names.sort();
        let rt = runtime()?;
        let mut all = Vec::new();
        for n in &names {
            if let Ok(resp) = rt.block_on(control::call(&paths.run_dir, n, &req)) {
                if resp.ok {
                    all.push(resp.output);
                }
            }
        }
        if json {
            let mut list = Vec::new();
            for s in all {
                if let Ok(serde_json::Value::Object(mut o)) = serde_json::from_str(&s) {
                    if let Some(serde_json::Value::Array(a)) = o.remove("resources") {
                        list.extend(a);
                    }
                }
            }
            println!("{}", serde_json::json!({ "resources": list }));
        } else {
            for s in all {
                println!("{s}");
            }
        }
        return Ok(());
    };
    simple(paths, resource, req)
}

/// `events [RES] [--now]`: copy the daemon's event lines to stdout.
pub fn events(paths: &Paths, resource: &str, now: bool) -> Result<(), Failure> {
    let rt = runtime()?;
    rt.block_on(async {
        let req = Request {
            verb: "events".into(),
            now,
            ..Default::default()
        };
        let (mut lines, _w) = control::open(&paths.run_dir, resource, &req).await?;
        use std::io::Write;
        let mut stdout = std::io::stdout();
        while let Ok(Some(line)) = lines.next_line().await {
            if writeln!(stdout, "{line}")
                .and_then(|_| stdout.flush())
                .is_err()
            {
                break;
            }
        }
        Ok(())
    })
}

/// The process exists and is not a zombie (Linux `/proc`).
fn process_lives(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
