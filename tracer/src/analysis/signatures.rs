//! Known causes, as data: each signature is a predicate on a stall and the
//! sentence a person needs. Adding one is adding an entry to `SIGNATURES`.
use crate::model::{
    Cause, CloseKind, Direction, EarlyClose, EndedBy, FdKind, Role, StallReport, no_other_writer,
};

/// One known cause of a stall (`T` = StallReport) or of an early close
/// (`T` = EarlyClose).
pub struct Signature<T> {
    pub id: &'static str,
    pub cause: &'static str,
    pub fix: &'static str,
    pub matches: fn(&T) -> bool,
}

/// The first signature that matches: lists go from specific to general.
fn first_match<T>(signatures: &[Signature<T>], x: &T) -> Option<Cause> {
    signatures
        .iter()
        .find(|sig| (sig.matches)(x))
        .map(|sig| Cause {
            id: sig.id,
            cause: sig.cause,
            fix: sig.fix,
        })
}

/// A pipe that nobody but the blocked process itself can write to.
/// (With no writer at all the read would return EOF: not a stall.)
pub fn only_self_writes(s: &StallReport) -> bool {
    s.fd_kind == FdKind::Pipe
        && no_other_writer(&s.peers, s.pid)
        && s.writers().any(|p| p.pid == s.pid)
}

fn is_read(s: &StallReport) -> bool {
    matches!(
        s.syscall.as_str(),
        "read" | "readv" | "pread64" | "recvfrom" | "recvmsg"
    )
}

/// First match wins, so specific signatures come before general ones.
pub static SIGNATURES: &[Signature<StallReport>] = &[
    Signature {
        id: "multiprocessing_queue_gevent",
        cause: "multiprocessing.Queue.get() in a gevent worker: the queue's feeder thread is a greenlet that cannot run while the hub is blocked, so the 4-byte read on its pipe never returns",
        fix: "use gevent.queue.Queue or queue.Queue, call get(timeout=...), or move the work out of the worker process",
        matches: |s| {
            s.role == Role::Worker
                && s.syscall == "read"
                && s.count == Some(4)
                && only_self_writes(s)
        },
    },
    Signature {
        id: "self_pipe_read",
        cause: "a blocking read on a pipe that only this process can write to: it can never return (a threading or multiprocessing primitive used after gevent monkey-patching)",
        fix: "use gevent-aware primitives in request code, or bound the wait with a timeout",
        matches: |s| is_read(s) && only_self_writes(s),
    },
    Signature {
        id: "uncooperative_socket_read",
        cause: "a blocking read on a socket the event loop does not own: a C client library (database driver, RPC client) not made cooperative by gevent",
        fix: "use a gevent-compatible driver, or run the call in gevent's threadpool",
        matches: |s| s.role == Role::Worker && is_read(s) && s.fd_kind == FdKind::Socket,
    },
    Signature {
        id: "file_lock_wait",
        cause: "waiting for a file lock (flock/fcntl) held by another process",
        fix: "find the lock holder (lslocks), and never take blocking file locks in request code",
        // Only the waiting forms of fcntl (F_SETLKW, F_OFD_SETLKW) can block this long.
        matches: |s| matches!(s.syscall.as_str(), "flock" | "fcntl"),
    },
    Signature {
        id: "unpatched_sleep",
        cause: "a sleep that gevent did not patch (time.sleep imported before monkey-patching, or C code sleeping) blocks the whole worker",
        fix: "monkey-patch before any other import, or use gevent.sleep",
        matches: |s| {
            s.role == Role::Worker && matches!(s.syscall.as_str(), "nanosleep" | "clock_nanosleep")
        },
    },
    Signature {
        id: "os_thread_lock",
        cause: "the event loop waits on a lock held by a real OS thread (a C extension thread, or a lock created before monkey-patching)",
        fix: "create locks after monkey-patching; py-spy dump --pid shows which thread holds it",
        matches: |s| s.role == Role::Worker && s.syscall == "futex",
    },
];

/// A read that found nothing (EAGAIN), a wait, then the close: the socket
/// had a timeout Gunicorn never set.
fn timed_out_read(e: &EarlyClose) -> bool {
    e.ended_by != EndedBy::Exit && e.preceded_by.as_ref().is_some_and(|p| p.wait_ms < 60_000)
}

/// Known causes of a connection closed with nothing sent back.
pub static CLOSE_SIGNATURES: &[Signature<EarlyClose>] = &[
    Signature {
        id: "oom_killed_mid_request",
        cause: "the kernel's OOM killer killed the worker with the request in flight: its memory cgroup reached its limit, so the client got nothing",
        fix: "find what the request allocates (a large query result, a file read whole, a leak across requests) and bound it, or raise the container's memory limit; --max-requests recycles workers that grow",
        matches: |e| e.kind == CloseKind::DroppedRequest && e.while_oom_killed,
    },
    Signature {
        id: "worker_died_mid_request",
        cause: "the worker died with the request in flight (killed by WORKER TIMEOUT, the OOM killer, or a crash), so the client got nothing",
        fix: "find why the worker died: a stall reported just before it, or the kernel log for an OOM kill",
        // First: a dying worker's close can look like a timed-out read.
        matches: |e| {
            e.kind == CloseKind::DroppedRequest && (e.ended_by == EndedBy::Exit || e.while_killed)
        },
    },
    Signature {
        id: "leaked_socket_timeout",
        cause: "a default socket timeout leaked into the client connection (socket.setdefaulttimeout() called in request code, as old Thrift clients did, under Gunicorn < 19.8 which did not reset accepted sockets): a read timed out and Gunicorn closed the connection with nothing sent",
        fix: "upgrade Gunicorn to 19.8 or later and Thrift to 0.12 or later, and never call socket.setdefaulttimeout in request code",
        matches: |e| {
            e.kind == CloseKind::DroppedRequest
                && e.direction == Direction::Inbound
                && timed_out_read(e)
        },
    },
    Signature {
        id: "keepalive_shorter_than_client",
        cause: "the client or load balancer sent its next request on a keep-alive connection that Gunicorn's keep-alive timer had just closed: it keeps idle connections longer than Gunicorn's --keep-alive, and the kernel reset the request",
        fix: "set Gunicorn's --keep-alive above the balancer's idle timeout (ALB: 60 s by default), or lower the balancer's idle or upstream keep-alive timeout below Gunicorn's",
        matches: |e| e.kind == CloseKind::KeepaliveRace,
    },
    Signature {
        id: "upstream_timeout",
        cause: "an upstream call was cut short by a socket timeout before any reply arrived (possibly a timeout leaked from another greenlet via socket.setdefaulttimeout)",
        fix: "check the client library's timeout settings, and never call socket.setdefaulttimeout in request code",
        matches: |e| e.kind == CloseKind::UpstreamCut && timed_out_read(e),
    },
];

pub fn identify_close(e: &EarlyClose) -> Option<Cause> {
    first_match(CLOSE_SIGNATURES, e)
}

pub fn identify(s: &StallReport) -> Option<Cause> {
    first_match(SIGNATURES, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{End, Peer, Preceded};

    fn peer(pid: u32, end: End) -> Peer {
        Peer {
            pid,
            comm: "x".into(),
            fd: 9,
            end,
        }
    }

    fn stall(syscall: &str, kind: FdKind, count: Option<u64>, peers: Vec<Peer>) -> StallReport {
        StallReport {
            pid: 10,
            tid: 10,
            syscall: syscall.into(),
            fd_kind: kind,
            count,
            peers,
            role: Role::Worker,
            ..Default::default()
        }
    }

    fn id(s: &StallReport) -> Option<&'static str> {
        identify(s).map(|c| c.id)
    }

    #[test]
    fn multiprocessing_queue_signature() {
        let s = stall("read", FdKind::Pipe, Some(4), vec![peer(10, End::Write)]);
        assert_eq!(id(&s), Some("multiprocessing_queue_gevent"));
        // Another process could write: not this bug.
        let s = stall(
            "read",
            FdKind::Pipe,
            Some(4),
            vec![peer(10, End::Write), peer(11, End::Write)],
        );
        assert_eq!(id(&s), None);
    }

    #[test]
    fn generic_self_pipe_signature() {
        let s = stall("read", FdKind::Pipe, Some(65536), vec![peer(10, End::Both)]);
        assert_eq!(id(&s), Some("self_pipe_read"));
        // No writer at all: the read would return EOF, so this is not it.
        let s = stall("read", FdKind::Pipe, Some(65536), vec![]);
        assert_eq!(id(&s), None);
    }

    #[test]
    fn socket_read_in_worker_signature() {
        let s = stall("recvfrom", FdKind::Socket, Some(4096), vec![]);
        assert_eq!(id(&s), Some("uncooperative_socket_read"));
        let mut plain = s.clone();
        plain.role = Role::Plain;
        assert_eq!(id(&plain), None);
    }

    fn close(kind: CloseKind, ended_by: EndedBy, wait_ms: Option<u64>) -> EarlyClose {
        EarlyClose {
            direction: if kind == CloseKind::UpstreamCut {
                Direction::Outbound
            } else {
                Direction::Inbound
            },
            pid: 1,
            tid: 1,
            master_pid: 1,
            role: Role::Worker,
            fd: Some(3),
            peer: None,
            local_port: None,
            bytes_in: 0,
            bytes_out: 0,
            lifetime_ms: Some(0),
            ended_by,
            peer_closed_first: false,
            kind,
            unread_data: false,
            preceded_by: wait_ms.map(|w| Preceded {
                syscall: "recv",
                ret: "EAGAIN",
                wait_ms: w,
            }),
            idle_ms: None,
            keepalive_s: None,
            reset_after_ms: None,
            while_killed: false,
            while_oom_killed: false,
            cause: None,
            container: None,
        }
    }

    #[test]
    fn close_signatures() {
        let id = |e: &EarlyClose| identify_close(e).map(|c| c.id);
        assert_eq!(
            id(&close(CloseKind::DroppedRequest, EndedBy::Close, Some(500))),
            Some("leaked_socket_timeout")
        );
        assert_eq!(
            id(&close(CloseKind::DroppedRequest, EndedBy::Exit, Some(500))),
            Some("worker_died_mid_request")
        );
        assert_eq!(
            id(&close(CloseKind::DroppedRequest, EndedBy::Close, None)),
            None
        );
        // Closed by the worker's own teardown after Gunicorn's SIGABRT: it
        // died mid-request, even though a read had found nothing before.
        let dying = EarlyClose {
            while_killed: true,
            ..close(CloseKind::DroppedRequest, EndedBy::Close, Some(5000))
        };
        assert_eq!(id(&dying), Some("worker_died_mid_request"));
        // Chosen by the OOM killer: its kill, not a timeout, explains it.
        let oom = EarlyClose {
            while_oom_killed: true,
            ..close(CloseKind::DroppedRequest, EndedBy::Exit, None)
        };
        assert_eq!(id(&oom), Some("oom_killed_mid_request"));
        assert_eq!(
            id(&close(CloseKind::UpstreamCut, EndedBy::Close, Some(100))),
            Some("upstream_timeout")
        );
        // An idle keep-alive connection closed by Gunicorn's timer is normal.
        assert_eq!(
            id(&close(CloseKind::Idle, EndedBy::Close, Some(2000))),
            None
        );
    }

    #[test]
    fn lock_sleep_and_futex_signatures() {
        assert_eq!(
            id(&stall("flock", FdKind::File, None, vec![])),
            Some("file_lock_wait")
        );
        assert_eq!(
            id(&stall("fcntl", FdKind::File, None, vec![])),
            Some("file_lock_wait")
        );
        assert_eq!(
            id(&stall("clock_nanosleep", FdKind::Unknown, None, vec![])),
            Some("unpatched_sleep")
        );
        assert_eq!(
            id(&stall("futex", FdKind::Unknown, None, vec![])),
            Some("os_thread_lock")
        );
    }
}
