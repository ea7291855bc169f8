//! TCP: a connection a watched process closes is judged at the close from
//! the socket's own byte counters and sent only when it ended badly; its
//! start and last EAGAIN are remembered in `CONNS` until then. One closed
//! after an answer is remembered in `ANSWERED` a while: if the kernel then
//! resets it (the client's next request came too late), a request was lost
//! to a keep-alive race.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, fentry, kprobe, raw_tracepoint},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext},
};
use tracer_common::{
    AnsweredClose, Conn, ConnEnd, ConnKey, KeepaliveRace, UNSET, Watched, direction, ended, kind,
    program, stat,
};

use crate::config::{CONFIG, cfg};
use crate::helpers::{
    PF_EXITING, count, current_syscall, current_task, finish, ids, kread, syscall_arg0,
};
use crate::maps::{ANSWERED, CONNS, EVENTS, PORTS, WATCHED};
use crate::quota::{charge, spend_token};

const EAGAIN: i32 = 11;
const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// How long a closed connection can still take a request and be reset: an
/// orphaned FIN_WAIT2 lasts tcp_fin_timeout (60 s by default).
const ANSWERED_FOR_NS: u64 = 120_000_000_000;
/// A connection closed after this long without traffic was kept alive
/// (Gunicorn's --keep-alive is whole seconds, 1 at least when on).
const KEPT_IDLE_NS: u64 = 100_000_000;
/// struct sock.sk_shutdown: this side will send no more. Set by close and
/// shutdown before the state change, never by a RST from the peer.
const SEND_SHUTDOWN: u8 = 2;

/// struct tcphdr's RST bit, in its flags byte.
const TCP_FLAG_RST: u8 = 0x04;

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;

/// inet_sock_set_state(const struct sock *sk, const int oldstate, const
/// int newstate): every state change of every socket on the host. What
/// its record held (ports, addresses) is read from the socket, and only
/// for the changes that matter.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    finish(program::INET_SOCK_SET_STATE, try_inet_sock_set_state(&ctx));
    0
}

/// A field of a socket at an offset from CONFIG.
#[inline(always)]
fn sock<T>(sk: u64, off: &u64) -> Result<T, i32> {
    kread::<T>(sk, cfg(off)).ok_or(-1)
}

fn try_inet_sock_set_state(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let new = ctx.arg::<u64>(2) as i32;
    let old = ctx.arg::<u64>(1) as i32;
    let accepting = old == TCP_SYN_RECV && new == TCP_ESTABLISHED;
    let opening = new == TCP_SYN_SENT;
    let closing = matches!(old, TCP_ESTABLISHED | TCP_CLOSE_WAIT)
        && matches!(new, TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE);
    if !accepting && !opening && !closing {
        return Ok(());
    }
    let sk: u64 = ctx.arg(0);
    let protocol: u16 = sock(sk, &CONFIG.kernel.sk_protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    if accepting {
        return accepted(sk);
    }
    let (tgid, tid) = ids();
    let Some(watched) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return Ok(());
    };
    let family: u16 = sock(sk, &CONFIG.kernel.skc_family)?;
    let now = unsafe { bpf_ktime_get_ns() };
    if opening {
        return connecting(sk, family, now);
    }
    // Only a close or shutdown by this side sets SEND_SHUTDOWN before the
    // state change. A RST from the peer, handled in softirq on top of
    // whatever task was running (maybe a watched one), does not.
    match kread::<u8>(sk, cfg(&CONFIG.kernel.sk_shutdown)) {
        Some(v) if v & SEND_SHUTDOWN != 0 => {}
        _ => return Ok(()),
    }
    let closed = Closed {
        sk,
        family,
        old,
        new,
        tgid,
        tid,
        watched,
        now,
    };
    closed.judge()
}

/// The peer's port of a socket, host order (sock_common keeps it in
/// network order).
#[inline(always)]
fn peer_port(sk: u64) -> Result<u16, i32> {
    Ok(u16::from_be(sock(sk, &CONFIG.kernel.skc_dport)?))
}

/// The local port of a socket, host order.
#[inline(always)]
fn local_port(sk: u64) -> Result<u16, i32> {
    sock(sk, &CONFIG.kernel.skc_num)
}

/// The peer's address of a socket, as a sockaddr head.
#[inline(always)]
fn peer_addr(sk: u64, family: u16) -> Result<[u8; 32], i32> {
    let k = &CONFIG.kernel;
    let mut a = [0u8; 32];
    a[..2].copy_from_slice(&family.to_ne_bytes());
    a[2..4].copy_from_slice(&peer_port(sk)?.to_be_bytes());
    if family == AF_INET {
        let ip: [u8; 4] = sock(sk, &k.skc_daddr)?;
        a[4..8].copy_from_slice(&ip);
    } else {
        let ip: [u8; 16] = sock(sk, &k.skc_v6_daddr)?;
        a[8..24].copy_from_slice(&ip);
    }
    Ok(a)
}

/// An IPv4 address as IPv6 maps it (`::ffff:a.b.c.d`).
#[inline(always)]
fn v4_mapped(ip: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(&ip);
    a
}

/// The four-tuple of a socket.
#[inline(always)]
fn conn_key(sk: u64, family: u16) -> Result<ConnKey, i32> {
    let o = &CONFIG.kernel;
    let mut k = ConnKey {
        local_port: local_port(sk)?,
        peer_port: peer_port(sk)?,
        ..Default::default()
    };
    if family == AF_INET {
        k.local = v4_mapped(sock(sk, &o.skc_rcv_saddr)?);
        k.peer = v4_mapped(sock(sk, &o.skc_daddr)?);
    } else {
        k.local = sock(sk, &o.skc_v6_rcv_saddr)?;
        k.peer = sock(sk, &o.skc_v6_daddr)?;
    }
    Ok(k)
}

/// connect() in a watched process: an outbound connection starts.
#[inline(always)]
fn connecting(sk: u64, family: u16, now: u64) -> Result<(), i32> {
    let conn = Conn {
        start_ns: now,
        direction: direction::OUTBOUND,
        addr: peer_addr(sk, family)?,
        ..Default::default()
    };
    if CONNS.insert(sk, conn, 0).is_err() {
        count(stat::CONNS_UNTRACKED);
    }
    Ok(())
}

/// A connection to a port a watched process listens on was established:
/// remember when, for its lifetime at close.
#[inline(always)]
fn accepted(sk: u64) -> Result<(), i32> {
    let sport = local_port(sk)?;
    if PORTS.get(sport as u32).copied().unwrap_or(0) == 0 {
        return Ok(());
    }
    let family: u16 = sock(sk, &CONFIG.kernel.skc_family)?;
    let conn = Conn {
        start_ns: unsafe { bpf_ktime_get_ns() },
        direction: direction::INBOUND,
        local_port: sport as u32,
        addr: peer_addr(sk, family)?,
        ..Default::default()
    };
    if CONNS.insert(sk, conn, 0).is_err() {
        count(stat::CONNS_UNTRACKED);
    }
    // A new connection on a four-tuple that was closed earlier: resets on
    // it are its own, not the old one's.
    let _ = ANSWERED.remove(&conn_key(sk, family)?);
    Ok(())
}

/// A connection a watched process is closing (or shutting down), at its
/// state change.
struct Closed {
    sk: u64,
    family: u16,
    /// The state it leaves: CLOSE_WAIT when the peer closed first.
    old: i32,
    /// The state it moves to.
    new: i32,
    tgid: u32,
    tid: u32,
    watched: Watched,
    now: u64,
}

/// Bytes each way on a closed connection, as the socket counted them.
struct Totals {
    direction: u32,
    bytes_in: u64,
    bytes_out: u64,
    peer_closed_first: bool,
    /// A read of the socket's counters failed: the byte counts are zeros
    /// standing for "not known", and nothing is judged from them.
    unreadable: bool,
}

impl Closed {
    /// Counts a connection that ended well; sends one that ended badly.
    /// What `CONNS` knows is read in place: the stack cannot hold copies.
    #[inline(always)]
    fn judge(&self) -> Result<(), i32> {
        let known = CONNS.get_ptr_mut(self.sk);
        let direction = match known {
            Some(c) => unsafe { (*c).direction },
            // Opened before the tracer attached: an accepted connection's
            // local port is the listener's, so a port no watched process
            // listens on was connect()ed by it.
            None => {
                let sport = local_port(self.sk)?;
                if PORTS.get(sport as u32).copied().unwrap_or(0) != 0 {
                    direction::INBOUND
                } else {
                    direction::OUTBOUND
                }
            }
        };
        let peer_closed_first = self.old == TCP_CLOSE_WAIT;
        let received = kread::<u64>(self.sk, cfg(&CONFIG.kernel.tcp_bytes_received));
        let written = self.bytes_written();
        // bytes_received counts the peer's FIN as one (rcv_nxt moves past
        // it): a health check that connects and closes sent no data.
        let totals = Totals {
            direction,
            bytes_in: received
                .unwrap_or(0)
                .saturating_sub(peer_closed_first as u64),
            bytes_out: written.unwrap_or(0),
            peer_closed_first,
            unreadable: received.is_none() || written.is_none(),
        };
        let sent = if totals.unreadable {
            // Sent with its flag: user space decides nothing from it.
            count(stat::CONNS_UNREADABLE);
            self.send(known, &totals)
        } else if Conn::ends_badly(direction, totals.bytes_in, totals.bytes_out) {
            self.send(known, &totals)
        } else {
            count(stat::CONNS_OK);
            if direction == direction::INBOUND && !peer_closed_first {
                self.remember_answered(known, &totals)
            } else {
                Ok(())
            }
        };
        let _ = CONNS.remove(self.sk);
        sent
    }

    /// Sends a connection that ended badly, written straight into the ring
    /// buffer. Everything that can fail is read before the reservation.
    #[inline(always)]
    fn send(&self, known: Option<*mut Conn>, t: &Totals) -> Result<(), i32> {
        let sport = local_port(self.sk)?;
        let addr_known = known.is_some_and(|c| unsafe { (*c).addr[0] != 0 || (*c).addr[1] != 0 });
        let addr = if addr_known {
            None
        } else {
            Some(peer_addr(self.sk, self.family)?)
        };
        let (ended_by, fd) = ended_by();
        // A process that closes connections by the thousand spends its own
        // bucket, not the ring buffer every tenant shares.
        if !spend_token(self.tgid) {
            return Ok(());
        }
        let Some(mut entry) = EVENTS.reserve::<ConnEnd>(0) else {
            charge(stat::EVENTS_LOST, self.tgid);
            return Ok(());
        };
        let ev = entry.as_mut_ptr();
        unsafe {
            (*ev).kind = kind::CONN_END;
            (*ev).tgid = self.tgid;
            (*ev).tid = self.tid;
            (*ev).fd = fd;
            (*ev).ts_ns = self.now;
            (*ev).ended_by = ended_by;
            (*ev).peer_closed_first = t.peer_closed_first as u32;
            match known {
                Some(c) => (*ev).conn = *c,
                None => {
                    (*ev).conn = Conn {
                        direction: t.direction,
                        ..Default::default()
                    }
                }
            }
            let conn = &mut (*ev).conn;
            conn.bytes_in = t.bytes_in;
            conn.bytes_out = t.bytes_out;
            conn.unreadable = t.unreadable as u32;
            conn.local_port = sport as u32;
            // Closing straight to CLOSE means the kernel threw unread data
            // away and answers with a RST.
            conn.aborted = (self.new == TCP_CLOSE) as u32;
            if let Some(a) = addr {
                conn.addr = a;
            }
        }
        entry.submit(0);
        count(stat::EVENTS_SENT);
        Ok(())
    }

    /// Remembers an inbound connection closed first by the process after
    /// it had answered: a keep-alive connection closed as idle, typically.
    #[inline(always)]
    fn remember_answered(&self, known: Option<*mut Conn>, t: &Totals) -> Result<(), i32> {
        // tcp_mstamp is the socket's last send or receive, in µs of the
        // same monotonic clock as bpf_ktime_get_ns.
        let last_us = kread::<u64>(self.sk, cfg(&CONFIG.kernel.tcp_mstamp)).unwrap_or(0);
        let idle_ns = if last_us == 0 || last_us > self.now / 1000 {
            UNSET
        } else {
            self.now - last_us * 1000
        };
        // Closed straight to CLOSE: the next request was already there,
        // unread, and the kernel resets the connection right now.
        let aborted = self.new == TCP_CLOSE;
        // A close right after the answer (Connection: close, HTTP/1.0) is
        // one the client asked for: it will not send on it again. Only a
        // connection left idle can be reused by a client that missed the
        // close, so only those are remembered (the common close stays cheap).
        if !aborted && idle_ns != UNSET && idle_ns < KEPT_IDLE_NS {
            return Ok(());
        }
        let key = conn_key(self.sk, self.family)?;
        let (ended_by, fd) = ended_by();
        let v = AnsweredClose {
            closed_ns: self.now,
            idle_ns,
            start_ns: known.map(|c| unsafe { (*c).start_ns }).unwrap_or(0),
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            tgid: self.tgid,
            tid: self.tid,
            master: self.watched.master,
            fd,
            ended_by,
            aborted: aborted as u32,
            local_port: key.local_port as u32,
            _pad: 0,
            addr: peer_addr(self.sk, self.family)?,
        };
        ANSWERED.insert(&key, &v, 0).map_err(|e| e as i32)
    }

    /// What the process wrote: what went out once, plus what is still
    /// queued; None when a counter could not be read (not "0 bytes").
    #[inline(always)]
    fn bytes_written(&self) -> Option<u64> {
        let k = &CONFIG.kernel;
        let sent = kread::<u64>(self.sk, cfg(&k.tcp_bytes_sent))?;
        let retrans = kread::<u64>(self.sk, cfg(&k.tcp_bytes_retrans))?;
        let write_seq = kread::<u32>(self.sk, cfg(&k.tcp_write_seq))?;
        let snd_nxt = kread::<u32>(self.sk, cfg(&k.tcp_snd_nxt))?;
        Some(sent.saturating_sub(retrans) + write_seq.wrapping_sub(snd_nxt) as u64)
    }
}

/// How the current task ended the connection, and the fd it passed: an
/// exit, or the shutdown or close syscall it is inside.
#[inline(always)]
fn ended_by() -> (u32, i32) {
    let flags = kread::<u32>(current_task(), cfg(&CONFIG.kernel.task_flags)).unwrap_or(0);
    if flags & PF_EXITING != 0 {
        return (ended::EXIT, -1);
    }
    let (nr, regs) = current_syscall();
    let fd = || syscall_arg0(regs).unwrap_or(u64::MAX) as i32;
    if nr as u64 == cfg(&CONFIG.nr_shutdown) {
        (ended::SHUTDOWN, fd())
    } else if nr as u64 == cfg(&CONFIG.nr_close) {
        (ended::CLOSE, fd())
    } else {
        (ended::CLOSE, -1)
    }
}

/// Every socket receive on the host, so a raw tracepoint (no record is
/// built) that leaves at once unless the receive found nothing: EAGAIN on a
/// connection being tracked is when a socket timeout starts to run.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
    finish(program::SOCK_RECV_LENGTH, try_sock_recv_length(&ctx));
    0
}

fn try_sock_recv_length(ctx: &RawTracePointContext) -> Result<(), i32> {
    let ret: u64 = ctx.arg(1);
    if ret as i32 != -EAGAIN {
        return Ok(());
    }
    let sk: u64 = ctx.arg(0);
    if let Some(c) = CONNS.get_ptr_mut(sk) {
        unsafe { (*c).eagain_ns = bpf_ktime_get_ns() };
    }
    Ok(())
}

/// Every TCP reset the host sends: tcp_send_reset(const struct sock *sk,
/// const struct sk_buff *skb[, enum sk_rst_reason reason]). The one that
/// matters here answers a request that arrived on a connection a watched
/// process had closed after answering: in softirq, on an orphaned
/// FIN_WAIT2 (a timewait socket, or none), or from the close itself when
/// the request was already queued (no segment then: the socket's own
/// addresses).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    finish(program::TCP_SEND_RESET, try_tcp_send_reset(&ctx));
    0
}

fn try_tcp_send_reset(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    if skb != 0 {
        return reset_of_segment(skb);
    }
    if sk == 0 {
        return Ok(());
    }
    let family: u16 = sock(sk, &CONFIG.kernel.skc_family)?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    reset_sent(&conn_key(sk, family)?);
    Ok(())
}

/// The kernel resets a segment, where tcp:tcp_send_reset misses it: before
/// Linux 6.10 that tracepoint fires only for a full socket, never for the
/// TIME_WAIT one (or none) a late request meets. Attached (by the loader,
/// only there) to tcp_v4_send_reset and tcp_v6_send_reset, whose second
/// argument is the segment being answered: as fentry programs where the
/// kernel has them (bpf() alone), else as a kprobe (perf_event_open).
#[kprobe]
pub fn tcp_rst_kprobe(ctx: ProbeContext) -> u32 {
    let run = ctx.arg::<u64>(1).ok_or(-1).and_then(reset_of_segment);
    finish(program::TCP_RST_KPROBE, run);
    0
}

#[fentry(function = "tcp_v4_send_reset")]
pub fn tcp_v4_rst_fentry(ctx: FEntryContext) -> i32 {
    finish(program::TCP_RST_KPROBE, reset_of_segment(ctx.arg(1)));
    0
}

#[fentry(function = "tcp_v6_send_reset")]
pub fn tcp_v6_rst_fentry(ctx: FEntryContext) -> i32 {
    finish(program::TCP_RST_KPROBE, reset_of_segment(ctx.arg(1)));
    0
}

/// The reset of received segment `skb`. The four-tuple comes from the
/// segment's own headers, not from a socket: there is none when no socket
/// is left (an orphan past tcp_fin_timeout), and a TIME_WAIT socket is a
/// smaller struct than the one whose offsets BTF gives; the headers are
/// there in every case, as the kernel reads them to build the reset.
#[inline(always)]
fn reset_of_segment(skb: u64) -> Result<(), i32> {
    let k = &CONFIG.kernel;
    let head = kread::<u64>(skb, cfg(&k.skb_head)).ok_or(-1)?;
    let ip = head + kread::<u16>(skb, cfg(&k.skb_network_header)).ok_or(-1)? as u64;
    let tcp = head + kread::<u16>(skb, cfg(&k.skb_transport_header)).ok_or(-1)? as u64;
    // struct tcphdr: the ports, then the flags in byte 13.
    let th = kread::<[u8; 14]>(tcp, 0).ok_or(-1)?;
    // The kernel never answers a reset with one (it returns first).
    if th[13] & TCP_FLAG_RST != 0 {
        return Ok(());
    }
    // The segment came from the peer: its source is the peer.
    let mut key = ConnKey {
        peer_port: u16::from_be_bytes([th[0], th[1]]),
        local_port: u16::from_be_bytes([th[2], th[3]]),
        ..Default::default()
    };
    match kread::<u8>(ip, 0).ok_or(-1)? >> 4 {
        4 => {
            // struct iphdr: saddr at 12, daddr at 16.
            let a = kread::<[u8; 8]>(ip, 12).ok_or(-1)?;
            key.peer = v4_mapped([a[0], a[1], a[2], a[3]]);
            key.local = v4_mapped([a[4], a[5], a[6], a[7]]);
        }
        6 => {
            // struct ipv6hdr: saddr at 8, daddr at 24.
            key.peer = kread::<[u8; 16]>(ip, 8).ok_or(-1)?;
            key.local = kread::<[u8; 16]>(ip, 24).ok_or(-1)?;
        }
        _ => return Ok(()),
    }
    reset_sent(&key);
    Ok(())
}

/// A reset the host sends on connection `key`: if a watched process had
/// closed it after answering, the request it answers was lost.
#[inline(always)]
fn reset_sent(key: &ConnKey) {
    let Some(closed) = ANSWERED.get_ptr(key) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(unsafe { (*closed).closed_ns }) < ANSWERED_FOR_NS {
        match EVENTS.reserve::<KeepaliveRace>(0) {
            Some(mut entry) => {
                let ev = entry.as_mut_ptr();
                unsafe {
                    (*ev).kind = kind::KEEPALIVE_RACE;
                    (*ev)._pad = 0;
                    (*ev).ts_ns = now;
                    (*ev).close = *closed;
                }
                entry.submit(0);
                count(stat::EVENTS_SENT);
            }
            None => charge(stat::EVENTS_LOST, unsafe { (*closed).tgid }),
        }
    }
    // One lost request per connection: the reset ends it.
    let _ = ANSWERED.remove(key);
}
