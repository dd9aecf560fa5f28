"""`python -m trainer` end to end: prepare, train, status, sample, resume; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import checkpoints
from trainer.cli import EXIT_USAGE, main
from trainer.config import TrainConfig
from trainer.jobfolder import JobFolder, JobState

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import cli_args  # noqa: E402
from waiting import BACKSTOP_S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_prepare_train_status_sample_resume(tmp_path, tiny_checkpoint, capsys):
    args = cli_args(tmp_path, tiny_checkpoint, max_steps=2, checkpoint_every_steps=0)
    job = JobFolder(tmp_path / "job")

    assert main(["-q", "prepare", *args]) == 0
    assert (job.path / "prepared.json").is_file() and job.config_path.is_file()
    assert "8 images (0 skipped)" in capsys.readouterr().out

    # train from the job's own config file, with one flag on top
    assert main(["-q", "train", "--config", str(job.config_path), "--max-steps", "3"]) == 0
    assert "completed 3 steps" in capsys.readouterr().out
    assert TrainConfig.load(job.config_path).max_steps == 3

    assert main(["status", str(job.path)]) == 0
    text = capsys.readouterr().out
    assert "state      completed" in text and "step       3 / 3" in text and "images/s" in text
    assert main(["status", str(job.path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["state"] == "completed" and summary["latest_checkpoint"].endswith("step-000003")

    out = tmp_path / "grid.png"
    assert main(["-q", "sample", str(job.path), "--prior", str(tiny_checkpoint), "--out", str(out),
                 "--prompts", "a dog", "--seeds", "1", "2", "3", "--steps", "2", "--sampler", "Euler"]) == 0
    assert Image.open(out).size == (3 * 64, 2 * 64)

    # resume may change mutable fields only; it continues from step 3
    assert main(["-q", "resume", str(job.path), "--max-steps", "5", "--learning-rate", "2e-5"]) == 0
    assert job.read_status().state == JobState.COMPLETED
    assert checkpoints.latest_checkpoint(job.checkpoints_dir).step == 5
    steps = [e["step"] for e in job.read_events() if e.get("type") == "step"]
    assert steps == [1, 2, 3, 4, 5]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_checkpoint, capsys):
    assert main(["train", "--name", "x"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: give --config FILE or all of --dataset-dir")

    args = cli_args(tmp_path, tiny_checkpoint)
    bad = [*args, "--batch-size", "5"]  # not a multiple of micro_batch_size 2 (the last flag wins)
    assert main(["train", *bad]) == EXIT_USAGE
    assert "batch_size=5" in capsys.readouterr().err

    assert main(["status", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "has no status.json" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "is not a job folder" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--prior", str(tiny_checkpoint), "--out", str(tmp_path / "o.png")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_resume_refuses_flags_that_would_change_the_run():
    # --seed is not resume-mutable: argparse rejects it before anything runs
    with pytest.raises(SystemExit) as exit_info:
        main(["resume", "somejob", "--seed", "3"])
    assert exit_info.value.code == EXIT_USAGE


@pytest.mark.slow
def test_train_refuses_a_job_that_already_has_checkpoints(tmp_path, tiny_checkpoint, capsys):
    args = cli_args(tmp_path, tiny_checkpoint, max_steps=1)
    assert main(["-q", "train", *args]) == 0
    assert main(["-q", "train", *args]) == EXIT_USAGE
    assert "already has checkpoints" in capsys.readouterr().err


def test_python_m_trainer_runs_without_the_webui():
    code = ("import sys, trainer.cli, trainer.loop, trainer.previews; "
            "assert not any(m == 'modules' or m.startswith(('modules.', 'gradio')) for m in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=BACKSTOP_S)
    assert run.returncode == 0, run.stderr.decode()
    help_run = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=REPO, capture_output=True,
                              timeout=BACKSTOP_S)
    assert help_run.returncode == 0
    for command in (b"prepare", b"train", b"resume", b"sample", b"status", b"demo-data"):
        assert command in help_run.stdout


def _tiny_disk(monkeypatch, free: int = 1000) -> None:
    from trainer import preflight

    monkeypatch.setattr(preflight, "free_disk_bytes", lambda _path: free)


def test_preflight_refuses_a_full_disk_before_any_model_is_loaded_or_cache_written(tmp_path, tiny_checkpoint,
                                                                                   monkeypatch, capsys):
    from trainer import loop

    _tiny_disk(monkeypatch)
    monkeypatch.setattr(loop, "load_sd_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["-q", "train", *cli_args(tmp_path, tiny_checkpoint)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: needs ") and "free disk" in err and "has 0.0 GB" in err

    job = JobFolder(tmp_path / "job")
    assert not job.cache_dir.exists() or not any(p.is_file() for p in job.cache_dir.rglob("*"))
    assert not (job.path / loop.NULLTEXT_FILE).exists() and not (job.path / loop.PREPARED_FILE).exists()
    status = job.read_status()
    assert status.state == JobState.FAILED
    assert status.last_error == "PreflightError: " + err.removeprefix("error: ").strip()


@pytest.mark.slow
def test_preflight_of_a_prepared_job_runs_before_the_unet_is_loaded(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    from trainer import loop

    args = cli_args(tmp_path, tiny_checkpoint)
    assert main(["-q", "prepare", *args]) == 0
    _tiny_disk(monkeypatch)
    monkeypatch.setattr(loop, "load_training_unet", lambda *a, **k: pytest.fail("the UNet was loaded"))
    # The prepared cache and checkpoints count as reusable space; 1000 bytes more are still far too little.
    assert main(["-q", "train", *args]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "free disk" in err
    assert JobFolder(tmp_path / "job").read_status().state == JobState.FAILED


def test_fp16_on_cpu_is_refused_up_front_in_one_line(tmp_path, tiny_checkpoint, capsys):
    args = cli_args(tmp_path, tiny_checkpoint, mixed_precision="fp16", device="cpu")
    for command in ("train", "prepare"):
        assert main(["-q", command, *args]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: mixed_precision='fp16' needs a GPU")
        assert "'bf16'" in err and "'no'" in err
    assert not (tmp_path / "job").exists()  # refused before the job folder is created


def test_demo_data_is_deterministic_and_usable_for_training(tmp_path, capsys):
    from trainer.cli import write_demo_dataset
    from trainer.data import scan_dataset

    assert main(["demo-data", str(tmp_path / "a"), "--count", "5", "--size", "48", "--seed", "3"]) == 0
    assert capsys.readouterr().out == f"wrote 5 demo images (48x48 px) to {tmp_path / 'a'}\n"
    again = write_demo_dataset(tmp_path / "b", count=5, size=48, seed=3)
    other = write_demo_dataset(tmp_path / "c", count=5, size=48, seed=4)
    a = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in a] == [f"demo-{i:04d}.png" for i in range(5)]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in other]
    images = [np.asarray(Image.open(p)) for p in a]
    assert all(im.shape == (48, 48, 3) for im in images)
    assert len({im.tobytes() for im in images}) == 5  # jittered, not copies
    for im in images:  # the concept: a warm disc (red > blue) on a cooler background
        warm = (im[..., 0].astype(int) - im[..., 2]) > 100
        assert 0.05 < warm.mean() < 0.5
    assert len(scan_dataset(tmp_path / "a", min_image_size=48).images) == 5
    capsys.readouterr()
    assert main(["-q", "demo-data", str(tmp_path / "d"), "--count", "0"]) == EXIT_USAGE
    assert capsys.readouterr().err == "error: --count=0 must be ≥ 1\n"
