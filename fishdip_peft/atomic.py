"""Atomic file writes: the file appears whole, or the previous one stays.

On Linux the content is written to an unnamed file in the target folder (`O_TMPFILE`), which a kill
makes vanish, then linked under a temporary name and renamed over the target, so a temporary name
exists only between two system calls; a process killed exactly there leaves it, and the next write or
load in that folder removes it. Elsewhere a named temporary file is written, then renamed.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable


def remove_stale_temporaries(directory: str) -> None:
    """Delete the temporary names that a process killed between its link and its rename left behind
    (`.tmp-<pid>-<hex>...` whose process is gone)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != ".tmp" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass
        except OSError:
            pass


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then move the finished file onto `path` (all or nothing)."""
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(directory)
    fd = _unnamed_file(directory)
    if fd is not None:
        try:
            write(f"/proc/self/fd/{fd}")
            os.fsync(fd)
            linked = os.path.join(directory, f".tmp-{os.getpid()}-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
            try:
                _link_unnamed(fd, linked)
            except OSError:  # no linkat through /proc here: fall back to a named temporary file
                linked = None
            if linked is not None:
                try:
                    os.replace(linked, path)
                except BaseException:
                    os.remove(linked)
                    raise
                return
        finally:
            os.close(fd)
    handle, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(handle)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400


def _link_unnamed(fd: int, target: str) -> None:
    """Give the unnamed file `fd` the name `target` (linkat following the /proc/self/fd link)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    source = f"/proc/self/fd/{fd}".encode()
    if libc.linkat(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(target), _AT_SYMLINK_FOLLOW) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), target)


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _unnamed_file(directory: str):
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o644)
    except OSError:  # a file system without O_TMPFILE support
        return None
