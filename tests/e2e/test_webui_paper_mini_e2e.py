"""Real-WebUI checks with the trained paper-mini models (tests/benchmarks/paper_mini): pictures, not noise.

Needs a running WebUI (see test_webui_e2e.py) with the paper-mini models installed by
``python tests/benchmarks/paper_mini/run.py assets --webui-dir <WebUI data dir>`` and:

* ``GCFG_WEBUI_DIR``: the WebUI checkout (the suite is skipped without it);
* ``GCFG_E2E_PAPER_MINI``: the models folder the assets went to (``<dir>/Stable-diffusion/paper-mini-*.safetensors``
  and ``<dir>/GCFG/paper-mini-rings.safetensors``); skipped without it.

Each request selects its checkpoint with ``override_settings``, so the WebUI may start with any model.

* The WebUI's own sampling of these files and this project's standalone sampler (`gcfg_core.pipeline.generate`)
  give the same pixels (±1/255) for plain CFG, GCFG with the base as the prior, and GCFG with the prior and the
  concept UNet: the WebUI loads the 128-wide text encoder through the model's ``.yaml`` exactly as `gcfg_core` does.
* The base draws the colour and background the prompt asks for, read back by the benchmark's pixel detectors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from webui_responses import ok, pixels

MODELS = os.environ.get("GCFG_E2E_PAPER_MINI", "")
pytestmark = [pytest.mark.webui,
              pytest.mark.skipif(not os.environ.get("GCFG_WEBUI_DIR"), reason="needs a real WebUI (GCFG_WEBUI_DIR)"),
              pytest.mark.skipif(not MODELS, reason="needs the paper-mini models (GCFG_E2E_PAPER_MINI)")]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROMPT = "a blue ring on a white background"
CONCEPT = "paper-mini-rings.safetensors"
REQUEST = {"prompt": PROMPT, "negative_prompt": "", "steps": 10, "width": 64, "height": 64, "seed": 7,
           "cfg_scale": 2.5, "sampler_name": "Euler", "batch_size": 4}


@pytest.fixture(scope="module")
def files():
    from gcfg_core.concept_file import load_concept_model
    from gcfg_core.models import load_sd_checkpoint

    root = Path(MODELS)
    checkpoints = {key: load_sd_checkpoint(root / "Stable-diffusion" / f"paper-mini-{key}.safetensors",
                                           compute_hash=False) for key in ("base", "finetune")}
    concept, _ = load_concept_model(root / "GCFG" / CONCEPT)
    return checkpoints, concept


def webui_txt2img(client, checkpoint: str, gcfg_args=None, **overrides):
    body = {**REQUEST, **overrides, "override_settings": {"sd_model_checkpoint": f"paper-mini-{checkpoint}"}}
    if gcfg_args is not None:
        body["alwayson_scripts"] = {"GCFG": {"args": gcfg_args}}
    result = ok(client.post("/sdapi/v1/txt2img", json=body))
    assert json.loads(result["info"])["sd_model_name"] == f"paper-mini-{checkpoint}"
    return pixels(result)


def ours(files, main: str, prior: str | None, concept: bool, **overrides) -> list:
    import numpy as np

    from gcfg_core.params import GCFGSettings
    from gcfg_core.pipeline import GenerationRequest, generate

    checkpoints, concept_unet = files
    body = {**REQUEST, **overrides}
    request = GenerationRequest(prompt=body["prompt"], negative_prompt=body["negative_prompt"],
                                cfg_scale=body["cfg_scale"], steps=body["steps"], sampler=body["sampler_name"],
                                seed=body["seed"], width=body["width"], height=body["height"],
                                batch_size=body["batch_size"],
                                gcfg=GCFGSettings(enabled=prior is not None, concept_weight=2.5))
    result = generate(request, prior=checkpoints[prior or main], main=checkpoints[main],
                      concept_unet=concept_unet if concept else None, progress=False)
    return [np.asarray(image).astype(int) for image in result.images]


@pytest.mark.parametrize(("gcfg_args", "prior", "concept"), [
    (None, None, False),
    ([True, "paper-mini-base", "None", 2.5, "classic", ""], "base", False),
    ([True, "paper-mini-base", CONCEPT, 2.5, "classic", ""], "base", True),
], ids=["plain-cfg", "prior-uncond", "prior-and-concept"])
def test_webui_and_standalone_sampler_give_the_same_pixels(client, files, gcfg_args, prior, concept):
    webui = webui_txt2img(client, "finetune", gcfg_args)
    mine = ours(files, "finetune", prior, concept)
    assert max(int(abs(a - b).max()) for a, b in zip(webui, mine, strict=True)) <= 1


@pytest.mark.parametrize(("colour", "background"), [("magenta", "white"), ("cyan", "gray")])
def test_base_draws_the_prompted_colour_and_background(client, colour, background):
    """Two prompts that differ in both attributes, each drawn as asked (the benchmark measured this base at 100 %
    on both, on other seeds; it draws "blue" as cyan, so blue is not one of them)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    from paper_mini import detect

    images = webui_txt2img(client, "base", None, prompt=f"a {colour} ring on a {background} background", steps=25,
                           sampler_name="DPM++ 2M", batch_size=8)
    readings = [detect.read_image(image.astype("uint8")) for image in images]
    matches = sum(r.colour == colour and r.background == background for r in readings)
    assert matches >= 6, [(r.shape, r.colour, r.background) for r in readings]
