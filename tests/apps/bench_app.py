"""The benchmark's app: `/` is hello world; `/pipe` does 100 write+read pairs
on a pipe per request, a syscall-heavy request the tracer sees in full."""
import os


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/pipe":
        r, w = os.pipe()
        try:
            for _ in range(100):
                os.write(w, b"x")
                os.read(r, 1)
        finally:
            os.close(r)
            os.close(w)
        body = b"piped\n"
    else:
        body = b"hello\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
