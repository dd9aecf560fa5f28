"""Training jobs for the WebUI tab and the REST routes: a FIFO queue of trainer processes over job folders.

Each job is a folder `<root>/<id>/` (trainer.jobfolder) plus one file this module owns, `job.json` (queue order,
device, process identity, the pending stop/cancel request). Every job runs as its own process,
`<python> -m trainer train|resume ...`, in a new session, never as a thread of the caller: a crash or OOM cannot
take the WebUI down, the WebUI can restart while a job trains, and a new `JobManager` on the same root re-attaches
by reading the folders (anchors-training.md: complaints 5 and 6, "what none of them has").

Job control:
    stop    SIGTERM: the trainer saves a checkpoint and ends as "stopped"; `resume` continues at the same step.
    cancel  SIGKILL of the process group, at once; the job ends as "cancelled" and is not resumable. Checkpoints
            already on disk stay until the job is deleted.
    resume  back into the queue; started with `python -m trainer resume <job>` (exact resume from the newest
            checkpoint, or from step 0 when there is none).
    delete  removes the folder of a job that is not running.

Process identity is (pid, start time, job folder on the command line), so a recycled pid is never taken for a live
job; an active job whose process is gone is marked "interrupted" (resumable).

Pure Python on top of trainer.jobfolder: no torch at import, no WebUI, no gradio.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from gcfg_core.fileio import atomic_write_bytes, atomic_write_text
from trainer.config import ConfigError, TrainConfig, check_resume_compatible
from trainer.jobfolder import ACTIVE_STATES, JobFolder, JobState, JobStatus, render_loss_plot, utc_now_iso

try:  # POSIX: serialise managers of the same root across processes (two WebUIs, a restart overlapping the old one)
    import fcntl
except ImportError:  # Windows: one manager per root is assumed
    fcntl = None

log = logging.getLogger("gcfg.trainer.jobs")

RECORD_FILE = "job.json"
PROCESS_LOG_FILE = "process.log"
LOCK_FILE = ".jobs.lock"
CONCEPT_SUFFIX = ".safetensors"
# = TrainConfig.name: safe as a folder and file name. Used with fullmatch: "$" would accept a final "\n".
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
    if not name or not _ID_RE.fullmatch(name):
        raise JobError("name", f"name={text!r} has no usable characters (letters, digits, '.', '_', '-')")
    return name


def normalize_device(device: str, default_device: str = "cpu") -> str:
    """The scheduling slot of a config's device: 'auto' is the machine default, 'cuda' is 'cuda:0'."""
    if device == "auto":
        device = default_device
    return "cuda:0" if device == "cuda" else device


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether `path` lies inside `root` (or is it) after resolving symlinks and '..' on both."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


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
class LaunchSpec:
    """How to start the trainer: which Python, which import path (the extension root first, then what the ldm and
    k-diffusion code need), which extra environment."""

    python: str = sys.executable
    pythonpath: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    module: str = "trainer"  # tests substitute a stand-in with the same command line

    def command(self, *args: str) -> list[str]:
        return [self.python, "-m", self.module, *args]

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        paths = [p for p in self.pythonpath if p]
        if paths:
            # The extension root must come first: PyPI has an unrelated package called `trainer`.
            env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env


@dataclass(frozen=True)
class JobRecord:
    """The manager's own file in a job folder (`job.json`): queue order, device and process identity."""

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


def process_matches(pid: int | None, create_time: float | None, job_dir: str | os.PathLike) -> bool:
    """Whether `pid` is still the trainer of `job_dir`: alive, not a zombie, same start time, job on its command line.

    Guards against pid reuse after a reboot or a long outage, when another program may own the old pid.
    """
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is not None and abs(proc.create_time() - create_time) > 0.5:
            return False
        try:
            cmdline = proc.cmdline()
        except psutil.AccessDenied:
            return create_time is not None
        if not cmdline:  # between fork and exec the command line is still empty; the start time decides
            return create_time is not None
        target = os.path.realpath(job_dir)
        return any(target in os.path.realpath(arg) or str(job_dir) in arg for arg in cmdline if arg)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


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


class _LossSeries:
    """The (step, loss) points of one events file, read incrementally (a long run has ~10^5 lines)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.pending = b""
        self.points: list[dict[str, float]] = []

    def refresh(self) -> bool:
        """Read what was appended since the last call; True when new points arrived."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        if size < self.offset:  # rewritten (should not happen): start over
            self.offset, self.pending, self.points = 0, b"", []
        if size == self.offset:
            return False
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = self.pending + f.read(size - self.offset)
        self.offset = size
        *complete, self.pending = data.split(b"\n")
        before = len(self.points)
        for line in complete:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("type") == "step" and isinstance(event.get("loss"), int | float):
                self.points.append({"step": event.get("step"), "loss": float(event["loss"])})
        return len(self.points) > before


OnJobEvent = Callable[[JobInfo], None]


class JobManager:
    """Creates, queues, starts, watches, stops and deletes training jobs under one root folder. Thread-safe.

    `tick()` does the bookkeeping (reap ended processes, mark orphans interrupted, start queued jobs); call it from
    `start_background()` or on every poll. `on_start`/`on_finish` are called (outside any lock) when a job's
    process starts and when it ends, e.g. to move the WebUI's model off the GPU and back.
    """

    def __init__(self, root: str | os.PathLike, *, launch: LaunchSpec | None = None, default_device: str = "cpu",
                 max_running_per_device: int = 1, publish_dir: str | os.PathLike | None = None,
                 on_start: OnJobEvent | None = None, on_finish: OnJobEvent | None = None,
                 cancel_wait_s: float = 10.0):
        if max_running_per_device < 1:
            raise ValueError(f"max_running_per_device={max_running_per_device} must be ≥ 1")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.launch = launch or LaunchSpec()
        self.default_device = default_device
        self.max_running_per_device = max_running_per_device
        self.publish_dir = Path(publish_dir).resolve() if publish_dir is not None else None
        self.on_start, self.on_finish = on_start, on_finish
        self.cancel_wait_s = cancel_wait_s
        self._lock = threading.RLock()
        self._children: dict[str, subprocess.Popen] = {}
        self._loss: dict[str, _LossSeries] = {}
        self._plots: dict[str, tuple[int, float, bytes]] = {}  # id -> (points, time, png)
        self._pending_events: list[tuple[OnJobEvent, JobInfo]] = []
        self._thread: threading.Thread | None = None
        self._stop_thread = threading.Event()

    # ------------------------------------------------------------------------------------------------------------
    # locking and folders

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The in-process lock plus an advisory file lock shared by every manager of this root."""
        with self._lock:
            if fcntl is None:
                yield
            else:
                with open(self.root / LOCK_FILE, "a+b") as handle:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        self._fire_events()

    def _fire_events(self) -> None:
        with self._lock:
            events, self._pending_events = self._pending_events, []
        for callback, info in events:
            try:
                callback(info)
            except Exception:  # noqa: BLE001 - a failing UI hook must not break the scheduler
                log.exception("job callback %s failed for %s", getattr(callback, "__name__", callback), info.id)

    def job_path(self, job_id: str) -> Path:
        """The folder of `job_id`; `JobNotFoundError` for a malformed id, a symlink or a missing job."""
        if not isinstance(job_id, str) or not _ID_RE.fullmatch(job_id):
            raise JobNotFoundError("job_id", f"job_id={job_id!r} is not a valid job id")
        path = self.root / job_id
        if path.is_symlink() or not (path / "config.json").is_file() or not is_within(path, self.root):
            raise JobNotFoundError("job_id", f"no job {job_id!r}")
        return path

    def _job_ids(self) -> list[str]:
        ids = []
        for child in self.root.iterdir():
            if _ID_RE.fullmatch(child.name) and not child.is_symlink() and (child / "config.json").is_file():
                ids.append(child.name)
        return ids

    def _read_record(self, path: Path) -> JobRecord:
        try:
            return JobRecord.from_dict(json.loads((path / RECORD_FILE).read_text(encoding="utf-8")))
        except (FileNotFoundError, ValueError, TypeError):
            # A job folder the CLI made (or a damaged record): adopt it at the back of the queue order.
            config = self._read_config(path)
            device = normalize_device(config.device, self.default_device) if config else self.default_device
            return JobRecord(id=path.name, created=utc_now_iso(), seq=int(path.stat().st_mtime), device=device,
                             launches=1 if (path / "status.json").exists() else 0)

    def _write_record(self, path: Path, record: JobRecord) -> JobRecord:
        atomic_write_text(path / RECORD_FILE, json.dumps(record.to_dict(), indent=1) + "\n")
        return record

    def _update_record(self, path: Path, **changes: Any) -> JobRecord:
        return self._write_record(path, dataclasses.replace(self._read_record(path), **changes))

    @staticmethod
    def _read_config(path: Path) -> TrainConfig | None:
        try:
            return TrainConfig.load(path / "config.json")
        except ConfigError as e:
            log.warning("job %s: unreadable config: %s", path.name, e)
            return None

    def _info(self, path: Path, record: JobRecord, status: JobStatus | None, queue_position: int | None) -> JobInfo:
        status = status or JobStatus()
        config = self._read_config(path)
        message = status.message
        if record.requested == JobAction.STOP.value and status.state in ACTIVE_STATES:
            message = "stop requested: saving a checkpoint at the end of this step"
        return JobInfo(
            id=record.id, name=config.name if config else record.id, state=status.state, step=status.step,
            total_steps=status.total_steps or (config.max_steps if config else 0),
            progress=progress_fraction(status), images_per_second=status.images_per_second,
            eta_seconds=status.eta_seconds, message=message, last_error=status.last_error, created=record.created,
            updated=status.updated, device=record.device, queue_position=queue_position,
            actions=allowed_actions(status.state), requested=record.requested, pid=status.pid,
            last_checkpoint=status.last_checkpoint, published=record.published,
            dataset_dir=config.dataset_dir if config else "", base_checkpoint=config.base_checkpoint if config else "",
            unload_webui_model=record.unload_webui_model)

    # ------------------------------------------------------------------------------------------------------------
    # queries

    def list_jobs(self) -> list[JobInfo]:
        """Every job, newest first."""
        with self._locked():
            return self._snapshot()

    def _snapshot(self) -> list[JobInfo]:
        entries = []
        for job_id in self._job_ids():
            path = self.root / job_id
            entries.append((path, self._read_record(path), JobFolder(path).read_status()))
        positions = self._queue_positions(entries)
        entries.sort(key=lambda e: e[1].seq, reverse=True)
        return [self._info(path, rec, status, positions.get(rec.id)) for path, rec, status in entries]

    @staticmethod
    def _queue_positions(entries: Sequence[tuple[Path, JobRecord, JobStatus | None]]) -> dict[str, int]:
        queued = sorted((rec for _, rec, status in entries if status is not None and status.state == JobState.QUEUED),
                        key=lambda rec: rec.seq)
        positions: dict[str, int] = {}
        per_device: dict[str, int] = {}
        for rec in queued:
            per_device[rec.device] = per_device.get(rec.device, 0) + 1
            positions[rec.id] = per_device[rec.device]
        return positions

    def get(self, job_id: str) -> JobInfo:
        with self._locked():
            self.job_path(job_id)
            for info in self._snapshot():
                if info.id == job_id:
                    return info
            raise JobNotFoundError("job_id", f"no job {job_id!r}")  # pragma: no cover - raced with a delete

    def config(self, job_id: str) -> TrainConfig:
        path = self.job_path(job_id)
        config = self._read_config(path)
        if config is None:
            raise JobError("job_id", f"job {job_id!r} has an unreadable config.json")
        return config

    def log_tail(self, job_id: str, max_lines: int = 60) -> str:
        """The end of the job's log; the process output (tracebacks, errors before logging started) when the log
        has nothing or the job failed."""
        path = self.job_path(job_id)
        job = JobFolder(path)
        lines = tail_lines(job.log_path, max_lines)
        status = job.read_status()
        if not lines or (status is not None and status.state in (JobState.FAILED, JobState.INTERRUPTED)):
            process = tail_lines(path / PROCESS_LOG_FILE, max_lines)
            if process:
                lines = [*lines, f"--- {PROCESS_LOG_FILE} ---", *process] if lines else process
        return "\n".join(lines[-max_lines:])

    def loss_points(self, job_id: str) -> list[dict[str, float]]:
        """Every (step, loss) point of the job so far."""
        path = self.job_path(job_id)
        with self._lock:
            series = self._loss.get(job_id)
            if series is None or series.path != JobFolder(path).events_path:
                series = self._loss[job_id] = _LossSeries(JobFolder(path).events_path)
            series.refresh()
            return list(series.points)

    def loss_plot_png(self, job_id: str, *, min_interval_s: float = 3.0) -> bytes:
        """The loss curve as PNG, redrawn when new points arrived (at most every `min_interval_s`)."""
        points = self.loss_points(job_id)
        with self._lock:
            cached = self._plots.get(job_id)
            if cached and (cached[0] == len(points) or time.monotonic() - cached[1] < min_interval_s):
                return cached[2]
        png = render_loss_plot(points, width=640, height=300)
        with self._lock:
            self._plots[job_id] = (len(points), time.monotonic(), png)
        return png

    def latest_preview(self, job_id: str) -> Path | None:
        """The newest preview grid (previews/step-NNNNNN.png), or None."""
        previews = JobFolder(self.job_path(job_id)).previews_dir
        try:
            names = sorted(p.name for p in previews.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
        except FileNotFoundError:
            return None
        return previews / names[-1] if names else None

    # ------------------------------------------------------------------------------------------------------------
    # creating jobs

    def new_config(self, values: Mapping[str, Any]) -> TrainConfig:
        """A validated config for a new job from form/API values: `name` is sanitised and becomes the job id,
        `job_dir` is set here (a request may not choose it). Raises `ConfigError` naming the bad fields."""
        values = dict(values)
        if "job_dir" in values:
            raise ConfigError("job_dir is chosen by the server (the job folder); do not send it")
        problems: list[str] = []
        try:
            name = sanitize_name(values.get("name", ""))
        except JobError as e:
            problems.append(str(e))
            name = "unnamed"  # stands in so that every other field is still checked and reported at once
        values.update(name=name, job_dir=str(self.root / name))
        try:
            config = TrainConfig.from_dict(values)
        except ConfigError as e:
            problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        return config

    def create(self, config: TrainConfig, *, unload_webui_model: bool = False, start: bool = True) -> JobInfo:
        """Create the job folder for `config` (from `new_config`) and queue it; `JobConflictError` if the name is
        taken. Paths are checked here (the dataset folder and the base checkpoint must exist)."""
        path = self.root / config.name
        if Path(config.job_dir).resolve() != path:
            raise JobError("job_dir", f"job_dir={config.job_dir!r} must be {str(path)!r} (use new_config)")
        if not _DEVICE_RE.fullmatch(config.device):
            raise JobError("device", f"device={config.device!r} is not valid")
        config.validate(check_paths=True)
        with self._locked():
            if path.exists() or path.is_symlink():
                raise JobConflictError("name", f"name={config.name!r} is already used by a job; choose another name "
                                               "or delete that job")
            published = self._publish_path(config.name)
            if published is not None and published.exists():
                raise JobConflictError("name", f"name={config.name!r}: a concept model {str(published)!r} already "
                                               "exists; choose another name")
            job = JobFolder(path).create()
            config.save(job.config_path)
            record = JobRecord(id=config.name, created=utc_now_iso(), seq=self._next_seq(),
                               device=normalize_device(config.device, self.default_device),
                               unload_webui_model=unload_webui_model)
            self._write_record(path, record)
            job.write_status(JobStatus(state=JobState.QUEUED, total_steps=config.max_steps, message="queued"))
            log.info("created job %s (%s)", config.name, record.device)
            if start:
                self._schedule()
            return self._info_of(path)

    def _next_seq(self) -> int:
        return 1 + max((self._read_record(self.root / i).seq for i in self._job_ids()), default=0)

    def _info_of(self, path: Path) -> JobInfo:
        for info in self._snapshot():
            if info.id == path.name:
                return info
        raise JobNotFoundError("job_id", f"no job {path.name!r}")  # pragma: no cover

    # ------------------------------------------------------------------------------------------------------------
    # actions

    def _prepare_action(self, job_id: str, action: JobAction) -> tuple[Path, JobInfo]:
        """Validate the id, bring the job's state up to date and check that `action` is allowed in it."""
        path = self.job_path(job_id)  # validates the id before anything touches the disk
        self._refresh(job_id)
        info = self._info_of(path)
        if action not in info.actions:
            allowed = ", ".join(a.value for a in info.actions) or "nothing"
            raise JobConflictError("job_id", f"cannot {action.value} job {info.id!r} while it is {info.state.value} "
                                             f"(allowed: {allowed})")
        return path, info

    def stop(self, job_id: str) -> JobInfo:
        """Ask a running job to save a checkpoint and end as "stopped" (resumable); returns at once."""
        with self._locked():
            path, _ = self._prepare_action(job_id, JobAction.STOP)
            record = self._update_record(path, requested=JobAction.STOP.value)
            self._signal(job_id, record, signal.SIGTERM)
            log.info("stop requested for job %s", job_id)
            return self._info_of(path)

    def cancel(self, job_id: str) -> JobInfo:
        """End a job at once without a new checkpoint (queued: just taken off the queue); not resumable."""
        with self._locked():
            path, info = self._prepare_action(job_id, JobAction.CANCEL)
            job = JobFolder(path)
            if info.state == JobState.QUEUED:
                job.update_status(state=JobState.CANCELLED, pid=None, eta_seconds=None, message="cancelled")
                self._schedule()
                return self._info_of(path)
            record = self._update_record(path, requested=JobAction.CANCEL.value)
            self._signal(job_id, record, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM,
                         group=True)
            self._wait_gone(job_id, record)
            self._refresh(job_id)
            self._schedule()
            log.info("cancelled job %s", job_id)
            return self._info_of(path)

    def resume(self, job_id: str, **overrides: Any) -> JobInfo:
        """Queue a stopped, interrupted or failed job again; `overrides` may change the fields listed in
        `trainer.config.RESUME_MUTABLE_FIELDS` (e.g. max_steps, learning_rate)."""
        with self._locked():
            path, info = self._prepare_action(job_id, JobAction.RESUME)
            if overrides:
                old = self.config(job_id)
                if {"job_dir", "name"} & set(overrides):
                    raise ConfigError("job_dir and name cannot change on resume")
                new = old.with_overrides(**overrides)
                check_resume_compatible(old, new)
                new.save(path / "config.json")
            config = self.config(job_id)
            self._update_record(path, seq=self._next_seq(), requested=None,
                                device=normalize_device(config.device, self.default_device))
            JobFolder(path).update_status(state=JobState.QUEUED, pid=None, eta_seconds=None, last_error=None,
                                          total_steps=config.max_steps, message="queued to resume")
            log.info("queued job %s to resume", job_id)
            self._schedule()
            return self._info_of(path)

    def delete(self, job_id: str) -> None:
        """Remove a job that is not running, with everything in its folder (published concept models stay)."""
        with self._locked():
            path, _ = self._prepare_action(job_id, JobAction.DELETE)
            if not is_within(path, self.root) or path.resolve().parent != self.root:
                raise JobError("job_id", f"refusing to delete {str(path)!r}: not a job folder of {self.root}")
            # Rename first: a crash during rmtree leaves a hidden folder, not a half-deleted job the list shows.
            trash = self.root / f".deleted-{job_id}-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            self._loss.pop(job_id, None)
            self._plots.pop(job_id, None)
            log.info("deleted job %s", job_id)

    # ------------------------------------------------------------------------------------------------------------
    # processes

    def _signal(self, job_id: str, record: JobRecord, sig: int, *, group: bool = False) -> None:
        child = self._children.get(job_id)
        pid = child.pid if child is not None else record.pid
        if child is None and not process_matches(pid, record.pid_create_time, self.root / job_id):
            return  # already gone; the next refresh records how it ended
        try:
            if group and os.name == "posix":
                os.killpg(pid, sig)  # the trainer leads its own session: this also ends data-loader workers
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _wait_gone(self, job_id: str, record: JobRecord) -> None:
        child = self._children.get(job_id)
        try:
            if child is not None:
                child.wait(timeout=self.cancel_wait_s)
            elif record.pid is not None:
                psutil.Process(record.pid).wait(timeout=self.cancel_wait_s)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired, psutil.NoSuchProcess):
            pass

    def _start(self, path: Path, record: JobRecord) -> None:
        job = JobFolder(path)
        config = self._read_config(path)
        if config is None:
            job.update_status(state=JobState.FAILED, last_error="config.json is unreadable", message="failed")
            return
        # First launch: `train` (creates the run); any later one: `resume` (newest checkpoint, or step 0).
        args = ("-q", "resume", str(path)) if record.launches else ("-q", "train", "--config", str(job.config_path))
        command = self.launch.command(*args)
        with open(path / PROCESS_LOG_FILE, "ab") as out:
            out.write(f"\n=== {utc_now_iso()} {' '.join(command)}\n".encode())
            out.flush()
            popen_kwargs: dict[str, Any] = {}
            if os.name == "posix":
                popen_kwargs["start_new_session"] = True  # survives the WebUI's Ctrl-C and restart
            else:
                popen_kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
            try:
                child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=str(path), env=self.launch.environment(), close_fds=True,
                                         **popen_kwargs)
            except OSError as e:
                job.update_status(state=JobState.FAILED, last_error=f"cannot start the trainer: {e}",
                                  message="failed to start")
                log.error("job %s: cannot start %s: %s", record.id, command, e)
                return
        self._children[record.id] = child
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = None
        record = self._write_record(path, dataclasses.replace(record, launches=record.launches + 1, pid=child.pid,
                                                              pid_create_time=create_time, requested=None))
        # The trainer writes its own status within seconds; until then the job reads as preparing under this pid.
        job.update_status(state=JobState.PREPARING, pid=child.pid, last_error=None, started=utc_now_iso(),
                          total_steps=config.max_steps, message="starting the trainer")
        log.info("started job %s: pid %d, %s", record.id, child.pid, " ".join(command))
        if self.on_start is not None:
            self._pending_events.append((self.on_start, self._info_of(path)))

    def _refresh(self, job_id: str) -> None:
        """Bring one job's status up to date: reap an ended child, mark a vanished process interrupted."""
        path = self.root / job_id
        job = JobFolder(path)
        status = job.read_status()
        if status is None:
            return
        record = self._read_record(path)
        child = self._children.get(job_id)
        if child is not None:
            code = child.poll()
            if code is None:
                return
            del self._children[job_id]
            self._finish(path, record, job.read_status() or status, code)
            return
        if status.state in ACTIVE_STATES:
            pid = record.pid if record.pid is not None else status.pid
            create_time = record.pid_create_time if record.pid == pid else None
            if not process_matches(pid, create_time, path):
                self._finish(path, record, status, None)
        elif record.pid is not None:  # ended while nobody watched (e.g. during a WebUI restart)
            self._finish(path, record, status, None)

    def _finish(self, path: Path, record: JobRecord, status: JobStatus, returncode: int | None) -> None:
        """Record how a job's process ended, publish its concept model, free its slot."""
        job = JobFolder(path)
        state, changes = status.state, {}
        if record.requested == JobAction.CANCEL.value and state != JobState.COMPLETED:
            state, changes = JobState.CANCELLED, {"message": "cancelled", "last_error": None}
        elif state in ACTIVE_STATES or state == JobState.QUEUED:
            if record.requested == JobAction.STOP.value and returncode == -signal.SIGTERM:
                # SIGTERM arrived before the trainer installed its handler (while importing): nothing to save.
                state, changes = JobState.STOPPED, {"message": "stopped before training started; resume to start"}
            elif returncode is not None and returncode > 0:
                error = _last_error_line(path / PROCESS_LOG_FILE) or f"trainer exited with code {returncode}"
                state, changes = JobState.FAILED, {"message": "failed", "last_error": error}
            else:
                how = f"was killed by signal {-returncode}" if returncode is not None and returncode < 0 else "ended"
                state, changes = JobState.INTERRUPTED, {
                    "message": f"process {record.pid or status.pid} {how} without a final status; resume to continue "
                               "from the last checkpoint"}
        if state != status.state or changes:
            status = job.write_status(dataclasses.replace(status, state=state, eta_seconds=None, **changes))
        record = self._write_record(path, dataclasses.replace(record, pid=None, pid_create_time=None, requested=None))
        if state in (JobState.COMPLETED, JobState.STOPPED):
            record = self._publish(path, record)
        log.info("job %s ended: %s (%s)", record.id, state.value, status.message)
        if self.on_finish is not None:
            self._pending_events.append((self.on_finish, self._info_of(path)))

    # ------------------------------------------------------------------------------------------------------------
    # publishing the concept model

    def _publish_path(self, name: str) -> Path | None:
        return None if self.publish_dir is None else self.publish_dir / f"{name}{CONCEPT_SUFFIX}"

    def _publish(self, path: Path, record: JobRecord) -> JobRecord:
        """Copy the newest checkpoint's concept model to `<publish_dir>/<name>.safetensors` (atomically)."""
        from trainer.checkpoints import latest_checkpoint  # imports torch: only when there is something to publish

        target = self._publish_path(path.name)
        checkpoint = latest_checkpoint(JobFolder(path).checkpoints_dir)
        if target is None or checkpoint is None or record.published_step == checkpoint.step:
            return record
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, checkpoint.concept_path.read_bytes())
        log.info("job %s: published step %d as %s", record.id, checkpoint.step, target)
        return self._write_record(path, dataclasses.replace(record, published=str(target),
                                                            published_step=checkpoint.step))

    # ------------------------------------------------------------------------------------------------------------
    # scheduling

    def tick(self) -> list[str]:
        """Reap ended processes, mark orphans interrupted, start queued jobs where a device slot is free.
        Returns the ids started."""
        with self._locked():
            return self._schedule()

    def _schedule(self) -> list[str]:
        for job_id in self._job_ids():
            self._refresh(job_id)
        running: dict[str, int] = {}
        queued: list[tuple[Path, JobRecord]] = []
        for job_id in self._job_ids():
            path = self.root / job_id
            status = JobFolder(path).read_status()
            if status is None:
                continue
            record = self._read_record(path)
            if status.state in ACTIVE_STATES:
                running[record.device] = running.get(record.device, 0) + 1
            elif status.state == JobState.QUEUED:
                queued.append((path, record))
        started = []
        for path, record in sorted(queued, key=lambda item: item[1].seq):
            if running.get(record.device, 0) < self.max_running_per_device:
                self._start(path, record)
                running[record.device] = running.get(record.device, 0) + 1
                started.append(record.id)
        return started

    def start_background(self, interval_s: float = 2.0) -> None:
        """Tick every `interval_s` seconds on a daemon thread (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop_thread.clear()
            self._thread = threading.Thread(target=self._run_background, args=(interval_s,), daemon=True,
                                            name="gcfg-jobs")
            self._thread.start()

    def _run_background(self, interval_s: float) -> None:
        while not self._stop_thread.wait(interval_s):
            try:
                self.tick()
            except OSError as e:  # a full disk or a vanished folder must not end the scheduler
                log.warning("job scheduler: %s", e)

    def shutdown(self) -> None:
        """Stop the background thread; running jobs keep running (a new manager re-attaches)."""
        self._stop_thread.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        self._thread = None


def _last_error_line(process_log: Path) -> str | None:
    """The most telling line of a failed trainer's output: the CLI's "error: ..." or the exception line."""
    lines = tail_lines(process_log, 200)
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line):
            return line
    return lines[-1] if lines else None
