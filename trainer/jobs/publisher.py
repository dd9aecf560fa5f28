"""Publishing a job's concept model: the newest checkpoint's `concept.safetensors` copied to
`<publish_dir>/<name>.safetensors`, where the GCFG accordion lists it.

* Never overwrites a file this job did not publish. The record keeps the size and modification time of what the
  job wrote; a file that differs (or any file, when the job has published nothing yet) belongs to someone else, and
  the model goes to the first free `<name>-N.safetensors` instead. The job's status says so.
* Streams: the copy goes through a fixed-size buffer into a temporary file beside the target, is fsynced, then
  renamed into place. A multi-GB model never sits in the WebUI's memory, and a reader sees the old file or the
  complete new one.
* A new file is placed with a hard link, which fails instead of replacing a file that appeared meanwhile; where the
  file system has no hard links (FAT, some network shares) it falls back to a checked `os.replace`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gcfg_core.fileio import fsync_dir, replace_file
from trainer.jobs.model import JobRecord

log = logging.getLogger("gcfg.trainer.jobs")

CONCEPT_SUFFIX = ".safetensors"
COPY_CHUNK = 4 * 1024 * 1024
MAX_SUFFIX = 999


@dataclass(frozen=True)
class PublishResult:
    record: JobRecord  # the record with the new `published*` fields (unchanged when nothing was copied)
    note: str | None = None  # for the job's status: what was done differently from the plain case


def file_identity(path: Path) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, or None when it does not exist."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def owned_by(record: JobRecord, path: Path) -> bool:
    """Whether the file at `path` is exactly what this job last published there."""
    return (record.published is not None and Path(record.published) == path
            and file_identity(path) == (record.published_size, record.published_mtime_ns))


def stream_copy(source: Path, target_dir: Path, chunk_size: int = COPY_CHUNK) -> Path:
    """Copy `source` into a new hidden temporary file in `target_dir` through a `chunk_size` buffer; fsynced."""
    fd, name = tempfile.mkstemp(prefix=".publish-", suffix=".tmp", dir=target_dir)
    tmp = Path(name)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, chunk_size)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model file must be readable like any other
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def place_new(tmp: Path, target: Path) -> bool:
    """Move `tmp` to `target` only if `target` does not exist; False when it does (nothing is changed then)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: check, then rename
        if target.exists():
            return False
        replace_file(tmp, target)
        return True
    tmp.unlink()
    return True


class Publisher:
    """Copies concept models into `publish_dir` (None: publishing is off)."""

    def __init__(self, publish_dir: str | os.PathLike | None, chunk_size: int = COPY_CHUNK):
        self.publish_dir = Path(publish_dir).resolve() if publish_dir is not None else None
        self.chunk_size = chunk_size

    def target(self, name: str) -> Path | None:
        return None if self.publish_dir is None else self.publish_dir / f"{name}{CONCEPT_SUFFIX}"

    def name_taken(self, name: str) -> bool:
        target = self.target(name)
        return target is not None and (target.exists() or target.is_symlink())

    def _candidates(self, name: str):
        yield self.target(name)
        for n in range(2, MAX_SUFFIX + 1):
            yield self.publish_dir / f"{name}-{n}{CONCEPT_SUFFIX}"

    def publish(self, name: str, source: Path, step: int, record: JobRecord) -> PublishResult:
        """Copy `source` (the concept model of checkpoint `step`) for job `name`; a no-op when that step is out."""
        if self.publish_dir is None or record.published_step == step and record.published is not None \
                and owned_by(record, Path(record.published)):
            return PublishResult(record)
        self.publish_dir.mkdir(parents=True, exist_ok=True)
        tmp = stream_copy(source, self.publish_dir, self.chunk_size)
        try:
            target, skipped = self._place(name, tmp, record)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.publish_dir)
        size, mtime_ns = file_identity(target)
        record = dataclasses.replace(record, published=str(target), published_step=step, published_size=size,
                                     published_mtime_ns=mtime_ns)
        note = None
        if skipped:
            names = ", ".join(p.name for p in skipped)
            note = (f"published as {target.name}, because {names} in {self.publish_dir} "
                    f"{'is' if len(skipped) == 1 else 'are'} not from this job")
            log.warning("job %s: %s", name, note)
        log.info("job %s: published step %d as %s", name, step, target)
        return PublishResult(record, note)

    def _place(self, name: str, tmp: Path, record: JobRecord) -> tuple[Path, list[Path]]:
        """Put `tmp` at this job's own file (replacing it) or at the first free name; (target, names skipped)."""
        own = Path(record.published) if record.published else None
        if own is not None and own.parent == self.publish_dir and owned_by(record, own):
            replace_file(tmp, own)
            return own, []
        skipped = []
        for candidate in self._candidates(name):
            if place_new(tmp, candidate):
                return candidate, skipped
            skipped.append(candidate)
        raise FileExistsError(f"no free file name for {name!r} in {self.publish_dir} (tried up to -{MAX_SUFFIX})")
