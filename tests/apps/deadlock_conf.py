"""Gunicorn config whose workers deadlock at boot: a thread of the master
holds a lock when the master forks, so each worker gets a copy that is
locked forever, and its post_fork hook waits on it (the logging-lock and
preload_app deadlock, made certain)."""
import threading
import time

lock = threading.Lock()
held = threading.Event()


def hold():
    with lock:
        held.set()
        time.sleep(3600)


threading.Thread(target=hold, daemon=True).start()
held.wait()


def post_fork(server, worker):
    with lock:
        pass
