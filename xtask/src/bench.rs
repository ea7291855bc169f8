//! `cargo xtask bench`: the tracer's cost, side by side with the floor and
//! with what people use instead, in one run. Timings on shared machines are
//! noisy, so every figure is a median over interleaved rounds and the table
//! reports ratios measured in the same run; nothing here asserts a time.
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tests::{GoFile, Gunicorn, Proc, StallPids, Tracer, Value};

use crate::{bpfstats, root, step};

/// Sizes of one run; `quick` is the smoke test `cargo xtask test` runs.
struct Sizes {
    rounds: usize,
    /// Throughput moves a few percent between 5 s runs on shared cores: it
    /// needs more rounds than the micro-benchmarks for a steady median.
    wrk_rounds: usize,
    pairs: u64,
    /// Hand-offs of the context-switch ping-pong: two switches each.
    switch_pairs: u64,
    strace_pairs: u64,
    wrk_secs: u64,
    load_secs: u64,
    latency_trials: usize,
    /// Gunicorn workers watched while stacks are read, and stalls made.
    stack_workers: usize,
    stack_stalls: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                rounds: 1,
                wrk_rounds: 1,
                pairs: 20_000,
                switch_pairs: 5_000,
                strace_pairs: 500,
                wrk_secs: 1,
                load_secs: 1,
                latency_trials: 1,
                stack_workers: 4,
                stack_stalls: 4,
            }
        } else {
            Sizes {
                rounds: 5,
                wrk_rounds: 7,
                pairs: 300_000,
                switch_pairs: 200_000,
                strace_pairs: 5_000,
                wrk_secs: 5,
                load_secs: 5,
                latency_trials: 5,
                stack_workers: 64,
                stack_stalls: 120,
            }
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The hidden `__pipe-loop N GO [--switch]` subcommand: waits for file GO,
/// then does N 1-byte write+read pairs on a pipe and prints the ns per
/// syscall. With `--switch`, two threads pinned to one CPU hand the byte
/// back and forth over two pipes, so every read blocks: it prints the ns
/// per context switch instead.
pub fn pipe_loop(pairs: u64, go: &Path, switch: bool) -> Result<()> {
    println!("ready");
    std::io::stdout().flush()?;
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let pipe = || -> Result<[i32; 2]> {
        let mut fds = [0i32; 2];
        // SAFETY: fds is a valid 2-element array.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        Ok(fds)
    };
    // SAFETY (both closures): valid fds and a 1-byte buffer.
    let put = |fd: i32| unsafe { libc::write(fd, [0u8].as_ptr().cast(), 1) };
    let get = |fd: i32| unsafe { libc::read(fd, [0u8; 1].as_mut_ptr().cast(), 1) };
    let fds = pipe()?;
    if !switch {
        let t = Instant::now();
        for _ in 0..pairs {
            put(fds[1]);
            get(fds[0]);
        }
        let ns = t.elapsed().as_nanos() as f64 / (pairs * 2) as f64;
        println!("ns_per_syscall {ns:.1}");
        return Ok(());
    }
    // One CPU for both threads: each hand-off is then a switch between them.
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let back = pipe()?;
    let (there, back_r, back_w) = (fds, back[0], back[1]);
    let echo = std::thread::spawn(move || {
        for _ in 0..pairs {
            get(there[0]);
            put(back_w);
        }
    });
    let t = Instant::now();
    for _ in 0..pairs {
        put(there[1]);
        get(back_r);
    }
    let ns = t.elapsed().as_nanos() as f64 / (pairs * 2) as f64;
    let _ = echo.join();
    println!("ns_per_syscall {ns:.1}");
    Ok(())
}

/// The hidden `__drop-server` subcommand: accepts, reads the request and
/// closes without writing, as fast as it can, forever.
pub fn drop_server() -> Result<()> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        let mut buf = [0u8; 64];
        let _ = c.read(&mut buf);
    }
    Ok(())
}

fn self_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| root().join("target/debug/xtask"))
}

/// An external probe attached for one measurement, stopped when dropped.
enum Probe {
    Tracer(Tracer),
    Other(Child),
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Probe::Other(c) = self {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads `out` until `count` lines contained `needle` (the probe says it
/// is attached), then keeps draining it so the probe never blocks on a full
/// pipe. False if the stream ended first.
fn wait_attached(out: impl Read + Send + 'static, needle: &str, count: usize) -> Result<bool> {
    let mut out = BufReader::new(out);
    let mut seen = 0;
    let mut line = String::new();
    while seen < count {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        if line.contains(needle) {
            seen += 1;
        }
    }
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    Ok(true)
}

/// Starts bpftrace and waits until its probes are attached.
fn bpftrace(script: &str) -> Result<Probe> {
    let mut c = Command::new("bpftrace")
        .args(["-e", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    if !wait_attached(c.stdout.take().expect("piped"), "Attaching", 1)? {
        bail!("bpftrace exited before attaching");
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(Probe::Other(c))
}

/// The empty BTF-typed program on `sched_switch` (the tracer's own kind;
/// bpftrace 0.17 cannot attach one), loaded by the tracer binary itself:
/// `tracer __bench-floor` (tracer-ebpf/src/floor.rs).
fn btf_floor(bin: &Path) -> Result<Probe> {
    let mut c = Command::new(bin)
        .arg("__bench-floor")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the tracer's bench floor")?;
    if !wait_attached(c.stderr.take().expect("piped"), "floor attached", 1)? {
        bail!("the tracer's bench floor exited before attaching");
    }
    Ok(Probe::Other(c))
}

/// The in-flight tracking the tracer does, written as bpftrace: the fair
/// comparison for "what would I get with bpftrace".
fn bpftrace_inflight(pids: &[u32]) -> String {
    let filter = pids
        .iter()
        .map(|p| format!("pid == {p}"))
        .collect::<Vec<_>>()
        .join(" || ");
    format!(
        "tracepoint:raw_syscalls:sys_enter /{filter}/ {{ @start[tid] = nsecs; }} \
         tracepoint:raw_syscalls:sys_exit /@start[tid]/ {{ $d = nsecs - @start[tid]; \
         if ($d > 500000000) {{ printf(\"%d %d\\n\", tid, $d); }} delete(@start[tid]); }}"
    )
}

/// What the tracer does on a context switch, written as bpftrace: note when
/// a thread of `pid` goes to sleep, and how long it slept when it runs again.
fn bpftrace_offcpu(pid: u32) -> String {
    format!(
        "tracepoint:sched:sched_switch {{ if (pid == {pid} && args->prev_state != 0) {{ @start[tid] = nsecs; }} \
         if (@start[args->next_pid]) {{ $d = nsecs - @start[args->next_pid]; \
         if ($d > 500000000) {{ printf(\"%d %d\\n\", args->next_pid, $d); }} delete(@start[args->next_pid]); }} }}"
    )
}

fn strace(pids: &[u32]) -> Result<Probe> {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-o", "/dev/null"]);
    for p in pids {
        cmd.args(["-p", &p.to_string()]);
    }
    let mut c = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting strace")?;
    wait_attached(c.stderr.take().expect("piped"), "attached", pids.len())?;
    Ok(Probe::Other(c))
}

/// An empty program on one syscall tracepoint whose filter never matches:
/// what having syscall tracepoints enabled at all costs every process.
const FLOOR: &str = "tracepoint:syscalls:sys_enter_read /pid == 2147483646/ { }";

/// The same for the scheduler's switch tracepoint, which the tracer uses.
const SWITCH_FLOOR: &str = "tracepoint:sched:sched_switch /pid == 2147483646/ { }";

/// A micro-benchmark: what it loops on, and the runs it compares.
struct Micro {
    name: &'static str,
    /// What one unit of the loop is, for the table.
    unit: &'static str,
    switch: bool,
    floor: &'static str,
    configs: &'static [&'static str],
}

const SYSCALLS: Micro = Micro {
    name: "syscall_cost",
    unit: "syscall",
    switch: false,
    floor: FLOOR,
    configs: &[
        "baseline",
        "floor",
        "tracer_unwatched",
        "tracer_watched",
        "bpftrace",
        "strace",
    ],
};

const SWITCHES: Micro = Micro {
    name: "context_switch_cost",
    unit: "switch",
    switch: true,
    floor: SWITCH_FLOOR,
    configs: &[
        "baseline",
        "floor",
        "floor_btf",
        "tracer_unwatched",
        "tracer_watched",
        "bpftrace",
    ],
};

/// One measurement of a micro-benchmark.
struct Sample {
    /// Wall clock: ns per loop unit.
    wall_ns: f64,
    /// The kernel's accounting of the probe's program on the loop's event
    /// (the tracer's `sched_switch`, or bpftrace's one program): runs and
    /// run time over the loop. None without a probe or statistics.
    runs: Option<(u64, u64)>,
}

impl Probe {
    fn pid(&self) -> u32 {
        match self {
            Probe::Tracer(t) => t.pid(),
            Probe::Other(c) => c.id(),
        }
    }
}

/// The tracer watching `pid`, checked to be the binary just built: the
/// figures are about this checkout's programs.
fn tracer_probe(bin: &Path, pid: u32) -> Result<Probe> {
    let mut cmd = Command::new(bin);
    cmd.args(["watch", "--format", "json", "--pid", &pid.to_string()]);
    let t = Tracer::start_command(cmd);
    let running = std::fs::read_link(format!("/proc/{}/exe", t.pid()))?;
    let built = std::fs::canonicalize(bin)?;
    if running != built {
        bail!(
            "the tracer started runs {} instead of {}",
            running.display(),
            built.display()
        );
    }
    Ok(Probe::Tracer(t))
}

/// Another build of the tracer to measure next to this one: a name for
/// its rows, and its binary.
#[derive(Clone)]
pub struct Variant {
    pub name: String,
    pub bin: PathBuf,
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Variant, String> {
        let (name, bin) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=PATH"))?;
        Ok(Variant {
            name: name.to_string(),
            bin: PathBuf::from(bin),
        })
    }
}

/// The probe `config` names, attached for a loop whose pid is `pid`. A
/// tracer config may end in `@NAME`: that variant's binary.
fn start_probe(
    m: &Micro,
    config: &str,
    pid: u32,
    idle_pid: u32,
    variants: &[Variant],
) -> Result<Option<Probe>> {
    let (config, bin) = match config.split_once('@') {
        Some((c, name)) => {
            let v = variants.iter().find(|v| v.name == name).expect("variant");
            (c, v.bin.clone())
        }
        None => (config, tests::tracer_bin()),
    };
    let watch = |p: u32| tracer_probe(&bin, p);
    Ok(match config {
        "baseline" => None,
        "floor" => Some(bpftrace(m.floor)?),
        "floor_btf" => Some(btf_floor(&bin)?),
        "tracer_unwatched" => Some(watch(idle_pid)?),
        "tracer_watched" => Some(watch(pid)?),
        "bpftrace" if m.switch => Some(bpftrace(&bpftrace_offcpu(pid))?),
        "bpftrace" => Some(bpftrace(&bpftrace_inflight(&[pid]))?),
        "strace" => Some(strace(&[pid])?),
        _ => bail!("unknown config {config}"),
    })
}

/// The tracer's program on the loop's event; any program of the others.
fn loop_program(config: &str) -> impl Fn(&str) -> bool + use<> {
    let tracer = config.starts_with("tracer");
    move |name: &str| !tracer || name == "sched_switch"
}

/// One measurement: ns per loop unit of the pipe loop under `config`.
fn micro_once(
    m: &Micro,
    config: &str,
    s: &Sizes,
    idle_pid: u32,
    variants: &[Variant],
) -> Result<Sample> {
    let go = GoFile::new("bench");
    let pairs = match (config, m.switch) {
        ("strace", _) => s.strace_pairs,
        (_, true) => s.switch_pairs,
        _ => s.pairs,
    };
    let mut cmd = Command::new(self_exe());
    cmd.args(["__pipe-loop", &pairs.to_string()]).arg(go.path());
    if m.switch {
        cmd.arg("--switch");
    }
    // A Proc is killed when dropped: a probe that fails to start must not
    // leave the loop waiting for its go file forever.
    let mut child = Proc::spawn(cmd.stdin(Stdio::null()).stdout(Stdio::piped()));
    let mut out = BufReader::new(child.child.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    let probe = start_probe(m, config, child.pid(), idle_pid, variants)?;
    let progs = probe
        .as_ref()
        .filter(|_| m.switch)
        .map(|p| bpfstats::prog_ids(p.pid()))
        .unwrap_or_default();
    let before = bpfstats::snapshot(&progs)?;
    go.release();
    line.clear();
    out.read_line(&mut line)?;
    child.child.wait()?;
    let after = bpfstats::snapshot(&progs)?;
    let runs = (!progs.is_empty()).then(|| bpfstats::delta(&before, &after, loop_program(config)));
    let wall_ns = line
        .trim()
        .strip_prefix("ns_per_syscall ")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("pipe loop printed {line:?}"))?;
    Ok(Sample { wall_ns, runs })
}

/// wrk's requests/s and p99 latency (ms).
fn wrk(port: u16, path: &str, secs: u64) -> Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t2", "-c32", &format!("-d{secs}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| parse_wrk_latency(v.trim()))
        .unwrap_or(f64::NAN);
    Ok((rps, p99))
}

fn parse_wrk_latency(v: &str) -> f64 {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().map(|n| n * mult).unwrap_or(f64::NAN)
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Kernel memory of the tracer's BPF maps, from the fdinfo of its map fds.
fn map_memlock_kb(pid: u32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|s| s.contains("map_type:"))
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum::<u64>()
        / 1024
}

/// The tracer's BPF programs' CPU time over one wrk run, from the kernel's
/// accounting: the cost the service's host pays in the kernel.
struct KernelCpu {
    secs: f64,
    /// Requests wrk completed meanwhile.
    requests: f64,
    /// name -> (runs, ns)
    progs: std::collections::BTreeMap<String, (u64, u64)>,
}

impl KernelCpu {
    fn between(
        before: &std::collections::BTreeMap<u32, bpfstats::Counters>,
        after: &std::collections::BTreeMap<u32, bpfstats::Counters>,
        wall: Duration,
        rps: f64,
    ) -> KernelCpu {
        let progs = after
            .values()
            .map(|c| {
                let d = bpfstats::delta(before, after, |n| n == c.name);
                (c.name.clone(), d)
            })
            .collect();
        KernelCpu {
            secs: wall.as_secs_f64(),
            requests: rps * wall.as_secs_f64(),
            progs,
        }
    }

    fn total_ns(&self) -> u64 {
        self.progs.values().map(|p| p.1).sum()
    }

    /// Medians over the rounds: kernel CPU ms per second of load (all
    /// programs), ns per request (steadier: the request rate moves with
    /// the machine's other load), and each program's runs per second and
    /// ns per run.
    fn report(path: &str, rounds: &[KernelCpu]) -> Value {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        let mut ms_per_s: Vec<f64> = rounds
            .iter()
            .map(|r| r.total_ns() as f64 / 1e6 / r.secs)
            .collect();
        let total = median(&mut ms_per_s);
        let mut per_req: Vec<f64> = rounds
            .iter()
            .map(|r| r.total_ns() as f64 / r.requests)
            .collect();
        let per_req = median(&mut per_req);
        eprintln!(
            "  {path:<6} tracer's BPF programs: {total:.2} ms of kernel CPU per second of load ({:.2}% of {cores} cores), {per_req:.0} ns per request",
            total / 10.0 / cores
        );
        let mut progs = serde_json::Map::new();
        let names = rounds
            .first()
            .map(|r| r.progs.keys().cloned().collect::<Vec<_>>());
        for name in names.unwrap_or_default() {
            let of = |f: &dyn Fn(&KernelCpu, u64, u64) -> f64| {
                let mut v: Vec<f64> = rounds
                    .iter()
                    .filter_map(|r| r.progs.get(&name).map(|&(n, t)| f(r, n, t)))
                    .collect();
                median(&mut v)
            };
            let per_s = of(&|r, n, _| n as f64 / r.secs);
            let ns = of(&|_, n, t| {
                if n == 0 {
                    f64::NAN
                } else {
                    t as f64 / n as f64
                }
            });
            eprintln!("         {name:<20} {per_s:>9.0} runs/s {ns:>7.1} ns/run");
            progs.insert(
                name,
                serde_json::json!({"runs_per_s": per_s, "ns_per_run": ns}),
            );
        }
        serde_json::json!({"ms_per_s": total, "cores": cores, "percent_of_cores": total / 10.0 / cores, "ns_per_request": per_req, "programs": progs})
    }
}

#[derive(Default, serde::Serialize)]
struct TracerCost {
    cpu_ms: u64,
    wall_ms: u64,
    peak_rss_kb: u64,
    bpf_maps_kb: u64,
}

/// The parts of the benchmark, to run one alone while iterating on it.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Syscalls,
    Switches,
    Throughput,
    EarlyClose,
    Latency,
    Stacks,
}

type Report = serde_json::Map<String, Value>;

pub fn run(quick: bool, only: &[Part], variants: &[Variant]) -> Result<()> {
    let s = Sizes::new(quick);
    let mut report = serde_json::Map::new();
    let machine = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    report.insert("machine".into(), machine.clone().into());
    report.insert("quick".into(), quick.into());

    let want = |p: Part| only.is_empty() || only.contains(&p);
    if want(Part::Syscalls) {
        micro_cost(&SYSCALLS, &s, &[], &mut report)?;
    }
    if want(Part::Switches) {
        micro_cost(&SWITCHES, &s, variants, &mut report)?;
    }
    if want(Part::Throughput) {
        throughput(&s, &mut report)?;
    }
    if want(Part::EarlyClose) {
        early_close_load(&s, &mut report)?;
    }
    if want(Part::Latency) {
        detection_latency(&s, &mut report)?;
    }
    if want(Part::Stacks) {
        stack_cost(&s, &mut report)?;
    }
    // A partial run must not overwrite the full table the README quotes.
    let name = if only.is_empty() {
        "bench.json"
    } else {
        "bench-partial.json"
    };
    let path = root().join("target").join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(report))?)?;
    step(&format!(
        "results written to {} ({machine})",
        path.display()
    ));
    Ok(())
}

fn micro_cost(m: &Micro, s: &Sizes, variants: &[Variant], report: &mut Report) -> Result<()> {
    let mut configs: Vec<String> = m.configs.iter().map(|c| c.to_string()).collect();
    for v in variants {
        configs.push(format!("tracer_unwatched@{}", v.name));
        configs.push(format!("tracer_watched@{}", v.name));
    }
    step(&format!(
        "{} cost: {} rounds of {} configs{}",
        m.unit,
        s.rounds,
        configs.len(),
        if m.switch {
            ", two threads of one process pinned to one CPU passing a byte over two pipes"
        } else {
            ", 1-byte write+read pairs on a pipe"
        }
    ));
    // On for the whole part, so every probe's wall-clock row pays the
    // statistics' own cost alike.
    let _stats = if m.switch {
        Some(bpfstats::StatsOn::new()?)
    } else {
        None
    };
    let idle = Proc::spawn(Command::new("sleep").arg("3600"));
    let mut samples: Vec<Vec<Sample>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 0..s.rounds {
        // Rotate the order so no config always runs first or last.
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            samples[i].push(micro_once(m, &configs[i], s, idle.pid(), variants)?);
        }
    }
    drop(idle);
    let mut json = wall_clock_rows(m, &configs, &samples);
    if m.switch {
        let per_run = program_rows(&configs, s, &samples);
        json.insert("program_ns_per_run".into(), per_run.into());
    }
    report.insert(m.name.into(), json.into());
    Ok(())
}

/// Wall-clock ns per loop unit, against the floor's added cost, with the
/// spread of the rounds: the noise these figures carry.
fn wall_clock_rows(m: &Micro, configs: &[String], samples: &[Vec<Sample>]) -> Report {
    let spread = |v: &[Sample]| {
        let w = v.iter().map(|x| x.wall_ns);
        (
            w.clone().fold(f64::INFINITY, f64::min),
            w.fold(0.0, f64::max),
        )
    };
    let med: Vec<f64> = samples
        .iter()
        .map(|v| median(&mut v.iter().map(|x| x.wall_ns).collect::<Vec<_>>()))
        .collect();
    let base = med[0];
    let floor_added = med[1] - base;
    let mut json = serde_json::Map::new();
    for (i, c) in configs.iter().enumerate() {
        let added = med[i] - base;
        let ratio = if i == 0 {
            f64::NAN
        } else {
            added / floor_added
        };
        let (lo, hi) = spread(&samples[i]);
        eprintln!(
            "  {c:<24} {:>10.1} ns/{} (rounds {lo:.0}..{hi:.0})  {:>+9.1} ns added  {:>8.2}x the floor's added cost",
            med[i], m.unit, added, ratio
        );
        json.insert(
            c.to_string(),
            serde_json::json!({"ns": med[i], "added_ns": added, "ratio_to_floor": ratio, "min_ns": lo, "max_ns": hi}),
        );
    }
    json
}

/// A target of issue 14: the JSON key of the ratio, what it divides by,
/// and how the table names that.
type Target = (&'static str, f64, &'static str);

/// The kernel's ns per run of each probe's `sched_switch` program (median
/// of the rounds), and the tracer's ratios to its two targets.
fn program_rows(configs: &[String], s: &Sizes, samples: &[Vec<Sample>]) -> Report {
    let per_run = |i: usize| {
        let mut v: Vec<f64> = samples[i]
            .iter()
            .filter_map(|x| x.runs)
            .filter(|(runs, _)| *runs > 0)
            .map(|(runs, ns)| ns as f64 / runs as f64)
            .collect();
        let mut r: Vec<f64> = samples[i]
            .iter()
            .filter_map(|x| x.runs.map(|r| r.0 as f64))
            .collect();
        (median(&mut v), median(&mut r))
    };
    let at = |c: &str| configs.iter().position(|x| *x == c).expect("config");
    let empty = per_run(at("floor")).0;
    let empty_btf = per_run(at("floor_btf")).0;
    let offcpu = per_run(at("bpftrace")).0;
    eprintln!(
        "  program on sched_switch, kernel accounting (ns per run; the loop makes {} switches a round):",
        2 * s.switch_pairs
    );
    // (config, row, what the target compares it with)
    let mut rows: Vec<(String, String, Option<Target>)> = vec![
        (
            "floor".into(),
            "empty classic program, pid filter never matches (bpftrace)".into(),
            None,
        ),
        (
            "floor_btf".into(),
            "empty BTF-typed program (tp_btf), the same pid test".into(),
            None,
        ),
        (
            "bpftrace".into(),
            "bpftrace off-CPU tracking for one pid".into(),
            None,
        ),
    ];
    let unwatched = Some(("x_empty", empty, "the empty program's (target <= 1.3)"));
    let watched = Some(("x_bpftrace", offcpu, "bpftrace's (target <= 1.0)"));
    for c in configs.iter().filter(|c| c.starts_with("tracer_")) {
        let (what, target) = match c.strip_prefix("tracer_unwatched") {
            Some(v) => (format!("tracer{v}, ping-pong not watched"), unwatched),
            None => (
                format!("tracer{}, ping-pong watched", &c["tracer_watched".len()..]),
                watched,
            ),
        };
        rows.push((c.clone(), what, target));
    }
    let mut json = serde_json::Map::new();
    for (c, what, target) in rows {
        let (ns, runs) = per_run(at(&c));
        let mut row = serde_json::json!({"ns_per_run": ns, "runs": runs});
        let mut tail = String::new();
        if let Some((key, base, name)) = target {
            row[key] = (ns / base).into();
            tail = format!("  {:.2}x {name}", ns / base);
        }
        // The tracer's sched_switch is a BTF tracepoint: against the empty
        // program of its own kind too.
        if c.starts_with("tracer_unwatched") {
            row["x_empty_btf"] = (ns / empty_btf).into();
            tail += &format!(", {:.2}x the empty tp_btf's", ns / empty_btf);
        }
        eprintln!("  {what:<60} {ns:>6.1} ns/run {runs:>9.0} runs{tail}");
        json.insert(c, row);
    }
    json
}

fn throughput(s: &Sizes, report: &mut Report) -> Result<()> {
    // 2. Service throughput with real Gunicorn.
    step("service throughput: Gunicorn -k gevent -w 4, wrk -t2 -c32");
    let g = Gunicorn::new("bench_app:app")
        .worker_class("gevent")
        .workers(4)
        .spawn();
    std::thread::sleep(Duration::from_millis(500));
    let (master, port) = (g.pid(), g.port);
    let workers: Vec<u32> =
        std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    let configs = ["none", "floor", "tracer", "bpftrace", "strace"];
    let mut thr: Vec<Vec<(f64, f64)>> = vec![Vec::new(); configs.len() * 2];
    let mut cost = TracerCost::default();
    let mut kcpu: [Vec<KernelCpu>; 2] = [Vec::new(), Vec::new()];
    for round in 0..s.wrk_rounds {
        for k in 0..configs.len() {
            let ci = (k + round) % configs.len();
            let mut probe = match configs[ci] {
                "none" => None,
                "floor" => Some(bpftrace(FLOOR)?),
                "tracer" => Some(tracer_probe(&tests::tracer_bin(), master)?),
                "bpftrace" => Some(bpftrace(&bpftrace_inflight(&workers))?),
                _ => Some(strace(&workers)?),
            };
            let ticks0 = match &probe {
                Some(Probe::Tracer(t)) => cpu_ticks(t.pid()),
                _ => 0,
            };
            // Only the tracer's rounds pay for the statistics: its row
            // carries their cost, the others none.
            let (_stats, progs) = match &probe {
                Some(Probe::Tracer(t)) => {
                    (Some(bpfstats::StatsOn::new()?), bpfstats::prog_ids(t.pid()))
                }
                _ => (None, Vec::new()),
            };
            let t0 = Instant::now();
            for (pi, path) in ["/", "/pipe"].iter().enumerate() {
                let before = bpfstats::snapshot(&progs)?;
                let w0 = Instant::now();
                let r = wrk(port, path, s.wrk_secs)?;
                thr[ci * 2 + pi].push(r);
                if !progs.is_empty() {
                    let after = bpfstats::snapshot(&progs)?;
                    let wall = w0.elapsed();
                    kcpu[pi].push(KernelCpu::between(&before, &after, wall, r.0));
                }
            }
            if let Some(Probe::Tracer(t)) = &mut probe {
                let hz = 100; // USER_HZ
                cost.cpu_ms = cost.cpu_ms.max((cpu_ticks(t.pid()) - ticks0) * 1000 / hz);
                cost.wall_ms = t0.elapsed().as_millis() as u64;
                cost.peak_rss_kb = cost.peak_rss_kb.max(proc_status_kb(t.pid(), "VmHWM:"));
                cost.bpf_maps_kb = map_memlock_kb(t.pid());
                t.stop();
            }
        }
    }
    drop(g);
    let mut thr_json = serde_json::Map::new();
    let med_of = |v: &Vec<(f64, f64)>| {
        let mut a: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut b: Vec<f64> = v.iter().map(|x| x.1).collect();
        (median(&mut a), median(&mut b))
    };
    let mut thr_rows = Vec::new();
    for (pi, path) in ["/", "/pipe"].iter().enumerate() {
        let (base_rps, base_p99) = med_of(&thr[pi]);
        for (ci, c) in configs.iter().enumerate() {
            let (rps, p99) = med_of(&thr[ci * 2 + pi]);
            thr_rows.push(format!(
                "  {path:<6} {c:<9} {rps:>9.0} req/s ({:>5.3}x)   p99 {p99:>8.2} ms ({:>5.2}x)",
                rps / base_rps,
                p99 / base_p99
            ));
            thr_json.insert(
                format!("{path} {c}"),
                serde_json::json!({"rps": rps, "rps_ratio": rps / base_rps, "p99_ms": p99, "p99_ratio": p99 / base_p99}),
            );
        }
    }
    for r in &thr_rows {
        eprintln!("{r}");
    }
    report.insert("throughput".into(), thr_json.into());
    let mut kjson = serde_json::Map::new();
    for (pi, path) in ["/", "/pipe"].iter().enumerate() {
        kjson.insert(path.to_string(), KernelCpu::report(path, &kcpu[pi]));
    }
    report.insert("tracer_kernel_cpu".into(), kjson.into());
    report.insert("tracer_cost".into(), serde_json::to_value(&cost)?);

    eprintln!("  tracer's own cost during the throughput run:");
    eprintln!(
        "  cpu {} ms over {} ms of load, peak RSS {:.1} MB, BPF maps {:.1} MB",
        cost.cpu_ms,
        cost.wall_ms,
        cost.peak_rss_kb as f64 / 1024.0,
        cost.bpf_maps_kb as f64 / 1024.0
    );

    Ok(())
}

fn early_close_load(s: &Sizes, report: &mut Report) -> Result<()> {
    // 3. Early-close load: every dropped connection reported, losses counted.
    step(&format!(
        "early-close load: a server that closes without replying, {} s at full speed",
        s.load_secs
    ));
    let mut server = Proc::spawn_captured(Command::new(self_exe()).arg("__drop-server"));
    let sport: u16 = server
        .first_line(Duration::from_secs(10))
        .trim()
        .parse()
        .context("drop server port")?;
    let mut t = Tracer::start(&["--pid", &server.pid().to_string()]);
    let sent = tests::connection_storm(sport, 2, Duration::from_secs(s.load_secs));
    t.collect_for(Duration::from_secs(1));
    let summary = t.stop();
    drop(server);
    let seen = t
        .of_kind("early_close")
        .iter()
        .filter(|e| e["kind"] == "dropped_request")
        .count() as u64;
    let lost = summary["events_lost"].as_u64().unwrap_or(0);
    let limited = summary["events_rate_limited"].as_u64().unwrap_or(0);
    let rate = sent as f64 / s.load_secs as f64;
    eprintln!(
        "  {sent} connections ({rate:.0}/s): {seen} reported, {limited} held back past the process's event rate, {lost} events lost"
    );
    report.insert("early_close_load".into(), serde_json::json!({"connections": sent, "per_second": rate, "reported": seen, "events_rate_limited": limited, "events_lost": lost}));

    Ok(())
}

fn detection_latency(s: &Sizes, report: &mut Report) -> Result<()> {
    // 4. Detection latency.
    step(&format!(
        "detection latency: {} blocking reads, threshold 500ms",
        s.latency_trials
    ));
    let mut lat = Vec::new();
    for _ in 0..s.latency_trials {
        let go = GoFile::new("bench-latency");
        let code = format!(
            "{}r, w = os.pipe()\nprint(time.monotonic_ns(), flush=True)\nos.read(r, 1)\n",
            go.python_wait()
        );
        let mut p = Proc::python_captured(&code);
        let mut t = Tracer::start(&["--pid", &p.pid().to_string(), "--threshold", "500ms"]);
        go.release();
        let entered: u64 = p
            .first_line(Duration::from_secs(10))
            .trim()
            .parse()
            .context("python timestamp")?;
        t.wait_for("stall", Duration::from_secs(5), |e: &Value| {
            e["event"] == "stall"
        });
        let arrived = mono_ns();
        lat.push((arrived.saturating_sub(entered) as f64 / 1e6) - 500.0);
        drop(p);
        t.stop();
    }
    let lat_med = median(&mut lat);
    eprintln!("  stall printed {lat_med:.1} ms after crossing the threshold (median)");
    report.insert(
        "detection_latency_ms_after_threshold".into(),
        lat_med.into(),
    );
    cpu_detection_latency(s, report)
}

/// A gevent worker's loop on the CPU is judged once its heartbeat is two
/// intervals (2 s) old: how long after that the stall is printed, by the
/// heartbeat age the tracer read (the file's ctime, wall clock).
fn cpu_detection_latency(s: &Sizes, report: &mut Report) -> Result<()> {
    step(&format!(
        "detection latency of a loop on the CPU: {} greenlets computing 5 s, judged at a 2 s old heartbeat",
        s.latency_trials
    ));
    let g = Gunicorn::new("stall_app:app")
        .worker_class("gevent")
        .timeout(60)
        .spawn();
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    let mut lat = Vec::new();
    for trial in 0..s.latency_trials {
        let client = tests::get_async(g.port, "/spin?secs=5", Duration::from_secs(20));
        let (_, stall) = t.wait_for("stall on the CPU", Duration::from_secs(6), |e: &Value| {
            e["event"] == "stall" && e["state"] == "on_cpu"
        });
        let age = stall["heartbeat_age_ms"]
            .as_f64()
            .context("heartbeat age")?;
        lat.push(age - 2000.0);
        t.events.retain(|(_, e)| e["event"] != "stall");
        let _ = client.recv_timeout(Duration::from_secs(15));
        // Let the heartbeat come back before the next one.
        t.wait_for("its end", Duration::from_secs(5), |e: &Value| {
            e["event"] == "stall_end" && e["state"] == "on_cpu"
        });
        t.events.retain(|(_, e)| e["event"] != "stall_end");
        eprintln!("  trial {trial}: printed at a {age:.0} ms old heartbeat");
    }
    t.stop();
    drop(g);
    let lat_med = median(&mut lat);
    eprintln!("  loop on the CPU printed {lat_med:.1} ms after its heartbeat was 2 s old (median)");
    report.insert(
        "cpu_detection_latency_ms_after_threshold".into(),
        lat_med.into(),
    );
    Ok(())
}

/// Python stacks: what setting up a worker's reader and reading a stalled
/// thread's stack cost (median and p99, as the tracer timed each request
/// to its helper: its summary's `py_stack_cost`), and the memory of the
/// tracer and of its stack helper with every worker of a 64-worker gevent
/// Gunicorn watched.
fn stack_cost(s: &Sizes, report: &mut Report) -> Result<()> {
    step(&format!(
        "Python stacks: {} gevent workers watched, {} stalls read",
        s.stack_workers, s.stack_stalls
    ));
    let pids = StallPids::new("bench-stacks");
    let g = Gunicorn::new("stall_app:app")
        .worker_class("gevent")
        .workers(s.stack_workers)
        .timeout(60)
        .env("STALL_PID_FILE", pids.path())
        .spawn();
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    t.wait_count("workers", s.stack_workers, Duration::from_secs(60), |e| {
        e["event"] == "worker"
    });
    // Each worker's reader is set up when it is found, off the loop.
    t.collect_for(Duration::from_secs(3));
    let tracer_rss_kb = proc_status_kb(t.pid(), "VmRSS:");
    let helper_rss_kb = children_of(t.pid())
        .into_iter()
        .map(|c| proc_status_kb(c, "VmRSS:"))
        .sum::<u64>();
    // Stalls in rounds of five, under the helper's rate limit of five
    // stacks a second per master: each reads one stack.
    let mut left = s.stack_stalls;
    while left > 0 {
        let n = left.min(5).min(s.stack_workers);
        let clients: Vec<_> = (0..n)
            .map(|_| tests::get_async(g.port, "/pipe?secs=1", Duration::from_secs(30)))
            .collect();
        for c in clients {
            let _ = c.recv();
        }
        left -= n;
    }
    t.collect_for(Duration::from_secs(1));
    let summary = t.stop();
    let cost = summary["py_stack_cost"].clone();
    let ms = |k: &str| cost[k].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "  set-up {:.2} ms median, {:.2} ms p99 ({} set-ups); capture {:.3} ms median, {:.3} ms p99 ({} captures); tracer RSS {} MiB, helper {} MiB with {} workers",
        ms("setup_ms_median"),
        ms("setup_ms_p99"),
        cost["setups"],
        ms("capture_ms_median"),
        ms("capture_ms_p99"),
        cost["captures"],
        tracer_rss_kb / 1024,
        helper_rss_kb / 1024,
        s.stack_workers
    );
    report.insert(
        "py_stacks".into(),
        serde_json::json!({
            "workers": s.stack_workers,
            "cost": cost,
            "tracer_rss_kb": tracer_rss_kb,
            "helper_rss_kb": helper_rss_kb,
        }),
    );
    Ok(())
}

/// The processes whose parent is `pid` (the tracer's stack helper).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|st| {
                    let rest = &st[st.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}
