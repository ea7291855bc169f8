"""A WSGI app with the bug from the article's first lesson.

GET /hang uses multiprocessing.Queue inside a request. Under Gunicorn's gevent
worker (which monkey-patches threads), the queue's feeder thread is a greenlet
that cannot run while the request blocks the hub, so q.get() waits forever in
read(pipe, 4) and Gunicorn eventually logs WORKER TIMEOUT and kills the worker.

GET / answers normally. If HANG_PID_FILE is set, /hang appends the worker's
pid to it before blocking, so a test knows which worker took the request.
"""
import multiprocessing
import os


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/hang":
        pid_file = os.environ.get("HANG_PID_FILE")
        if pid_file:
            with open(pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")
        q = multiprocessing.Queue()
        q.put("job")
        item = q.get()  # never returns under gevent
        body = f"got {item}\n".encode()
    elif path == "/pid":
        body = f"{os.getpid()}\n".encode()
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
