"""A WSGI app that queries a real PostgreSQL with psycopg2.

GET /sleep?s=N runs `SELECT pg_sleep(N)` through psycopg2.extras'
RealDictCursor on a connection to PG_DSN. psycopg2 is a C driver that
gevent's monkey-patching does not make cooperative (without psycogreen):
libpq polls its own socket, so under the gevent worker the whole worker
waits with the query.
"""
import os
from urllib.parse import parse_qs

import psycopg2
import psycopg2.extras


def slow_query(seconds):
    conn = psycopg2.connect(os.environ["PG_DSN"])
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute("SELECT pg_sleep(%s) AS slept", (seconds,))
            return cur.fetchone()
    finally:
        conn.close()


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/sleep":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
        slow_query(seconds)
        body = f"slept {seconds}\n".encode()
    else:
        body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
