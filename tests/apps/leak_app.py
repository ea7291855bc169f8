"""A WSGI app with the bug from the article's second lesson.

GET /rpc stands for a call through a client library that sets a process-wide
default socket timeout while it talks to its server (the Thrift client did
this), and resets it afterwards. Under gevent every greenlet shares that
global, so a client connection accepted meanwhile inherits the short timeout.
Gunicorn 19.8 and later put accepted sockets back in blocking mode; the
`old_worker.OldGeventWorker` class below skips that, like Gunicorn <= 19.7.

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
        try:
            gevent.sleep(RPC_SECONDS)  # the "RPC" in flight, timeout leaked
        finally:
            socket.setdefaulttimeout(None)
        body = b"rpc done\n"
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
