"""Cached stages: each writes its outputs into the cache folder plus `<stage>.done.json`, and a rerun skips it.

A stage's marker records the settings it ran with; a stage whose settings changed runs again (its training job
resumes from its own `state.pt` when the settings that define the run are unchanged, so an interrupted stage never
starts over).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gcfg_core.fileio import atomic_write_text

log = logging.getLogger("gcfg.paper_mini.stages")


def marker_path(cache: Path, name: str) -> Path:
    return cache / f"{name}.done.json"


def read_marker(cache: Path, name: str) -> dict | None:
    path = marker_path(cache, name)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_stage(cache: Path, name: str, settings: dict[str, Any], body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `body` unless a marker with the same settings exists; returns the stage's result dict."""
    settings = json.loads(json.dumps(settings))  # as the marker stores it (tuples become lists)
    marker = read_marker(cache, name)
    if marker is not None and marker.get("settings") == settings:
        log.info("stage %s: done (cached), skipping", name)
        return marker["result"]
    log.info("stage %s: running", name)
    started = time.monotonic()
    result = body()
    record = {"settings": settings, "result": result, "seconds": round(time.monotonic() - started, 1)}
    atomic_write_text(marker_path(cache, name), json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("stage %s: finished in %.0f s", name, record["seconds"])
    return result


def stage_result(cache: Path, name: str) -> dict[str, Any]:
    """The result of a finished stage; a clear error when it has not run yet."""
    marker = read_marker(cache, name)
    if marker is None:
        raise RuntimeError(f"stage {name!r} has not run in {cache}; run it first")
    return marker["result"]
