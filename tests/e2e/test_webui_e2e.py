"""End-to-end tests against a running real host — AUTOMATIC1111 1.10.x or lllyasviel Forge — with this extension
installed (skipped otherwise). One suite for every host: the host is read from the checkout (`webui_host`).

Start the WebUI with `--api` (on a CPU: A1111 `--use-cpu all --no-half --precision full --skip-torch-cuda-test
--server-name 127.0.0.1`, Forge `--always-cpu --skip-torch-cuda-test`), an SD 1.x main checkpoint (on A1111 a
reduced-width random one keeps the suite at about a minute; Forge loads full-size SD 1.5 only), and set:

* ``GCFG_WEBUI_DIR``: the WebUI (or Forge) checkout (the suite is skipped without it);
* ``GCFG_WEBUI_URL``: default ``http://127.0.0.1:7860``;
* ``GCFG_E2E_PRIOR``: a second SD 1.x checkpoint (title or name) with weights unlike the main model's, used as
  the prior; the tests that need it are skipped without it;
* ``GCFG_E2E_CONCEPT``: a concept-model file in ``models/GCFG`` (default: the first one listed, else skipped);
* ``GCFG_E2E_INPAINT``: a 9-channel SD 1.x inpainting checkpoint (used through ``override_settings``);
* ``GCFG_E2E_API_AUTH``: ``user:password`` when the WebUI runs with ``--api-auth`` (then the auth tests run).

`tests/e2e/make_assets.py` writes a concept model and a 9-channel variant of a random checkpoint.

Identities checked on decoded pixels (the PNG bytes differ by the GCFG infotext keys): GCFG enabled with no
prior, a classic negative scale and no terms is the disabled image and adds no UNet rows; the prior set to the
main checkpoint itself reproduces the WebUI's own uncond (so the prior's rows are computed correctly in x₀ and ε
space); an extra term ``+2 a dog`` equals the prompt ``a cat AND a dog :0.4`` at CFG 5; a prior with a classic
negative prompt is the disabled image. On Forge a subset runs (`left_out_on_forge`; tests/e2e/README.md).
"""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
from waiting import BACKSTOP_S
from webui_host import A1111, FORGE, FORGE_CLASSIC, HOST, ON_FORGE, left_out_on_forge, only_on
from webui_responses import API_AUTH, api_client, max_difference, ok, pixels

pytestmark = [pytest.mark.webui, pytest.mark.skipif(not os.environ.get("GCFG_WEBUI_DIR"),
                                                    reason="needs a real WebUI (GCFG_WEBUI_DIR)")]
if HOST == FORGE_CLASSIC:
    pytestmark.append(pytest.mark.skip(reason="GCFG refuses on Forge Classic (test_webui_refusing_host_e2e.py)"))
URL = os.environ.get("GCFG_WEBUI_URL", "http://127.0.0.1:7860")
PRIOR = os.environ.get("GCFG_E2E_PRIOR", "")
INPAINT = os.environ.get("GCFG_E2E_INPAINT", "")
BASE = {"prompt": "a cat", "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "seed": 1,
        "cfg_scale": 5, "sampler_name": "Euler"}
HIRES = {"batch_size": 2, "n_iter": 2, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
         "hr_second_pass_steps": 3, "denoising_strength": 0.5}
if ON_FORGE:
    # Forge's hires pass has its own CFG scale (1 by default over the API, which drops its negative prompts), and
    # its API fails on hires without `hr_additional_modules` ("argument of type 'NoneType' is not iterable").
    HIRES.update(hr_cfg=BASE["cfg_scale"], hr_additional_modules=["Use same choices"])
# A pixel may differ by 1/255 where float rounding differs between the WebUI's UNet call and ours.
TOLERANCE = 1
needs_prior = pytest.mark.skipif(not PRIOR, reason="GCFG_E2E_PRIOR not set")


@pytest.fixture(scope="module")
def main_model(client):
    """The main checkpoint's name as the WebUI reports it (an alias `get_closet_checkpoint_match` resolves)."""
    return json.loads(txt2img(client, [False]).json()["info"])["sd_model_name"]


@pytest.fixture(scope="module")
def concept(client):
    listed = [name for name in client.get("/gcfg/v1/concepts").json()["concepts"] if name != "None"]
    name = os.environ.get("GCFG_E2E_CONCEPT") or (listed[0] if listed else "")
    if not name:
        pytest.skip("no concept model in models/GCFG (GCFG_E2E_CONCEPT)")
    assert name in listed
    return name


_DISABLED_IMAGES: dict[str, object] = {}


def generate(client, route, gcfg_args=None, alwayson_scripts_extra=None, *, fresh=False, **overrides):
    """A generation request; `fresh` forces a request also where a Forge GCFG-off image would be reused."""
    body = {**BASE, **overrides}
    scripts = dict(alwayson_scripts_extra or {})
    if gcfg_args is not None:
        scripts["GCFG"] = {"args": gcfg_args}
    if scripts:
        body["alwayson_scripts"] = scripts
    if fresh or not (ON_FORGE and route == "txt2img" and gcfg_args == [False]):
        return client.post(f"/sdapi/v1/{route}", json=body)
    # Forge takes ~16 s an image here: a GCFG-off image is generated once per request body (the host is
    # deterministic; the identities compare against it)
    key = json.dumps(body, sort_keys=True)
    if key not in _DISABLED_IMAGES or _DISABLED_IMAGES[key].status_code != 200:
        _DISABLED_IMAGES[key] = client.post(f"/sdapi/v1/{route}", json=body)
    return _DISABLED_IMAGES[key]


def txt2img(client, gcfg_args=None, **overrides):
    return generate(client, "txt2img", gcfg_args, **overrides)


def img2img(client, gcfg_args=None, **overrides):
    """An img2img request preceded by a fixed txt2img request.

    The WebUI encodes the init image by sampling the VAE posterior with torch's global RNG, whose state is left
    over from the previous request (a txt2img re-seeds it while making its noise). Without the same request
    before it, the same img2img request gives different pixels whenever the posterior's variance is not tiny.
    """
    ok(generate(client, "txt2img", [False], fresh=True, seed=123))  # a reused image would not re-seed the RNG
    return generate(client, "img2img", gcfg_args, **overrides)


def last_run(client) -> dict:
    return client.get("/gcfg/v1/last-run").json()


def rows(client) -> list[dict]:
    """Extra UNet rows per denoiser call, per sampler pass, of the latest generation."""
    return [run["rows_per_call"] for run in last_run(client)["passes"]]


def model_calls(client) -> list[dict]:
    """UNet calls per denoiser call by model (the main model's include the WebUI's own), per sampler pass."""
    return [run["model_calls_per_call"] for run in last_run(client)["passes"]]


def infotext(body, index=0) -> str:
    return json.loads(body["info"])["infotexts"][index]


def png_mask(square: slice) -> str:
    np = pytest.importorskip("numpy")
    image_module = pytest.importorskip("PIL.Image")
    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[square, square] = 255
    buffer = io.BytesIO()
    image_module.fromarray(mask).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- equivalence: enabled but with nothing to do is the disabled image, with no extra rows -----------------------

@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
@pytest.mark.parametrize("negative", ["", "ugly"])
@pytest.mark.parametrize("gcfg_on", [
    [{"enabled": True, "prior": "None"}],
    [True, "None", "None", 2.5, "classic", ""],
    [True],
])
def test_enabled_without_prior_terms_or_scale_equals_disabled_and_adds_no_rows(client, sampler, negative, gcfg_on):
    if (sampler, negative) not in (("Euler", ""), ("DDIM", "ugly")) or (
            gcfg_on != [True] and (sampler, negative) != ("Euler", "")):
        left_out_on_forge()
    off = ok(txt2img(client, [False], negative_prompt=negative, sampler_name=sampler))
    on = ok(txt2img(client, gcfg_on, negative_prompt=negative, sampler_name=sampler))
    assert [image.tobytes() for image in pixels(on)] == [image.tobytes() for image in pixels(off)]
    assert last_run(client) == {"enabled": True, "error": None, "passes": []}
    assert "GCFG: True" in infotext(on) and "GCFG" not in infotext(off)


def test_numeric_negative_scale_equal_to_one_minus_cfg_is_classic(client):
    off = ok(txt2img(client, [False], negative_prompt="ugly"))
    on = ok(txt2img(client, [{"enabled": True, "negative_scale": -4}], negative_prompt="ugly"))
    assert max_difference(on, off) == 0
    assert rows(client) == [{"webui": 2.0}]


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "DDIM CFG++"])
@pytest.mark.parametrize("negative", ["", "ugly"])
def test_extra_term_equals_the_same_and_prompt(client, sampler, negative):
    if (sampler, negative) not in (("Euler", ""), ("Euler", "ugly"), ("DDIM CFG++", "")):
        left_out_on_forge()
    """`+2 a dog` is the AND prompt `a dog :2/5` at CFG 5, on DDIM CFG++ too (its CFG scale ÷ 12.5 scales both)."""
    fused = ok(txt2img(client, [False], prompt="a cat AND a dog :0.4", negative_prompt=negative, sampler_name=sampler))
    term = ok(txt2img(client, [{"enabled": True, "terms": "+2 a dog"}], negative_prompt=negative,
                      sampler_name=sampler))
    assert max_difference(term, fused) <= TOLERANCE
    assert rows(client) == [{"webui": 2.0, "main": 1.0}]
    assert model_calls(client) == [{"main": 1.0}]  # the term's row joins the WebUI's call


# --- the prior -------------------------------------------------------------------------------------------------

# The samplers the README lists as tested: first order, ancestral, multistep, second order (Heun, DPM2 a), adaptive,
# restart, and the timesteps family with CFG++'s rescaled CFG.
TESTED_SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "Heun", "DPM2 a", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
                   "PLMS", "UniPC"]


FORGE_SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DDIM", "DDIM CFG++", "UniPC"]


@pytest.mark.parametrize("sampler", TESTED_SAMPLERS)
def test_prior_equal_to_the_main_checkpoint_reproduces_the_webui_uncond(client, main_model, sampler):
    if sampler not in FORGE_SAMPLERS:
        left_out_on_forge()
    off = ok(txt2img(client, [False], sampler_name=sampler))
    on = ok(txt2img(client, [{"enabled": True, "prior": main_model}], sampler_name=sampler))
    assert max_difference(on, off) <= TOLERANCE
    # the WebUI's uncond row is not computed: it went to the prior
    assert rows(client) == [{"webui": 1.0, "prior": 1.0}]
    assert model_calls(client) == [{"main": 1.0, "prior": 1.0}]
    assert last_run(client)["passes"][0]["routed_calls"] == last_run(client)["passes"][0]["calls"]


@needs_prior
@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_prior_changes_the_image_without_negative_prompt_and_is_written_to_infotext(client, sampler):
    if sampler != "Euler":
        left_out_on_forge()
    off = ok(txt2img(client, [False], sampler_name=sampler))
    on = ok(txt2img(client, [{"enabled": True, "prior": PRIOR}], sampler_name=sampler))
    assert max_difference(on, off) > 8
    assert rows(client) == [{"webui": 1.0, "prior": 1.0}]
    written = json.loads(on["info"])["extra_generation_params"]["GCFG prior"]
    assert written in PRIOR or PRIOR in written


@needs_prior
def test_classic_negative_prompt_never_runs_the_prior(client):
    off = ok(txt2img(client, [False], negative_prompt="ugly"))
    on = ok(txt2img(client, [{"enabled": True, "prior": PRIOR}], negative_prompt="ugly"))
    assert max_difference(on, off) == 0
    assert last_run(client)["passes"] == []


@needs_prior
def test_prior_with_a_numeric_negative_scale_runs_for_every_image(client):
    ok(txt2img(client, [{"enabled": True, "prior": PRIOR, "negative_scale": -2}], negative_prompt="ugly"))
    assert rows(client) == [{"webui": 2.0, "prior": 1.0}]


def test_skipped_uncond_steps_run_no_prior_rows(client, main_model):
    """NGMS (s_min_uncond) drops the uncond on odd steps: GCFG stays out of those calls, as the WebUI's CFG does."""
    off = ok(txt2img(client, [False], s_min_uncond=100))
    on = ok(txt2img(client, [{"enabled": True, "prior": main_model}], s_min_uncond=100))
    assert max_difference(on, off) <= TOLERANCE
    run = last_run(client)["passes"][0]
    assert run["skipped_calls"] == 1 and run["rows_per_call"]["prior"] == pytest.approx(2 / 3)


# --- batches, hires fix, img2img, inpainting ---------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_batch_and_hires_fix_with_the_main_checkpoint_as_prior_reproduce_the_webui(client, main_model, sampler):
    left_out_on_forge()
    off = ok(txt2img(client, [False], sampler_name=sampler, **HIRES))
    on = ok(txt2img(client, [{"enabled": True, "prior": main_model}], sampler_name=sampler, **HIRES))
    assert len(on["images"]) == 4 and max_difference(on, off) <= TOLERANCE
    # two batches, each with a first pass and a hires pass; 2 images per batch
    assert rows(client) == [{"webui": 2.0, "prior": 2.0}] * 4


@needs_prior
def test_batch_hires_with_prior_and_prompts_uses_the_hires_prompts(client):
    left_out_on_forge()
    off = ok(txt2img(client, [False], **HIRES))
    on = ok(txt2img(client, [{"enabled": True, "prior": PRIOR, "terms": "+1 a dog"}],
                    prompt="[a cat:a bird:0.5] AND a tree :0.3", hr_prompt="a red cat", **HIRES))
    assert max_difference(on, off) > 8
    first, hires = rows(client)[:2]
    assert first == {"webui": 4.0, "main": 2.0, "prior": 2.0}  # two AND sub-prompts per image
    assert hires == {"webui": 2.0, "main": 2.0, "prior": 2.0}  # the hires prompt has none
    assert model_calls(client)[:2] == [{"main": 1.0, "prior": 1.0}] * 2


@pytest.mark.parametrize(("sampler", "steps"), [("Euler", 3), ("DDIM", 6)])
@pytest.mark.parametrize("inpaint", [False, True])
def test_img2img_and_inpainting(client, main_model, sampler, steps, inpaint):
    if sampler != "Euler" or inpaint:
        left_out_on_forge()
    init = ok(txt2img(client, [False], seed=7))["images"][0]
    extra = {"init_images": [init], "denoising_strength": 0.6, "sampler_name": sampler, "steps": steps}
    if inpaint:
        extra.update(mask=png_mask(slice(16, 48)), inpainting_fill=1, mask_blur=0)
    off = ok(img2img(client, [False], **extra))
    same = ok(img2img(client, [{"enabled": True, "prior": main_model}], **extra))
    assert max_difference(same, off) <= TOLERANCE
    assert rows(client)[0] == {"webui": 1.0, "prior": 1.0}
    changed = ok(img2img(client, [{"enabled": True, "terms": "+3 a dog"}], **extra))
    assert max_difference(changed, off) > 0
    if inpaint:  # the area outside the mask is kept
        outside = [image.copy() for image in pixels(changed)]
        reference = pixels(off)
        for image, base in zip(outside, reference, strict=True):
            image[16:48, 16:48] = base[16:48, 16:48]
            assert int(abs(image - base).max()) == 0


@pytest.mark.skipif(not INPAINT, reason="GCFG_E2E_INPAINT not set")
@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_nine_channel_inpainting_main_model(client, main_model, concept, sampler):
    """Main-model terms get the inpainting conditioning (term == AND identity); prior and concept get x only."""
    init = ok(txt2img(client, [False], seed=7))["images"][0]
    model = {"override_settings": {"sd_model_checkpoint": INPAINT}}
    extra = {"init_images": [init], "denoising_strength": 0.6, "sampler_name": sampler, "steps": 6,
             "mask": png_mask(slice(16, 48)), "inpainting_fill": 1, "mask_blur": 0, **model}
    fused = ok(img2img(client, [False], prompt="a cat AND a dog :0.4", **extra))
    assert json.loads(fused["info"])["is_using_inpainting_conditioning"]
    term = ok(img2img(client, [{"enabled": True, "terms": "+2 a dog"}], **extra))
    assert max_difference(term, fused) <= TOLERANCE
    off = ok(img2img(client, [False], **extra))
    side = ok(img2img(client, [{"enabled": True, "prior": main_model, "concept": concept}], **extra))
    assert rows(client)[0] == {"webui": 1.0, "prior": 1.0, "concept": 1.0}
    for image, base in zip(pixels(side), pixels(off), strict=True):
        assert int(abs(image - base).max()) > 0
        image[16:48, 16:48] = base[16:48, 16:48]
        assert int(abs(image - base).max()) == 0  # outside the mask is kept


# --- concept model ------------------------------------------------------------------------------------------------

def test_concept_model_changes_the_image_and_weight_zero_does_not_run(client, concept):
    off = ok(txt2img(client, [False]))
    on = ok(txt2img(client, [{"enabled": True, "concept": concept, "concept_weight": 2.5}]))
    assert max_difference(on, off) > 8
    assert rows(client) == [{"webui": 2.0, "concept": 1.0}]
    zero = ok(txt2img(client, [{"enabled": True, "concept": concept, "concept_weight": 0}]))
    assert max_difference(zero, off) == 0 and last_run(client)["passes"] == []


@needs_prior
@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_prior_concept_and_two_terms_rows(client, concept, sampler):
    if sampler != "Euler":
        left_out_on_forge()
    args = [True, PRIOR, concept, 2.5, "classic", "+2 a dog\n-1 blurry"]
    ok(txt2img(client, args, sampler_name=sampler))
    assert rows(client) == [{"webui": 1.0, "prior": 1.0, "concept": 1.0, "main": 2.0}]  # 5 rows (was 6)
    assert model_calls(client) == [{"concept": 1.0, "main": 1.0, "prior": 1.0}]  # 3 calls (was 5)


# --- API arguments, infotext, errors -----------------------------------------------------------------------------

@needs_prior
def test_named_dict_args_equal_positional_args(client, concept):
    named = ok(txt2img(client, [{"enabled": True, "prior": PRIOR, "concept": concept, "concept_weight": 1.5,
                                 "negative_scale": "-1", "terms": "+1 a dog"}], negative_prompt="ugly"))
    positional = ok(txt2img(client, [True, PRIOR, concept, 1.5, "-1", "+1 a dog"], negative_prompt="ugly"))
    assert max_difference(named, positional) == 0
    assert infotext(named) == infotext(positional)


@needs_prior
def test_infotext_reproduces_the_image_over_the_api(client):
    if ON_FORGE:
        # a connection of its own: the server drops the connection after that unhandled error, and the shared
        # client's next request would be reset
        with api_client(URL) as probe:
            bare = probe.post("/sdapi/v1/txt2img", json={"infotext": "a cat\nSteps: 3, Sampler: Euler, CFG scale: 5, "
                                                                     "Seed: 1, Size: 64x64"})
        if bare.status_code == 500 and "parameterized generic" in bare.text:
            pytest.skip("Forge's /sdapi infotext field fails for any infotext (TypeError in its apply_infotext)")
    first = ok(txt2img(client, [{"enabled": True, "prior": PRIOR, "terms": "+1 a dog", "negative_scale": -1.5}],
                       negative_prompt="ugly"))
    text = infotext(first)
    assert "GCFG negative scale: -1.5" in text and "GCFG terms: +1 a dog" in text
    again = ok(client.post("/sdapi/v1/txt2img", json={"infotext": text}))
    assert max_difference(again, first) == 0 and infotext(again) == text


@pytest.mark.parametrize(("args", "argument"), [
    ([{"enabled": True, "concept_weight": "much"}], "concept_weight"),
    ([{"enabled": True, "bogus": 1}], "bogus"),
    ([{"enabled": "maybe"}], "enabled"),
    ([{"enabled": True, "negative_scale": "loud"}], "negative_scale"),
    ([{"enabled": True, "prior": "no-such-checkpoint"}], "prior"),
    ([{"enabled": True, "concept": "no-such-file.safetensors"}], "concept"),
    ([{"enabled": True, "terms": "+1 a dog\n4 no sign"}], "terms"),
    ([{"enabled": True, "terms": "+1 @concept"}], "terms"),
    ([{"enabled": True, "terms": "+1 @no-such-checkpoint a dog"}], "terms"),
    ([True, "None", "None", "x"], "concept_weight"),
])
def test_bad_input_gives_422_naming_the_argument_and_the_next_request_is_served(client, args, argument):
    bad = txt2img(client, args)
    assert bad.status_code == 422, bad.text[:500]
    assert bad.json()["detail"].startswith(f"GCFG {argument}:")
    if not ON_FORGE:
        ok(txt2img(client, [False]))
    elif argument == "bogus":  # the request after a 422 is served (checked once on Forge, past the cache)
        ok(client.post("/sdapi/v1/txt2img", json=BASE))


@only_on(A1111, why="A1111's LCM sampler scales its model output itself; Forge's runs through its CFG denoiser")
def test_unsupported_sampler_is_a_422_but_enabled_without_work_is_not(client):
    bad = txt2img(client, [{"enabled": True, "terms": "+1 a dog"}], sampler_name="LCM")
    assert bad.status_code == 422 and "LCM" in bad.json()["detail"]
    ok(txt2img(client, [True], sampler_name="LCM"))


def test_script_info_has_meaningful_labels_in_argument_order(client):
    entries = [entry for entry in client.get("/sdapi/v1/script-info").json() if entry["name"] == "gcfg"]
    assert sorted(entry["is_img2img"] for entry in entries) == [False, True]
    for entry in entries:
        assert entry["is_alwayson"]
        labels = [arg["label"] for arg in entry["args"]]
        assert len(labels) == 7 and len(set(labels)) == 7 and all(labels)
        assert [arg["value"] for arg in entry["args"]] == [False, "None", "None", 2.5, "classic", "", "empty"]
        assert entry["args"][1]["choices"][0] == "None" and len(entry["args"][1]["choices"]) > 1
        assert "Prior" in labels[1] and "Concept" in labels[2] and "weight" in labels[3]


def test_routes_list_models_and_validate_terms(client):
    priors = client.get("/gcfg/v1/priors").json()["priors"]
    assert priors[0] == "None" and len(priors) > 1
    assert client.get("/gcfg/v1/concepts").json()["concepts"][0] == "None"
    valid = client.post("/gcfg/v1/terms/validate", json={"terms": "+4 in Van Gogh style\n-2 @prior {0-0.5} blurry"})
    body = valid.json()
    assert body["valid"] and [term["weight"] for term in body["terms"]] == [4.0, -2.0]
    invalid = client.post("/gcfg/v1/terms/validate", json={"terms": "+1 ok\n4 no sign"}).json()
    assert not invalid["valid"] and invalid["error"]["line"] == 2


@pytest.mark.skipif(not API_AUTH, reason="GCFG_E2E_API_AUTH not set (WebUI without --api-auth)")
def test_routes_need_the_api_auth_credentials_like_the_webui_routes(client):
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=URL, timeout=BACKSTOP_S) as anonymous:
        assert anonymous.get("/gcfg/v1/priors").status_code == 401
        assert anonymous.get("/sdapi/v1/sd-models").status_code == 401
        user, _, _ = API_AUTH.partition(":")
        assert anonymous.get("/gcfg/v1/priors", auth=(user, "wrong")).status_code == 401
    assert client.get("/gcfg/v1/priors").status_code == 200


# --- coefficients decide what runs; routing; steps; refiner ---------------------------------------------------------

@needs_prior
@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_cfg_one_with_a_prior_runs_no_prior_rows(client, sampler):
    """E₀'s coefficient is 1 − CFG = 0: neither the prior nor the WebUI's uncond row runs."""
    if sampler != "Euler":
        left_out_on_forge()
    off = ok(txt2img(client, [False], cfg_scale=1, sampler_name=sampler))
    on = ok(txt2img(client, [{"enabled": True, "prior": PRIOR}], cfg_scale=1, sampler_name=sampler))
    assert max_difference(on, off) <= TOLERANCE
    assert rows(client) == [{"webui": 1.0}] and model_calls(client) == [{"main": 1.0}]


@needs_prior
def test_routing_opt_out_gives_the_same_image_on_the_overwrite_path(client):
    args = [{"enabled": True, "prior": PRIOR, "terms": "+2 a dog"}]
    routed = ok(txt2img(client, args))
    assert last_run(client)["passes"][0]["path"] == "routed"
    overwrite = ok(txt2img(client, args, override_settings={"gcfg_routing": False}))
    run = last_run(client)["passes"][0]
    assert run["path"] == "overwrite" and run["routed_calls"] == 0
    assert run["rows_per_call"] == {"webui": 2.0, "prior": 1.0, "main": 1.0}  # the WebUI's uncond row runs too
    assert max_difference(overwrite, routed) <= TOLERANCE


def test_windows_select_steps_by_sigma_on_a_second_order_sampler(client):
    """Heun with 4 steps: 7 denoiser calls at σ0, σ1, σ1, σ2, σ2, σ3, σ3; a {0-0.5} term runs for steps 0-1 only,
    the same steps the standalone sampler selects (`gcfg_core.denoiser.step_index`)."""
    ok(txt2img(client, [{"enabled": True, "terms": "+1 {0-0.5} a dog"}], sampler_name="Heun", steps=4,
               negative_prompt="ugly"))
    run = last_run(client)["passes"][0]
    assert run["steps"] == [0, 1, 1, 2, 2, 3, 3] and run["step_source"] == "schedule"
    assert run["rows_per_call"]["main"] == pytest.approx(3 / 7)


@needs_prior
@only_on(A1111, why="Forge's refiner switch is refused (test_forge_refuses_the_refiner_switch)")
def test_an_sd1_refiner_re_encodes_the_current_models_terms(client):
    """After the switch to the refiner the WebUI re-encodes its prompt; `+2 a dog` must follow it, so that it
    still equals the AND prompt `a dog :0.4` run with the same refiner."""
    refiner = {"refiner_checkpoint": PRIOR, "refiner_switch_at": 0.5, "steps": 4}
    fused = ok(txt2img(client, [False], prompt="a cat AND a dog :0.4", negative_prompt="ugly", **refiner))
    assert "Refiner" in infotext(fused)
    term = ok(txt2img(client, [{"enabled": True, "terms": "+2 a dog"}], negative_prompt="ugly", **refiner))
    assert max_difference(term, fused) <= TOLERANCE
    ok(txt2img(client, [False]))  # the main model back for the next tests


@pytest.mark.parametrize(("args", "message"), [
    ([{"enabled": True, "terms": "+1e30 a dog"}], "weight 1e+30 is outside [-30, 30]"),
    ([{"enabled": True, "concept_weight": 1e30}], "1e+30 is outside [-30, 30]"),
])
def test_every_weight_is_range_checked_before_sampling(client, args, message):
    bad = txt2img(client, args)
    assert bad.status_code == 422 and message in bad.json()["detail"], bad.text[:300]


def test_term_validation_warns_about_a_broken_window(client):
    body = client.post("/gcfg/v1/terms/validate", json={"terms": "+1 {0.5- dog"}).json()
    assert body["valid"] and body["warnings"][0]["column"] == 4


@needs_prior
def test_autoguidance_conditions_the_prior_on_the_prompt(client, main_model):
    """`uncond_prompt: prompt`: E₀ is the prior with the generation's prompt; with the main checkpoint itself as
    the prior the guidance difference vanishes and the image is the plain prompt's (CFG 1)."""
    cfg_one = ok(txt2img(client, [False], cfg_scale=1))
    same = ok(txt2img(client, [{"enabled": True, "prior": main_model, "uncond_prompt": "prompt"}], cfg_scale=6))
    assert max_difference(same, cfg_one) <= TOLERANCE
    weaker = ok(txt2img(client, [{"enabled": True, "prior": PRIOR, "uncond_prompt": "prompt"}]))
    assert "GCFG uncond prompt: prompt" in infotext(weaker)
    assert max_difference(weaker, ok(txt2img(client, [{"enabled": True, "prior": PRIOR}]))) > 0


# --- Forge: its refiner switch, its post-CFG features ---------------------------------------------------------------

@needs_prior
@only_on(FORGE, why="Forge only")
def test_forge_refuses_the_refiner_switch_before_sampling(client):
    """Forge's refiner switch loads a model whose UNet patcher GCFG's hooks are not on: a 422, never an image that
    stops being guided halfway."""
    bad = txt2img(client, [{"enabled": True, "terms": "+2 a dog"}], refiner_checkpoint=PRIOR, refiner_switch_at=0.5)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("GCFG refiner:"), bad.text[:300]
    ok(txt2img(client, [False]))


DYNAMIC_THRESHOLDING = ("dynamicthresholding (cfg-fix) integrated",
                        [True, 3.5, 0.9, "Constant", 0.0, "Constant", 0.0, 1.0, "enable", "MEAN", "AD", 1.0])
PAG = ("perturbedattentionguidance integrated", [True, 3.0, 0.0, 0.0, 1.0])


@only_on(FORGE, why="Forge's built-in post-CFG features")
@pytest.mark.parametrize(("feature", "feature_args"), [DYNAMIC_THRESHOLDING, PAG], ids=["dynthres", "pag"])
def test_forge_post_cfg_features_see_the_priors_prediction_as_uncond(client, main_model, feature, feature_args):
    """Dynamic thresholding reads Forge's uncond prediction, PAG runs after the CFG: with the prior set to the main
    checkpoint each gives its own image (the prior's E₀ is what they read); another prior changes it."""
    # 128 px: at 64 px the middle block is 1×1, where self-attention over its one token is that token's value, so
    # PAG's perturbed prediction would equal the plain one and PAG could not change anything
    scripts, size = {feature: {"args": feature_args}}, {"width": 128, "height": 128}
    off = ok(txt2img(client, [False], alwayson_scripts_extra=scripts, **size))
    same = ok(txt2img(client, [{"enabled": True, "prior": main_model}], alwayson_scripts_extra=scripts, **size))
    assert max_difference(same, off) <= TOLERANCE
    assert rows(client) == [{"webui": 1.0, "prior": 1.0}]
    plain = ok(txt2img(client, [False], **size))
    assert max_difference(off, plain) > 0  # the feature did something
    if PRIOR and feature == DYNAMIC_THRESHOLDING[0]:
        other = ok(txt2img(client, [{"enabled": True, "prior": PRIOR}], alwayson_scripts_extra=scripts, **size))
        assert max_difference(other, off) > 8


# --- the XYZ plot ---------------------------------------------------------------------------------------------------

def _xyz_axis_index(client, label: str) -> int:
    """The axis's index in the txt2img X/Y/Z plot's "X type" choices, as the host lists them."""
    for script in client.get("/sdapi/v1/script-info").json():
        if script["name"] == "x/y/z plot" and not script["is_img2img"]:
            return script["args"][0]["choices"].index(label)
    raise AssertionError("the host has no txt2img X/Y/Z plot")


def test_xyz_extra_terms_axis_gives_each_cell_its_terms(client):
    """An X axis over `[GCFG] Extra terms`: each cell equals its AND prompt (`+2 a dog` == `a cat AND a dog :0.4`)."""
    x_type = _xyz_axis_index(client, "[GCFG] Extra terms")
    xyz_args = [x_type, "+2 a dog, +2 a bird", [], 0, "", [], 0, "", [], False, True, False, False, 0, 0, 0, 0,
                False]
    grid = ok(txt2img(client, [True], script_name="x/y/z plot", script_args=xyz_args))
    cells = pixels(grid)[-2:]
    for cell, animal in zip(cells, ["dog", "bird"], strict=True):
        fused = pixels(ok(txt2img(client, [False], prompt=f"a cat AND a {animal} :0.4")))[0]
        assert cell.shape == fused.shape and int(abs(cell - fused).max()) <= TOLERANCE
