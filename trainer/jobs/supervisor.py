"""Trainer processes: how they are started, recognised, asked to stop and killed, on POSIX and on Windows.

Every job runs as its own process, `<python> -m trainer train|resume ...`, detached from the caller (a new session
on POSIX, a new process group without a console window on Windows): a crash or OOM cannot take the WebUI down, and
the WebUI can restart while a job trains.

    identity  (pid, start time, the job folder as a component-wise prefix of an argument on its command line): a
              recycled pid is never taken for a live job, and job `face` never matches `face2/...`.
    stop      the job folder's stop file names the pid that should stop; the trainer polls it once per step (and
              between latent-cache batches), saves and exits as "stopped". On POSIX a SIGTERM follows, which the
              trainer handles the same way. Windows gets no signal: CTRL_BREAK would end a trainer that has not yet
              installed its handler, and the stop file reaches it in every phase where a stop can be honoured.
    kill      the whole process tree (psutil: children first, so none is re-parented and missed), plus the process
              group on POSIX, which also holds helpers that left the tree.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from trainer.jobfolder import JobFolder, utc_now_iso
from trainer.jobs.model import is_within

log = logging.getLogger("gcfg.trainer.jobs")

# Windows process-creation flags (the subprocess constants exist only there).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


@dataclass(frozen=True)
class LaunchSpec:
    """How to start the trainer: which Python, which import path (the extension root first, then what the ldm and
    k-diffusion code need), which extra environment."""

    python: str = sys.executable
    pythonpath: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    module: str = "trainer"  # tests substitute a stand-in with the same command line

    def command(self, *args: str) -> list[str]:
        return [self.python, "-m", self.module, *args]

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        paths = [p for p in self.pythonpath if p]
        if paths:
            # The extension root must come first: PyPI has an unrelated package called `trainer`.
            env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env


def popen_options(os_name: str = os.name) -> dict[str, Any]:
    """`subprocess.Popen` keywords that detach the trainer from the WebUI (its Ctrl-C, its console, its restart)."""
    if os_name == "nt":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def command_names_job(cmdline: list[str], job_dir: str | os.PathLike) -> bool:
    """Whether an argument of `cmdline` is the job folder or a path inside it (compared by path components)."""
    for arg in cmdline:
        if not arg:
            continue
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if os.path.isabs(value) and is_within(value, job_dir):
            return True
    return False


def process_matches(pid: int | None, create_time: float | None, job_dir: str | os.PathLike) -> bool:
    """Whether `pid` is still the trainer of `job_dir`: alive, not a zombie, same start time, job on its command line.

    Guards against pid reuse after a reboot or a long outage, when another program (or another job's trainer) may
    own the old pid.
    """
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is not None and abs(proc.create_time() - create_time) > 0.5:
            return False
        try:
            cmdline = proc.cmdline()
        except psutil.AccessDenied:
            return create_time is not None
        if not cmdline:  # between fork and exec the command line is still empty; the start time decides
            return create_time is not None
        return command_names_job(cmdline, job_dir)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stopped_by_stop_signal(returncode: int | None, os_name: str = os.name) -> bool:
    """Whether a trainer's exit code says the stop signal ended it before its handler was installed."""
    return os_name != "nt" and returncode == -signal.SIGTERM


def kill_tree(pid: int, *, os_name: str = os.name, killpg: Callable[[int, int], None] | None = None) -> list[int]:
    """Kill `pid` and all its descendants at once (no chance to save); returns the pids signalled."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        procs = []
    if os_name == "posix":
        # The trainer leads its own session: the group also holds helpers that left the tree (double fork).
        try:
            (killpg or os.killpg)(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    killed = []
    for proc in procs:
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return killed


@dataclass(frozen=True)
class ProcessHandle:
    pid: int
    create_time: float | None


class ProcessSupervisor:
    """Starts trainer processes and keeps the ones this WebUI started (to reap them and read their exit codes);
    processes started by an earlier WebUI are reached by pid and identity."""

    def __init__(self, launch: LaunchSpec, *, os_name: str = os.name):
        self.launch = launch
        self.os_name = os_name
        self._children: dict[str, subprocess.Popen] = {}

    def start(self, job_id: str, args: tuple[str, ...], cwd: Path, log_path: Path) -> ProcessHandle:
        """Start `python -m trainer <args>` for `job_id` with output appended to `log_path`; OSError if it cannot."""
        JobFolder(cwd).clear_stop_request()  # a stop file left by an earlier run must not stop this one
        command = self.launch.command(*args)
        with open(log_path, "ab") as out:
            out.write(f"\n=== {utc_now_iso()} {' '.join(command)}\n".encode())
            out.flush()
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=str(cwd), env=self.launch.environment(), close_fds=True,
                                     **popen_options(self.os_name))
        self._children[job_id] = child
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = None
        log.info("started job %s: pid %d, %s", job_id, child.pid, " ".join(command))
        return ProcessHandle(child.pid, create_time)

    def is_child(self, job_id: str) -> bool:
        return job_id in self._children

    def child_pid(self, job_id: str) -> int | None:
        child = self._children.get(job_id)
        return None if child is None else child.pid

    def reap(self, job_id: str) -> tuple[bool, int | None]:
        """(ended, exit code) of this WebUI's child for `job_id`; (False, None) while it runs or when there is none."""
        child = self._children.get(job_id)
        if child is None:
            return False, None
        code = child.poll()
        if code is None:
            return False, None
        del self._children[job_id]
        return True, code

    def alive(self, job_id: str, pid: int | None, create_time: float | None, job_dir: Path) -> bool:
        if job_id in self._children:
            return self._children[job_id].poll() is None
        return process_matches(pid, create_time, job_dir)

    def request_stop(self, job_id: str, pid: int | None, create_time: float | None, job_dir: Path) -> bool:
        """Ask the trainer of `job_dir` to save and stop; False when no such process is running."""
        pid = self.child_pid(job_id) or pid
        if pid is None or not self.alive(job_id, pid, create_time, job_dir):
            return False
        JobFolder(job_dir).request_stop(pid)
        if self.os_name == "posix":
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return True

    def wait_exited(self, job_id: str, pid: int | None, create_time: float | None, job_dir: Path,
                    wait_s: float) -> None:
        """Wait up to `wait_s` for the trainer of `job_dir` to end by itself (no signal is sent)."""
        child = self._children.get(job_id)
        try:
            if child is not None:
                child.wait(timeout=wait_s)
            elif pid is not None and process_matches(pid, create_time, job_dir):
                psutil.Process(pid).wait(timeout=wait_s)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired, psutil.NoSuchProcess):
            pass

    def kill(self, job_id: str, pid: int | None, create_time: float | None, job_dir: Path,
             wait_s: float = 10.0) -> None:
        """Kill the trainer of `job_dir` and its process tree, and wait (up to `wait_s`) until it is gone."""
        pid = self.child_pid(job_id) or pid
        if pid is None or not self.alive(job_id, pid, create_time, job_dir):
            return
        kill_tree(pid, os_name=self.os_name)
        child = self._children.get(job_id)
        try:
            if child is not None:
                child.wait(timeout=wait_s)
            else:
                psutil.Process(pid).wait(timeout=wait_s)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired, psutil.NoSuchProcess):
            pass

    def kill_all_children(self) -> None:
        """Tests and shutdown of a throw-away manager: end every child this supervisor started."""
        for job_id in list(self._children):
            child = self._children.pop(job_id)
            kill_tree(child.pid, os_name=self.os_name)
            child.wait()
