"""Console progress: a bar on a terminal, one log line per N units (and a heartbeat) elsewhere."""

from __future__ import annotations

import io
import logging

import pytest

from trainer.progress import HEARTBEAT_S, ConsoleProgress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_every_n_units_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, "gcfg.trainer.progress")
    clock = Clock()
    progress = ConsoleProgress(100, desc="training try", unit="step", stream=io.StringIO(), clock=clock)
    assert progress.every == 5  # 100 steps / 20 lines
    for step in range(1, 101):
        clock.now += 2.0  # 2 s per step
        progress.update(step, loss=f"{1 / step:.3g}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20
    # step 10 after 20 s: 0.5 steps/s, 90 steps left -> 180 s
    assert lines[1] == "training try: step 10/100 (10%), loss 0.1, 3m00s left"
    assert lines[-1] == "training try: step 100/100 (100%), loss 0.01, 0m00s left"


def test_a_slow_run_still_logs_once_per_heartbeat(caplog):
    caplog.set_level(logging.INFO, "gcfg.trainer.progress")
    clock = Clock()
    progress = ConsoleProgress(10_000, desc="caching latents", unit="images", initial=40, stream=io.StringIO(),
                               clock=clock)
    progress.update(41)
    assert caplog.records == []  # 1 of every 500 images, 0 s: nothing yet
    clock.now += HEARTBEAT_S
    progress.update(42)
    assert [r.getMessage() for r in caplog.records] == [
        f"caching latents: images 42/10000 (0%), {format_duration((10_000 - 42) / (2 / HEARTBEAT_S))} left"]
    clock.now += HEARTBEAT_S
    progress.update(42)  # nothing moved: no line
    assert len(caplog.records) == 1


def test_a_terminal_gets_a_bar_and_no_log_lines(caplog):
    caplog.set_level(logging.INFO, "gcfg.trainer.progress")
    terminal = Terminal()
    progress = ConsoleProgress(4, desc="training try", unit="step", stream=terminal)
    for step in range(1, 5):
        progress.update(step, loss="0.5")
    progress.close()
    text = terminal.getvalue()
    assert "\r" in text and "training try" in text and "4/4" in text and "loss=0.5" in text
    assert caplog.records == []


def test_disabled_progress_says_nothing(caplog):
    caplog.set_level(logging.INFO, "gcfg.trainer.progress")
    terminal = Terminal()
    progress = ConsoleProgress(4, desc="x", unit="step", stream=terminal, enabled=False)
    progress.update(4)
    progress.close()
    assert terminal.getvalue() == "" and caplog.records == []


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (0, "0m00s"), (59.6, "1m00s"), (3725, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
