"""Stop requests the trainer honours besides SIGINT/SIGTERM (trainer.loop.stop_on_signals):

* the job folder's stop file naming this process (`JobFolder.request_stop`): how the job manager stops a run on
  Windows, where there is no SIGTERM; polled wherever the loop checks its stop flag (once per optimizer step,
  between latent-cache batches);
* on Windows, Ctrl+Break in the trainer's console (SIGBREAK), which would otherwise end the process unsaved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

from trainer.jobfolder import JobFolder
from trainer.loop import StopFlag

log = logging.getLogger("gcfg.trainer.stopping")


@dataclass
class StopFileFlag(StopFlag):
    """A `StopFlag` that is also set by a stop file naming `pid` in `job`'s folder."""

    job: JobFolder | None = None
    pid: int = field(default_factory=os.getpid)

    def is_set(self) -> bool:
        if not super().is_set() and self.job is not None and self.job.stop_requested(self.pid):
            self.request("stop requested by the job manager")
            log.warning("stop requested by the job manager: saving a checkpoint and stopping after this step")
        return super().is_set()


@contextlib.contextmanager
def stop_on_break(stop: StopFlag) -> Iterator[None]:
    """While inside: Ctrl+Break requests a clean stop (Windows; a no-op where SIGBREAK does not exist)."""
    sigbreak = getattr(signal, "SIGBREAK", None)
    if sigbreak is None or not _in_main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        stop.request("Ctrl+Break received")
        log.warning("Ctrl+Break received: saving a checkpoint and stopping after this step")

    previous = signal.signal(sigbreak, handler)
    try:
        yield
    finally:
        signal.signal(sigbreak, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
