"""Job folder: atomic status, tolerant events, loss plot, file logging."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest
from PIL import Image

from gcfg_core.fileio import atomic_write_bytes, atomic_write_with
from trainer.jobfolder import (
    JobFolder,
    JobState,
    JobStatus,
    configure_file_logging,
    nice_ticks,
    render_loss_plot,
    smooth,
    tick_labels,
)


@pytest.fixture()
def job(tmp_path):
    return JobFolder(tmp_path / "job").create()


def test_layout(job):
    assert job.status_path.name == "status.json" and job.events_path.name == "events.jsonl"
    assert job.config_path.name == "config.json" and job.loss_plot_path.name == "loss.png"
    assert job.checkpoints_dir.is_dir() and job.previews_dir.is_dir() and job.cache_dir.is_dir()


def test_status_round_trip_is_atomic_and_stamped(job):
    assert job.read_status() is None
    written = job.write_status(JobStatus(state="training", step=10, total_steps=100, images_per_second=3.5,
                                         eta_seconds=120.0, pid=os.getpid(), message="hi"))
    assert written.updated and written.state is JobState.TRAINING
    assert job.read_status() == written
    assert json.loads(job.status_path.read_text())["state"] == "training"
    assert sorted(p.name for p in job.path.iterdir() if p.is_file()) == ["status.json"]  # no temp files left
    updated = job.update_status(step=11, last_error="boom")
    assert (updated.step, updated.last_error, updated.total_steps) == (11, "boom", 100)


def test_status_reader_tolerates_newer_fields_and_garbage(job):
    job.status_path.write_text(json.dumps({"state": "queued", "added_later": 1}))
    assert job.read_status() == JobStatus(state=JobState.QUEUED)
    job.status_path.write_text("{not json")
    assert job.read_status() is None


def test_dead_process_reads_as_interrupted(job):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    job.write_status(JobStatus(state=JobState.TRAINING, pid=proc.pid))
    assert job.effective_status().state is JobState.INTERRUPTED
    job.write_status(JobStatus(state=JobState.TRAINING, pid=os.getpid()))
    assert job.effective_status().state is JobState.TRAINING
    job.write_status(JobStatus(state=JobState.COMPLETED, pid=proc.pid))
    assert job.effective_status().state is JobState.COMPLETED


def test_events_append_and_torn_last_line(job):
    assert job.read_events() == []
    job.append_event({"step": 1, "loss": 0.5, "lr": 1e-5, "state": JobState.TRAINING})
    job.append_event({"step": 2, "loss": 0.4})
    with open(job.events_path, "a") as f:
        f.write('{"step": 3, "lo')  # writer killed mid-line
    events = job.read_events()
    assert [e["step"] for e in events] == [1, 2] and events[0]["state"] == "training" and "time" in events[0]
    job.append_event({"step": 3, "loss": 0.3})  # starts a fresh line after the torn fragment
    job.append_event({"step": 4, "loss": 0.2})
    assert [e["step"] for e in job.read_events()] == [1, 2, 3, 4]


def test_events_reject_non_finite_values(job):
    with pytest.raises(ValueError):
        job.append_event({"step": 1, "loss": float("nan")})


def test_smooth_is_debiased_ema():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.083, 0.21) == pytest.approx([0.1, 0.125, 0.15, 0.175, 0.2])
    assert nice_ticks(0, 12000, 5) == [0, 2500, 5000, 7500, 10000]
    assert nice_ticks(0.4, 3.2, 6, integer=True) == [1, 2, 3]
    assert tick_labels([0, 2500, 5000, 10000]) == ["0", "2.5k", "5k", "10k"]
    assert tick_labels([0.1, 0.125, 0.15]) == ["0.100", "0.125", "0.150"]


@pytest.mark.parametrize("events", [[], [{"step": 1, "loss": 0.2}],
                                    [{"step": i, "loss": 1 / (i + 1)} for i in range(500)],
                                    [{"step": 5, "loss": 0.1}, {"state": "caching"}, {"step": 6, "loss": "x"}]])
def test_loss_plot_is_a_png_of_the_requested_size(events):
    img = Image.open(io.BytesIO(render_loss_plot(events, width=400, height=200)))
    assert img.format == "PNG" and img.size == (400, 200)


def test_loss_plot_draws_the_curve(job):
    for i in range(200):
        job.append_event({"step": i, "loss": 0.2 - 0.0005 * i})
    path = job.write_loss_plot()
    img = Image.open(path).convert("RGB")
    blue = sum(1 for r, g, b in img.getdata() if b > 150 and r < 60)  # the smoothed line colour
    assert blue > 200


def test_file_logging_writes_gcfg_hierarchy_once(job):
    handler = configure_file_logging(job)
    try:
        assert configure_file_logging(job) is handler
        logging.getLogger("gcfg.trainer.test").info("hello from the trainer")
        logging.getLogger("other").warning("not ours")
        handler.flush()
        text = job.log_path.read_text()
        assert "INFO gcfg.trainer.test: hello from the trainer" in text and "not ours" not in text
    finally:
        logging.getLogger("gcfg").removeHandler(handler)
        handler.close()


def test_atomic_writes_leave_old_file_on_error(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def failing(path):
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_with(target, failing)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_writes_leave_an_ordinary_readable_file(tmp_path):
    target = tmp_path / "status.json"
    atomic_write_bytes(target, b"{}")
    assert target.stat().st_mode & 0o777 == 0o644


def test_loss_plot_themes_and_legible_text():
    import io

    from PIL import Image

    from trainer.jobfolder import render_loss_plot

    events = [{"step": i, "loss": 1.0 / i} for i in range(1, 200)]
    light = Image.open(io.BytesIO(render_loss_plot(events, width=800, height=360))).convert("L")
    dark = Image.open(io.BytesIO(render_loss_plot(events, width=800, height=360, theme="dark"))).convert("L")
    assert light.getpixel((2, 2)) > 240 and dark.getpixel((2, 2)) < 40
    # text rows: the title's glyphs are at least 10 px tall at 800 px wide (legible where the image is shown 1:1)
    title = light.crop((70, 0, 200, 38))
    rows = [y for y in range(title.height) if min(title.getpixel((x, y)) for x in range(title.width)) < 128]
    assert rows and rows[-1] - rows[0] + 1 >= 10
    with pytest.raises(ValueError, match="theme='sepia'"):
        render_loss_plot(events, theme="sepia")


def test_without_a_sized_default_font_the_plot_uses_a_bundled_truetype_font(monkeypatch):
    """Pillow 9.5 (the WebUI 1.10.1 pin) has no `load_default(size=)`: the labels must not shrink to the bitmap font."""
    from PIL import ImageFont

    from trainer import jobfolder

    real = ImageFont.load_default

    def old_pillow(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return real()

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    font = jobfolder._font(28)
    if jobfolder._bundled_ttf() is None:
        pytest.skip("matplotlib is not installed here")
    assert isinstance(font, ImageFont.FreeTypeFont) and font.size == 28
