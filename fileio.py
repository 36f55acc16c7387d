"""Atomic file writes, shared by checkpoints, configs and reports."""
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside `path`; when the block succeeds the file is synced to disk and renamed
    onto `path`. Readers never see a half-written file, and a failure leaves the previous file at `path`
    untouched and no temporary file behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
