//! Loading the BPF object, patching its configuration from the running
//! kernel, and attaching the tracepoints.
use std::os::fd::AsFd;

use anyhow::{Context, Result, anyhow, bail};
use aya::Pod;
use aya::maps::{Array, HashMap, IterableMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, RawTracePoint};

use aya::{Ebpf, EbpfLoader};
use tracer_common::{
    Config, Conn, Inflight, MAX_SYSCALL_NR, MasterLoad, OffenderKey, Quotas, ReadHist, UNSET,
    Watched, class, program, stat,
};

use super::batch;
use super::btf::Btf;
use super::layout;
use super::reset;
use super::watched_tgids::{self, WatchedTgids};
use crate::model::{
    FeaturesMissing, LoopWait, Losses, MapOccupancy, Offender, Role, SyscallClass, TopOffenders,
};

/// Map update flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The loaded programs and the maps user space talks to. Dropping it
/// detaches everything: nothing is pinned, so a crash leaves nothing behind.
pub struct Probes {
    _ebpf: Ebpf,
    pub watched: HashMap<MapData, u32, Watched>,
    /// Mirrors `watched`'s keys for sched_switch: see `WatchedTgids`.
    watched_tgids: WatchedTgids,
    pub inflight: HashMap<MapData, u32, Inflight>,
    pub stats: PerCpuArray<MapData, u64>,
    errors: PerCpuArray<MapData, u64>,
    pub conns: HashMap<MapData, u64, Conn>,
    pub read_hist: HashMap<MapData, u32, ReadHist>,
    pub ports: Array<MapData, u8>,
    /// What each master's processes hold of `watched` and `inflight`.
    master_load: HashMap<MapData, u32, MasterLoad>,
    /// Losses charged per counter and process.
    offenders: HashMap<MapData, OffenderKey, u64>,
    pub events: Option<RingBuf<MapData>>,
    /// Seeds `INFLIGHT` refused, full: added to the kernel's count.
    seeds_refused: u64,
    /// What this kernel's tracepoints do not let the programs see.
    features_missing: FeaturesMissing,
}

/// The errno of a failed map syscall.
fn os_error(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// The required programs: BTF-typed tracepoints of the same names (see
/// tracer-ebpf). Attached with bpf() alone: a classic tracepoint needs
/// perf_event_open, which Debian's kernel refuses without
/// CAP_SYS_ADMIN at its default perf_event_paranoid, and its record
/// layout moves between versions. The kernel checks each against its BTF
/// at load.
const BTF_PROGRAMS: [&str; 7] = [
    "sched_switch",
    "task_newtask",
    "sched_process_exit",
    "signal_generate",
    "signal_deliver",
    "sched_process_exec",
    "inet_sock_set_state",
];

/// Said at start on a kernel without `sock:sock_recv_length`.
const PRECEDED_BY_NOTE: &str = "this kernel has no sock:sock_recv_length tracepoint (Linux 6.3 and later have it); an early close's preceded_by (the read that found nothing before it) is not seen, and stays null";

/// A raw tracepoint attached when the kernel has it (6.3 and later): the
/// last receive on a tracked connection that found nothing (EAGAIN).
const OPTIONAL_RAW_PROGRAM: &str = "sock_recv_length";

/// BTF tracepoints attached when the kernel has them, as (program and
/// tracepoint, category, what is not seen without it): said once on
/// stderr, and everything else works. (tcp:tcp_send_reset, which has a
/// stand-in, is reset.rs's.)
const OPTIONAL_PROGRAMS: [(&str, &str, &str); 1] = [(
    "mark_victim",
    "oom",
    "OOM kills will be reported as a plain SIGKILL",
)];

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones to
/// the memory cgroup. The tracer needs 5.15, so this is only for a kernel
/// that says otherwise: best effort, and not even tried where it is not
/// needed (it would need CAP_SYS_RESOURCE, which the DaemonSet lacks).
fn raise_memlock() {
    if !charges_memlock(&kernel_release()) {
        return;
    }
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: lim is a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}

/// Whether a kernel release (`6.1.0-18-amd64`) predates 5.11's memcg
/// accounting of BPF memory. An unreadable release counts as old.
fn charges_memlock(release: &str) -> bool {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (major, minor) < (5, 11)
}

/// Turns a load error into one line that says what to do.
pub(super) fn explain(e: impl std::fmt::Display + std::fmt::Debug, what: &str) -> anyhow::Error {
    let text = format!("{e:#}");
    let debug = format!("{e:?}");
    if debug.contains("EPERM") || text.contains("Operation not permitted") {
        return anyhow!(
            "{what}: permission denied; run as root, or grant CAP_BPF and CAP_PERFMON (and CAP_SYS_ADMIN on kernels before 5.8); a locked-down kernel or kernel.unprivileged_bpf_disabled can also refuse"
        );
    }
    if let Some(helper) = missing_helper(&debug) {
        return anyhow!(
            "{what}: this kernel ({}) lacks the BPF helper {helper}; the tracer needs Linux 5.15 or later",
            kernel_release()
        );
    }
    if debug.contains("verifier") || debug.contains("Verifier") {
        // One line: the verifier's last complaint. Its whole log only
        // with RUST_LOG=debug.
        if std::env::var("RUST_LOG").is_ok_and(|v| v.contains("debug") || v.contains("trace")) {
            eprintln!("tracer: debug: {what}: verifier log:\n{text}");
        }
        let said = text
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| {
                !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time")
            })
            .unwrap_or("");
        return anyhow!(
            "{what}: the kernel's verifier rejected the program; please report this with the kernel version ({}); it said: {said} (RUST_LOG=debug shows its whole log)",
            kernel_release(),
        );
    }
    anyhow!("{what}: {text}")
}

/// The helper a verifier log says the kernel does not know, as in
/// "unknown func bpf_task_pt_regs#175", or, on a kernel older than the
/// helper (which then has no name for it), "invalid func unknown#175".
fn missing_helper(log: &str) -> Option<String> {
    if let Some(at) = log.find("invalid func unknown#") {
        let digits: String = log[at + "invalid func unknown#".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        // The helpers the programs call that are newest (5.11, 5.15).
        let name = match digits.as_str() {
            "158" => "bpf_get_current_task_btf",
            "175" => "bpf_task_pt_regs",
            _ => "",
        };
        if !digits.is_empty() {
            return Some(if name.is_empty() {
                format!("#{digits}")
            } else {
                format!("{name}#{digits}")
            });
        }
    }
    let rest = &log[log.find("unknown func ")? + "unknown func ".len()..];
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '#')
        .collect();
    (!name.is_empty()).then_some(name)
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The syscall numbers the kernel side needs, from user space's table
/// (`analysis::syscalls`), so that this room carries no table of its own.
pub struct SyscallTable {
    /// (number, class) of every syscall that is not the default.
    pub classes: Vec<(i64, SyscallClass)>,
    pub close: i64,
    pub shutdown: i64,
}

/// The programs' whole configuration, from this kernel, and what it
/// offers the optional programs.
fn config(
    threshold_ns: u64,
    quotas: Quotas,
    sys: &SyscallTable,
) -> Result<(Config, layout::Facts)> {
    let btf = Btf::from_sys_fs().ok_or_else(|| {
        anyhow!(
            "this kernel has no BTF at /sys/kernel/btf/vmlinux: the tracer needs it (CONFIG_DEBUG_INFO_BTF=y, the default on Debian, Ubuntu, RHEL and their kin) to read task and socket fields"
        )
    })?;
    let config = Config {
        threshold_ns,
        nr_close: sys.close as u64,
        nr_shutdown: sys.shutdown as u64,
        tp: layout::tracepoint_args(&btf, &BTF_PROGRAMS)?,
        kernel: layout::kernel_offsets(&btf)?,
        quotas,
    };
    let facts = layout::Facts {
        reset_functions: reset::FUNCTIONS
            .into_iter()
            .filter(|f| btf.has_func(f))
            .collect(),
        reset_args: btf.tracepoint_args("tcp_send_reset").map(|a| a.len()),
        victim: btf.tracepoint_args("mark_victim").is_some(),
        recv: btf.tracepoint_args(OPTIONAL_RAW_PROGRAM).is_some(),
    };
    Ok((config, facts))
}

/// The embedded BPF object, loaded (not yet attached) with `config`.
/// The BPF object built into this binary.
fn object_bytes() -> Result<&'static [u8]> {
    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));
    if bytes.is_empty() {
        bail!(
            "this tracer binary was built with AYA_BUILD_SKIP and holds no BPF programs; rebuild it with `cargo xtask build`"
        );
    }
    Ok(bytes)
}

fn open_object(config: &Config, opts: &LoadOptions) -> Result<Ebpf> {
    let bytes = object_bytes()?;
    // The loader parses the kernel's BTF itself, and drops it on return.
    EbpfLoader::new()
        .map_max_entries("WATCHED_TGIDS", watched_tgids::slots())
        .override_global("CONFIG", config, true)
        .map_max_entries("WATCHED", opts.watch_capacity)
        .map_max_entries("INFLIGHT", opts.inflight_capacity)
        .load(bytes)
        .map_err(|e| explain(e, "loading the BPF object"))
}

/// `cargo xtask bench`'s floor for BTF-typed tracepoints: the embedded
/// object's empty `floor_sched_switch`, loaded and attached to
/// `sched_switch` as the tracer's own program is, and nothing else. The
/// program stays attached while the returned object lives.
pub fn bench_floor() -> Result<Ebpf> {
    let bytes = object_bytes()?;
    let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .map_max_entries("WATCHED_TGIDS", watched_tgids::slots())
        .load(bytes)
        .map_err(|e| explain(e, "loading the BPF object"))?;
    let p: &mut BtfTracePoint = ebpf
        .program_mut("floor_sched_switch")
        .ok_or_else(|| anyhow!("BPF object has no program floor_sched_switch"))?
        .try_into()?;
    p.load("sched_switch", &btf)
        .map_err(|e| explain(e, "loading program floor_sched_switch"))?;
    p.attach()
        .map_err(|e| explain(e, "attaching to BTF tracepoint sched_switch"))?;
    Ok(ebpf)
}

/// Fills the syscall class table: it must be full before sched_switch runs.
fn fill_classes(ebpf: &mut Ebpf, classes: &[(i64, SyscallClass)]) -> Result<()> {
    let mut map: Array<_, u32> = Array::try_from(
        ebpf.map_mut("SYSCALL_CLASS")
            .ok_or_else(|| anyhow!("BPF object has no SYSCALL_CLASS map"))?,
    )?;
    for &(nr, class) in classes {
        if (nr as u32) < MAX_SYSCALL_NR {
            map.set(nr as u32, super::decode::class_bits(class), 0)
                .context("filling the syscall class table")?;
        }
    }
    Ok(())
}

/// Loads and attaches the optional programs this kernel has the
/// tracepoints (or functions) of. Returns what is missing for want of
/// one. `skip` names tracepoints not to attach even when usable
/// (`--without-tracepoint`).
fn attach_optional(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    config: &Config,
    facts: layout::Facts,
    skip: &[String],
    missing: &mut FeaturesMissing,
) -> Result<()> {
    let k = &config.kernel;
    let offer = reset::Offer {
        tracepoint: facts.reset_args.is_some(),
        covers_segments: facts.reset_args.is_some_and(|n| n >= 3),
        skipped: skip.iter().any(|s| s == "tcp_send_reset"),
        functions: facts.reset_functions,
        skb_offsets: [k.skb_head, k.skb_network_header, k.skb_transport_header]
            .iter()
            .all(|o| *o != UNSET),
    };
    missing.keepalive_race = !reset::attach(ebpf, btf, &offer)?;
    for (name, category, without) in OPTIONAL_PROGRAMS {
        let usable = match name {
            "mark_victim" => facts.victim,
            _ => false,
        };
        let skipped = skip.iter().any(|s| s == name);
        if !usable || skipped {
            let why = if skipped {
                "not attached (--without-tracepoint)"
            } else {
                "this kernel has no usable"
            };
            eprintln!("tracer: note: {why} {category}:{name} tracepoint; {without}");
            missing.oom_kill = true;
            continue;
        }
        attach_btf(ebpf, btf, name)?;
    }
    Ok(())
}

/// Loads BTF tracepoint program `name` and attaches it to the tracepoint
/// of the same name.
pub(super) fn attach_btf(ebpf: &mut Ebpf, btf: &aya::Btf, name: &str) -> Result<()> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("BPF object has no program {name}"))?
        .try_into()?;
    p.load(name, btf)
        .map_err(|e| explain(e, &format!("loading program {name}")))?;
    p.attach()
        .map_err(|e| explain(e, &format!("attaching to BTF tracepoint {name}")))?;
    Ok(())
}

/// Loads each program into the kernel and attaches it; the optional raw
/// tracepoint only where this kernel has it.
fn attach_all(ebpf: &mut Ebpf, with_recv: bool, btf: &aya::Btf) -> Result<()> {
    for name in BTF_PROGRAMS {
        attach_btf(ebpf, btf, name)?;
    }
    if with_recv {
        let name = OPTIONAL_RAW_PROGRAM;
        let p: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("BPF object has no program {name}"))?
            .try_into()?;
        p.load()
            .map_err(|e| explain(e, &format!("loading program {name}")))?;
        p.attach(name)
            .map_err(|e| explain(e, &format!("attaching to raw tracepoint {name}")))?;
    }
    Ok(())
}

/// Takes the maps user space reads out of the object.
fn take_maps(mut ebpf: Ebpf) -> Result<Probes> {
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("BPF object has no map {name}"))
    };
    let watched = HashMap::try_from(take("WATCHED")?)?;
    let watched_tgids = match take("WATCHED_TGIDS")? {
        aya::maps::Map::Array(data) => {
            let slots = data.info()?.max_entries();
            WatchedTgids::map(data, slots)?
        }
        _ => bail!("BPF object's WATCHED_TGIDS is not an array"),
    };
    let inflight = HashMap::try_from(take("INFLIGHT")?)?;
    let stats = PerCpuArray::try_from(take("STATS")?)?;
    let errors = PerCpuArray::try_from(take("ERRORS")?)?;
    let conns = HashMap::try_from(take("CONNS")?)?;
    let read_hist = HashMap::try_from(take("READ_HIST")?)?;
    let ports = Array::try_from(take("PORTS")?)?;
    let master_load = HashMap::try_from(take("MASTER_LOAD")?)?;
    let offenders = HashMap::try_from(take("OFFENDERS")?)?;
    let events = Some(RingBuf::try_from(take("EVENTS")?)?);
    Ok(Probes {
        _ebpf: ebpf,
        watched,
        watched_tgids,
        inflight,
        stats,
        errors,
        conns,
        read_hist,
        ports,
        master_load,
        offenders,
        events,
        seeds_refused: 0,
        features_missing: FeaturesMissing::default(),
    })
}

/// Every entry of a hash map: in batches, or entry by entry on a kernel
/// without batch reads. A read that fails midway keeps what it read.
fn read_all<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    let mut out = Vec::new();
    match batch::for_each(map.map().fd().as_fd(), usize::MAX, |k: &K, v: &V| {
        out.push((*k, *v))
    }) {
        Err(e) if batch::unsupported(&e) && out.is_empty() => {
            map.iter().filter_map(|r| r.ok()).collect()
        }
        _ => out,
    }
}

/// How many entries a hash map holds, read as [`read_all`] does.
fn count_all<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> usize {
    let mut n = 0;
    match batch::for_each(map.map().fd().as_fd(), usize::MAX, |_: &K, _: &V| n += 1) {
        Err(e) if batch::unsupported(&e) && n == 0 => map.keys().filter(|k| k.is_ok()).count(),
        _ => n,
    }
}

/// What the session asks of the kernel side.
pub struct LoadOptions {
    pub threshold_ns: u64,
    /// Processes `WATCHED` holds at most (its default is the object's 8,192).
    pub watch_capacity: u32,
    /// Threads `INFLIGHT` holds at most (its default is the object's 32,768).
    pub inflight_capacity: u32,
    /// Optional tracepoints not to attach (`--without-tracepoint`).
    pub without_tracepoints: Vec<String>,
    /// What one master, or one process, may take of the shared maps and
    /// the ring buffer.
    pub quotas: Quotas,
}

/// The kernel's quotas: `procs` processes per master, counting the master
/// itself (as `--max-watched-per-master` does); `threads` in-flight
/// entries per master; `rate` connection-end and signal events per second
/// per process, with a second's worth as burst.
pub fn quotas(procs: usize, threads: u32, rate: u32) -> Quotas {
    let rate = u64::from(rate.max(1));
    let cost = 1_000_000_000 / rate;
    Quotas {
        procs_per_master: (procs as u64).saturating_sub(1),
        threads_per_master: u64::from(threads),
        event_cost_ns: cost,
        event_burst_ns: cost * rate,
    }
}

/// Loads and attaches every program, configured for this kernel.
pub fn load(opts: &LoadOptions, sys: &SyscallTable) -> Result<Probes> {
    raise_memlock();
    let (config, facts) = config(opts.threshold_ns, opts.quotas, sys)?;
    let with_recv = facts.recv;
    let mut ebpf = open_object(&config, opts)?;
    fill_classes(&mut ebpf, &sys.classes)?;
    // Parsed again for the BTF tracepoint, once the loader's copy is gone:
    // two alive at once raised the start-up peak by 11 MB.
    let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    attach_all(&mut ebpf, with_recv, &btf)?;
    if !with_recv {
        eprintln!("tracer: note: {PRECEDED_BY_NOTE}");
    }
    let mut missing = FeaturesMissing {
        preceded_by: !with_recv,
        ..Default::default()
    };
    attach_optional(
        &mut ebpf,
        &btf,
        &config,
        facts,
        &opts.without_tracepoints,
        &mut missing,
    )?;
    drop(btf);
    let mut probes = take_maps(ebpf)?;
    probes.features_missing = missing;
    Ok(probes)
}

impl Probes {
    /// Adds a process found by user space (at attach, or a master at its
    /// exec). Any but a master itself counts against its master's quota,
    /// as the ones the kernel adds at their fork do.
    pub fn watch(&mut self, pid: u32, master: u32, role: Role) -> Result<()> {
        let counted = pid != master;
        let w = Watched {
            master,
            role: super::decode::role_to_kernel(role),
            counted: counted as u32,
            ..Default::default()
        };
        self.watched.insert(pid, w, 0).with_context(|| {
            format!("adding pid {pid} to the kernel's watch list (is it full?)")
        })?;
        self.watched_tgids.set(pid, true);
        if counted {
            self.adjust_load(master, 1, 0);
        }
        Ok(())
    }

    /// Adds to a master's counts. A read and a write, not the kernel's
    /// atomic add: a fork at the same instant can be lost from the count,
    /// one process off, which the signed reads on both sides tolerate.
    fn adjust_load(&mut self, master: u32, procs: i64, threads: i64) {
        let mut l = self.master_load.get(&master, 0).unwrap_or_default();
        l.procs = (l.procs as i64).saturating_add(procs).max(0) as u64;
        l.threads = (l.threads as i64).saturating_add(threads).max(0) as u64;
        let _ = self.master_load.insert(master, l, 0);
    }

    /// The master of a watched process, as the kernel has it.
    pub fn master_of(&self, pid: u32) -> Option<u32> {
        self.watched.get(&pid, 0).ok().map(|w| w.master)
    }

    /// Tells the kernel a worker's event loop's own wait: from then on its
    /// main thread's other multiplexer sleeps are recorded. Only user space
    /// writes an entry after the fork, so rewriting it loses nothing.
    pub fn set_loop(&mut self, pid: u32, wait: LoopWait) {
        let Ok(mut w) = self.watched.get(&pid, 0) else {
            return;
        };
        (w.loop_class, w.loop_arg0, w.loop_fds) = match wait {
            LoopWait::Epoll { epfd } => (class::EPOLL, epfd as u64, 0),
            LoopWait::Select { nfds, fds } => (class::SELECT, u64::from(nfds), fds),
        };
        let _ = self.watched.insert(pid, w, 0);
    }

    /// Tells the kernel that a watched process listens on `port`, so the
    /// connections it accepts are timed from their start.
    pub fn add_port(&mut self, port: u16) {
        let _ = self.ports.set(port as u32, 1, 0);
    }

    /// Records a syscall a thread was already blocked in before we attached,
    /// unless the kernel has seen the thread since (BPF_NOEXIST).
    pub fn seed_inflight(&mut self, tid: u32, tgid: u32, nr: i64, args: [u64; 3], now_ns: u64) {
        let e = Inflight {
            start_ns: now_ns,
            arg0: args[0],
            arg2: args[2],
            seq: 1,
            nr: nr as i32,
            tgid,
            active: 1,
            seeded: 1,
            ..Default::default()
        };
        if let Err(e) = self.inflight.insert(tid, e, BPF_NOEXIST) {
            // EEXIST is the kernel's newer record; E2BIG, a full map.
            if os_error(&e) == Some(libc::E2BIG) {
                self.seeds_refused += 1;
            }
        }
    }

    /// Removes the entries of threads that are gone or whose process is no
    /// longer watched (let go past its quota, or forgotten): the kernel
    /// removes an entry at its thread's exit only while the process is
    /// watched, and `INFLIGHT` evicts nothing. `entries` is a recent read of
    /// the map; `alive(tgid, tid)` says whether the thread still exists.
    /// Returns the tids removed.
    pub fn sweep_inflight(
        &mut self,
        entries: &[(u32, Inflight)],
        alive: impl Fn(u32, u32) -> bool,
    ) -> Vec<u32> {
        let mut watched = std::collections::BTreeMap::new();
        let mut removed = Vec::new();
        for (tid, e) in entries {
            let is_watched = *watched
                .entry(e.tgid)
                .or_insert_with(|| self.watched.get(&e.tgid, 0).is_ok());
            let stale = !is_watched || !alive(e.tgid, *tid);
            if stale && self.inflight.remove(tid).is_ok() {
                if e.counted != 0 {
                    self.adjust_load(e.master, 0, -1);
                }
                removed.push(*tid);
            }
        }
        removed
    }

    pub fn inflight_samples(&self) -> Vec<(u32, Inflight)> {
        read_all(&self.inflight)
    }

    pub fn stat(&self, index: u32) -> u64 {
        self.stats
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Entries in the kernel maps now: they must track live processes,
    /// threads and connections, not grow with churn.
    pub fn occupancy(&self) -> MapOccupancy {
        MapOccupancy {
            watched: count_all(&self.watched),
            inflight: count_all(&self.inflight),
            conns: count_all(&self.conns),
        }
    }

    /// The blocking-read histogram of a process, if it had any.
    pub fn read_hist(&self, tgid: u32) -> Option<ReadHist> {
        self.read_hist.get(&tgid, 0).ok()
    }

    /// Drops what the kernel kept for a process that exited. The kernel
    /// leaves its WATCHED entry to us: see `Watched`.
    pub fn forget(&mut self, tgid: u32) {
        self.watched_tgids.set(tgid, false);
        // The kernel clears `counted` at the process's exit, when it takes
        // it off the count itself.
        if let Ok(w) = self.watched.get(&tgid, 0)
            && w.counted != 0
        {
            self.adjust_load(w.master, -1, 0);
        }
        let _ = self.watched.remove(&tgid);
        let _ = self.read_hist.remove(&tgid);
        // A master's count goes with it; its children still alive are
        // counted afresh from their next fork.
        let _ = self.master_load.remove(&tgid);
    }

    /// The process charged most under each kernel loss counter.
    pub fn top_offenders(&self) -> TopOffenders {
        let mut top = TopOffenders::default();
        for (k, count) in read_all(&self.offenders) {
            let slot = match k.stat {
                stat::EVENTS_LOST => &mut top.events_lost,
                stat::WATCH_FULL => &mut top.watch_full,
                stat::INFLIGHT_FULL => &mut top.inflight_full,
                stat::CONNS_UNREADABLE => &mut top.conns_unreadable,
                stat::WATCH_QUOTA => &mut top.over_quota,
                stat::INFLIGHT_QUOTA => &mut top.threads_over_quota,
                stat::RATE_LIMITED => &mut top.events_rate_limited,
                _ => continue,
            };
            TopOffenders::keep_top(slot, Offender { pid: k.tgid, count });
        }
        top
    }

    pub fn events_lost(&self) -> u64 {
        self.stat(stat::EVENTS_LOST)
    }

    /// The kernel's loss counters (`stall_ends_unknown`, `ports_unscanned`,
    /// `stalls_held_back` and `holders_unsearched` are user space's: zero
    /// here; `over_quota` is the kernel's part).
    pub fn losses(&self) -> Losses {
        Losses {
            events_lost: self.stat(stat::EVENTS_LOST),
            watch_full: self.stat(stat::WATCH_FULL),
            conns_untracked: self.stat(stat::CONNS_UNTRACKED),
            inflight_full: self.stat(stat::INFLIGHT_FULL) + self.seeds_refused,
            conns_unreadable: self.stat(stat::CONNS_UNREADABLE),
            stall_ends_unknown: 0,
            ports_unscanned: 0,
            stalls_held_back: 0,
            holders_unsearched: 0,
            over_quota: self.stat(stat::WATCH_QUOTA),
            masters_over_quota: 0,
            threads_over_quota: self.stat(stat::INFLIGHT_QUOTA),
            events_rate_limited: self.stat(stat::RATE_LIMITED),
            top_offenders: self.top_offenders(),
            bpf_errors: self.bpf_errors().iter().sum(),
            features_missing: self.features_missing,
        }
    }

    /// Whether the kernel follows `pid` (a fork it could not add is not).
    pub fn is_watched(&self, pid: u32) -> bool {
        self.watched.get(&pid, 0).is_ok()
    }

    /// Failed runs of each program so far, indexed by `program` id (the
    /// names are `program::NAMES`).
    pub fn bpf_errors(&self) -> [u64; program::COUNT as usize] {
        let mut out = [0; program::COUNT as usize];
        for (id, n) in out.iter_mut().enumerate() {
            *n = self
                .errors
                .get(&(id as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_count_the_master_apart_and_give_a_seconds_burst() {
        let q = quotas(512, 4096, 2000);
        assert_eq!(q.procs_per_master, 511, "the master is not its own child");
        assert_eq!(q.threads_per_master, 4096);
        assert_eq!(q.event_cost_ns, 500_000);
        assert_eq!(q.event_burst_ns, 1_000_000_000);
        assert_eq!(quotas(1, 1, 1).procs_per_master, 0);
    }

    #[test]
    fn memlock_is_raised_only_on_kernels_that_charge_it() {
        assert!(!charges_memlock("6.18.0-1-amd64"));
        assert!(!charges_memlock("5.15.0-91-generic"));
        assert!(!charges_memlock("5.11.0"));
        assert!(charges_memlock("5.10.0-28-amd64"));
        assert!(charges_memlock("4.19.0"));
        assert!(charges_memlock("unknown"));
    }

    #[test]
    fn permission_errors_say_what_to_do() {
        let e = explain(
            "Operation not permitted (os error 1)",
            "loading program sched_switch",
        )
        .to_string();
        assert!(
            e.starts_with("loading program sched_switch: permission denied; run as root"),
            "{e}"
        );
        assert!(e.contains("CAP_BPF") && e.contains("CAP_PERFMON"), "{e}");
    }

    #[test]
    fn verifier_rejections_show_the_end_of_the_log() {
        let log = "the BPF_PROG_LOAD syscall failed. Verifier output:\n0: (79) r1 = *(u64 *)(r1 +0)\n1: R1 invalid mem access 'scalar'\nprocessed 2 insns";
        let e = explain(log, "loading program inet_sock_set_state").to_string();
        assert!(e.contains("verifier rejected the program"), "{e}");
        assert!(
            e.contains("it said: 1: R1 invalid mem access 'scalar'"),
            "the log's relevant line: {e}"
        );
        assert!(!e.contains('\n'), "one line, no dump: {e}");
        assert!(e.contains(&kernel_release()), "{e}");
    }

    #[test]
    fn an_old_kernel_is_told_which_helper_it_lacks() {
        let log = "Verifier output: 0: (85) call bpf_task_pt_regs#175\nunknown func bpf_task_pt_regs#175\nprocessed 9 insns";
        let e = explain(log, "loading program sched_switch").to_string();
        assert!(
            e.contains("lacks the BPF helper bpf_task_pt_regs#175")
                && e.contains("Linux 5.15 or later"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    /// Issue 23 item 3: 5.10 has no name for a newer helper; its verifier
    /// says "invalid func unknown#175", and that too is the friendly line.
    #[test]
    fn a_helper_the_kernel_has_no_name_for_is_told_as_missing() {
        let log = "the BPF_PROG_LOAD syscall failed. Verifier output: 0: (85) call unknown#175\ninvalid func unknown#175\nprocessed 9 insns";
        let e = explain(log, "loading program sched_switch").to_string();
        assert!(
            e.contains("lacks the BPF helper bpf_task_pt_regs#175")
                && e.contains("Linux 5.15 or later"),
            "{e}"
        );
        assert!(
            !e.contains('\n') && !e.contains("verifier"),
            "one line, no dump: {e}"
        );
        // Another rejection is not told as a missing helper.
        let log = "Verifier output: 1: R1 invalid mem access 'scalar'\nprocessed 2 insns";
        let e = explain(log, "loading program x").to_string();
        assert!(!e.contains("lacks the BPF helper"), "{e}");
    }

    #[test]
    fn other_errors_pass_through_with_context() {
        let e = explain(
            "No such file or directory (os error 2)",
            "attaching to tracepoint sock:x",
        )
        .to_string();
        assert_eq!(
            e,
            "attaching to tracepoint sock:x: No such file or directory (os error 2)"
        );
    }
}
