"""File-system guards shared by the readers and writers: open only regular files (a FIFO or a
device would block or stream forever), and temporary names unique per process and call."""
from __future__ import annotations

import io
import os
import secrets
import stat


def open_regular(path: str, who: str, binary: bool = False) -> io.IOBase:
    """``open(path)`` for reading (UTF-8 text, or bytes when ``binary``), but only if ``path``
    is a regular file: anything else (FIFO, device, socket, directory) raises ValueError
    naming it. The check is made on the opened descriptor (opened non-blocking, so a FIFO
    without a writer cannot hang the open), so the file cannot be swapped between check and
    read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"[{who}] {path} is not a regular file ({_kind(mode)})")
        os.set_blocking(fd, True)
        return open(fd, "rb") if binary else open(fd, "r", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def temp_name(path: str) -> str:
    """A temporary name beside ``path`` unique to this process and call (pid + random), so
    concurrent writers of one path never share a temporary."""
    return f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
