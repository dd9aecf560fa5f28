"""The job folders under one root, as the manager sees them: ids, `job.json` records, configs, logs, previews, and
the lock that serialises every manager of the root (two WebUIs, or a restart that overlaps the old process).

The lock is a `filelock.FileLock` on `<root>/.jobs.lock` (flock on POSIX, msvcrt locking on Windows) inside an
in-process re-entrant lock, so it holds across threads and processes on both systems.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from gcfg_core.fileio import atomic_write_text, replace_file
from trainer.config import ConfigError, TrainConfig
from trainer.jobfolder import JobFolder, JobStatus, utc_now_iso
from trainer.jobs.model import (
    ID_RE,
    PROCESS_LOG_FILE,
    RECORD_FILE,
    JobError,
    JobNotFoundError,
    JobRecord,
    is_within,
    normalize_device,
)

log = logging.getLogger("gcfg.trainer.jobs")

LOCK_FILE = ".jobs.lock"


def tail_lines(path: str | os.PathLike, max_lines: int, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `max_lines` lines of a text file (reads at most `max_bytes` from its end); [] if it is missing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    # tqdm redraws with "\r": keep only the last redraw of each line
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    if size > max_bytes:
        lines = lines[1:]  # the first line is cut
    while lines and not lines[-1].strip():
        lines.pop()
    return lines[-max_lines:] if max_lines > 0 else []


def last_error_line(process_log: Path) -> str | None:
    """The most telling line of a failed trainer's output: the CLI's "error: ..." or the exception line."""
    lines = tail_lines(process_log, 200)
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line):
            return line
    return lines[-1] if lines else None


class JobStore:
    """Reads and writes the job folders under `root` (created if missing)."""

    def __init__(self, root: str | os.PathLike, default_device: str = "cpu"):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.default_device = default_device
        self._thread_lock = threading.RLock()
        self._file_lock = FileLock(str(self.root / LOCK_FILE))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive access to the root for this thread, across threads and processes (re-entrant)."""
        with self._thread_lock, self._file_lock:
            yield

    # --- ids and folders

    def job_path(self, job_id: str) -> Path:
        """The folder of `job_id`; `JobNotFoundError` for a malformed id, a symlink or a missing job."""
        if not isinstance(job_id, str) or not ID_RE.fullmatch(job_id):
            raise JobNotFoundError("job_id", f"job_id={job_id!r} is not a valid job id")
        path = self.root / job_id
        if path.is_symlink() or not (path / "config.json").is_file() or not is_within(path, self.root):
            raise JobNotFoundError("job_id", f"no job {job_id!r}")
        return path

    def job_ids(self) -> list[str]:
        ids = []
        for child in self.root.iterdir():
            if ID_RE.fullmatch(child.name) and not child.is_symlink() and (child / "config.json").is_file():
                ids.append(child.name)
        return ids

    def entries(self) -> list[tuple[Path, JobRecord, JobStatus | None]]:
        """(folder, record, status) of every job."""
        out = []
        for job_id in self.job_ids():
            path = self.root / job_id
            out.append((path, self.read_record(path), JobFolder(path).read_status()))
        return out

    def delete_folder(self, job_id: str) -> None:
        """Remove a job folder: renamed away first, so a crash during the removal leaves a hidden folder, not a
        half-deleted job the list shows."""
        path = self.root / job_id
        if not is_within(path, self.root) or path.resolve().parent != self.root:
            raise JobError("job_id", f"refusing to delete {str(path)!r}: not a job folder of {self.root}")
        trash = self.root / f".deleted-{job_id}-{os.getpid()}-{time.monotonic_ns()}"
        replace_file(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # --- records and configs

    def read_record(self, path: Path) -> JobRecord:
        try:
            return JobRecord.from_dict(json.loads((path / RECORD_FILE).read_text(encoding="utf-8")))
        except (FileNotFoundError, ValueError, TypeError):
            # A job folder the CLI made (or a damaged record): adopt it at the back of the queue order.
            config = self.read_config(path)
            device = normalize_device(config.device, self.default_device) if config else self.default_device
            return JobRecord(id=path.name, created=utc_now_iso(), seq=int(path.stat().st_mtime), device=device,
                             launches=1 if (path / "status.json").exists() else 0)

    def write_record(self, path: Path, record: JobRecord) -> JobRecord:
        atomic_write_text(path / RECORD_FILE, json.dumps(record.to_dict(), indent=1) + "\n")
        return record

    def update_record(self, path: Path, **changes: Any) -> JobRecord:
        return self.write_record(path, dataclasses.replace(self.read_record(path), **changes))

    @staticmethod
    def read_config(path: Path) -> TrainConfig | None:
        try:
            return TrainConfig.load(path / "config.json")
        except ConfigError as e:
            log.warning("job %s: unreadable config: %s", path.name, e)
            return None

    # --- what the tab shows besides the status

    def log_tail(self, path: Path, max_lines: int, with_process_output: bool) -> str:
        """The end of the job's log; the process output (tracebacks, errors before logging started) when the log
        has nothing or `with_process_output`."""
        job = JobFolder(path)
        lines = tail_lines(job.log_path, max_lines)
        if not lines or with_process_output:
            process = tail_lines(path / PROCESS_LOG_FILE, max_lines)
            if process:
                lines = [*lines, f"--- {PROCESS_LOG_FILE} ---", *process] if lines else process
        return "\n".join(lines[-max_lines:])

    @staticmethod
    def latest_preview(path: Path) -> Path | None:
        """The newest preview grid (previews/step-NNNNNN.png), or None."""
        previews = JobFolder(path).previews_dir
        try:
            names = sorted(p.name for p in previews.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
        except FileNotFoundError:
            return None
        return previews / names[-1] if names else None
