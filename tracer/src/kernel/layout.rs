//! What this kernel looks like to the programs, read from its BTF: the
//! offsets of the struct fields they read, and what each tracepoint passes
//! (prototypes changed across versions). Rust eBPF emits no CO-RE
//! relocations, so user space looks them up and hands them over in
//! `CONFIG`.
use anyhow::{Result, anyhow, bail};
use tracer_common::{KernelOffsets, TracepointArgs, UNSET};

use super::btf::Btf;
use super::loader::kernel_release;

/// Where a task inside a syscall keeps its syscall number, first three
/// arguments and return value in its saved `struct pt_regs`: members named
/// by each architecture's ABI, plus a byte offset into an array member.
#[cfg(target_arch = "x86_64")]
const PT_REGS: [(&[&str], u64); 5] = [
    (&["orig_ax"], 0),
    (&["di"], 0),
    (&["si"], 0),
    (&["dx"], 0),
    (&["ax"], 0),
];
#[cfg(target_arch = "aarch64")]
const PT_REGS: [(&[&str], u64); 5] = [
    (&["syscallno"], 0),
    (&["orig_x0"], 0),
    (&["regs"], 8),
    (&["regs"], 2 * 8),
    (&["regs"], 0),
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!(
    "the tracer reads syscall registers from struct pt_regs and knows their names on x86_64 and aarch64 only; add this architecture's to PT_REGS in layout.rs"
);

/// Offsets of the kernel struct fields the programs read, from the running
/// kernel's BTF. All are required: without them nothing can be told apart.
pub(super) fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets> {
    let need = |s: &str, members: &[&str]| -> Result<u64> {
        members
            .iter()
            .find_map(|m| btf.member_offset(s, m))
            .ok_or_else(|| {
                anyhow!(
                    "this kernel's BTF has no {s}.{}; please report it with the kernel version ({})",
                    members[0],
                    kernel_release()
                )
            })
    };
    let regs = |i: usize| -> Result<u64> {
        let (members, extra) = PT_REGS[i];
        Ok(need("pt_regs", members)? + extra)
    };
    // A sock_common member, from the start of the struct sock it heads.
    let common = |m: &str| -> Result<u64> {
        Ok(need("sock", &["__sk_common"])? + need("sock_common", &[m])?)
    };
    Ok(KernelOffsets {
        // "state" before Linux 5.14.
        task_state: need("task_struct", &["__state", "state"])?,
        task_pid: need("task_struct", &["pid"])?,
        task_tgid: need("task_struct", &["tgid"])?,
        task_flags: need("task_struct", &["flags"])?,
        task_exit_code: need("task_struct", &["exit_code"])?,
        task_comm: need("task_struct", &["comm"])?,
        task_pending_signal: need("task_struct", &["pending"])? + need("sigpending", &["signal"])?,
        task_blocked: need("task_struct", &["blocked"])?,
        task_signal: need("task_struct", &["signal"])?,
        signal_shared_pending: need("signal_struct", &["shared_pending"])?
            + need("sigpending", &["signal"])?,
        task_files: need("task_struct", &["files"])?,
        files_fdt: need("files_struct", &["fdt"])?,
        fdt_max_fds: need("fdtable", &["max_fds"])?,
        fdt_fd: need("fdtable", &["fd"])?,
        file_inode: need("file", &["f_inode"])?,
        inode_mode: need("inode", &["i_mode"])?,
        sk_shutdown: need("sock", &["sk_shutdown"])?,
        tcp_bytes_received: need("tcp_sock", &["bytes_received"])?,
        tcp_bytes_sent: need("tcp_sock", &["bytes_sent"])?,
        tcp_bytes_retrans: need("tcp_sock", &["bytes_retrans"])?,
        tcp_write_seq: need("tcp_sock", &["write_seq"])?,
        tcp_snd_nxt: need("tcp_sock", &["snd_nxt"])?,
        tcp_mstamp: btf.member_offset("tcp_sock", "tcp_mstamp").unwrap_or(UNSET),
        pt_regs_nr: regs(0)?,
        pt_regs_arg0: regs(1)?,
        pt_regs_arg1: regs(2)?,
        pt_regs_arg2: regs(3)?,
        pt_regs_ret: regs(4)?,
        // Only the reset kprobe reads them, and it is optional.
        skb_head: btf.member_offset("sk_buff", "head").unwrap_or(UNSET),
        skb_network_header: btf
            .member_offset("sk_buff", "network_header")
            .unwrap_or(UNSET),
        skb_transport_header: btf
            .member_offset("sk_buff", "transport_header")
            .unwrap_or(UNSET),
        sk_protocol: need("sock", &["sk_protocol"])?,
        skc_family: common("skc_family")?,
        skc_num: common("skc_num")?,
        skc_dport: common("skc_dport")?,
        skc_daddr: common("skc_daddr")?,
        skc_rcv_saddr: common("skc_rcv_saddr")?,
        skc_v6_daddr: common("skc_v6_daddr")?,
        skc_v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        // Only mark_victim reads them, and only where it passes the task.
        signal_oom_score_adj: btf
            .member_offset("signal_struct", "oom_score_adj")
            .unwrap_or(UNSET),
        task_mm: btf.member_offset("task_struct", "mm").unwrap_or(UNSET),
        mm_rss_stat: btf.member_offset("mm_struct", "rss_stat").unwrap_or(UNSET),
        // rss_stat is an array of percpu_counter since Linux 6.2 (the
        // layout mark_victim's task argument comes with); else UNSET.
        rss_counter_size: btf.struct_size("percpu_counter").unwrap_or(UNSET),
        rss_counter_count: btf
            .member_offset("percpu_counter", "count")
            .unwrap_or(UNSET),
        page_kb_shift: page_kb_shift(),
    })
}

/// log2 of the page size in KiB (mark_victim's record gave KiB).
fn page_kb_shift() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page < 1024 {
        return UNSET;
    }
    u64::from((page as u64 / 1024).trailing_zeros())
}

/// What the tracepoints pass on this kernel, from BTF. BTF must describe
/// every `required` one (the kernel then has it).
pub(super) fn tracepoint_args(btf: &Btf, required: &[&str]) -> Result<TracepointArgs> {
    for name in required {
        if btf.tracepoint_args(name).is_none() {
            bail!(
                "this kernel's BTF describes no {name} tracepoint; please report it with the kernel version ({})",
                kernel_release()
            );
        }
    }
    let exit = btf
        .tracepoint_args("sched_process_exit")
        .unwrap_or_default();
    let victim = btf.tracepoint_args("mark_victim").unwrap_or_default();
    let flag = |on: bool| if on { 1 } else { UNSET };
    Ok(TracepointArgs {
        exit_group_dead: flag(exit.len() >= 2),
        victim_task: flag(victim.first() == Some(&true)),
    })
}

/// What this kernel offers the optional programs, read from BTF while it
/// is parsed for the offsets (see `reset`).
pub(super) struct Facts {
    /// Of `reset::FUNCTIONS`, those BTF has as functions.
    pub reset_functions: Vec<&'static str>,
    /// tcp:tcp_send_reset's arguments: None without the tracepoint.
    pub reset_args: Option<usize>,
    /// oom:mark_victim exists.
    pub victim: bool,
    /// sock:sock_recv_length exists (Linux 6.3 and later).
    pub recv: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets that were hard-coded from the x86_64 ABI before they
    /// came from BTF: BTF must give the same ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn syscall_registers_come_from_btf() {
        let btf = Btf::from_sys_fs().expect("the tracer requires BTF");
        let k = kernel_offsets(&btf).unwrap();
        assert_eq!(
            (
                k.pt_regs_nr,
                k.pt_regs_arg0,
                k.pt_regs_arg1,
                k.pt_regs_arg2,
                k.pt_regs_ret
            ),
            (120, 112, 104, 96, 80),
            "orig_ax, di, si, dx, ax"
        );
    }
}
