"""An ASGI app for Uvicorn's worker (uvicorn_worker.UvicornWorker): `/`
answers at once; `/sleep?secs=N` calls time.sleep in the async handler, the
classic blocking call that stops the asyncio loop (and its heartbeat);
`/spin?secs=N` computes for N seconds in the async handler without awaiting
(and without a syscall: time.time is a vDSO call), keeping the loop on the
CPU. If STALL_PID_FILE is set, /sleep and /spin first append "pid tid" to it."""
import os
import threading
import time
from urllib.parse import parse_qs


def spin(secs):
    end = time.time() + secs
    n = 0
    while time.time() < end:
        n += 1
    return n


def note_worker():
    path = os.environ.get("STALL_PID_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {threading.get_native_id()}\n")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b"ok\n"
    q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if scope["path"] == "/sleep":
        note_worker()
        time.sleep(float(q.get("secs", "5")))
        body = b"slept\n"
    elif scope["path"] == "/spin":
        note_worker()
        body = b"spun %d\n" % spin(float(q.get("secs", "5")))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
