"""Optimizer state only in the newest checkpoint: older ones keep their concept model, resume stays exact, a slim
checkpoint is refused by resume with a message, and the disk the preflight plans for matches the bytes written."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gcfg_core.concept_file import load_concept_model
from trainer import checkpoints, loop
from trainer.jobfolder import JobFolder
from trainer.preflight import estimate_disk_bytes, nulltext_unet_param_count

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import tiny_config  # noqa: E402


def _write(root: Path, step: int, keep_last: int = 0) -> checkpoints.CheckpointInfo:
    state = {"format": checkpoints.TRAIN_STATE_FORMAT, "step": step, "optimizer": {"big": torch.zeros(4096)}}
    return checkpoints.write_checkpoint(root, step, write_concept=lambda p: p.write_bytes(b"concept %d" % step),
                                        train_state=state, meta={}, keep_last=keep_last,
                                        slim_state=lambda s: {"step": s, "slim": True})


def test_older_checkpoints_lose_their_optimizer_state_once_a_newer_one_is_complete(tmp_path):
    root = tmp_path / "checkpoints"
    _write(root, 1)
    assert checkpoints.has_resume_state(checkpoints.latest_checkpoint(root))  # alone: it stays whole
    _write(root, 2)
    _write(root, 3, keep_last=2)
    kept = checkpoints.list_checkpoints(root)
    assert [c.step for c in kept] == [2, 3]
    old, new = kept
    assert not checkpoints.has_resume_state(old) and checkpoints.has_resume_state(new)
    slim = checkpoints.load_train_state(old)
    assert slim == {"format": checkpoints.TRAIN_STATE_FORMAT, "resumable": False, "step": 2, "slim": True}
    assert "optimizer" in checkpoints.load_train_state(new)
    assert old.concept_path.read_bytes() == b"concept 2"  # the deliverable is untouched
    assert old.train_state_path.stat().st_size < new.train_state_path.stat().st_size / 10
    # a re-save of the newest step (a stop right after a periodic save) keeps it whole
    _write(root, 3)
    assert checkpoints.has_resume_state(checkpoints.latest_checkpoint(root))


def test_a_failed_save_keeps_the_previous_checkpoint_resumable(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _write(root, 1)
    _write(root, 2)
    real_save = torch.save

    def die_on_step_3(obj, f, *args, **kwargs):
        if obj.get("step") == 3:
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", die_on_step_3)
    with pytest.raises(OSError, match="disk full"):
        _write(root, 3)
    latest = checkpoints.latest_checkpoint(root)
    assert latest.step == 2 and checkpoints.has_resume_state(latest)
    assert "optimizer" in loop.resume_state(latest)


def _folder_bytes(info: checkpoints.CheckpointInfo) -> int:
    return sum(p.stat().st_size for p in info.path.iterdir())


@pytest.mark.slow
def test_training_keeps_history_cheaply_resumes_from_the_newest_and_refuses_a_slim_one(tmp_path, tiny_checkpoint):
    config = tiny_config(tmp_path, tiny_checkpoint, max_steps=6, checkpoint_every_steps=2, keep_last=3)
    job = JobFolder(config.job_dir)
    loop.train(config, job, progress=False)
    kept = checkpoints.list_checkpoints(job.checkpoints_dir)
    assert [c.step for c in kept] == [2, 4, 6]
    assert [checkpoints.has_resume_state(c) for c in kept] == [False, False, True]
    for info in kept:  # every step's concept model still loads
        _unet, metadata = load_concept_model(info.concept_path)
        assert metadata.steps == info.step

    # Disk: trainable parameters P counted here from the concept file (everything but the null-text vectors);
    # a full checkpoint holds fp32 weights + AdamW's m and v (4 + 8 bytes each), an older one the weights only.
    with safe_open(str(kept[-1].concept_path), "pt") as f:
        params = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys() if not k.endswith(".vector"))
    assert params == nulltext_unet_param_count(tiny_checkpoint)
    estimate = estimate_disk_bytes(config, 8, unet_param_count=params)
    full, slim = _folder_bytes(kept[-1]), _folder_bytes(kept[0])
    assert full == pytest.approx(params * 12, rel=0.1) and estimate.checkpoint_bytes == params * 12
    assert slim == pytest.approx(params * 4, rel=0.1) and estimate.concept_bytes == params * 4
    # at the peak: the new one being written, the previous whole one, keep_last - 1 slim ones
    assert estimate.checkpoints_bytes == 2 * params * 12 + 2 * params * 4

    # Resume from a slim checkpoint (the newest one lost, e.g. deleted by hand) is refused, naming why.
    shutil.rmtree(kept[-1].path)
    (job.checkpoints_dir / checkpoints.LATEST_FILE).unlink()
    longer = config.with_overrides(max_steps=8)
    with pytest.raises(checkpoints.CheckpointError, match=r"step-000004 has no optimizer state \(only the newest"):
        loop.train(longer, job, resume=True, progress=False)
    assert [c.step for c in checkpoints.list_checkpoints(job.checkpoints_dir)] == [2, 4]
    assert job.read_status().step == 6  # refused before anything was written
    with pytest.raises(checkpoints.CheckpointError, match="no optimizer state"):
        loop.resume_state(kept[1])  # the same check on the file itself
