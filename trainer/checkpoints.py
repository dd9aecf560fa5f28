"""Checkpoint folders: written whole or not at all, the last K kept, the newest complete one found after any crash.

Layout under a job's `checkpoints/`::

    step-000123/  concept.safetensors  (the deliverable: loadable by gcfg_core and the WebUI script)
                  train_state.pt       (optimizer, EMA, step, data position, RNG scheme: everything exact resume needs)
                  meta.json            (written last; its presence marks the folder complete)
    latest        (text: the name of the newest folder; a hint only, the folders themselves are the truth)

A checkpoint is assembled in a hidden `.tmp-step-…` folder and renamed into place, so a kill at any moment leaves
either the old set of folders or the old set plus one complete new folder. Leftover temporary folders are removed
by the next writer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gcfg_core.fileio import atomic_write_text, fsync_dir

log = logging.getLogger("gcfg.trainer.checkpoints")

CHECKPOINT_FORMAT = "gcfg.trainer-checkpoint/1"
CONCEPT_FILE = "concept.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
TRAIN_STATE_FORMAT = "gcfg.train-state/1"
_NAME = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint folder or train state that cannot be used (missing, incomplete, wrong format)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint folder."""

    path: Path
    step: int

    @property
    def concept_path(self) -> Path:
        return self.path / CONCEPT_FILE

    @property
    def train_state_path(self) -> Path:
        return self.path / TRAIN_STATE_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_path.read_text(encoding="utf-8"))


def checkpoint_name(step: int) -> str:
    """Folder name for optimizer step `step` (zero-padded so names sort like numbers up to a million steps)."""
    return f"step-{step:06d}"


def _is_complete(path: Path) -> bool:
    """True when the folder holds all three files and a readable meta.json of our format."""
    if not all((path / name).is_file() for name in (CONCEPT_FILE, TRAIN_STATE_FILE, META_FILE)):
        return False
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete checkpoints in `checkpoints_dir`, oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and _is_complete(child):
            found.append(CheckpointInfo(child, int(match.group(1))))
    return sorted(found, key=lambda info: info.step)


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The newest complete checkpoint: the `latest` pointer when it names a complete folder, else the highest step."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        match = _NAME.match(name)
        if match and _is_complete(root / name):
            return CheckpointInfo(root / name, int(match.group(1)))
        log.warning("ignoring stale 'latest' pointer %r in %s", name, root)
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """A checkpoint folder, a job folder or a job's `checkpoints/` folder -> its (latest) complete checkpoint."""
    path = Path(path)
    match = _NAME.match(path.name)
    if match and _is_complete(path):
        return CheckpointInfo(path, int(match.group(1)))
    for candidate in (path / "checkpoints", path):
        info = latest_checkpoint(candidate)
        if info is not None:
            return info
    raise CheckpointError(f"no complete checkpoint at {str(path)!r}")


def remove_incomplete(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted writes (temporary folders, step folders without a valid meta.json)."""
    root = Path(checkpoints_dir)
    removed = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        leftover = child.name.startswith(_TMP_PREFIX) or (_NAME.match(child.name) and not _is_complete(child))
        if leftover and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if removed:
        log.info("removed %d incomplete checkpoint folder(s) in %s", len(removed), root)
    return removed


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return []
    doomed = list_checkpoints(checkpoints_dir)[:-keep_last]
    for info in doomed:
        # Rename first so that a kill during rmtree leaves a temporary folder, never a half-deleted step folder.
        trash = info.path.with_name(f"{_TMP_PREFIX}delete-{info.path.name}")
        os.replace(info.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return [info.path for info in doomed]


def write_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    *,
    write_concept: Callable[[Path], None],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 0,
) -> CheckpointInfo:
    """Write `step-NNNNNN/` atomically, point `latest` at it and prune to `keep_last`; returns the new checkpoint.

    `write_concept(path)` writes the concept model file (gcfg_core.concept_file.save_concept_model).
    """
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_incomplete(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        write_concept(tmp / CONCEPT_FILE)
        with open(tmp / TRAIN_STATE_FILE, "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
        meta_text = json.dumps({"format": CHECKPOINT_FORMAT, "step": step, **meta}, indent=2, sort_keys=True)
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            f.write(meta_text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (e.g. a stop right after a periodic save): swap, never leave a gap without it.
            old = root / f"{_TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    prune_checkpoints(root, keep_last)
    log.info("saved checkpoint %s", final)
    return CheckpointInfo(final, step)


def load_train_state(info: CheckpointInfo, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint's train state (tensors and plain containers only: `weights_only=True`)."""
    state = torch.load(info.train_state_path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{info.train_state_path} is not a {TRAIN_STATE_FORMAT} train state")
    return state

