//! Known causes, as data: each signature is a predicate on a stall and the
//! sentence a person needs. Adding one is adding an entry to `SIGNATURES`
//! (or, for a server a stall waits on, to `SERVICES`).
use std::borrow::Cow;

use crate::model::{
    Cause, CauseEvidence, CloseKind, Direction, Dying, EarlyClose, EndedBy, ExitCause, ExitReport,
    FdKind, MasterSettings, NoWriterThread, StallReport, StallState, no_other_writer,
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
fn first_match<'a, T: 'a>(
    signatures: impl IntoIterator<Item = &'a Signature<T>>,
    x: &T,
) -> Option<Cause> {
    signatures
        .into_iter()
        .find(|sig| (sig.matches)(x))
        .map(|sig| Cause {
            id: sig.id,
            cause: Cow::Borrowed(sig.cause),
            fix: Cow::Borrowed(sig.fix),
            evidence: None,
        })
}

/// How a worker class runs requests: what a blocked loop thread means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavor {
    /// gevent or eventlet: greenlets on one hub.
    Gevent,
    /// An asyncio loop (Uvicorn's worker).
    Asyncio,
    /// One request at a time (Gunicorn's default).
    Sync,
    /// A thread pool behind a poller (gthread).
    Threads,
    /// No setting the tracer read names it, and the worker's behaviour did
    /// not show it: only advice that fits every class is given.
    Unknown,
}

/// The flavor of the stalled worker's class: named by a setting or
/// inferred from the worker (never Gunicorn's default assumed).
pub(super) fn flavor(s: &StallReport) -> Flavor {
    let class = s.worker_class.as_ref().filter(|c| c.is_known());
    match class.map(|c| c.name.as_str()) {
        Some("gevent" | "eventlet" | "gevent_wsgi" | "gevent_pywsgi") => Flavor::Gevent,
        Some("uvicorn" | "tornado") => Flavor::Asyncio,
        Some("sync") => Flavor::Sync,
        Some("gthread") => Flavor::Threads,
        _ => Flavor::Unknown,
    }
}

/// The stall blocks a greenlet hub: the class is gevent or eventlet (named
/// or inferred). An unknown class gets none of gevent's advice.
fn gevent_loop(s: &StallReport) -> bool {
    s.on_loop_thread() && flavor(s) == Flavor::Gevent
}

fn asyncio_loop(s: &StallReport) -> bool {
    s.on_loop_thread() && flavor(s) == Flavor::Asyncio
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
        s.syscall_name(),
        "read" | "readv" | "pread64" | "recvfrom" | "recvmsg"
    )
}

fn is_futex(s: &StallReport) -> bool {
    s.syscall_name().starts_with("futex")
}

/// The loop thread waits on a lock and its worker has not heartbeated
/// since its fork: still booting, or deadlocked.
fn lock_wait_before_first_heartbeat(s: &StallReport) -> bool {
    s.on_loop_thread() && is_futex(s) && s.never_heartbeated == Some(true)
}

fn is_sleep(s: &StallReport) -> bool {
    s.is_sleep()
}

fn is_multiplexer(s: &StallReport) -> bool {
    super::syscalls::is_multiplexer(s.syscall_name())
}

/// Checked before the servers a stall waits on: these name the cause
/// whatever the fd is.
static FIRST: &[Signature<StallReport>] = &[
    Signature {
        id: "deadlocked_since_fork",
        cause: "deadlocked since fork: it has waited on one lock since before its first heartbeat for longer than Gunicorn's --timeout (30 s when not known, 10 s at least), longer than a boot waits; a lock (logging, or one held by another thread of the master when it forked, e.g. with preload_app) was copied locked into the child",
        fix: "start no threads in the master before it forks (with preload_app, start them in a post_fork hook or lazily in the worker), and reset locks a library holds with os.register_at_fork(after_in_child=...)",
        matches: |s| lock_wait_before_first_heartbeat(s) && s.outlasts_a_boot(),
    },
    Signature {
        id: "lock_wait_before_first_heartbeat",
        cause: "waiting on a lock since before its first heartbeat: a slow boot, or a deadlock since fork (a lock copied locked into the child); called a deadlock once the wait outlasts Gunicorn's --timeout",
        fix: "if it lasts: start no threads in the master before it forks (with preload_app, start them in a post_fork hook or lazily in the worker), and reset locks a library holds with os.register_at_fork(after_in_child=...)",
        matches: lock_wait_before_first_heartbeat,
    },
    Signature {
        id: "cpu_bound_loop",
        cause: "the event loop's thread has kept the CPU without yielding (a CPU-bound request: a long loop, a big regex or JSON document, a C extension holding the GIL): no other greenlet runs meanwhile, the heartbeat included",
        fix: "move CPU-heavy work out of the worker (a process pool or a task queue), or yield in long loops (gevent.sleep(0)); the stack (py_stack), when it could be read, names the line",
        matches: |s| s.state == StallState::OnCpu && gevent_loop(s),
    },
    Signature {
        id: "cpu_bound_coroutine",
        cause: "the asyncio loop's thread has kept the CPU without awaiting (CPU-bound code in an async handler): no other request is served meanwhile, and the heartbeat stops",
        fix: "run CPU-heavy work in a process pool (loop.run_in_executor with a ProcessPoolExecutor) or a task queue; the stack (py_stack), when it could be read, names the line",
        matches: |s| s.state == StallState::OnCpu && asyncio_loop(s),
    },
    Signature {
        id: "cpu_bound_request",
        cause: "a request has kept the worker's CPU this long without returning: the worker serves nothing else meanwhile",
        fix: "make the request cheaper or move the work to a task queue; raise --timeout only for requests known to be long",
        matches: |s| s.state == StallState::OnCpu,
    },
    Signature {
        id: "busy_loop",
        cause: "the event loop's thread has not gone back to its loop since its heartbeat was due, though no single call lasted the threshold: many short blocking calls (an unpatched client queried in a loop) or computation between short waits; no other greenlet runs meanwhile, the heartbeat included",
        fix: "make the calls cooperative (monkey-patch the client before importing it, or use a gevent-aware driver), batch them, or move the work out of the worker; the stack (py_stack), when it could be read, names the line",
        matches: |s| s.state == StallState::Busy && gevent_loop(s),
    },
    Signature {
        id: "busy_coroutine",
        cause: "the asyncio loop's thread has not gone back to its loop since its heartbeat was due: many short blocking calls (or computation) in an async handler, none past the threshold alone",
        fix: "use async clients, or run the blocking calls in a thread (asyncio.to_thread)",
        matches: |s| s.state == StallState::Busy && asyncio_loop(s),
    },
    Signature {
        id: "busy_request",
        cause: "a request has kept the worker away from its loop this long in short calls and computation: the worker serves nothing else meanwhile",
        fix: "make the request cheaper (fewer round trips to its servers), or move the work to a task queue",
        matches: |s| s.state == StallState::Busy,
    },
    Signature {
        id: "multiprocessing_queue_gevent",
        cause: "multiprocessing.Queue.get() in a gevent worker: the queue's feeder thread is a greenlet that cannot run while the hub is blocked, so the 4-byte read on its pipe never returns",
        fix: "use gevent.queue.Queue or queue.Queue, call get(timeout=...), or move the work out of the worker process",
        // gevent known, not assumed: with real threads the feeder writes.
        matches: |s| {
            s.no_other_writer_thread() == Some(NoWriterThread::BlockedHub)
                && s.syscall_name() == "read"
                && s.count == Some(4)
                && only_self_writes(s)
        },
    },
    Signature {
        id: "self_pipe_read",
        cause: "a blocking read on a pipe that only this process can write to, on the gevent hub's thread: its writer can only be a greenlet of this blocked hub, so it can never return (a threading or multiprocessing primitive used after gevent monkey-patching)",
        fix: "use gevent-aware primitives in request code, or bound the wait with a timeout",
        matches: |s| {
            is_read(s)
                && only_self_writes(s)
                && s.no_other_writer_thread() == Some(NoWriterThread::BlockedHub)
        },
    },
    Signature {
        id: "self_pipe_read",
        cause: "a blocking read on a pipe that only this process can write to, and the process had one thread: no thread is left to write it, so it can never return",
        fix: "find what was to write the pipe (a producer never started, or one that died), and bound the wait with a timeout",
        matches: |s| {
            is_read(s)
                && only_self_writes(s)
                && s.no_other_writer_thread() == Some(NoWriterThread::OneThread)
        },
    },
    Signature {
        id: "self_pipe_wait",
        cause: "a blocking read on a pipe only this process writes to; another of its threads must write it (a queue or a threading primitive whose producer is one of its threads), and has not",
        fix: "find the thread that was to write it and why it has not (py-spy dump --pid shows every thread), and bound the wait with a timeout",
        matches: |s| is_read(s) && only_self_writes(s),
    },
];

/// First match wins, so specific signatures come before general ones.
pub static SIGNATURES: &[Signature<StallReport>] = &[
    Signature {
        id: "wait_outside_loop",
        cause: "the event loop's thread waits outside the loop: a C library (a database driver, an RPC client) or a socket created before monkey-patching, which gevent does not make cooperative, polls its own sockets and blocks the hub",
        fix: "make the client cooperative (monkey-patch before importing it, or use a gevent-aware driver), or run the call in gevent's threadpool",
        matches: |s| gevent_loop(s) && is_multiplexer(s) && !is_sleep(s),
    },
    Signature {
        id: "uncooperative_socket_read",
        cause: "a blocking read on a socket the event loop does not own: a C client library (database driver, RPC client) not made cooperative by gevent",
        fix: "use a gevent-compatible driver, or run the call in gevent's threadpool",
        matches: |s| gevent_loop(s) && is_read(s) && s.fd_kind == FdKind::Socket,
    },
    Signature {
        id: "file_lock_wait",
        cause: "waiting for a file lock (flock/fcntl) held by another process",
        fix: "find the lock holder (lslocks), and never take blocking file locks in request code",
        // Only the waiting forms of fcntl (F_SETLKW, F_OFD_SETLKW) can block this long.
        matches: |s| matches!(s.syscall_name(), "flock" | "fcntl"),
    },
    Signature {
        id: "unpatched_sleep",
        cause: "a sleep that gevent did not patch (time.sleep imported before monkey-patching, or C code sleeping) blocks the whole worker",
        fix: "monkey-patch before any other import, or use gevent.sleep",
        matches: |s| gevent_loop(s) && is_sleep(s),
    },
    Signature {
        id: "os_thread_lock",
        cause: "the event loop waits on a lock held by a real OS thread (a C extension thread, or a lock created before monkey-patching)",
        fix: "create locks after monkey-patching; py-spy dump --pid shows which thread holds it",
        matches: |s| gevent_loop(s) && is_futex(s),
    },
    Signature {
        id: "blocking_call_in_async_handler",
        cause: "a blocking call in an async handler (time.sleep, a synchronous client, a lock): the asyncio loop waits with it, so no other request is served and the heartbeat stops",
        fix: "await an async equivalent (asyncio.sleep, an async client), or run the call in a thread (asyncio.to_thread)",
        matches: asyncio_loop,
    },
];
/// A read that found nothing (EAGAIN), a wait, then the close: the socket
/// had a timeout Gunicorn never set.
fn timed_out_read(e: &EarlyClose) -> bool {
    e.ended_by != EndedBy::Exit && e.preceded_by.as_ref().is_some_and(|p| p.wait_ms < 60_000)
}

/// A request closed by the worker itself, not dying, with nothing sent,
/// after a read found nothing (EAGAIN) and a wait that is not Gunicorn's
/// keep-alive timer. Every gevent, gthread and asyncio read finds EAGAIN
/// first, so the EAGAIN alone says nothing: a default socket timeout
/// leaked into the connection is the case where the worker gave up on a
/// request it had begun to read, after a wait no Gunicorn setting makes.
fn leaked_timeout(e: &EarlyClose) -> bool {
    e.kind == CloseKind::DroppedRequest
        && e.direction == Direction::Inbound
        && e.dying.is_none()
        && !e.peer_closed_first
        && e.ended_by != EndedBy::Exit
        && e.bytes_out == 0
        && (e.bytes_in > 0 || e.unread_data)
        && timed_out_read(e)
}

/// The wait before the close is about Gunicorn's --keep-alive (to its
/// timer's 1 s tick): its keep-alive timer closed an idle connection that
/// had not sent a whole request. Gunicorn's default is 2 s.
fn keepalive_wait(e: &EarlyClose, keepalive_s: Option<f64>) -> bool {
    let k = (keepalive_s.unwrap_or(2.0) * 1000.0) as u64;
    e.preceded_by
        .as_ref()
        .is_some_and(|p| p.wait_ms + 1_100 >= k && p.wait_ms <= k + 1_100)
}

/// Known causes of a connection closed with nothing sent back. (A request
/// lost because its worker was dying is named by `died_mid_request`.)
pub static CLOSE_SIGNATURES: &[Signature<EarlyClose>] = &[
    Signature {
        id: "oom_killed_mid_request",
        cause: "the kernel's OOM killer killed the worker with the request in flight: its memory cgroup reached its limit, so the client got nothing",
        fix: "find what the request allocates (a large query result, a file read whole, a leak across requests) and bound it, or raise the container's memory limit; --max-requests recycles workers that grow",
        matches: |e| e.kind == CloseKind::DroppedRequest && e.dying == Some(Dying::OomKill),
    },
    Signature {
        id: "leaked_socket_timeout",
        cause: LEAKED_CAUSE,
        fix: LEAKED_FIX,
        matches: leaked_timeout,
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

const LEAKED_CAUSE: &str = "a socket timeout Gunicorn never set ran out on the client connection (socket.setdefaulttimeout() called in request code, as old Thrift clients did, leaks into sockets accepted meanwhile): a read timed out and the worker closed the connection with nothing sent";
const LEAKED_FIX: &str = "never call socket.setdefaulttimeout in request code (set timeouts on the client's own sockets), and check that the worker resets accepted sockets to blocking (Gunicorn 19.8 and later do)";

/// The leaked timeout, with the installed Gunicorn's version when it was
/// read: only a version before 19.8 is said to be part of the cause.
fn leaked_cause(version: Option<(u32, u32, u32)>) -> Cause {
    let (cause, fix) = match version {
        Some(v) if v < (19, 8, 0) => (
            format!(
                "{LEAKED_CAUSE}; the installed Gunicorn {}.{}.{} is older than 19.8, which does not reset accepted sockets to blocking",
                v.0, v.1, v.2
            ),
            "upgrade Gunicorn to 19.8 or later (and Thrift to 0.12 or later), and never call socket.setdefaulttimeout in request code".to_string(),
        ),
        _ => (LEAKED_CAUSE.to_string(), LEAKED_FIX.to_string()),
    };
    Cause {
        id: "leaked_socket_timeout",
        cause: Cow::Owned(cause),
        fix: Cow::Owned(fix),
        evidence: None,
    }
}

/// `5.5s`
fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// A process name as read from the kernel, control characters replaced.
fn clean(comm: &str) -> String {
    comm.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What the stall a WORKER TIMEOUT was blamed on had done.
fn stall_words(s: &StallReport) -> String {
    let at_least = if s.since_attach { "at least " } else { "" };
    let how_long = format!("{at_least}{}", secs(s.blocked_ms));
    match s.state {
        StallState::Blocked => format!(
            "thread {} had been blocked {how_long} in {}()",
            s.tid,
            s.syscall_name()
        ),
        StallState::OnCpu => format!("thread {} had kept the CPU {how_long}", s.tid),
        StallState::Busy => format!(
            "thread {} had been away from its loop {how_long} (short calls and computation)",
            s.tid
        ),
    }
}

/// A request lost because its worker was dying, named by what the tracer
/// saw of the death; None when the worker was not known to be dying and
/// did not exit with it open.
fn died_mid_request(e: &EarlyClose) -> Option<Cause> {
    if e.kind != CloseKind::DroppedRequest {
        return None;
    }
    let owned = |id, cause: String, fix: &'static str| Cause {
        id,
        cause: Cow::Owned(cause),
        fix: Cow::Borrowed(fix),
        evidence: None,
    };
    let lost = "with the request in flight, so the client got nothing";
    match e.dying.as_ref() {
        None if e.ended_by == EndedBy::Exit => Some(owned(
            "worker_died_mid_request",
            format!("the worker exited {lost}; why it exited was not seen"),
            "look for the worker's exit in Gunicorn's log and the kernel log",
        )),
        None | Some(Dying::OomKill) => None,
        Some(Dying::WorkerTimeout {
            signal,
            stall,
            watched_ms,
            timeout_known,
        }) => {
            let what = match (stall, watched_ms) {
                (Some(s), _) => format!("before the kill its {}", stall_words(s)),
                // Nothing to compare the watched time with.
                (None, Some(ms)) if !timeout_known => format!(
                    "no stall was seen in the {} the tracer watched it before the kill; its --timeout is not known, so whether that was the whole timeout window is not known either",
                    secs(*ms)
                ),
                // The tracer came after the window began: what held the
                // worker may predate it.
                (None, Some(ms)) => format!(
                    "no stall was seen in the {} the tracer watched it before the kill, less than its --timeout window: what held it before the tracer attached was not seen",
                    secs(*ms)
                ),
                (None, None) => "no stall was seen before the kill (a stall under the threshold each time, or code the tracer cannot see)".into(),
            };
            Some(owned(
                "worker_timeout_mid_request",
                format!(
                    "Gunicorn's WORKER TIMEOUT killed the worker ({signal} from its master, its heartbeat older than --timeout) {lost}; {what}"
                ),
                "fix what held the worker (the worker_timeout event names the stall), or raise --timeout only for requests known to be long",
            ))
        }
        Some(Dying::GracefulStop {
            signal,
            after_ms,
            killed,
        }) => {
            let end = if *killed {
                "the master's SIGKILL ended it"
            } else {
                "the worker closed it as it stopped"
            };
            Some(owned(
                "graceful_stop_mid_request",
                format!(
                    "the worker was being stopped ({signal} from its master {} before the close: a reload, a scale-down or a shutdown) and the request was still running when Gunicorn's --graceful-timeout ran out: {end}, {lost}",
                    secs(*after_ms)
                ),
                "raise --graceful-timeout above the longest request (and the orchestrator's grace period, such as terminationGracePeriodSeconds, above it), or make long requests shorter",
            ))
        }
        Some(Dying::Exited {
            why,
            pid,
            exit_code,
            signal,
        }) => Some(exited_mid_request(why, *pid, *exit_code, signal.as_deref())),
    }
}

/// A request lost to a worker's exit that was neither an OOM kill, a
/// WORKER TIMEOUT nor a graceful stop: what its exit report says.
fn exited_mid_request(
    why: &ExitReport,
    pid: u32,
    exit_code: Option<i32>,
    signal: Option<&str>,
) -> Cause {
    let lost = "with the request in flight, so the client got nothing";
    let sig = why.cause_signal.as_deref().or(signal).unwrap_or("a signal");
    let (id, cause, fix): (&'static str, String, &'static str) = match (why.cause, &why.sender) {
        (ExitCause::ExternalSignal, Some(s)) if s.pid == pid => (
            "signalled_itself_mid_request",
            format!(
                "the worker ended by {sig} from its own context (a fault the kernel signalled, abort(), or its own kill(); which one was not recorded) {lost}"
            ),
            "find what in the worker raised the signal (Gunicorn's log, a core dump, faulthandler)",
        ),
        (ExitCause::ExternalSignal | ExitCause::MasterSignal, Some(s)) => (
            "killed_mid_request",
            format!(
                "the worker was killed by {sig} from pid {} ({}) {lost}",
                s.pid,
                clean(&s.comm)
            ),
            "find why that process signalled the worker (an operator, a supervisor, a probe)",
        ),
        (ExitCause::ExternalSignal, None) => (
            "killed_mid_request",
            format!("the worker was killed by {sig} (who sent it was not seen) {lost}"),
            "look for the worker's exit in Gunicorn's log and the kernel log",
        ),
        _ => {
            let how = match (exit_code, signal) {
                (Some(c), _) => format!("exited with code {c}"),
                (None, Some(s)) => format!("was killed by {s}"),
                (None, None) => "exited".into(),
            };
            (
                "worker_died_mid_request",
                format!("the worker {how} {lost}"),
                "look for the worker's exit in Gunicorn's log",
            )
        }
    };
    Cause {
        id,
        cause: Cow::Owned(cause),
        fix: Cow::Borrowed(fix),
        evidence: None,
    }
}

/// The cause of an early close, with its master's settings (--keep-alive,
/// and the installed Gunicorn's version when it was read).
pub fn identify_close_with(e: &EarlyClose, settings: &MasterSettings) -> Option<Cause> {
    if let Some(c) = first_match(&CLOSE_SIGNATURES[..1], e) {
        return Some(c);
    }
    if let Some(c) = died_mid_request(e) {
        return Some(c);
    }
    match first_match(CLOSE_SIGNATURES, e) {
        Some(c) if c.id == "leaked_socket_timeout" => (!keepalive_wait(e, settings.keepalive_s))
            .then(|| leaked_cause(settings.gunicorn_version)),
        other => other,
    }
}

/// [`identify_close_with`] under Gunicorn's defaults, its version unknown.
pub fn identify_close(e: &EarlyClose) -> Option<Cause> {
    identify_close_with(e, &MasterSettings::default())
}

/// The cause of a stall from all its report holds. A wait on one lock
/// since before the first heartbeat is judged by its timing first; then a
/// frame of the stalled thread's Python stack, when one names a known
/// library (it wins over a port or an fd's shape); then the kernel's
/// evidence alone, said as inferred. Called again when the stack arrives
/// after the stall was reported.
pub fn identify(s: &StallReport) -> Option<Cause> {
    let (boot, rest) = FIRST.split_at(2);
    if let Some(c) = first_match(boot, s) {
        return Some(inferred(c));
    }
    if let Some(c) = super::frames::identify(s) {
        return Some(c);
    }
    // A 4-byte pipe read is multiprocessing.Queue.get() only by its shape:
    // with the Python code around it known, only its frame says so.
    let guess = |sig: &&Signature<StallReport>| {
        !(sig.id == "multiprocessing_queue_gevent" && super::frames::stack_known(s))
    };
    first_match(rest.iter().filter(guess), s)
        .or_else(|| waits_on_service(s))
        .or_else(|| first_match(SIGNATURES, s))
        .map(inferred)
}

fn inferred(c: Cause) -> Cause {
    Cause {
        evidence: Some(CauseEvidence::inferred()),
        ..c
    }
}

/// A well-known server port, what blocks on it, and the fixes.
pub struct Service {
    pub port: u16,
    pub id: &'static str,
    pub name: &'static str,
    /// The client that, under gevent, blocks the hub on this server.
    pub gevent_client: &'static str,
    pub gevent_fix: &'static str,
    pub asyncio_fix: &'static str,
}

pub static SERVICES: &[Service] = &[
    Service {
        port: 5432,
        id: "postgresql_wait",
        name: "PostgreSQL",
        gevent_client: "a database driver that gevent does not patch (psycopg2 without psycogreen)",
        gevent_fix: "call psycogreen.gevent.patch_psycopg() in a post_fork hook, or use psycopg 3, which gevent's monkey-patching makes cooperative",
        asyncio_fix: "use an async driver (asyncpg, or psycopg 3's AsyncConnection), or run the call in a thread (asyncio.to_thread)",
    },
    Service {
        port: 3306,
        id: "mysql_wait",
        name: "MySQL",
        gevent_client: "a C driver that gevent does not patch (mysqlclient/MySQLdb)",
        gevent_fix: "use PyMySQL, which gevent's monkey-patching makes cooperative, or run the query in gevent's threadpool",
        asyncio_fix: "use an async driver (aiomysql, asyncmy), or run the call in a thread (asyncio.to_thread)",
    },
    Service {
        port: 6379,
        id: "redis_wait",
        name: "Redis",
        gevent_client: "a Redis client whose socket gevent does not own (created before monkey-patching, or a C client)",
        gevent_fix: "monkey-patch before importing redis, and create clients in the worker after the fork",
        asyncio_fix: "use redis.asyncio, or run the call in a thread (asyncio.to_thread)",
    },
    Service {
        port: 11211,
        id: "memcached_wait",
        name: "memcached",
        gevent_client: "a C client that gevent does not patch (pylibmc)",
        gevent_fix: "use pymemcache, which gevent's monkey-patching makes cooperative",
        asyncio_fix: "use an async client (aiomcache), or run the call in a thread (asyncio.to_thread)",
    },
    Service {
        port: 5672,
        id: "amqp_wait",
        name: "AMQP (RabbitMQ)",
        gevent_client: "a C client that gevent does not patch (librabbitmq)",
        gevent_fix: "use pika or kombu's pure-Python transport",
        asyncio_fix: "use aio-pika, or run the call in a thread (asyncio.to_thread)",
    },
    Service {
        port: 9092,
        id: "kafka_wait",
        name: "Kafka",
        gevent_client: "confluent-kafka (librdkafka) blocking in flush() or poll()",
        gevent_fix: "call flush()/poll() with timeout=0 from a greenlet loop, or use kafka-python",
        asyncio_fix: "use aiokafka, or run the call in a thread (asyncio.to_thread)",
    },
    Service {
        port: 27017,
        id: "mongodb_wait",
        name: "MongoDB",
        gevent_client: "a MongoDB client whose sockets gevent does not own (created before monkey-patching)",
        gevent_fix: "monkey-patch before importing pymongo, and create the client in the worker after the fork",
        asyncio_fix: "use an async client (pymongo's AsyncMongoClient, motor), or run the call in a thread (asyncio.to_thread)",
    },
    Service {
        port: 443,
        id: "https_wait",
        name: "HTTPS",
        gevent_client: "an HTTP client that gevent does not patch (pycurl, or a socket created before monkey-patching)",
        gevent_fix: "monkey-patch before importing the client, use requests/urllib3 with a timeout, or run the call in gevent's threadpool",
        asyncio_fix: "use an async client (httpx.AsyncClient, aiohttp), or run the call in a thread (asyncio.to_thread)",
    },
    Service {
        port: 80,
        id: "http_wait",
        name: "HTTP",
        gevent_client: "an HTTP client that gevent does not patch (pycurl, or a socket created before monkey-patching)",
        gevent_fix: "monkey-patch before importing the client, use requests/urllib3 with a timeout, or run the call in gevent's threadpool",
        asyncio_fix: "use an async client (httpx.AsyncClient, aiohttp), or run the call in a thread (asyncio.to_thread)",
    },
];

/// The server a stall waits on, when it listens on a well-known port: the
/// cause names the peer, and the fix fits how the worker runs requests.
fn waits_on_service(s: &StallReport) -> Option<Cause> {
    let (fd, svc) = s.wait_fds.iter().find_map(|w| {
        let port = w.peer_port()?;
        SERVICES
            .iter()
            .find(|svc| svc.port == port)
            .map(|svc| (w, svc))
    })?;
    let peer = fd.peer.as_deref().unwrap_or("?");
    let call = s.syscall_name();
    let waiting = format!(
        "waiting for a reply from {peer} ({} port) in {call}()",
        svc.name
    );
    let timeouts = "set the client's connect and query timeouts below Gunicorn's --timeout (and the proxy's), and check the server";
    let (cause, fix): (String, Cow<'static, str>) = match flavor(s) {
        _ if !s.on_loop_thread() => (
            format!(
                "{waiting}: a slow or unreachable {} server holds this thread and the request it serves",
                svc.name
            ),
            Cow::Borrowed(timeouts),
        ),
        Flavor::Gevent => (
            format!(
                "{waiting}: {}; the whole worker waits with it",
                svc.gevent_client
            ),
            Cow::Borrowed(svc.gevent_fix),
        ),
        Flavor::Unknown => (
            format!(
                "{waiting}: a slow or unreachable {} server holds the worker's loop thread (the worker class is not known, so neither is how many other requests wait with it)",
                svc.name
            ),
            Cow::Borrowed(timeouts),
        ),
        Flavor::Asyncio => (
            format!(
                "{waiting}: a synchronous {} client in an async handler blocks the event loop",
                svc.name
            ),
            Cow::Borrowed(svc.asyncio_fix),
        ),
        Flavor::Sync | Flavor::Threads => (
            format!(
                "{waiting}: a slow or unreachable {} server holds the worker, which serves one request at a time",
                svc.name
            ),
            Cow::Borrowed(timeouts),
        ),
    };
    Some(Cause {
        id: svc.id,
        cause: Cow::Owned(cause),
        fix,
        evidence: None,
    })
}
