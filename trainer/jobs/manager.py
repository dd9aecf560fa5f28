"""Training jobs for the WebUI tab and the REST routes: a FIFO queue of trainer processes over job folders.

Each job is a folder `<root>/<id>/` (trainer.jobfolder) plus one file the manager owns, `job.json` (queue order,
device, process identity, the pending stop/cancel request, what it published). The parts, each testable alone:

    store       trainer.jobs.store       folders, records, configs, logs, the cross-process lock
    scheduler   trainer.jobs.scheduler   FIFO per device, N running per device
    supervisor  trainer.jobs.supervisor  starting, recognising, stopping and killing trainer processes
    publisher   trainer.jobs.publisher   the concept model copied to the WebUI's model folder, never clobbering
    losses      trainer.jobs.losses      loss points and the PNG plot

Job control:
    stop    the trainer saves a checkpoint and ends as "stopped"; `resume` continues at the same step.
    cancel  the process tree is killed at once; the job ends as "cancelled" and is not resumable. Checkpoints
            already on disk stay until the job is deleted.
    resume  back into the queue; started with `python -m trainer resume <job>` (exact resume from the newest
            checkpoint, or from step 0 when there is none).
    delete  removes the folder of a job that is not running.

A new `JobManager` on the same root re-attaches by reading the folders; an active job whose process is gone is
marked "interrupted" (resumable). Pure Python on top of trainer.jobfolder: no torch at import, no WebUI, no gradio.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, TrainConfig, check_resume_compatible
from trainer.jobfolder import ACTIVE_STATES, JobFolder, JobState, JobStatus, utc_now_iso
from trainer.jobs.losses import LossCache
from trainer.jobs.model import (
    DEVICE_RE,
    PROCESS_LOG_FILE,
    JobAction,
    JobConflictError,
    JobError,
    JobInfo,
    JobNotFoundError,
    JobRecord,
    allowed_actions,
    normalize_device,
    progress_fraction,
    sanitize_name,
)
from trainer.jobs.publisher import Publisher
from trainer.jobs.scheduler import jobs_to_start, next_seq, queue_positions
from trainer.jobs.store import JobStore, last_error_line
from trainer.jobs.supervisor import LaunchSpec, ProcessSupervisor, stopped_by_stop_signal

log = logging.getLogger("gcfg.trainer.jobs")

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
        self.store = JobStore(root, default_device)
        self.supervisor = ProcessSupervisor(launch or LaunchSpec())
        self.publisher = Publisher(publish_dir)
        self.losses = LossCache()
        self.default_device = default_device
        self.max_running_per_device = max_running_per_device
        self.on_start, self.on_finish = on_start, on_finish
        self.cancel_wait_s = cancel_wait_s
        self._events_lock = threading.Lock()
        self._pending_events: list[tuple[OnJobEvent, JobInfo]] = []
        self._thread: threading.Thread | None = None
        self._thread_guard = threading.Lock()
        self._stop_thread = threading.Event()

    root = property(lambda self: self.store.root)
    launch = property(lambda self: self.supervisor.launch)
    publish_dir = property(lambda self: self.publisher.publish_dir)

    # ------------------------------------------------------------------------------------------------------------
    # locking and callbacks

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self.store.locked():
            yield
        self._fire_events()

    def _fire_events(self) -> None:
        with self._events_lock:
            events, self._pending_events = self._pending_events, []
        for callback, info in events:
            try:
                callback(info)
            except Exception:  # noqa: BLE001 - a failing UI hook must not break the scheduler
                log.exception("job callback %s failed for %s", getattr(callback, "__name__", callback), info.id)

    def _queue_event(self, callback: OnJobEvent | None, path: Path) -> None:
        if callback is not None:
            with self._events_lock:
                self._pending_events.append((callback, self._info_of(path)))

    def job_path(self, job_id: str) -> Path:
        return self.store.job_path(job_id)

    # ------------------------------------------------------------------------------------------------------------
    # the view of a job

    def _info(self, path: Path, record: JobRecord, status: JobStatus | None, queue_position: int | None) -> JobInfo:
        status = status or JobStatus()
        config = self.store.read_config(path)
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
            published_step=record.published_step,
            dataset_dir=config.dataset_dir if config else "", base_checkpoint=config.base_checkpoint if config else "",
            unload_webui_model=record.unload_webui_model)

    def _snapshot(self) -> list[JobInfo]:
        entries = self.store.entries()
        positions = queue_positions((record, status) for _, record, status in entries)
        entries.sort(key=lambda e: e[1].seq, reverse=True)
        return [self._info(path, record, status, positions.get(record.id)) for path, record, status in entries]

    def _info_of(self, path: Path) -> JobInfo:
        for info in self._snapshot():
            if info.id == path.name:
                return info
        raise JobNotFoundError("job_id", f"no job {path.name!r}")  # pragma: no cover - raced with a delete

    # ------------------------------------------------------------------------------------------------------------
    # queries

    def list_jobs(self) -> list[JobInfo]:
        """Every job, newest first."""
        with self._locked():
            return self._snapshot()

    def get(self, job_id: str) -> JobInfo:
        with self._locked():
            return self._info_of(self.job_path(job_id))

    def config(self, job_id: str) -> TrainConfig:
        path = self.job_path(job_id)
        config = self.store.read_config(path)
        if config is None:
            raise JobError("job_id", f"job {job_id!r} has an unreadable config.json")
        return config

    def log_tail(self, job_id: str, max_lines: int = 60) -> str:
        """The end of the job's log, with the process output when the log is empty or the job failed."""
        path = self.job_path(job_id)
        status = JobFolder(path).read_status()
        failed = status is not None and status.state in (JobState.FAILED, JobState.INTERRUPTED)
        return self.store.log_tail(path, max_lines, with_process_output=failed)

    def loss_points(self, job_id: str) -> list[dict[str, float]]:
        """Every (step, loss) point of the job so far."""
        return self.losses.points(job_id, JobFolder(self.job_path(job_id)).events_path)

    def loss_plot_png(self, job_id: str, *, min_interval_s: float = 3.0, theme: str = "light") -> bytes:
        """The loss curve as PNG ("light" or "dark"), redrawn when new points arrived (at most every
        `min_interval_s`)."""
        return self.losses.png(job_id, JobFolder(self.job_path(job_id)).events_path, min_interval_s=min_interval_s,
                               theme=theme)

    def latest_preview(self, job_id: str) -> Path | None:
        return self.store.latest_preview(self.job_path(job_id))

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
        if not DEVICE_RE.fullmatch(config.device):
            raise JobError("device", f"device={config.device!r} is not valid")
        config.validate(check_paths=True)
        with self._locked():
            if path.exists() or path.is_symlink():
                raise JobConflictError("name", f"name={config.name!r} is already used by a job; choose another name "
                                               "or delete that job")
            if self.publisher.name_taken(config.name):
                raise JobConflictError("name", f"name={config.name!r}: a concept model "
                                               f"{str(self.publisher.target(config.name))!r} already exists; choose "
                                               "another name")
            job = JobFolder(path).create()
            config.save(job.config_path)
            record = JobRecord(id=config.name, created=utc_now_iso(), seq=self._next_seq(),
                               device=normalize_device(config.device, self.default_device),
                               unload_webui_model=unload_webui_model)
            self.store.write_record(path, record)
            job.write_status(JobStatus(state=JobState.QUEUED, total_steps=config.max_steps, message="queued"))
            log.info("created job %s (%s)", config.name, record.device)
            if start:
                self._schedule()
            return self._info_of(path)

    def _next_seq(self) -> int:
        return next_seq(record for _, record, _ in self.store.entries())

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

    def _process_of(self, path: Path, record: JobRecord, status: JobStatus | None) -> tuple[int | None, float | None]:
        """(pid, start time) the job's trainer should have: the record's, else the status's (without a start time,
        so the command line alone decides)."""
        if record.pid is not None:
            return record.pid, record.pid_create_time
        return (status.pid if status is not None else None), None

    def stop(self, job_id: str) -> JobInfo:
        """Ask a running job to save a checkpoint and end as "stopped" (resumable); returns at once."""
        with self._locked():
            path, _ = self._prepare_action(job_id, JobAction.STOP)
            record = self.store.update_record(path, requested=JobAction.STOP.value)
            pid, create_time = self._process_of(path, record, JobFolder(path).read_status())
            self.supervisor.request_stop(job_id, pid, create_time, path)
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
            record = self.store.update_record(path, requested=JobAction.CANCEL.value)
            pid, create_time = self._process_of(path, record, job.read_status())
            self.supervisor.kill(job_id, pid, create_time, path, wait_s=self.cancel_wait_s)
            self._refresh(job_id)
            self._schedule()
            log.info("cancelled job %s", job_id)
            return self._info_of(path)

    def resume(self, job_id: str, **overrides: Any) -> JobInfo:
        """Queue a stopped, interrupted or failed job again; `overrides` may change the fields listed in
        `trainer.config.RESUME_MUTABLE_FIELDS` (e.g. max_steps, learning_rate)."""
        with self._locked():
            path, info = self._prepare_action(job_id, JobAction.RESUME)
            self._wait_exited(path)
            if overrides:
                old = self.config(job_id)
                if {"job_dir", "name"} & set(overrides):
                    raise ConfigError("job_dir and name cannot change on resume")
                new = old.with_overrides(**overrides)
                check_resume_compatible(old, new)
                new.save(path / "config.json")
            config = self.config(job_id)
            self.store.update_record(path, seq=self._next_seq(), requested=None,
                                     device=normalize_device(config.device, self.default_device))
            JobFolder(path).update_status(state=JobState.QUEUED, pid=None, eta_seconds=None, last_error=None,
                                          total_steps=config.max_steps, message="queued to resume")
            log.info("queued job %s to resume", job_id)
            self._schedule()
            return self._info_of(path)

    def delete(self, job_id: str) -> None:
        """Remove a job that is not running, with everything in its folder (published concept models stay)."""
        with self._locked():
            self._prepare_action(job_id, JobAction.DELETE)
            self.store.delete_folder(job_id)
            self.losses.forget(job_id)
            log.info("deleted job %s", job_id)

    # ------------------------------------------------------------------------------------------------------------
    # processes

    def _wait_exited(self, path: Path) -> None:
        """A trainer writes its final status a moment before its process ends: wait for that end (and record it),
        so a resume never races the exit of the previous run."""
        record = self.store.read_record(path)
        if record.pid is not None or self.supervisor.is_child(path.name):
            self.supervisor.wait_exited(path.name, record.pid, record.pid_create_time, path, self.cancel_wait_s)
            self._refresh(path.name)

    def _start(self, path: Path, record: JobRecord) -> None:
        job = JobFolder(path)
        config = self.store.read_config(path)
        if config is None:
            job.update_status(state=JobState.FAILED, last_error="config.json is unreadable", message="failed")
            return
        # First launch: `train` (creates the run); any later one: `resume` (newest checkpoint, or step 0).
        args = ("-q", "resume", str(path)) if record.launches else ("-q", "train", "--config", str(job.config_path))
        try:
            handle = self.supervisor.start(record.id, args, path, path / PROCESS_LOG_FILE)
        except OSError as e:
            job.update_status(state=JobState.FAILED, last_error=f"cannot start the trainer: {e}",
                              message="failed to start")
            log.error("job %s: cannot start the trainer: %s", record.id, e)
            return
        self.store.write_record(path, dataclasses.replace(record, launches=record.launches + 1, pid=handle.pid,
                                                          pid_create_time=handle.create_time, requested=None))
        # The trainer writes its own status within seconds; until then the job reads as preparing under this pid.
        job.update_status(state=JobState.PREPARING, pid=handle.pid, last_error=None, started=utc_now_iso(),
                          total_steps=config.max_steps, message="starting the trainer")
        self._queue_event(self.on_start, path)

    def _refresh(self, job_id: str) -> None:
        """Bring one job's status up to date: reap an ended child, mark a vanished process interrupted."""
        path = self.root / job_id
        job = JobFolder(path)
        status = job.read_status()
        if status is None:
            return
        record = self.store.read_record(path)
        if self.supervisor.is_child(job_id):
            ended, code = self.supervisor.reap(job_id)
            if ended:
                self._finish(path, record, job.read_status() or status, code)
            return
        if status.state in ACTIVE_STATES:
            pid, create_time = self._process_of(path, record, status)
            if not self.supervisor.alive(job_id, pid, create_time, path):
                self._finish(path, record, status, None)
        elif record.pid is not None:  # ended while nobody watched (e.g. during a WebUI restart)
            self._finish(path, record, status, None)

    def _finish(self, path: Path, record: JobRecord, status: JobStatus, returncode: int | None) -> None:
        """Record how a job's process ended, publish its concept model, free its slot."""
        job = JobFolder(path)
        state, changes = status.state, {}
        if record.requested == JobAction.CANCEL.value and state != JobState.COMPLETED:
            state, changes = JobState.CANCELLED, {"message": "cancelled", "last_error": None}
        elif state in ACTIVE_STATES:
            if record.requested == JobAction.STOP.value and stopped_by_stop_signal(returncode):
                # The stop signal arrived before the trainer installed its handler (while importing): nothing saved.
                state, changes = JobState.STOPPED, {"message": "stopped before training started; resume to start"}
            elif returncode is not None and returncode > 0:
                error = last_error_line(path / PROCESS_LOG_FILE) or f"trainer exited with code {returncode}"
                state, changes = JobState.FAILED, {"message": "failed", "last_error": error}
            else:
                how = f"was killed by signal {-returncode}" if returncode is not None and returncode < 0 else "ended"
                state, changes = JobState.INTERRUPTED, {
                    "message": f"process {record.pid or status.pid} {how} without a final status; resume to continue "
                               "from the last checkpoint"}
        if state != status.state or changes:
            status = job.write_status(dataclasses.replace(status, state=state, eta_seconds=None, **changes))
        job.clear_stop_request()
        record = self.store.write_record(path, dataclasses.replace(record, pid=None, pid_create_time=None,
                                                                   requested=None))
        if state in (JobState.COMPLETED, JobState.STOPPED):
            self._publish(path, record, status)
        log.info("job %s ended: %s (%s)", record.id, state.value, status.message)
        self._queue_event(self.on_finish, path)

    def _publish(self, path: Path, record: JobRecord, status: JobStatus) -> None:
        """Publish the newest checkpoint's concept model; a problem is said in the status, never raised."""
        from trainer.checkpoints import latest_checkpoint  # imports torch: only when there is something to publish

        checkpoint = latest_checkpoint(JobFolder(path).checkpoints_dir)
        if checkpoint is None:
            return
        try:
            result = self.publisher.publish(record.id, checkpoint.concept_path, checkpoint.step, record)
        except OSError as e:
            log.error("job %s: publishing step %d failed: %s", record.id, checkpoint.step, e)
            JobFolder(path).write_status(dataclasses.replace(
                status, message=f"{status.message}; the concept model was not published: {e}"))
            return
        if result.record != record:
            self.store.write_record(path, result.record)
        if result.note:
            JobFolder(path).write_status(dataclasses.replace(status, message=f"{status.message}; {result.note}"))

    # ------------------------------------------------------------------------------------------------------------
    # scheduling

    def tick(self) -> list[str]:
        """Reap ended processes, mark orphans interrupted, start queued jobs where a device slot is free.
        Returns the ids started."""
        with self._locked():
            return self._schedule()

    def _schedule(self) -> list[str]:
        for job_id in self.store.job_ids():
            self._refresh(job_id)
        entries = self.store.entries()
        started = []
        for record in jobs_to_start([(record, status) for _, record, status in entries], self.max_running_per_device):
            self._start(self.root / record.id, record)
            started.append(record.id)
        return started

    def start_background(self, interval_s: float = 2.0) -> None:
        """Tick every `interval_s` seconds on a daemon thread (idempotent)."""
        with self._thread_guard:
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
