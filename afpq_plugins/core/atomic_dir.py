"""Crash-safe replacement of a folder by a complete new one (the checkpoint writer's
file-system half).

The protocol: the new folder is written as a hidden sibling ``.<name>.tmp-*`` and
flushed (:func:`fsync_tree`); an existing ``<name>`` is then swapped with it in one
atomic step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), else moved
aside to ``.<name>.old-*`` first (and moved back if the second rename fails); the
parent folder is flushed after the move and the old version deleted. Writers of one
parent folder hold :func:`parent_lock`. Whatever a crash leaves behind,
:func:`recover_interrupted_save` puts right: the last complete version back under
``<name>`` if it is missing, leftovers deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from typing import Iterator, List, Optional

__all__ = ["fsync_tree", "fsync_dir", "parent_lock", "move_into_place", "recover_interrupted_save", "leftovers"]


def fsync_tree(folder: str) -> None:
    """Flush every file of ``folder`` and the folder itself to disk."""
    for root, dirs, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in dirs:
            fsync_dir(os.path.join(root, d))
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def parent_lock(parent: str) -> Iterator[None]:
    """An exclusive ``flock`` on the parent folder (POSIX; elsewhere, no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def move_into_place(tmp: str, out_dir: str, parent: str) -> None:
    """Put ``tmp`` at ``out_dir``. An existing ``out_dir`` is swapped with ``tmp`` in one
    atomic step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``: readers see
    the old or the new folder, never none), then deleted; elsewhere it is set aside as
    ``.<name>.old-*`` first and restored if the final rename fails. The parent is flushed
    after the move, so a crash leaves either version under a name
    :func:`recover_interrupted_save` knows."""
    if not os.path.lexists(out_dir):
        os.replace(tmp, out_dir)
        fsync_dir(parent)
        return
    if _exchange(tmp, out_dir):
        fsync_dir(parent)
        _remove(tmp)  # now the old version
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
    os.rmdir(old)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    fsync_dir(parent)
    _remove(old)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False
    where that is not available, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # no kernel or file-system support
    raise OSError(err, f"cannot swap {b} with the new checkpoint: {os.strerror(err)}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def leftovers(out_dir: str, kind: str) -> List[str]:
    parent, base = os.path.split(out_dir)
    prefix = f".{base}.{kind}-"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, n) for n in names if n.startswith(prefix))


def recover_interrupted_save(out_dir: str, _locked: bool = False) -> Optional[str]:
    """Finish what an interrupted save of ``out_dir`` left behind; returns what it did.

    A save writes ``.<name>.tmp-*`` beside ``out_dir``, moves an existing ``out_dir`` to
    ``.<name>.old-*``, renames the temporary folder to ``out_dir`` and deletes the old one.
    A crash between the two renames leaves no ``out_dir``: the old version (the last
    complete save) is renamed back. Other leftovers (temporary folders of saves that
    never finished, old versions already replaced) are deleted. Runs under the same lock
    as saves, so it never touches a save in progress; called by every save and by
    loaders when ``out_dir`` is missing."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        return None
    if not _locked:
        if not (leftovers(out_dir, "old") or leftovers(out_dir, "tmp")):
            return None
        with parent_lock(parent):
            return recover_interrupted_save(out_dir, _locked=True)
    done = None
    olds = leftovers(out_dir, "old")
    if not os.path.lexists(out_dir) and olds:
        restore = olds[-1]
        os.replace(restore, out_dir)
        fsync_dir(parent)
        olds.remove(restore)
        done = f"restored {out_dir} from {os.path.basename(restore)}"
    for stale in olds + leftovers(out_dir, "tmp"):
        _remove(stale)
        done = done or f"removed leftovers of an interrupted save of {out_dir}"
    return done
