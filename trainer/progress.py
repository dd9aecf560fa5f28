"""Console progress of the long phases (latent caching, training): a bar on a terminal, log lines everywhere else.

On a terminal, a tqdm bar on stderr (position/total, rate, ETA, plus values such as the loss). When stderr is a
file or a pipe (the WebUI's job manager, `nohup`, a cluster's log), bars would be carriage-return noise, so one
log line is written every `every` units (about 20 lines per run by default) and at least every
`HEARTBEAT_S` seconds while something moves — the way kohya's and OneTrainer's logs read.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("gcfg.trainer.progress")

HEARTBEAT_S = 60.0
LINES_PER_RUN = 20


def format_duration(seconds: float | None) -> str:
    """`1h02m`, `3m07s` or `-` for unknown."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ConsoleProgress:
    """Progress of one phase from `initial` to `total` units; `update(done, **values)` takes the absolute position."""

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, every: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.enabled = enabled
        self.every = every or max(1, total // LINES_PER_RUN)
        self._clock = clock
        self._start = self._last_time = clock()
        self._last_logged = initial
        stream = stream if stream is not None else sys.stderr
        self._bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
                     if enabled and _isatty(stream) else None)

    def rate(self, done: int) -> float | None:
        """Units per second since the start (None before any unit)."""
        elapsed = self._clock() - self._start
        return (done - self.initial) / elapsed if done > self.initial and elapsed > 0 else None

    def line(self, done: int, values: Mapping[str, str]) -> str:
        """One log line: `training: step 10/20 (50%), loss 0.87, 1.9 images/s, 0m05s left`."""
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate else None
        shown = "".join(f", {key} {value}" for key, value in values.items())
        percent = 100 * done // self.total if self.total else 100
        return f"{self.desc}: {self.unit} {done}/{self.total} ({percent}%){shown}, {format_duration(eta)} left"

    def update(self, done: int, **values: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            if values:
                self._bar.set_postfix(values, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        now = self._clock()
        due = (done - self._last_logged >= self.every or done >= self.total
               or (done > self._last_logged and now - self._last_time >= HEARTBEAT_S))
        if due:
            log.info("%s", self.line(done, values))
            self._last_logged, self._last_time = done, now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
