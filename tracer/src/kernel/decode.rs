//! From the kernel's `#[repr(C)]` records (tracer-common) to model types,
//! and the few model values the kernel is given back in its encoding.
//! Every sentinel (0 for "not seen", `UNSET`), flag word and raw socket
//! address is read here, once, so nothing past `kernel` depends on the
//! layout the BPF programs share with user space.
use tracer_common as tc;

use crate::model::{
    AnsweredClose, ClosedConn, Direction, EndedBy, Role, Sample, SyscallClass, WokeBy,
};

/// A process's role as the kernel's `Watched` entry encodes it.
pub fn role(v: u32) -> Role {
    match v {
        tc::role::MASTER => Role::Master,
        tc::role::WORKER => Role::Worker,
        tc::role::CHILD => Role::Child,
        _ => Role::Plain,
    }
}

/// The kernel's encoding of `role`, for its `Watched` entry.
pub fn role_to_kernel(role: Role) -> u32 {
    match role {
        Role::Master => tc::role::MASTER,
        Role::Worker => tc::role::WORKER,
        Role::Child => tc::role::CHILD,
        Role::Plain => tc::role::PLAIN,
    }
}

/// A syscall's class bits for the kernel's `SYSCALL_CLASS` table.
pub fn class_bits(c: SyscallClass) -> u32 {
    let mut bits = tc::class::MAYBE;
    for (set, bit) in [
        (c.wait, tc::class::WAIT),
        (c.read, tc::class::READ),
        (c.epoll, tc::class::EPOLL),
        (c.select, tc::class::SELECT),
        (c.poll, tc::class::POLL),
    ] {
        if set {
            bits |= bit;
        }
    }
    bits
}

/// How a thread last woke in a call (an `Inflight::woke_by` value).
pub fn woke_by(v: u32) -> WokeBy {
    match v {
        tc::woke_by::PLAIN => WokeBy::Plain,
        tc::woke_by::SIGNAL => WokeBy::Signal,
        tc::woke_by::STOP => WokeBy::Stop,
        tc::woke_by::RESUMED => WokeBy::Resumed,
        _ => WokeBy::None,
    }
}

/// One entry of the kernel's in-flight map, thread `tid`'s.
pub fn sample(tid: u32, e: &tc::Inflight) -> Sample {
    Sample {
        tid,
        tgid: e.tgid,
        nr: i64::from(e.nr),
        start_ns: e.start_ns,
        arg0: e.arg0,
        arg2: e.arg2,
        seq: e.seq,
        active: e.active != 0,
        seeded: e.seeded != 0,
        woke_ns: e.woke_ns,
        woke_by: woke_by(e.woke_by),
    }
}

/// What ended a connection (a `ConnEnd::ended_by` value). An unknown value
/// reads as a close, as it always has.
pub fn ended_by(v: u32) -> EndedBy {
    match v {
        tc::ended::SHUTDOWN => EndedBy::Shutdown,
        tc::ended::EXIT => EndedBy::Exit,
        _ => EndedBy::Close,
    }
}

/// A `Conn::direction` value; None for a value the kernel never sends.
pub fn direction(v: u32) -> Option<Direction> {
    match v {
        tc::direction::INBOUND => Some(Direction::Inbound),
        tc::direction::OUTBOUND => Some(Direction::Outbound),
        _ => None,
    }
}

/// A kernel timestamp whose 0 means "not seen".
fn seen_at(ns: u64) -> Option<u64> {
    (ns != 0).then_some(ns)
}

/// A local port as the kernel stores it (u32, 0 when not known).
fn local_port(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// A connection that ended badly, as the kernel counted it; None when its
/// direction is none the kernel sends (a newer BPF object, say) rather
/// than a guess.
pub fn closed_conn(c: &tc::Conn) -> Option<ClosedConn> {
    Some(ClosedConn {
        start_ns: seen_at(c.start_ns),
        bytes_in: c.bytes_in,
        bytes_out: c.bytes_out,
        eagain_ns: seen_at(c.eagain_ns),
        direction: direction(c.direction)?,
        local_port: local_port(c.local_port),
        aborted: c.aborted != 0,
        unreadable: c.unreadable != 0,
        peer: format_sockaddr(&c.addr),
    })
}

/// An answered connection's close, as the kernel remembered it until the
/// client's next request was reset.
pub fn answered_close(c: &tc::AnsweredClose) -> AnsweredClose {
    AnsweredClose {
        closed_ns: c.closed_ns,
        idle_ns: (c.idle_ns != tc::UNSET).then_some(c.idle_ns),
        start_ns: seen_at(c.start_ns),
        bytes_in: c.bytes_in,
        bytes_out: c.bytes_out,
        tgid: c.tgid,
        tid: c.tid,
        master: c.master,
        fd: c.fd,
        ended_by: ended_by(c.ended_by),
        aborted: c.aborted != 0,
        local_port: local_port(c.local_port),
        peer: format_sockaddr(&c.addr),
    }
}

/// Formats the head of a sockaddr as the process saw it: `127.0.0.1:5000`,
/// `[::1]:5000`, `unix`, or None when it is unknown (zeros).
pub fn format_sockaddr(a: &[u8; 32]) -> Option<String> {
    let family = u16::from_ne_bytes([a[0], a[1]]);
    let port = u16::from_be_bytes([a[2], a[3]]);
    match family {
        2 => Some(format!("{}.{}.{}.{}:{port}", a[4], a[5], a[6], a[7])),
        10 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&a[8..24]);
            let ip = std::net::Ipv6Addr::from(b);
            // Dual-stack listeners see IPv4 clients as ::ffff:a.b.c.d.
            match ip.to_ipv4_mapped() {
                Some(v4) => Some(format!("{v4}:{port}")),
                None => Some(format!("[{ip}]:{port}")),
            }
        }
        1 => Some("unix".to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ip: [u8; 4], port: u16) -> [u8; 32] {
        let mut a = [0u8; 32];
        a[..2].copy_from_slice(&2u16.to_ne_bytes());
        a[2..4].copy_from_slice(&port.to_be_bytes());
        a[4..8].copy_from_slice(&ip);
        a
    }

    fn v6(ip: std::net::Ipv6Addr, port: u16) -> [u8; 32] {
        let mut a = [0u8; 32];
        a[..2].copy_from_slice(&10u16.to_ne_bytes());
        a[2..4].copy_from_slice(&port.to_be_bytes());
        a[8..24].copy_from_slice(&ip.octets());
        a
    }

    #[test]
    fn formats_peer_addresses() {
        assert_eq!(
            format_sockaddr(&v4([127, 0, 0, 1], 53122)).unwrap(),
            "127.0.0.1:53122"
        );
        assert_eq!(
            format_sockaddr(&v6("::1".parse().unwrap(), 80)).unwrap(),
            "[::1]:80"
        );
        assert_eq!(
            format_sockaddr(&v6("::ffff:10.1.2.3".parse().unwrap(), 443)).unwrap(),
            "10.1.2.3:443"
        );
        let mut unix = [0u8; 32];
        unix[..2].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(format_sockaddr(&unix).unwrap(), "unix");
        assert_eq!(format_sockaddr(&[0u8; 32]), None);
    }

    #[test]
    fn a_conn_is_decoded_with_its_sentinels_read() {
        let c = tc::Conn {
            start_ns: 1_000,
            bytes_in: 120,
            bytes_out: 0,
            eagain_ns: 0,
            direction: tc::direction::INBOUND,
            local_port: 8000,
            aborted: 1,
            unreadable: 0,
            addr: v4([127, 0, 0, 1], 40000),
        };
        assert_eq!(
            closed_conn(&c),
            Some(ClosedConn {
                start_ns: Some(1_000),
                bytes_in: 120,
                bytes_out: 0,
                eagain_ns: None,
                direction: Direction::Inbound,
                local_port: Some(8000),
                aborted: true,
                unreadable: false,
                peer: Some("127.0.0.1:40000".into()),
            })
        );
        // Not seen, and ports that are none.
        let old = tc::Conn {
            start_ns: 0,
            eagain_ns: 5,
            local_port: 0,
            addr: [0; 32],
            ..c
        };
        let d = closed_conn(&old).unwrap();
        assert_eq!((d.start_ns, d.eagain_ns), (None, Some(5)));
        assert_eq!((d.local_port, d.peer), (None, None));
        let big = tc::Conn {
            local_port: 70_000,
            ..c
        };
        assert_eq!(closed_conn(&big).unwrap().local_port, None);
        // A direction the kernel never sends: not guessed.
        assert_eq!(closed_conn(&tc::Conn { direction: 0, ..c }), None);
    }

    /// The model judges a closed connection by the kernel's own rule
    /// (`Conn::ended_badly`), unreadable counters included.
    #[test]
    fn ended_badly_agrees_with_the_kernels_rule() {
        for dir in [tc::direction::INBOUND, tc::direction::OUTBOUND] {
            for (bytes_in, bytes_out) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                for unreadable in [0, 1] {
                    let k = tc::Conn {
                        direction: dir,
                        bytes_in,
                        bytes_out,
                        unreadable,
                        ..Default::default()
                    };
                    let m = closed_conn(&k).unwrap();
                    assert_eq!(m.ended_badly(), k.ended_badly(), "{k:?}");
                }
            }
        }
    }

    #[test]
    fn an_answered_close_is_decoded_with_its_idle_time_when_known() {
        let c = tc::AnsweredClose {
            closed_ns: 2_000,
            idle_ns: 1_000,
            start_ns: 500,
            bytes_in: 80,
            bytes_out: 200,
            tgid: 7,
            tid: 8,
            master: 1,
            fd: 9,
            ended_by: tc::ended::SHUTDOWN,
            aborted: 0,
            local_port: 8000,
            _pad: 0,
            addr: v4([10, 0, 0, 7], 41000),
        };
        assert_eq!(
            answered_close(&c),
            AnsweredClose {
                closed_ns: 2_000,
                idle_ns: Some(1_000),
                start_ns: Some(500),
                bytes_in: 80,
                bytes_out: 200,
                tgid: 7,
                tid: 8,
                master: 1,
                fd: 9,
                ended_by: EndedBy::Shutdown,
                aborted: false,
                local_port: Some(8000),
                peer: Some("10.0.0.7:41000".into()),
            }
        );
        let unknown = tc::AnsweredClose {
            idle_ns: tc::UNSET,
            start_ns: 0,
            aborted: 1,
            ..c
        };
        let d = answered_close(&unknown);
        assert_eq!((d.idle_ns, d.start_ns, d.aborted), (None, None, true));
    }

    #[test]
    fn ended_by_values() {
        assert_eq!(ended_by(tc::ended::CLOSE), EndedBy::Close);
        assert_eq!(ended_by(tc::ended::SHUTDOWN), EndedBy::Shutdown);
        assert_eq!(ended_by(tc::ended::EXIT), EndedBy::Exit);
        assert_eq!(ended_by(0), EndedBy::Close);
    }

    #[test]
    fn syscall_classes_become_the_kernels_bits() {
        let none = SyscallClass::default();
        assert_eq!(class_bits(none), tc::class::MAYBE);
        let epoll = SyscallClass {
            wait: true,
            epoll: true,
            ..none
        };
        assert_eq!(class_bits(epoll), tc::class::WAIT | tc::class::EPOLL);
        let all = SyscallClass {
            wait: true,
            read: true,
            epoll: true,
            select: true,
            poll: true,
        };
        assert_eq!(
            class_bits(all),
            tc::class::WAIT
                | tc::class::READ
                | tc::class::EPOLL
                | tc::class::SELECT
                | tc::class::POLL
        );
        let read = SyscallClass { read: true, ..none };
        assert_eq!(class_bits(read), tc::class::READ);
    }

    #[test]
    fn roles_round_trip() {
        for r in [Role::Master, Role::Worker, Role::Child, Role::Plain] {
            assert_eq!(role(role_to_kernel(r)), r);
        }
        assert_eq!(role(99), Role::Plain);
    }

    #[test]
    fn an_inflight_entry_becomes_a_sample() {
        let e = tc::Inflight {
            start_ns: 100,
            arg0: 5,
            arg2: 4,
            seq: 3,
            woke_ns: 150,
            nr: 7,
            tgid: 10,
            active: 0,
            seeded: 1,
            fd_kind: 0,
            woke_by: tc::woke_by::STOP,
            master: 10,
            counted: 0,
        };
        let s = sample(11, &e);
        assert_eq!((s.tid, s.tgid, s.nr, s.seq), (11, 10, 7, 3));
        assert_eq!((s.active, s.seeded, s.woke_ns), (false, true, 150));
        assert_eq!(s.woke_by, WokeBy::Stop);
        assert!(s.is_open());
        assert_eq!(woke_by(tc::woke_by::NONE), WokeBy::None);
        assert_eq!(woke_by(tc::woke_by::RESUMED), WokeBy::Resumed);
    }
}
