"""A training job is a folder; the trainer process writes it, the WebUI tab (any process, any time) reads it.

    <job>/config.json        the TrainConfig (trainer.config)
    <job>/status.json        JobStatus, replaced atomically: readers never see a partial file
    <job>/events.jsonl       one JSON object per line (step, loss, lr, images/s, memory), append-only
    <job>/loss.png           loss curve, redrawn by the trainer from the events
    <job>/train.log          the "gcfg" logger hierarchy
    <job>/skipped_files.txt  images the dataset scan left out, with reasons
    <job>/cache/             latent cache (trainer.latent_cache)
    <job>/checkpoints/       checkpoints and train state
    <job>/previews/          preview grids
    <job>/stop.request       written by the job manager: the pid of the trainer that should save and stop

Nothing here lives only in a process's memory, so a reloaded page or a restarted WebUI re-attaches by reading
the folder (anchors-training.md, complaint 6).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from PIL import Image, ImageDraw, ImageFont

from gcfg_core.fileio import atomic_write_bytes, atomic_write_text

__all__ = ["JobState", "JobStatus", "JobFolder", "configure_file_logging", "render_loss_plot", "smooth",
           "nice_ticks", "tick_labels", "pid_alive", "atomic_write_bytes", "atomic_write_text", "ACTIVE_STATES",
           "FINAL_STATES"]

log = logging.getLogger("gcfg.trainer.jobfolder")


class JobState(str, enum.Enum):
    QUEUED = "queued"
    PREPARING = "preparing"  # scanning images, loading models
    CACHING = "caching"  # VAE-encoding the latent cache
    CALIBRATING = "calibrating"  # computing the null-text vectors
    TRAINING = "training"
    STOPPING = "stopping"  # stop requested: saving a checkpoint before exiting
    STOPPED = "stopped"  # stopped with a checkpoint: resumable
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped without keeping progress
    INTERRUPTED = "interrupted"  # the process died (killed, OOM-killed, power loss): resumable from the last save


ACTIVE_STATES = frozenset({JobState.PREPARING, JobState.CACHING, JobState.CALIBRATING, JobState.TRAINING,
                           JobState.STOPPING})
FINAL_STATES = frozenset({JobState.STOPPED, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
                          JobState.INTERRUPTED})


def utc_now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class JobStatus:
    """Snapshot of a job for the tab: phase, progress, speed, ETA and the last error."""

    state: JobState = JobState.QUEUED
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    images_per_second: float | None = None
    eta_seconds: float | None = None
    last_error: str | None = None
    updated: str = ""  # ISO 8601 UTC; set by `JobFolder.write_status`
    pid: int | None = None
    message: str = ""  # one line for humans, e.g. "caching latents 1,024 / 70,000"
    phase_done: int = 0  # progress inside preparing/caching/calibrating
    phase_total: int = 0
    started: str | None = None
    last_checkpoint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", JobState(self.state))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobStatus:
        """Unknown keys are ignored: a newer trainer may add fields an older tab does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists (and is not a zombie)."""
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class JobFolder:
    """Paths and readers/writers of one job folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"JobFolder({str(self.path)!r})"

    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    events_path = property(lambda self: self.path / "events.jsonl")
    log_path = property(lambda self: self.path / "train.log")
    loss_plot_path = property(lambda self: self.path / "loss.png")
    skipped_files_path = property(lambda self: self.path / "skipped_files.txt")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    previews_dir = property(lambda self: self.path / "previews")
    cache_dir = property(lambda self: self.path / "cache")
    stop_request_path = property(lambda self: self.path / "stop.request")

    def create(self) -> JobFolder:
        """Make the folder and its sub-folders (idempotent)."""
        for directory in (self.path, self.checkpoints_dir, self.previews_dir, self.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)
        return self

    # --- status

    def write_status(self, status: JobStatus) -> JobStatus:
        """Atomically replace status.json (stamping `updated`); returns the status written."""
        status = dataclasses.replace(status, updated=utc_now_iso())
        atomic_write_text(self.status_path, json.dumps(status.to_dict(), indent=1) + "\n")
        return status

    def read_status(self) -> JobStatus | None:
        """The last status written, or None if there is none (or it is unreadable)."""
        try:
            data = json.loads(self.status_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("cannot read %s: %s", self.status_path, e)
            return None
        try:
            return JobStatus.from_dict(data)
        except (TypeError, ValueError) as e:
            log.warning("cannot read %s: %s", self.status_path, e)
            return None

    def update_status(self, **changes: Any) -> JobStatus:
        """Read, change some fields, write (only the trainer process writes, so no lock is needed)."""
        return self.write_status(dataclasses.replace(self.read_status() or JobStatus(), **changes))

    def effective_status(self) -> JobStatus | None:
        """The status as a reader should show it: an active state whose process is gone reads as interrupted."""
        status = self.read_status()
        if status is not None and status.state in ACTIVE_STATES and not pid_alive(status.pid):
            return dataclasses.replace(status, state=JobState.INTERRUPTED,
                                       message=f"process {status.pid} ended without a final status")
        return status

    # --- stop requests (a signal-free stop that works on Windows too; the trainer polls it)

    def request_stop(self, pid: int) -> None:
        """Ask the trainer process `pid` of this job to save a checkpoint and stop."""
        atomic_write_text(self.stop_request_path, f"{pid}\n")

    def stop_requested(self, pid: int) -> bool:
        """Whether a stop was requested for process `pid` (a file naming another pid is left over from an earlier
        run and ignored)."""
        try:
            return self.stop_request_path.read_text(encoding="utf-8").strip() == str(pid)
        except (FileNotFoundError, UnicodeDecodeError):
            return False

    def clear_stop_request(self) -> None:
        self.stop_request_path.unlink(missing_ok=True)

    # --- events

    def append_event(self, event: Mapping[str, Any]) -> None:
        """Append one JSON line (a `time` field, Unix seconds, is added when absent) and flush it.

        Not fsynced: losing the last few events in a power cut is harmless, an fsync per step is not free.
        """
        record = {"time": round(dt.datetime.now().timestamp(), 3), **event}
        line = json.dumps(record, allow_nan=False, default=_json_default) + "\n"
        with open(self.events_path, "ab") as f:
            if f.tell() > 0:  # a writer killed mid-line left a torn tail: start on a fresh line
                with open(self.events_path, "rb") as tail:
                    tail.seek(-1, os.SEEK_END)
                    if tail.read(1) != b"\n":
                        line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()

    def read_events(self) -> list[dict[str, Any]]:
        """All events; a torn last line (the writer was killed mid-write) and malformed lines are skipped."""
        try:
            text = self.events_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        events = []
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):  # the last (unterminated) line may simply be mid-write
                    log.warning("skipping malformed line %d of %s", number, self.events_path)
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def write_loss_plot(self, events: Sequence[Mapping[str, Any]] | None = None) -> Path:
        """Render the loss curve of `events` (default: the events file) to loss.png, atomically."""
        atomic_write_bytes(self.loss_plot_path, render_loss_plot(self.read_events() if events is None else events))
        return self.loss_plot_path

    def write_skipped_files(self, report: str) -> None:
        atomic_write_text(self.skipped_files_path, report)


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"event value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def configure_file_logging(job: JobFolder, level: int = logging.INFO) -> logging.Handler:
    """Send the "gcfg" logger hierarchy to the job's log file (once per file); returns the handler."""
    logger = logging.getLogger("gcfg")
    target = os.path.abspath(job.log_path)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == target:
            return handler
    job.path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    return handler


# --- loss plot (PIL only: matplotlib is not a dependency)

def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): no pull towards 0 at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """About `count` round tick values (1, 2, 2.5, 5 × 10^k steps) within [lo, hi]; `integer`: steps ≥ 1."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    magnitude = 10 ** math.floor(math.log10((hi - lo) / max(count, 1)))
    # The round step whose tick count is closest to `count` (ties: the coarser step).
    step = min((m * magnitude for m in (10, 5, 2.5, 2, 1)), key=lambda st: abs((hi - lo) / st - count))
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels with just enough decimals for the tick spacing; "12k" style when the values reach 10,000."""
    if not ticks:
        return []
    spacing = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(ticks[0]) or 1.0
    if max(abs(t) for t in ticks) >= 10_000 and spacing >= 1000:
        return [f"{t / 1000:g}k" if t else "0" for t in ticks]
    decimals = next((d for d in range(9) if abs(round(spacing, d) - spacing) <= 1e-9 * spacing), 9)
    return [f"{t:.{decimals}f}" for t in ticks]


def _bundled_ttf() -> str | None:
    """A TrueType font that ships with matplotlib (gradio's dependency, so in every WebUI venv), found without
    importing matplotlib."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
    return path if os.path.isfile(path) else None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 (WebUI 1.10.1 pins 9.5) has no sized default font
        pass
    ttf = _bundled_ttf()
    if ttf is not None:
        try:
            return ImageFont.truetype(ttf, size)
        except (OSError, ImportError):  # Pillow without FreeType
            pass
    return ImageFont.load_default()  # a small bitmap font: still readable, not at this size


def _loss_points(events: Iterable[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    steps, losses = [], []
    for e in events:
        step, loss = e.get("step"), e.get("loss")
        if isinstance(step, int | float) and isinstance(loss, int | float) and math.isfinite(loss):
            steps.append(float(step))
            losses.append(float(loss))
    return steps, losses


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


# (background, axis, grid, text, raw points, smoothed line) per theme; both keep the text at ≥ 7:1 contrast.
PLOT_THEMES = {
    "light": ((255, 255, 255), (60, 60, 60), (232, 232, 232), (33, 33, 33), (160, 190, 230), (25, 90, 180)),
    "dark": ((24, 24, 27), (190, 190, 190), (58, 58, 64), (235, 235, 235), (70, 100, 150), (110, 170, 255)),
}


def render_loss_plot(events: Iterable[Mapping[str, Any]], *, width: int = 800, height: int = 400,
                     smoothing: float | None = None, theme: str = "light") -> bytes:
    """PNG of loss against step: raw points, smoothed curve, axes with round ticks; drawn 2× then downsampled.

    `smoothing`: EMA weight of the curve; default adapts to the run length. `theme`: "light" or "dark". Text is
    sized for the image shown at its own size (at least 13 px labels at 800 px wide).
    """
    if theme not in PLOT_THEMES:
        raise ValueError(f"theme={theme!r} is not one of {', '.join(PLOT_THEMES)}")
    s = 2  # supersampling factor: PIL draws aliased lines
    W, H = width * s, height * s
    background, axis, grid, text, raw_colour, line_colour = PLOT_THEMES[theme]
    img = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(img)
    scale = max(1.0, width / 800)
    font, small = _font(round(16 * scale) * s), _font(round(14 * scale) * s)
    left, right, top, bottom = round(78 * scale) * s, 20 * s, round(40 * scale) * s, round(52 * scale) * s
    x0, x1, y0, y1 = left, W - right, top, H - bottom

    steps, losses = _loss_points(events)
    draw.text((x0, 10 * s), "training loss", fill=text, font=font)
    if not steps:
        draw.rectangle((x0, y0, x1, y1), outline=axis, width=s)
        draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "no loss values yet", fill=text, font=font, anchor="mm")
        return _png(img.resize((width, height), Image.Resampling.LANCZOS))

    if smoothing is None:  # average over ~1 % of the run (at least 10 points) so long runs stay readable
        smoothing = 1 - 1 / max(10, len(losses) / 100)
    smoothed = smooth(losses, smoothing)
    ordered = sorted(losses)
    # Robust y range: one diverged step should not flatten the whole curve.
    y_lo = min(_percentile(ordered, 0.01), min(smoothed))
    y_hi = max(_percentile(ordered, 0.99), max(smoothed))
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1), y_hi + 0.5 * (abs(y_hi) or 1)
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_pad = 0.01 * (x_hi - x_lo)  # keep the first and last dots off the frame
    x_lo, x_hi = x_lo - x_pad, x_hi + x_pad

    def px(step: float) -> float:
        return x0 + (step - x_lo) / (x_hi - x_lo) * (x1 - x0)

    def py(loss: float) -> float:
        return y1 - (min(max(loss, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * (y1 - y0)

    for ticks, horizontal in ((nice_ticks(y_lo, y_hi, 5), True), (nice_ticks(x_lo, x_hi, 6, integer=True), False)):
        for value, label in zip(ticks, tick_labels(ticks), strict=True):
            if horizontal:
                y = py(value)
                draw.line((x0, y, x1, y), fill=grid, width=s)
                draw.line((x0 - 5 * s, y, x0, y), fill=axis, width=s)
                draw.text((x0 - 8 * s, y), label, fill=text, font=small, anchor="rm")
            else:
                x = px(value)
                draw.line((x, y0, x, y1), fill=grid, width=s)
                draw.line((x, y1, x, y1 + 5 * s), fill=axis, width=s)
                draw.text((x, y1 + 8 * s), label, fill=text, font=small, anchor="ma")

    stride = max(1, len(steps) // 4000)  # cap the dots drawn; the smoothed line still uses every value
    r = 1.5 * s
    for step, loss in zip(steps[::stride], losses[::stride], strict=False):
        x, y = px(step), py(loss)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=raw_colour)
    line = _thin_line([(px(a), py(b)) for a, b in zip(steps, smoothed, strict=True)])
    if len(line) > 1:
        draw.line(line, fill=line_colour, width=2 * s, joint="curve")
    else:
        draw.ellipse((line[0][0] - 3 * s, line[0][1] - 3 * s, line[0][0] + 3 * s, line[0][1] + 3 * s),
                     fill=line_colour)

    draw.rectangle((x0, y0, x1, y1), outline=axis, width=s)
    draw.text(((x0 + x1) // 2, H - 6 * s), "step", fill=text, font=small, anchor="md")
    summary = f"last {losses[-1]:.4g}   smoothed {smoothed[-1]:.4g}   steps {int(steps[-1])}"
    draw.text((x1, 10 * s), summary, fill=text, font=small, anchor="ra")
    return _png(img.resize((width, height), Image.Resampling.LANCZOS))


def _thin_line(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Keep one point per horizontal pixel column (the last), so a million steps draw as fast as a thousand."""
    out: list[tuple[float, float]] = []
    for point in points:
        if out and int(out[-1][0]) == int(point[0]):
            out[-1] = point
        else:
            out.append(point)
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
