"""Which process does what under `accelerate launch`: one Accelerator per run, and job-folder IO on process 0 only.

Every process runs the same loop (DDP); only process 0 (`JobReporter(enabled=True)`) writes status.json,
events.jsonl, the loss plot, checkpoints and previews. Single-process runs are the one-process case of the same code.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.jobfolder import JobFolder, JobState, JobStatus, utc_now_iso

log = logging.getLogger("gcfg.trainer.distributed")

STATUS_MIN_INTERVAL_S = 1.0  # status.json is fsynced on every write; a few per second is plenty for the tab


def resolve_device(config: TrainConfig) -> torch.device:
    """The device named by `config.device` ('auto' = CUDA when available, else CPU)."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def make_accelerator(config: TrainConfig) -> Any:
    """`Accelerator(mixed_precision, gradient_accumulation_steps)` for this config and the launched processes."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    device = resolve_device(config)
    cpu = device.type == "cpu"
    if device.type == "cuda" and device.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)  # single-process run on a chosen GPU; launched runs use their local rank
    # Process 0 may build the latent cache while the others wait in a collective; the default 30-minute timeout
    # would kill long builds (sd-scripts #971), so allow a day.
    timeout = datetime.timedelta(hours=24)
    # PartialState initialises the process group (first call wins), so it gets the timeout too.
    num_processes = PartialState(cpu=cpu, timeout=timeout).num_processes
    return Accelerator(mixed_precision=config.mixed_precision.value, cpu=cpu,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
                       gradient_accumulation_steps=config.gradient_accumulation(num_processes))


def release_accelerator(accelerator: Any) -> None:
    """Forget Accelerate's process-wide state after a single-process run, so that the next run in the same
    process (tests, a notebook) may choose another mixed precision; distributed runs end with the process."""
    from accelerate.state import AcceleratorState, GradientState

    if accelerator.num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


class JobReporter:
    """Status, events and loss plot of a job; a no-op on processes other than 0 (`enabled=False`)."""

    def __init__(self, job: JobFolder, *, enabled: bool = True):
        self.job = job
        self.enabled = enabled
        self.status = JobStatus(pid=os.getpid(), started=utc_now_iso())
        self._last_write = 0.0
        if enabled:
            job.create()

    def update(self, state: JobState | None = None, *, force: bool = False, **fields: Any) -> None:
        """Change status fields; written at once on a state change or `force`, else at most once a second."""
        changed_state = state is not None and state != self.status.state
        if state is not None:
            fields["state"] = state
        self.status = dataclasses.replace(self.status, **fields)
        now = time.monotonic()
        if self.enabled and (changed_state or force or now - self._last_write >= STATUS_MIN_INTERVAL_S):
            self.job.write_status(self.status)
            self._last_write = now

    def event(self, event: Mapping[str, Any]) -> None:
        if self.enabled:
            self.job.append_event(event)

    def loss_plot(self) -> None:
        if self.enabled:
            self.job.write_loss_plot()

    def skipped_files(self, report: str) -> None:
        if self.enabled:
            self.job.write_skipped_files(report)
