"""A WSGI app for the tests of worker exits and lost requests.

GET /            answers "ok"
GET /pid         answers the worker's pid
GET /slow?s=N    sleeps N seconds (default 1), then answers
GET /alloc?mb=N  allocates and touches N MiB, holds them 0.5 s, answers:
                 in a memory cgroup with a smaller limit the kernel's OOM
                 killer kills the worker mid-request
GET /stuck?s=N   blocks SIGABRT in the worker (as some C extensions do),
                 then sleeps N seconds (default 30): Gunicorn's WORKER
                 TIMEOUT sends SIGABRT, which stays pending, then SIGKILL
GET /block?s=N   the request thread blocks in os.read() on a pipe that a
                 timer thread writes to after N seconds (default 8), then
                 answers: under -k gthread the main thread keeps the
                 heartbeat, so Gunicorn never kills the worker

If PID_FILE is set, /slow, /alloc, /stuck and /block append the worker's pid to it before
they start, so a test knows which worker took the request.
"""
import os
import signal
import threading
import time
from urllib.parse import parse_qs


def note_pid():
    pid_file = os.environ.get("PID_FILE")
    if pid_file:
        with open(pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")


def arg(environ, name, default):
    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    return float(values[0]) if values else default


def allocate(mb):
    held = []
    for _ in range(int(mb) // 8):
        held.append(b"\x01" * (8 << 20))  # written, so charged to the cgroup
    time.sleep(0.5)
    return len(held) * 8


def block_on_pipe(seconds):
    r, w = os.pipe()
    timer = threading.Timer(seconds, os.write, (w, b"x"))
    timer.start()
    os.read(r, 1)
    os.close(r)
    os.close(w)


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/pid":
        body = f"{os.getpid()}\n".encode()
    elif path == "/slow":
        note_pid()
        time.sleep(arg(environ, "s", 1.0))
        body = b"slow\n"
    elif path == "/alloc":
        note_pid()
        body = f"allocated {allocate(arg(environ, 'mb', 64))} MiB\n".encode()
    elif path == "/stuck":
        note_pid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGABRT})
        time.sleep(arg(environ, "s", 30.0))
        body = b"unstuck\n"
    elif path == "/block":
        note_pid()
        block_on_pipe(arg(environ, "s", 8.0))
        body = b"unblocked\n"
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
