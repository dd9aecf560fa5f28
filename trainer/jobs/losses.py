"""A job's loss curve: the (step, loss) points of its events file, read incrementally, thinned for an interactive
plot, and drawn as a PNG (for the REST route and the job folder) at most every few seconds."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

from trainer.jobfolder import render_loss_plot, smooth

PLOT_WIDTH, PLOT_HEIGHT = 800, 360


class LossSeries:
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


def default_smoothing(count: int) -> float:
    """EMA weight that averages over ~1 % of the run (at least 10 points): long runs stay readable."""
    return 1 - 1 / max(10, count / 100)


def plot_rows(points: list[dict[str, float]], max_points: int = 1500) -> list[dict[str, object]]:
    """Rows for a line plot: the raw loss (thinned to about `max_points`, keeping each bucket's last point) and the
    smoothed curve over every point, as {"step", "loss", "series"} with series "loss" or "smoothed"."""
    finite = [p for p in points if isinstance(p.get("step"), int | float) and math.isfinite(p["loss"])]
    if not finite:
        return []
    smoothed = smooth([p["loss"] for p in finite], default_smoothing(len(finite)))
    stride = max(1, math.ceil(len(finite) / max_points))
    keep = list(range(stride - 1, len(finite), stride))
    if keep[-1] != len(finite) - 1:
        keep.append(len(finite) - 1)
    rows: list[dict[str, object]] = []
    for i in keep:
        rows.append({"step": finite[i]["step"], "loss": finite[i]["loss"], "series": "loss"})
    for i in keep:
        rows.append({"step": finite[i]["step"], "loss": smoothed[i], "series": "smoothed"})
    return rows


class LossCache:
    """Loss series and rendered plots of many jobs, shared by the tab's polls and the REST routes (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, LossSeries] = {}
        self._plots: dict[tuple[str, str], tuple[int, float, bytes]] = {}  # (id, theme) -> (points, time, png)

    def points(self, job_id: str, events_path: Path) -> list[dict[str, float]]:
        with self._lock:
            series = self._series.get(job_id)
            if series is None or series.path != events_path:
                series = self._series[job_id] = LossSeries(events_path)
            series.refresh()
            return list(series.points)

    def png(self, job_id: str, events_path: Path, *, min_interval_s: float = 3.0, theme: str = "light") -> bytes:
        """The loss curve as PNG, redrawn when new points arrived (at most every `min_interval_s`)."""
        points = self.points(job_id, events_path)
        key = (job_id, theme)
        with self._lock:
            cached = self._plots.get(key)
            if cached and (cached[0] == len(points) or time.monotonic() - cached[1] < min_interval_s):
                return cached[2]
        png = render_loss_plot(points, width=PLOT_WIDTH, height=PLOT_HEIGHT, theme=theme)
        with self._lock:
            self._plots[key] = (len(points), time.monotonic(), png)
        return png

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._series.pop(job_id, None)
            for key in [k for k in self._plots if k[0] == job_id]:
                del self._plots[key]
