//! How this kernel lets the programs see the reset a late request gets (a
//! keep-alive race: the request meets a connection the worker closed).
//!
//! `tcp:tcp_send_reset` with the record of Linux 6.10 and later (addresses
//! as sockaddr_in6-sized buffers) fires for every reset the host sends. The
//! older record belongs to kernels whose tracepoint fires only for a full
//! socket: the reset of a segment that meets a TIME_WAIT socket, or none,
//! goes through `tcp_v4_send_reset` without it (seen on Debian 12's 6.1).
//! There a kprobe on that function (and `tcp_v6_send_reset`) stands in. It
//! is chosen from what the kernel says, never from its version: whether the
//! record is the new one, whether BTF has the functions, and whether the
//! kprobe attaches.
use anyhow::{Result, anyhow};
use aya::Ebpf;
use aya::programs::KProbe;

use super::loader::{attach_tracepoint, explain};

/// The functions that send the reset of a received segment, IPv4 first.
pub const FUNCTIONS: [&str; 2] = ["tcp_v4_send_reset", "tcp_v6_send_reset"];

/// The BPF program attached to them (tracer-ebpf's tcp.rs).
const KPROBE: &str = "tcp_rst_kprobe";

/// What this kernel offers for it, as read before anything is attached.
pub struct Offer {
    /// tcp:tcp_send_reset has the record that carries the addresses (and
    /// fires for every reset).
    pub tracepoint: bool,
    /// `--without-tracepoint tcp_send_reset`: the races are not watched at
    /// all (the kprobe stands in for the tracepoint, so it goes too).
    pub skipped: bool,
    /// Of [`FUNCTIONS`], those the kernel's BTF has as functions.
    pub functions: Vec<&'static str>,
    /// BTF gave the sk_buff offsets the kprobe reads the headers with.
    pub skb_offsets: bool,
}

/// How the resets are watched, or why they cannot be.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Tracepoint,
    Kprobes(Vec<&'static str>),
    Missing(&'static str),
}

/// The choice, from what the kernel offers.
pub fn plan(o: &Offer) -> Plan {
    if o.skipped {
        return Plan::Missing("tcp:tcp_send_reset not attached (--without-tracepoint)");
    }
    if o.tracepoint {
        return Plan::Tracepoint;
    }
    if !o.functions.contains(&FUNCTIONS[0]) {
        return Plan::Missing(
            "this kernel has no usable tcp:tcp_send_reset tracepoint, and its BTF has no tcp_v4_send_reset to probe instead",
        );
    }
    if !o.skb_offsets {
        return Plan::Missing(
            "this kernel has no usable tcp:tcp_send_reset tracepoint, and its BTF has no sk_buff.head, network_header or transport_header",
        );
    }
    Plan::Kprobes(o.functions.clone())
}

/// Attaches what the plan says; returns whether resets are seen. What is
/// not seen, and how they are seen where it is not the tracepoint, is said
/// once on stderr.
pub fn attach(ebpf: &mut Ebpf, offer: &Offer) -> Result<bool> {
    const WITHOUT: &str = "requests lost to keep-alive races will not be seen";
    match plan(offer) {
        Plan::Tracepoint => {
            attach_tracepoint(ebpf, "tcp_send_reset", "tcp", "tcp_send_reset")?;
            Ok(true)
        }
        Plan::Missing(why) => {
            eprintln!("tracer: note: {why}; {WITHOUT}");
            Ok(false)
        }
        Plan::Kprobes(functions) => match attach_kprobes(ebpf, &functions) {
            Ok(attached) => {
                eprintln!(
                    "tracer: note: this kernel has no usable tcp:tcp_send_reset tracepoint; keep-alive races are seen with a kprobe on {}",
                    attached.join(" and ")
                );
                Ok(true)
            }
            // The kernel's own answer: no kprobes (CONFIG_KPROBES off, a
            // lockdown), or a function it will not probe.
            Err(e) => {
                eprintln!(
                    "tracer: note: this kernel has no usable tcp:tcp_send_reset tracepoint, and a kprobe on tcp_v4_send_reset failed ({e:#}); {WITHOUT}"
                );
                Ok(false)
            }
        },
    }
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

    fn offer(tracepoint: bool, functions: &[&'static str]) -> Offer {
        Offer {
            tracepoint,
            skipped: false,
            functions: functions.to_vec(),
            skb_offsets: true,
        }
    }

    /// Linux 6.10 and later (6.18 here): the tracepoint, never the kprobe.
    #[test]
    fn the_tracepoint_wins_where_its_record_is_usable() {
        assert_eq!(plan(&offer(true, &FUNCTIONS)), Plan::Tracepoint);
        assert_eq!(plan(&offer(true, &[])), Plan::Tracepoint);
    }

    /// Linux 6.1: the older record, and BTF has both functions.
    #[test]
    fn the_kprobe_stands_in_where_the_function_is_in_btf() {
        assert_eq!(
            plan(&offer(false, &FUNCTIONS)),
            Plan::Kprobes(FUNCTIONS.to_vec())
        );
        // IPv6 built as a module: vmlinux's BTF has only the IPv4 one.
        assert_eq!(
            plan(&offer(false, &FUNCTIONS[..1])),
            Plan::Kprobes(vec!["tcp_v4_send_reset"])
        );
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
        for tracepoint in [true, false] {
            let mut o = offer(tracepoint, &FUNCTIONS);
            o.skipped = true;
            assert!(matches!(plan(&o), Plan::Missing(w) if w.contains("--without-tracepoint")));
        }
    }
}
