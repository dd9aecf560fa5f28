"""The README's "train a tiny concept model" sequence, run command by command, so the instructions cannot rot.

`NEWCOMER_COMMANDS` is the README's code block verbatim; the test runs it (with this interpreter in place of
`.venv/bin/python`, in a temporary folder) and checks what each step promises.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from waiting import BACKSTOP_S

from gcfg_core.console import is_chatter

REPO = Path(__file__).resolve().parents[1]

NEWCOMER_COMMANDS = """\
.venv/bin/python -m gcfg_core random-checkpoint outputs/try/base.safetensors
.venv/bin/python -m trainer demo-data outputs/try/images
.venv/bin/python -m trainer train --dataset-dir outputs/try/images --base-checkpoint outputs/try/base.safetensors \\
    --job-dir outputs/try/job --name try --resolution 64 --min-image-size 64 --batch-size 4 --micro-batch-size 2 \\
    --max-steps 20 --learning-rate 1e-4 --mixed-precision no --device cpu \\
    --checkpoint-every-steps 10 --preview-every-steps 10 --preview-steps 4
.venv/bin/python -m trainer status outputs/try/job
.venv/bin/python -m gcfg_core sample --prior outputs/try/base.safetensors \\
    --concept outputs/try/job/checkpoints/step-000020/concept.safetensors --prompt "a photo of a cat" \\
    --width 64 --height 64 --steps 8 --seed 1 --out outputs/try/samples
"""


def parse_commands(script: str) -> list[list[str]]:
    """One argv per command of a shell block with backslash-continued lines."""
    return [shlex.split(line) for line in script.replace("\\\n", " ").splitlines() if line.strip()]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_readme_block_is_the_tested_one():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    trainer_blocks = [b for b in blocks if "trainer demo-data" in b]
    if not trainer_blocks:
        pytest.skip("README.md has no trainer quick start yet")
    assert NEWCOMER_COMMANDS in trainer_blocks
    # its timings say how loaded the (shared) machine was when they were taken
    after_block = readme.split(NEWCOMER_COMMANDS, 1)[1].split("| **total** |", 1)[0]
    assert "load average" in after_block and "`uptime`" in after_block


@pytest.mark.slow
def test_newcomer_sequence_trains_and_samples_a_tiny_concept_model(tmp_path):
    commands = parse_commands(NEWCOMER_COMMANDS)
    assert all(c[:2] == [".venv/bin/python", "-m"] for c in commands)
    assert [tuple(c[2:4]) for c in commands] == [("gcfg_core", "random-checkpoint"), ("trainer", "demo-data"),
                                                 ("trainer", "train"), ("trainer", "status"), ("gcfg_core", "sample")]
    outputs, errors = [], []
    for argv in commands:
        run = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=BACKSTOP_S)
        assert run.returncode == 0, f"{shlex.join(argv)}\n{run.stderr[-3000:]}"
        outputs.append(run.stdout)
        errors.append(run.stderr)
        # no build messages of the ldm code (only with --verbose)
        assert not [line for line in (run.stdout + run.stderr).splitlines() if is_chatter(line)], shlex.join(argv)

    root = tmp_path / "outputs" / "try"
    assert outputs[0].strip() == "outputs/try/base.safetensors" and (root / "base.safetensors").is_file()
    images = sorted((root / "images").glob("*.png"))
    assert len(images) == 16 and all(Image.open(p).size == (64, 64) for p in images)
    assert outputs[2] == "completed 20 steps\n"
    progress = [line for line in errors[2].splitlines() if "gcfg.trainer.progress: training try: step " in line]
    assert len(progress) == 20 and "step 20/20 (100%), loss " in progress[-1]  # 20 steps: one line each

    job = root / "job"
    status = json.loads((job / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["total_steps"] == 20
    assert "state      completed" in outputs[3] and "step       20 / 20" in outputs[3]
    assert sorted(p.name for p in (job / "previews").glob("*.png")) == ["step-000010.png", "step-000020.png"]
    assert (job / "loss.png").is_file()

    sample = Path(tmp_path / outputs[4].strip())
    assert sample.name == "00000-1.png" and Image.open(sample).size == (64, 64)
    parameters = Image.open(sample).info["parameters"]
    assert "GCFG: True, GCFG concept: try step 20" in parameters
    assert "GCFG prior" not in parameters and "GCFG terms" not in parameters
