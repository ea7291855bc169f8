//! `tracer watch`: the session from start to summary. `prepare` checks
//! everything that can fail on bad input before anything is loaded;
//! `attach` loads the probes and watches the targets; `run_loop` reacts to
//! the kernel; `finish` prints the summary.
pub mod cli;
mod ending;
mod enricher;
pub mod logging;
mod loop_search;
pub mod metrics_server;
pub mod output;
mod session;
mod sink;
mod sockets;
mod targets;
mod tenants;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::analysis::{Correlator, syscalls};
use crate::host::{container, proc, pystack};
use crate::kernel::{self, LoadOptions, SyscallTable, intake::Intake};
use crate::model::{KernelEvent, Role, Source};
use crate::present::{self, Clock, StartEvent, SummaryEvent};
use cli::WatchArgs;
use metrics_server::{MAX_CONNS, Serve};
use session::{ProcEnricher, Session};
use sink::Sink;
use targets::Target;

/// The session runs on the main thread (`block_on`); the HTTP servers on
/// the runtime's one worker thread, so a slow /proc read in the session
/// never delays /healthz; kernel events arrive from the intake thread.
pub fn run(args: WatchArgs) -> Result<()> {
    ending::install()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(run_async(args));
    ending::arm();
    // A blocking task stuck in a /proc read must not keep the process:
    // dropping the runtime would wait for it.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    r
}

async fn run_async(args: WatchArgs) -> Result<()> {
    // Before anything is attached: a Ctrl-C or SIGTERM while the targets
    // are being watched (reading a master's settings, its workers) is held
    // and ends the run with its summary, instead of killing the tracer
    // without one.
    let stop = Stop::install()?;
    let prepared = prepare(&args).await?;
    let (mut st, mut events, start) = attach(&args, prepared)?;
    let ran = run_loop(&args, &mut st, &mut events, stop).await;
    // From here the process has ending::GRACE to finish and exit.
    ending::arm();
    ran?;
    finish(&mut st, &mut events, start).await;
    ending::summary_written();
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
    health: Option<(SocketAddr, TcpListener)>,
    targets: Vec<Target>,
    file: Option<output::OutputFile>,
}

/// Every check that can fail on bad input, before anything is loaded.
async fn prepare(args: &WatchArgs) -> Result<Prepared> {
    // A kernel that cannot run the programs is refused first, in one
    // line, before any target is read or announced.
    kernel::support::check()?;
    check_privileges()?;
    for note in args.py_stack_notes() {
        eprintln!("tracer: note: {note}");
    }
    // Bind first: a port in use fails before anything is loaded.
    let metrics = match args.metrics_addr {
        Some(addr) => Some((addr, metrics_server::bind(addr).await?)),
        None => None,
    };
    let health = match args.health_addr {
        Some(addr) => Some((addr, metrics_server::bind(addr).await?)),
        None => None,
    };
    let targets = targets::resolve(&args.pids)?;
    let file = match &args.output {
        Some(p) => Some(output::OutputFile::open(p, args.output_max_size)?),
        None => None,
    };
    Ok(Prepared {
        metrics,
        health,
        targets,
        file,
    })
}

/// Kernel events, decoded by the intake thread.
struct Events {
    intake: Intake,
    rx: mpsc::Receiver<Vec<KernelEvent>>,
}

impl Events {
    /// Hands every batch already received to the session.
    fn drain_into(&mut self, st: &mut Session) {
        while let Ok(batch) = self.rx.try_recv() {
            st.drain(batch);
        }
    }
}

/// Loads the probes, watches the targets, and prints `start`: from then on
/// every event is seen.
fn attach(args: &WatchArgs, p: Prepared) -> Result<(Session, Events, u64)> {
    let threshold_ns = args.threshold.as_nanos() as u64;
    let opts = LoadOptions {
        threshold_ns,
        watch_capacity: args.watch_capacity,
        inflight_capacity: args.inflight_capacity,
        without_tracepoints: args.without_tracepoint.clone(),
        quotas: kernel::quotas(
            args.max_watched_per_master,
            args.max_threads_per_master,
            args.event_rate,
        ),
    };
    let mut probes = kernel::load(&opts, &syscall_table()?)?;
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
    let (intake, rx) =
        Intake::start(rb).map_err(|e| anyhow!("starting the event intake thread: {e}"))?;
    let events = Events { intake, rx };
    // Everything that needs root is done: programs loaded and attached,
    // listeners bound, the output file open.
    give_up_root(args.keep_root)?;
    let mut st = Session {
        probes,
        corr: Correlator::new(threshold_ns),
        enricher: ProcEnricher::new(
            container::pods_dir(args.pods_dir.clone()),
            sockets::SocketWatch::new(args.request_threshold),
        ),
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
        loop_search_every: args.loop_search_every,
        loop_search: Default::default(),
        listeners: Default::default(),
        stacks: match args.py_stack() {
            Some(_) => {
                Some(pystack::StackReader::start().context("starting the Python stack reader")?)
            }
            None => None,
        },
        all_threads: args.py_stack() == Some(cli::PyStack::AllThreads),
        pending: Default::default(),
        stall_stacks: Default::default(),
        spin_stacks: Vec::new(),
        durations: Default::default(),
        metrics: None,
        served: Default::default(),
        max_per_master: args.max_watched_per_master,
        masters: tenants::MasterQuota::new(args.max_masters_per_container as usize),
        over_quota: 0,
    };
    st.corr
        .set_request_threshold(args.request_threshold.as_nanos() as u64);
    if let Some((addr, listener)) = p.metrics {
        let shared = st.served.clone();
        tokio::spawn(metrics_server::serve(
            listener,
            shared,
            Serve::All,
            MAX_CONNS,
        ));
        st.metrics = Some(Instant::now());
        eprintln!("tracer: serving metrics on http://{addr}/metrics");
    }
    if let Some((_, listener)) = p.health {
        tokio::spawn(metrics_server::serve(
            listener,
            st.served.clone(),
            Serve::Health,
            4,
        ));
    }
    st.served.heartbeat.beat();
    let start = present::monotonic_ns();
    for t in &p.targets {
        watch_target(&mut st, t, start)?;
    }
    st.sink.start(
        &StartEvent {
            version: env!("CARGO_PKG_VERSION"),
            threshold_ms: threshold_ns / 1_000_000,
            request_threshold_ms: args.request_threshold.as_millis() as u64,
            discover: st.discover,
            pids: p.targets.iter().map(|t| t.pid).collect(),
            features_missing: st.probes.losses().features_missing,
        },
        start,
    );
    ending::running();
    st.render_metrics(true);
    if st.discover && p.targets.is_empty() {
        eprintln!("tracer: no Gunicorn master is running yet; waiting for one to start");
    }
    Ok((st, events, start))
}

/// Runs on as uid/gid 65534 with only what is still needed (see
/// host::privileges), unless `keep_root` or the tracer is not root; says
/// on stderr, in one line, what it runs as.
fn give_up_root(keep_root: bool) -> Result<()> {
    use crate::host::privileges;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        eprintln!(
            "tracer: note: runs as uid {uid}, as started, with {}",
            privileges::get().map_or("unknown capabilities".into(), |c| privileges::names(
                c.effective & (privileges::PROC_READING | (1 << privileges::CAP_BPF))
            ) + " among its capabilities")
        );
        return Ok(());
    }
    if keep_root {
        eprintln!("tracer: note: runs as uid 0 (--keep-root): code execution in it would be root");
        return Ok(());
    }
    if let Err(why) = privileges::can_drop() {
        eprintln!(
            "tracer: warning: runs as uid 0: {why}, which the switch to uid 65534 needs (--keep-root says it is meant)"
        );
        return Ok(());
    }
    let mut keep = privileges::PROC_READING;
    if privileges::map_commands_need_cap_bpf() {
        keep |= 1 << privileges::CAP_BPF;
    }
    let d = privileges::drop_to_nobody(keep)
        .context("switching to uid 65534 (some threads may have switched: not going on)")?;
    eprintln!(
        "tracer: note: runs as uid 65534 from here on, with {}{}; --keep-root keeps uid 0 (and hung requests in other network namespaces)",
        privileges::names(d.kept),
        if d.bounding_cleared {
            ""
        } else {
            " (no CAP_SETPCAP to clear the bounding set; no-new-privileges is set)"
        }
    );
    Ok(())
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
    if st.discover && t.role == Role::Master && !st.admit_master(t.pid) {
        return Ok(());
    }
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
/// The signals that end a run, installed at its start.
struct Stop {
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

impl Stop {
    fn install() -> Result<Stop> {
        Ok(Stop {
            sigterm: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            sigint: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }
}

async fn run_loop(
    args: &WatchArgs,
    st: &mut Session,
    events: &mut Events,
    stop: Stop,
) -> Result<()> {
    // Poll the in-flight map often enough to report a stall well within
    // 150ms of crossing the threshold, but never busier than every 10ms.
    let period = (args.threshold / 5).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Stop {
        mut sigterm,
        mut sigint,
    } = stop;
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
            batch = events.rx.recv() => match batch {
                Some(batch) => st.drain(batch),
                None => bail!("the event intake thread stopped"),
            },
            _ = tick.tick() => {
                events.drain_into(st);
                st.poll();
                st.render_metrics(false);
                st.served.heartbeat.beat();
            }
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            _ = &mut sleep_until => return Ok(()),
        }
    }
}

/// Whatever is still in flight, then the summary.
async fn finish(st: &mut Session, events: &mut Events, start: u64) {
    events.intake.stop();
    // The intake thread sends what is left in the ring buffer, then ends.
    while let Some(batch) = events.rx.recv().await {
        st.drain(batch);
    }
    events.intake.join();
    st.poll();
    st.flush_exits(true);
    for o in st.corr.flush_timeouts() {
        st.emit(&o);
    }
    // Stacks still being read get at most this long: the whole ending
    // must fit in ending::GRACE.
    st.flush_pending(Some(std::time::Instant::now() + Duration::from_millis(700)));
    let now = present::monotonic_ns();
    let summary = st.corr.summary(now);
    let mut ev = SummaryEvent::new(
        &summary,
        now.saturating_sub(start) / 1_000_000,
        st.losses(),
        st.probes.occupancy(),
    );
    ev.py_stack_cost = st.stacks.as_ref().map(|s| s.costs());
    st.sink.summary(&ev, now);
}
