"""An ASGI app for Uvicorn's worker (uvicorn_worker.UvicornWorker): `/`
answers at once; `/sleep?secs=N` calls time.sleep in the async handler, the
classic blocking call that stops the asyncio loop (and its heartbeat).
If STALL_PID_FILE is set, /sleep first appends "pid tid" to it."""
import os
import threading
import time
from urllib.parse import parse_qs


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b"ok\n"
    if scope["path"] == "/sleep":
        path = os.environ.get("STALL_PID_FILE")
        if path:
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {threading.get_native_id()}\n")
        q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        time.sleep(float(q.get("secs", "5")))
        body = b"slept\n"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
