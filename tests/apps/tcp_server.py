"""Loopback TCP endpoints for the early-close tests, one behaviour each.

    python tcp_server.py MODE            # server: prints its port, then serves
    python tcp_server.py client PORT GO  # outbound, once file GO exists: connect,
                                         # send, close before any answer

Server modes, for every accepted connection:
    drop      read the request, close without writing
    reply     read the request, answer, close
    idle      wait for a request that never comes, close after 0.3 s
    shutdown  read the request, shutdown() without writing, then close
    exit      read the request, then exit with the socket still open
    hold GO   read the request, print "read", wait for file GO, close
              without writing
    silent [HOST:PORT]
              keep every connection open and never answer: a database
              that does not reply (on HOST:PORT, e.g. 127.0.0.2:5432)
    late      answer the client's first message, wait until it closes,
              then send more anyway (an upstream that still talks on a
              pooled connection its client has closed)
"""
import os
import socket
import sys
import time

REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def client(port, go):
    while not os.path.exists(go):
        time.sleep(0.02)
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(REQUEST)
    time.sleep(0.2)  # the server never answers: give up
    c.close()
    print("done", flush=True)
    time.sleep(60)


def serve(mode, go=None):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    host, port = ("127.0.0.1", 0)
    if mode == "silent" and go:
        host, port = go.rsplit(":", 1)
    s.bind((host, int(port)))
    s.listen(16)
    print(s.getsockname()[1], flush=True)
    held = []
    while True:
        c, _ = s.accept()
        if mode == "silent":
            held.append(c)
            continue
        if mode == "late":
            c.recv(1024)
            c.sendall(b"pong\n")
            while c.recv(1024):
                pass
            time.sleep(0.1)
            c.sendall(b"too late\n")
            held.append(c)
            continue
        if mode == "idle":
            c.settimeout(0.3)
            try:
                c.recv(1024)
            except socket.timeout:
                pass
            c.close()
            continue
        c.recv(1024)
        if mode == "reply":
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        elif mode == "shutdown":
            c.shutdown(socket.SHUT_RDWR)
        elif mode == "exit":
            os._exit(0)
        elif mode == "hold":
            print("read", flush=True)
            while not os.path.exists(go):
                time.sleep(0.02)
        c.close()


if __name__ == "__main__":
    if sys.argv[1] == "client":
        client(int(sys.argv[2]), sys.argv[3])
    else:
        serve(sys.argv[1], *sys.argv[2:])
