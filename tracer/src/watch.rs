//! `tracer watch`: discovery, the event loop, and the summary at the end.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::WatchArgs;
use crate::correlate::{Correlator, Enricher, KernelEvent, Output, Sample};
use crate::loader::{self, Probes};
use crate::model::{FdInfo, Role};
use crate::output::{self, Clock, Format, StartEvent, SummaryEvent};
use crate::{intake, proc, tracefs};

/// /proc lookups for stalls being reported.
#[derive(Default)]
struct ProcEnricher;

impl Enricher for ProcEnricher {
    fn fd_info(&mut self, pid: u32, fd: i32) -> FdInfo {
        proc::fd_info(pid, fd)
    }
    fn heartbeat_age_ms(&mut self, pid: u32) -> Option<u64> {
        proc::heartbeat_age_ms(pid)
    }
    fn comm(&mut self, pid: u32) -> String {
        proc::comm(pid)
    }
    fn container(&mut self, pid: u32) -> Option<crate::container::Container> {
        crate::container::of_process(pid)
    }
}

/// Where events go: stdout in the chosen format, plus an optional JSON file.
struct Sink {
    format: Format,
    clock: Clock,
    stdout: std::io::Stdout,
    file: Option<BufWriter<File>>,
    /// stdout was closed (piped into `head`, say): keep tracing for the file.
    stdout_gone: bool,
    /// Events held back until the `start` line is out (during attach).
    held: Option<Vec<Output>>,
    /// Colour the text view: stdout is a terminal and NO_COLOR is unset.
    color: bool,
}

impl Sink {
    fn write_stdout(&mut self, line: &str) {
        if self.stdout_gone {
            return;
        }
        let mut lock = self.stdout.lock();
        if writeln!(lock, "{line}").and_then(|_| lock.flush()).is_err() {
            self.stdout_gone = true;
        }
    }

    fn write_file(&mut self, line: &str) {
        if let Some(f) = self.file.as_mut()
            && writeln!(f, "{line}").and_then(|_| f.flush()).is_err()
        {
            eprintln!(
                "tracer: warning: cannot write to the --output file any more; continuing on stdout"
            );
            self.file = None;
        }
    }

    fn json<T: serde::Serialize>(&mut self, body: &T, ts_ns: u64) -> String {
        output::json_line(body, self.clock.rfc3339(ts_ns))
    }

    fn event(&mut self, o: &Output) {
        if let Some(h) = self.held.as_mut() {
            h.push(o.clone());
            return;
        }
        let json = self.json(o, o.ts_ns());
        self.write_file(&json);
        match self.format {
            Format::Json => self.write_stdout(&json),
            Format::Text => {
                let mut t = output::text_line(o, &self.clock);
                if self.color {
                    t = output::colorize(&t);
                }
                self.write_stdout(&t);
            }
        }
    }

    fn start(&mut self, s: &StartEvent, now: u64) {
        let json = self.json(s, now);
        self.write_file(&json);
        match self.format {
            Format::Json => self.write_stdout(&json),
            Format::Text => {
                let what = if s.discover {
                    "every Gunicorn master on this host".to_string()
                } else {
                    format!(
                        "pid {}",
                        s.pids
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                self.write_stdout(&format!(
                    "tracer {}: watching {what}; reporting syscalls blocked {}ms or more. Ctrl-C for the summary.",
                    s.version, s.threshold_ms
                ));
            }
        }
    }

    fn summary(&mut self, s: &SummaryEvent, now: u64) {
        let json = self.json(s, now);
        self.write_file(&json);
        match self.format {
            Format::Json => self.write_stdout(&json),
            Format::Text => {
                let t = output::text_summary(s.summary, s.events_lost);
                self.write_stdout(t.trim_end());
            }
        }
    }
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

fn targets_have_no_py_spy(pids: &[u32]) -> bool {
    let probe = pids.first().copied().unwrap_or(std::process::id());
    crate::pystack::find(probe).is_none()
}

/// A target resolved from --pid or from discovery.
struct Target {
    pid: u32,
    master: u32,
    role: Role,
}

fn resolve_targets(pids: &[u32]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    if pids.is_empty() {
        for m in proc::all_masters() {
            out.push(Target {
                pid: m,
                master: m,
                role: Role::Master,
            });
        }
    }
    for &pid in pids {
        if !proc::exists(pid) {
            bail!("no process with pid {pid}; check it with `ps -p {pid}` (it may have exited)");
        }
        match proc::identify(pid) {
            proc::Identity::Master => out.push(Target {
                pid,
                master: pid,
                role: Role::Master,
            }),
            proc::Identity::Worker { master } => out.push(Target {
                pid,
                master,
                role: Role::Worker,
            }),
            proc::Identity::Other => {
                eprintln!(
                    "tracer: pid {pid} ({}) is not a Gunicorn master or worker; watching it as a plain process",
                    output::sanitize(&proc::comm(pid))
                );
                out.push(Target {
                    pid,
                    master: pid,
                    role: Role::Plain,
                })
            }
        }
    }
    Ok(out)
}

/// How long an EXIT event is held: the kernel closes the process's sockets
/// within microseconds of it; this leaves room for a busy machine.
const EXIT_HOLD_NS: u64 = 20_000_000;
/// How often WATCHED is checked for processes whose EXIT event was lost.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

struct State {
    probes: Probes,
    corr: Correlator,
    enricher: ProcEnricher,
    sink: Sink,
    discover: bool,
    events_received: u64,
    /// EXIT events held back, with when they arrived (see `flush_exits`).
    exits: Vec<(u64, KernelEvent)>,
    last_sweep: Instant,
    py_stack: bool,
    durations: crate::metrics::StallDurations,
    /// Latest metrics text, shared with the HTTP server (when enabled).
    metrics: Option<(Arc<Mutex<String>>, Instant)>,
}

impl State {
    fn emit(&mut self, o: &Output) {
        if let Output::StallEnd {
            fd_kind,
            blocked_ms,
            ..
        } = o
        {
            self.durations.observe(fd_kind, *blocked_ms);
        }
        if self.py_stack
            && let Output::Stall { ts_ns, report } = o
        {
            // Rare (once per stall) and bounded: worth a short pause here.
            let mut report = report.clone();
            match crate::pystack::dump(report.pid, Duration::from_secs(5)) {
                Ok(stack) => report.py_stack = Some(stack),
                Err(e) => report.py_stack_error = Some(e),
            }
            self.sink.event(&Output::Stall {
                ts_ns: *ts_ns,
                report,
            });
            return;
        }
        self.sink.event(o);
    }

    /// Re-renders the metrics text, at most once a second.
    fn render_metrics(&mut self, force: bool) {
        let Some((text, last)) = self.metrics.as_mut() else {
            return;
        };
        if !force && last.elapsed() < Duration::from_secs(1) {
            return;
        }
        *last = Instant::now();
        let text = text.clone();
        let summary = self.corr.summary(output::monotonic_ns());
        let me = crate::metrics::SelfStats {
            events_received: self.events_received,
            events_lost: self.probes.events_lost(),
            maps: self.probes.occupancy(),
        };
        let probes = &self.probes;
        let body = crate::metrics::render(
            &summary,
            &mut proc::heartbeat_age_ms,
            &mut |pid| probes.read_hist(pid),
            &self.durations,
            &me,
        );
        if let Ok(mut t) = text.lock() {
            *t = body;
        }
    }

    /// Registers the ports `pid` listens on with the kernel. Ports are never
    /// removed: a stale one only times a few more connections.
    fn add_listeners(&mut self, pid: u32) {
        for (_, port) in proc::listening_fds(pid) {
            self.probes.add_port(port);
        }
    }

    /// Starts watching a process: kernel map first (so forks from now on
    /// are followed), then the threads already blocked, then the report.
    fn watch_process(&mut self, t: &Target, source: &'static str, now: u64) -> Result<()> {
        self.probes.watch(t.pid, t.master, t.role)?;
        self.add_listeners(t.pid);
        for tid in proc::threads(t.pid) {
            if let Some((nr, args)) = proc::thread_syscall(t.pid, tid) {
                self.probes.seed_inflight(tid, t.pid, nr, args, now);
            }
        }
        let gunicorn = matches!(t.role, Role::Master | Role::Worker);
        let cmd = proc::cmdline(t.master);
        let app = gunicorn.then(|| proc::parse_app(&cmd)).flatten();
        let timeout = gunicorn.then(|| proc::parse_timeout(&cmd).unwrap_or(30.0));
        if let Some(o) = self.corr.add_process(
            now,
            t.pid,
            t.master,
            t.role,
            app,
            timeout,
            source,
            crate::container::of_process(t.pid),
        ) {
            self.emit(&o);
        }
        Ok(())
    }

    fn watch_master_and_workers(
        &mut self,
        master: u32,
        source: &'static str,
        now: u64,
    ) -> Result<()> {
        self.watch_process(
            &Target {
                pid: master,
                master,
                role: Role::Master,
            },
            source,
            now,
        )?;
        for child in proc::children(master) {
            self.watch_process(
                &Target {
                    pid: child,
                    master,
                    role: Role::Worker,
                },
                source,
                now,
            )?;
        }
        Ok(())
    }

    fn handle(&mut self, ev: KernelEvent) {
        if let KernelEvent::Exec { pid, .. } = ev {
            if self.discover
                && !self.corr.is_watched(pid)
                && proc::identify(pid) == proc::Identity::Master
            {
                let now = output::monotonic_ns();
                if let Err(e) = self.watch_master_and_workers(pid, "exec", now) {
                    eprintln!("tracer: warning: cannot watch new Gunicorn master {pid}: {e:#}");
                }
            }
            return;
        }
        if let KernelEvent::Fork {
            master,
            role: Role::Worker,
            ..
        } = ev
        {
            // A master found at its exec binds its sockets later, but always
            // before it forks a worker.
            self.add_listeners(master);
        }
        if let KernelEvent::Exit { .. } = ev {
            // The kernel closes an exiting process's sockets just after this
            // event; hold it so those closes are reported first, while the
            // process is still known and still in WATCHED.
            self.exits.push((output::monotonic_ns(), ev));
            return;
        }
        for o in self.corr.on_kernel(ev, &mut self.enricher) {
            self.emit(&o);
        }
    }

    /// Handles the exits held back for at least `EXIT_HOLD_NS` (all of them
    /// when `all`).
    fn flush_exits(&mut self, all: bool) {
        let now = output::monotonic_ns();
        let (due, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.exits)
            .into_iter()
            .partition(|(at, _)| all || now.saturating_sub(*at) >= EXIT_HOLD_NS);
        self.exits = held;
        for (_, ev) in due {
            let KernelEvent::Exit { pid, .. } = ev else {
                continue;
            };
            for o in self.corr.on_kernel(ev, &mut self.enricher) {
                self.emit(&o);
            }
            self.probes.forget(pid);
        }
    }

    fn drain(&mut self, rb: &mut aya::maps::RingBuf<aya::maps::MapData>) {
        let mut batch = Vec::new();
        while let Some(item) = rb.next() {
            if let Some(ev) = intake::decode(&item) {
                batch.push(ev);
            }
        }
        self.events_received += batch.len() as u64;
        for ev in batch {
            self.handle(ev);
        }
    }

    /// Processes still in WATCHED that no longer exist: their EXIT event was
    /// lost (ring buffer full). Ends them as if it had arrived, so neither
    /// the kernel map nor the report keeps a dead process.
    fn sweep_dead(&mut self) {
        if self.last_sweep.elapsed() < SWEEP_EVERY {
            return;
        }
        self.last_sweep = Instant::now();
        let held: Vec<u32> = self
            .exits
            .iter()
            .filter_map(|(_, e)| match e {
                KernelEvent::Exit { pid, .. } => Some(*pid),
                _ => None,
            })
            .collect();
        let dead: Vec<u32> = self
            .probes
            .watched
            .keys()
            .filter_map(|k| k.ok())
            .filter(|pid| !held.contains(pid) && !proc::exists(*pid))
            .collect();
        let now = output::monotonic_ns();
        for pid in dead {
            let ev = KernelEvent::Exit {
                ts_ns: now,
                pid,
                exit_code: None,
                signal: None,
            };
            self.exits.push((0, ev));
        }
    }

    fn poll(&mut self) {
        self.sweep_dead();
        self.flush_exits(false);
        let now = output::monotonic_ns();
        let samples: Vec<Sample> = self
            .probes
            .inflight_samples()
            .into_iter()
            .map(|(tid, e)| Sample {
                tid,
                tgid: e.tgid,
                nr: e.nr as i64,
                start_ns: e.start_ns,
                arg0: e.arg0,
                arg2: e.arg2,
                seq: e.seq,
                active: e.active != 0,
                seeded: e.seeded != 0,
            })
            .collect();
        for o in self.corr.on_samples(&samples, now, &mut self.enricher) {
            self.emit(&o);
        }
    }
}

pub fn run(args: WatchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: WatchArgs) -> Result<()> {
    check_privileges()?;
    if args.py_stack && targets_have_no_py_spy(&args.pids) {
        eprintln!(
            "tracer: warning: --py-stack: py-spy is not installed (pip install py-spy); stalls will be reported without Python stacks"
        );
    }
    // Bind first: a port in use fails before anything is loaded.
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some((addr, crate::metrics::bind(addr).await?)),
        None => None,
    };
    let targets = resolve_targets(&args.pids)?;
    let tracefs = tracefs::ensure_mounted()?;
    let threshold_ns = args.threshold.as_nanos() as u64;
    // Every check that can fail on bad input comes before anything is loaded.
    let file = match &args.output {
        Some(p) => Some(BufWriter::new(File::create(p).with_context(|| {
            format!("cannot create --output file {}", p.display())
        })?)),
        None => None,
    };
    let mut probes = loader::load(&tracefs, threshold_ns)?;
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
    let mut ring = unsafe { AsyncFd::register(rb) }
        .map_err(|e| anyhow!("registering the ring buffer with the runtime: {e}"))?;

    let clock = Clock::now();
    let mut st = State {
        probes,
        corr: Correlator::new(threshold_ns),
        enricher: ProcEnricher,
        sink: Sink {
            format: args.format,
            clock,
            stdout: std::io::stdout(),
            file,
            stdout_gone: false,
            held: Some(Vec::new()),
            color: std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none(),
        },
        discover: args.pids.is_empty(),
        events_received: 0,
        exits: Vec::new(),
        last_sweep: Instant::now(),
        py_stack: args.py_stack,
        durations: Default::default(),
        metrics: None,
    };
    if let Some((addr, listener)) = metrics_listener {
        let text = Arc::new(Mutex::new(String::new()));
        tokio::spawn(crate::metrics::serve(listener, text.clone()));
        st.metrics = Some((text, Instant::now()));
        eprintln!("tracer: serving metrics on http://{addr}/metrics");
    }

    let start = output::monotonic_ns();
    for t in &targets {
        let r = if t.role == Role::Master {
            st.watch_master_and_workers(t.pid, "scan", start)
        } else {
            st.watch_process(t, "scan", start)
        };
        if let Err(e) = r {
            // A process that exited between discovery and now is not fatal
            // in discovery mode; a --pid that vanished is.
            if st.discover {
                eprintln!("tracer: warning: {e:#}");
            } else if !proc::exists(t.pid) {
                bail!(
                    "pid {} exited while the tracer was attaching; nothing to watch",
                    t.pid
                );
            } else {
                return Err(e);
            }
        }
    }
    // `start` means "attached and watching": only now can a test or a
    // person rely on every event being seen.
    st.sink.start(
        &StartEvent {
            version: env!("CARGO_PKG_VERSION"),
            threshold_ms: threshold_ns / 1_000_000,
            discover: st.discover,
            pids: targets.iter().map(|t| t.pid).collect(),
        },
        start,
    );
    for o in st.sink.held.take().unwrap_or_default() {
        st.sink.event(&o);
    }
    st.render_metrics(true);
    if st.discover && targets.is_empty() {
        eprintln!("tracer: no Gunicorn master is running yet; waiting for one to start");
    }

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
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut sleep_until => break,
        }
    }

    st.drain(ring.get_mut());
    st.poll();
    st.flush_exits(true);
    let now = output::monotonic_ns();
    let summary = st.corr.summary(now);
    let lost = st.probes.events_lost();
    st.sink.summary(
        &SummaryEvent {
            duration_ms: now.saturating_sub(start) / 1_000_000,
            events_lost: lost,
            maps: st.probes.occupancy(),
            summary: &summary,
        },
        now,
    );
    Ok(())
}
