"""Exact resume, SIGTERM, and crashes at any moment of a checkpoint write (tiny models, CPU, fp32)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer import checkpoints, loop
from trainer.jobfolder import JobFolder, JobState

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import cli_args as _cli_args  # noqa: E402
from trainer_helpers import tiny_config  # noqa: E402
from waiting import BACKSTOP_S, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _stop_after(step: int, stop: loop.StopFlag):
    def on_step(done: int, _loss: float) -> None:
        if done == step:
            stop.request("test stop")
    return on_step


def _final_weights(job: JobFolder) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoints.latest_checkpoint(job.checkpoints_dir).concept_path))


@pytest.mark.slow
def test_resume_continues_with_bit_identical_losses_and_weights(tmp_path, tiny_checkpoint):
    # Every stateful feature on: EMA, warm-up + cosine, min-SNR, noise offset, accumulation, checkpointing.
    features = dict(max_steps=6, ema_decay=0.8, warmup_steps=2, lr_schedule="cosine", min_snr_gamma=5.0,
                    noise_offset=0.05, gradient_checkpointing=True, learning_rate=1e-3, checkpoint_every_steps=0)
    whole = tiny_config(tmp_path / "a", tiny_checkpoint, **features)
    uninterrupted = loop.train(whole, JobFolder(whole.job_dir), progress=False)

    split = tiny_config(tmp_path / "b", tiny_checkpoint, **features)
    job = JobFolder(split.job_dir)
    stop = loop.StopFlag()
    first = loop.train(split, job, stop=stop, on_step=_stop_after(3, stop), progress=False)
    assert first.state == JobState.STOPPED and first.step == 3
    assert job.read_status().state == JobState.STOPPED
    assert checkpoints.latest_checkpoint(job.checkpoints_dir).step == 3
    second = loop.train(split, job, resume=True, progress=False)

    assert second.state == JobState.COMPLETED and sorted(second.losses) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first.losses[step] == uninterrupted.losses[step]
    for step in (4, 5, 6):
        assert second.losses[step] == uninterrupted.losses[step], step  # bit-identical floats
    a, b = _final_weights(JobFolder(whole.job_dir)), _final_weights(job)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = checkpoints.load_train_state(checkpoints.latest_checkpoint(JobFolder(whole.job_dir).checkpoints_dir))
    state_b = checkpoints.load_train_state(checkpoints.latest_checkpoint(job.checkpoints_dir))
    assert all(torch.equal(state_a["unet"][k], state_b["unet"][k]) for k in state_a["unet"])
    # the event log of the split run reads like one run
    steps = [e["step"] for e in job.read_events() if e.get("type") == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"

    def write_concept(path: Path) -> None:
        path.write_bytes(b"concept")

    checkpoints.write_checkpoint(root, 1, write_concept=write_concept, train_state={"format": "x"}, meta={})

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.write_checkpoint(root, 2, write_concept=write_concept, train_state={}, meta={})
    monkeypatch.undo()
    assert [c.step for c in checkpoints.list_checkpoints(root)] == [1]
    assert checkpoints.latest_checkpoint(root).step == 1

    # a kill leaves a temporary folder (and maybe a stale pointer); readers ignore both, writers clean up
    (root / ".tmp-step-000003-999").mkdir()
    (root / ".tmp-step-000003-999" / "concept.safetensors").write_bytes(b"half")
    (root / "step-000004").mkdir()  # renamed-in folder without meta.json cannot happen, but must not count
    (root / checkpoints.LATEST_FILE).write_text("step-000004\n")
    assert checkpoints.latest_checkpoint(root).step == 1
    checkpoints.write_checkpoint(root, 5, write_concept=write_concept, train_state={}, meta={}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000005"]


@pytest.mark.slow
def test_crash_during_save_then_resume_uses_previous_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    config = tiny_config(tmp_path, tiny_checkpoint, max_steps=4, checkpoint_every_steps=2)
    job = JobFolder(config.job_dir)
    real_save = torch.save
    saves = {"n": 0}

    def save_then_die(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint dies after its concept file, mid train state
            f.write(b"partial")
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, job, progress=False)
    monkeypatch.undo()

    latest = checkpoints.latest_checkpoint(job.checkpoints_dir)
    assert latest.step == 2
    assert checkpoints.load_train_state(latest)["step"] == 2
    assert any(p.name.startswith(".tmp-") for p in job.checkpoints_dir.iterdir()) is False  # cleaned in `finally`
    result = loop.train(config, job, resume=True, progress=False)
    assert result.state == JobState.COMPLETED and sorted(result.losses) == [3, 4]


def _train_command(config_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer", "-q", "train", *config_args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _wait_for_step(job: JobFolder, step: int, proc: subprocess.Popen) -> None:
    def reached() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        return any(e.get("type") == "step" and e["step"] >= step for e in job.read_events())

    try:
        wait_until(reached, f"the trainer to reach step {step}")
    except AssertionError:
        proc.kill()
        raise


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resume_finishes(tmp_path, tiny_checkpoint):
    args = _cli_args(tmp_path, tiny_checkpoint, max_steps=400, checkpoint_every_steps=0)
    job = JobFolder(tmp_path / "job")
    proc = subprocess.Popen(_train_command(args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(job, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=BACKSTOP_S)
    assert proc.returncode == 0, err.decode()
    status = job.read_status()
    assert status.state == JobState.STOPPED, status
    latest = checkpoints.latest_checkpoint(job.checkpoints_dir)
    assert latest is not None and latest.step == status.step >= 2
    assert b"stopped at step" in out

    resumed = subprocess.run([sys.executable, "-m", "trainer", "-q", "resume", str(job.path), "--max-steps",
                              str(latest.step + 2)], cwd=REPO, env=_env(), capture_output=True, timeout=BACKSTOP_S)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert job.read_status().state == JobState.COMPLETED
    assert checkpoints.latest_checkpoint(job.checkpoints_dir).step == latest.step + 2


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, tiny_checkpoint):
    from gcfg_core.concept_file import load_concept_model

    # A checkpoint every step, so the kill very likely lands inside a save.
    args = _cli_args(tmp_path, tiny_checkpoint, max_steps=400, checkpoint_every_steps=1, keep_last=2)
    job = JobFolder(tmp_path / "job")
    proc = subprocess.Popen(_train_command(args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(job, 3, proc)
    time.sleep(0.13)
    proc.kill()
    proc.wait(timeout=BACKSTOP_S)

    latest = checkpoints.latest_checkpoint(job.checkpoints_dir)
    assert latest is not None and latest.step >= 2
    assert checkpoints.load_train_state(latest)["step"] == latest.step
    unet, metadata = load_concept_model(latest.concept_path)
    assert metadata.steps == latest.step
    assert job.effective_status().state == JobState.INTERRUPTED  # the process is gone without a final status
