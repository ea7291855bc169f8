//! Loading the BPF object, patching its configuration from the running
//! kernel, and attaching the tracepoints.
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{RawTracePoint, TracePoint};

use aya::{Ebpf, EbpfLoader};
use tracer_common::{Conn, Inflight, MAX_SYSCALL_NR, ReadHist, Watched, stat};

use super::btf::Btf;
use super::tracefs::Format;
use crate::model::{Losses, MapOccupancy, Role};

/// Map update flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The loaded programs and the maps user space talks to. Dropping it
/// detaches everything: nothing is pinned, so a crash leaves nothing behind.
pub struct Probes {
    _ebpf: Ebpf,
    pub watched: HashMap<MapData, u32, Watched>,
    pub inflight: HashMap<MapData, u32, Inflight>,
    pub stats: PerCpuArray<MapData, u64>,
    pub conns: HashMap<MapData, u64, Conn>,
    pub read_hist: HashMap<MapData, u32, ReadHist>,
    pub ports: Array<MapData, u8>,
    pub events: Option<RingBuf<MapData>>,
}

/// Raw tracepoints: the hot path, every context switch (see tracer-ebpf).
const RAW_PROGRAMS: [&str; 1] = ["sched_switch"];

/// (program name, tracepoint category, tracepoint name)
const PROGRAMS: [(&str, &str, &str); 5] = [
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("signal_generate", "signal", "signal_generate"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
];

/// A raw tracepoint attached when the kernel has it (6.3 and later): the
/// last receive on a tracked connection that found nothing (EAGAIN).
const OPTIONAL_RAW_PROGRAM: &str = "sock_recv_length";

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
fn explain(e: impl std::fmt::Display + std::fmt::Debug, what: &str) -> anyhow::Error {
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
        // The tail of the verifier log names the instruction it refused.
        let tail: Vec<&str> = debug.lines().rev().take(12).collect();
        return anyhow!(
            "{what}: the kernel's verifier rejected the program; please report this with the kernel version ({}). Log tail:\n{}",
            kernel_release(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    anyhow!("{what}: {text}")
}

/// The helper a verifier log says the kernel does not know, as in
/// "unknown func bpf_task_pt_regs#175".
fn missing_helper(log: &str) -> Option<String> {
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

/// Offsets of the kernel struct fields the programs read, from the running
/// kernel's BTF. All are required: without them nothing can be told apart.
fn kernel_offsets(btf: &Btf) -> Result<Vec<(&'static str, u64)>> {
    let need = |global: &'static str, s: &str, members: &[&str]| -> Result<(&'static str, u64)> {
        members
            .iter()
            .find_map(|m| btf.member_offset(s, m))
            .map(|off| (global, off))
            .ok_or_else(|| {
                anyhow!(
                    "this kernel's BTF has no {s}.{}; please report it with the kernel version ({})",
                    members[0],
                    kernel_release()
                )
            })
    };
    let pending = need("", "task_struct", &["pending"])?.1 + need("", "sigpending", &["signal"])?.1;
    let shared =
        need("", "signal_struct", &["shared_pending"])?.1 + need("", "sigpending", &["signal"])?.1;
    Ok(vec![
        // "state" before Linux 5.14.
        need("OFF_TASK_STATE", "task_struct", &["__state", "state"])?,
        need("OFF_TASK_PID", "task_struct", &["pid"])?,
        need("OFF_TASK_FLAGS", "task_struct", &["flags"])?,
        need("OFF_TASK_EXIT_CODE", "task_struct", &["exit_code"])?,
        need("OFF_TASK_COMM", "task_struct", &["comm"])?,
        ("OFF_TASK_PENDING_SIGNAL", pending),
        need("OFF_TASK_BLOCKED", "task_struct", &["blocked"])?,
        need("OFF_TASK_SIGNAL", "task_struct", &["signal"])?,
        ("OFF_SIGNAL_SHARED_PENDING", shared),
        need("OFF_TASK_FILES", "task_struct", &["files"])?,
        need("OFF_FILES_FDT", "files_struct", &["fdt"])?,
        need("OFF_FDT_MAX_FDS", "fdtable", &["max_fds"])?,
        need("OFF_FDT_FD", "fdtable", &["fd"])?,
        need("OFF_FILE_INODE", "file", &["f_inode"])?,
        need("OFF_INODE_MODE", "inode", &["i_mode"])?,
        need("OFF_SK_SHUTDOWN", "sock", &["sk_shutdown"])?,
        need("OFF_TCP_BYTES_RECEIVED", "tcp_sock", &["bytes_received"])?,
        need("OFF_TCP_BYTES_SENT", "tcp_sock", &["bytes_sent"])?,
        need("OFF_TCP_BYTES_RETRANS", "tcp_sock", &["bytes_retrans"])?,
        need("OFF_TCP_WRITE_SEQ", "tcp_sock", &["write_seq"])?,
        need("OFF_TCP_SND_NXT", "tcp_sock", &["snd_nxt"])?,
    ])
}

/// The syscall numbers the kernel side needs, from user space's table
/// (`analysis::syscalls`), so that the kernel crate carries no table.
pub struct SyscallTable {
    /// (number, class bits) of every syscall that may block.
    pub classes: Vec<(i64, u32)>,
    pub close: i64,
    pub shutdown: i64,
}

pub fn load(tracefs: &Path, threshold_ns: u64, sys: &SyscallTable) -> Result<Probes> {
    raise_memlock();
    // The raw tracepoint takes (preempt, prev, next): no record layout.
    // Its tracefs entry must still exist for the kernel to have it.
    Format::read(tracefs, "sched", "sched_switch")?;
    let newtask = Format::read(tracefs, "task", "task_newtask")?;
    let pexit = Format::read(tracefs, "sched", "sched_process_exit")?;
    let sig = Format::read(tracefs, "signal", "signal_generate")?;
    let st = Format::read(tracefs, "sock", "inet_sock_set_state")?;
    let recv = Format::read(tracefs, "sock", OPTIONAL_RAW_PROGRAM).ok();

    let mut globals: Vec<(&str, u64)> = vec![
        ("THRESHOLD_NS", threshold_ns),
        ("OFF_NEWTASK_PID", newtask.offset("pid", 4)?),
        ("OFF_NEWTASK_FLAGS", newtask.offset("clone_flags", 8)?),
        (
            "OFF_EXIT_GROUP_DEAD",
            pexit.optional_offset("group_dead").unwrap_or(u64::MAX),
        ),
        ("OFF_SIG_SIG", sig.offset("sig", 4)?),
        ("OFF_SIG_PID", sig.offset("pid", 4)?),
        ("OFF_SETSTATE_SKADDR", st.offset("skaddr", 8)?),
        ("OFF_SETSTATE_OLDSTATE", st.offset("oldstate", 4)?),
        ("OFF_SETSTATE_NEWSTATE", st.offset("newstate", 4)?),
        ("OFF_SETSTATE_SPORT", st.offset("sport", 2)?),
        ("OFF_SETSTATE_DPORT", st.offset("dport", 2)?),
        ("OFF_SETSTATE_FAMILY", st.offset("family", 2)?),
        ("OFF_SETSTATE_PROTOCOL", st.offset("protocol", 2)?),
        ("OFF_SETSTATE_DADDR", st.offset("daddr", 4)?),
        ("OFF_SETSTATE_DADDR_V6", st.offset("daddr_v6", 16)?),
    ];
    globals.push(("NR_CLOSE", sys.close as u64));
    globals.push(("NR_SHUTDOWN", sys.shutdown as u64));
    let btf = Btf::from_sys_fs().ok_or_else(|| {
        anyhow!(
            "this kernel has no BTF at /sys/kernel/btf/vmlinux: the tracer needs it (CONFIG_DEBUG_INFO_BTF=y, the default on Debian, Ubuntu, RHEL and their kin) to read task and socket fields"
        )
    })?;
    globals.extend(kernel_offsets(&btf)?);
    drop(btf);

    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));
    if bytes.is_empty() {
        bail!(
            "this tracer binary was built with AYA_BUILD_SKIP and holds no BPF programs; rebuild it with `cargo xtask build`"
        );
    }
    let mut loader = EbpfLoader::new();
    for (name, value) in &globals {
        loader.override_global(name, value, true);
    }
    let mut ebpf = loader
        .load(bytes)
        .map_err(|e| explain(e, "loading the BPF object"))?;

    // The class table must be filled before sched_switch can run.
    {
        let mut classes: Array<_, u32> = Array::try_from(
            ebpf.map_mut("SYSCALL_CLASS")
                .ok_or_else(|| anyhow!("BPF object has no SYSCALL_CLASS map"))?,
        )?;
        for &(nr, bits) in &sys.classes {
            if (nr as u32) < MAX_SYSCALL_NR {
                classes
                    .set(nr as u32, bits, 0)
                    .context("filling the syscall class table")?;
            }
        }
    }

    let optional = recv.is_some().then_some(OPTIONAL_RAW_PROGRAM);
    for name in RAW_PROGRAMS.into_iter().chain(optional) {
        let p: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("BPF object has no program {name}"))?
            .try_into()?;
        p.load()
            .map_err(|e| explain(e, &format!("loading program {name}")))?;
        p.attach(name)
            .map_err(|e| explain(e, &format!("attaching to raw tracepoint {name}")))?;
    }
    for (prog, category, name) in PROGRAMS {
        let p: &mut TracePoint = ebpf
            .program_mut(prog)
            .ok_or_else(|| anyhow!("BPF object has no program {prog}"))?
            .try_into()?;
        p.load()
            .map_err(|e| explain(e, &format!("loading program {prog}")))?;
        p.attach(category, name)
            .map_err(|e| explain(e, &format!("attaching to tracepoint {category}:{name}")))?;
    }

    let take = |ebpf: &mut Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("BPF object has no map {name}"))
    };
    let watched = HashMap::try_from(take(&mut ebpf, "WATCHED")?)?;
    let inflight = HashMap::try_from(take(&mut ebpf, "INFLIGHT")?)?;
    let stats = PerCpuArray::try_from(take(&mut ebpf, "STATS")?)?;
    let conns = HashMap::try_from(take(&mut ebpf, "CONNS")?)?;
    let read_hist = HashMap::try_from(take(&mut ebpf, "READ_HIST")?)?;
    let ports = Array::try_from(take(&mut ebpf, "PORTS")?)?;
    let events = Some(RingBuf::try_from(take(&mut ebpf, "EVENTS")?)?);
    Ok(Probes {
        _ebpf: ebpf,
        watched,
        inflight,
        stats,
        conns,
        read_hist,
        ports,
        events,
    })
}

impl Probes {
    pub fn watch(&mut self, pid: u32, master: u32, role: Role) -> Result<()> {
        let w = Watched {
            master,
            role: role.to_kernel(),
        };
        self.watched
            .insert(pid, w, 0)
            .with_context(|| format!("adding pid {pid} to the kernel's watch list (is it full?)"))
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
        let _ = self.inflight.insert(tid, e, BPF_NOEXIST);
    }

    pub fn inflight_samples(&self) -> Vec<(u32, Inflight)> {
        self.inflight.iter().filter_map(|r| r.ok()).collect()
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
            watched: self.watched.keys().filter(|k| k.is_ok()).count(),
            inflight: self.inflight.keys().filter(|k| k.is_ok()).count(),
            conns: self.conns.keys().filter(|k| k.is_ok()).count(),
        }
    }

    /// The blocking-read histogram of a process, if it had any.
    pub fn read_hist(&self, tgid: u32) -> Option<ReadHist> {
        self.read_hist.get(&tgid, 0).ok()
    }

    /// Drops what the kernel kept for a process that exited. The kernel
    /// leaves its WATCHED entry to us: see `Watched`.
    pub fn forget(&mut self, tgid: u32) {
        let _ = self.watched.remove(&tgid);
        let _ = self.read_hist.remove(&tgid);
    }

    pub fn events_lost(&self) -> u64 {
        self.stat(stat::EVENTS_LOST)
    }

    /// The kernel's loss counters (`over_quota` is user space's: zero here).
    pub fn losses(&self) -> Losses {
        Losses {
            events_lost: self.stat(stat::EVENTS_LOST),
            watch_full: self.stat(stat::WATCH_FULL),
            conns_untracked: self.stat(stat::CONNS_UNTRACKED),
            over_quota: 0,
        }
    }

    /// Whether the kernel follows `pid` (a fork it could not add is not).
    pub fn is_watched(&self, pid: u32) -> bool {
        self.watched.get(&pid, 0).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "loading program sys_enter",
        )
        .to_string();
        assert!(
            e.starts_with("loading program sys_enter: permission denied; run as root"),
            "{e}"
        );
        assert!(e.contains("CAP_BPF") && e.contains("CAP_PERFMON"), "{e}");
    }

    #[test]
    fn verifier_rejections_show_the_end_of_the_log() {
        let log = "the BPF_PROG_LOAD syscall failed. Verifier output:\n0: (79) r1 = *(u64 *)(r1 +0)\n1: R1 invalid mem access 'scalar'\nprocessed 2 insns";
        let e = explain(log, "loading program sys_exit").to_string();
        assert!(e.contains("verifier rejected the program"), "{e}");
        assert!(
            e.contains("invalid mem access"),
            "the log's relevant part: {e}"
        );
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
