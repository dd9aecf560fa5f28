"""Crash-safe writes: os.replace semantics on NTFS (a target held open elsewhere cannot be replaced at once)."""

from __future__ import annotations

import pytest

from gcfg_core import fileio
from gcfg_core.fileio import atomic_write_text, replace_file


def flaky_replace(monkeypatch, failures: int):
    """os.replace that fails like a Windows sharing violation `failures` times, then works."""
    real = fileio.os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) <= failures:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    return calls


def test_windows_retries_while_the_target_is_held_open(tmp_path, monkeypatch):
    (tmp_path / "src").write_text("new")
    (tmp_path / "dst").write_text("old")
    calls = flaky_replace(monkeypatch, failures=3)
    waits = []
    replace_file(tmp_path / "src", tmp_path / "dst", os_name="nt", sleep=waits.append)
    assert (tmp_path / "dst").read_text() == "new" and len(calls) == 4
    assert waits == list(fileio.REPLACE_RETRY_DELAYS_S[:3])


def test_windows_gives_up_after_the_last_retry(tmp_path, monkeypatch):
    (tmp_path / "src").write_text("new")
    flaky_replace(monkeypatch, failures=100)
    waits = []
    with pytest.raises(PermissionError):
        replace_file(tmp_path / "src", tmp_path / "dst", os_name="nt", delays=(0.1, 0.2), sleep=waits.append)
    assert waits == [0.1, 0.2]


def test_posix_does_not_retry_a_real_permission_error(tmp_path, monkeypatch):
    (tmp_path / "src").write_text("new")
    calls = flaky_replace(monkeypatch, failures=1)
    with pytest.raises(PermissionError):
        replace_file(tmp_path / "src", tmp_path / "dst", os_name="posix", sleep=lambda s: None)
    assert len(calls) == 1


def test_atomic_writes_go_through_the_retrying_replace(tmp_path, monkeypatch):
    flaky_replace(monkeypatch, failures=2)
    monkeypatch.setattr(fileio, "replace_file", lambda src, dst: replace_file(src, dst, os_name="nt",
                                                                             sleep=lambda s: None))
    atomic_write_text(tmp_path / "status.json", "{}")
    assert (tmp_path / "status.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
