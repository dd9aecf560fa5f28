"""The queue: FIFO per device, at most N running jobs per device. Pure functions over (record, status) pairs, so the
rules are tested without processes or folders."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from trainer.jobfolder import ACTIVE_STATES, JobState, JobStatus
from trainer.jobs.model import JobRecord

Entry = tuple[JobRecord, JobStatus | None]


def queue_positions(entries: Iterable[Entry]) -> dict[str, int]:
    """{job id: 1-based place in its device's queue} for every queued job."""
    queued = sorted((record for record, status in entries if status is not None and status.state == JobState.QUEUED),
                    key=lambda record: record.seq)
    positions: dict[str, int] = {}
    per_device: dict[str, int] = {}
    for record in queued:
        per_device[record.device] = per_device.get(record.device, 0) + 1
        positions[record.id] = per_device[record.device]
    return positions


def jobs_to_start(entries: Sequence[Entry], max_running_per_device: int) -> list[JobRecord]:
    """The queued jobs that may start now, oldest first: as many per device as that device has free slots."""
    if max_running_per_device < 1:
        raise ValueError(f"max_running_per_device={max_running_per_device} must be ≥ 1")
    running: dict[str, int] = {}
    for record, status in entries:
        if status is not None and status.state in ACTIVE_STATES:
            running[record.device] = running.get(record.device, 0) + 1
    start = []
    queued = [record for record, status in entries if status is not None and status.state == JobState.QUEUED]
    for record in sorted(queued, key=lambda r: r.seq):
        if running.get(record.device, 0) < max_running_per_device:
            running[record.device] = running.get(record.device, 0) + 1
            start.append(record)
    return start


def next_seq(records: Iterable[JobRecord]) -> int:
    """The queue number of a job (re)queued now: after every other."""
    return 1 + max((record.seq for record in records), default=0)
