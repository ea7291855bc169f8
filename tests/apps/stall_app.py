"""A WSGI app with one stall per endpoint, for every worker class
(sync, gthread, gevent). Query strings: secs=N, host=H, port=P.

    /          answers at once
    /pipe      read() on a pipe a forked child writes to after `secs`: under
               gevent the whole worker blocks (the seed's bug, bounded)
    /forever   read() on a pipe nobody will write to: the thread blocks for good
    /db        a database client's wait: connect to host:port with a socket
               gevent does not patch, send a query, then wait up to `secs`
               for the reply in poll() (as libpq under psycopg2 does)
    /spin      compute for `secs` without a syscall
    /chatty    for `secs`, one 50 ms database wait after another on host:port
               (as /db, each timing out): no single call is long, and the
               loop never runs in between
    /hold      open a connection to 127.0.0.1:port, exchange a message,
               and keep it (an upstream connection pooled across requests)
    /release   close the connections /hold opened
    /pool      run one task in the worker's ProcessPoolExecutor (made on
               first use) and answer: its child then waits for the next
               task in read() on the call queue's pipe, idle

If STALL_PID_FILE is set, a stall endpoint first appends "pid tid" to it,
so a test knows which worker, and which thread, took the request.
"""
import os
import sys
import socket
import threading
import time
from urllib.parse import parse_qs


def unpatched_socket():
    """The socket class gevent's monkey-patching left alone, if it ran."""
    try:
        from gevent import monkey

        if monkey.is_module_patched("socket"):
            return monkey.get_original("socket", "socket")
    except ImportError:
        pass
    return socket.socket


def real_sleep(secs):
    """time.sleep as the OS does it: in a forked gevent child the patched
    one would run the worker's greenlets, whose parent check exits it."""
    try:
        from gevent import monkey

        if monkey.is_module_patched("time"):
            return monkey.get_original("time", "sleep")(secs)
    except ImportError:
        pass
    return time.sleep(secs)


def note_worker():
    path = os.environ.get("STALL_PID_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {threading.get_native_id()}\n")


def pipe_read(secs):
    r, w = os.pipe()
    if secs is not None and os.fork() == 0:
        os.close(r)
        real_sleep(secs)
        os.write(w, b"x")
        os._exit(0)
    try:
        return os.read(r, 1)
    finally:
        os.close(r)
        os.close(w)


def query_database(host, port, secs):
    s = unpatched_socket()(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.connect((host, port))
        s.sendall(b"SELECT 1;\n")
        s.settimeout(secs)
        return s.recv(1024)
    except socket.timeout:
        return b"timed out"
    finally:
        s.close()


POOL = None
HELD = []


def run_in_pool():
    global POOL
    if POOL is None:
        import concurrent.futures
        import multiprocessing

        POOL = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("fork")
        )
    return POOL.submit(os.getpid).result()


def deep(depth, secs):
    # A frame chain `depth` deep (for the stack reader's bounds), then the
    # same pipe read as /pipe at its bottom.
    if depth <= 0:
        return pipe_read(secs)
    return deep(depth - 1, secs)


def park_threads(n, secs):
    # n real threads parked in a lock (sync workers: threading is not
    # patched there), then the pipe read on the worker's own thread.
    gate = threading.Lock()
    gate.acquire()
    threads = [threading.Thread(target=gate.acquire, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        return pipe_read(secs)
    finally:
        gate.release()


def spin(secs):
    end = time.time() + secs
    n = 0
    while time.time() < end:
        n += 1
    return n


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    secs = float(q.get("secs", "5"))
    if path != "/":
        note_worker()
    if path == "/pipe":
        body = b"read %r\n" % pipe_read(secs)
    elif path == "/forever":
        body = b"read %r\n" % pipe_read(None)
    elif path == "/db":
        body = b"db %r\n" % query_database(q.get("host", "127.0.0.1"), int(q["port"]), secs)
    elif path == "/chatty":
        end = time.time() + secs
        n = 0
        while time.time() < end:
            query_database(q.get("host", "127.0.0.1"), int(q["port"]), 0.05)
            n += 1
        body = b"queried %d times\n" % n
    elif path == "/hold":
        c = socket.create_connection(("127.0.0.1", int(q["port"])))
        c.sendall(b"ping\n")
        c.recv(64)
        HELD.append(c)
        body = b"held %d\n" % len(HELD)
    elif path == "/release":
        while HELD:
            HELD.pop().close()
        body = b"released\n"
    elif path == "/pool":
        body = b"pool child %d\n" % run_in_pool()
    elif path == "/deep":
        sys.setrecursionlimit(20000)
        body = b"read %r\n" % deep(int(q["depth"]), secs)
    elif path == "/threads":
        body = b"read %r\n" % park_threads(int(q["n"]), secs)
    elif path == "/spin":
        body = b"spun %d\n" % spin(secs)
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
