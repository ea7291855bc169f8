//! Known causes, as data: each signature is a predicate on a stall and the
//! sentence a person needs. Adding one is adding an entry to `SIGNATURES`
//! (or, for a server a stall waits on, to `SERVICES`).
use std::borrow::Cow;

use crate::model::{
    Cause, CloseKind, Direction, EarlyClose, EndedBy, FdKind, NoWriterThread, StallReport,
    StallState, no_other_writer,
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
            cause: Cow::Borrowed(sig.cause),
            fix: Cow::Borrowed(sig.fix),
        })
}

/// How a worker class runs requests: what a blocked loop thread means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// gevent or eventlet: greenlets on one hub.
    Gevent,
    /// An asyncio loop (Uvicorn's worker).
    Asyncio,
    /// One request at a time (Gunicorn's default).
    Sync,
    /// A thread pool behind a poller (gthread).
    Threads,
    /// The command line did not say; as before, judged like gevent.
    Unknown,
}

fn flavor(s: &StallReport) -> Flavor {
    match s.worker_class.as_deref() {
        Some("gevent" | "eventlet" | "gevent_wsgi" | "gevent_pywsgi") => Flavor::Gevent,
        Some("uvicorn" | "tornado") => Flavor::Asyncio,
        Some("sync") => Flavor::Sync,
        Some("gthread") => Flavor::Threads,
        _ => Flavor::Unknown,
    }
}

/// The stall blocks a greenlet hub (or a loop not known to be anything else).
fn gevent_loop(s: &StallReport) -> bool {
    s.on_loop_thread() && matches!(flavor(s), Flavor::Gevent | Flavor::Unknown)
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
    matches!(s.syscall_name(), "nanosleep" | "clock_nanosleep")
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
        fix: "move CPU-heavy work out of the worker (a process pool or a task queue), or yield in long loops (gevent.sleep(0)); with --py-stack the stack names the line",
        matches: |s| s.state == StallState::OnCpu && gevent_loop(s),
    },
    Signature {
        id: "cpu_bound_coroutine",
        cause: "the asyncio loop's thread has kept the CPU without awaiting (CPU-bound code in an async handler): no other request is served meanwhile, and the heartbeat stops",
        fix: "run CPU-heavy work in a process pool (loop.run_in_executor with a ProcessPoolExecutor) or a task queue; with --py-stack the stack names the line",
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
        fix: "make the calls cooperative (monkey-patch the client before importing it, or use a gevent-aware driver), batch them, or move the work out of the worker; with --py-stack the stack names the line",
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
        matches: |s| gevent_loop(s) && is_multiplexer(s),
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
    first_match(FIRST, s)
        .or_else(|| waits_on_service(s))
        .or_else(|| first_match(SIGNATURES, s))
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
        Flavor::Gevent | Flavor::Unknown => (
            format!(
                "{waiting}: {}; the whole worker waits with it",
                svc.gevent_client
            ),
            Cow::Borrowed(svc.gevent_fix),
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{End, Peer, Preceded, Role};

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
            syscall: Some(syscall.into()),
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
        let mut s = stall("read", FdKind::Pipe, Some(4), vec![peer(10, End::Write)]);
        s.worker_class = Some("gevent".into());
        assert_eq!(id(&s), Some("multiprocessing_queue_gevent"));
        // The class not known: its feeder may be a real thread, which can
        // write; the claim needs gevent.
        let mut unknown = s.clone();
        unknown.worker_class = None;
        assert_ne!(id(&unknown), Some("multiprocessing_queue_gevent"));
        // Another process could write: not this bug.
        let mut s = stall(
            "read",
            FdKind::Pipe,
            Some(4),
            vec![peer(10, End::Write), peer(11, End::Write)],
        );
        s.worker_class = Some("gevent".into());
        assert_eq!(id(&s), None);
    }

    fn cause(s: &StallReport) -> String {
        identify(s)
            .map(|c| c.cause.into_owned())
            .unwrap_or_default()
    }

    #[test]
    fn a_self_pipe_read_never_returns_only_when_no_other_thread_can_write_it() {
        let pipe = || {
            stall(
                "read",
                FdKind::Pipe,
                Some(65536),
                vec![peer(10, End::Write)],
            )
        };
        // A sync worker whose thread count is not known: another OS thread
        // of the process may hold the write end and write it.
        let mut sync = pipe();
        sync.worker_class = Some("sync".into());
        assert!(!cause(&sync).contains("never"), "{}", cause(&sync));
        assert!(
            cause(&sync).contains(
                "a pipe only this process writes to; another of its threads must write it"
            ),
            "{}",
            cause(&sync)
        );
        // A pool thread of a gthread worker, even with gevent-like reads.
        let mut pool = pipe();
        pool.worker_class = Some("gthread".into());
        pool.tid = 11;
        assert!(!cause(&pool).contains("never"), "{}", cause(&pool));
        // The class unknown and 4 bytes asked: no "never" either.
        let mut unknown = stall("read", FdKind::Pipe, Some(4), vec![peer(10, End::Write)]);
        unknown.worker_class = None;
        assert!(!cause(&unknown).contains("never"), "{}", cause(&unknown));
        // gevent, on the hub's thread: the writer is a greenlet of the
        // blocked hub.
        let mut gevent = pipe();
        gevent.worker_class = Some("gevent".into());
        assert_eq!(id(&gevent), Some("self_pipe_read"));
        assert!(
            cause(&gevent).contains("can never return"),
            "{}",
            cause(&gevent)
        );
        // A gevent worker's other OS thread: other threads may write.
        let mut gevent_pool = gevent.clone();
        gevent_pool.tid = 11;
        assert!(
            !cause(&gevent_pool).contains("never"),
            "{}",
            cause(&gevent_pool)
        );
        // One thread in the whole process: nothing else can write it.
        let mut alone = sync.clone();
        alone.threads = Some(1);
        assert_eq!(id(&alone), Some("self_pipe_read"));
        assert!(
            cause(&alone).contains("can never return"),
            "{}",
            cause(&alone)
        );
        let mut two = sync.clone();
        two.threads = Some(2);
        assert!(!cause(&two).contains("never"), "{}", cause(&two));
    }

    #[test]
    fn a_futex_before_the_first_heartbeat_is_a_deadlock_only_once_it_outlasts_a_boot() {
        let mut s = stall("futex", FdKind::Unknown, None, vec![]);
        s.never_heartbeated = Some(true);
        s.gunicorn_timeout_s = Some(30.0);
        // Reported at the threshold: a slow boot waits on locks too.
        s.blocked_ms = 500;
        assert_ne!(id(&s), Some("deadlocked_since_fork"));
        assert!(!cause(&s).contains("deadlocked"), "{}", cause(&s));
        assert!(
            cause(&s).contains("waiting on a lock since before its first heartbeat"),
            "{}",
            cause(&s)
        );
        // Still waiting past Gunicorn's --timeout: no boot is allowed that.
        s.blocked_ms = 31_000;
        assert_eq!(id(&s), Some("deadlocked_since_fork"));
        // --timeout unknown: ten seconds are not evidence enough...
        s.gunicorn_timeout_s = None;
        s.blocked_ms = 10_000;
        assert_ne!(id(&s), Some("deadlocked_since_fork"));
        // ...past Gunicorn's default of 30 s they are.
        s.blocked_ms = 30_000;
        assert_eq!(id(&s), Some("deadlocked_since_fork"));
        // A short --timeout still leaves a boot its ten seconds.
        s.gunicorn_timeout_s = Some(2.0);
        s.blocked_ms = 3_000;
        assert_ne!(id(&s), Some("deadlocked_since_fork"));
        // A worker that heartbeated is not in its boot.
        s.blocked_ms = 60_000;
        s.never_heartbeated = Some(false);
        assert_ne!(id(&s), Some("deadlocked_since_fork"));
    }

    #[test]
    fn generic_self_pipe_signature() {
        let mut s = stall("read", FdKind::Pipe, Some(65536), vec![peer(10, End::Both)]);
        s.threads = Some(1);
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
