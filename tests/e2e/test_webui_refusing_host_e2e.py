"""A host GCFG has no sampling adapter for (Forge Classic, `ldm_patched`): every request that asks GCFG to change
the image is a 422 naming the host before any sampling; nothing is silently unguided. What changes nothing is
served as the plain image, and the host keeps working. Runs when ``GCFG_WEBUI_DIR`` is a Forge Classic checkout.
"""

from __future__ import annotations

import os

import pytest
from webui_host import FORGE_CLASSIC, HOST
from webui_responses import max_difference, ok

pytestmark = [pytest.mark.webui, pytest.mark.skipif(HOST != FORGE_CLASSIC or not os.environ.get("GCFG_WEBUI_DIR"),
                                                    reason=f"needs a real Forge Classic (host: {HOST})")]
PRIOR = os.environ.get("GCFG_E2E_PRIOR", "")
BASE = {"prompt": "a cat", "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "seed": 1,
        "cfg_scale": 5, "sampler_name": "Euler"}


def txt2img(client, gcfg_args, **overrides):
    return client.post("/sdapi/v1/txt2img", json={**BASE, **overrides,
                                                  "alwayson_scripts": {"GCFG": {"args": gcfg_args}}})


@pytest.mark.parametrize("named", [
    {"terms": "+2 a dog"},
    {"prior": PRIOR or "None", "terms": "+1 @prior a dog"},
    {"negative_scale": -2},
    {"uncond_prompt": "prompt"},
], ids=["terms", "prior-term", "negative-scale", "autoguidance"])
def test_what_changes_the_image_is_a_422_naming_the_host(client, named):
    bad = txt2img(client, [{"enabled": True, **named}], negative_prompt="ugly")
    assert bad.status_code == 422, bad.text[:300]
    detail = bad.json()["detail"]
    assert detail.startswith("GCFG enabled:") and "Forge Classic" in detail and "ldm_patched" in detail, detail


@pytest.mark.skipif(not PRIOR, reason="GCFG_E2E_PRIOR not set")
def test_a_prior_alone_is_a_422_too(client):
    bad = txt2img(client, [{"enabled": True, "prior": PRIOR}])
    assert bad.status_code == 422 and "Forge Classic" in bad.json()["detail"], bad.text[:300]


def test_enabled_with_nothing_to_do_is_the_plain_image_and_the_host_keeps_working(client):
    off = ok(txt2img(client, [False]))
    on = ok(txt2img(client, [True]))
    assert max_difference(on, off) == 0


def test_routes_answer(client):
    assert "None" in client.get("/gcfg/v1/priors").json()["priors"]
    assert client.post("/gcfg/v1/terms/validate", json={"terms": "+1 a dog"}).json()["valid"]
