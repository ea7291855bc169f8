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
    Watch(Box<WatchArgs>),
    /// Ask a running tracer's --health-addr whether its event loop runs
    /// (exit 0) or not (exit 1): a liveness probe for Kubernetes.
    Health {
        /// The running tracer's --health-addr.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9465", value_parser = parse_loopback)]
        addr: std::net::SocketAddr,
    },
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

    /// Also write the JSON lines to this file: appended to (what it held is
    /// kept), created with mode 0600 like FILE.1, never through a symlink.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Past this size the --output file's lines replace FILE.1's and it is
    /// started anew (100M, 1G, or bytes).
    #[arg(long, value_name = "SIZE", default_value = "100M", value_parser = crate::app::output::parse_size)]
    pub output_max_size: u64,

    /// Keep running as root. By default a tracer started as root becomes
    /// uid/gid 65534 once its programs are attached, keeping only
    /// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (and CAP_BPF where the
    /// kernel needs it for map reads); with this flag it stays root (it
    /// then also sees hung requests in other network namespaces).
    #[arg(long)]
    pub keep_root: bool,

    /// Python stacks are read by the tracer itself, for every stall, by
    /// default; `--py-stack all-threads` adds every thread's stack. A bare
    /// --py-stack (once needed) is accepted and changes nothing.
    #[arg(long, value_enum, value_name = "WHICH", num_args = 0..=1, default_missing_value = "stalled")]
    pub py_stack: Option<PyStack>,

    /// Do not read Python stacks.
    #[arg(long, conflicts_with = "py_stack")]
    pub no_py_stack: bool,

    /// Accepted for existing command lines and ignored: no external program
    /// is run; the tracer reads Python stacks itself.
    #[arg(long, value_name = "PATH", hide = true)]
    pub py_spy: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (and /healthz).
    /// A bare port (9464 or :9464) binds 127.0.0.1 only.
    #[arg(long, value_name = "ADDR", value_parser = crate::app::metrics_server::parse_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Where the kubelet keeps pod logs, `<namespace>_<pod>_<uid>`: pod
    /// names are taken from there (by the pod UID of the process's cgroup)
    /// rather than from what the process claims in its environment.
    #[arg(long, value_name = "DIR")]
    pub pods_dir: Option<PathBuf>,

    /// Processes of one master (workers and their children) followed at
    /// most; forks past it are let go and counted (`over_quota`).
    #[arg(long, value_name = "N", default_value = "512", value_parser = parse_quota)]
    pub max_watched_per_master: usize,

    /// Gunicorn masters of one container (or of the host, outside any)
    /// that discovery watches at most; past it a new master is not watched,
    /// counted (`masters_over_quota`) and its container named once on
    /// stderr. Masters given with --pid are not capped.
    #[arg(long, value_name = "N", default_value = "32", value_parser = clap::value_parser!(u64).range(1..=8192))]
    pub max_masters_per_container: u64,

    /// Processes the kernel's watch list holds at most. Hidden: a test
    /// lowers it to overflow the list with a few forks.
    #[arg(long, value_name = "N", default_value = "8192", hide = true, value_parser = clap::value_parser!(u32).range(2..=1_048_576))]
    pub watch_capacity: u32,

    /// How often workers whose event loop is not known yet are searched.
    /// Hidden: a test slows it so that a call begins before the loop is
    /// found.
    #[arg(long, value_name = "DUR", default_value = "1s", hide = true, value_parser = parse_duration)]
    pub loop_search_every: Duration,

    /// Sleeping threads of one master's processes whose calls the kernel
    /// times at most (its in-flight map holds 32,768 for the whole node);
    /// past it a thread's sleeps are not recorded, counted
    /// (`threads_over_quota`) and charged to its process.
    #[arg(long, value_name = "N", default_value = "4096", value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_threads_per_master: u32,

    /// Connection-end and signal events one process may send per second
    /// (and as a burst); past it they are counted, not sent
    /// (`events_rate_limited`). Hidden: a test lowers it to see a flood
    /// held back.
    #[arg(long, value_name = "N", default_value = "2000", hide = true, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub event_rate: u32,

    /// Threads the kernel's in-flight map holds at most. Hidden: a test
    /// lowers it to fill the map with a few threads.
    #[arg(long, value_name = "N", default_value = "32768", hide = true, value_parser = clap::value_parser!(u32).range(2..=1_048_576))]
    pub inflight_capacity: u32,

    /// An optional tracepoint not to attach, as if this kernel had no
    /// usable one (`tcp_send_reset`, `mark_victim`): what it shows is then
    /// said to be missing (`tcp_send_reset` takes its kprobe stand-in with
    /// it). Hidden: tests use it to see that said.
    #[arg(long, value_name = "NAME", hide = true, value_parser = ["tcp_send_reset", "mark_victim"])]
    pub without_tracepoint: Vec<String>,

    /// Serve /healthz alone on this loopback address, for a liveness probe
    /// (`tracer health`) that a flood of metrics clients cannot starve.
    #[arg(long, value_name = "ADDR", value_parser = parse_loopback)]
    pub health_addr: Option<std::net::SocketAddr>,
}

/// Whose Python stacks a stall carries.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PyStack {
    /// The stalled thread's (the default).
    Stalled,
    /// The stalled thread's, then every other thread's.
    AllThreads,
}

impl WatchArgs {
    /// Which stacks to read; None with --no-py-stack.
    pub fn py_stack(&self) -> Option<PyStack> {
        (!self.no_py_stack).then(|| self.py_stack.unwrap_or(PyStack::Stalled))
    }

    /// What the tracer says on stderr about flags that once ran py-spy.
    pub fn py_stack_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.py_stack == Some(PyStack::Stalled) {
            notes.push(
                "--py-stack is no longer needed: the tracer reads Python stacks itself, for every stall (--no-py-stack turns it off)".to_string(),
            );
        }
        if let Some(p) = &self.py_spy {
            notes.push(format!(
                "--py-spy {} is ignored: no external program is run; the tracer reads Python stacks itself",
                p.display()
            ));
        }
        notes
    }
}

fn parse_quota(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=8192).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a quota; give a number of processes from 1 to 8192 (the kernel's watch list holds 8192)"
        )),
    }
}

fn parse_loopback(s: &str) -> Result<std::net::SocketAddr, String> {
    let a = crate::app::metrics_server::parse_addr(s)?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "'{s}' is not a loopback address; the health port is for probes from inside the pod (127.0.0.1:9465)"
        ));
    }
    Ok(a)
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
            }) => Ok(*w),
            Ok(other) => Err(format!("not watch: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn hardening_flags() {
        let w = watch(&[
            "--py-spy",
            "/usr/bin/py-spy",
            "--output-max-size",
            "10M",
            "--pods-dir",
            "/x",
            "--max-watched-per-master",
            "64",
            "--health-addr",
            "9465",
        ])
        .unwrap();
        assert_eq!(w.py_stack(), Some(PyStack::Stalled));
        assert!(w.py_stack_notes()[0].contains("--py-spy /usr/bin/py-spy is ignored"));
        assert_eq!(w.output_max_size, 10 << 20);
        assert_eq!(w.max_watched_per_master, 64);
        assert_eq!(w.health_addr.unwrap().to_string(), "127.0.0.1:9465");
        let d = watch(&[]).unwrap();
        assert_eq!(
            (d.output_max_size, d.max_watched_per_master),
            (100 << 20, 512)
        );
        let e = watch(&["--health-addr", "0.0.0.0:9465"]).unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        let e = watch(&["--max-watched-per-master", "0"]).unwrap_err();
        assert!(e.contains("1 to 8192"), "{e}");
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
    fn python_stacks_are_on_by_default_and_old_flags_are_accepted_with_a_note() {
        let d = watch(&[]).unwrap();
        assert_eq!(d.py_stack(), Some(PyStack::Stalled));
        assert!(
            d.py_stack_notes().is_empty(),
            "nothing said without the old flags"
        );
        let w = watch(&["--py-stack", "--pid", "12"]).unwrap();
        assert_eq!(w.py_stack(), Some(PyStack::Stalled));
        assert_eq!(w.pids, vec![12]);
        let n = w.py_stack_notes();
        assert_eq!(n.len(), 1);
        assert!(n[0].contains("reads Python stacks itself"), "{n:?}");
        let w = watch(&["--py-stack", "all-threads"]).unwrap();
        assert_eq!(w.py_stack(), Some(PyStack::AllThreads));
        assert!(w.py_stack_notes().is_empty());
        assert_eq!(watch(&["--no-py-stack"]).unwrap().py_stack(), None);
        assert!(watch(&["--no-py-stack", "--py-stack"]).is_err());
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
