"""Signal-free stop requests: the job folder's stop file and, where it exists, Ctrl+Break."""

from __future__ import annotations

import os
import signal

import pytest

from trainer.jobfolder import JobFolder
from trainer.stopping import StopFileFlag, stop_on_break


def test_the_stop_file_stops_only_the_process_it_names(tmp_path):
    job = JobFolder(tmp_path / "job").create()
    flag = StopFileFlag(job=job, pid=4242)
    assert not flag.is_set()
    job.request_stop(4243)  # left from an earlier run whose process had another pid
    assert not flag.is_set()
    job.request_stop(4242)
    assert flag.is_set() and flag.reason == "stop requested by the job manager"
    job.clear_stop_request()
    assert flag.is_set()  # a request, once seen, stays
    assert not job.stop_request_path.exists()


def test_a_flag_without_a_job_is_a_plain_stop_flag():
    flag = StopFileFlag()
    assert flag.pid == os.getpid() and not flag.is_set()
    flag.request("asked")
    assert flag.is_set() and flag.reason == "asked"


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs a spare POSIX signal to stand in for SIGBREAK")
def test_ctrl_break_requests_a_clean_stop_where_it_exists(monkeypatch):
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)  # Windows' signal, played by SIGUSR1
    before = signal.getsignal(signal.SIGUSR1)
    flag = StopFileFlag()
    with stop_on_break(flag):
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.is_set() and flag.reason == "Ctrl+Break received"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_without_sigbreak_nothing_is_installed(monkeypatch):
    monkeypatch.delattr(signal, "SIGBREAK", raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_break(StopFileFlag()):
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
