//! Connections that end badly: classification and the `early_close` report.
//! Pure: the kernel counts bytes per connection; this decides what it means.
use super::correlator::Correlator;
use super::correlator::Proc;
use super::exits::{SignalSeen, signal_name};
use super::signatures;
use crate::model::{
    CloseKind, ClosedConn, Direction, Dying, EarlyClose, EndedBy, MasterSettings, Output, Preceded,
    Role,
};

/// How the kernel saw a connection end (a `KernelEvent::ConnEnd`).
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnEnd {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub fd: i32,
    pub ended_by: EndedBy,
    pub peer_closed_first: bool,
}

/// Everything the correlator knows when a connection ends badly.
pub(super) struct ConnFacts<'a> {
    pub end: ConnEnd,
    pub master: u32,
    pub role: Role,
    pub conn: &'a ClosedConn,
    pub dying: Option<Dying>,
    /// The master's settings (--keep-alive, Gunicorn's version).
    pub settings: MasterSettings,
}

/// An inbound connection that got nothing back. Who closed first decides
/// whose doing it was: a client that left (with or without a request) is
/// counted, a worker that closed on a request it had read is a drop.
fn inbound_kind(c: &ClosedConn, peer_closed_first: bool) -> CloseKind {
    match (peer_closed_first, c.bytes_in > 0 || c.aborted) {
        (true, false) => CloseKind::Probe,
        (true, true) => CloseKind::ClientAbort,
        (false, true) => CloseKind::DroppedRequest,
        (false, false) => CloseKind::Idle,
    }
}

/// Which early close this is, if any: None when a reply was sent (or,
/// outbound, one came back), when nothing was asked of an outbound call,
/// when the server hung up first (the worker cut nothing short), or when
/// the kernel could not read the counters.
fn classify(c: &ClosedConn, peer_closed_first: bool) -> Option<(Direction, CloseKind)> {
    if !c.ended_badly() {
        return None;
    }
    match c.direction {
        Direction::Inbound => Some((Direction::Inbound, inbound_kind(c, peer_closed_first))),
        Direction::Outbound if !peer_closed_first => {
            Some((Direction::Outbound, CloseKind::UpstreamCut))
        }
        Direction::Outbound => None,
    }
}

/// Turns a connection the kernel reported into an `early_close`, or None
/// when it did not end badly (a reply was sent, or nothing was asked).
pub(super) fn early_close(f: ConnFacts) -> Option<EarlyClose> {
    let (c, end) = (f.conn, f.end);
    let (direction, kind) = classify(c, end.peer_closed_first)?;
    let preceded_by = c
        .eagain_ns
        .filter(|ns| *ns <= end.ts_ns)
        .map(|ns| Preceded {
            syscall: "recv",
            ret: "EAGAIN",
            wait_ms: (end.ts_ns - ns) / 1_000_000,
        });
    let mut ec = EarlyClose {
        direction,
        pid: end.pid,
        tid: end.tid,
        master_pid: f.master,
        role: f.role,
        fd: (end.fd >= 0).then_some(end.fd),
        peer: c.peer.clone(),
        local_port: c.local_port,
        bytes_in: c.bytes_in,
        bytes_out: c.bytes_out,
        suppressed: 0,
        lifetime_ms: c
            .start_ns
            .filter(|ns| *ns <= end.ts_ns)
            .map(|ns| (end.ts_ns - ns) / 1_000_000),
        ended_by: end.ended_by,
        peer_closed_first: end.peer_closed_first,
        kind,
        unread_data: c.aborted,
        preceded_by,
        idle_ms: None,
        keepalive_s: None,
        reset_after_ms: None,
        dying: f.dying,
        cause: None,
        container: None,
    };
    ec.cause = signatures::identify_close_with(&ec, &f.settings);
    Some(ec)
}

/// Why `p` (pid `pid`) was ending at `ts_ns`, from what was seen: the OOM
/// killer's choice, Gunicorn's WORKER TIMEOUT, a graceful stop, or its exit.
fn dying(p: &Proc, pid: u32, ts_ns: u64) -> Option<Dying> {
    if p.oom.is_some() {
        return Some(Dying::OomKill);
    }
    if p.killed_by_timeout {
        return Some(Dying::WorkerTimeout {
            signal: p
                .timeout_signal
                .as_ref()
                .map(|s| signal_name(s.sig))
                .unwrap_or_else(|| "a signal".into()),
            stall: p.timeout_stall.clone().map(Box::new),
            watched_ms: p.timeout_watched_ms,
            timeout_known: p.timeout_s.is_some(),
        });
    }
    if let Some(stop) = &p.stop_signal {
        let killed = p.exit_signal == Some(9)
            || p.last_signal
                .as_ref()
                .is_some_and(|s: &SignalSeen| s.sig == 9 && s.sender == p.master);
        return Some(Dying::GracefulStop {
            signal: signal_name(stop.sig),
            after_ms: ts_ns.saturating_sub(stop.ts_ns) / 1_000_000,
            killed,
        });
    }
    let why = p.exit.clone()?;
    Some(Dying::Exited {
        why,
        pid,
        exit_code: p.exit_code,
        signal: p.exit_signal.map(signal_name),
    })
}

impl Correlator {
    /// A watched process's connection ended badly (the kernel's judgement);
    /// count it and report it.
    pub(super) fn on_conn_end(&mut self, end: &ConnEnd, conn: &ClosedConn) -> Vec<Output> {
        // The kernel closes an exiting process's sockets after its exit
        // event: one forgotten as quiet comes back if a close hurt someone.
        if !self.procs.contains_key(&end.pid)
            && conn.ended_badly()
            && let Some(i) = self
                .exited_recent
                .iter()
                .position(|(pid, _)| *pid == end.pid)
            && let Some((pid, p)) = self.exited_recent.remove(i)
        {
            self.procs.insert(pid, p);
            self.exited_quiet = self.exited_quiet.saturating_sub(1);
            self.keep_exited(pid);
        }
        let settings = self.settings_of(end.pid);
        let Some(p) = self.procs.get_mut(&end.pid) else {
            return Vec::new();
        };
        let facts = ConnFacts {
            end: *end,
            master: p.master,
            role: p.role,
            conn,
            dying: dying(p, end.pid, end.ts_ns),
            settings,
        };
        let Some(mut close) = early_close(facts) else {
            return Vec::new();
        };
        close.container = p.container.clone();
        p.closes.count(close.kind);
        if close.kind == CloseKind::DroppedRequest && close.dying.is_some() {
            p.closes.lost_at_exit += 1;
        }
        if matches!(
            close.kind,
            CloseKind::DroppedRequest | CloseKind::UpstreamCut
        ) {
            p.last_drop = Some(close.clone());
        }
        self.hung_closed_badly(end.pid, close.peer.as_deref());
        // Benign closes are counted; a client that connects and closes ten
        // thousand times a second gets one line a second, not ten thousand.
        let p = self.procs.get_mut(&end.pid).expect("looked up above");
        if let Some(t) = p.benign_closes.get_mut(close.kind) {
            match t.admit(end.ts_ns) {
                Some(suppressed) => close.suppressed = suppressed,
                None => return Vec::new(),
            }
        }
        vec![Output::EarlyClose {
            ts_ns: end.ts_ns,
            close,
        }]
    }
}

/// Benign closes (idle, probe, client abort) of one process: at most one
/// reported a second per kind, the rest counted.
#[derive(Debug, Clone, Default)]
pub(super) struct BenignCloses([Throttle; 3]);

impl BenignCloses {
    fn get_mut(&mut self, kind: CloseKind) -> Option<&mut Throttle> {
        let i = match kind {
            CloseKind::Idle => 0,
            CloseKind::Probe => 1,
            CloseKind::ClientAbort => 2,
            _ => return None,
        };
        Some(&mut self.0[i])
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Throttle {
    last_ns: Option<u64>,
    suppressed: u64,
}

impl Throttle {
    /// Whether a close at `ts_ns` is reported: Some(how many were not since
    /// the last one reported), or None (counted, not reported).
    fn admit(&mut self, ts_ns: u64) -> Option<u64> {
        if self
            .last_ns
            .is_some_and(|last| ts_ns < last + 1_000_000_000)
        {
            self.suppressed += 1;
            return None;
        }
        self.last_ns = Some(ts_ns);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(direction: Direction, bytes_in: u64, bytes_out: u64) -> ClosedConn {
        ClosedConn {
            start_ns: Some(1_000_000_000),
            bytes_in,
            bytes_out,
            eagain_ns: None,
            direction,
            local_port: Some(8000),
            aborted: false,
            unreadable: false,
            peer: Some("127.0.0.1:40000".into()),
        }
    }

    fn facts(c: &ClosedConn, ended_by: EndedBy) -> ConnFacts<'_> {
        ConnFacts {
            end: ConnEnd {
                ts_ns: 1_500_000_000,
                pid: 10,
                tid: 10,
                fd: 11,
                ended_by,
                peer_closed_first: false,
            },
            master: 1,
            role: Role::Worker,
            conn: c,
            dying: None,
            settings: MasterSettings::default(),
        }
    }

    fn peer_first(c: &ClosedConn) -> ConnFacts<'_> {
        let mut f = facts(c, EndedBy::Shutdown);
        f.end.peer_closed_first = true;
        f
    }

    #[test]
    fn a_client_that_closed_first_is_counted_not_dropped() {
        // Connect and close: a health check, whatever the worker does next.
        let probe = conn(Direction::Inbound, 0, 0);
        let e = early_close(peer_first(&probe)).unwrap();
        assert_eq!((e.kind, e.peer_closed_first), (CloseKind::Probe, true));
        assert_eq!(e.cause, None);
        // A request, then gone before the answer (nginx's 499).
        let left = conn(Direction::Inbound, 21, 0);
        assert_eq!(
            early_close(peer_first(&left)).unwrap().kind,
            CloseKind::ClientAbort
        );
        // The same bytes with the worker closing first: its drop.
        assert_eq!(
            early_close(facts(&left, EndedBy::Close)).unwrap().kind,
            CloseKind::DroppedRequest
        );
        // Answered, whoever closed first: nothing to say.
        assert!(early_close(peer_first(&conn(Direction::Inbound, 21, 40))).is_none());
    }

    #[test]
    fn inbound_kinds() {
        let c = conn(Direction::Inbound, 120, 0);
        let e = early_close(facts(&c, EndedBy::Close)).unwrap();
        assert_eq!(e.kind, CloseKind::DroppedRequest);
        assert_eq!(
            (e.direction, e.ended_by, e.lifetime_ms, e.fd),
            (Direction::Inbound, EndedBy::Close, Some(500), Some(11))
        );
        assert_eq!(e.peer.as_deref(), Some("127.0.0.1:40000"));
        assert_eq!(e.local_port, Some(8000));
        let idle = conn(Direction::Inbound, 0, 0);
        assert_eq!(
            early_close(facts(&idle, EndedBy::Close)).unwrap().kind,
            CloseKind::Idle
        );
        // Nothing read, but the kernel reset the connection because a request
        // was waiting unread: dropped, not idle.
        let aborted = ClosedConn {
            aborted: true,
            ..idle.clone()
        };
        let e = early_close(facts(&aborted, EndedBy::Close)).unwrap();
        assert_eq!(e.kind, CloseKind::DroppedRequest);
        assert!(e.unread_data);
        // Opened before the tracer attached: no lifetime rather than a wrong one.
        let old = ClosedConn {
            start_ns: None,
            ..idle
        };
        assert_eq!(
            early_close(facts(&old, EndedBy::Close))
                .unwrap()
                .lifetime_ms,
            None
        );
        // Answered: not an early close.
        assert!(early_close(facts(&conn(Direction::Inbound, 120, 300), EndedBy::Close)).is_none());
    }

    #[test]
    fn outbound_cut_and_exit() {
        let c = conn(Direction::Outbound, 0, 80);
        let e = early_close(facts(&c, EndedBy::Exit)).unwrap();
        assert_eq!(
            (e.kind, e.direction, e.ended_by),
            (CloseKind::UpstreamCut, Direction::Outbound, EndedBy::Exit)
        );
        assert!(early_close(facts(&conn(Direction::Outbound, 10, 80), EndedBy::Close)).is_none());
        assert!(early_close(facts(&conn(Direction::Outbound, 0, 0), EndedBy::Close)).is_none());
    }

    #[test]
    fn an_upstream_that_hung_up_first_was_not_cut_by_the_worker() {
        // The server closed before replying, then the worker closed its
        // side: the worker cut nothing short.
        let c = conn(Direction::Outbound, 0, 80);
        assert!(early_close(peer_first(&c)).is_none());
        // The worker closed first with nothing received: a cut.
        assert_eq!(
            early_close(facts(&c, EndedBy::Close)).unwrap().kind,
            CloseKind::UpstreamCut
        );
    }

    #[test]
    fn a_close_whose_counters_could_not_be_read_decides_nothing() {
        for dir in [Direction::Inbound, Direction::Outbound] {
            let c = ClosedConn {
                unreadable: true,
                ..conn(dir, 0, 0)
            };
            assert!(early_close(facts(&c, EndedBy::Close)).is_none());
            assert!(early_close(facts(&c, EndedBy::Exit)).is_none());
            assert!(early_close(peer_first(&c)).is_none());
        }
        // The same zeros, read: a judgement.
        assert!(early_close(facts(&conn(Direction::Inbound, 0, 0), EndedBy::Close)).is_some());
    }

    #[test]
    fn eagain_then_wait_is_reported_and_named() {
        let mut c = conn(Direction::Inbound, 0, 0);
        c.eagain_ns = Some(1_000_100_000);
        c.aborted = true;
        let e = early_close(facts(&c, EndedBy::Close)).unwrap();
        let p = e.preceded_by.as_ref().unwrap();
        assert_eq!((p.syscall, p.ret, p.wait_ms), ("recv", "EAGAIN", 499));
        assert_eq!(e.cause.unwrap().id, "leaked_socket_timeout");
    }

    /// Issue 20, item 11: every idle, probe and abort close was one JSON
    /// line (a client doing 10k connect/close a second made 6 MB/s).
    #[test]
    fn benign_closes_are_reported_once_a_second_with_the_rest_counted() {
        let mut t = Throttle::default();
        let at = |ms: u64| ms * 1_000_000;
        assert_eq!(t.admit(at(0)), Some(0));
        for ms in 1..1000 {
            assert_eq!(t.admit(at(ms)), None, "{ms}");
        }
        assert_eq!(t.admit(at(1000)), Some(999));
        assert_eq!(t.admit(at(5000)), Some(0));
        let mut b = BenignCloses::default();
        assert!(
            b.get_mut(CloseKind::DroppedRequest).is_none(),
            "never held back"
        );
        assert!(b.get_mut(CloseKind::KeepaliveRace).is_none());
        assert!(b.get_mut(CloseKind::Probe).is_some());
    }
}
