"""Forge adapter tests against the fake Forge (tests/fake_forge): host detection, the prior in Forge's batched
call, terms, the combination against an independent formula, post-CFG readers, memory management, errors."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

FORGE_ROOT = Path(__file__).resolve().parent / "fake_forge"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
_SWAPPED = ("modules", "backend", "modules_forge", "gcfg_webui", "fake_forge_runtime", "harness", "fake_runtime")


def _swapped(name: str) -> bool:
    return name.split(".")[0] in _SWAPPED


@pytest.fixture(scope="module")
def forge_env(tmp_path_factory):
    """The fake Forge on sys.path, with fresh copies of the glue bound to it; prior, copy-of-main and concept
    files. The previous modules (the fake WebUI's, if another test module loaded it) are put back afterwards."""
    saved = {name: module for name, module in sys.modules.items() if _swapped(name)}
    for name in saved:
        del sys.modules[name]
    root = tmp_path_factory.mktemp("forge-models")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["FAKE_WEBUI_MODELS"] = str(root)
    sys.path.insert(0, str(FORGE_ROOT))
    import fake_forge_runtime

    fake_forge_runtime.enable()
    from modules import sd_models

    from gcfg_core.concept_file import ConceptMetadata, save_concept_model
    from gcfg_core.configs import TINY
    from gcfg_core.models import random_sd_model, save_sd_checkpoint
    from gcfg_core.nulltext import calibrate_nulltext, convert_to_nulltext

    main = random_sd_model(TINY, seed=0)
    checkpoints = root / "Stable-diffusion"
    checkpoints.mkdir()
    save_sd_checkpoint(random_sd_model(TINY, seed=1), checkpoints / "prior.safetensors")
    save_sd_checkpoint(main, checkpoints / "same.safetensors")
    names = {key: sd_models.register(str(checkpoints / f"{key}.safetensors")).title for key in ("prior", "same")}
    base = random_sd_model(TINY, seed=2)
    with torch.no_grad():
        vectors = calibrate_nulltext(base.unet, torch.randn(2, 4, 8, 8), base.encode_prompts([""]))
    (root / "GCFG").mkdir()
    save_concept_model(root / "GCFG" / "face.safetensors", convert_to_nulltext(base.unet, vectors),
                       ConceptMetadata())
    yield SimpleNamespace(runtime=fake_forge_runtime, names=names, main=main, root=root,
                          checkpoints=checkpoints)
    sys.path.remove(str(FORGE_ROOT))
    for name in [name for name in sys.modules if _swapped(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def forge(forge_env):
    from backend import memory_management
    from backend.sampling import sampling_function
    from modules import shared

    from gcfg_webui import model_files

    shared.opts.data.clear()
    model_files.CACHE.clear()
    memory_management.loaded_models.clear()
    memory_management.unload_calls.clear()
    sampling_function.calls.clear()
    sampling_function.max_chunks_per_call = None
    engine = forge_env.runtime.ForgeEngine(forge_env.main)
    shared.sd_model = engine
    namespace = SimpleNamespace(env=forge_env, engine=engine, shared=shared, prior=forge_env.names["prior"],
                                same=forge_env.names["same"], concept="face.safetensors", last_p=None)
    namespace.script = forge_env.runtime.load_script_module().GCFGScript()
    return namespace


def run(forge, args, before_sampling=None, **p_args):
    p = forge.env.runtime.FakeForgeProcessing(**p_args)
    forge.last_p = p
    forge.engine.unet.calls.clear()
    return forge.env.runtime.process_images(p, forge.script, copy.deepcopy(args), before_sampling)


def stats(forge):
    generation = forge.last_p.gcfg_generation_seen
    return [] if generation is None else generation.stats


def main_rows(forge) -> int:
    return sum(call["rows"] for call in forge.engine.unet.calls)


def on(**named):
    return [{"enabled": True, **named}]


# --- the host -----------------------------------------------------------------------------------------------------

def test_forge_is_detected_by_its_backend_and_gets_the_forge_adapter(forge):
    from gcfg_webui import forge as forge_adapter
    from gcfg_webui import hosts

    host = hosts.detect()
    assert host.name == "Forge" and host.adapter is forge_adapter and host.supported
    assert host.cfg_multipliers == {}  # Forge combines DDIM CFG++ with the plain CFG scale


def test_a_backend_with_forge_neos_models_is_named_forge_neo(forge, monkeypatch):
    from gcfg_webui import hosts

    found = {"backend.diffusion_engine.wan"}
    real = hosts._has_module
    monkeypatch.setattr(hosts, "_has_module", lambda name: name in found or real(name))
    host = hosts.detect()
    assert host.name == "Forge Neo" and host.supported
    assert "not proven on Forge Neo" in host.caution and "stops with an error" in host.caution


def test_the_accordion_says_what_is_unproven_on_forge_neo(forge, monkeypatch):
    import gradio as gr

    from gcfg_webui import hosts, ui

    found = {"backend.diffusion_engine.wan"}
    real = hosts._has_module
    monkeypatch.setattr(hosts, "_has_module", lambda name: name in found or real(name))
    forge.script.tabname = "txt2img"
    with gr.Blocks() as blocks:
        ui.build("txt2img", forge.script.elem_id, host=hosts.detect())
    lines = [block.value for block in blocks.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("not proven on Forge Neo" in line and "never an unguided image" in line for line in lines)


def test_forge_classic_is_refused_naming_the_host_and_what_is_missing(forge, monkeypatch):
    from gcfg_webui import hosts

    present = {"modules_forge", "ldm_patched.modules.samplers"}
    monkeypatch.setattr(hosts, "_has_module", lambda name: name in present)
    host = hosts.detect()
    assert host.name == "Forge Classic" and not host.supported
    assert "ldm_patched" in host.reason
    error = hosts.unsupported_error(host)
    assert error.status_code == 422 and "Forge Classic" in error.detail and "ldm_patched" in error.detail


def test_the_accordion_builds_on_forge_whose_accordion_refuses_tooltips(forge):
    import gradio as gr

    from gcfg_core.params import PARAMS

    forge.script.tabname = "txt2img"
    with gr.Blocks():
        components = forge.script.ui(False)
    assert len(components) == len(PARAMS)


# --- nothing to do; the prior ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("negative", ["", "ugly"])
@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_enabled_with_nothing_to_do_equals_off_and_installs_nothing(forge, sampler, negative):
    off = run(forge, [False], sampler_name=sampler, negative_prompt=negative, batch_size=2)
    rows_off = main_rows(forge)
    enabled = run(forge, on(), sampler_name=sampler, negative_prompt=negative, batch_size=2)
    assert torch.equal(enabled, off) and main_rows(forge) == rows_off
    assert stats(forge) == []
    options = forge.engine.forge_objects.unet.model_options
    assert "model_function_wrapper" not in options and not options.get("sampler_post_cfg_function")


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "DDIM CFG++"])
def test_prior_equal_to_the_main_checkpoint_reproduces_forge_and_takes_the_uncond_row(forge, sampler):
    from backend import loader

    off = run(forge, [False], sampler_name=sampler, batch_size=2)
    before = len(loader.loads)
    same = run(forge, on(prior=forge.same), sampler_name=sampler, batch_size=2)
    assert torch.allclose(same, off, atol=1e-5)
    assert len(loader.loads) == before + 1  # through Forge's loader
    (pass_stats,) = stats(forge)
    assert pass_stats.per_call() == {"webui": 2.0, "prior": 2.0}  # no row of Forge's uncond was evaluated
    assert pass_stats.calls_per_call() == {"main": 1.0, "prior": 1.0}
    assert pass_stats.routed_calls == pass_stats.calls == 3
    # Forge's memory management loaded the prior's patcher beside the main UNet when sampling started
    from backend import memory_management

    prior = forge.last_p.gcfg_generation_seen.prior
    assert prior.patcher in memory_management.loaded_models


def test_classic_negative_prompt_never_runs_the_prior(forge):
    off = run(forge, [False], negative_prompt="ugly")
    with_prior = run(forge, on(prior=forge.prior), negative_prompt="ugly")
    assert torch.equal(with_prior, off) and stats(forge) == []


def test_numeric_negative_scale_of_one_minus_cfg_is_classic(forge):
    off = run(forge, [False], negative_prompt="ugly")
    numeric = run(forge, on(negative_scale=-4), negative_prompt="ugly")
    assert torch.allclose(numeric, off, atol=1e-6)
    assert stats(forge)[0].per_call() == {"webui": 2.0}


def test_prior_with_numeric_negative_scale_keeps_the_negative_aside(forge):
    run(forge, on(prior=forge.prior, negative_scale=-2), negative_prompt="ugly")
    assert stats(forge)[0].per_call() == {"webui": 2.0, "prior": 1.0}


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_autoguidance_with_the_main_checkpoint_as_prior_is_the_cfg_one_image(forge, sampler):
    """`uncond_prompt: prompt`: E₀ is the prior with each image's prompt; the main checkpoint as prior makes
    E₁ − E₀ vanish, so any CFG scale gives the CFG-1 image (the prompt alone)."""
    cfg_one = run(forge, [False], cfg_scale=1, sampler_name=sampler, batch_size=2)
    same = run(forge, on(prior=forge.same, uncond_prompt="prompt"), cfg_scale=6, sampler_name=sampler, batch_size=2)
    assert torch.allclose(same, cfg_one, atol=1e-5)
    assert stats(forge)[0].per_call() == {"webui": 2.0, "prior": 2.0}


def test_autoguidance_without_prior_conditions_the_main_models_uncond_on_the_prompt(forge):
    cfg_one = run(forge, [False], cfg_scale=1)
    auto = run(forge, on(uncond_prompt="prompt"), cfg_scale=6)
    assert torch.allclose(auto, cfg_one, atol=1e-5)
    assert stats(forge)[0].per_call() == {"webui": 1.0, "main": 1.0}


def test_autoguidance_with_another_prior_changes_the_image(forge):
    empty = run(forge, on(prior=forge.prior))
    auto = run(forge, on(prior=forge.prior, uncond_prompt="prompt"))
    assert not torch.allclose(auto, empty, atol=1e-3)


# --- terms, the combination ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("negative", ["", "ugly"])
@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "DDIM CFG++"])
def test_extra_term_equals_the_and_prompt_and_joins_forges_call(forge, sampler, negative):
    fused = run(forge, [False], prompt="a cat AND a dog :0.4", sampler_name=sampler, negative_prompt=negative)
    term = run(forge, on(terms="+2 a dog"), sampler_name=sampler, negative_prompt=negative)
    assert torch.allclose(term, fused, atol=1e-5)
    (pass_stats,) = stats(forge)
    assert pass_stats.per_call() == {"webui": 2.0, "main": 1.0}
    assert pass_stats.calls_per_call() == {"main": 1.0}


def _eps_x0(model, x, sigma, context, sigmas):
    """x₀ of an ε model at σ as Forge evaluates it, written from the formulas: input x/√(σ²+1), the timestep of the
    nearest σᵢ in log space, x₀ = x − σ·ε."""
    t = (sigma.log() - sigmas.log()).abs().argmin().reshape(1)
    with torch.no_grad():
        eps = model(x / (sigma ** 2 + 1) ** 0.5, t.float(), context=context)
    return x - sigma * eps


def test_one_euler_step_is_paper_eq3_with_prior_concept_and_term(forge):
    """With one Euler step the sample is the denoiser's output D; D must be E₀ + s(P − E₀) + w_c(C − E₀) +
    w(T − E₀), each model evaluated independently here (gcfg_core's own ldm UNets, the concept from its file)."""
    from gcfg_core.concept_file import load_concept_model
    from gcfg_core.configs import sd1_alphas_cumprod
    from gcfg_core.models import load_sd_checkpoint

    out = run(forge, on(prior=forge.prior, concept=forge.concept, concept_weight=2.5, terms="+1.5 a dog"), steps=1)
    alphas = sd1_alphas_cumprod().float()
    sigmas = ((1 - alphas) / alphas) ** 0.5
    sigma = sigmas[-1]
    x = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(1)) * sigma
    prior = load_sd_checkpoint(forge.env.checkpoints / "prior.safetensors", parts=("unet", "text_encoder"),
                               compute_hash=False)
    main = forge.env.main
    concept, _ = load_concept_model(forge.env.root / "GCFG" / "face.safetensors")
    e0 = _eps_x0(prior.unet, x, sigma, prior.encode_prompts([""]), sigmas)
    cat = _eps_x0(main.unet, x, sigma, main.encode_prompts(["a cat"]), sigmas)
    dog = _eps_x0(main.unet, x, sigma, main.encode_prompts(["a dog"]), sigmas)
    c = _eps_x0(concept, x, sigma, None, sigmas)
    expected = e0 + 5 * (cat - e0) + 2.5 * (c - e0) + 1.5 * (dog - e0)
    assert torch.allclose(out, expected, atol=1e-4), float((out - expected).abs().max())
    assert stats(forge)[0].per_call() == {"webui": 1.0, "prior": 1.0, "concept": 1.0, "main": 1.0}
    assert stats(forge)[0].calls_per_call() == {"concept": 1.0, "main": 1.0, "prior": 1.0}


def test_concept_weight_zero_runs_no_concept(forge):
    off = run(forge, [False])
    zero = run(forge, on(concept=forge.concept, concept_weight=0))
    assert torch.equal(zero, off) and stats(forge) == []


def test_windows_select_steps_by_sigma_on_heun(forge):
    run(forge, on(terms="+1 {0-0.5} a dog"), sampler_name="Heun", steps=4, negative_prompt="ugly")
    (pass_stats,) = stats(forge)
    assert pass_stats.steps_seen == [0, 1, 1, 2, 2, 3, 3] and pass_stats.step_source == "schedule"
    assert pass_stats.per_call()["main"] == pytest.approx(3 / 7)


def test_ngms_steps_run_no_prior_rows_and_equal_forge(forge):
    off = run(forge, [False], s_min_uncond=100)
    same = run(forge, on(prior=forge.same), s_min_uncond=100)
    assert torch.allclose(same, off, atol=1e-5)
    (pass_stats,) = stats(forge)
    assert pass_stats.skipped_calls == 1 and pass_stats.per_call()["prior"] == pytest.approx(2 / 3)


def test_cfg_one_with_a_prior_runs_no_prior_rows(forge):
    off = run(forge, [False], cfg_scale=1)
    with_prior = run(forge, on(prior=forge.prior), cfg_scale=1)
    assert torch.allclose(with_prior, off, atol=1e-6)
    assert stats(forge)[0].per_call() == {"webui": 1.0}


def test_cfg_one_with_a_concept_still_gets_e0_from_the_prior(forge):
    """At CFG 1, E₀'s coefficient is −w_c: Forge's CFG-1 shortcut must not drop the uncond."""
    run(forge, on(prior=forge.prior, concept=forge.concept, concept_weight=2), cfg_scale=1)
    assert stats(forge)[0].per_call() == {"webui": 1.0, "prior": 1.0, "concept": 1.0}


def test_hires_pass_has_one_statistics_entry_per_sampled_pass(forge):
    off = run(forge, [False], enable_hr=True, batch_size=2, n_iter=2)
    same = run(forge, on(prior=forge.same), enable_hr=True, batch_size=2, n_iter=2)
    assert torch.allclose(same, off, atol=1e-5)
    assert [s.per_call() for s in stats(forge)] == [{"webui": 2.0, "prior": 2.0}] * 4


def test_hires_at_cfg_one_without_negative_conds_still_gets_e0_for_terms(forge):
    """Forge drops the hires pass's negative conds when the hires CFG is 1; E₀ of a term is then computed aside."""
    run(forge, on(prior=forge.prior, terms="+1 a dog"), enable_hr=True, hr_cfg=1.0)
    first, hires = (s.per_call() for s in stats(forge))
    assert first == {"webui": 1.0, "prior": 1.0, "main": 1.0}
    assert hires == {"webui": 1.0, "prior": 1.0, "main": 1.0}


def test_routing_opt_out_gives_the_same_image_on_the_overwrite_path(forge):
    args = on(prior=forge.prior, terms="+2 a dog")
    routed = run(forge, args)
    assert stats(forge)[0].path == "routed"
    forge.shared.opts.data["gcfg_routing"] = False
    overwrite = run(forge, args)
    (pass_stats,) = stats(forge)
    assert pass_stats.path == "overwrite" and pass_stats.routed_calls == 0
    assert pass_stats.per_call() == {"webui": 2.0, "prior": 1.0, "main": 1.0}
    assert torch.allclose(overwrite, routed, atol=1e-5)


def test_split_batched_calls_give_the_same_image(forge):
    """Forge splits a call's chunks when memory is short; the uncond chunk then arrives in a call of its own."""
    from backend.sampling import sampling_function

    args = on(prior=forge.prior, terms="+2 a dog", negative_scale=-1)
    whole = run(forge, args, negative_prompt="ugly")
    sampling_function.max_chunks_per_call = 1
    split = run(forge, args, negative_prompt="ugly")
    assert torch.allclose(split, whole, atol=1e-5)


# --- other extensions ---------------------------------------------------------------------------------------------

def test_post_cfg_functions_and_cfg_functions_after_gcfg_see_the_priors_e0_as_uncond(forge):
    """A later script (PAG-style post-CFG function, dynamic-thresholding-style CFG function) reads Forge's uncond
    prediction: it must be the prior's E₀, and the post-CFG function gets GCFG's result as `denoised`."""
    seen = {}

    def patch(p):
        unet = p.sd_model.forge_objects.unet.clone()

        def cfg_function(args):
            seen["cfg_uncond"] = args["uncond_denoised"].clone()
            return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

        def post_cfg(args):
            seen.setdefault("post_uncond", args["uncond_denoised"].clone())
            seen.setdefault("post_denoised", args["denoised"].clone())
            return args["denoised"]

        unet.set_model_sampler_cfg_function(cfg_function)
        unet.set_model_sampler_post_cfg_function(post_cfg)
        p.sd_model.forge_objects.unet = unet

    out = run(forge, on(prior=forge.prior, concept=forge.concept, concept_weight=2.5), before_sampling=patch, steps=1)
    from gcfg_core.configs import sd1_alphas_cumprod
    from gcfg_core.models import load_sd_checkpoint

    alphas = sd1_alphas_cumprod().float()
    sigmas = ((1 - alphas) / alphas) ** 0.5
    x = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(1)) * sigmas[-1]
    prior = load_sd_checkpoint(forge.env.checkpoints / "prior.safetensors", parts=("unet", "text_encoder"),
                               compute_hash=False)
    e0 = _eps_x0(prior.unet, x, sigmas[-1], prior.encode_prompts([""]), sigmas)
    assert torch.allclose(seen["cfg_uncond"], e0, atol=1e-5)
    assert torch.allclose(seen["post_uncond"], e0, atol=1e-5)
    assert torch.allclose(seen["post_denoised"], out, atol=1e-6)  # GCFG's complete result


def test_a_wrapper_set_before_gcfg_is_called_and_turns_routing_off(forge):
    """Forge has one UNet-wrapper slot: a wrapper installed earlier keeps running under GCFG's, which then keeps
    Forge's chunk layout for it (overwrite path)."""
    calls = []

    def wrapper(apply_model, args):
        calls.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    original = forge.engine.forge_objects_after_applying_lora.unet
    patched = original.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    forge.engine.forge_objects_after_applying_lora.unet = patched
    try:
        off = run(forge, [False])
        calls.clear()
        gcfg = run(forge, on(prior=forge.same))
    finally:
        forge.engine.forge_objects_after_applying_lora.unet = original
    assert torch.allclose(gcfg, off, atol=1e-5)
    assert stats(forge)[0].path == "overwrite" and calls and all(flags for flags in calls)


# --- errors ---------------------------------------------------------------------------------------------------------

def test_bad_input_fails_at_the_first_denoiser_call_with_a_422(forge):
    from gcfg_webui.errors import GCFGRequestError

    with pytest.raises(GCFGRequestError) as caught:
        run(forge, on(prior="no-such-checkpoint"))
    assert caught.value.status_code == 422 and caught.value.argument == "prior"


def test_a_backend_that_samples_without_gcfgs_hooks_raises_instead_of_an_unguided_image(forge, monkeypatch):
    """A Forge whose sampling reads none of the UNet patcher's hooks (a changed backend, a continuation GCFG was not
    proven on) samples as if GCFG were off, and no hook of GCFG's would notice: the first such step raises."""
    from modules import sd_samplers_cfg_denoiser

    from gcfg_webui.errors import GCFGRequestError

    real = sd_samplers_cfg_denoiser.sampling_function
    hooks = ("conditioning_modifiers", "model_function_wrapper", "sampler_post_cfg_function")

    def without_hooks(denoiser, params, cond_scale, conds_list):
        options = denoiser.inner_model.inner_model.forge_objects.unet.model_options
        saved = {key: options.pop(key) for key in hooks if key in options}
        try:
            return real(denoiser, params, cond_scale, conds_list)
        finally:
            options.update(saved)

    monkeypatch.setattr(sd_samplers_cfg_denoiser, "sampling_function", without_hooks)
    with pytest.raises(GCFGRequestError) as caught:
        run(forge, on(terms="+1 a dog"))
    assert caught.value.argument == "enabled" and "hooks were not called" in caught.value.detail
    assert forge.engine.unet.calls and len(forge.engine.unet.calls) == 1  # one step ran, then it stopped
    off = run(forge, [False])  # GCFG off: nothing is checked, the host samples as it likes
    assert off is not None


def test_gcfgs_denoiser_wrappers_keep_another_extensions_wrapper_and_put_it_back(forge):
    from gcfg_webui.forge import install

    class Denoiser(torch.nn.Module):
        def forward(self, x):
            return x + 1

    denoiser, seen = Denoiser(), []

    def theirs(x):  # another extension's wrapper on the instance
        seen.append(float(x))
        return x * 2

    denoiser.forward = theirs
    install.install_call_check(denoiser, SimpleNamespace(controller=None))  # no pass attached: nothing to check
    assert float(denoiser(torch.tensor(3.0))) == 6.0 and seen == [3.0]
    install.remove_failure(denoiser)
    assert denoiser.__dict__["forward"] is theirs
    install.install_failure(denoiser, ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        denoiser(torch.tensor(1.0))
    install.remove_failure(denoiser)
    assert denoiser.__dict__["forward"] is theirs
    del denoiser.forward
    install.install_failure(denoiser, ValueError("bad input"))
    install.remove_failure(denoiser)
    assert "forward" not in denoiser.__dict__ and float(denoiser(torch.tensor(1.0))) == 2.0


def test_a_refiner_switch_is_refused_before_sampling(forge):
    from gcfg_webui.errors import GCFGRequestError

    info = SimpleNamespace(title="refiner.safetensors [0]")
    with pytest.raises(GCFGRequestError) as caught:
        run(forge, on(terms="+1 a dog"), refiner_checkpoint_info=info, refiner_switch_at=0.5)
    assert caught.value.argument == "refiner" and "refiner" in caught.value.detail


def test_an_sdxl_main_model_with_an_sd1_prior_is_refused(forge):
    from gcfg_webui.errors import GCFGRequestError

    forge.engine.is_sd1, forge.engine.is_sdxl = False, True
    with pytest.raises(GCFGRequestError) as caught:
        run(forge, on(prior=forge.prior))
    assert caught.value.argument == "prior" and "SDXL" in caught.value.detail


# --- the training tab's "unload the WebUI's model" ----------------------------------------------------------------

def test_unloading_the_webui_model_for_training_goes_through_forges_memory_management(forge):
    from backend import memory_management

    training = forge.env.runtime.load_script_module("gcfg_training.py")
    info = SimpleNamespace(unload_webui_model=True, id="job")
    training._unload_webui_model(info)
    assert memory_management.unload_calls, "memory_management.unload_all_models was not called"


def test_shared_modules_hold_no_a1111_only_imports(forge):
    """Everything the scripts import on Forge imported without `modules.sd_hijack`, `lowvram` or ldm models."""
    loaded = {name for name in sys.modules if name.startswith("gcfg_webui")}
    assert "gcfg_webui.forge" in loaded and "gcfg_webui.a1111" not in loaded
