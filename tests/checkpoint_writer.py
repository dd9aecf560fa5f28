"""Child process of tests/test_checkpoint_crashes.py: writes checkpoints, pausing at a crash point to be killed.

    python tests/checkpoint_writer.py ROOT POINT KEEP_LAST STEP [STEP ...]   writes the steps in order (write i of
        step s has the concept bytes b"step s write i"); the last write pauses at POINT
    python tests/checkpoint_writer.py ROOT POINT recover                     runs the recovery, pausing at POINT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import checkpoints  # noqa: E402


def concept_bytes(step: int, write: int) -> bytes:
    return f"step {step} write {write}".encode()


def write(root: Path, step: int, index: int, keep_last: int) -> None:
    checkpoints.write_checkpoint(
        root, step, write_concept=lambda path: path.write_bytes(concept_bytes(step, index)),
        train_state={"format": checkpoints.TRAIN_STATE_FORMAT, "step": step, "write": index},
        meta={"write": index}, keep_last=keep_last)


def main(argv: list[str]) -> None:
    root, point = Path(argv[0]), argv[1]
    if argv[2] == "recover":
        os.environ[checkpoints.PAUSE_ENV] = point
        checkpoints.recover_checkpoints(root)
        return
    keep_last, steps = int(argv[2]), [int(s) for s in argv[3:]]
    for index, step in enumerate(steps):
        if index == len(steps) - 1:
            os.environ[checkpoints.PAUSE_ENV] = point  # only the last write stops
        write(root, step, index, keep_last)


if __name__ == "__main__":
    main(sys.argv[1:])
