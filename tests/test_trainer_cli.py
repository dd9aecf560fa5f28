"""`python -m trainer` end to end: prepare, train, status, sample, resume; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import checkpoints
from trainer.cli import EXIT_USAGE, main
from trainer.config import ConfigError, TrainConfig
from trainer.jobfolder import JobFolder, JobState, JobStatus

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import cli_args, tiny_config  # noqa: E402
from waiting import BACKSTOP_S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_prepare_train_status_sample_resume(tmp_path, tiny_checkpoint, capsys):
    args = cli_args(tmp_path, tiny_checkpoint, max_steps=2, checkpoint_every_steps=0)
    job = JobFolder(tmp_path / "job")

    assert main(["-q", "prepare", *args]) == 0
    assert (job.path / "prepared.json").is_file() and job.config_path.is_file()
    out = capsys.readouterr().out
    assert "8 images (0 skipped)" in out and "buckets: 64x64 8\n" in out  # the histogram of the scan

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
    assert "--batch-size=5" in capsys.readouterr().err

    assert main(["status", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "has no status.json" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "is not a job folder" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--prior", str(tiny_checkpoint), "--out", str(tmp_path / "o.png")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def _finished_job(tmp_path: Path, base: Path, step: int = 20) -> JobFolder:
    """A job folder as a completed `step`-step run leaves it (config, status, one checkpoint), without training."""
    config = tiny_config(tmp_path, base, max_steps=step)
    job = JobFolder(config.job_dir).create()
    config.save(job.config_path)
    job.write_status(JobStatus(state=JobState.COMPLETED, step=step, total_steps=step, message=f"completed {step}"))
    checkpoints.write_checkpoint(job.checkpoints_dir, step, write_concept=lambda p: p.write_bytes(b"concept"),
                                 train_state={"format": checkpoints.TRAIN_STATE_FORMAT, "step": step}, meta={})
    return job


def _unchanged(job: JobFolder):
    files = (job.config_path, job.status_path)
    before = [f.read_bytes() for f in files]
    return lambda: [f.read_bytes() for f in files] == before


def test_resume_refuses_fixed_fields_saying_why(tmp_path, tiny_checkpoint, capsys):
    job = _finished_job(tmp_path, tiny_checkpoint)
    unchanged = _unchanged(job)
    capsys.readouterr()  # (the setup's log lines)
    assert main(["resume", str(job.path), "--resolution", "128"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments" not in err
    assert err.startswith("error: --resolution is fixed for this job: the latent cache was built with it (this job: "
                          "--resolution 64). To train with --resolution 128, start a new job from this one's "
                          f"settings: python -m trainer train --config {job.config_path} --resolution 128 ")
    assert main(["resume", str(job.path), "--seed", "3", "--flip"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--flip is fixed for this job" in err and "(this job: --no-flip)" in err and "--seed is fixed" in err
    assert unchanged()


def test_resume_refuses_a_max_steps_below_the_current_step(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from trainer import loop

    job = _finished_job(tmp_path, tiny_checkpoint, step=20)
    unchanged = _unchanged(job)
    monkeypatch.setattr(loop, "load_training_unet", lambda *a, **k: pytest.fail("training started"))
    assert main(["resume", str(job.path), "--max-steps", "10"]) == EXIT_USAGE
    capsys.readouterr()  # (the setup's log lines)
    assert main(["resume", str(job.path), "--max-steps", "10"]) == EXIT_USAGE
    assert capsys.readouterr().err == ("error: --max-steps=10 is below this job's current step 20: a resume "
                                       "continues the run, so it needs --max-steps=20 or more\n")
    assert unchanged() and TrainConfig.load(job.config_path).max_steps == 20
    assert job.read_status().step == job.read_status().total_steps == 20
    # the loop refuses it too (the WebUI tab resumes through the job manager), before writing anything
    with pytest.raises(ConfigError, match="max_steps=10 is below this job's current step 20"):
        loop.train(TrainConfig.load(job.config_path).with_overrides(max_steps=10), job, resume=True, progress=False)
    assert unchanged()


def test_bad_paths_and_values_are_refused_before_any_work_naming_the_flag(tmp_path, tiny_checkpoint, capsys,
                                                                          monkeypatch):
    from trainer import data, loop

    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(data, "scan_dataset", lambda *a, **k: pytest.fail("the dataset was scanned"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = cli_args(tmp_path, tiny_checkpoint)
    cases = [
        (["--job-dir", str(a_file / "job")], f"error: --job-dir='{a_file / 'job'}' cannot be created: '{a_file}' is "
                                             "not a folder"),
        (["--learning-rate", "nan"], "error: --learning-rate=nan must be in (0, 1]"),
        (["--batch-size", "5"], "error: --batch-size=5 is not a multiple of --micro-batch-size × processes"),
        (["--preview-seeds", "-1"], "error: --preview-seeds=[-1] must all be in [0, "),
    ]
    for extra, message in cases:
        assert main(["train", *args, *extra]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",')
    assert main(["train", "--config", str(broken)]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith(f"error: config file '{broken}': config is not valid JSON")
    # a value from the --config file keeps its field name and says where it came from
    config = tmp_path / "job.json"
    config.write_text(TrainConfig(**{**tiny_config(tmp_path, tiny_checkpoint).to_dict(), "max_steps": 2})
                      .to_json().replace('"max_steps": 2', '"max_steps": 0'))
    assert main(["train", "--config", str(config)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"max_steps=0 must be ≥ 1 (from {config}; a flag overrides it)" in err


def test_an_unwritable_job_dir_is_refused_before_the_scan(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from trainer import data

    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        job_dir = locked / "job"
    else:  # root may write almost anywhere, but not into Linux's sysfs
        job_dir = Path("/sys/gcfg-test-job")
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no folder this process cannot write to")
    monkeypatch.setattr(data, "scan_dataset", lambda *a, **k: pytest.fail("the dataset was scanned"))
    assert main(["train", *cli_args(tmp_path, tiny_checkpoint), "--job-dir", str(job_dir)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --job-dir") and str(job_dir) in err and err.count("\n") == 1, err
    assert not job_dir.exists()


def test_sample_checks_its_flags_before_loading_models(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import gcfg_core.concept_file
    import gcfg_core.model_files
    import gcfg_core.models

    job = _finished_job(tmp_path, tiny_checkpoint, step=4)
    checkpoint = checkpoints.latest_checkpoint(job.checkpoints_dir)
    # a header-only concept file is enough: nothing but its metadata may be read before the checks
    from gcfg_core.concept_file import ConceptMetadata

    header = ConceptMetadata(train_config=TrainConfig.load(job.config_path).to_dict(), steps=4).to_header()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(checkpoint.concept_path), metadata=header)
    monkeypatch.setattr(gcfg_core.models, "load_sd_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(gcfg_core.model_files, "load_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(gcfg_core.concept_file, "load_concept_model", lambda *a, **k: pytest.fail("loaded"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ["sample", str(job.path), "--prior", str(tiny_checkpoint)]
    capsys.readouterr()  # (the setup's log lines)
    for extra, message in [
        (["--steps", "0", "--out", str(tmp_path / "g.png")], "error: --steps must be an integer ≥ 1, got 0"),
        (["--concept-weight", "nan", "--out", str(tmp_path / "g.png")],
         "error: --concept-weight: expected a finite number, got nan"),
        (["--sampler", "Euler b", "--out", str(tmp_path / "g.png")], "error: --sampler: unknown sampler 'Euler b'"),
        (["--size", "60", "--out", str(tmp_path / "g.png")], "error: --size 60 is not a multiple of 8"),
        (["--device", "gpu", "--out", str(tmp_path / "g.png")], "error: --device 'gpu' must be"),
        (["--out", str(a_file / "g.png")], f"error: --out '{a_file}': cannot write there (it is a file, not a folder)"),
    ]:
        assert main(base + extra) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.slow
def test_train_shows_progress_and_no_ldm_build_messages(tmp_path, tiny_checkpoint, capsys):
    from gcfg_core.console import is_chatter

    capsys.readouterr()
    assert main(["train", *cli_args(tmp_path, tiny_checkpoint, max_steps=4, checkpoint_every_steps=0)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "completed 4 steps\n"
    lines = captured.err.splitlines()
    caching = [line for line in lines if "gcfg.trainer.progress: caching latents: images " in line]
    assert caching and "images 8/8 (100%)" in caching[-1]
    training = [line.split("gcfg.trainer.progress: ")[1] for line in lines if "training tiny: step " in line]
    assert [line.split(" (")[0] for line in training] == [f"training tiny: step {s}/4" for s in (1, 2, 3, 4)]
    assert all(", loss " in line and " images/s " in line and line.endswith(" left") for line in training)
    assert not any(is_chatter(line) for line in lines + captured.out.splitlines())
    assert main(["-q", "train", *cli_args(tmp_path / "q", tiny_checkpoint, max_steps=1)]) == 0
    assert "gcfg.trainer.progress" not in capsys.readouterr().err


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
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
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
        assert err.count("\n") == 1 and err.startswith("error: --mixed-precision='fp16' needs a GPU")
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
