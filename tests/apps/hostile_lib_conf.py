"""A Gunicorn config (-c) that makes the master, and so every worker it
forks, a hostile target for a Python stack reader: its memory map names a
Python library, "libpython3.11.so", that was deleted, and at the path the
map names ("<dir>/libpython3.11.so (deleted)") it plants a symlink to
HOSTILE_LIB_TARGET (a FIFO nobody writes to, or a file outside what the
process should hand out). A reader that follows the map's path through
/proc/PID/root opens that target.

    HOSTILE_LIB_DIR     a directory of the test's (created)
    HOSTILE_LIB_TARGET  what the planted symlink points to
"""
import mmap
import os

_dir = os.environ["HOSTILE_LIB_DIR"]
os.makedirs(_dir, exist_ok=True)
_lib = os.path.join(_dir, "libpython3.11.so")
with open(_lib, "wb") as f:
    f.write(b"\x7fELF" + b"\0" * (mmap.PAGESIZE - 4))
_fd = os.open(_lib, os.O_RDONLY)
# Executable, as a loaded library's text is: the reader looks for that.
_map = mmap.mmap(_fd, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
os.close(_fd)
os.unlink(_lib)
os.symlink(os.environ["HOSTILE_LIB_TARGET"], _lib + " (deleted)")
