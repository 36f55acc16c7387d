"""Atomic file writes, shared by checkpoints, configs and reports, and up-front checks of output folders."""
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager

from core.errors import OutputError

# errno values that mean "this location cannot take the output", not a bug
_LOCATION_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
                    errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
                    errno.ENOTDIR: "a parent is not a folder", errno.EISDIR: "is a folder"}


def current_umask():
    """The process umask, read without changing it where Linux shows it (os.umask can only set it, and a
    moment of another mask would apply to files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def location_error(err):
    """The errno reason ("disk full", ...) found in `err` or the errors it was raised from, else None.

    torch.save reports a full disk as "inline_container.cc: unexpected pos"; the OSError it hit is its context.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _LOCATION_ERRNOS:
            return _LOCATION_ERRNOS[err.errno]
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside `path`; when the block succeeds the file is synced to disk and renamed
    onto `path` with mode 0666 less the umask (mkstemp's 0600 would hide results from the group). Readers
    never see a half-written file, and a failure leaves the previous file at `path` untouched and no
    temporary file behind. A full disk or a missing permission raises OutputError naming `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except Exception as err:
        reason = location_error(err)
        if reason is None or isinstance(err, OutputError):
            raise
        raise OutputError(f"cannot write {path}: {reason}") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def check_writable(folder, need_bytes=0, what="output folder"):
    """Create `folder` if needed and prove it takes a file; with `need_bytes`, that much space must be free.
    Raises OutputError naming the folder ("disk full" when the space is missing)."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"{what} {folder} is not writable: {location_error(err) or err.strerror}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OutputError(f"{what} {folder}: disk full ({free / 2**20:.0f} MiB free, about "
                          f"{need_bytes / 2**20:.0f} MiB needed)")
    return folder
