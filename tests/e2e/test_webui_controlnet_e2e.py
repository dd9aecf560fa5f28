"""End-to-end tests of GCFG together with sd-webui-controlnet in a running real WebUI 1.10.x (skipped otherwise).

Needs a WebUI started with ``--api``, this extension and sd-webui-controlnet (v1.1.455) installed, a full-width
SD 1.5 main checkpoint (ControlNet's SD 1.5 model has 320 channels, so a reduced-width checkpoint cannot host it)
and a random ControlNet model written by `tests/e2e/make_controlnet.py`. Set:

* ``GCFG_WEBUI_URL_CN``: the WebUI's URL, e.g. ``http://127.0.0.1:7880`` (the suite is skipped without it);
* ``GCFG_E2E_CN_MODEL``: the ControlNet model as ``/controlnet/model_list`` names it (default: the first listed);
* ``GCFG_E2E_API_AUTH``: ``user:password`` when the WebUI runs with ``--api-auth``.

The control image is a fixed checkerboard, passed with the ``none`` preprocessor. What is checked: requests with
a batch, hires fix and img2img succeed; GCFG enabled with nothing to do is the ControlNet image, pixel for pixel,
in every control mode; the control reaches the rows GCFG combines (weight 0 and 1 differ, weight 0 is the
image without ControlNet). The prior is an unhooked UNet: it never gets the control residual, while the WebUI's
uncond row gets it in the "Balanced" and "My prompt is more important" modes. So the main checkpoint as prior
reproduces the WebUI's image only in "ControlNet is more important", where ControlNet leaves the uncond rows
uncontrolled; the other modes' differences are recorded (``record_property``), not asserted.
"""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
from webui_responses import api_client, max_difference, ok, pixels

URL = os.environ.get("GCFG_WEBUI_URL_CN", "")
pytestmark = [pytest.mark.webui,
              pytest.mark.skipif(not URL, reason="needs a WebUI with ControlNet (GCFG_WEBUI_URL_CN)")]
BASE = {"prompt": "a cat", "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "seed": 1,
        "cfg_scale": 5, "sampler_name": "Euler"}
HIRES = {"batch_size": 2, "n_iter": 2, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
         "hr_second_pass_steps": 2, "denoising_strength": 0.5}
MODES = ["Balanced", "My prompt is more important", "ControlNet is more important"]
# A pixel may differ by 1/255 where float rounding differs between the WebUI's UNet call and ours.
TOLERANCE = 1


@pytest.fixture(scope="module")
def client():
    with api_client(URL) as session:  # this suite's own host (GCFG_WEBUI_URL_CN)
        yield session


@pytest.fixture(scope="module")
def control_model(client):
    listed = client.get("/controlnet/model_list").json()["model_list"]
    name = os.environ.get("GCFG_E2E_CN_MODEL") or (listed[0] if listed else "")
    if not name:
        pytest.skip("no ControlNet model (tests/e2e/make_controlnet.py writes one)")
    assert name in listed
    return name


@pytest.fixture(scope="module")
def main_model(client):
    """The main checkpoint's name as the WebUI reports it (usable as the GCFG prior)."""
    return json.loads(ok(generate(client, "txt2img", [False]))["info"])["sd_model_name"]


def control_image() -> str:
    np = pytest.importorskip("numpy")
    image_module = pytest.importorskip("PIL.Image")
    y, x = np.mgrid[0:64, 0:64]
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[(x // 8 + y // 8) % 2 == 0] = 255
    image[16:48, 16:48, 0] = 0
    buffer = io.BytesIO()
    image_module.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unit(model: str, weight: float = 1.0, mode: str = "Balanced") -> dict:
    """One ControlNet unit; the detected map is not returned, so `images` holds only the generated images."""
    return {"enabled": True, "module": "none", "model": model, "weight": weight, "image": control_image(),
            "control_mode": mode, "resize_mode": "Crop and Resize", "pixel_perfect": False, "processor_res": 64,
            "guidance_start": 0.0, "guidance_end": 1.0, "save_detected_map": False}


def generate(client, route, gcfg_args, control=None, **overrides):
    scripts = {"GCFG": {"args": gcfg_args}}
    if control is not None:
        scripts["controlnet"] = {"args": [control]}
    return client.post(f"/sdapi/v1/{route}", json={**BASE, **overrides, "alwayson_scripts": scripts})


def img2img(client, gcfg_args, control, **overrides):
    """An img2img request after a fixed txt2img one (the init image's VAE sample uses the global RNG)."""
    ok(generate(client, "txt2img", [False], seed=123))
    return generate(client, "img2img", gcfg_args, control, **overrides)


def fraction_above(first, second, threshold: int) -> float:
    """The largest fraction, over the images, of pixel channels that differ by more than `threshold`."""
    return max(float((abs(x - y) > threshold).mean()) for x, y in zip(pixels(first), pixels(second), strict=True))


def mean_difference(first, second) -> float:
    return float(sum(abs(x - y).mean() for x, y in zip(pixels(first), pixels(second), strict=True))
                 / len(first["images"]))


def last_run(client) -> dict:
    return client.get("/gcfg/v1/last-run").json()


def rows(client) -> list[dict]:
    """Extra UNet rows per denoiser call, per sampler pass, of the latest generation."""
    return [run["rows_per_call"] for run in last_run(client)["passes"]]


def assert_controlnet_ran(body, mode: str) -> None:
    assert f"Control Mode: {mode}" in json.loads(body["info"])["infotexts"][0]


# --- (a) batches, hires fix, img2img -------------------------------------------------------------------------------

@pytest.mark.slow
def test_batch_and_hires_fix_with_prior_term_and_control(client, control_model, main_model):
    body = ok(generate(client, "txt2img", [{"enabled": True, "prior": main_model, "terms": "+1 a dog"}],
                       unit(control_model), **HIRES))
    assert len(body["images"]) == 4
    assert_controlnet_ran(body, "Balanced")
    # two batches, each a first pass and a hires pass; 2 images per batch
    # the uncond rows are routed to the prior: the WebUI evaluates only the cond rows
    assert rows(client) == [{"webui": 2.0, "main": 2.0, "prior": 2.0}] * 4


@pytest.mark.slow
def test_batch_and_hires_fix_prior_reproduces_the_webui_when_control_skips_the_uncond(client, control_model,
                                                                                        main_model):
    control = unit(control_model, mode="ControlNet is more important")
    off = ok(generate(client, "txt2img", [False], control, **HIRES))
    on = ok(generate(client, "txt2img", [{"enabled": True, "prior": main_model}], control, **HIRES))
    # Measured on CPU: the hires pass moves a quarter of the pixels by 1/255 and a few by 2/255 (without ControlNet:
    # 0.01 % by 1/255); a prior that lacked or double-counted the control would move them by tens.
    assert max_difference(on, off) <= 2 * TOLERANCE
    assert fraction_above(on, off, TOLERANCE) < 0.01
    assert rows(client) == [{"webui": 2.0, "prior": 2.0}] * 4


def test_img2img_with_prior_and_control(client, control_model, main_model):
    init = ok(generate(client, "txt2img", [False], seed=7))["images"][0]
    extra = {"init_images": [init], "denoising_strength": 0.6}
    control = unit(control_model, mode="ControlNet is more important")
    # The first img2img request of a fresh WebUI gives other pixels than the same request repeated (measured: up
    # to 73/255 with GCFG off); a warm-up request makes the comparison independent of the test order.
    ok(img2img(client, [False], control, **extra))
    off = ok(img2img(client, [False], control, **extra))
    same = ok(img2img(client, [{"enabled": True, "prior": main_model}], control, **extra))
    assert max_difference(same, off) <= TOLERANCE
    assert rows(client) == [{"webui": 1.0, "prior": 1.0}]
    changed = ok(img2img(client, [{"enabled": True, "terms": "+3 a dog"}], control, **extra))
    assert max_difference(changed, off) > 0


# --- (b) enabled with nothing to do is the ControlNet image ------------------------------------------------------

@pytest.mark.parametrize("negative", ["", "ugly"])
@pytest.mark.parametrize("mode", MODES)
def test_enabled_without_prior_terms_or_scale_equals_disabled_with_control(client, control_model, mode, negative):
    control = unit(control_model, mode=mode)
    off = ok(generate(client, "txt2img", [False], control, negative_prompt=negative, batch_size=2))
    on = ok(generate(client, "txt2img", [{"enabled": True, "prior": "None"}], control, negative_prompt=negative,
                     batch_size=2))
    assert [image.tobytes() for image in pixels(on)] == [image.tobytes() for image in pixels(off)]
    assert last_run(client) == {"enabled": True, "error": None, "passes": []}
    assert_controlnet_ran(on, mode)


# --- (c) the prior is a UNet without control: measured, asserted only where ControlNet skips the uncond ----------

@pytest.mark.parametrize("mode", MODES)
def test_main_checkpoint_as_prior_against_plain_controlnet(client, control_model, main_model, mode,
                                                          record_property):
    control = unit(control_model, mode=mode)
    off = ok(generate(client, "txt2img", [False], control))
    on = ok(generate(client, "txt2img", [{"enabled": True, "prior": main_model}], control))
    assert rows(client) == [{"webui": 1.0, "prior": 1.0}]
    record_property("max_difference", max_difference(on, off))
    record_property("mean_difference", round(mean_difference(on, off), 3))
    if mode == "ControlNet is more important":
        # ControlNet multiplies its residual by the cond mark: the WebUI's uncond row is the uncontrolled UNet too.
        assert max_difference(on, off) <= TOLERANCE
    else:
        # The WebUI's uncond row carries the control, the prior's does not: the control is amplified by the scale.
        assert max_difference(on, off) > TOLERANCE


# --- (d) the control reaches the rows GCFG combines --------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_control_weight_changes_the_gcfg_image(client, control_model, main_model, mode):
    gcfg = [{"enabled": True, "prior": main_model, "terms": "+1 a dog"}]
    without = ok(generate(client, "txt2img", gcfg))
    zero = ok(generate(client, "txt2img", gcfg, unit(control_model, weight=0.0, mode=mode)))
    full = ok(generate(client, "txt2img", gcfg, unit(control_model, weight=1.0, mode=mode)))
    assert max_difference(zero, without) <= TOLERANCE
    assert max_difference(full, zero) > 8
    assert rows(client) == [{"webui": 1.0, "main": 1.0, "prior": 1.0}]
