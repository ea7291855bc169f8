//! Command-line interface.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::present::Format;

#[derive(Parser, Debug)]
#[command(
    name = "tracer",
    version,
    about = "Names the Gunicorn worker that a blocking syscall has stalled, before Gunicorn's WORKER TIMEOUT kills it",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Watch Gunicorn masters and their workers (or any process) for stalls.
    Watch(WatchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// A Gunicorn master (its workers are followed, respawns included), a
    /// single worker, or any other process. Repeatable. Without it, every
    /// Gunicorn master on the host is watched, including ones started later.
    #[arg(long = "pid", value_name = "PID", value_parser = parse_pid)]
    pub pids: Vec<u32>,

    /// Report a syscall blocked at least this long (500ms, 2s, 1m).
    #[arg(long, value_name = "DUR", default_value = "500ms", value_parser = parse_threshold)]
    pub threshold: Duration,

    /// Report a request that has waited this long for its first response
    /// byte while its worker lives (a hung request). Raise it for
    /// long-polling or slow streaming endpoints.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_request_threshold)]
    pub request_threshold: Duration,

    /// Output: text for a person, json for JSON lines (docs/events.md).
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,

    /// Stop after this long and print the summary (default: until Ctrl-C).
    #[arg(long, value_name = "DUR", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,

    /// Also write the JSON lines to this file.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Attach the stalled worker's Python stack (py-spy dump) to each stall.
    #[arg(long)]
    pub py_stack: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics (and /healthz).
    /// A bare port (9464 or :9464) binds 127.0.0.1 only.
    #[arg(long, value_name = "ADDR", value_parser = crate::app::metrics_server::parse_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

fn parse_pid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(p) if p > 0 && p <= 4_194_304 => Ok(p),
        _ => Err(format!(
            "'{s}' is not a process id; give a number like 1234 (see `pgrep -f gunicorn`)"
        )),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|_| format!("'{s}' is not a duration; write it like 500ms, 2s or 1m"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("'{s}' must be longer than zero"));
    }
    Ok(d)
}

fn parse_threshold(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) {
        return Err(format!(
            "threshold '{s}' is too small: every syscall would be a stall; use 1ms or more (default 500ms)"
        ));
    }
    if d > Duration::from_secs(3600) {
        return Err(format!(
            "threshold '{s}' is longer than an hour; use a shorter one"
        ));
    }
    Ok(d)
}

fn parse_request_threshold(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "request threshold '{s}' is too small: ordinary requests would be reported as hung; use 1s or more (default 30s)"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(args: &[&str]) -> Result<WatchArgs, String> {
        let mut v = vec!["tracer", "watch"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v) {
            Ok(Cli {
                command: Command::Watch(w),
            }) => Ok(w),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn defaults() {
        let w = watch(&[]).unwrap();
        assert!(w.pids.is_empty());
        assert_eq!(w.threshold, Duration::from_millis(500));
        assert_eq!(w.format, Format::Text);
        assert_eq!(w.duration, None);
        assert_eq!(w.request_threshold, Duration::from_secs(30));
        assert_eq!(
            watch(&["--request-threshold", "2s"])
                .unwrap()
                .request_threshold,
            Duration::from_secs(2)
        );
        let e = watch(&["--request-threshold", "100ms"]).unwrap_err();
        assert!(e.contains("too small"), "{e}");
    }

    #[test]
    fn durations_and_pids() {
        let w = watch(&[
            "--pid",
            "12",
            "--pid",
            "13",
            "--threshold",
            "2s",
            "--duration",
            "1m",
            "--format",
            "json",
        ])
        .unwrap();
        assert_eq!(w.pids, vec![12, 13]);
        assert_eq!(w.threshold, Duration::from_secs(2));
        assert_eq!(w.duration, Some(Duration::from_secs(60)));
        assert_eq!(w.format, Format::Json);
        assert_eq!(
            watch(&["--threshold", "250ms"]).unwrap().threshold,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let e = watch(&["--threshold", "0"]).unwrap_err();
        assert!(e.contains("too small"), "{e}");
        let e = watch(&["--threshold", "0ms"]).unwrap_err();
        assert!(e.contains("too small"), "{e}");
        let e = watch(&["--duration", "-1"]).unwrap_err();
        assert!(
            e.contains("500ms, 2s or 1m") || e.contains("unexpected argument"),
            "{e}"
        );
        let e = watch(&["--duration=-1"]).unwrap_err();
        assert!(e.contains("500ms, 2s or 1m"), "{e}");
        let e = watch(&["--duration", "0s"]).unwrap_err();
        assert!(e.contains("longer than zero"), "{e}");
        let e = watch(&["--pid", "abc"]).unwrap_err();
        assert!(e.contains("not a process id"), "{e}");
        let e = watch(&["--pid", "0"]).unwrap_err();
        assert!(e.contains("not a process id"), "{e}");
        let e = watch(&["--format", "xml"]).unwrap_err();
        assert!(e.contains("xml"), "{e}");
    }
}
