"""End-to-end tests against a running real WebUI 1.10.x with this extension installed (skipped otherwise).

Set GCFG_WEBUI_DIR to the WebUI checkout and start it with `--api` (CPU: `--use-cpu all --no-half --precision
full --skip-torch-cuda-test --server-name 127.0.0.1`); GCFG_WEBUI_URL defaults to http://127.0.0.1:7860 and
GCFG_E2E_PRIOR names a second SD 1.x checkpoint to use as the prior.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.webui, pytest.mark.skipif(not os.environ.get("GCFG_WEBUI_DIR"),
                                                    reason="needs a real WebUI (GCFG_WEBUI_DIR)")]
URL = os.environ.get("GCFG_WEBUI_URL", "http://127.0.0.1:7860")
PRIOR = os.environ.get("GCFG_E2E_PRIOR", "")
BASE = {"prompt": "a cat", "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "seed": 1,
        "cfg_scale": 5, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def client():
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=URL, timeout=600) as session:
        yield session


def txt2img(client, gcfg_args=None, **overrides):
    body = {**BASE, **overrides}
    if gcfg_args is not None:
        body["alwayson_scripts"] = {"GCFG": {"args": gcfg_args}}
    return client.post("/sdapi/v1/txt2img", json=body)


def rows(client):
    return client.get("/gcfg/v1/last-run").json()


def test_enabled_without_prior_equals_disabled_bytes_and_adds_no_rows(client):
    off = txt2img(client, [False], negative_prompt="ugly").json()["images"]
    on = txt2img(client, [{"enabled": True, "prior": "None"}], negative_prompt="ugly").json()["images"]
    assert on == off
    assert rows(client).get("passes") == []


@pytest.mark.skipif(not PRIOR, reason="GCFG_E2E_PRIOR not set")
def test_prior_changes_the_image_and_is_reported_in_infotext(client):
    off = txt2img(client, [False]).json()["images"]
    response = txt2img(client, [{"enabled": True, "prior": PRIOR}]).json()
    assert response["images"] != off
    info = json.loads(response["info"])
    assert info["extra_generation_params"]["GCFG prior"]
    assert rows(client)["passes"][0]["rows_per_call"]["prior"] == 1.0


@pytest.mark.skipif(not PRIOR, reason="GCFG_E2E_PRIOR not set")
@pytest.mark.parametrize("extra", [
    {"batch_size": 2, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5},
    {"sampler_name": "DDIM"},
])
def test_prior_with_batch_hires_and_ddim(client, extra):
    response = txt2img(client, [True, PRIOR, "None", 2.5, "classic", "+2 a dog"], **extra)
    assert response.status_code == 200, response.text


def test_bad_input_gives_422_naming_the_argument_and_next_request_is_served(client):
    bad = txt2img(client, [{"enabled": True, "concept_weight": "much"}])
    assert bad.status_code == 422 and "concept_weight" in bad.json()["detail"]
    unknown = txt2img(client, [{"enabled": True, "bogus": 1}])
    assert unknown.status_code == 422 and "bogus" in unknown.json()["detail"]
    assert txt2img(client, [False]).status_code == 200


def test_img2img_with_gcfg(client):
    image = txt2img(client, [False]).json()["images"][0]
    body = {**BASE, "init_images": [image], "denoising_strength": 0.5,
            "alwayson_scripts": {"GCFG": {"args": [{"enabled": True, "terms": "+1 a dog"}]}}}
    assert client.post("/sdapi/v1/img2img", json=body).status_code == 200


def test_script_info_has_labels(client):
    entries = [entry for entry in client.get("/sdapi/v1/script-info").json() if entry["name"] == "gcfg"]
    assert len(entries) == 2 and all(arg["label"] for entry in entries for arg in entry["args"])
