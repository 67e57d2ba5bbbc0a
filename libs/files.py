"""Local state files that several processes share (dev tokens, PII key ring): written atomically and
created exactly once, however many processes start at the same moment."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# How long a process waits for another one to finish creating a file before giving up.
CREATE_WAIT_S_MAX = 10.0
_POLL_S = 0.05


def atomic_write(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never half of one; the
    mode is set before any byte is written, so a secret is never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def create_once(path: Path, create: Callable[[], None], wait_s_max: float = CREATE_WAIT_S_MAX) -> None:
    """Make sure `path` exists, running `create` in exactly one of the processes racing to make it.

    The winner holds an O_EXCL lock file beside `path` while `create` runs; `create` must put `path`
    in place atomically as its last step (see atomic_write). The others wait for `path` to appear.
    The existence check is repeated under the lock: a process that lost the race but took the lock
    after the winner released it must not create the file a second time (and overwrite secrets).
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        wait_for(path, wait_s_max)
        return
    os.close(fd)
    try:
        if not path.exists():
            create()
    finally:
        lock.unlink(missing_ok=True)


def wait_for(path: Path, timeout_s: float = CREATE_WAIT_S_MAX) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not created by the process holding its lock")
        time.sleep(_POLL_S)
