"""`accelerate launch` with 2 CPU processes (gloo, DDP): completes, only process 0 writes, same math as 1 process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer import checkpoints, loop
from trainer.jobfolder import JobFolder, JobState

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import cli_args, tiny_config  # noqa: E402
from waiting import BACKSTOP_S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_process_accelerate_run_matches_one_process_with_accumulation(tmp_path, tiny_checkpoint):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    # 2 processes x micro-batch 2 = one process x 2 accumulation steps x micro-batch 2 (same global batch of 4)
    args = cli_args(tmp_path / "ddp", tiny_checkpoint, max_steps=3, checkpoint_every_steps=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # On CPU, `--multi_gpu` just selects the torchrun launcher; `--device cpu` makes Accelerate use gloo.
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", "-q", "train", *args]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=BACKSTOP_S)
    assert run.returncode == 0, run.stderr.decode()[-3000:]

    job = JobFolder(tmp_path / "ddp" / "job")
    status = job.read_status()
    assert status.state == JobState.COMPLETED and status.step == 3
    events = job.read_events()
    steps = [e for e in events if e.get("type") == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]  # one writer: no duplicated lines from process 1
    assert "2 processes x 1 accumulation" in job.log_path.read_text()
    assert {p.name for p in job.checkpoints_dir.iterdir()} == {"latest", "step-000002", "step-000003"}

    single = tiny_config(tmp_path / "single", tiny_checkpoint, max_steps=3, checkpoint_every_steps=2)
    reference = loop.train(single, JobFolder(single.job_dir), progress=False)
    for event in steps:  # equal up to the order of float reductions across processes
        assert event["loss"] == pytest.approx(reference.losses[event["step"]], rel=1e-5)
    a = load_file(str(checkpoints.latest_checkpoint(job.checkpoints_dir).concept_path))
    b = load_file(str(reference.checkpoint / checkpoints.CONCEPT_FILE))
    assert a.keys() == b.keys()
    # Weights: the two runs differ only by the order of float sums (all-reduce vs accumulation), which AdamW can
    # amplify for elements whose gradient is ~0 (their update is a ratio of two tiny moments). So compare what the
    # training changed: the difference of the two updates must be tiny next to the updates themselves.
    base = load_file(str(tiny_checkpoint))
    update_a = torch.cat([(a[k] - base[k]).flatten() for k in a if k in base])
    update_b = torch.cat([(b[k] - base[k]).flatten() for k in a if k in base])
    assert update_b.norm() > 0
    assert (update_a - update_b).norm() / update_b.norm() < 1e-3
    for key in a.keys() - base.keys():  # the frozen null-text vectors, calibrated once per run (thread counts of
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)  # the two processes may differ)
