"""A WSGI app that fails to boot in the worker.

The worker imports it (no --preload), waits for the file named by GO_FILE so
a test can attach first, then raises: Gunicorn's worker exits with code 3
(WORKER_BOOT_ERROR) and the master halts.
"""
import os
import time

GO = os.environ.get("GO_FILE")
while GO and not os.path.exists(GO):
    time.sleep(0.02)
raise RuntimeError("this app fails to boot")
