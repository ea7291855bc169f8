//! How this kernel lets the programs see the reset a late request gets (a
//! keep-alive race: the request meets a connection the worker closed).
//!
//! `tcp:tcp_send_reset` fires for every reset the host sends since Linux
//! 6.10, where it also gained a third argument (the reason). Before, it
//! fires only for a full socket: the reset of a segment that meets a
//! TIME_WAIT socket, or none, goes through `tcp_v4_send_reset` without it
//! (seen on Debian 12's 6.1). There a program on that function (and
//! `tcp_v6_send_reset`) stands in beside the tracepoint: fentry where the
//! kernel has it (bpf() alone), else a kprobe (perf_event_open). It is
//! chosen from what the kernel says, never from its version: the
//! tracepoint's arguments in BTF, whether BTF has the functions, and
//! whether the program attaches. A reset seen by both is told once (its
//! connection is forgotten at the first).
use anyhow::{Result, anyhow};
use aya::Ebpf;
use aya::programs::{FEntry, KProbe};

use super::loader::{attach_btf, explain};

/// The functions that send the reset of a received segment, IPv4 first.
pub const FUNCTIONS: [&str; 2] = ["tcp_v4_send_reset", "tcp_v6_send_reset"];

/// The BPF programs attached to them (tracer-ebpf's tcp.rs).
const KPROBE: &str = "tcp_rst_kprobe";
const FENTRIES: [&str; 2] = ["tcp_v4_rst_fentry", "tcp_v6_rst_fentry"];

/// What this kernel offers for it, as read before anything is attached.
pub struct Offer {
    /// BTF describes tcp:tcp_send_reset.
    pub tracepoint: bool,
    /// ...with the arguments of the kernels where it fires for every reset.
    pub covers_segments: bool,
    /// `--without-tracepoint tcp_send_reset`: the races are not watched at
    /// all (the stand-in goes with the tracepoint).
    pub skipped: bool,
    /// Of [`FUNCTIONS`], those the kernel's BTF has as functions.
    pub functions: Vec<&'static str>,
    /// BTF gave the sk_buff offsets the stand-in reads the headers with.
    pub skb_offsets: bool,
}

/// How the resets are watched, or why they cannot be.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Tracepoint,
    /// The tracepoint where it has one, and a program on these functions.
    WithStandIn(bool, Vec<&'static str>),
    Missing(&'static str),
}

/// The choice, from what the kernel offers.
pub fn plan(o: &Offer) -> Plan {
    if o.skipped {
        return Plan::Missing("tcp:tcp_send_reset not attached (--without-tracepoint)");
    }
    if o.covers_segments {
        return Plan::Tracepoint;
    }
    if !o.functions.contains(&FUNCTIONS[0]) {
        return Plan::Missing(
            "this kernel's tcp:tcp_send_reset does not fire for the reset of a late request, and its BTF has no tcp_v4_send_reset to attach to instead",
        );
    }
    if !o.skb_offsets {
        return Plan::Missing(
            "this kernel's tcp:tcp_send_reset does not fire for the reset of a late request, and its BTF has no sk_buff.head, network_header or transport_header",
        );
    }
    Plan::WithStandIn(o.tracepoint, o.functions.clone())
}

/// Attaches what the plan says; returns whether resets are seen. What is
/// not seen, and how they are seen where it is not the tracepoint, is said
/// once on stderr.
pub fn attach(ebpf: &mut Ebpf, btf: &aya::Btf, offer: &Offer) -> Result<bool> {
    const WITHOUT: &str = "requests lost to keep-alive races will not be seen";
    match plan(offer) {
        Plan::Tracepoint => {
            attach_btf(ebpf, btf, "tcp_send_reset")?;
            Ok(true)
        }
        Plan::Missing(why) => {
            eprintln!("tracer: note: {why}; {WITHOUT}");
            Ok(false)
        }
        Plan::WithStandIn(tracepoint, functions) => {
            let how = match attach_fentries(ebpf, btf, &functions) {
                Ok(attached) => format!("fentry programs on {}", attached.join(" and ")),
                Err(fentry) => match attach_kprobes(ebpf, &functions) {
                    Ok(attached) => format!(
                        "a kprobe on {} (no fentry: {fentry:#})",
                        attached.join(" and ")
                    ),
                    // The kernel's own answer: no kprobes (CONFIG_KPROBES
                    // off, a lockdown, perf_event_paranoid), or a function
                    // it will not probe.
                    Err(e) => {
                        eprintln!(
                            "tracer: note: this kernel's tcp:tcp_send_reset does not fire for the reset of a late request, and neither fentry ({fentry:#}) nor a kprobe ({e:#}) attaches to tcp_v4_send_reset; {WITHOUT}"
                        );
                        return Ok(false);
                    }
                },
            };
            // The tracepoint still sees the resets a close sends itself.
            if tracepoint {
                attach_btf(ebpf, btf, "tcp_send_reset")?;
            }
            eprintln!(
                "tracer: note: this kernel's tcp:tcp_send_reset does not fire for the reset of a late request; keep-alive races are seen with {how}"
            );
            Ok(true)
        }
    }
}

/// Loads and attaches an fentry program on each function; the IPv4 one
/// must attach. Returns the functions attached to.
fn attach_fentries(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    functions: &[&'static str],
) -> Result<Vec<&'static str>> {
    let mut attached = Vec::new();
    for (f, prog) in FUNCTIONS.iter().zip(FENTRIES) {
        if !functions.contains(f) {
            continue;
        }
        let mut run = || -> Result<()> {
            let p: &mut FEntry = ebpf
                .program_mut(prog)
                .ok_or_else(|| anyhow!("BPF object has no program {prog}"))?
                .try_into()?;
            p.load(f, btf)
                .map_err(|e| explain(e, &format!("loading fentry on {f}")))?;
            p.attach()
                .map_err(|e| explain(e, &format!("attaching fentry to {f}")))?;
            Ok(())
        };
        match run() {
            Ok(()) => attached.push(*f),
            Err(e) if *f == FUNCTIONS[0] => return Err(e),
            Err(e) => {
                eprintln!("tracer: note: {e:#}; keep-alive races of IPv6 clients will not be seen")
            }
        }
    }
    Ok(attached)
}

/// Loads the kprobe program and attaches it to each function; the IPv4
/// one must attach. Returns the functions it is attached to.
fn attach_kprobes(ebpf: &mut Ebpf, functions: &[&'static str]) -> Result<Vec<&'static str>> {
    let p: &mut KProbe = ebpf
        .program_mut(KPROBE)
        .ok_or_else(|| anyhow!("BPF object has no program {KPROBE}"))?
        .try_into()?;
    p.load()
        .map_err(|e| explain(e, &format!("loading program {KPROBE}")))?;
    let mut attached = Vec::new();
    for f in functions {
        match p.attach(f, 0) {
            Ok(_) => attached.push(*f),
            Err(e) if *f == FUNCTIONS[0] => {
                return Err(explain(e, &format!("attaching a kprobe to {f}")));
            }
            Err(e) => eprintln!(
                "tracer: note: a kprobe on {f} failed ({}); keep-alive races of IPv6 clients will not be seen",
                explain(e, "attaching")
            ),
        }
    }
    Ok(attached)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(covers: bool, functions: &[&'static str]) -> Offer {
        Offer {
            tracepoint: true,
            covers_segments: covers,
            skipped: false,
            functions: functions.to_vec(),
            skb_offsets: true,
        }
    }

    /// Linux 6.10 and later (6.18 here): the tracepoint alone.
    #[test]
    fn the_tracepoint_alone_where_it_fires_for_every_reset() {
        assert_eq!(plan(&offer(true, &FUNCTIONS)), Plan::Tracepoint);
        assert_eq!(plan(&offer(true, &[])), Plan::Tracepoint);
    }

    /// Linux 6.1: the tracepoint misses them, and BTF has both functions.
    #[test]
    fn a_program_on_the_function_stands_in_where_it_is_in_btf() {
        assert_eq!(
            plan(&offer(false, &FUNCTIONS)),
            Plan::WithStandIn(true, FUNCTIONS.to_vec())
        );
        // IPv6 built as a module: vmlinux's BTF has only the IPv4 one.
        assert_eq!(
            plan(&offer(false, &FUNCTIONS[..1])),
            Plan::WithStandIn(true, vec!["tcp_v4_send_reset"])
        );
        // No tracepoint at all: the stand-in alone.
        let mut o = offer(false, &FUNCTIONS);
        o.tracepoint = false;
        assert_eq!(plan(&o), Plan::WithStandIn(false, FUNCTIONS.to_vec()));
    }

    #[test]
    fn neither_is_said_missing() {
        assert!(
            matches!(plan(&offer(false, &[])), Plan::Missing(w) if w.contains("no tcp_v4_send_reset"))
        );
        assert!(matches!(
            plan(&offer(false, &FUNCTIONS[1..])),
            Plan::Missing(_)
        ));
        let mut o = offer(false, &FUNCTIONS);
        o.skb_offsets = false;
        assert!(matches!(plan(&o), Plan::Missing(w) if w.contains("sk_buff")));
        // --without-tracepoint tcp_send_reset: no stand-in either.
        for covers in [true, false] {
            let mut o = offer(covers, &FUNCTIONS);
            o.skipped = true;
            assert!(matches!(plan(&o), Plan::Missing(w) if w.contains("--without-tracepoint")));
        }
    }
}
