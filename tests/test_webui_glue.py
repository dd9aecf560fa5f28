"""Glue tests against the fake WebUI (tests/fake_webui): args, hook rows, equivalence, errors, infotext, API, XYZ."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

FAKE_ROOT = Path(__file__).resolve().parent / "fake_webui"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory):
    """Put the fake `modules` package on sys.path (tests only) and write prior and concept model files."""
    root = tmp_path_factory.mktemp("webui-models")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["FAKE_WEBUI_MODELS"] = str(root)
    sys.path.insert(0, str(FAKE_ROOT))
    import harness

    harness.enable_fake_modules()
    import fake_runtime
    from modules import sd_models

    from gcfg_core.concept_file import ConceptMetadata, save_concept_model
    from gcfg_core.models import random_sd_model, save_sd_checkpoint
    from gcfg_core.nulltext import calibrate_nulltext, convert_to_nulltext

    checkpoints = root / "Stable-diffusion"
    checkpoints.mkdir()
    save_sd_checkpoint(random_sd_model(fake_runtime.TINY, seed=1), checkpoints / "prior.safetensors")
    save_sd_checkpoint(fake_runtime.FakeSDModel(seed=0).sd, checkpoints / "same.safetensors")
    names = {key: sd_models.register(str(checkpoints / f"{key}.safetensors")).title for key in ("prior", "same")}
    base = random_sd_model(fake_runtime.TINY, seed=2)
    with torch.no_grad():
        vectors = calibrate_nulltext(base.unet, torch.randn(2, 4, 8, 8), base.encode_prompts([""]))
    (root / "GCFG").mkdir()
    save_concept_model(root / "GCFG" / "face.safetensors", convert_to_nulltext(base.unet, vectors),
                       ConceptMetadata())
    yield SimpleNamespace(harness=harness, runtime=fake_runtime, names=names)
    sys.path.remove(str(FAKE_ROOT))
    for name in [name for name in sys.modules if name.split(".")[0] in ("modules", "harness", "fake_runtime")]:
        del sys.modules[name]


@pytest.fixture
def fake(fake_env):
    import modules
    from modules import sd_unet, shared

    from gcfg_webui import extra_models

    shared.opts.data.clear()
    sd_unet.current_unet = None
    extra_models.CACHE.clear()
    namespace = SimpleNamespace(modules=modules, shared=shared, runtime=fake_env.runtime,
                                prior_name=fake_env.names["prior"], same_prior_name=fake_env.names["same"],
                                concept_name="face.safetensors", last_p=None)

    def use_main_model(in_channels=4):
        namespace.model = fake_env.runtime.FakeSDModel(seed=0, in_channels=in_channels)
        shared.sd_model = namespace.model

    def processing(**kwargs):
        return fake_env.runtime.FakeProcessing(**kwargs)

    def last_stats():
        generation = namespace.last_p.gcfg_generation_seen
        return [] if generation is None else generation.stats

    namespace.use_main_model, namespace.processing, namespace.last_stats = use_main_model, processing, last_stats
    use_main_model()
    namespace.script = fake_env.harness.load_script_module().GCFGScript()
    return namespace


def settings_args(**named):
    return [named]


def run(fake, p, args):
    fake.last_p = p
    fake.model.rows = fake.model.calls = 0
    return fake.runtime.process_images(p, fake.script, copy.deepcopy(args))


def test_positional_and_named_args_give_the_same_settings(fake):
    from gcfg_webui.args import settings_from_args

    positional = settings_from_args([True, "None", "None", 1.5, "-3", "+2 a dog"])
    named = settings_from_args([{"enabled": True, "prior": "None", "concept_weight": 1.5, "negative_scale": -3,
                                 "terms": "+2 a dog"}])
    assert positional == named
    assert positional.prior == "" and positional.negative_scale == -3.0
    assert settings_from_args([True]).negative_scale is None  # short lists keep defaults


@pytest.mark.parametrize(("args", "argument"), [
    ([{"enabled": True, "bogus": 1}], "bogus"),
    ([{"enabled": True, "concept_weight": "much"}], "concept_weight"),
    ([{"enabled": True, "negative_scale": "loud"}], "negative_scale"),
    ([{"enabled": True, "terms": "4 no sign"}], "terms"),
    ([True, "", "", 1.0, "classic", "", "extra"], "args"),
])
def test_bad_args_name_the_argument_and_carry_422(fake, args, argument):
    from gcfg_webui.args import settings_from_args
    from gcfg_webui.errors import GCFGRequestError

    with pytest.raises(GCFGRequestError) as caught:
        settings_from_args(args)
    assert caught.value.argument == argument
    assert caught.value.status_code == 422 and argument in caught.value.detail


def test_disabled_script_leaves_sampling_untouched_and_installs_nothing(fake):
    p = fake.processing(negative_prompt="ugly")
    run(fake, p, [False])
    assert p.sampler.model_wrap_cfg.__dict__.get("combine_denoised") is None


@pytest.mark.parametrize("negative", ["", "ugly"])
@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_prior_none_classic_no_terms_is_bit_identical_to_disabled(fake, negative, sampler):
    off = run(fake, fake.processing(negative_prompt=negative, sampler_name=sampler, batch_size=2), [False])
    rows_off = fake.model.rows
    on = run(fake, fake.processing(negative_prompt=negative, sampler_name=sampler, batch_size=2),
             settings_args(enabled=True))
    assert torch.equal(on, off)
    assert fake.model.rows == rows_off


def test_classic_negative_never_runs_the_prior(fake):
    off = run(fake, fake.processing(negative_prompt="ugly"), [False])
    on = run(fake, fake.processing(negative_prompt="ugly"), settings_args(enabled=True, prior=fake.prior_name))
    assert torch.equal(on, off)
    assert fake.last_stats() == []  # no-op plan: no wrapper at all


def test_prior_without_negative_prompt_changes_the_image_with_one_row_per_image(fake):
    off = run(fake, fake.processing(batch_size=2), [False])
    on = run(fake, fake.processing(batch_size=2), settings_args(enabled=True, prior=fake.prior_name))
    assert not torch.allclose(on, off)
    (stats,) = fake.last_stats()
    # 2 rows per image and call: the WebUI's cond row plus the prior's; the WebUI's uncond row is never computed
    assert stats.per_call() == {"webui": 2.0, "prior": 2.0}
    assert stats.calls_per_call() == {"main": 1.0, "prior": 1.0} and stats.routed_calls == stats.calls == 3
    assert fake.model.rows == 2 * 3 and fake.model.calls == 3


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_prior_equal_to_main_model_reproduces_the_webui_rows(fake, sampler):
    """A prior with the main model's weights and its empty-prompt context must give the WebUI's own uncond rows:
    checks the row layout (batch 2, AND prompts) and the x0/eps conversion of side models."""
    fake.shared.opts.data["gcfg_empty_prompt_encoder"] = "Current model's text encoder"
    p_args = dict(batch_size=2, prompt=["a cat AND a hat :0.5", "a dog"], sampler_name=sampler)
    off = run(fake, fake.processing(**p_args), [False])
    on = run(fake, fake.processing(**p_args), settings_args(enabled=True, prior=fake.same_prior_name))
    assert fake.last_stats()[0].extra_rows["prior"] > 0
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)


def test_extra_main_term_equals_the_webui_and_composition(fake):
    """Classic negative: `+w a dog` as a term == prompt `a cat AND a dog :w/s` (both add w·(X_dog − N))."""
    scale = 5.0
    composed = run(fake, fake.processing(prompt=f"a cat AND a dog :{2.0 / scale}", negative_prompt="ugly",
                                         batch_size=2), [False])
    term = run(fake, fake.processing(prompt="a cat", negative_prompt="ugly", batch_size=2),
               settings_args(enabled=True, terms="+2 a dog"))
    torch.testing.assert_close(term, composed, rtol=1e-4, atol=1e-4)
    (stats,) = fake.last_stats()
    assert stats.per_call() == {"webui": 4.0, "main": 2.0}
    assert stats.calls_per_call() == {"main": 1.0}  # the term's rows join the WebUI's own call
    assert fake.model.calls == 3 and fake.model.rows == 3 * 6


def test_zero_weight_and_out_of_window_terms_are_not_evaluated(fake):
    run(fake, fake.processing(negative_prompt="ugly", steps=4),
        settings_args(enabled=True, terms="+0 never\n+1 {0.5-1} late"))
    (stats,) = fake.last_stats()
    assert stats.extra_rows == {"main": 2}  # 1 image × the 2 of 4 calls in the window


def test_concept_and_two_terms_with_prior_rows(fake):
    p = fake.processing(batch_size=2)
    run(fake, p, settings_args(enabled=True, prior=fake.prior_name, concept=fake.concept_name,
                               concept_weight=2.5, terms="+2 a dog\n-1 @prior blurry"))
    (stats,) = fake.last_stats()
    assert stats.per_call() == {"webui": 2.0, "prior": 4.0, "concept": 2.0, "main": 2.0}
    # the prior's uncond rows and the @prior term share one call, as do the WebUI's rows and the @main term
    assert stats.calls_per_call() == {"concept": 1.0, "main": 1.0, "prior": 1.0}


def test_hires_pass_gets_its_own_hook_and_negative_prompts(fake):
    p = fake.processing(batch_size=2, n_iter=2, enable_hr=True, negative_prompt="ugly", hr_negative_prompt="")
    run(fake, p, settings_args(enabled=True, prior=fake.prior_name))
    stats = fake.last_stats()
    assert len(stats) == 2  # first passes are no-ops (classic negative); one hires pass per batch
    assert all(s.per_call()["prior"] == 2.0 for s in stats)


def test_inpainting_model_with_prior_gets_x_only(fake):
    fake.use_main_model(in_channels=9)
    p = fake.processing(batch_size=2, init_latent=torch.zeros(2, 4, 8, 8), mask=torch.ones(2, 1, 8, 8))
    out = run(fake, p, settings_args(enabled=True, prior=fake.prior_name))
    assert torch.isfinite(out).all()
    assert fake.last_stats()[0].extra_rows["prior"] > 0


def test_wrapper_is_installed_once_composes_and_is_removed(fake):
    from gcfg_webui import hook

    sampler = fake.modules.sd_samplers.create_sampler("Euler", fake.model)
    denoiser = sampler.model_wrap_cfg
    calls = []
    other_original = denoiser.combine_denoised

    def other(x_out, conds_list, uncond, cond_scale):  # another extension's instance wrapper
        calls.append(1)
        return other_original(x_out, conds_list, uncond, cond_scale)

    denoiser.combine_denoised = other
    run_a = hook.PassRun((False,), None, (), None, {})
    hook.install(denoiser, run_a)
    wrapper = denoiser.combine_denoised
    hook.install(denoiser, run_a)
    assert denoiser.combine_denoised is wrapper and wrapper.gcfg_original is other
    hook.remove(denoiser)
    assert denoiser.combine_denoised is other
    del denoiser.combine_denoised
    hook.install(denoiser, run_a)
    assert "forward" in denoiser.inner_model.__dict__
    hook.remove(denoiser)
    assert "combine_denoised" not in denoiser.__dict__ and "forward" not in denoiser.inner_model.__dict__


LONG_PROMPT = "a " + " ".join(["very"] * 80) + " dog"  # more than 75 tokens: a 154-token context


def previous_behaviour(monkeypatch):
    """The hook as it was before the fast path: no intercept (overwrite the uncond rows) and one UNet call per
    (model, prompt) block."""
    from gcfg_webui import hook

    monkeypatch.setattr(hook, "intercept_call", lambda *args: None)
    batched = hook._run_blocks
    monkeypatch.setattr(hook, "_run_blocks", lambda run, blocks, main_call=None: [
        batched(run, [block], main_call)[0] for block in blocks])


FIVE_ROWS = dict(concept_weight=1.5, terms="+2 a dog\n-1 blurry")


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
@pytest.mark.parametrize(("p_args", "named"), [
    (dict(batch_size=2, prompt=["a cat AND a hat :0.5", "a dog"]), {}),
    (dict(batch_size=2), FIVE_ROWS),
    (dict(batch_size=2), dict(terms="+2 a dog\n-1 @prior blurry\n+1 @prior")),
    (dict(negative_prompt="ugly", batch_size=2), dict(terms="+2 a dog\n+1 " + LONG_PROMPT)),
    (dict(negative_prompt=["ugly", ""], batch_size=2), dict(negative_scale=-2, terms="+1 a dog")),
    (dict(cfg_scale=1.0), {}),  # E₀ has coefficient 0: the WebUI's own uncond row is evaluated after all
])
def test_fast_path_equals_the_previous_overwrite_path(fake, monkeypatch, sampler, p_args, named):
    """Same rows, same models, only batched differently: bit-identical with the fake's row-by-row UNets (real CPU
    kernels differ by ~4e-7 per call between batch sizes, see the e2e suite for the real WebUI)."""
    named = dict(enabled=True, prior=fake.prior_name, **named)
    if "concept_weight" in named:
        named["concept"] = fake.concept_name
    fast = run(fake, fake.processing(sampler_name=sampler, **p_args), settings_args(**named))
    fast_stats = fake.last_stats()[0]
    with monkeypatch.context() as patch:
        previous_behaviour(patch)
        reference = run(fake, fake.processing(sampler_name=sampler, **p_args), settings_args(**named))
        reference_stats = fake.last_stats()[0]
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
    assert reference_stats.routed_calls == 0
    routes = "negative_prompt" not in p_args
    assert (fast_stats.routed_calls == fast_stats.calls) is routes
    if p_args.get("cfg_scale") == 1.0:
        # the prior ran for nothing (known only at the combine step), then the WebUI's own uncond row was evaluated
        assert fast_stats.per_call() == {"webui": 2.0, "prior": 1.0} and reference_stats.per_call() == {"webui": 2.0}
        return
    extra = {key: value for key, value in fast_stats.per_call().items() if key != "webui"}
    assert extra == {key: value for key, value in reference_stats.per_call().items() if key != "webui"}


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_prior_concept_and_two_main_terms_take_five_rows_per_image_in_three_calls(fake, sampler):
    run(fake, fake.processing(batch_size=2, sampler_name=sampler),
        settings_args(enabled=True, prior=fake.prior_name, concept=fake.concept_name, **FIVE_ROWS))
    (stats,) = fake.last_stats()
    per_call = stats.per_call()
    assert per_call == {"webui": 2.0, "prior": 2.0, "concept": 2.0, "main": 4.0}
    assert sum(per_call.values()) / 2 == 5  # per image: cond, prior, concept, two terms (was 6 in 5 calls)
    assert stats.calls_per_call() == {"concept": 1.0, "main": 1.0, "prior": 1.0}
    assert fake.model.rows == 3 * 6 and fake.model.calls == 3


def test_main_terms_of_another_token_length_get_a_second_main_call(fake):
    run(fake, fake.processing(batch_size=2),
        settings_args(enabled=True, prior=fake.prior_name, terms="+2 a dog\n-1 " + LONG_PROMPT))
    (stats,) = fake.last_stats()
    assert stats.per_call() == {"webui": 2.0, "prior": 2.0, "main": 4.0}
    assert stats.calls_per_call() == {"main": 2.0, "prior": 1.0}


@pytest.mark.parametrize(("options", "p_args", "routed"), [
    ({"batch_cond_uncond": False}, {}, False),  # slices of B rows: the uncond rows are overwritten afterwards
    ({}, {"prompt": LONG_PROMPT}, False),  # different token lengths: cond slices + a separate uncond call
    ({"pad_cond_uncond": True}, {"prompt": LONG_PROMPT}, True),  # padded to one length: one batched call again
])
def test_other_layouts_use_the_overwrite_path_with_the_same_result(fake, monkeypatch, options, p_args, routed):
    named = settings_args(enabled=True, prior=fake.prior_name, terms="+2 a dog")
    fake.shared.opts.data.update(options)
    result = run(fake, fake.processing(batch_size=2, **p_args), named)
    (stats,) = fake.last_stats()
    assert (stats.routed_calls == 3) is routed and (stats.routed_calls == 0) is not routed
    assert stats.per_call() == {"webui": 2.0 if routed else 4.0, "prior": 2.0, "main": 2.0}
    with monkeypatch.context() as patch:
        previous_behaviour(patch)
        reference = run(fake, fake.processing(batch_size=2, **p_args), named)
    torch.testing.assert_close(result, reference, rtol=0, atol=0)


def test_skipped_uncond_calls_stay_on_the_webui_path(fake, monkeypatch):
    named = settings_args(enabled=True, prior=fake.prior_name)
    result = run(fake, fake.processing(s_min_uncond=100.0, steps=4), named)
    (stats,) = fake.last_stats()
    assert stats.skipped_calls == 2 and stats.routed_calls == 2 and stats.extra_rows == {"prior": 2}
    with monkeypatch.context() as patch:
        previous_behaviour(patch)
        reference = run(fake, fake.processing(s_min_uncond=100.0, steps=4), named)
    torch.testing.assert_close(result, reference, rtol=0, atol=0)


def test_nine_channel_model_terms_join_with_their_image_conditioning(fake, monkeypatch):
    fake.use_main_model(in_channels=9)
    p_args = dict(batch_size=2, init_latent=torch.zeros(2, 4, 8, 8), mask=torch.ones(2, 1, 8, 8))
    named = settings_args(enabled=True, prior=fake.prior_name, terms="+2 a dog")
    result = run(fake, fake.processing(**p_args), named)
    (stats,) = fake.last_stats()
    assert stats.routed_calls == stats.calls and stats.calls_per_call() == {"main": 1.0, "prior": 1.0}
    with monkeypatch.context() as patch:
        previous_behaviour(patch)
        reference = run(fake, fake.processing(**p_args), named)
    torch.testing.assert_close(result, reference, rtol=0, atol=0)


def test_generation_end_removes_both_wrappers(fake):
    p = fake.processing()
    run(fake, p, settings_args(enabled=True, prior=fake.prior_name))
    denoiser = p.sampler.model_wrap_cfg
    assert "combine_denoised" not in denoiser.__dict__ and "forward" not in denoiser.inner_model.__dict__


@pytest.mark.parametrize(("named", "argument"), [
    ({"prior": "missing.safetensors"}, "prior"),
    ({"concept": "missing.safetensors"}, "concept"),
    ({"terms": "+1 @concept"}, "terms"),
])
def test_errors_fail_the_first_denoiser_call_before_any_unet_row(fake, named, argument):
    from gcfg_webui.errors import GCFGRequestError

    with pytest.raises(GCFGRequestError) as caught:
        run(fake, fake.processing(), settings_args(enabled=True, **named))
    assert caught.value.argument == argument and caught.value.status_code == 422
    assert fake.model.rows == 0


def test_unsupported_sampler_and_edit_model_are_refused(fake):
    from gcfg_webui.errors import GCFGRequestError

    with pytest.raises(GCFGRequestError, match="LCM"):
        run(fake, fake.processing(sampler_name="LCM"), settings_args(enabled=True, terms="+1 a dog"))
    run(fake, fake.processing(sampler_name="LCM"), settings_args(enabled=True))  # nothing to do: no refusal
    fake.model.cond_stage_key = "edit"
    with pytest.raises(GCFGRequestError, match="InstructPix2Pix"):
        run(fake, fake.processing(), settings_args(enabled=True, negative_scale=-1))
    run(fake, fake.processing(), settings_args(enabled=True))


def test_infotext_round_trip_restores_every_parameter(fake):
    from gcfg_core.params import PARAMS, GCFGSettings
    from gcfg_core.pngmeta import format_parameters, parse_parameters
    from gcfg_webui import infotext

    settings = GCFGSettings(enabled=True, prior="", concept="face.safetensors", concept_weight=1.25,
                            negative_scale=-2.5, terms="+4 in Van Gogh style, oil\n-2 @prior {0-0.5} blurry")
    params = infotext.generation_params(settings)
    assert "GCFG prior" not in params  # defaults are not written
    text = format_parameters("a cat", "", {"Steps": 3, **params})
    _, _, parsed = parse_parameters(text)
    assert infotext.settings_from_infotext(parsed) == settings
    assert infotext.paste_field_names() == [param.infotext_key for param in PARAMS]
    infotext.complete_pasted(parsed)
    assert parsed["GCFG prior"] == "None" and parsed["GCFG concept weight"] == "1.25"
    assert infotext.settings_from_infotext(parsed) == settings


def test_paste_fills_defaults_maps_the_prior_and_turns_gcfg_off_without_keys(fake):
    from gcfg_core.params import GCFGSettings
    from gcfg_webui import extra_models, infotext

    assert infotext.generation_params(GCFGSettings(enabled=True)) == {"GCFG": "True"}
    pasted = {"GCFG": "True", "GCFG prior": "prior.safetensors"}
    infotext.complete_pasted(pasted, extra_models.prior_choice)
    assert pasted == {"GCFG": "True", "GCFG prior": fake.prior_name, "GCFG concept": "None",
                      "GCFG concept weight": "2.5", "GCFG negative scale": "classic", "GCFG terms": ""}
    from modules import sd_models

    sd_models.register("/models/unhashed.safetensors", shorthash=None)  # listed without [hash] until hashed
    pasted = {"GCFG": "True", "GCFG prior": "unhashed.safetensors [abcdef0123]"}
    infotext.complete_pasted(pasted, extra_models.prior_choice)
    assert pasted["GCFG prior"] == "unhashed.safetensors"
    without = {"Steps": "3"}
    infotext.complete_pasted(without, extra_models.prior_choice)
    assert without == {"Steps": "3", "GCFG": "False"}
    assert infotext.settings_from_infotext(without).enabled is False


def test_process_writes_infotext_keys(fake):
    p = fake.processing()
    run(fake, p, settings_args(enabled=True, negative_scale=-1, terms="+1 a dog"))
    assert p.extra_generation_params["GCFG negative scale"] == "-1"
    assert p.extra_generation_params["GCFG terms"] == "+1 a dog"
    assert "GCFG concept" not in p.extra_generation_params
    p = fake.processing()
    run(fake, p, settings_args(enabled=True, prior=fake.prior_name))
    assert p.extra_generation_params == {"GCFG": "True", "GCFG prior": "prior.safetensors"}  # name, not title


def test_xyz_axes_override_one_parameter(fake):
    from types import SimpleNamespace

    from gcfg_webui import xyz

    class AxisOption:
        def __init__(self, label, type, apply, choices=None):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    module = SimpleNamespace(axis_options=[], AxisOption=AxisOption)
    assert xyz.add_axes(module, lambda: ["None"]) == 4
    assert xyz.add_axes(module, lambda: ["None"]) == 0
    p = fake.processing(negative_prompt="ugly")
    weight_axis = next(o for o in module.axis_options if "Negative" in o.label)
    weight_axis.apply(p, "-2", ["-2"])
    run(fake, p, settings_args(enabled=True))
    assert p.extra_generation_params["GCFG negative scale"] == "-2"


def test_routes_validate_terms_and_require_api_auth(fake):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gcfg_webui import access, api

    app = FastAPI()
    policy = access.AccessPolicy.from_cmd_opts(SimpleNamespace(api=True, api_auth="alice:secret"))
    api.add_routes(app, policy, priors=lambda: ["p.safetensors [0]"], concepts=lambda: [],
                   free_models=lambda: 0, last_run=dict)
    client = TestClient(app)
    assert client.get("/gcfg/v1/priors").status_code == 401
    assert client.get("/gcfg/v1/priors", auth=("alice", "wrong")).status_code == 401
    assert client.get("/gcfg/v1/priors", auth=("alice", "secret")).json() == {"priors": ["None", "p.safetensors [0]"]}
    bad = client.post("/gcfg/v1/terms/validate", json={"terms": "+1 ok\n2 bad"}, auth=("alice", "secret")).json()
    assert bad["valid"] is False and bad["error"]["line"] == 2


def test_decouple_prompt_splits_parts_into_terms():
    from gcfg_webui.decouple import decouple_prompt

    assert decouple_prompt("sunflower, in Van Gogh style, oil", 5.0) == ("sunflower",
                                                                        "+5 in Van Gogh style\n+5 oil")
    assert decouple_prompt("one part", 5.0) == ("one part", "")


def test_settings_register_every_option(fake):
    import gradio as gr

    from gcfg_webui import settings

    settings.register(fake.shared, gr)
    assert {"gcfg_cache_size", "gcfg_keep_on_cpu", "gcfg_default_prior", "gcfg_empty_prompt_encoder"} <= set(
        fake.shared.opts.data_labels)


def test_model_cache_is_lru_and_frees(fake):
    from gcfg_webui.extra_models import ModelCache

    cache = ModelCache()
    loads = []
    for key in ("a", "b", "a", "c"):
        cache.get((key,), lambda key=key: loads.append(key) or key, capacity=2)
    assert loads == ["a", "b", "c"] and cache.keys() == [("a",), ("c",)]
    assert cache.clear() == 2 and cache.keys() == []


def test_env_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_ui_components_follow_params_and_their_defaults_unpack_to_the_defaults(fake):
    import gradio as gr

    from gcfg_core.params import GCFGSettings
    from gcfg_webui.args import settings_from_args

    fake.script.tabname = "txt2img"
    with gr.Blocks():
        components = fake.script.ui(False)
    assert [key for _, key in fake.script.infotext_fields] == fake.script.paste_field_names
    assert settings_from_args([component.value for component in components]) == GCFGSettings()
    assert all(getattr(component, "webui_tooltip", None) or getattr(component, "label", None)
               for component in components)


def test_weights_line_shows_what_the_negative_prompt_and_the_prior_get(fake):
    from gcfg_webui.ui import effective_weights

    assert "weight −6 (classic" in effective_weights("classic", 7, "ugly")
    assert "gets −6." in effective_weights("classic", 7, "")
    assert effective_weights("-2", 7, "ugly").endswith("weight −2; the unconditional term (the prior) gets −4.")
    assert "weight −8 (classic" in effective_weights("classic", 7, "ugly", "+2 a dog\n-1 @prior {0-0.5} x",
                                                      "face.safetensors", 1.0)
    assert effective_weights("loud", 7, "").startswith("⚠")
    assert effective_weights("classic", 7, "", "4 no sign") == "The weights show once the extra terms are valid."


def test_e0_from_the_current_model_carries_the_webui_uncond_rows_controlnet_mark():
    from gcfg_webui.hook import CONTROLNET_UNCOND_MARK, mark_like_webui_uncond

    cond = torch.randn(2, 77, 8)
    condition = {"c_crossattn": [cond], "c_concat": [None]}
    marked_uncond = torch.cat([torch.full((2, 1, 8), CONTROLNET_UNCOND_MARK), torch.randn(2, 77, 8)], dim=1)

    marked = mark_like_webui_uncond(condition, marked_uncond)
    assert marked["c_crossattn"][0].shape == (2, 78, 8)
    assert torch.equal(marked["c_crossattn"][0][:, 0], torch.full((2, 8), CONTROLNET_UNCOND_MARK))
    assert torch.equal(marked["c_crossattn"][0][:, 1:], cond) and marked["c_concat"] == [None]
    # No ControlNet (unmarked rows of the same length), or a cond-marked uncond: left as it is.
    assert mark_like_webui_uncond(condition, torch.randn(2, 77, 8)) is condition
    cond_marked = torch.cat([torch.full((2, 1, 8), 1024.0), torch.randn(2, 77, 8)], dim=1)
    assert mark_like_webui_uncond(condition, cond_marked) is condition
