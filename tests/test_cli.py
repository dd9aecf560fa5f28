"""`generate` and `python -m gcfg_core sample`: validation before sampling, determinism, PNG parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
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
    ({"width": 100}, "width 100 is not a multiple of 8"),
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
    (["--demo", "--width", "100"], "error: --width 100 is not a multiple of 8"),
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


# --- sizes as the WebUI accepts them (multiples of 8)


class _WebUIStyleTorch:
    """torch, but `cat` of two maps of different sizes first resizes the first to the second (nearest): the way
    the WebUI lets ldm's UNet take sides in multiples of 8 (it swaps the `th` module of openaimodel)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def cat(tensors, *args, **kwargs):
        if len(tensors) == 2 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            tensors = (torch.nn.functional.interpolate(tensors[0], tensors[1].shape[-2:], mode="nearest"), tensors[1])
        return torch.cat(tensors, *args, **kwargs)


@pytest.mark.parametrize("latent", [(9, 9), (9, 10), (8, 8), (16, 8)])
def test_unet_runs_at_sides_off_the_64_px_grid_as_in_the_webui(tiny_model, latent, monkeypatch):
    from ldm.modules.diffusionmodules import openaimodel

    from gcfg_core.denoiser import unet_forward_any_size, unet_size_multiple

    unet = tiny_model.unet.eval()
    assert unet_size_multiple(unet) == 8  # 3 downsamplings: 64-px images
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *latent, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ours = unet_forward_any_size(unet, x, t, context)
        monkeypatch.setattr(openaimodel, "th", _WebUIStyleTorch())
        webui = unet(x, t, context=context)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, webui, rtol=0, atol=0)


def test_sample_accepts_sizes_in_multiples_of_8(tmp_path, capsys):
    assert main(["sample", "--demo", "--width", "72", "--height", "80", "--steps", "2", "--seed", "3",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert Image.open(path).size == (72, 80)
    assert parse_parameters(read_png_parameters(path))[2]["Size-1"] == "72"


# --- every value and path checked before a model loads, named by its flag


@pytest.mark.parametrize(("args", "message"), [
    (["--cfg-scale", "nan"], "error: --cfg-scale must be a finite number, got nan"),
    (["--concept-weight", "nan"], "error: --concept-weight: expected a finite number, got nan"),
    (["--negative-scale", "inf"], "error: --negative-scale: expected a finite number, got inf"),
    (["--steps", "0"], "error: --steps must be an integer ≥ 1, got 0"),
    (["--width", "70"], "error: --width 70 is not a multiple of 8"),
    (["--sampler", "Euler b"], "error: --sampler: unknown sampler 'Euler b'"),
    (["--out", "{file}/out"], "error: --out '{file}/out': cannot write there (Not a directory)"),
    (["--out", "{file}"], "error: --out '{file}': cannot write there"),
])
def test_values_and_the_output_folder_are_checked_before_any_model_loads(args, message, tmp_path, tiny_checkpoint,
                                                                        capsys, monkeypatch):
    import gcfg_core.models

    monkeypatch.setattr(gcfg_core.models, "load_sd_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = [a.replace("{file}", str(a_file)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    assert main(["sample", "--prior", str(tiny_checkpoint), *args, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("{file}", str(a_file))) and err.count("\n") == 1, err


# --- infotext: the rule's keys only, and a concept name that says which model


def test_sampler_infotext_has_only_changed_keys_and_names_the_concept(tmp_path, tiny_checkpoint, concept_unet, capsys):
    from gcfg_core.concept_file import ConceptMetadata, save_concept_model

    concept = tmp_path / "job" / "checkpoints" / "step-000020" / "concept.safetensors"
    concept.parent.mkdir(parents=True)
    save_concept_model(concept, concept_unet, ConceptMetadata(train_config={"name": "faces"}, steps=20))
    assert main(["sample", "--prior", str(tiny_checkpoint), "--concept", str(concept), "--prompt", "a cat",
                 "--width", "64", "--height", "64", "--steps", "1", "--seed", "1", "--no-progress",
                 "--out", str(tmp_path / "out")]) == 0
    text = read_png_parameters(Path(capsys.readouterr().out.strip()))
    _prompt, _negative, params = parse_parameters(text)
    gcfg = {key: value for key, value in params.items() if key.startswith("GCFG")}
    # prior = the main model (no key), default weight, classic negative scale and no terms: nothing but these two
    assert gcfg == {"GCFG": "True", "GCFG concept": "faces step 20"}
    assert GCFGSettings.from_infotext(params) == GCFGSettings(enabled=True, concept="faces step 20")


def test_concept_label_identifies_the_model(tmp_path, concept_unet):
    from gcfg_core.checkpoint import file_sha256
    from gcfg_core.concept_file import ConceptMetadata, concept_label, save_concept_model

    published = tmp_path / "faces.safetensors"
    save_concept_model(published, concept_unet, ConceptMetadata(train_config={"name": "faces"}, steps=7))
    assert concept_label(published, ConceptMetadata(train_config={"name": "faces"}, steps=7)) == "faces.safetensors"
    anonymous = tmp_path / "step-000007" / "concept.safetensors"
    anonymous.parent.mkdir()
    save_concept_model(anonymous, concept_unet, ConceptMetadata(steps=7))
    assert concept_label(anonymous, ConceptMetadata(steps=7)) == f"concept [{file_sha256(anonymous)[:10]}]"


# --- the ldm code's build messages only with --verbose


def test_ldm_build_messages_only_with_verbose(tmp_path, capsys):
    assert main(["sample", "--demo", "--steps", "1", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    quiet = capsys.readouterr()
    assert "making attention of type" not in quiet.err + quiet.out and "Working with z of shape" not in quiet.err
    assert quiet.out.strip().endswith(".png")
    assert main(["sample", "--demo", "--steps", "1", "--no-progress", "-v", "--out", str(tmp_path / "b")]) == 0
    verbose = capsys.readouterr()
    assert "making attention of type 'vanilla'" in verbose.err and verbose.out.strip().endswith(".png")


def test_chatter_filter_drops_whole_known_lines_only():
    import io

    from gcfg_core.console import ChatterFilter

    target = io.StringIO()
    stream = ChatterFilter(target)
    for piece in ("No module 'xformers'. Proceeding without it.", "\n", "making attention of type 'vanilla' with 32 "
                  "in_channels\nWorking with z of shape (1, 4, 32, 32) = 4096 dimensions.\nwrote out/0.png\n",
                  "Setting up MemoryEfficientCrossAttention. Query dim is 320, context_dim is None and using 5 "
                  "heads.\n",
                  "note: making attention of type 'vanilla' is fine\n", "no newline"):
        stream.write(piece)
    stream.flush()
    assert target.getvalue() == "wrote out/0.png\nnote: making attention of type 'vanilla' is fine\nno newline"
