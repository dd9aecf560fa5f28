"""What a job is to the manager: its id rules, the actions a state allows, its record file and the view of it the
tab and the REST routes show. Pure data and pure functions: no processes, no files except through the store."""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.jobfolder import ACTIVE_STATES, JobState, JobStatus

RECORD_FILE = "job.json"
PROCESS_LOG_FILE = "process.log"
# = TrainConfig.name: safe as a folder and file name. Used with fullmatch: "$" would accept a final "\n".
ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class JobError(ValueError):
    """A job request that cannot be done; `argument` names the request field at fault (for a 422/409 answer)."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(message)


class JobNotFoundError(JobError):
    """No job with this id."""


class JobConflictError(JobError):
    """The action is not allowed in the job's current state (e.g. resume a running job)."""


class JobAction(str, enum.Enum):
    CANCEL = "cancel"
    STOP = "stop"
    RESUME = "resume"
    DELETE = "delete"


RESUMABLE_STATES = frozenset({JobState.STOPPED, JobState.INTERRUPTED, JobState.FAILED})


def allowed_actions(state: JobState) -> tuple[JobAction, ...]:
    """What the user may do with a job in `state` (the tab enables exactly these buttons)."""
    if state == JobState.QUEUED:
        return (JobAction.CANCEL, JobAction.DELETE)
    if state == JobState.STOPPING:
        return (JobAction.CANCEL,)
    if state in ACTIVE_STATES:
        return (JobAction.STOP, JobAction.CANCEL)
    if state in RESUMABLE_STATES:
        return (JobAction.RESUME, JobAction.DELETE)
    return (JobAction.DELETE,)  # completed, cancelled


def sanitize_name(text: str) -> str:
    """A user's output name as a safe job id / file name: runs of other characters become '_', no leading dot.

    "My face v2!" -> "My_face_v2", "../../etc/x" -> "etc_x". Raises `JobError` when nothing usable is left.
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text).strip())
    name = re.sub(r"\.{2,}", ".", name)  # no ".." anywhere, even though ids never contain a separator
    name = name.strip("._")[:100].strip("._")
    if not name or not ID_RE.fullmatch(name):
        raise JobError("name", f"name={text!r} has no usable characters (letters, digits, '.', '_', '-')")
    return name


def normalize_device(device: str, default_device: str = "cpu") -> str:
    """The scheduling slot of a config's device: 'auto' is the machine default, 'cuda' is 'cuda:0'."""
    if device == "auto":
        device = default_device
    return "cuda:0" if device == "cuda" else device


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether `path` lies inside `root` (or is it) after resolving symlinks and '..' on both, compared by path
    components (so `/jobs/face2` is not inside `/jobs/face`)."""
    real, base = (os.path.normcase(os.path.realpath(p)) for p in (path, root))
    try:
        return os.path.commonpath([real, base]) == base
    except ValueError:  # different drives on Windows, or one relative and one absolute
        return False


@dataclass(frozen=True)
class PathPolicy:
    """Which folders a job request may name: datasets only inside `dataset_roots` (symlinks resolved)."""

    dataset_roots: tuple[str, ...]

    def check_dataset(self, path: str) -> str:
        """The resolved dataset folder, or `JobError('dataset_dir', ...)`."""
        if not isinstance(path, str) or not path.strip():
            raise JobError("dataset_dir", "dataset_dir must name a folder")
        if "\x00" in path:
            raise JobError("dataset_dir", "dataset_dir contains a NUL character")
        real = os.path.realpath(os.path.expanduser(path.strip()))
        if not any(is_within(real, root) for root in self.dataset_roots):
            allowed = ", ".join(self.dataset_roots) or "(none configured)"
            raise JobError("dataset_dir", f"dataset_dir={path!r} is outside the allowed dataset folders: {allowed}")
        if not os.path.isdir(real):
            raise JobError("dataset_dir", f"dataset_dir={path!r} is not an existing folder")
        return real


@dataclass(frozen=True)
class JobRecord:
    """The manager's own file in a job folder (`job.json`): queue order, device, process identity, what it
    published."""

    id: str
    created: str
    seq: int  # FIFO order: a (re)queued job gets the next number
    device: str  # scheduling slot, see `normalize_device`
    unload_webui_model: bool = False
    launches: int = 0
    pid: int | None = None
    pid_create_time: float | None = None
    requested: str | None = None  # JobAction.STOP / CANCEL value while a request is pending
    published: str | None = None  # path of the concept model copied to the publish folder
    published_step: int | None = None
    # What the published file looked like right after this job wrote it: a file there that differs was put there
    # by someone else and is never overwritten (trainer.jobs.publisher).
    published_size: int | None = None
    published_mtime_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class JobInfo:
    """One job as the tab and the REST routes show it."""

    id: str
    name: str
    state: JobState
    step: int
    total_steps: int
    progress: float  # 0..1 of the current phase (training: step / total)
    images_per_second: float | None
    eta_seconds: float | None
    message: str
    last_error: str | None
    created: str
    updated: str
    device: str
    queue_position: int | None  # 1 = next to start on its device
    actions: tuple[JobAction, ...]
    requested: str | None
    pid: int | None
    last_checkpoint: str | None
    published: str | None
    published_step: int | None
    dataset_dir: str
    base_checkpoint: str
    unload_webui_model: bool

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"] = self.state.value
        out["actions"] = [a.value for a in self.actions]
        return out


def progress_fraction(status: JobStatus) -> float:
    """0..1 for the progress bar: training steps, or the done/total of a preparation phase."""
    if status.state in (JobState.CACHING, JobState.PREPARING, JobState.CALIBRATING):
        return min(1.0, status.phase_done / status.phase_total) if status.phase_total else 0.0
    return min(1.0, status.step / status.total_steps) if status.total_steps else 0.0
