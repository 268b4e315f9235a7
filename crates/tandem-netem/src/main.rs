//! `tandem-netem --listen ADDR --connect ADDR [--delay D] [--jitter D]
//! [--rate R] [--buffer SIZE]`: proxy TCP connections with a slower link.
//! Prints `listening on ADDR` once it accepts connections; SIGTERM or
//! Ctrl-C stops it.

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;
use tandem_netem::{serve, Shape};

#[derive(Parser)]
#[command(
    version,
    about = "A TCP proxy adding delay, jitter and a bandwidth cap"
)]
struct Args {
    /// Address to accept connections on (port 0: any free port).
    #[arg(long)]
    listen: String,
    /// Address to forward each connection to.
    #[arg(long)]
    connect: String,
    /// One-way delay per direction: `0`, `250us`, `1ms`, `1.5ms`, `2s`.
    #[arg(long, default_value = "0", value_parser = duration)]
    delay: Duration,
    /// Up to this much more delay per chunk, at random.
    #[arg(long, default_value = "0", value_parser = duration)]
    jitter: Duration,
    /// Bandwidth cap per direction, bytes per second (`100MiB`, `1G`).
    #[arg(long, value_parser = rate)]
    rate: Option<u64>,
    /// Bytes queued per direction before reading stops (`4MiB`).
    #[arg(long, default_value = "4MiB", value_parser = rate)]
    buffer: u64,
}

/// A duration with a unit of us, ms or s (fractions allowed), or `0`.
fn duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!(
            "expected a duration like 250us, 1ms or 2s, found {s:?}"
        ));
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0 / scale).contains(&v) => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => Err(format!(
            "expected a non-negative duration of at most an hour, found {s:?}"
        )),
    }
}

fn rate(s: &str) -> Result<u64, String> {
    tandem_config::parse_rate(s)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let shape = Shape {
        delay: args.delay,
        jitter: args.jitter,
        rate: args.rate,
        buffer: usize::try_from(args.buffer).unwrap_or(usize::MAX),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandem-netem: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        println!("listening on {addr}");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(listener, args.connect, shape, stop_rx));
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop_tx.send(true);
        match server.await {
            Ok(r) => r.map_err(|e| format!("proxy failed: {e}")),
            Err(e) => Err(format!("proxy task failed: {e}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-netem: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units_and_refuse_the_rest() {
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(duration("1.5ms"), Ok(Duration::from_micros(1500)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        for bad in ["", "5", "1h", "-1ms", "nanms", "1e9s"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }
}
