"""Process control alone: launch options per platform, identity, stop requests, tree kills."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest
from waiting import BACKSTOP_S, wait_until

from trainer.jobfolder import JobFolder
from trainer.jobs import supervisor
from trainer.jobs.supervisor import (
    CREATE_NEW_PROCESS_GROUP,
    CREATE_NO_WINDOW,
    LaunchSpec,
    ProcessSupervisor,
    command_names_job,
    kill_tree,
    popen_options,
    stopped_by_stop_signal,
)


def test_launch_options_detach_the_trainer_on_each_platform():
    assert popen_options("posix") == {"start_new_session": True}
    assert popen_options("nt") == {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    if hasattr(subprocess, "CREATE_NEW_PROCESS_GROUP"):  # Windows: our constants are the real ones
        assert CREATE_NEW_PROCESS_GROUP == subprocess.CREATE_NEW_PROCESS_GROUP
        assert CREATE_NO_WINDOW == subprocess.CREATE_NO_WINDOW


@pytest.mark.parametrize(("cmdline", "expected"), [
    (["py", "-m", "trainer", "resume", "/jobs/face"], True),
    (["py", "-m", "trainer", "train", "--config", "/jobs/face/config.json"], True),
    (["py", "-m", "trainer", "train", "--config=/jobs/face/config.json"], True),
    (["py", "-m", "trainer", "resume", "/jobs/face2"], False),
    (["py", "-m", "trainer", "train", "--config", "/jobs/face2/config.json"], False),
    (["py", "-m", "trainer", "resume", "/jobs"], False),
    (["py", "-m", "trainer", "resume", "face"], False),  # relative: never a job manager's command line
    (["py", "/other/jobs/face"], False),
])
def test_command_lines_name_a_job_by_path_components(cmdline, expected):
    assert command_names_job(cmdline, "/jobs/face") is expected


def test_the_stop_signal_exit_code_counts_only_where_a_signal_is_sent():
    assert stopped_by_stop_signal(-signal.SIGTERM, "posix")
    assert not stopped_by_stop_signal(-signal.SIGTERM, "nt")
    assert not stopped_by_stop_signal(0, "posix") and not stopped_by_stop_signal(None, "posix")


def _sleeper(*extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *extra], start_new_session=True)


def test_kill_tree_posix_also_signals_the_process_group():
    proc = _sleeper()
    groups = []
    try:
        killed = kill_tree(proc.pid, os_name="posix", killpg=lambda pid, sig: groups.append((pid, sig)))
        assert groups == [(proc.pid, signal.SIGKILL)] and killed == [proc.pid]
        assert proc.wait(timeout=BACKSTOP_S) == -signal.SIGKILL
    finally:
        proc.kill()


def test_kill_tree_portable_path_reaches_descendants_in_other_sessions():
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
              "                         start_new_session=True)\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        killed = kill_tree(parent.pid, os_name="nt")  # the Windows path: no process groups at all
        assert set(killed) == {parent.pid, child.pid}
        child.wait(timeout=BACKSTOP_S)
        parent.wait(timeout=BACKSTOP_S)
    finally:
        for p in (parent, child):
            if p.poll() is None if isinstance(p, subprocess.Popen) else p.is_running():
                p.kill()


def test_kill_tree_of_a_gone_process_is_harmless():
    proc = _sleeper()
    proc.kill()
    proc.wait()
    assert kill_tree(proc.pid, os_name="posix") == []


def test_request_stop_writes_the_stop_file_and_sends_sigterm_only_on_posix(tmp_path, monkeypatch):
    job_dir = tmp_path / "face"
    JobFolder(job_dir).create()
    proc = _sleeper(str(job_dir))
    sent = []
    monkeypatch.setattr(supervisor.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    try:
        created = psutil.Process(proc.pid).create_time()
        while not psutil.Process(proc.pid).cmdline():
            time.sleep(0.01)
        posix = ProcessSupervisor(LaunchSpec(), os_name="posix")
        assert posix.request_stop("face", proc.pid, created, job_dir)
        assert JobFolder(job_dir).stop_requested(proc.pid) and sent == [(proc.pid, signal.SIGTERM)]
        JobFolder(job_dir).clear_stop_request()
        windows = ProcessSupervisor(LaunchSpec(), os_name="nt")
        assert windows.request_stop("face", proc.pid, created, job_dir)
        assert JobFolder(job_dir).stop_requested(proc.pid) and sent == [(proc.pid, signal.SIGTERM)]
        # another job's folder: neither a file nor a signal
        JobFolder(tmp_path / "face2").create()
        assert not posix.request_stop("face2", proc.pid, created, tmp_path / "face2")
        assert not JobFolder(tmp_path / "face2").stop_request_path.exists() and len(sent) == 1
    finally:
        monkeypatch.undo()  # os.kill again, for the clean-up
        proc.kill()
        proc.wait()


def test_a_started_trainer_finds_no_stop_file_left_from_before(tmp_path):
    job = JobFolder(tmp_path / "job").create()
    job.request_stop(123)
    sup = ProcessSupervisor(LaunchSpec(python=sys.executable, module="this_module_does_not_exist"))
    handle = sup.start("job", (), job.path, job.path / "process.log")
    assert not job.stop_request_path.exists()
    wait_until(lambda: sup.reap("job")[0], "the trainer process to end")
    assert handle.pid > 0 and "No module named this_module_does_not_exist" in (job.path / "process.log").read_text()
