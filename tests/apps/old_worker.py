"""Gunicorn's gevent worker as it was before 19.8.0.

19.8.0 added `client.setblocking(1)` to GeventWorker.handle, so an accepted
socket no longer inherits socket.getdefaulttimeout(). This subclass skips it,
to reproduce the leaked-timeout bug on a current Gunicorn.
"""
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker


class OldGeventWorker(GeventWorker):
    def handle(self, listener, client, addr):
        AsyncWorker.handle(self, listener, client, addr)
