"""A checkpoint write killed (SIGKILL) at each of its crash points loses no step that was written completely.

Each case runs `tests/checkpoint_writer.py` in a child process that pauses at one point of `write_checkpoint` (or
of the recovery), kills it there, then checks what a reader finds and that the next writer keeps exactly that and
leaves a clean folder. The last tests run the same code with the folder-rename rules of NTFS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_writer import concept_bytes
from waiting import BACKSTOP_S

from trainer import checkpoints

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def kill_at(root: Path, point: str, *args: str) -> None:
    """Run the writer until it pauses at `point`, then SIGKILL it."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    env.pop(checkpoints.PAUSE_ENV, None)
    proc = subprocess.Popen([sys.executable, str(HERE / "checkpoint_writer.py"), str(root), point, *args],
                            stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    try:
        for line in proc.stderr:  # blocks until the child pauses (or ends without pausing: a test failure)
            seen.append(line)
            if line.startswith(f"{checkpoints.PAUSED_MARK} {point}"):
                break
        else:
            pytest.fail(f"the writer never reached {point!r}:\n{''.join(seen)}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=BACKSTOP_S)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def read(info: checkpoints.CheckpointInfo) -> tuple[int, int]:
    """(step, write index) of a checkpoint, from its concept file and its train state (they must agree)."""
    state = checkpoints.load_train_state(info)
    assert state["step"] == info.step
    assert info.concept_path.read_bytes() == concept_bytes(info.step, state["write"])
    return info.step, state["write"]


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def next_writer_keeps(root: Path, seen: tuple[int, int], steps_before: list[int]) -> None:
    """The next write recovers what the reader saw and leaves only complete `step-N` folders and the pointer."""
    new_step = max(steps_before) + 10
    checkpoints.write_checkpoint(root, new_step, write_concept=lambda p: p.write_bytes(concept_bytes(new_step, 99)),
                                 train_state={"format": checkpoints.TRAIN_STATE_FORMAT, "step": new_step,
                                              "write": 99}, meta={})
    assert hidden(root) == []
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted([checkpoints.LATEST_FILE, *(checkpoints.checkpoint_name(s) for s in
                                                       {*steps_before, new_step})])
    kept = {info.step: read(info) for info in checkpoints.list_checkpoints(root)}
    assert kept[seen[0]] == seen
    assert (root / checkpoints.LATEST_FILE).read_text().strip() == checkpoints.checkpoint_name(new_step)


# (writes, crash point, what a reader must find: (step, write index), the complete steps after recovery)
CASES = [
    # a new step: killed while writing it, then once it is complete but not yet in place, then once in place
    ("1 2", "staging-partial", (1, 0), [1]),
    ("1 2", "staged", (2, 1), [1, 2]),
    ("1 2", "promoted", (2, 1), [1, 2]),
    # the same step saved again (a stop right after a periodic save): the old copy or the new one, never none
    ("1 2 2", "staging-partial", (2, 1), [1, 2]),
    ("1 2 2", "staged", (2, 1), [1, 2]),
    ("1 2 2", "replaced", (2, 2), [1, 2]),  # the step lived only in hidden folders here
    ("1 2 2", "promoted", (2, 2), [1, 2]),
    ("1 2 2", "old-in-trash", (2, 2), [1, 2]),
    # pruning to keep_last=2 while a third checkpoint is saved
    ("1 2 3", "pruning", (3, 2), [2, 3]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("writes", "point", "expected", "steps_after"), CASES)
def test_kill_at_each_crash_point_keeps_every_complete_step(tmp_path, writes, point, expected, steps_after):
    root = tmp_path / "checkpoints"
    kill_at(root, point, "2" if point == "pruning" else "0", *writes.split())
    latest = checkpoints.latest_checkpoint(root)
    assert latest is not None and read(latest) == expected
    assert checkpoints.resolve_checkpoint(tmp_path).step == expected[0]
    next_writer_keeps(root, expected, steps_after)


@pytest.mark.slow
def test_every_crash_point_is_covered():
    covered = {point for _, point, _, _ in CASES} | {"recovery-trashed", "recovery-promoted"}
    assert covered == set(checkpoints.CRASH_POINTS)


@pytest.mark.slow
def test_kill_during_recovery_is_recovered_again(tmp_path):
    root = tmp_path / "checkpoints"
    kill_at(root, "replaced", "0", "1", "2", "2")  # step 2 now lives only in hidden folders
    kill_at(root, "recovery-promoted", "recover")
    assert read(checkpoints.latest_checkpoint(root)) == (2, 2)
    next_writer_keeps(root, (2, 2), [1, 2])

    other = tmp_path / "other"
    kill_at(other, "replaced", "0", "1", "2", "2")
    (other / "step-000002").mkdir()  # and a folder of the step's name without its files (e.g. a user's copy)
    (other / "step-000002" / checkpoints.CONCEPT_FILE).write_bytes(b"half")
    assert read(checkpoints.latest_checkpoint(other)) == (2, 2)
    kill_at(other, "recovery-trashed", "recover")
    assert read(checkpoints.latest_checkpoint(other)) == (2, 2)
    next_writer_keeps(other, (2, 2), [1, 2])


# --- the same code under NTFS rules


def _write(root: Path, step: int, index: int, keep_last: int = 0) -> None:
    checkpoints.write_checkpoint(root, step, write_concept=lambda p: p.write_bytes(concept_bytes(step, index)),
                                 train_state={"format": checkpoints.TRAIN_STATE_FORMAT, "step": step, "write": index},
                                 meta={}, keep_last=keep_last)


@pytest.fixture
def ntfs_renames(monkeypatch):
    """Folder renames as on NTFS: onto an existing path they fail, whatever that path holds."""
    real_rename, real_replace = os.rename, os.replace
    moves = []

    def rename(source, target, *args, **kwargs):
        if os.path.isdir(source) and os.path.lexists(target):
            raise FileExistsError(183, "Cannot create a file when that file already exists", str(target))
        moves.append((Path(source).name, Path(target).name))
        return real_rename(source, target, *args, **kwargs)

    def replace(source, target, *args, **kwargs):
        if os.path.isdir(source) and os.path.lexists(target):
            raise PermissionError(5, "Access is denied", str(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(checkpoints.os, "rename", rename)
    monkeypatch.setattr(checkpoints.os, "replace", replace)
    return moves


def test_saves_resaves_prunes_and_recovery_hold_under_ntfs_renames(tmp_path, ntfs_renames):
    root = tmp_path / "checkpoints"
    _write(root, 1, 0)
    _write(root, 2, 1)
    _write(root, 2, 2)  # a re-save: the old folder moves aside before the new one moves in
    _write(root, 3, 3, keep_last=2)
    assert [read(info) for info in checkpoints.list_checkpoints(root)] == [(2, 2), (3, 3)]
    assert hidden(root) == []
    # the re-save of step 2: the old folder moved aside, then the new copy moved in, then the old one was deleted
    def role(name: str) -> str:
        if not name.startswith(".tmp-"):
            return "step"
        return next((r for r in ("delete", "replaced") if name.startswith(f".tmp-{r}-")), "tmp")

    step2 = [(role(a), role(b)) for a, b in ntfs_renames if "step-000002" in a + b]
    assert step2 == [("tmp", "step"),  # first save
                     ("step", "replaced"), ("tmp", "step"), ("replaced", "delete")]  # the re-save
    # a crashed re-save's folders are recovered with the same rules
    (root / ".tmp-replaced-step-000003-1-a").mkdir()
    for name in (checkpoints.CONCEPT_FILE, checkpoints.TRAIN_STATE_FILE, checkpoints.META_FILE):
        os.link(root / "step-000003" / name, root / ".tmp-replaced-step-000003-1-a" / name)
    os.rename(root / "step-000003", root / ".tmp-step-000003-1-b")
    assert checkpoints.recover_checkpoints(root) == [3]
    assert read(checkpoints.latest_checkpoint(root)) == (3, 3) and hidden(root) == []


def test_a_windows_sharing_violation_is_retried(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _write(root, 1, 0)
    real_rename, failures = os.rename, []

    def rename(source, target):
        if len(failures) < 2:  # e.g. the WebUI still reads concept.safetensors
            failures.append(target)
            raise PermissionError(32, "The process cannot access the file because it is being used", str(source))
        return real_rename(source, target)

    monkeypatch.setattr(checkpoints, "_WINDOWS", True)
    monkeypatch.setattr(checkpoints.os, "rename", rename)
    monkeypatch.setattr(checkpoints.time, "sleep", lambda _s: None)
    _write(root, 1, 1)
    assert len(failures) == 2 and read(checkpoints.latest_checkpoint(root)) == (1, 1)
    monkeypatch.setattr(checkpoints, "_WINDOWS", False)  # elsewhere a PermissionError is real: no retry
    failures.clear()
    with pytest.raises(PermissionError):
        _write(root, 1, 2)
    assert read(checkpoints.latest_checkpoint(root)) == (1, 1)


def test_a_pointer_that_cannot_be_replaced_does_not_fail_the_save(tmp_path, monkeypatch, caplog):
    root = tmp_path / "checkpoints"

    def refuse(*_args, **_kwargs):
        raise PermissionError(5, "Access is denied")  # `latest` held open by a reader on Windows

    monkeypatch.setattr(checkpoints, "atomic_write_text", refuse)
    _write(root, 1, 0)
    assert read(checkpoints.latest_checkpoint(root)) == (1, 0)
    assert "could not update" in caplog.text
    assert torch.load(root / "step-000001" / checkpoints.TRAIN_STATE_FILE, weights_only=True)["write"] == 0


def test_a_leftover_that_cannot_be_moved_does_not_fail_the_next_save(tmp_path, monkeypatch, caplog):
    root = tmp_path / "checkpoints"
    _write(root, 1, 0)
    (root / ".tmp-step-000002-1-a").mkdir()  # an incomplete leftover, held open by another process on Windows
    real_move = checkpoints._move

    def move(source, target):
        if source.name.startswith(".tmp-step-000002-1-"):
            raise PermissionError(32, "The process cannot access the file because it is being used", str(source))
        return real_move(source, target)

    monkeypatch.setattr(checkpoints, "_move", move)
    _write(root, 3, 1)
    assert read(checkpoints.latest_checkpoint(root)) == (3, 1) and "could not tidy" in caplog.text
    monkeypatch.undo()
    _write(root, 4, 2)  # the next save tidies it
    assert hidden(root) == []
