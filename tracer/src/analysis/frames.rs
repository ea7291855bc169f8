//! Causes from the stalled thread's Python stack: a frame of a known
//! library (its package and function) names what the thread waits on,
//! whatever port or fd it waits on; the kernel's evidence must agree (a
//! Redis frame names a socket wait, never a sleep). Pure: the report (its
//! `py_stack` included) in, a cause citing its frame out.
use std::borrow::Cow;

use super::signatures::{Flavor, flavor, only_self_writes};
use crate::model::{
    Basis, Cause, CauseEvidence, CitedFrame, FdKind, PyFrame, StallReport, StallState,
};

/// A frame as the cause text cites it: `multiprocessing/queues.py:103 in
/// Queue.get` (a library's file from its package, the app's in full).
pub fn cite(f: &PyFrame) -> String {
    let line = match f.line {
        Some(l) => format!(":{l}"),
        None => " (line unknown)".into(),
    };
    format!("{}{line} in {}", f.short_file(), f.function)
}

/// The frame's package path (`psycopg2/extras.py`, `socket.py`) when it is
/// a library's; None for the application's own code.
fn package_file(f: &PyFrame) -> Option<&str> {
    f.is_library().then(|| f.short_file())
}

/// The top-level package or module of a library frame: `psycopg2`,
/// `socket`, `multiprocessing`.
fn package(f: &PyFrame) -> Option<&str> {
    let file = package_file(f)?;
    let top = file.split('/').next().unwrap_or(file);
    Some(top.strip_suffix(".py").unwrap_or(top))
}

/// The function's own name (`get` for `Queue.get`; 3.9 and 3.10 give only
/// that).
fn function(f: &PyFrame) -> &str {
    f.function.rsplit('.').next().unwrap_or(&f.function)
}

/// A wait on a socket: the call's fd is one, or a multiplexer's set holds one.
fn socket_wait(s: &StallReport) -> bool {
    s.state == StallState::Blocked
        && (s.fd_kind == FdKind::Socket || s.wait_fds.iter().any(|w| w.kind == FdKind::Socket))
}

fn is_futex(s: &StallReport) -> bool {
    s.state == StallState::Blocked && s.syscall_name().starts_with("futex")
}

fn is_sleep(s: &StallReport) -> bool {
    s.is_sleep()
}

/// The socket peer the call waits on, when one was read.
fn peer(s: &StallReport) -> Option<&str> {
    s.wait_fds
        .iter()
        .filter(|w| w.kind == FdKind::Socket)
        .find_map(|w| w.peer.as_deref())
}

/// " from 10.0.0.5:5432", or " (its address was not read)".
fn from_peer(s: &StallReport) -> String {
    match peer(s) {
        Some(p) => format!(" from {p}"),
        None => " (the server's address was not read)".into(),
    }
}

/// A library whose frame names a stall, and the wait it is consistent with.
struct FrameSig {
    id: &'static str,
    /// The frame: its package and function.
    frame: fn(&PyFrame) -> bool,
    /// The kernel's view of the wait that the frame explains.
    wait: fn(&StallReport) -> bool,
    /// The cause (the frame cited as `at`) and the fix.
    words: fn(&StallReport, &str) -> (String, Cow<'static, str>),
}

/// Fixes for a client that waits on a server, by how the worker runs
/// requests; `gevent` and `asyncio` name the client's own remedy.
fn client_fix(
    s: &StallReport,
    gevent: &'static str,
    asyncio: &'static str,
) -> (&'static str, Cow<'static, str>) {
    let timeouts = "set the client's connect and read timeouts below Gunicorn's --timeout (and the proxy's), and check the server";
    match flavor(s) {
        _ if !s.on_loop_thread() => (
            "holds this thread and the request it serves",
            Cow::Borrowed(timeouts),
        ),
        Flavor::Gevent => (
            "it blocks the gevent hub, so the whole worker waits with it",
            Cow::Borrowed(gevent),
        ),
        Flavor::Asyncio => (
            "a synchronous client in an async handler blocks the event loop",
            Cow::Borrowed(asyncio),
        ),
        Flavor::Sync | Flavor::Threads => (
            "it holds the worker's thread and the request it serves",
            Cow::Borrowed(timeouts),
        ),
        Flavor::Unknown => (
            "it holds the worker's loop thread (the worker class is not known, so neither is how many other requests wait with it)",
            Cow::Borrowed(timeouts),
        ),
    }
}

/// Known libraries, innermost-first matching: the first frame (from the
/// innermost) that one of these names and whose wait agrees is the cause.
static FRAME_SIGNATURES: &[FrameSig] = &[
    FrameSig {
        id: "dns_lookup",
        frame: |f| function(f) == "getaddrinfo" && matches!(package(f), Some("socket" | "gevent")),
        wait: |s| s.state == StallState::Blocked,
        words: |s, at| {
            let resolver = match peer(s) {
                Some(p) => format!("waiting on the resolver {p}"),
                None => "the resolver's address was not read (no socket peer in the wait)".into(),
            };
            let (effect, fix) = client_fix(
                s,
                "use gevent's resolver (GEVENT_RESOLVER=ares or dnspython), cache the address, or fix the resolver",
                "resolve with loop.getaddrinfo (it runs in a thread), cache the address, or fix the resolver",
            );
            (
                format!("a DNS lookup (socket.getaddrinfo, at {at}), {resolver}: {effect}"),
                match flavor(s) {
                    Flavor::Gevent | Flavor::Asyncio if s.on_loop_thread() => fix,
                    _ => Cow::Borrowed(
                        "check the resolver (/etc/resolv.conf's servers and their timeout), cache the address, or set a lower resolver timeout (options timeout:1 attempts:1)",
                    ),
                },
            )
        },
    },
    FrameSig {
        id: "psycopg2_wait",
        frame: |f| package(f) == Some("psycopg2"),
        wait: socket_wait,
        words: |s, at| {
            let (effect, fix) = client_fix(
                s,
                "call psycogreen.gevent.patch_psycopg() in a post_fork hook, or use psycopg 3, which gevent's monkey-patching makes cooperative",
                "use an async driver (asyncpg, or psycopg 3's AsyncConnection), or run the call in a thread (asyncio.to_thread)",
            );
            (
                format!(
                    "psycopg2 (libpq) waiting for PostgreSQL{} at {at}: {effect}",
                    from_peer(s)
                ),
                fix,
            )
        },
    },
    FrameSig {
        id: "redis_wait",
        frame: |f| package(f) == Some("redis"),
        wait: socket_wait,
        words: |s, at| {
            let (effect, fix) = client_fix(
                s,
                "monkey-patch before importing redis, and create clients in the worker after the fork",
                "use redis.asyncio, or run the call in a thread (asyncio.to_thread)",
            );
            (
                format!(
                    "redis-py waiting for a reply{} at {at}: {effect}",
                    from_peer(s)
                ),
                fix,
            )
        },
    },
    FrameSig {
        id: "pymysql_wait",
        frame: |f| package(f) == Some("pymysql"),
        wait: socket_wait,
        words: |s, at| {
            let (effect, fix) = client_fix(
                s,
                "monkey-patch before importing pymysql and connect in the worker after the fork (its socket is then gevent's)",
                "use an async driver (aiomysql, asyncmy), or run the call in a thread (asyncio.to_thread)",
            );
            (
                format!(
                    "PyMySQL waiting for MySQL{} at {at}: {effect}",
                    from_peer(s)
                ),
                fix,
            )
        },
    },
    FrameSig {
        id: "grpc_wait",
        frame: |f| package(f) == Some("grpc"),
        // gRPC's C core waits in its own poller or on a condition variable.
        wait: |s| {
            socket_wait(s) || is_futex(s) || super::syscalls::is_multiplexer(s.syscall_name())
        },
        words: |s, at| {
            let (effect, fix) = client_fix(
                s,
                "gevent does not make gRPC's C core cooperative: call grpc.experimental.gevent.init_gevent() at start-up, or run calls in gevent's threadpool",
                "use grpc.aio, or run the call in a thread (asyncio.to_thread)",
            );
            (
                format!(
                    "a gRPC call waiting for its reply at {at}: {effect}; set a deadline (timeout=) on the call"
                ),
                fix,
            )
        },
    },
    FrameSig {
        id: "http_client_wait",
        frame: |f| matches!(package(f), Some("urllib3" | "requests")),
        wait: socket_wait,
        words: |s, at| {
            let (effect, fix) = client_fix(
                s,
                "monkey-patch before importing requests/urllib3, and pass timeout= to every request",
                "use an async client (httpx.AsyncClient, aiohttp), or run the call in a thread (asyncio.to_thread)",
            );
            (
                format!(
                    "an HTTP request (urllib3/requests) waiting for its reply{} at {at}: {effect}; requests has no timeout unless one is passed",
                    from_peer(s)
                ),
                fix,
            )
        },
    },
    FrameSig {
        id: "multiprocessing_queue_gevent",
        frame: mp_queue_get,
        // The feeder is a greenlet of the blocked hub, and no other process
        // holds the pipe's write end: nothing can ever write it.
        wait: |s| {
            s.state == StallState::Blocked
                && flavor(s) == Flavor::Gevent
                && s.on_loop_thread()
                && only_self_writes(s)
        },
        words: |_, at| {
            (
                format!(
                    "multiprocessing.Queue.get() at {at} in a gevent worker: the queue's feeder thread is a greenlet that cannot run while the hub is blocked, and no other process holds the pipe's write end, so the read never returns"
                ),
                Cow::Borrowed(
                    "use gevent.queue.Queue or queue.Queue, call get(timeout=...), or move the work out of the worker process",
                ),
            )
        },
    },
    FrameSig {
        id: "multiprocessing_queue_wait",
        frame: mp_queue_get,
        wait: |s| s.state == StallState::Blocked,
        words: |_, at| {
            (
                format!(
                    "multiprocessing.Queue.get() at {at} waits for an item that its producer (another process, or this one's feeder thread) has not put"
                ),
                Cow::Borrowed(
                    "find why the producer has not put (is it running? py-spy dump --pid shows it), and call get(timeout=...)",
                ),
            )
        },
    },
    FrameSig {
        id: "thread_lock_wait",
        frame: |f| {
            matches!(
                (package(f), function(f)),
                (
                    Some("threading"),
                    "wait" | "acquire" | "join" | "_wait_for_tstate_lock"
                ) | (Some("queue"), "get" | "put")
                    | (Some("concurrent"), "result" | "wait")
            )
        },
        wait: is_futex,
        words: lock_words,
    },
];

fn mp_queue_get(f: &PyFrame) -> bool {
    package_file(f) == Some("multiprocessing/queues.py") && function(f) == "get"
}

fn lock_words(s: &StallReport, at: &str) -> (String, Cow<'static, str>) {
    let what = format!("waiting on a lock or condition (threading) at {at}");
    match flavor(s) {
        Flavor::Gevent if s.on_loop_thread() => (
            format!(
                "{what}: on the gevent hub's thread this is a real OS lock (created before monkey-patching, or held by a C extension's thread), so the whole worker waits"
            ),
            Cow::Borrowed(
                "create locks after monkey-patching, and never block the hub on an OS thread; --py-stack all-threads shows which thread holds it",
            ),
        ),
        Flavor::Asyncio if s.on_loop_thread() => (
            format!("{what}: a blocking lock in an async handler blocks the event loop"),
            Cow::Borrowed(
                "use asyncio.Lock, or run the blocking call in a thread (asyncio.to_thread)",
            ),
        ),
        _ => (
            format!("{what}: another thread holds it, or has not signalled"),
            Cow::Borrowed(
                "find the thread that holds it (--py-stack all-threads shows every thread), and give the wait a timeout",
            ),
        ),
    }
}

/// The stack's innermost frame called something that runs no Python code
/// (a C function: `time.sleep`, `Lock.acquire`): what the kernel sees it
/// wait in names the call, and the frame says where it was made.
fn caller_of_c(s: &StallReport, at: &str) -> Option<(&'static str, String, Cow<'static, str>)> {
    if is_sleep(s) {
        let (effect, fix) = match flavor(s) {
            Flavor::Gevent if s.on_loop_thread() => (
                "a sleep gevent did not patch (time.sleep imported before monkey-patching, or C code sleeping) blocks the whole worker",
                "monkey-patch before any other import, or use gevent.sleep",
            ),
            Flavor::Asyncio if s.on_loop_thread() => (
                "a blocking sleep in an async handler blocks the event loop",
                "await asyncio.sleep instead",
            ),
            _ => (
                "the request sleeps, holding its thread",
                "remove the sleep from request code, or bound it well under Gunicorn's --timeout",
            ),
        };
        return Some((
            "time_sleep",
            format!("a sleep (time.sleep or a C sleep) called at {at}: {effect}"),
            Cow::Borrowed(fix),
        ));
    }
    if is_futex(s) {
        let (_, fix) = lock_words(s, at);
        return Some((
            "thread_lock_wait",
            format!(
                "waiting on a lock (threading.Lock.acquire, RLock, or a lock inside a C extension) called at {at}: another thread holds it, or has not signalled"
            ),
            fix,
        ));
    }
    None
}

/// The cause the stack names, citing its frame; None when no stack was read,
/// it is empty, or no frame of it is a known library's whose wait agrees.
pub fn identify(s: &StallReport) -> Option<Cause> {
    let frames = s.py_stack.as_deref().filter(|f| !f.is_empty())?;
    let found = frames.iter().enumerate().find_map(|(i, f)| {
        FRAME_SIGNATURES
            .iter()
            .find(|sig| (sig.frame)(f) && (sig.wait)(s))
            .map(|sig| {
                let (cause, fix) = (sig.words)(s, &cite(f));
                (i, sig.id, cause, fix)
            })
    });
    let (index, id, cause, fix) = match found {
        Some(m) => m,
        None => {
            let (id, cause, fix) = caller_of_c(s, &cite(&frames[0]))?;
            (0, id, cause, fix)
        }
    };
    let called_from = frames
        .iter()
        .enumerate()
        .skip(index + 1)
        .find(|(_, f)| !f.is_library())
        .filter(|_| frames[index].is_library())
        .map(|(i, f)| cited(i, f));
    let cause = match &called_from {
        Some(c) => format!(
            "{cause} (called from the app at {})",
            cite(&frames[c.index])
        ),
        None => cause,
    };
    Some(Cause {
        id,
        cause: Cow::Owned(cause),
        fix,
        evidence: Some(CauseEvidence {
            basis: Basis::Frame,
            frame: Some(cited(index, &frames[index])),
            called_from,
        }),
    })
}

fn cited(index: usize, f: &PyFrame) -> CitedFrame {
    CitedFrame {
        index,
        function: f.function.clone(),
        file: f.file.clone(),
        line: f.line,
    }
}

/// A stack was read and holds frames: the Python code around the wait is
/// known, so a cause guessed from the wait's shape alone that names Python
/// code (a 4-byte pipe read as `multiprocessing.Queue.get()`) is not said
/// unless a frame shows it.
pub fn stack_known(s: &StallReport) -> bool {
    s.py_stack.as_ref().is_some_and(|f| !f.is_empty())
}
