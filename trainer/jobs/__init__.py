"""Training jobs: a FIFO queue of trainer processes over job folders (see trainer.jobs.manager)."""

from trainer.jobfolder import ACTIVE_STATES
from trainer.jobs.manager import JobManager, OnJobEvent
from trainer.jobs.model import (
    RESUMABLE_STATES,
    JobAction,
    JobConflictError,
    JobError,
    JobInfo,
    JobNotFoundError,
    JobRecord,
    PathPolicy,
    allowed_actions,
    is_within,
    normalize_device,
    progress_fraction,
    sanitize_name,
)
from trainer.jobs.publisher import CONCEPT_SUFFIX, Publisher
from trainer.jobs.store import tail_lines
from trainer.jobs.supervisor import LaunchSpec, process_matches

__all__ = ["ACTIVE_STATES", "CONCEPT_SUFFIX", "RESUMABLE_STATES", "JobAction", "JobConflictError", "JobError",
           "JobInfo", "JobManager", "JobNotFoundError", "JobRecord", "LaunchSpec", "OnJobEvent", "PathPolicy",
           "Publisher", "allowed_actions", "is_within", "normalize_device", "process_matches", "progress_fraction",
           "sanitize_name", "tail_lines"]
