"""A Gunicorn config (-c) that makes the master, and so every worker it
forks, a hostile target for a Python stack reader: its memory map names a
Python library, "libpython3.11.so", and the path the map names leads
elsewhere, to HOSTILE_LIB_TARGET (a FIFO nobody writes to, or a file
outside what the process should hand out). A reader that follows the
map's path through /proc/PID/root opens that target.

    HOSTILE_LIB_DIR     a directory of the test's (created)
    HOSTILE_LIB_TARGET  what the planted symlink points to
    HOSTILE_LIB_SWAP    unset: the library is deleted, and a symlink is
                        planted at "<dir>/libpython3.11.so (deleted)", the
                        name the map gives it.
                        "1": the library stays where the map says, but a
                        thread of the master swaps a symlink in for it and
                        back, each for a millisecond, for good: a reader
                        that checks the path and then opens it again can
                        find the file at the check and the link at the open.
"""
import mmap
import os
import threading
import time

_dir = os.environ["HOSTILE_LIB_DIR"]
_target = os.environ["HOSTILE_LIB_TARGET"]
os.makedirs(_dir, exist_ok=True)
_lib = os.path.join(_dir, "libpython3.11.so")
with open(_lib, "wb") as f:
    f.write(b"\x7fELF" + b"\0" * (mmap.PAGESIZE - 4))
_fd = os.open(_lib, os.O_RDONLY)
# Executable, as a loaded library's text is: the reader looks for that.
_map = mmap.mmap(_fd, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
os.close(_fd)

if os.environ.get("HOSTILE_LIB_SWAP") == "1":
    _aside = _lib + ".aside"
    _link = _lib + ".link"

    def _swap():
        os.symlink(_target, _link)
        while True:
            os.rename(_lib, _aside)
            os.rename(_link, _lib)
            time.sleep(0.001)
            os.rename(_lib, _link)
            os.rename(_aside, _lib)
            time.sleep(0.001)

    threading.Thread(target=_swap, daemon=True).start()
else:
    os.unlink(_lib)
    os.symlink(_target, _lib + " (deleted)")
