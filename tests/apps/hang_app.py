"""A WSGI app with the bug from the article's first lesson.

GET /hang uses multiprocessing.Queue inside a request. Under Gunicorn's gevent
worker (which monkey-patches threads), the queue's feeder thread is a greenlet
that cannot run while the request blocks the hub, so q.get() waits forever in
read(pipe, 4) and Gunicorn eventually logs WORKER TIMEOUT and kills the worker.

GET /blockread blocks the worker about 50 ms in an uncooperative pipe read
(it shows in the blocking-read histograms). GET / answers normally. If HANG_PID_FILE is set, /hang appends the worker's
pid to it before blocking, so a test knows which worker took the request.
"""
import multiprocessing
import os
import time


def enqueue_and_wait():
    """The line an on-call engineer needs to find: py-spy shows it."""
    q = multiprocessing.Queue()
    q.put("job")
    return q.get()  # never returns under gevent


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/hang":
        pid_file = os.environ.get("HANG_PID_FILE")
        if pid_file:
            with open(pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")
        body = f"got {enqueue_and_wait()}\n".encode()
    elif path == "/blockread":
        # A read gevent does not make cooperative (os.read on a pipe):
        # it blocks the whole worker ~50 ms until a forked child writes.
        r, w = os.pipe()
        if os.fork() == 0:
            time.sleep(0.05)
            os.write(w, b"x")
            os._exit(0)
        os.read(r, 1)
        os.close(r)
        os.close(w)
        body = b"read\n"
    elif path == "/pid":
        body = f"{os.getpid()}\n".encode()
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
