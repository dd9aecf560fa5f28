"""Crash-safe file writes shared by model files, the job folder, the config, the latent cache and checkpoints.

A reader (the WebUI tab, a resumed run) must never see a half-written file: every write goes to a temporary
file in the same directory, is flushed and fsynced, then `os.replace`d over the target (atomic on POSIX and
Windows when both paths are on one filesystem).

On NTFS a file that another process holds open (the tab reading status.json, the WebUI loading a model) cannot be
replaced: `os.replace` fails with a sharing violation (PermissionError) for as long as the reader keeps it open.
Readers here open, read and close at once, so `replace_file` retries for a moment before giving up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# How long a replace waits for another process to close the target on Windows (sharing violations).
REPLACE_RETRY_DELAYS_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def replace_file(source: str | os.PathLike, target: str | os.PathLike, *, os_name: str = os.name,
                 delays: tuple[float, ...] = REPLACE_RETRY_DELAYS_S,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    """`os.replace(source, target)`; on Windows retried while another process holds `target` open."""
    for delay in (*delays, None) if os_name == "nt" else (None,):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if delay is None:
                raise
            sleep(delay)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: POSIX only records it once the directory itself is synced."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit it replaces `path` atomically, on error it is removed.

    For writers that need a file name (e.g. `safetensors.torch.save_file`) rather than a file object.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; saved models and job files must be readable like any other
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        replace_file(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and atomically move the result to `path` (e.g. `lambda p: torch.save(obj, p)`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def folder_write_problem(path: str | os.PathLike) -> str | None:
    """Create the folder `path` (with its parents) and a temporary file in it; why that failed, or None.

    The command lines call it before loading any model, so that an output or job folder they cannot write is
    reported in seconds, not after the work.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
