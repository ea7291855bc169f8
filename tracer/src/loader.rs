//! Loading the BPF object, patching its configuration from the running
//! kernel, and attaching the tracepoints.
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use tracer_common::{Conn, ConnKey, Inflight, MAX_SYSCALL_NR, ReadHist, Watched, stat};

use crate::model::Role;
use crate::syscalls;
use crate::tracefs::Format;

/// Map update flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The loaded programs and the maps user space talks to. Dropping it
/// detaches everything: nothing is pinned, so a crash leaves nothing behind.
pub struct Probes {
    _ebpf: Ebpf,
    pub watched: HashMap<MapData, u32, Watched>,
    pub inflight: HashMap<MapData, u32, Inflight>,
    pub stats: PerCpuArray<MapData, u64>,
    pub conns: HashMap<MapData, ConnKey, Conn>,
    pub read_hist: HashMap<MapData, u32, ReadHist>,
    pub events: Option<RingBuf<MapData>>,
}

/// Raw tracepoints: the per-syscall hot path (see tracer-ebpf).
const RAW_PROGRAMS: [&str; 2] = ["sys_enter", "sys_exit"];

/// (program name, tracepoint category, tracepoint name)
const PROGRAMS: [(&str, &str, &str); 6] = [
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("signal_generate", "signal", "signal_generate"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    // In-syscall context for connections: local port, RST on close.
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("tcp_send_reset", "tcp", "tcp_send_reset"),
];

fn raise_memlock() {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones
    // ignore it. Best effort: a failure shows up later as a map error.
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: lim is a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
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

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn load(tracefs: &Path, threshold_ns: u64) -> Result<Probes> {
    raise_memlock();
    // The raw tracepoints take (regs, id) and (regs, ret): no record layout.
    // Their tracefs entries must still exist for the kernel to have them.
    Format::read(tracefs, "raw_syscalls", "sys_enter")?;
    let newtask = Format::read(tracefs, "task", "task_newtask")?;
    let pexit = Format::read(tracefs, "sched", "sched_process_exit")?;
    let sig = Format::read(tracefs, "signal", "signal_generate")?;
    let setstate = Format::read(tracefs, "sock", "inet_sock_set_state")?;

    let off_newtask_pid = newtask.offset("pid", 4)?;
    let off_newtask_flags = newtask.offset("clone_flags", 8)?;
    let off_group_dead = pexit.optional_offset("group_dead").unwrap_or(u64::MAX);
    let off_sig_sig = sig.offset("sig", 4)?;
    let off_sig_pid = sig.offset("pid", 4)?;
    let off_setstate_sport = setstate.offset("sport", 2)?;
    let off_setstate_newstate = setstate.offset("newstate", 4)?;
    let nr_exit_group = syscalls::number("exit_group")
        .ok_or_else(|| anyhow!("no exit_group syscall on this architecture"))?;

    // Struct offsets for telling fd kinds apart in the kernel (read
    // histograms). Without BTF the histograms still count, as "unknown".
    let btf = crate::btf::Btf::from_sys_fs();
    if btf.is_none() {
        eprintln!(
            "tracer: warning: no BTF at /sys/kernel/btf/vmlinux: blocking-read histograms will not tell pipes from sockets"
        );
    }
    let off = |s: &str, m: &str| -> u64 {
        btf.as_ref()
            .and_then(|b| b.member_offset(s, m))
            .unwrap_or(u64::MAX)
    };
    let kernel_offsets = [
        ("OFF_TASK_FILES", off("task_struct", "files")),
        ("OFF_FILES_FDT", off("files_struct", "fdt")),
        ("OFF_FDT_MAX_FDS", off("fdtable", "max_fds")),
        ("OFF_FDT_FD", off("fdtable", "fd")),
        ("OFF_FILE_INODE", off("file", "f_inode")),
        ("OFF_INODE_MODE", off("inode", "i_mode")),
    ];

    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));
    if bytes.is_empty() {
        bail!(
            "this tracer binary was built with AYA_BUILD_SKIP and holds no BPF programs; rebuild it with `cargo xtask build`"
        );
    }
    let mut loader = EbpfLoader::new();
    for (name, value) in &kernel_offsets {
        loader.override_global(name, value, true);
    }
    let mut ebpf = loader
        .override_global("THRESHOLD_NS", &threshold_ns, true)
        .override_global("NR_EXIT_GROUP", &nr_exit_group, true)
        .override_global("OFF_NEWTASK_PID", &off_newtask_pid, true)
        .override_global("OFF_NEWTASK_FLAGS", &off_newtask_flags, true)
        .override_global("OFF_EXIT_GROUP_DEAD", &off_group_dead, true)
        .override_global("OFF_SIG_SIG", &off_sig_sig, true)
        .override_global("OFF_SIG_PID", &off_sig_pid, true)
        .override_global("OFF_SETSTATE_SPORT", &off_setstate_sport, true)
        .override_global("OFF_SETSTATE_NEWSTATE", &off_setstate_newstate, true)
        .load(bytes)
        .map_err(|e| explain(e, "loading the BPF object"))?;

    // The class table must be filled before sys_exit can run.
    {
        let mut classes: Array<_, u32> = Array::try_from(
            ebpf.map_mut("SYSCALL_CLASS")
                .ok_or_else(|| anyhow!("BPF object has no SYSCALL_CLASS map"))?,
        )?;
        for (nr, bits) in syscalls::class_table() {
            if (nr as u32) < MAX_SYSCALL_NR {
                classes
                    .set(nr as u32, bits, 0)
                    .context("filling the syscall class table")?;
            }
        }
    }

    for name in RAW_PROGRAMS {
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
    let events = Some(RingBuf::try_from(take(&mut ebpf, "EVENTS")?)?);
    Ok(Probes {
        _ebpf: ebpf,
        watched,
        inflight,
        stats,
        conns,
        read_hist,
        events,
    })
}

impl Probes {
    pub fn watch(&mut self, pid: u32, master: u32, role: Role) -> Result<()> {
        let w = Watched {
            master,
            role: role.to_kernel(),
            ..Default::default()
        };
        self.watched
            .insert(pid, w, 0)
            .with_context(|| format!("adding pid {pid} to the kernel's watch list (is it full?)"))
    }

    /// Records a syscall a thread was already blocked in before we attached,
    /// unless the kernel has seen the thread since (BPF_NOEXIST).
    pub fn seed_inflight(&mut self, tid: u32, tgid: u32, nr: i64, args: [u64; 3], now_ns: u64) {
        let e = Inflight {
            start_ns: now_ns,
            arg0: args[0],
            arg1: args[1],
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

    /// Removes and returns the connections a process still had open: it
    /// exited, so the kernel closed them without a close syscall.
    pub fn take_conns_of(&mut self, tgid: u32) -> Vec<(ConnKey, Conn)> {
        let found: Vec<(ConnKey, Conn)> = self
            .conns
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.tgid == tgid)
            .collect();
        for (k, _) in &found {
            let _ = self.conns.remove(k);
        }
        found
    }

    /// Entries in the kernel maps now: they must track live processes,
    /// threads and connections, not grow with churn.
    pub fn occupancy(&self) -> crate::output::MapOccupancy {
        crate::output::MapOccupancy {
            watched: self.watched.keys().filter(|k| k.is_ok()).count(),
            inflight: self.inflight.keys().filter(|k| k.is_ok()).count(),
            conns: self.conns.keys().filter(|k| k.is_ok()).count(),
        }
    }

    /// The blocking-read histogram of a process, if it had any.
    pub fn read_hist(&self, tgid: u32) -> Option<ReadHist> {
        self.read_hist.get(&tgid, 0).ok()
    }

    /// Drops what the kernel kept for a process that exited.
    pub fn forget(&mut self, tgid: u32) {
        let _ = self.read_hist.remove(&tgid);
    }

    pub fn events_lost(&self) -> u64 {
        self.stat(stat::EVENTS_LOST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
