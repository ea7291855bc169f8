"""A WSGI app with the bug from the article's second lesson.

GET /rpc stands for a call through a client library that sets a process-wide
default socket timeout while it talks to its server (the Thrift client did
this), and resets it afterwards. Under gevent every greenlet shares that
global, so a client connection accepted meanwhile inherits the short timeout.
Gunicorn 19.8 and later put accepted sockets back in blocking mode; the
`old_worker.OldGeventWorker` class below skips that, like Gunicorn <= 19.7.

POST /upload reads the whole request body, then answers: a slow upload
accepted while /rpc is in flight times out after LEAKED_TIMEOUT seconds and
Gunicorn closes the connection with nothing sent, which nginx answers 502.

GET / answers normally.
"""
import socket

import gevent

import os
LEAKED_TIMEOUT = float(os.environ.get("LEAKED_TIMEOUT", "0.5"))
RPC_SECONDS = 3.0


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/rpc":
        socket.setdefaulttimeout(LEAKED_TIMEOUT)
        # Tells a test the leak is on, so it need not guess with a sleep.
        print(f"rpc: default socket timeout {LEAKED_TIMEOUT} leaked", flush=True)
        try:
            gevent.sleep(RPC_SECONDS)  # the "RPC" in flight, timeout leaked
        finally:
            socket.setdefaulttimeout(None)
        body = b"rpc done\n"
    elif path == "/upload":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length)
        body = f"got {len(data)} bytes\n".encode()
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
