"""The queue rules alone: FIFO per device, N running per device, queue positions."""

from __future__ import annotations

import pytest

from trainer.jobfolder import JobState, JobStatus
from trainer.jobs.model import JobRecord
from trainer.jobs.scheduler import jobs_to_start, next_seq, queue_positions


def entry(job_id: str, seq: int, state: JobState | None, device: str = "cpu"):
    record = JobRecord(id=job_id, created="", seq=seq, device=device)
    return record, (None if state is None else JobStatus(state=state))


def test_oldest_queued_job_starts_when_its_device_is_free():
    entries = [entry("late", 5, JobState.QUEUED), entry("early", 2, JobState.QUEUED), entry("done", 1,
                                                                                            JobState.COMPLETED)]
    assert [r.id for r in jobs_to_start(entries, 1)] == ["early"]


def test_a_busy_device_starts_nothing_and_other_devices_are_independent():
    entries = [entry("running", 1, JobState.TRAINING), entry("waits", 2, JobState.QUEUED),
               entry("gpu1", 3, JobState.QUEUED, "cuda:1"), entry("gpu1-b", 4, JobState.QUEUED, "cuda:1")]
    assert [r.id for r in jobs_to_start(entries, 1)] == ["gpu1"]
    assert [r.id for r in jobs_to_start(entries, 2)] == ["waits", "gpu1", "gpu1-b"]


@pytest.mark.parametrize("state", [JobState.PREPARING, JobState.CACHING, JobState.CALIBRATING, JobState.STOPPING])
def test_every_active_state_holds_its_slot(state):
    assert jobs_to_start([entry("a", 1, state), entry("b", 2, JobState.QUEUED)], 1) == []


def test_jobs_without_a_status_are_ignored():
    assert jobs_to_start([entry("x", 1, None)], 1) == []
    assert queue_positions([entry("x", 1, None)]) == {}


def test_queue_positions_count_per_device_in_seq_order():
    entries = [entry("c", 9, JobState.QUEUED), entry("a", 3, JobState.QUEUED), entry("g", 4, JobState.QUEUED, "cuda:0"),
               entry("r", 1, JobState.TRAINING)]
    assert queue_positions(entries) == {"a": 1, "c": 2, "g": 1}


def test_next_seq_follows_every_record():
    assert next_seq([]) == 1
    assert next_seq(r for r, _ in [entry("a", 3, None), entry("b", 7, None)]) == 8


def test_slots_must_be_positive():
    with pytest.raises(ValueError, match="max_running_per_device=0"):
        jobs_to_start([], 0)
