//! `tracer watch`: the session from start to summary. `prepare` checks
//! everything that can fail on bad input before anything is loaded;
//! `attach` loads the probes and watches the targets; `run_loop` reacts to
//! the kernel; `finish` prints the summary.
pub mod cli;
pub mod logging;
pub mod metrics_server;
mod session;
mod sink;
mod targets;

use std::fs::File;
use std::io::BufWriter;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::analysis::{Correlator, syscalls};
use crate::host::{proc, pystack};
use crate::kernel::{self, SyscallTable, tracefs};
use crate::model::{Role, Source};
use crate::present::{self, Clock, StartEvent, SummaryEvent};
use cli::WatchArgs;
use session::{ProcEnricher, Session};
use sink::Sink;
use targets::Target;

pub fn run(args: WatchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: WatchArgs) -> Result<()> {
    let prepared = prepare(&args).await?;
    let (mut st, mut ring, start) = attach(&args, prepared)?;
    run_loop(&args, &mut st, &mut ring).await?;
    finish(&mut st, &mut ring, start);
    Ok(())
}

/// Fails early, in one line, when we cannot possibly load BPF programs.
fn check_privileges() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [(39, "CAP_BPF"), (38, "CAP_PERFMON")]
        .into_iter()
        .filter(|(bit, _)| caps & (1u64 << bit) == 0)
        .map(|(_, n)| n)
        .collect();
    if caps & (1 << 21) == 0 && !missing.is_empty() {
        bail!(
            "not running as root and missing {}; run as root, or grant them (setcap cap_bpf,cap_perfmon,cap_sys_ptrace+ep tracer)",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// Everything checked before the kernel is touched.
struct Prepared {
    metrics: Option<(SocketAddr, TcpListener)>,
    targets: Vec<Target>,
    tracefs: PathBuf,
    file: Option<BufWriter<File>>,
}

/// Every check that can fail on bad input, before anything is loaded.
async fn prepare(args: &WatchArgs) -> Result<Prepared> {
    check_privileges()?;
    let probe = args.pids.first().copied().unwrap_or(std::process::id());
    if args.py_stack && pystack::find(probe).is_none() {
        eprintln!(
            "tracer: warning: --py-stack: py-spy is not installed (pip install py-spy); stalls will be reported without Python stacks"
        );
    }
    // Bind first: a port in use fails before anything is loaded.
    let metrics = match args.metrics_addr {
        Some(addr) => Some((addr, metrics_server::bind(addr).await?)),
        None => None,
    };
    let targets = targets::resolve(&args.pids)?;
    let tracefs = tracefs::ensure_mounted()?;
    let file = match &args.output {
        Some(p) => Some(BufWriter::new(File::create(p).with_context(|| {
            format!("cannot create --output file {}", p.display())
        })?)),
        None => None,
    };
    Ok(Prepared {
        metrics,
        targets,
        tracefs,
        file,
    })
}

type Ring = AsyncFd<RingBuf<MapData>>;

/// Loads the probes, watches the targets, and prints `start`: from then on
/// every event is seen.
fn attach(args: &WatchArgs, p: Prepared) -> Result<(Session, Ring, u64)> {
    let threshold_ns = args.threshold.as_nanos() as u64;
    let mut probes = kernel::load(&p.tracefs, threshold_ns, &syscall_table()?)?;
    // Loading parsed the kernel's BTF (twice: aya and us), megabytes freed
    // in pieces that glibc keeps unless asked to give them back.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
    let rb = probes
        .events
        .take()
        .ok_or_else(|| anyhow!("ring buffer missing"))?;
    // SAFETY: the RingBuf owns its fd for as long as the AsyncFd lives, and
    // we never replace it through get_mut.
    let ring = unsafe { AsyncFd::register(rb) }
        .map_err(|e| anyhow!("registering the ring buffer with the runtime: {e}"))?;
    let mut st = Session {
        probes,
        corr: Correlator::new(threshold_ns),
        enricher: ProcEnricher::default(),
        sink: Sink {
            format: args.format,
            clock: Clock::now(),
            stdout: std::io::stdout(),
            file: p.file,
            stdout_gone: false,
            held: Some(Vec::new()),
            color: std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none(),
        },
        discover: args.pids.is_empty(),
        events_received: 0,
        exits: Vec::new(),
        last_sweep: Instant::now(),
        last_heartbeats: Instant::now(),
        last_loop_search: Instant::now(),
        listeners: Default::default(),
        py_stack: args.py_stack,
        durations: Default::default(),
        metrics: None,
    };
    if let Some((addr, listener)) = p.metrics {
        let text = Arc::new(Mutex::new(String::new()));
        tokio::spawn(metrics_server::serve(listener, text.clone()));
        st.metrics = Some((text, Instant::now()));
        eprintln!("tracer: serving metrics on http://{addr}/metrics");
    }
    let start = present::monotonic_ns();
    for t in &p.targets {
        watch_target(&mut st, t, start)?;
    }
    st.sink.start(
        &StartEvent {
            version: env!("CARGO_PKG_VERSION"),
            threshold_ms: threshold_ns / 1_000_000,
            discover: st.discover,
            pids: p.targets.iter().map(|t| t.pid).collect(),
        },
        start,
    );
    st.render_metrics(true);
    if st.discover && p.targets.is_empty() {
        eprintln!("tracer: no Gunicorn master is running yet; waiting for one to start");
    }
    Ok((st, ring, start))
}

/// The syscall numbers the kernel programs need, from our table.
fn syscall_table() -> Result<SyscallTable> {
    let nr = |name: &str| {
        syscalls::number(name).ok_or_else(|| anyhow!("no {name} syscall on this architecture"))
    };
    Ok(SyscallTable {
        classes: syscalls::class_table(),
        close: nr("close")?,
        shutdown: nr("shutdown")?,
    })
}

/// A process that exited between discovery and now is not fatal in
/// discovery mode; a --pid that vanished is.
fn watch_target(st: &mut Session, t: &Target, start: u64) -> Result<()> {
    let r = if t.role == Role::Master {
        st.watch_master_and_workers(t.pid, Source::Scan, start)
    } else {
        st.watch_process(t, Source::Scan, start)
    };
    match r {
        Err(e) if st.discover => {
            eprintln!("tracer: warning: {e:#}");
            Ok(())
        }
        Err(_) if !proc::exists(t.pid) => bail!(
            "pid {} exited while the tracer was attaching; nothing to watch",
            t.pid
        ),
        r => r,
    }
}

/// Until Ctrl-C, SIGTERM or --duration: drain the ring buffer when it has
/// data, and poll the in-flight map on a tick.
async fn run_loop(args: &WatchArgs, st: &mut Session, ring: &mut Ring) -> Result<()> {
    // Poll the in-flight map often enough to report a stall well within
    // 150ms of crossing the threshold, but never busier than every 10ms.
    let period = (args.threshold / 5).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let deadline = args.duration.map(|d| Instant::now() + d);
    let sleep_until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(sleep_until);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                st.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => {
                st.drain(ring.get_mut());
                st.poll();
                st.render_metrics(false);
            }
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            _ = &mut sleep_until => return Ok(()),
        }
    }
}

/// Whatever is still in flight, then the summary.
fn finish(st: &mut Session, ring: &mut Ring, start: u64) {
    st.drain(ring.get_mut());
    st.poll();
    st.flush_exits(true);
    let now = present::monotonic_ns();
    let summary = st.corr.summary(now);
    let ev = SummaryEvent::new(
        &summary,
        now.saturating_sub(start) / 1_000_000,
        st.probes.events_lost(),
        st.probes.occupancy(),
    );
    st.sink.summary(&ev, now);
}
