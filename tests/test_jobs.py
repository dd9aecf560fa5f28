"""Job manager: queue, processes, stop/cancel/resume/delete, re-attach after a restart, orphans, pid reuse.

Fast tests run a stand-in trainer (same command line, same job-folder files, 20 ms steps); the tests marked slow
run the real `python -m trainer` on a tiny random model and 16 generated 64-px images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from waiting import BACKSTOP_S, wait_until

from trainer import jobs
from trainer.config import ConfigError
from trainer.jobfolder import JobFolder, JobState, JobStatus
from trainer.jobs import (
    JobAction,
    JobConflictError,
    JobError,
    JobManager,
    JobNotFoundError,
    LaunchSpec,
    PathPolicy,
    sanitize_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

FAKE_TRAINER_DIR = Path(__file__).resolve().parent  # tests/fake_trainer.py: `python -m fake_trainer`


def make_images(folder: Path, count: int = 16, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def tiny_values(dataset: Path, checkpoint: Path, **overrides) -> dict:
    values = dict(name="tiny", dataset_dir=str(dataset), base_checkpoint=str(checkpoint), resolution=64,
                  min_image_size=0, batch_size=4, micro_batch_size=2, max_steps=5, mixed_precision="no",
                  device="cpu", calibration_images=4, checkpoint_every_steps=2, checkpoint_every_minutes=0,
                  preview_every_steps=0, keep_last=2)
    values.update(overrides)
    return values


def wait_for(manager: JobManager, job_id: str, predicate, what: str = ""):
    def seen():
        manager.tick()
        info = manager.get(job_id)
        return info if predicate(info) else None

    return wait_until(seen, what or str(predicate),
                      describe=lambda: f"{manager.get(job_id)}\n{manager.log_tail(job_id)}")


def in_state(*states: JobState):
    return lambda info: info.state in states


@pytest.fixture()
def fake_env(tmp_path):
    module_dir = FAKE_TRAINER_DIR
    dataset = make_images(tmp_path / "data", count=2)
    checkpoint = tmp_path / "base.safetensors"
    checkpoint.write_bytes(b"not read by the stand-in")
    return module_dir, dataset, checkpoint


@pytest.fixture()
def fake_manager(tmp_path, fake_env):
    module_dir, _, _ = fake_env
    managers = []

    def make(**kwargs) -> JobManager:
        launch = LaunchSpec(pythonpath=(str(module_dir), str(REPO_ROOT)), module="fake_trainer",
                            env=kwargs.pop("env", {}))
        manager = JobManager(tmp_path / "jobs", launch=launch, publish_dir=tmp_path / "concepts", **kwargs)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.supervisor.kill_all_children()


def fake_values(fake_env, **overrides) -> dict:
    _, dataset, checkpoint = fake_env
    return tiny_values(dataset, checkpoint, **overrides)


# --- pure helpers


@pytest.mark.parametrize(("text", "expected"), [
    ("my-face_v2.1", "my-face_v2.1"),
    ("My face v2!", "My_face_v2"),
    ("../../etc/passwd", "etc_passwd"),
    ("/abs/path", "abs_path"),
    (".hidden", "hidden"),
    ("a..b", "a.b"),
    ("é" * 3 + "x", "x"),
])
def test_sanitize_name_keeps_safe_names_and_cleans_the_rest(text, expected):
    assert sanitize_name(text) == expected


@pytest.mark.parametrize("text", ["", "..", "///", "   ", "ééé"])
def test_sanitize_name_rejects_names_without_usable_characters(text):
    with pytest.raises(JobError, match="name="):
        sanitize_name(text)


def test_allowed_actions_per_state():
    assert jobs.allowed_actions(JobState.QUEUED) == (JobAction.CANCEL, JobAction.DELETE)
    assert jobs.allowed_actions(JobState.TRAINING) == (JobAction.STOP, JobAction.CANCEL)
    assert jobs.allowed_actions(JobState.STOPPING) == (JobAction.CANCEL,)
    for state in (JobState.STOPPED, JobState.INTERRUPTED, JobState.FAILED):
        assert jobs.allowed_actions(state) == (JobAction.RESUME, JobAction.DELETE)
    for state in (JobState.COMPLETED, JobState.CANCELLED):
        assert jobs.allowed_actions(state) == (JobAction.DELETE,)


def test_normalize_device():
    assert jobs.normalize_device("auto", "cuda:0") == "cuda:0"
    assert jobs.normalize_device("cuda") == "cuda:0"
    assert jobs.normalize_device("cuda:1") == "cuda:1"
    assert jobs.normalize_device("auto") == "cpu"


def test_progress_fraction_uses_the_phase_while_preparing():
    assert jobs.progress_fraction(JobStatus(state=JobState.TRAINING, step=5, total_steps=20)) == 0.25
    assert jobs.progress_fraction(JobStatus(state=JobState.CACHING, phase_done=3, phase_total=4, total_steps=9)) == 0.75
    assert jobs.progress_fraction(JobStatus(state=JobState.QUEUED)) == 0.0


def test_tail_lines_keeps_the_last_redraw_of_progress_bars(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("one\ntwo\n 10%\r 50%\r100%\nlast\n\n")
    assert jobs.tail_lines(log, 2) == ["100%", "last"]
    assert jobs.tail_lines(log, 10) == ["one", "two", "100%", "last"]
    assert jobs.tail_lines(tmp_path / "missing.log", 5) == []


def test_path_policy_allows_only_folders_inside_the_roots(tmp_path):
    root = tmp_path / "datasets"
    (root / "faces").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    policy = PathPolicy((str(root),))
    assert policy.check_dataset(str(root / "faces")) == str((root / "faces").resolve())
    for bad in (str(outside), str(root / "faces" / ".." / ".." / "secret"), str(root / "link"), "/etc"):
        with pytest.raises(JobError, match="outside the allowed dataset folders") as error:
            policy.check_dataset(bad)
        assert error.value.argument == "dataset_dir"
    with pytest.raises(JobError, match="not an existing folder"):
        policy.check_dataset(str(root / "missing"))
    with pytest.raises(JobError, match="must name a folder"):
        policy.check_dataset("")


def test_launch_spec_puts_the_extension_root_first_on_the_python_path():
    spec = LaunchSpec(python="/py", pythonpath=("/ext", "/ldm"), env={"X": "1"})
    env = spec.environment({"PYTHONPATH": "/old", "HOME": "/h"})
    assert env["PYTHONPATH"] == os.pathsep.join(["/ext", "/ldm", "/old"])
    assert env["X"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env["HOME"] == "/h"
    assert spec.command("resume", "/j") == ["/py", "-m", "trainer", "resume", "/j"]


def test_process_matches_checks_start_time_and_command_line(tmp_path):
    me = psutil.Process()
    assert not jobs.process_matches(os.getpid(), me.create_time(), tmp_path / "job")  # not on my command line
    sleeper = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({BACKSTOP_S})",
                                str(tmp_path / "job")])
    try:
        created = psutil.Process(sleeper.pid).create_time()
        assert jobs.process_matches(sleeper.pid, created, tmp_path / "job")
        while not psutil.Process(sleeper.pid).cmdline():  # empty for a moment between fork and exec
            time.sleep(0.01)
        assert jobs.process_matches(sleeper.pid, None, tmp_path / "job")
        assert not jobs.process_matches(sleeper.pid, created - 100, tmp_path / "job")  # a recycled pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not jobs.process_matches(sleeper.pid, created, tmp_path / "job")
    assert not jobs.process_matches(None, None, tmp_path)


# --- manager with the stand-in trainer


def test_new_config_sets_the_job_folder_and_names_bad_fields(fake_manager, fake_env):
    manager = fake_manager()
    config = manager.new_config(fake_values(fake_env, name="My run!"))
    assert config.name == "My_run" and Path(config.job_dir) == manager.root / "My_run"
    with pytest.raises(ConfigError, match="job_dir is chosen by the server"):
        manager.new_config(fake_values(fake_env, job_dir="/tmp/elsewhere"))
    with pytest.raises(ConfigError, match=r"learning_rate=-1\.0 must be in"):
        manager.new_config(fake_values(fake_env, learning_rate=-1))
    with pytest.raises(ConfigError, match="unknown config key"):
        manager.new_config(fake_values(fake_env, bogus=1))


def test_create_runs_to_completion_and_publishes_the_concept_model(fake_manager, fake_env, tmp_path):
    started, finished = [], []
    manager = fake_manager(on_start=started.append, on_finish=finished.append)
    info = manager.create(manager.new_config(fake_values(fake_env, max_steps=10)), unload_webui_model=True)
    assert info.id == "tiny" and info.state == JobState.PREPARING and info.pid is not None
    assert info.unload_webui_model
    # the trainer writes "completed" a moment before its process ends and the manager publishes the model
    done = wait_for(manager, "tiny", lambda i: i.state == JobState.COMPLETED and i.published)
    assert done.step == done.total_steps == 10 and done.progress == 1.0
    assert done.actions == (JobAction.DELETE,)
    published = tmp_path / "concepts" / "tiny.safetensors"
    assert done.published == str(published) and published.read_bytes() == b"concept 10"
    assert [p["step"] for p in manager.loss_points("tiny")] == list(range(1, 11))
    assert manager.loss_plot_png("tiny").startswith(b"\x89PNG")
    assert [i.id for i in started] == ["tiny"] and [i.state for i in finished] == [JobState.COMPLETED]
    record = json.loads((manager.root / "tiny" / "job.json").read_text())
    assert record["pid"] is None and record["launches"] == 1


def test_names_are_unique_and_published_models_are_never_overwritten(fake_manager, fake_env, tmp_path):
    manager = fake_manager()
    manager.create(manager.new_config(fake_values(fake_env)), start=False)
    with pytest.raises(JobConflictError, match="already used by a job") as error:
        manager.create(manager.new_config(fake_values(fake_env)))
    assert error.value.argument == "name"
    (tmp_path / "concepts").mkdir()
    (tmp_path / "concepts" / "other.safetensors").write_bytes(b"user's model")
    with pytest.raises(JobConflictError, match="concept model .* already exists"):
        manager.create(manager.new_config(fake_values(fake_env, name="other")))


def test_create_checks_paths(fake_manager, fake_env, tmp_path):
    manager = fake_manager()
    with pytest.raises(ConfigError, match="dataset_dir=.* is not an existing folder"):
        manager.create(manager.new_config(fake_values(fake_env, dataset_dir=str(tmp_path / "nope"))))
    with pytest.raises(ConfigError, match="base_checkpoint=.* is not an existing file"):
        manager.create(manager.new_config(fake_values(fake_env, base_checkpoint=str(tmp_path / "nope.ckpt"))))
    assert manager.list_jobs() == []


def test_fifo_queue_one_running_job_per_device(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    for name in ("a", "b", "c"):
        manager.create(manager.new_config(fake_values(fake_env, name=name, max_steps=6)))
    other = manager.create(manager.new_config(fake_values(fake_env, name="gpu1", device="cuda:1", max_steps=6)))
    assert other.state == JobState.PREPARING  # another device: starts beside "a"
    by_id = {i.id: i for i in manager.list_jobs()}
    assert by_id["a"].state == JobState.PREPARING
    assert (by_id["b"].state, by_id["b"].queue_position) == (JobState.QUEUED, 1)
    assert (by_id["c"].state, by_id["c"].queue_position) == (JobState.QUEUED, 2)
    assert [i.id for i in manager.list_jobs()] == ["gpu1", "c", "b", "a"]  # newest first
    # The start order comes from what `tick` reports, not from polling states: under load a short job can
    # start and finish between two polls.
    started_order = ["a"]

    def three_started() -> bool:
        started_order.extend(manager.tick())
        running = [i.id for i in manager.list_jobs() if i.device == "cpu" and i.state in jobs.ACTIVE_STATES]
        assert len(running) <= 1
        return len(started_order) >= 3

    wait_until(three_started, "three jobs to start", poll_s=0.02)
    assert started_order == ["a", "b", "c"]
    wait_for(manager, "c", in_state(JobState.COMPLETED))


def test_stop_then_resume_continues_from_the_checkpoint(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    manager.create(manager.new_config(fake_values(fake_env, max_steps=400)))
    wait_for(manager, "tiny", lambda i: i.state == JobState.TRAINING and i.step >= 3)
    info = manager.stop("tiny")
    assert info.requested == "stop" and "stop requested" in info.message
    stopped = wait_for(manager, "tiny", lambda i: i.state == JobState.STOPPED and i.published)
    assert stopped.actions == (JobAction.RESUME, JobAction.DELETE) and stopped.published
    with pytest.raises(ConfigError, match="seed cannot change on resume"):
        manager.resume("tiny", seed=5)
    queued = manager.resume("tiny", max_steps=stopped.step + 5)
    assert queued.state in (JobState.QUEUED, JobState.PREPARING)
    done = wait_for(manager, "tiny", in_state(JobState.COMPLETED))
    assert done.step == stopped.step + 5
    assert manager.config("tiny").max_steps == stopped.step + 5
    steps = [p["step"] for p in manager.loss_points("tiny")]
    assert steps == list(range(1, done.step + 1))  # the resumed run continued the step count


def test_stop_while_caching_is_a_resumable_stop(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_CACHE_S": "30"})
    manager.create(manager.new_config(fake_values(fake_env)))
    caching = wait_for(manager, "tiny", in_state(JobState.CACHING))
    assert caching.progress == 0.5 and JobAction.STOP in caching.actions
    manager.stop("tiny")
    stopped = wait_for(manager, "tiny", in_state(JobState.STOPPED))
    assert stopped.last_error is None and "stopped while caching" in stopped.message
    assert JobAction.RESUME in stopped.actions


def test_cancel_kills_at_once_and_is_final(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    manager.create(manager.new_config(fake_values(fake_env, max_steps=10_000)))
    running = wait_for(manager, "tiny", lambda i: i.step >= 1)
    cancelled = manager.cancel("tiny")  # returns once the process is gone (checked below), however long that takes
    assert cancelled.state == JobState.CANCELLED and cancelled.actions == (JobAction.DELETE,)
    assert not psutil.pid_exists(running.pid) or psutil.Process(running.pid).status() == psutil.STATUS_ZOMBIE
    assert cancelled.published is None  # no model published for a cancelled job
    with pytest.raises(JobConflictError, match="cannot resume job 'tiny' while it is cancelled"):
        manager.resume("tiny")


def test_cancel_a_queued_job_starts_the_next(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    manager.create(manager.new_config(fake_values(fake_env, name="first", max_steps=10_000)))
    manager.create(manager.new_config(fake_values(fake_env, name="second", max_steps=3)))
    manager.create(manager.new_config(fake_values(fake_env, name="third", max_steps=3)))
    assert manager.cancel("second").state == JobState.CANCELLED
    assert manager.get("third").queue_position == 1
    manager.cancel("first")
    wait_for(manager, "third", in_state(JobState.COMPLETED))
    assert manager.get("second").state == JobState.CANCELLED


def test_actions_in_the_wrong_state_are_conflicts(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    manager.create(manager.new_config(fake_values(fake_env, max_steps=10_000)))
    with pytest.raises(JobConflictError, match="cannot delete job 'tiny' while it is"):
        manager.delete("tiny")
    with pytest.raises(JobConflictError, match="cannot resume"):
        manager.resume("tiny")
    with pytest.raises(JobNotFoundError):
        manager.stop("nope")
    manager.cancel("tiny")
    with pytest.raises(JobConflictError, match="cannot stop"):
        manager.stop("tiny")


def test_failed_start_reports_the_trainer_error(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_FAIL": "1"})
    manager.create(manager.new_config(fake_values(fake_env)))
    failed = wait_for(manager, "tiny", in_state(JobState.FAILED))
    assert failed.last_error == "dataset_dir='x' is broken"
    assert "error: dataset_dir='x' is broken" in manager.log_tail("tiny")
    assert failed.actions == (JobAction.RESUME, JobAction.DELETE)


def test_delete_removes_only_that_job_folder(fake_manager, fake_env, tmp_path):
    manager = fake_manager()
    manager.create(manager.new_config(fake_values(fake_env, name="keep")), start=False)
    manager.create(manager.new_config(fake_values(fake_env, name="gone")), start=False)
    manager.delete("gone")
    assert [i.id for i in manager.list_jobs()] == ["keep"]
    assert not (manager.root / "gone").exists()
    assert [p.name for p in manager.root.iterdir() if not p.name.startswith(".")] == ["keep"]
    for bad in ("../keep", "/etc", "", ".", "..", "keep/../keep", "a" * 101):
        with pytest.raises(JobNotFoundError):
            manager.delete(bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (manager.root / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(JobNotFoundError):
        manager.delete("evil")
    assert (outside / "config.json").exists()
    assert "evil" not in [i.id for i in manager.list_jobs()]


def test_orphans_and_recycled_pids_read_as_interrupted(fake_manager, fake_env):
    manager = fake_manager()
    manager.create(manager.new_config(fake_values(fake_env)), start=False)
    path = manager.root / "tiny"
    # The status says "training" under a pid that exists but is not a trainer of this job (pid reuse).
    JobFolder(path).write_status(JobStatus(state=JobState.TRAINING, step=3, total_steps=5, pid=os.getpid()))
    record = json.loads((path / "job.json").read_text())
    record.update(pid=os.getpid(), pid_create_time=psutil.Process().create_time() - 1000, launches=1)
    (path / "job.json").write_text(json.dumps(record))
    info = manager.get("tiny")
    assert info.state == JobState.TRAINING  # reading does not change anything
    manager.tick()
    info = manager.get("tiny")
    assert info.state == JobState.INTERRUPTED and "without a final status" in info.message
    assert info.step == 3 and JobAction.RESUME in info.actions


def test_a_new_manager_adopts_a_job_folder_made_by_the_command_line(fake_manager, fake_env):
    manager = fake_manager()
    config = manager.new_config(fake_values(fake_env, name="cli"))
    job = JobFolder(config.job_dir).create()
    config.save(job.config_path)
    job.write_status(JobStatus(state=JobState.STOPPED, step=2, total_steps=5))
    info = manager.get("cli")
    assert info.state == JobState.STOPPED and info.actions == (JobAction.RESUME, JobAction.DELETE)


def test_reattach_to_a_job_started_by_another_manager(fake_manager, fake_env):
    first = fake_manager(env={"FAKE_STEP_S": "0.05"})
    first.create(first.new_config(fake_values(fake_env, max_steps=10_000)))
    running = wait_for(first, "tiny", lambda i: i.step >= 1)
    second = fake_manager()  # e.g. the WebUI restarted; the trainer kept running in its own session
    again = second.get("tiny")
    assert again.state == JobState.TRAINING and again.pid == running.pid
    second.tick()
    assert second.get("tiny").state == JobState.TRAINING
    second.stop("tiny")
    wait_for(second, "tiny", in_state(JobState.STOPPED))
    first.supervisor._children["tiny"].wait(timeout=BACKSTOP_S)
    first.tick()  # the old manager reaps its child and agrees
    assert first.get("tiny").state == JobState.STOPPED


def test_background_thread_starts_queued_jobs(fake_manager, fake_env):
    manager = fake_manager()
    manager.create(manager.new_config(fake_values(fake_env, name="one", max_steps=3)))
    manager.create(manager.new_config(fake_values(fake_env, name="two", max_steps=3)))
    manager.start_background(interval_s=0.05)
    try:
        wait_until(lambda: manager.get("two").state == JobState.COMPLETED, "job 'two' to complete",
                   describe=lambda: str(manager.list_jobs()))
    finally:
        manager.shutdown()
    assert manager.get("one").state == JobState.COMPLETED


# --- the real trainer


@pytest.fixture()
def real_manager(tmp_path, tiny_checkpoint):
    dataset = make_images(tmp_path / "data")
    launch = LaunchSpec(pythonpath=(str(REPO_ROOT),), env={"OMP_NUM_THREADS": "1"})
    manager = JobManager(tmp_path / "jobs", launch=launch, publish_dir=tmp_path / "concepts")
    yield manager, dataset, tiny_checkpoint
    for info in manager.list_jobs():
        if JobAction.CANCEL in info.actions:
            manager.cancel(info.id)


@pytest.mark.slow
def test_real_trainer_start_progress_stop_resume_complete(real_manager, tmp_path, monkeypatch):
    manager, dataset, checkpoint = real_manager
    manager.create(manager.new_config(tiny_values(dataset, checkpoint, max_steps=500)))
    training = wait_for(manager, "tiny", lambda i: i.state == JobState.TRAINING and i.step >= 3, "training")
    assert training.images_per_second and training.eta_seconds is not None and 0 < training.progress < 1
    with monkeypatch.context() as no_signals:  # as on Windows: the stop file alone stops the real trainer
        no_signals.setattr(os, "kill", lambda pid, sig: None)
        manager.stop("tiny")
    stopped = wait_for(manager, "tiny", in_state(JobState.STOPPED), "stopped")
    assert stopped.last_checkpoint and f"step-{stopped.step:06d}" in stopped.last_checkpoint
    assert "stopped at step" in stopped.message and "stop requested by the job manager" in stopped.message
    assert "training tiny from step 0" in manager.log_tail("tiny")
    manager.resume("tiny", max_steps=stopped.step + 2)
    done = wait_for(manager, "tiny", lambda i: i.state == JobState.COMPLETED and i.published_step == i.step,
                    "completed and published")
    assert done.step == stopped.step + 2
    assert f"training tiny from step {stopped.step} to {done.step}" in manager.log_tail("tiny", 200)
    published = tmp_path / "concepts" / "tiny.safetensors"
    assert done.published == str(published) and published.stat().st_size > 0
    from gcfg_core.concept_file import load_concept_model

    _, metadata = load_concept_model(published)
    assert metadata.steps == done.step


@pytest.mark.slow
def test_real_trainer_reattach_crash_resume_cancel(real_manager):
    manager, dataset, checkpoint = real_manager
    manager.create(manager.new_config(tiny_values(dataset, checkpoint, max_steps=500)))
    running = wait_for(manager, "tiny", lambda i: i.state == JobState.TRAINING and i.step >= 2, "training")
    # A restarted WebUI: a fresh manager on the same folder sees the live job and its progress.
    restarted = JobManager(manager.root, launch=manager.launch, publish_dir=manager.publish_dir)
    seen = restarted.get("tiny")
    assert seen.state == JobState.TRAINING and seen.pid == running.pid
    wait_for(restarted, "tiny", lambda i: i.step > seen.step, "progress after re-attach")
    # The trainer dies without a word (OOM killer, power cut): the job reads as interrupted, and resumes.
    os.killpg(running.pid, signal.SIGKILL)
    interrupted = wait_for(restarted, "tiny", in_state(JobState.INTERRUPTED), "interrupted")
    assert JobAction.RESUME in interrupted.actions
    manager.supervisor._children["tiny"].wait(timeout=BACKSTOP_S)
    manager.tick()
    assert manager.get("tiny").state == JobState.INTERRUPTED
    restarted.resume("tiny")
    resumed = wait_for(restarted, "tiny", lambda i: i.state == JobState.TRAINING and i.pid != running.pid,
                       "training again")
    assert resumed.step >= 2  # continued from the step-2 checkpoint, not from 0
    cancelled = restarted.cancel("tiny")
    assert cancelled.state == JobState.CANCELLED
    assert not psutil.pid_exists(resumed.pid) or psutil.Process(resumed.pid).status() == psutil.STATUS_ZOMBIE


# --- process identity, process trees and signal-free stops (portable job control)


def test_process_identity_compares_path_components(tmp_path):
    (tmp_path / "face").mkdir()
    (tmp_path / "face2").mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--config",
                                str(tmp_path / "face2" / "config.json")])
    try:
        created = psutil.Process(sleeper.pid).create_time()
        # Until the child's command line is readable the start time alone decides (supervisor.process_matches);
        # this test is about comparing the command line, so it waits for it.
        wait_until(lambda: psutil.Process(sleeper.pid).cmdline(), "the child's command line")
        assert jobs.process_matches(sleeper.pid, created, tmp_path / "face2")
        assert not jobs.process_matches(sleeper.pid, created, tmp_path / "face")
        assert not jobs.process_matches(sleeper.pid, None, tmp_path / "face")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stopping_or_cancelling_a_job_never_touches_another_whose_name_extends_it(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    manager.create(manager.new_config(fake_values(fake_env, name="face2", max_steps=10_000)))
    manager.create(manager.new_config(fake_values(fake_env, name="face", max_steps=10_000)), start=False)
    other = wait_for(manager, "face2", lambda i: i.state == JobState.TRAINING and i.step >= 1)
    # `face` says it trains under the pid that is now face2's trainer (a status left from before a restart, the
    # pid reused since), with no start time to tell them apart: only the command line can.
    JobFolder(manager.root / "face").write_status(JobStatus(state=JobState.TRAINING, step=3, total_steps=9,
                                                            pid=other.pid))
    with pytest.raises(JobConflictError, match="while it is interrupted"):
        manager.stop("face")
    with pytest.raises(JobConflictError, match="while it is interrupted"):
        manager.cancel("face")
    still = manager.get("face2")
    assert still.state == JobState.TRAINING and still.pid == other.pid and still.requested is None
    assert psutil.Process(other.pid).status() != psutil.STATUS_ZOMBIE
    assert not JobFolder(manager.root / "face2").stop_request_path.exists()
    assert wait_for(manager, "face2", lambda i: i.step > still.step).state == JobState.TRAINING


def test_cancel_ends_the_whole_process_tree(fake_manager, fake_env):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05", "FAKE_GRANDCHILD": "1"})
    manager.create(manager.new_config(fake_values(fake_env, max_steps=10_000)))
    wait_for(manager, "tiny", lambda i: i.step >= 1)
    helper = psutil.Process(int((manager.root / "tiny" / "grandchild.pid").read_text()))
    try:
        assert helper.is_running()
        manager.cancel("tiny")
        helper.wait(timeout=BACKSTOP_S)  # it left the trainer's process group, so only a tree kill reaches it
    finally:
        if helper.is_running():
            helper.kill()


def test_stop_reaches_the_trainer_without_any_signal(fake_manager, fake_env, monkeypatch):
    """Windows has no SIGTERM: the stop file alone must end the run as a resumable stop."""
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    manager.create(manager.new_config(fake_values(fake_env, max_steps=10_000)))
    running = wait_for(manager, "tiny", lambda i: i.state == JobState.TRAINING and i.step >= 1)
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    manager.stop("tiny")
    stopped = wait_for(manager, "tiny", in_state(JobState.STOPPED), "stopped by the stop file")
    assert stopped.step >= running.step and JobAction.RESUME in stopped.actions
    monkeypatch.undo()
    manager.resume("tiny", max_steps=stopped.step + 3)
    assert wait_for(manager, "tiny", in_state(JobState.COMPLETED)).step == stopped.step + 3


def test_managers_of_one_root_exclude_each_other_without_fcntl(fake_manager, fake_env, tmp_path, monkeypatch):
    """The lock must not depend on fcntl (missing on Windows): another process holding it makes a manager wait."""
    import importlib

    monkeypatch.setattr(importlib.import_module("trainer.jobs"), "fcntl", None, raising=False)
    manager = fake_manager()
    release = tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib, filelock\n"
        "with filelock.FileLock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.01)\n"),
        str(manager.root / ".jobs.lock"), str(release)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = threading.Event()
        worker = threading.Thread(target=lambda: (manager.list_jobs(), done.set()), daemon=True)
        worker.start()
        assert not done.wait(0.5), "the manager did not wait for the other process's lock"
        release.touch()
        assert done.wait(BACKSTOP_S)
    finally:
        release.touch()
        holder.wait(timeout=BACKSTOP_S)


# --- publishing


def test_publishing_never_overwrites_a_file_this_job_did_not_publish(fake_manager, fake_env, tmp_path):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    manager.create(manager.new_config(fake_values(fake_env, max_steps=10_000)))
    wait_for(manager, "tiny", lambda i: i.state == JobState.TRAINING and i.step >= 2)
    concepts = tmp_path / "concepts"
    concepts.mkdir(exist_ok=True)
    users = concepts / "tiny.safetensors"
    users.write_bytes(b"the user's own model")  # appeared while the job trained
    manager.stop("tiny")
    stopped = wait_for(manager, "tiny", lambda i: i.state == JobState.STOPPED and i.published)
    assert users.read_bytes() == b"the user's own model"
    assert stopped.published == str(concepts / "tiny-2.safetensors")
    assert Path(stopped.published).read_bytes() == f"concept {stopped.step}".encode()
    assert "published as tiny-2.safetensors" in stopped.message and "tiny.safetensors" in stopped.message

    # Its own file is replaced by the next publish ...
    manager.resume("tiny", max_steps=stopped.step + 2)
    done = wait_for(manager, "tiny", lambda i: i.state == JobState.COMPLETED and i.published_step == i.step)
    assert done.step == stopped.step + 2 and Path(done.published).read_bytes() == f"concept {done.step}".encode()
    assert done.published == str(concepts / "tiny-2.safetensors") and users.read_bytes() == b"the user's own model"


def test_a_published_file_someone_changed_is_not_overwritten(fake_manager, fake_env, tmp_path):
    manager = fake_manager(env={"FAKE_STEP_S": "0.05"})
    manager.create(manager.new_config(fake_values(fake_env, max_steps=10_000)))
    wait_for(manager, "tiny", lambda i: i.state == JobState.TRAINING and i.step >= 1)
    manager.stop("tiny")
    stopped = wait_for(manager, "tiny", lambda i: i.state == JobState.STOPPED and i.published)
    first = Path(stopped.published)
    assert first == tmp_path / "concepts" / "tiny.safetensors"
    first.write_bytes(b"edited by hand")
    manager.resume("tiny", max_steps=stopped.step + 2)
    done = wait_for(manager, "tiny", lambda i: i.state == JobState.COMPLETED and i.published != str(first))
    assert first.read_bytes() == b"edited by hand"
    assert Path(done.published).name == "tiny-2.safetensors"
    assert Path(done.published).read_bytes() == f"concept {done.step}".encode()


def test_publishing_streams_the_model_instead_of_reading_it_whole(fake_manager, fake_env, tmp_path):
    import tracemalloc

    sys.path.insert(0, str(FAKE_TRAINER_DIR))
    from fake_trainer import write_checkpoint

    manager = fake_manager()
    manager.create(manager.new_config(fake_values(fake_env)), start=False)
    path = manager.root / "tiny"
    job = JobFolder(path)
    write_checkpoint(job, 5)
    size = 48 * 1024 * 1024
    model = os.urandom(size)
    (job.checkpoints_dir / "step-000005" / "concept.safetensors").write_bytes(model)
    job.write_status(JobStatus(state=JobState.STOPPED, step=5, total_steps=9))
    record = json.loads((path / "job.json").read_text())
    record.update(pid=2**22 + 12345, launches=1)  # a trainer that ended while no manager watched
    (path / "job.json").write_text(json.dumps(record))
    del model
    tracemalloc.start()
    try:
        manager.tick()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    published = tmp_path / "concepts" / "tiny.safetensors"
    assert manager.get("tiny").published == str(published) and published.stat().st_size == size
    assert peak < size / 4, f"publishing held {peak / 2**20:.1f} MiB in memory for a {size / 2**20:.0f} MiB model"
