"""`generate` and `python -m gcfg_core sample`: validation before sampling, determinism, PNG parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from waiting import BACKSTOP_S

from gcfg_core.cli import main
from gcfg_core.nulltext import convert_to_nulltext, transformer_block_names
from gcfg_core.params import GCFGSettings
from gcfg_core.pipeline import GenerationRequest, generate
from gcfg_core.pngmeta import parse_parameters, read_png_parameters

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=64, height=64, steps=3, seed=7)


@pytest.fixture(scope="module")
def concept_unet():
    from gcfg_core.configs import TINY
    from gcfg_core.models import build_unet, dezero_

    torch.manual_seed(2)
    unet = dezero_(build_unet(TINY.unet), seed=2).eval()
    return convert_to_nulltext(unet, {name: torch.full((unet.get_submodule(name).norm1.normalized_shape[0],), 0.05)
                                      for name in transformer_block_names(unet)})


def test_generate_is_deterministic_and_reports_seeds_and_infotext(tiny_model, tiny_prior, concept_unet):
    request = GenerationRequest("a cat", batch_size=2, sampler="Euler a",
                                gcfg=GCFGSettings(enabled=True, concept_weight=1.5, terms="+2 @prior {0-0.5} dog"),
                                **SMALL)
    first = generate(request, prior=tiny_prior, main=tiny_model, concept_unet=concept_unet, progress=False)
    again = generate(request, prior=tiny_prior, main=tiny_model, concept_unet=concept_unet, progress=False)
    assert first.seeds == [7, 8] and [im.size for im in first.images] == [(64, 64)] * 2
    assert [im.tobytes() for im in first.images] == [im.tobytes() for im in again.images]
    assert first.images[0].tobytes() != first.images[1].tobytes()
    # Steps 0-1 of 3 evaluate prior (uncond + "dog"), main and concept: 2 images × 4 rows; step 2 drops "dog".
    assert first.unet_rows_per_step == pytest.approx((8 + 8 + 6) / 3)
    prompt, negative, params = parse_parameters(first.infotexts[1])
    assert (prompt, negative, params["Seed"], params["Sampler"]) == ("a cat", "", "8", "Euler a")
    assert GCFGSettings.from_infotext(params) == request.gcfg


def test_main_defaults_to_the_prior_and_gcfg_can_be_off(tiny_prior):
    off = GenerationRequest("", negative_prompt="blurry", gcfg=GCFGSettings(), **SMALL)
    result = generate(off, prior=tiny_prior, progress=False)
    assert result.unet_rows_per_step == 2  # classic CFG: prompt + negative in one call
    assert "GCFG" not in parse_parameters(result.infotexts[0])[2]


def test_classic_negative_makes_the_prior_irrelevant(tiny_model, tiny_prior):
    request = GenerationRequest("a cat", negative_prompt="blurry", **SMALL)
    with_prior = generate(request, prior=tiny_prior, main=tiny_model, progress=False)
    other_prior = generate(request, prior=tiny_model, main=tiny_model, progress=False)
    assert with_prior.images[0].tobytes() == other_prior.images[0].tobytes()
    assert with_prior.unet_rows_per_step == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"width": 72}, "width 72 is not a multiple of 64"),
    ({"sampler": "Euler b"}, "unknown sampler 'Euler b'"),
    ({"gcfg": GCFGSettings(enabled=True, terms="+1 @concept")}, "uses model 'concept', which is not loaded"),
    ({"gcfg": GCFGSettings(enabled=True, terms="+1 @sdxl.safetensors x")}, "uses model 'sdxl.safetensors'"),
    ({"steps": 0}, "steps must be an integer ≥ 1, got 0"),
    ({"seed": -2}, "seed must be -1"),
])
def test_bad_requests_fail_before_sampling(tiny_prior, changes, message, monkeypatch):
    import gcfg_core.pipeline as pipeline

    monkeypatch.setattr(pipeline, "sample", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(ValueError, match=message):
        generate(GenerationRequest("x", **{**SMALL, **changes}), prior=tiny_prior, progress=False)


def test_concept_term_with_a_prompt_is_refused(tiny_prior, concept_unet):
    request = GenerationRequest("x", gcfg=GCFGSettings(enabled=True, terms="+1 @concept a face"), **SMALL)
    with pytest.raises(ValueError, match="concept model is text-free"):
        generate(request, prior=tiny_prior, concept_unet=concept_unet, progress=False)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gcfg_core", "sample", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=BACKSTOP_S)


@pytest.mark.slow
def test_cli_demo_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = run_cli("--demo", "--prompt", "a cat, (fluffy:1.2)", "--negative-prompt", "blurry",
                     "--negative-scale", "-2", "--term", "+3 in Van Gogh style", "--term", "-1 @prior {0-0.5} dog",
                     "--sampler", "DPM++ 2M Karras", "--seed", "42", "--batch-size", "2", "--steps", "4",
                     "--out", str(out), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in paths] == ["00000-42.png", "00001-43.png"] and all(p.is_file() for p in paths)
    prompt, negative, params = parse_parameters(read_png_parameters(paths[1]))
    assert (prompt, negative) == ("a cat, (fluffy:1.2)", "blurry")
    assert params["Steps"] == "4" and params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert params["Seed"] == "43" and params["Size-1"] == "64" and params["CFG scale"] == "7"
    settings = GCFGSettings.from_infotext(params)
    assert settings == GCFGSettings(enabled=True, prior="random-tiny-1", concept="demo-concept", concept_weight=2.5,
                                    negative_scale=-2.0, terms="+3 in Van Gogh style\n-1 @prior {0-0.5} dog")


@pytest.mark.parametrize(("args", "message"), [
    (["--prior", "missing.safetensors"], "error: --prior: file not found: missing.safetensors"),
    (["--demo", "--term", "3 cats"], "error: --term #1 '3 cats': column 1: expected a signed weight"),
    (["--demo", "--width", "100"], "error: width 100 is not a multiple of 64"),
    ([], "error: --prior PATH is required"),
])
def test_cli_errors_are_one_line_with_exit_code_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", *args, "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].startswith(message) and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_refuses_a_non_sd1_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(path))
    assert main(["sample", "--prior", str(path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_help_states_each_default_once_and_never_none(capsys):
    from gcfg_core.cli import build_parser

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text
    assert "[default" not in text  # one style
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("sample", "random-checkpoint"):
        parser = commands[name]
        for action in parser._actions:
            if action.help and action.option_strings:
                shown = parser._get_formatter()._expand_help(action)
                assert shown.count("default") <= 1, (name, action.option_strings, shown)
    defaults = {a.dest: parser._get_formatter()._expand_help(a) for a in commands["sample"]._actions if a.help}
    assert defaults["steps"].endswith("(default: 20, or 8 with --demo)")
    assert defaults["sampler"].endswith("(default: Euler)") and defaults["seed"].endswith("(default: -1)")


def test_demo_without_a_prompt_uses_the_default_prompt(tmp_path, capsys):
    from gcfg_core.cli import DEMO_PROMPT

    assert main(["sample", "--demo", "--steps", "1", "--seed", "5", "--no-progress", "--out", str(tmp_path)]) == 0
    path = Path(capsys.readouterr().out.strip())
    prompt, _negative, params = parse_parameters(read_png_parameters(path))
    assert prompt == DEMO_PROMPT == "a photo of a cat" and params["Seed"] == "5"


def test_random_checkpoint_writes_a_loadable_sd1_file(tmp_path, capsys):
    from gcfg_core.checkpoint import ModelFamily, read_state_dict_shapes
    from gcfg_core.models import load_sd_checkpoint, random_sd_model

    out = tmp_path / "base.safetensors"
    assert main(["random-checkpoint", str(out), "--seed", "3"]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    model = load_sd_checkpoint(out, compute_hash=False)
    assert model.family is ModelFamily.SD1 and model.architecture.name == "tiny"
    expected = random_sd_model(seed=3).unet.state_dict()
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in expected.items())
    assert len([k for k in read_state_dict_shapes(out) if k.startswith("model.diffusion_model.")]) == 686  # SD 1.5
    assert main(["random-checkpoint", str(tmp_path / "base.ckpt")]) == 2
    error = capsys.readouterr().err
    assert error == f"error: {tmp_path / 'base.ckpt'}: the output file name must end in .safetensors\n"
