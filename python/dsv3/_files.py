"""File-system guards shared by the readers and writers: open only regular files (a FIFO or a
device would block or stream forever), open a checkpoint directory once and its files relative
to it (a concurrent saver swapping the directory cannot mix two checkpoints), and temporary
names unique per process and call."""
from __future__ import annotations

import io
import os
import secrets
import stat
from typing import Optional


def open_regular(path: str, who: str, binary: bool = False,
                 dir_fd: Optional[int] = None, shown: Optional[str] = None) -> io.IOBase:
    """``open(path)`` for reading (UTF-8 text, or bytes when ``binary``), but only if ``path``
    is a regular file: anything else (FIFO, device, socket, directory) raises ValueError
    naming it. The check is made on the opened descriptor (opened non-blocking, so a FIFO
    without a writer cannot hang the open), so the file cannot be swapped between check and
    read. ``dir_fd``: ``path`` is relative to that open directory (see :func:`open_dir`);
    ``shown``: the name used in messages (default ``path``). Symlinks are followed."""
    shown = path if shown is None else shown
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"[{who}] {shown} is not a regular file ({_kind(mode)})")
        os.set_blocking(fd, True)
        return open(fd, "rb") if binary else open(fd, "r", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


class ChangedWhileReading(FileNotFoundError):
    """A file of a checkpoint vanished while it was read: a concurrent save replaced the
    directory (and deleted the old one). Reading again finds the new checkpoint."""


def open_dir(path: str, who: str) -> int:
    """A descriptor of the directory ``path`` (close it with ``os.close``). Files opened
    relative to it (``dir_fd=``) all come from this one directory even if another process
    renames a different directory to ``path`` meanwhile. FileNotFoundError / ValueError
    naming ``path`` when it is absent or not a directory."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise FileNotFoundError(f"[{who}] {path} is not a directory (it does not exist)") \
            from None
    except NotADirectoryError:
        raise FileNotFoundError(f"[{who}] {path} is not a directory") from None


def dir_replaced(dir_fd: int, path: str) -> bool:
    """True when the directory open as ``dir_fd`` was deleted or is no longer the one at
    ``path`` (a concurrent save published a new one there)."""
    try:
        now = os.stat(path)
    except OSError:
        return True
    st = os.fstat(dir_fd)
    return st.st_nlink == 0 or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def temp_name(path: str, kind: str = "tmp") -> str:
    """A temporary name beside ``path`` unique to this process and call,
    ``<path>.<kind>-<pid>-<8 hex digits>``, so concurrent writers of one path never share a
    temporary (and a sweep can tell whose process left it)."""
    return f"{path}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
