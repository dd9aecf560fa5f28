"""A training job through the training tab's REST routes in a running real host (A1111 1.10.x, Forge, Forge
Classic), with "unload the WebUI's model while training" on: it completes, its concept model is published to
models/GCFG and guides a txt2img of the host's main model, and the host serves images again afterwards (the main
model back through the host's own memory management). Skipped without a host.

Set, besides ``GCFG_WEBUI_DIR`` / ``GCFG_WEBUI_URL`` (see test_webui_e2e.py):

* ``GCFG_E2E_DATASET``: a folder of a few images inside the host's allowed dataset roots (``<data dir>/GCFG-datasets``);
* ``GCFG_E2E_TRAIN_BASE``: the base checkpoint's title (a reduced-width SD 1.5 keeps the job short on a CPU; the
  trainer builds its networks itself, so it need not be one the host can load).
"""

from __future__ import annotations

import os
import time

import pytest
from waiting import wait_until
from webui_host import FORGE, FORGE_CLASSIC, HOST
from webui_responses import ok

pytestmark = [pytest.mark.webui, pytest.mark.skipif(
    not (os.environ.get("GCFG_WEBUI_DIR") and os.environ.get("GCFG_E2E_DATASET")
         and os.environ.get("GCFG_E2E_TRAIN_BASE")),
    reason="needs a real WebUI (GCFG_WEBUI_DIR), GCFG_E2E_DATASET and GCFG_E2E_TRAIN_BASE")]
BASE = {"prompt": "a cat", "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "seed": 1,
        "cfg_scale": 5, "sampler_name": "Euler"}
# Forge guides with concept UNets of the main model's architecture only; a reduced-width base (quick to train on a
# CPU) gives a concept it refuses. GCFG_E2E_TRAIN_BASE_FITS=1 says the base has the main model's architecture.
BASE_FITS_MAIN = HOST != FORGE or os.environ.get("GCFG_E2E_TRAIN_BASE_FITS") == "1"
FAILURES = {"failed", "cancelled", "interrupted"}




def txt2img(client, gcfg_args):
    return client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": {"GCFG": {"args": gcfg_args}}})


def test_a_job_with_the_webui_model_unloaded_completes_and_its_concept_guides(client):
    name = f"e2e-{os.getpid()}-{int(time.time())}"
    body = {"name": name, "dataset_dir": os.environ["GCFG_E2E_DATASET"],
            "base_checkpoint": os.environ["GCFG_E2E_TRAIN_BASE"], "device": "cpu", "resolution": 64,
            "min_image_size": 0, "max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "mixed_precision": "no",
            "gradient_checkpointing": False, "checkpoint_every_steps": 0, "checkpoint_every_minutes": 0,
            "preview_every_steps": 0, "calibration_images": 2, "unload_webui_model": True}
    created = client.post("/gcfg/v1/jobs", json=body)
    assert created.status_code == 201, created.text[:500]
    job_id = created.json()["id"]
    try:
        # finished: a failure state, or completed with its concept published (which happens after the trainer's
        # process ended and the job's state says completed)
        final = wait_until(lambda: (lambda job: job if job["state"] in FAILURES or job["published"] else None)(
            client.get(f"/gcfg/v1/jobs/{job_id}").json()), "the training job to finish and publish",
            poll_s=2, describe=lambda: client.get(f"/gcfg/v1/jobs/{job_id}/log").text[-1500:])
        assert final["state"] == "completed", client.get(f"/gcfg/v1/jobs/{job_id}/log").text[-1500:]
        assert final["unload_webui_model"] is True and final["published"]
        concept = os.path.basename(final["published"])
        assert concept in client.get("/gcfg/v1/concepts").json()["concepts"]
        off = ok(txt2img(client, [False]))  # the host's model is back after the job
        request = txt2img(client, [{"enabled": True, "concept": concept, "concept_weight": 2.5}])
        if HOST == FORGE_CLASSIC:  # GCFG trains there but cannot guide (test_webui_refusing_host_e2e.py)
            assert request.status_code == 422 and "Forge Classic" in request.json()["detail"], request.text[:300]
            return
        if not BASE_FITS_MAIN:  # Forge builds a concept UNet in the main model's architecture: a clear 422
            assert request.status_code == 422 and request.json()["detail"].startswith("GCFG concept:"), request.text
            ok(txt2img(client, [False]))
            return
        on = ok(request)
        assert on["images"][0] != off["images"][0]
        passes = client.get("/gcfg/v1/last-run").json()["passes"]
        assert [run["rows_per_call"] for run in passes] == [{"webui": 2.0, "concept": 1.0}]
    finally:
        # The host runs on this machine: remove the published concept too, so the concept list (and the other
        # suites' first-listed concept) is as it was before this test.
        published = client.get(f"/gcfg/v1/jobs/{job_id}").json().get("published")
        client.delete(f"/gcfg/v1/jobs/{job_id}")
        if published and os.path.isfile(published):
            os.remove(published)
