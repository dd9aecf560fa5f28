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
    from gcfg_core.parameterization import Parameterization, Prediction
    from gcfg_core.sdxl import random_sdxl_model, save_sdxl_checkpoint

    sdxl_main = fake_runtime.FakeSDXLModel(seed=0).sd
    save_sdxl_checkpoint(sdxl_main, checkpoints / "sdxl-same.safetensors")
    save_sdxl_checkpoint(random_sdxl_model(seed=1), checkpoints / "sdxl-prior.safetensors")
    save_sdxl_checkpoint(random_sdxl_model(seed=0, parameterization=Parameterization(Prediction.V)),
                         checkpoints / "sdxl-vpred.safetensors")
    keys = ("prior", "same", "sdxl-same", "sdxl-prior", "sdxl-vpred")
    names = {key: sd_models.register(str(checkpoints / f"{key}.safetensors")).title for key in keys}
    base = random_sd_model(fake_runtime.TINY, seed=2)
    with torch.no_grad():
        vectors = calibrate_nulltext(base.unet, torch.randn(2, 4, 8, 8), base.encode_prompts([""]))
    (root / "GCFG").mkdir()
    save_concept_model(root / "GCFG" / "face.safetensors", convert_to_nulltext(base.unet, vectors),
                       ConceptMetadata())
    write_sdxl_concepts(root / "GCFG", sdxl_main)
    yield SimpleNamespace(harness=harness, runtime=fake_runtime, names=names)
    sys.path.remove(str(FAKE_ROOT))
    for name in [name for name in sys.modules if name.split(".")[0] in ("modules", "harness", "fake_runtime")]:
        del sys.modules[name]


def write_sdxl_concepts(folder: Path, main) -> None:
    """Two SDXL concept files: `xl-face` calibrated on another random SDXL model, and `xl-identity`, the main UNet
    whose every attn2 is its output on a zero context (to_k/to_v have no bias: exactly to_out's bias) with a zero
    pooled input — so on the host's empty negative (zero text, size embeddings kept) it predicts the host's own
    uncond rows, and the concept term adds nothing."""
    from gcfg_core.concept_file import ConceptMetadata, save_concept_model
    from gcfg_core.conditioning import SizeConditioning, size_embedding
    from gcfg_core.nulltext import calibrate_nulltext, convert_to_nulltext, transformer_block_names
    from gcfg_core.sdxl import random_sdxl_model

    other = random_sdxl_model(seed=3)
    context, pooled = other.encode_text([""])
    vector = torch.cat([pooled, size_embedding([SizeConditioning((64, 64))])], dim=-1)
    with torch.no_grad():
        vectors = calibrate_nulltext(other.unet, torch.randn(2, 4, 8, 8), context, vector=vector)
    save_concept_model(folder / "xl-face.safetensors", convert_to_nulltext(other.unet, vectors, pooled),
                       ConceptMetadata(base_family="sdxl"))
    unet = copy.deepcopy(main.unet)
    biases = {name: unet.get_submodule(name).attn2.to_out[0].bias.detach().reshape(1, 1, -1)
              for name in transformer_block_names(unet)}
    save_concept_model(folder / "xl-identity.safetensors", convert_to_nulltext(unet, biases, torch.zeros_like(pooled)),
                       ConceptMetadata(base_family="sdxl"))


@pytest.fixture
def fake(fake_env):
    import modules
    from modules import sd_unet, shared

    from gcfg_webui import model_files

    shared.opts.data.clear()
    sd_unet.current_unet = None
    model_files.CACHE.clear()
    namespace = SimpleNamespace(modules=modules, shared=shared, runtime=fake_env.runtime,
                                prior_name=fake_env.names["prior"], same_prior_name=fake_env.names["same"],
                                concept_name="face.safetensors", last_p=None, names=fake_env.names)

    def use_main_model(in_channels=4, sdxl=False):
        runtime = fake_env.runtime
        if sdxl:
            namespace.model = runtime.FakeSDXLModel(seed=0)
        else:
            namespace.model = runtime.FakeSDModel(seed=0, in_channels=in_channels)
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
    ([True, "", "", 1.0, "classic", "", "empty", "extra"], "args"),
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
    from gcfg_core.coefficients import GuidanceWeights
    from gcfg_webui.a1111 import install
    from gcfg_webui.a1111.passes import CurrentModel, PassController, PassPlan

    sampler = fake.modules.sd_samplers.create_sampler("Euler", fake.model)
    denoiser = sampler.model_wrap_cfg
    calls = []
    other_original = denoiser.combine_denoised

    def other(x_out, conds_list, uncond, cond_scale):  # another extension's instance wrapper
        calls.append(1)
        return other_original(x_out, conds_list, uncond, cond_scale)

    denoiser.combine_denoised = other
    plan = PassPlan(GuidanceWeights(5.0), (False,), {}, None, None)
    controller = PassController(denoiser, plan, CurrentModel(denoiser.inner_model.forward), routing=True)
    install.install(denoiser, sampler, controller)
    wrapper = denoiser.combine_denoised
    install.install(denoiser, sampler, controller)
    assert denoiser.combine_denoised is wrapper and wrapper.gcfg_original is other
    assert controller.foreign_combine  # another extension's wrapper may read the uncond rows
    assert "get_sigmas" in sampler.__dict__
    install.remove(denoiser, sampler)
    assert denoiser.combine_denoised is other and "get_sigmas" not in sampler.__dict__
    del denoiser.combine_denoised
    install.install(denoiser, sampler, controller)
    assert "forward" in denoiser.inner_model.__dict__ and not controller.foreign_combine
    install.remove(denoiser, sampler)
    assert "combine_denoised" not in denoiser.__dict__ and "forward" not in denoiser.inner_model.__dict__


LONG_PROMPT = "a " + " ".join(["very"] * 80) + " dog"  # more than 75 tokens: a 154-token context


def previous_behaviour(monkeypatch, fake):
    """The overwrite path (routing off in the settings) with one UNet call per (model, prompt) block."""
    from gcfg_webui.a1111 import combine

    fake.shared.opts.data["gcfg_routing"] = False
    batched = combine.run_blocks
    monkeypatch.setattr(combine, "run_blocks", lambda blocks, stats: [batched([block], stats)[0] for block in blocks])


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
        previous_behaviour(patch, fake)
        reference = run(fake, fake.processing(sampler_name=sampler, **p_args), settings_args(**named))
        reference_stats = fake.last_stats()[0]
    fake.shared.opts.data.pop("gcfg_routing")
    assert reference_stats.routed_calls == 0 and reference_stats.path == "overwrite"
    # every case has something to route or to join into the WebUI's call (per image, from the coefficients)
    assert fast_stats.routed_calls == fast_stats.calls
    if p_args.get("cfg_scale") == 1.0:
        # E₀'s coefficient is 0: neither the prior nor the WebUI's uncond row runs on the fast path; the result is
        # the cond row (U + 1·(X − U) with U a copy of X) where the overwrite path rounds U + (X − U)
        assert fast_stats.per_call() == {"webui": 1.0} and reference_stats.per_call() == {"webui": 2.0}
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
        return
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
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
        previous_behaviour(patch, fake)
        reference = run(fake, fake.processing(batch_size=2, **p_args), named)
    torch.testing.assert_close(result, reference, rtol=0, atol=0)


def test_skipped_uncond_calls_stay_on_the_webui_path(fake, monkeypatch):
    named = settings_args(enabled=True, prior=fake.prior_name)
    result = run(fake, fake.processing(s_min_uncond=100.0, steps=4), named)
    (stats,) = fake.last_stats()
    assert stats.skipped_calls == 2 and stats.routed_calls == 2 and stats.extra_rows == {"prior": 2}
    with monkeypatch.context() as patch:
        previous_behaviour(patch, fake)
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
        previous_behaviour(patch, fake)
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
    from gcfg_webui import infotext, model_files

    assert infotext.generation_params(GCFGSettings(enabled=True)) == {"GCFG": "True"}
    pasted = {"GCFG": "True", "GCFG prior": "prior.safetensors"}
    infotext.complete_pasted(pasted, model_files.prior_choice)
    assert pasted == {"GCFG": "True", "GCFG prior": fake.prior_name, "GCFG concept": "None",
                      "GCFG concept weight": "2.5", "GCFG negative scale": "classic", "GCFG terms": "",
                      "GCFG uncond prompt": "empty"}
    from modules import sd_models

    sd_models.register("/models/unhashed.safetensors", shorthash=None)  # listed without [hash] until hashed
    pasted = {"GCFG": "True", "GCFG prior": "unhashed.safetensors [abcdef0123]"}
    infotext.complete_pasted(pasted, model_files.prior_choice)
    assert pasted["GCFG prior"] == "unhashed.safetensors"
    without = {"Steps": "3"}
    infotext.complete_pasted(without, model_files.prior_choice)
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
    assert xyz.add_axes(module, lambda: ["None"]) == 6
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
    assert {"gcfg_cache_size", "gcfg_keep_on_cpu", "gcfg_default_prior", "gcfg_empty_prompt_encoder",
            "gcfg_routing"} <= set(fake.shared.opts.data_labels)


def test_model_cache_is_lru_and_frees(fake):
    from gcfg_webui.model_files import ModelCache

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
    from gcfg_webui.a1111.rows import CONTROLNET_UNCOND_MARK, mark_like_webui_uncond

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


# --- defects of the first version, each pinned by a test ---------------------------------------------------------


@pytest.mark.parametrize("negative", ["ugly", ""])
def test_cfg_plus_plus_scales_terms_like_the_prompt(fake, negative):
    """DDIM CFG++ divides the CFG scale by 12.5; `+2 a dog` must stay the AND prompt `a dog :2/s` there too."""
    scale = 5.0
    p_args = dict(negative_prompt=negative, batch_size=2, sampler_name="DDIM CFG++", cfg_scale=scale)
    composed = run(fake, fake.processing(prompt=f"a cat AND a dog :{2.0 / scale}", **p_args), [False])
    term = run(fake, fake.processing(prompt="a cat", **p_args), settings_args(enabled=True, terms="+2 a dog"))
    torch.testing.assert_close(term, composed, rtol=1e-4, atol=1e-4)


def test_cfg_plus_plus_renoises_with_the_priors_uncond(fake):
    """The prior equal to the main model reproduces the WebUI's own DDIM CFG++ image, whose renoising direction
    is the uncond prediction: GCFG must hand it E₀ whatever its coefficient."""
    fake.shared.opts.data["gcfg_empty_prompt_encoder"] = "Current model's text encoder"
    p_args = dict(batch_size=2, sampler_name="DDIM CFG++", cfg_scale=1.0)
    off = run(fake, fake.processing(**p_args), [False])
    on = run(fake, fake.processing(**p_args), settings_args(enabled=True, prior=fake.same_prior_name))
    assert fake.last_stats()[0].extra_rows["prior"] > 0  # E₀'s coefficient is 0 at CFG 1, but CFG++ reads it
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)


def test_cfg_one_with_a_prior_runs_no_prior_rows(fake):
    off = run(fake, fake.processing(cfg_scale=1.0, batch_size=2), [False])
    on = run(fake, fake.processing(cfg_scale=1.0, batch_size=2), settings_args(enabled=True, prior=fake.prior_name))
    (stats,) = fake.last_stats()
    assert "prior" not in stats.extra_rows and stats.per_call() == {"webui": 2.0}  # 2 images × 1 cond row
    torch.testing.assert_close(on, off, rtol=0, atol=1e-5)
    run(fake, fake.processing(cfg_scale=0.5), settings_args(enabled=True, prior=fake.prior_name, terms="+0.5 dog"))
    assert "prior" not in fake.last_stats()[0].extra_rows  # weights summing to 1


def test_numeric_negative_with_a_prior_follows_the_coefficients(fake):
    """A numeric negative scale n with a prior and a mixed batch: image 0 (negative "ugly") gets
    c₀·E₀ + s·X + n·N, image 1 (no negative) c₀'·E₀ + s·X; checked against the same rows computed alone."""
    p_args = dict(negative_prompt=["ugly", ""], batch_size=2, steps=2)
    named = settings_args(enabled=True, prior=fake.prior_name, negative_scale=-2)
    routed = run(fake, fake.processing(**p_args), named)
    stats = fake.last_stats()[0]
    assert stats.per_call() == {"webui": 3.0, "prior": 2.0}  # 2 cond rows + image 0's N; E₀ for both
    fake.shared.opts.data["gcfg_routing"] = False
    overwrite = run(fake, fake.processing(**p_args), named)
    torch.testing.assert_close(routed, overwrite, rtol=0, atol=1e-5)


def test_prior_equal_to_main_with_mixed_negatives_is_gcfg_off(fake):
    """Negatives ["ugly", ""]: image 0 keeps the WebUI's classic CFG, image 1's E₀ comes from a prior that
    equals the main model — the whole batch must equal GCFG off."""
    fake.shared.opts.data["gcfg_empty_prompt_encoder"] = "Current model's text encoder"
    p_args = dict(negative_prompt=["ugly", ""], batch_size=2)
    off = run(fake, fake.processing(**p_args), [False])
    on = run(fake, fake.processing(**p_args), settings_args(enabled=True, prior=fake.same_prior_name))
    assert fake.last_stats()[0].per_call() == {"webui": 3.0, "prior": 1.0}
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)


def test_windows_follow_sigma_on_a_second_order_sampler(fake):
    """Heun with 4 steps calls the denoiser 7 times; GCFG's step is σ's position in the schedule (the corrector at
    σᵢ₊₁ belongs to step i+1), as in the standalone sampler: a {0-0.5} term runs on the calls of steps 0-1."""
    run(fake, fake.processing(sampler_name="Heun", steps=4, negative_prompt="ugly"),
        settings_args(enabled=True, terms="+1 {0-0.5} dog"))
    (stats,) = fake.last_stats()
    assert stats.steps_seen == [0, 1, 1, 2, 2, 3, 3] and stats.step_source == "schedule"
    assert stats.extra_rows == {"main": 3}


def test_windows_on_ddim_follow_its_timesteps(fake):
    run(fake, fake.processing(sampler_name="DDIM", steps=4, negative_prompt="ugly"),
        settings_args(enabled=True, terms="+1 {0.5-1} dog"))
    (stats,) = fake.last_stats()
    # timesteps 1, 251, 501, 751: three evaluations (751, 501, 251) of a 3-step schedule
    assert stats.steps_seen == [0, 1, 2] and stats.extra_rows == {"main": 1}


def test_skipped_uncond_rows_are_observed_not_recomputed(fake, monkeypatch):
    """A WebUI whose skip rule differs from 1.10's (here: every third call) must not make GCFG treat the missing
    uncond rows as real."""
    from modules import sd_samplers_cfg_denoiser

    skipped = []

    def every_third(self, sigma, s_min_uncond):
        skip = self.step % 3 == 2
        skipped.append(skip)
        return skip

    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "skips_uncond", every_third, raising=False)
    run(fake, fake.processing(steps=6), settings_args(enabled=True, prior=fake.prior_name, terms="+1 dog"))
    (stats,) = fake.last_stats()
    assert stats.skipped_calls == sum(skipped) == 2
    assert stats.extra_rows == {"prior": 4, "main": 4}  # GCFG stays out of the skipped calls


def test_row_sources_select_the_images_they_are_asked_for(fake):
    from modules import prompt_parser

    from gcfg_webui.a1111 import session
    from gcfg_webui.a1111.rows import ModelRunner

    conds = prompt_parser.get_learned_conditioning(fake.model, ["a cat", "a dog"], 3)
    source = session._main_source("main", ModelRunner("main", lambda *args: None), conds)
    rows = source.condition(0, [1], None)["c_crossattn"][0]
    assert torch.equal(rows, fake.model.get_learned_conditioning(["a dog"]))


def test_refiner_switch_re_encodes_the_current_models_terms(fake):
    """After the switch the WebUI re-encodes its prompt for the refiner; an @main term must follow, so that
    `+2 a dog` still equals the AND prompt `a dog :0.4`."""
    refiner = fake.runtime.FakeSDModel(seed=5)
    p_args = dict(negative_prompt="ugly", steps=4, refiner_switch_at=0.5)
    composed = run(fake, fake.processing(prompt="a cat AND a dog :0.4", refiner_model=refiner, **p_args), [False])
    fake.use_main_model()
    term = run(fake, fake.processing(prompt="a cat", refiner_model=refiner, **p_args),
               settings_args(enabled=True, terms="+2 a dog"))
    torch.testing.assert_close(term, composed, rtol=1e-4, atol=1e-4)
    assert fake.shared.sd_model is refiner


def test_a_refiner_gcfg_cannot_follow_fails_the_request(fake):
    from gcfg_webui.errors import GCFGRequestError

    refiner = fake.runtime.FakeSDModel(seed=5)
    refiner.is_sd1, refiner.is_sdxl = False, True
    with pytest.raises(GCFGRequestError, match="refiner") as caught:
        run(fake, fake.processing(steps=4, refiner_model=refiner), settings_args(enabled=True, prior=fake.prior_name))
    assert caught.value.argument == "refiner" and "SDXL" in caught.value.detail


def test_an_sdxl_refiner_file_is_refused_before_sampling(fake, tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from gcfg_webui.errors import GCFGRequestError

    path = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)}, str(path))
    info = SimpleNamespace(filename=str(path), title="refiner.safetensors [0]")
    with pytest.raises(GCFGRequestError, match="SDXL") as caught:
        run(fake, fake.processing(refiner_checkpoint_info=info), settings_args(enabled=True, prior=fake.prior_name))
    assert caught.value.argument == "refiner" and fake.model.rows == 0


def test_routing_opt_out_gives_the_same_image_and_says_so(fake):
    named = settings_args(enabled=True, prior=fake.prior_name, terms="+2 a dog")
    routed = run(fake, fake.processing(batch_size=2), named)
    assert fake.last_stats()[0].path == "routed"
    fake.shared.opts.data["gcfg_routing"] = False
    overwrite = run(fake, fake.processing(batch_size=2), named)
    stats = fake.last_stats()[0]
    assert stats.path == "overwrite" and stats.routed_calls == 0
    torch.testing.assert_close(routed, overwrite, rtol=0, atol=1e-5)


def test_a_foreign_unet_forward_patch_turns_routing_off_but_controlnets_does_not(fake):
    named = settings_args(enabled=True, prior=fake.prior_name)
    unet = fake.model.model.diffusion_model
    original = unet.forward

    def patched(*args, **kwargs):  # an extension that assumes the WebUI's [cond…, uncond…] rows
        return original(*args, **kwargs)

    unet.forward = patched
    run(fake, fake.processing(), named)
    assert fake.last_stats()[0].path == "overwrite"
    patched.__module__ = "scripts.hook"  # sd-webui-controlnet's UnetHook reads its row marks instead
    run(fake, fake.processing(), named)
    assert fake.last_stats()[0].path == "routed"
    del unet.forward


@pytest.mark.parametrize(("named", "argument", "message"), [
    ({"terms": "+1e30 a dog"}, "terms", "weight 1e+30 is outside [-30, 30]"),
    ({"concept_weight": 1e30}, "concept_weight", "1e+30 is outside [-30, 30]"),
    ({"negative_scale": "-31"}, "negative_scale", "-31 is outside [-30, 30]"),
])
def test_every_weight_is_range_checked_with_one_rule(fake, named, argument, message):
    from gcfg_webui.args import settings_from_args
    from gcfg_webui.errors import GCFGRequestError

    with pytest.raises(GCFGRequestError) as caught:
        settings_from_args([{"enabled": True, **named}])
    assert caught.value.argument == argument and caught.value.status_code == 422
    assert message in caught.value.detail


def test_live_terms_check_warns_about_a_broken_window(fake):
    from gcfg_webui.ui import terms_status

    status = terms_status("+1 {0.5- dog")
    assert status.startswith("✓ 1 term") and "line 1, column 4" in status and "step window" in status


def test_last_run_reports_the_path_and_the_steps(fake):
    from gcfg_webui import generation

    run(fake, fake.processing(steps=3), settings_args(enabled=True, prior=fake.prior_name))
    report = generation.last_run()
    (one_pass,) = report["passes"]
    assert one_pass["path"] == "routed" and one_pass["steps"] == [0, 1, 2] and one_pass["routed_calls"] == 3


def test_an_unsupported_host_refuses_instead_of_an_unguided_image(fake, monkeypatch):
    from gcfg_webui import hosts

    present = {"modules_forge", "backend.sampling.sampling_function"}  # a Forge without the patcher and loader
    monkeypatch.setattr(hosts, "_has_module", lambda name: name in present)
    host = hosts.detect()
    assert not host.supported and host.name == "Forge" and "backend.patcher.unet" in host.reason
    error = hosts.unsupported_error(host)
    assert error.status_code == 422 and "Forge" in error.detail and "backend.loader" in error.detail


def test_concept_files_linked_into_the_folder_work_and_names_cannot_leave_it(fake, tmp_path):
    import os

    from gcfg_webui import model_files
    from gcfg_webui.errors import GCFGRequestError

    root = model_files.concept_dir()
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(open(os.path.join(root, "face.safetensors"), "rb").read())
    link = os.path.join(root, "linked.safetensors")
    os.symlink(outside, link)
    try:
        assert "linked.safetensors" in model_files.list_concept_models()
        assert model_files.resolve_concept("linked.safetensors") == link
        for name in ("../Stable-diffusion/prior.safetensors", str(outside), "missing.safetensors"):
            with pytest.raises(GCFGRequestError, match="no concept model"):
                model_files.resolve_concept(name)
    finally:
        os.remove(link)


# --- SDXL main models, per-model parameterisation, autoguidance -----------------------------------------------------


def test_sdxl_enabled_with_nothing_to_do_equals_off(fake):
    fake.use_main_model(sdxl=True)
    off = run(fake, fake.processing(negative_prompt="ugly"), [False])
    on = run(fake, fake.processing(negative_prompt="ugly"), settings_args(enabled=True))
    assert torch.equal(on, off) and fake.last_stats() == []


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_sdxl_prior_equal_to_main_reproduces_the_webui(fake, sampler):
    """The prior's E₀ on SDXL is the empty negative as the WebUI encodes it (zero text, size embeddings kept)."""
    fake.use_main_model(sdxl=True)
    p_args = dict(batch_size=2, sampler_name=sampler, prompt=["a cat AND a hat :0.5", "a dog"])
    off = run(fake, fake.processing(**p_args), [False])
    on = run(fake, fake.processing(**p_args), settings_args(enabled=True, prior=fake.names["sdxl-same"]))
    (stats,) = fake.last_stats()
    assert stats.routed_calls == stats.calls and stats.extra_rows["prior"] > 0
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)
    other = run(fake, fake.processing(**p_args), settings_args(enabled=True, prior=fake.names["sdxl-prior"]))
    assert not torch.allclose(other, off, atol=1e-3)


def test_sdxl_extra_term_equals_the_and_prompt(fake):
    fake.use_main_model(sdxl=True)
    composed = run(fake, fake.processing(prompt="a cat AND a dog :0.4", negative_prompt="ugly"), [False])
    term = run(fake, fake.processing(prompt="a cat", negative_prompt="ugly"),
               settings_args(enabled=True, terms="+2 a dog"))
    torch.testing.assert_close(term, composed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("sdxl_main", "named", "argument", "words"), [
    (True, {"prior": "prior.safetensors"}, "prior", ("SD 1.x", "SDXL")),
    (False, {"prior": "sdxl-prior.safetensors"}, "prior", ("SDXL", "SD 1.x")),
    (True, {"terms": "+1 @same.safetensors a dog"}, "terms", ("SD 1.x", "SDXL")),
    (True, {"concept": "face.safetensors"}, "concept", ("face.safetensors", "an SD 1.x base (sd1)", "SDXL (sdxl)")),
    (False, {"concept": "xl-face.safetensors"}, "concept", ("xl-face.safetensors", "an SDXL base (sdxl)",
                                                            "SD 1.x (sd1)")),
])
def test_family_mismatches_are_refused_naming_both_models(fake, sdxl_main, named, argument, words):
    from gcfg_webui.errors import GCFGRequestError

    fake.use_main_model(sdxl=sdxl_main)
    with pytest.raises(GCFGRequestError) as caught:
        run(fake, fake.processing(), settings_args(enabled=True, **named))
    assert caught.value.argument == argument and fake.model.rows == 0
    assert all(word in caught.value.detail for word in words), caught.value.detail


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_a_v_prediction_side_model_is_converted_with_its_own_parameterisation(fake, space):
    """A v-prediction side model's output v gives x₀ = x·c_in² − v·σ·c_in (k-diffusion) and, for DDIM, the main
    model's ε at the same point, ε = (x_σ − x₀)/σ with x_σ = x_t/√ᾱ — written out here from the definitions."""
    from gcfg_core.configs import sd1_alphas_cumprod
    from gcfg_core.parameterization import Prediction
    from gcfg_webui.a1111 import side_models
    from gcfg_webui.a1111.rows import SamplerSpace

    alphas = sd1_alphas_cumprod()
    model = side_models.ExtraModel("v", torch.nn.Linear(1, 1), prediction=Prediction.V, alphas_cumprod=alphas)
    v_out = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    model.raw_output = lambda x, t, context: v_out
    if space == "x0":
        runner = side_models.side_runner(SamplerSpace.DENOISED, None, model, "v")
        sigma = torch.tensor([2.0, 0.5])
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        c_in = (sigma**2 + 1).rsqrt().view(-1, 1, 1, 1)
        expected = x * c_in**2 - v_out * sigma.view(-1, 1, 1, 1) * c_in
        torch.testing.assert_close(runner.call(x, sigma, {"c_crossattn": [None]}), expected, rtol=1e-5, atol=1e-5)
        return
    runner = side_models.side_runner(SamplerSpace.NOISE, None, model, "v")
    t = torch.tensor([667.0, 334.0])
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a = alphas[t.long()].double().view(-1, 1, 1, 1)
    eps = (a.sqrt() * v_out.double() + (1 - a).sqrt() * x_t.double())  # v = √ᾱ·ε − √(1−ᾱ)·x₀ solved for ε
    torch.testing.assert_close(runner.call(x_t, t, {"c_crossattn": [None]}).double(), eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sdxl", [False, True])
def test_autoguidance_with_the_main_model_as_prior_is_the_plain_prompt(fake, sdxl):
    """E₀ conditioned on the prompt by the main model itself: the guidance difference vanishes, so the image is
    the plain prompt's, i.e. CFG 1."""
    fake.use_main_model(sdxl=sdxl)
    fake.shared.opts.data["gcfg_empty_prompt_encoder"] = "Current model's text encoder"
    cfg_one = run(fake, fake.processing(cfg_scale=1.0, batch_size=2), [False])
    same = fake.names["sdxl-same" if sdxl else "same"]
    guided = run(fake, fake.processing(cfg_scale=6.0, batch_size=2),
                 settings_args(enabled=True, prior=same, uncond_prompt="prompt"))
    torch.testing.assert_close(guided, cfg_one, rtol=1e-3, atol=1e-3)
    without_prior = run(fake, fake.processing(cfg_scale=6.0, batch_size=2),
                        settings_args(enabled=True, uncond_prompt="prompt"))
    torch.testing.assert_close(without_prior, cfg_one, rtol=1e-3, atol=1e-3)
    assert "main" in fake.last_stats()[0].extra_rows  # E₀ = the current model with the prompt, run by GCFG


# --- SDXL concept models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "hires"), [("Euler", True), ("DDIM", False)])
def test_an_sdxl_concept_equal_to_the_hosts_uncond_adds_nothing(fake, sampler, hires):
    """`xl-identity` predicts the host's empty-negative rows only when the glue feeds it the vector [its pooled
    part | this pass's size embeddings]: with the hires pass at twice the size, a wrong size or pooled part on
    either pass would move the image."""
    fake.use_main_model(sdxl=True)
    p_args = dict(batch_size=2, sampler_name=sampler, enable_hr=hires, hr_negative_prompt="")
    off = run(fake, fake.processing(**p_args), [False])
    on = run(fake, fake.processing(**p_args), settings_args(enabled=True, concept="xl-identity.safetensors",
                                                            concept_weight=2.0))
    stats = fake.last_stats()
    assert len(stats) == (2 if hires else 1) and all(s.per_call()["concept"] == 2.0 for s in stats)
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)


def test_an_sdxl_concept_term_changes_the_image_by_its_weight(fake):
    fake.use_main_model(sdxl=True)
    off = run(fake, fake.processing(batch_size=2), [False])
    results = [run(fake, fake.processing(batch_size=2), settings_args(enabled=True, concept="xl-face.safetensors",
                                                                      concept_weight=weight)) for weight in (1.0, 2.0)]
    assert not torch.allclose(results[0], off, atol=1e-3) and not torch.allclose(results[1], results[0], atol=1e-3)
    assert fake.last_stats()[0].per_call() == {"webui": 4.0, "concept": 2.0}
