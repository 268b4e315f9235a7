//! The control socket: one JSON object per line in each direction.
//!
//! A request is `{"verb": "...", "force": bool, ...}`; the answer is one
//! line `{"ok": true, "output": "..."}` or `{"ok": false, "error": "...",
//! "exit": N}`. `events` answers with a stream of lines until either side
//! closes. The socket lives in the run directory with mode 0600: whoever
//! can reach it can demote the Primary.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Exit code for a refused state change (the line says why).
pub const EXIT_REFUSED: u8 = 11;
/// Exit code when the resource's daemon is not running.
pub const EXIT_NOT_RUNNING: u8 = 3;

/// Longest request or response line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// A command for the daemon.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Request {
    /// The verb, as on the command line.
    pub verb: String,
    /// `--force`.
    pub force: bool,
    /// `--clear-bitmap` (new-current-uuid).
    #[serde(rename = "clear-bitmap")]
    pub clear_bitmap: bool,
    /// `--json` (status).
    pub json: bool,
    /// `--now` (events).
    pub now: bool,
    /// `--discard-my-data` (connect).
    #[serde(rename = "discard-my-data")]
    pub discard_my_data: bool,
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Response {
    /// Success.
    pub ok: bool,
    /// What to print on stdout.
    pub output: String,
    /// What to print on stderr when refused.
    pub error: String,
    /// Process exit code when refused.
    pub exit: u8,
}

impl Response {
    /// Success with output.
    pub fn ok(output: impl Into<String>) -> Self {
        Response {
            ok: true,
            output: output.into(),
            ..Default::default()
        }
    }
    /// Refusal.
    pub fn refused(error: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: error.into(),
            exit: EXIT_REFUSED,
            ..Default::default()
        }
    }
}

/// `<run-dir>/<resource>.ctl`.
pub fn socket_path(run_dir: &Path, resource: &str) -> PathBuf {
    run_dir.join(format!("{resource}.ctl"))
}

/// `<run-dir>/<resource>.pid`.
pub fn pid_path(run_dir: &Path, resource: &str) -> PathBuf {
    run_dir.join(format!("{resource}.pid"))
}

/// `<run-dir>/<resource>.log` (where `up` sends the daemon's log).
pub fn log_path(run_dir: &Path, resource: &str) -> PathBuf {
    run_dir.join(format!("{resource}.log"))
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens on the socket.
    #[error("resource {resource} is not up on this node (no daemon at {path})")]
    NotRunning {
        /// Resource.
        resource: String,
        /// Socket path.
        path: PathBuf,
    },
    /// Talking to the daemon failed.
    #[error("control socket {path}: {reason}")]
    Failed {
        /// Socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Send one request and read the one-line answer.
pub async fn call(run_dir: &Path, resource: &str, req: &Request) -> Result<Response, CallError> {
    let (mut lines, _w) = open(run_dir, resource, req).await?;
    let path = socket_path(run_dir, resource);
    let failed = |reason: String| CallError::Failed {
        path: path.clone(),
        reason,
    };
    // State changes wait for the peer at most its timeouts; a minute means
    // the daemon is stuck, and the operator should hear about it.
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .map_err(|_| failed("no answer within 60 s".into()))?
        .map_err(|e| failed(e.to_string()))?
        .ok_or_else(|| failed("the daemon closed the connection without answering".into()))?;
    serde_json::from_str(&line).map_err(|e| failed(format!("bad answer {line:?}: {e}")))
}

/// Connect and send a request; the caller reads the answer lines.
pub async fn open(
    run_dir: &Path,
    resource: &str,
    req: &Request,
) -> Result<
    (
        tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
        tokio::net::unix::OwnedWriteHalf,
    ),
    CallError,
> {
    let path = socket_path(run_dir, resource);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(CallError::NotRunning {
                resource: resource.to_string(),
                path,
            })
        }
        Err(e) => {
            return Err(CallError::Failed {
                path,
                reason: e.to_string(),
            })
        }
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req).map_err(|e| CallError::Failed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    line.push('\n');
    w.write_all(line.as_bytes())
        .await
        .map_err(|e| CallError::Failed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok((BufReader::new(r).lines(), w))
}
