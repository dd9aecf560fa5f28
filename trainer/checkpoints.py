"""Checkpoint folders: written whole or not at all, the last K kept, and every step that was written completely
found again after a crash at any moment.

Layout under a job's `checkpoints/`::

    step-000123/  concept.safetensors  (the deliverable: loadable by gcfg_core and the WebUI script)
                  train_state.pt       (optimizer, EMA, step, data position, RNG scheme: everything exact resume needs)
                  meta.json            (written last; its presence marks the folder complete)
    latest        (text: the name of the newest folder; a hint for people and tools, the folders are the truth)

Hidden folders beside them, each with a role in its name:

    .tmp-step-000123-<token>/           a new copy being written (complete once its meta.json is there)
    .tmp-replaced-step-000123-<token>/  the previous copy of a step that is being saved again
    .tmp-delete-<anything>-<token>/     being deleted; never read

A write assembles `.tmp-step-…`, then (re-saving a step) moves the old `step-N` aside as `.tmp-replaced-…`, moves
the new copy in, and deletes the old one. No move ever targets an existing path: on NTFS `os.replace` of a folder
onto an existing one fails, and on POSIX it fails for a non-empty one. So a kill at any moment leaves, for every
step, either a complete `step-N` or a complete hidden copy of it, and:

* readers (`latest_checkpoint`, `resolve_checkpoint`) use a complete hidden copy where `step-N` is missing or
  incomplete, without changing anything on disk (the writer may still be running);
* the next writer (`recover_checkpoints`, run by `write_checkpoint` and before a resume) moves that copy into
  place and deletes what is left over, so what the reader saw is what the writer keeps.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
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
_STAGED = re.compile(r"^\.tmp-(?P<replaced>replaced-)?step-(?P<step>\d+)-.+$")
_TRASH_PREFIX = f"{_TMP_PREFIX}delete-"

# Fault injection for the crash tests: with this variable set to a point's name, the writer says so on stderr and
# waits there until it is killed (tests/test_checkpoint_crashes.py kills it with SIGKILL at each point).
PAUSE_ENV = "GCFG_CHECKPOINT_PAUSE_AT"
PAUSED_MARK = "gcfg-checkpoint-paused-at"
CRASH_POINTS = ("staging-partial", "staged", "replaced", "promoted", "old-in-trash", "pruning", "recovery-trashed",
                "recovery-promoted")


def _crash_point(name: str) -> None:
    if os.environ.get(PAUSE_ENV) != name:
        return
    sys.stderr.write(f"{PAUSED_MARK} {name}\n")
    sys.stderr.flush()
    while True:
        time.sleep(60)


class CheckpointError(ValueError):
    """A checkpoint folder or train state that cannot be used (missing, incomplete, wrong format)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint folder (a `step-N` folder, or a hidden complete copy a crash left behind)."""

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


def _children(root: Path) -> list[Path]:
    try:
        return [child for child in root.iterdir() if child.is_dir()]
    except FileNotFoundError:
        return []


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete `step-N` folders in `checkpoints_dir`, oldest first."""
    found = []
    for child in _children(Path(checkpoints_dir)):
        match = _NAME.match(child.name)
        if match and _is_complete(child):
            found.append(CheckpointInfo(child, int(match.group(1))))
    return sorted(found, key=lambda info: info.step)


def _hidden_copies(root: Path) -> dict[int, list[Path]]:
    """Complete hidden copies per step, best first: new copies before replaced ones, then the newest first."""
    copies: dict[int, list[tuple[bool, float, Path]]] = {}
    for child in _children(root):
        match = _STAGED.match(child.name)
        if match and _is_complete(child):
            rank = (bool(match.group("replaced")), -child.stat().st_mtime, child)
            copies.setdefault(int(match.group("step")), []).append(rank)
    return {step: [path for *_, path in sorted(ranked)] for step, ranked in copies.items()}


def recoverable_checkpoints(checkpoints_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Every step with a complete copy, oldest first: the `step-N` folder, or else its best hidden copy."""
    root = Path(checkpoints_dir)
    found = {info.step: info for info in list_checkpoints(root)}
    for step, paths in _hidden_copies(root).items():
        found.setdefault(step, CheckpointInfo(paths[0], step))
    return [found[step] for step in sorted(found)]


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The newest step with a complete copy (read only: a crashed write's hidden copy counts, see the module doc)."""
    complete = recoverable_checkpoints(checkpoints_dir)
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


_WINDOWS = os.name == "nt"
_SHARING_RETRIES = 20  # × 0.25 s


def _token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _move(source: Path, target: Path) -> None:
    """Rename a folder to a name that does not exist yet (the one kind of folder rename NTFS and POSIX agree on).

    On Windows a rename fails while another process has a file inside open (the WebUI reading a concept model,
    a virus scanner): such a sharing violation is retried for a few seconds before it is reported.
    """
    if os.path.lexists(target):
        raise FileExistsError(f"refusing to move {source} onto the existing {target}")
    attempts = _SHARING_RETRIES if _WINDOWS else 1
    for attempt in range(attempts):
        try:
            os.rename(source, target)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.25)


def _trash(path: Path, point: str | None = None) -> None:
    """Delete a folder: renamed to a `.tmp-delete-…` name first, so a kill mid-way leaves nothing that looks usable."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name.lstrip('.')}-{_token()}")
    _move(path, trash)
    if point:
        _crash_point(point)
    shutil.rmtree(trash, ignore_errors=True)


def _write_pointer(root: Path, name: str) -> None:
    try:
        atomic_write_text(root / LATEST_FILE, name + "\n")
    except OSError as exc:  # a hint only (readers do not need it); e.g. held open by a reader on Windows
        log.warning("could not update %s: %s", root / LATEST_FILE, exc)


def recover_checkpoints(checkpoints_dir: str | os.PathLike) -> list[int]:
    """The writer's clean-up after a crash: move complete hidden copies into place, delete everything else hidden.

    For each step without a complete `step-N` folder, its best complete hidden copy (the newer one of a re-save
    first) becomes `step-N`; incomplete `step-N` folders, incomplete copies, copies of steps that are in place and
    half-deleted folders are deleted. Only one writer may run per job (the trainer process). Returns the steps
    that were moved into place.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    in_place = {info.step for info in list_checkpoints(root)}
    promoted = []
    for step, paths in sorted(_hidden_copies(root).items()):
        if step in in_place:
            continue
        final = root / checkpoint_name(step)
        if final.exists():  # an incomplete folder of that name
            _trash(final)
            _crash_point("recovery-trashed")
        _move(paths[0], final)
        promoted.append(step)
        _crash_point("recovery-promoted")
    removed = 0
    for child in _children(root):
        leftover = child.name.startswith(_TMP_PREFIX) or (_NAME.match(child.name) and not _is_complete(child))
        if leftover:
            if child.name.startswith(_TRASH_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
            else:
                _trash(child)
            removed += 1
    if promoted or removed:
        fsync_dir(root)
        log.info("checkpoints in %s after an interrupted write: moved step(s) %s into place, removed %d "
                 "leftover folder(s)", root, ", ".join(map(str, promoted)) or "none", removed)
    newest = list_checkpoints(root)
    pointer = root / LATEST_FILE
    if newest and (not pointer.is_file() or pointer.read_text(encoding="utf-8").strip() != newest[-1].path.name):
        _write_pointer(root, newest[-1].path.name)
    return promoted


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return []
    doomed = list_checkpoints(checkpoints_dir)[:-keep_last]
    for info in doomed:
        _trash(info.path, "pruning")
    return [info.path for info in doomed]


def _write_synced(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


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
    try:
        recover_checkpoints(root)
    except OSError as exc:  # e.g. a leftover still open in another process on Windows: left for the next save
        log.warning("could not tidy %s before saving step %d: %s", root, step, exc)
    final = root / checkpoint_name(step)
    staging = root / f"{_TMP_PREFIX}{final.name}-{_token()}"
    staging.mkdir()
    try:
        write_concept(staging / CONCEPT_FILE)
        _crash_point("staging-partial")
        _write_synced(staging / TRAIN_STATE_FILE, lambda f: torch.save(train_state, f))
        meta_text = json.dumps({"format": CHECKPOINT_FORMAT, "step": step, **meta}, indent=2, sort_keys=True)
        _write_synced(staging / META_FILE, lambda f: f.write(meta_text), "w")
        fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # incomplete: nothing to keep
        raise
    _crash_point("staged")
    # From here on every folder involved is complete; a failure leaves them for `recover_checkpoints`.
    replaced = None
    if final.exists():
        # Re-saving a step (e.g. a stop right after a periodic save): the old copy moves aside first, because no
        # rename may target an existing folder.
        replaced = root / f"{_TMP_PREFIX}replaced-{final.name}-{_token()}"
        _move(final, replaced)
        _crash_point("replaced")
    _move(staging, final)
    fsync_dir(root)
    _crash_point("promoted")
    if replaced is not None:
        _trash(replaced, "old-in-trash")
    _write_pointer(root, final.name)
    prune_checkpoints(root, keep_last)
    log.info("saved checkpoint %s", final)
    return CheckpointInfo(final, step)


def load_train_state(info: CheckpointInfo, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint's train state (tensors and plain containers only: `weights_only=True`)."""
    state = torch.load(info.train_state_path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{info.train_state_path} is not a {TRAIN_STATE_FORMAT} train state")
    return state

