"""SDXL model IO and conditioning (tiny SDXL-shaped models): vector rows per image, empty negatives, files, families."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from gcfg_core.checkpoint import (
    CheckpointError,
    ModelFamily,
    detect_family,
    detect_parameterization,
    read_state_dict_shapes,
    resolve_parameterization,
)
from gcfg_core.cli import main as cli_main
from gcfg_core.conditioning import SDXLConditioning, SizeConditioning
from gcfg_core.configs import SDXL_TINY
from gcfg_core.denoiser import GCFGDenoiser, UNetDenoiser
from gcfg_core.parameterization import EPS, Parameterization, Prediction
from gcfg_core.params import GCFGSettings
from gcfg_core.pipeline import GenerationRequest, generate
from gcfg_core.plan import classic_plan
from gcfg_core.sdxl import load_sdxl_checkpoint, random_sdxl_model, save_sdxl_checkpoint

POOLED = SDXL_TINY.text_encoder_2.embed_dim
CONTEXT = SDXL_TINY.unet.context_dim
SIZE_A = SizeConditioning((1024, 768), (0, 0), (1024, 768))  # (height, width), (top, left), (height, width)
SIZE_B = SizeConditioning((512, 512), (32, 16), (1024, 1024))


def sinusoid(value: float, dim: int = 256) -> torch.Tensor:
    """cos then sin of value·10000^(−i/128), i = 0…127 (sgm's 256-d embedding of one number)."""
    half = dim // 2
    freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
    return torch.tensor([math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs])


@torch.no_grad()
def test_vector_is_pooled_text_then_each_images_own_size_embeddings(tiny_sdxl):
    cond = tiny_sdxl.encode_prompts(["a cat"], sizes=[SIZE_A, SIZE_B])
    assert cond.crossattn.shape == (1, 77, CONTEXT) and cond.vector.shape == (2, POOLED + 6 * 256)
    _, pooled = tiny_sdxl.encode_text(["a cat"])
    for row, size in enumerate((SIZE_A, SIZE_B)):
        (h, w), (top, left), (th, tw) = size.original_size, size.crop_coords_top_left, size.target_size
        expected = torch.cat([sinusoid(v) for v in (h, w, top, left, th, tw)])
        assert torch.equal(cond.vector[row, :POOLED], pooled[0])
        assert torch.allclose(cond.vector[row, POOLED:], expected, atol=1e-4)
    assert not torch.allclose(cond.vector[0, POOLED:], cond.vector[1, POOLED:])
    assert SizeConditioning.for_image(width=832, height=1216) == SizeConditioning((1216, 832), (0, 0), (1216, 832))


@torch.no_grad()
def test_each_image_of_a_batch_is_denoised_with_its_own_vector_row(tiny_sdxl):
    denoiser = UNetDenoiser(tiny_sdxl.unet, tiny_sdxl.alphas_cumprod)
    sizes = [SIZE_A, SIZE_B]
    conds = {"": tiny_sdxl.encode_prompts([""], sizes=sizes, negative=True),
             "a cat": tiny_sdxl.encode_prompts(["a cat"], sizes=sizes)}
    plan = classic_plan(5.0, "a cat")
    sigmas = denoiser.get_sigmas(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * sigmas[2]
    sigma = sigmas[2].repeat(2)
    result = GCFGDenoiser({"main": denoiser}, plan, conds, sigmas)(x, sigma)
    for b in range(2):
        one = {key: SDXLConditioning(c.crossattn, c.vector[b:b + 1]) for key, c in conds.items()}
        uncond = denoiser(x[b:b + 1], sigma[b:b + 1], context=one[""])
        cond = denoiser(x[b:b + 1], sigma[b:b + 1], context=one["a cat"])
        assert torch.allclose(result[b], (uncond + 5.0 * (cond - uncond))[0], atol=1e-5)
    swapped = {key: SDXLConditioning(c.crossattn, c.vector.flip(0)) for key, c in conds.items()}
    assert not torch.allclose(GCFGDenoiser({"main": denoiser}, plan, swapped, sigmas)(x, sigma), result, atol=1e-4)


@torch.no_grad()
def test_context_is_both_penultimate_states_and_pooled_comes_from_the_first_chunk(tiny_sdxl):
    prompt = " ".join(["cat"] * 80)  # 80 tokens: two chunks
    context, pooled = tiny_sdxl.encode_text([prompt])
    assert context.shape == (1, 154, CONTEXT)
    ids_l, ids_g = tiny_sdxl.tokenize_chunks([prompt])
    assert ids_l[0, 1].tolist()[:7] == [49406, *[2368] * 5, 49407] and ids_l[0, 1, 7:].eq(49407).all()
    assert ids_g[0, 1].tolist()[:7] == ids_l[0, 1].tolist()[:7] and not ids_g[0, 1, 7:].any()  # open_clip pads 0
    width_l = SDXL_TINY.text_encoder.hidden_size
    out_l = tiny_sdxl.text_encoder(input_ids=ids_l[0], output_hidden_states=True)
    out_g = tiny_sdxl.text_encoder_2(input_ids=ids_g[0], output_hidden_states=True)
    assert torch.equal(context[0, :, :width_l], out_l.hidden_states[-2].reshape(154, -1))
    assert not torch.allclose(context[0, :, :width_l], out_l.last_hidden_state.reshape(154, -1))
    assert torch.equal(context[0, :, width_l:], out_g.hidden_states[-2].reshape(154, -1))
    assert torch.equal(pooled[0], out_g.text_embeds[0])
    other_tail, other_pooled = tiny_sdxl.encode_text([" ".join(["cat"] * 75 + ["dog"] * 5)])
    assert torch.equal(other_pooled, pooled) and not torch.equal(other_tail, context)


@torch.no_grad()
def test_an_all_empty_negative_is_zero_text_with_the_size_embeddings_kept(tiny_sdxl):
    zero = tiny_sdxl.encode_prompts([""], sizes=SIZE_A, negative=True)
    text = tiny_sdxl.encode_prompts([""], sizes=SIZE_A)
    assert not zero.crossattn.any() and not zero.vector[:, :POOLED].any()
    assert torch.equal(zero.vector[:, POOLED:], text.vector[:, POOLED:])
    assert text.crossattn.abs().sum() > 0 and text.vector[:, :POOLED].abs().sum() > 0
    mixed = tiny_sdxl.encode_prompts(["", "blurry"], sizes=SIZE_A, negative=True)
    assert torch.equal(mixed.crossattn[0], text.crossattn[0])  # not every negative is empty: nothing is zeroed


def test_clip_skip_is_refused_for_sdxl(tiny_sdxl):
    with pytest.raises(ValueError, match="clip skip 2 does not apply to SDXL"):
        tiny_sdxl.encode_condition("a cat", clip_skip=2, sizes=SIZE_A)


@torch.no_grad()
def test_checkpoint_round_trip_in_the_sgm_layout(tiny_sdxl, tiny_sdxl_checkpoint):
    keys = read_state_dict_shapes(tiny_sdxl_checkpoint)
    for key in ("model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.conv_out.weight",
                "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.logit_scale"):
        assert key in keys, key
    assert detect_family(keys) is ModelFamily.SDXL
    loaded = load_sdxl_checkpoint(tiny_sdxl_checkpoint)
    assert loaded.architecture == SDXL_TINY and loaded.parameterization == EPS
    a = tiny_sdxl.encode_prompts(["a cat"], sizes=SIZE_B)
    b = loaded.encode_prompts(["a cat"], sizes=SIZE_B)
    assert torch.equal(a.crossattn, b.crossattn) and torch.equal(a.vector, b.vector)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0])
    assert torch.equal(tiny_sdxl.unet(x, t, context=a.crossattn, y=a.vector),
                       loaded.unet(x, t, context=a.crossattn, y=a.vector))


def test_v_prediction_ztsnr_markers_are_written_read_and_overridable(tmp_path):
    path = tmp_path / "vpred.safetensors"
    save_sdxl_checkpoint(random_sdxl_model(seed=3, parameterization=Parameterization(Prediction.V, True)), path)
    keys = read_state_dict_shapes(path)
    assert keys["v_pred"].numel() == 0 and "ztsnr" in keys
    loaded = load_sdxl_checkpoint(path, parts=("unet",), compute_hash=False)
    assert loaded.parameterization == Parameterization(Prediction.V, True)
    assert loaded.alphas_cumprod[-1].item() == pytest.approx(4.8973451890853435e-08)
    forced = load_sdxl_checkpoint(path, parts=("unet",), compute_hash=False, parameterization=EPS)
    assert forced.prediction is Prediction.EPS and forced.alphas_cumprod[-1].item() > 1e-3


@pytest.mark.parametrize(
    ("keys", "metadata", "expected"),
    [
        ({"v_pred"}, {}, "v"),
        ({"v_pred", "ztsnr"}, {}, "v-ztsnr"),
        ({"ztsnr"}, {}, None),  # as Forge: ztsnr means nothing without v_pred
        (set(), {"modelspec.prediction_type": "v"}, "v"),
        (set(), {"modelspec.prediction_type": "epsilon"}, "eps"),
        (set(), {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}, "v-ztsnr"),
        (set(), {}, None),
    ],
)
def test_parameterization_markers(keys, metadata, expected):
    found, source = detect_parameterization("m.safetensors", keys, metadata)
    assert (found.label if found else None) == expected and source


def test_edm_files_are_refused_and_overrides_win():
    with pytest.raises(CheckpointError, match="edm_vpred.sigma_max"):
        detect_parameterization("cosxl.safetensors", {"edm_vpred.sigma_max"})
    assert resolve_parameterization("m", {"v_pred"}, {}, EPS) == EPS
    assert resolve_parameterization("m", set(), {}) == EPS


def _fake_sdxl_file(path, *, refiner=False, in_channels=4):
    prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    save_file({prefix + "ln_final.weight": torch.zeros(2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, in_channels, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 2560 if refiner else 2816)}, str(path))
    return path


@pytest.mark.parametrize(("refiner", "channels", "family", "label"), [
    (True, 4, ModelFamily.SDXL_REFINER, "SDXL refiner"), (False, 9, ModelFamily.SDXL_INPAINT, "SDXL inpainting")])
def test_refiner_and_inpainting_files_are_detected_named_and_refused(tmp_path, refiner, channels, family, label):
    path = _fake_sdxl_file(tmp_path / "other.safetensors", refiner=refiner, in_channels=channels)
    assert detect_family(read_state_dict_shapes(path)) is family
    with pytest.raises(CheckpointError, match=rf"other\.safetensors: is a {label}.*supported here: SDXL"):
        load_sdxl_checkpoint(path)


def small_request(**changes) -> GenerationRequest:
    values = dict(prompt="a cat", steps=3, width=64, height=64, seed=5, sampler="Euler",
                  gcfg=GCFGSettings(enabled=True))
    return GenerationRequest(**{**values, **changes})


@torch.no_grad()
def test_sdxl_prior_equal_to_main_is_the_plain_image_and_another_prior_changes_it(tiny_sdxl):
    off = generate(small_request(gcfg=GCFGSettings(enabled=False)), prior=tiny_sdxl, progress=False)
    on = generate(small_request(), prior=tiny_sdxl, main=tiny_sdxl, progress=False)
    assert list(on.images[0].getdata()) == list(off.images[0].getdata())
    assert on.unet_rows_per_step == off.unet_rows_per_step == 2
    other = generate(small_request(), prior=random_sdxl_model(seed=1), main=tiny_sdxl, progress=False)
    assert list(other.images[0].getdata()) != list(on.images[0].getdata())


def test_mixing_sd1_and_sdxl_models_is_refused_either_way(tiny_model, tiny_sdxl):
    for prior, main in ((tiny_model, tiny_sdxl), (tiny_sdxl, tiny_model)):
        with pytest.raises(ValueError) as info:
            generate(small_request(), prior=prior, main=main, progress=False)
        message = str(info.value)
        assert prior.name in message and main.name in message and "SD 1.x" in message and "SDXL" in message


def test_an_sd1_concept_unet_is_refused_on_sdxl(tiny_model, tiny_sdxl):
    with pytest.raises(ValueError, match=r"the concept model is an SD 1\.x UNet \(sd1\), but the main model .* is "
                                         r"SDXL \(sdxl\)"):
        generate(small_request(), prior=tiny_sdxl, concept_unet=tiny_model.unet, progress=False)


def test_cli_names_both_files_and_families_on_a_mismatch(tiny_checkpoint, tiny_sdxl_checkpoint, tmp_path, capsys):
    for prior, model in ((tiny_checkpoint, tiny_sdxl_checkpoint), (tiny_sdxl_checkpoint, tiny_checkpoint)):
        code = cli_main(["sample", "--prior", str(prior), "--model", str(model), "--out", str(tmp_path)])
        error = capsys.readouterr().err
        assert code == 2 and str(prior) in error and str(model) in error
        assert "SD 1.x checkpoint (sd1)" in error or "is SD 1.x (sd1)" in error
        assert "(sdxl)" in error


@pytest.mark.parametrize(("extra", "message"), [
    (["--prediction", "refiner=v"], "ROLE one of main, prior"),
    (["--prediction", "main=vpred"], "unknown parameterisation 'vpred'"),
    (["--checkpoint", "prior=x.safetensors"], "is a model slot"),
])
def test_cli_refuses_bad_model_arguments(tiny_sdxl_checkpoint, tmp_path, capsys, extra, message):
    assert cli_main(["sample", "--prior", str(tiny_sdxl_checkpoint), *extra, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_checkpoint_given_as_concept_model(tiny_sdxl_checkpoint, tiny_checkpoint, tmp_path, capsys):
    args = ["sample", "--prior", str(tiny_sdxl_checkpoint), "--concept", str(tiny_checkpoint), "--out", str(tmp_path)]
    assert cli_main(args) == 2
    error = capsys.readouterr().err
    assert f"--concept {tiny_checkpoint}: this is a Stable Diffusion checkpoint, not a concept model" in error


def test_cli_size_flags_need_an_sdxl_model(tiny_checkpoint, tmp_path, capsys):
    args = ["sample", "--prior", str(tiny_checkpoint), "--original-size", "64x64", "--steps", "1", "--width", "64",
            "--height", "64", "--no-progress", "--out", str(tmp_path)]
    assert cli_main(args) == 2
    assert "--original-size: size conditioning applies to SDXL models" in capsys.readouterr().err


def test_cli_samples_sdxl_with_an_extra_checkpoint_term_and_size_flags(tiny_sdxl_checkpoint, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_sdxl_checkpoint(random_sdxl_model(seed=2, parameterization=Parameterization(Prediction.V)), other)
    args = ["sample", "--prior", str(tiny_sdxl_checkpoint), "--checkpoint", f"vmodel={other}", "--term",
            "+1.5 @vmodel a dog", "--prediction", "vmodel=v", "--original-size", "128x96", "--crop-top-left",
            "8,0", "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3",
            "--no-progress", "--out", str(tmp_path / "out")]
    capsys.readouterr()  # ldm's build messages of the model above
    assert cli_main(args) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and written[0].endswith("00000-3.png")
