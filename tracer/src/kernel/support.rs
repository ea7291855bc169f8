//! Whether the running kernel can run the tracer at all, asked before
//! anything is loaded: its BTF, and in it the kernel's own lists of the
//! BPF helpers, program types and map types it offers. A kernel that lacks
//! one is refused in one line that names it and what it lacks, instead of
//! a verifier dump. Decided from what the kernel says it has, never from
//! its version alone (distributions backport); the version only chooses
//! the words ("too old" is said only of a release before 5.15).
use super::btf::Btf;

/// Where the kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// One thing the programs use, as the kernel's BTF names it.
struct Need {
    /// As the refusal says it.
    what: &'static str,
    /// The kernel enum that lists it, and its member.
    enum_name: &'static str,
    member: &'static str,
}

const fn need(what: &'static str, enum_name: &'static str, member: &'static str) -> Need {
    Need {
        what,
        enum_name,
        member,
    }
}

/// Everything tracer-ebpf calls or is, with the release that added it.
const NEEDS: [Need; 11] = [
    need(
        "tracepoint programs",
        "bpf_prog_type",
        "BPF_PROG_TYPE_TRACEPOINT",
    ),
    need(
        "raw tracepoint programs",
        "bpf_prog_type",
        "BPF_PROG_TYPE_RAW_TRACEPOINT",
    ),
    // tp_btf (5.5)
    need(
        "BTF tracepoint programs",
        "bpf_prog_type",
        "BPF_PROG_TYPE_TRACING",
    ),
    // 5.8
    need("BPF ring buffers", "bpf_map_type", "BPF_MAP_TYPE_RINGBUF"),
    need(
        "bpf_ringbuf_output",
        "bpf_func_id",
        "BPF_FUNC_ringbuf_output",
    ),
    need(
        "bpf_ringbuf_reserve",
        "bpf_func_id",
        "BPF_FUNC_ringbuf_reserve",
    ),
    need(
        "bpf_ringbuf_submit",
        "bpf_func_id",
        "BPF_FUNC_ringbuf_submit",
    ),
    need(
        "bpf_probe_read_kernel",
        "bpf_func_id",
        "BPF_FUNC_probe_read_kernel",
    ),
    need(
        "bpf_probe_read_user",
        "bpf_func_id",
        "BPF_FUNC_probe_read_user",
    ),
    // 5.11
    need(
        "bpf_get_current_task_btf",
        "bpf_func_id",
        "BPF_FUNC_get_current_task_btf",
    ),
    // 5.15
    need("bpf_task_pt_regs", "bpf_func_id", "BPF_FUNC_task_pt_regs"),
];

/// What the kernel offers, as far as the check needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// `uname -r`.
    pub release: String,
    /// Its BTF was found and parsed.
    pub btf: bool,
    /// What it lacks, of `NEEDS`: named in its BTF's enum, which lists no
    /// such member. An enum the BTF does not have at all proves nothing
    /// and is not counted (the load then decides).
    pub missing: Vec<&'static str>,
}

/// What of `NEEDS` a kernel lacks, given its BTF's answer to "does enum E
/// have member M" (None: no enum E).
pub fn missing(enum_has: impl Fn(&str, &str) -> Option<bool>) -> Vec<&'static str> {
    NEEDS
        .iter()
        .filter(|n| enum_has(n.enum_name, n.member) == Some(false))
        .map(|n| n.what)
        .collect()
}

/// (major, minor) of a release such as `5.10.0-46-amd64`.
fn version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The verdict: Ok, or the one line that refuses the kernel.
pub fn verdict(f: &Facts) -> Result<(), String> {
    let lacks = if !f.btf {
        vec![format!("no BTF at {VMLINUX_BTF}")]
    } else {
        f.missing.iter().map(|m| format!("no {m}")).collect()
    };
    if lacks.is_empty() {
        return Ok(());
    }
    let lacks = lacks.join(", ");
    let release = &f.release;
    Err(match version(release) {
        Some(v) if v < (5, 15) => {
            format!("Linux {release} is too old: the tracer needs 5.15 or later ({lacks})")
        }
        _ => format!(
            "Linux {release} lacks what the tracer needs ({lacks}); it needs 5.15 or later with BTF (CONFIG_DEBUG_INFO_BTF)"
        ),
    })
}

/// Reads the running kernel's facts.
pub fn facts() -> Facts {
    let release = super::loader::kernel_release();
    match Btf::from_sys_fs() {
        Some(btf) => Facts {
            release,
            btf: true,
            missing: missing(|e, m| btf.enum_has(e, m)),
        },
        None => Facts {
            release,
            btf: false,
            missing: Vec::new(),
        },
    }
}

/// Refuses, in one line, a kernel the tracer cannot run on.
pub fn check() -> anyhow::Result<()> {
    verdict(&facts()).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 11's 5.10: BTF, ring buffers, but no helper newer than 5.10.
    fn linux_5_10(e: &str, m: &str) -> Option<bool> {
        match e {
            "bpf_func_id" => {
                Some(!["BPF_FUNC_task_pt_regs", "BPF_FUNC_get_current_task_btf"].contains(&m))
            }
            "bpf_prog_type" | "bpf_map_type" => Some(true),
            _ => None,
        }
    }

    #[test]
    fn a_kernel_without_bpf_task_pt_regs_is_refused_in_one_line() {
        let f = Facts {
            release: "5.10.0-46-amd64".into(),
            btf: true,
            missing: missing(linux_5_10),
        };
        let e = verdict(&f).unwrap_err();
        assert_eq!(
            e,
            "Linux 5.10.0-46-amd64 is too old: the tracer needs 5.15 or later (no bpf_get_current_task_btf, no bpf_task_pt_regs)"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn a_kernel_that_has_everything_passes_whatever_its_version() {
        let all = |_: &str, _: &str| Some(true);
        for release in ["6.1.0-57-amd64", "5.15.0-91-generic", "4.18.0-553.el8"] {
            let f = Facts {
                release: release.into(),
                btf: true,
                missing: missing(all),
            };
            assert_eq!(verdict(&f), Ok(()), "{release}: backports count");
        }
        // An enum the BTF does not have proves nothing missing.
        assert!(missing(|_, _| None).is_empty());
    }

    #[test]
    fn no_btf_is_refused_and_too_old_is_said_only_of_old_releases() {
        let f = Facts {
            release: "5.4.0-1-amd64".into(),
            btf: false,
            missing: Vec::new(),
        };
        assert_eq!(
            verdict(&f).unwrap_err(),
            "Linux 5.4.0-1-amd64 is too old: the tracer needs 5.15 or later (no BTF at /sys/kernel/btf/vmlinux)"
        );
        let f = Facts {
            release: "6.6.0-custom".into(),
            btf: false,
            missing: Vec::new(),
        };
        let e = verdict(&f).unwrap_err();
        assert!(!e.contains("too old"), "{e}");
        assert!(
            e.starts_with(
                "Linux 6.6.0-custom lacks what the tracer needs (no BTF at /sys/kernel/btf/vmlinux)"
            ),
            "{e}"
        );
    }

    /// This machine's kernel has what the tracer needs: its own BTF says so.
    #[test]
    fn this_kernel_passes() {
        let f = facts();
        assert!(f.btf, "{f:?}");
        assert_eq!(verdict(&f), Ok(()), "{f:?}");
    }
}
