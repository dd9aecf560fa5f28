"""SDXL concept UNets (tiny SDXL-layout models): null-text conversion of all 70 blocks, the vector input, files,
GCFG with the concept term in the engine and the CLI, and family mismatches refused naming both families."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image

from gcfg_core.cli import main as cli_main
from gcfg_core.concept_file import (
    ConceptFileError,
    ConceptMetadata,
    load_concept_model,
    read_concept_metadata,
    save_concept_model,
)
from gcfg_core.conditioning import SizeConditioning
from gcfg_core.configs import SDXL_TINY, sd1_alphas_cumprod
from gcfg_core.nulltext import (
    NullTextCrossAttention,
    calibrate_nulltext,
    convert_to_nulltext,
    nulltext_state_dict,
    nulltext_vector,
    transformer_block_names,
)
from gcfg_core.params import GCFGSettings
from gcfg_core.pipeline import GenerationRequest, generate

POOLED = SDXL_TINY.text_encoder_2.embed_dim
LATENTS = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(42))
TIMESTEPS = torch.tensor([0, 400, 999])
SIZES = [SizeConditioning((64, 96), (0, 16), (64, 64)), SizeConditioning((64, 64)),
         SizeConditioning((128, 64), (32, 0), (64, 64))]


def sinusoid(value: float, dim: int = 256) -> torch.Tensor:
    """cos then sin of value·10000^(−i/128), i = 0…127 (sgm's 256-d embedding of one number)."""
    half = dim // 2
    freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
    return torch.tensor([math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs])


def size_part(size: SizeConditioning) -> torch.Tensor:
    (h, w), (top, left), (th, tw) = size.original_size, size.crop_coords_top_left, size.target_size
    return torch.cat([sinusoid(v) for v in (h, w, top, left, th, tw)])


def vector_rows(pooled: torch.Tensor, sizes) -> torch.Tensor:
    """The SDXL vector input written out: pooled text embedding, then the six size sinusoids of each image."""
    return torch.stack([torch.cat([pooled.reshape(-1), size_part(size)]) for size in sizes])


@pytest.fixture(scope="module")
def empty_text(tiny_sdxl):
    return tiny_sdxl.encode_text([""])  # (context [1, 77, C], pooled [1, P])


@pytest.fixture(scope="module")
def sdxl_concept(tiny_sdxl, empty_text):
    context, pooled = empty_text
    vectors = calibrate_nulltext(tiny_sdxl.unet, LATENTS, context, seed=0, vector=vector_rows(pooled, SIZES))
    return convert_to_nulltext(copy.deepcopy(tiny_sdxl.unet), vectors, pooled)


@pytest.fixture(scope="module")
def sdxl_concept_path(sdxl_concept, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-concepts") / "xl-faces.safetensors"
    save_concept_model(path, sdxl_concept, ConceptMetadata(base_family="sdxl", steps=7))
    return path


@pytest.fixture(scope="module")
def sd1_concept_path(tiny_model, tmp_path_factory):
    vectors = calibrate_nulltext(tiny_model.unet, LATENTS, tiny_model.encode_prompts([""]), seed=0)
    path = tmp_path_factory.mktemp("sd1-concepts") / "sd1-faces.safetensors"
    save_concept_model(path, convert_to_nulltext(copy.deepcopy(tiny_model.unet), vectors), ConceptMetadata())
    return path


def attn2_means(unet, x, t, context, y) -> dict[str, torch.Tensor]:
    """Each block's attn2 output averaged over batch and positions, recorded with forward hooks."""
    outputs, handles = {}, []
    for name in transformer_block_names(unet):
        def hook(_module, _inputs, output, name=name):
            outputs[name] = output.detach().double().mean(dim=(0, 1)).float().reshape(1, 1, -1)
        handles.append(unet.get_submodule(name).attn2.register_forward_hook(hook))
    with torch.no_grad():
        unet(x, t, context=context, y=y)
    for handle in handles:
        handle.remove()
    return outputs


def test_all_70_blocks_are_calibrated_to_the_measured_mean_of_their_attn2_output(tiny_sdxl, empty_text):
    context, pooled = empty_text
    y = vector_rows(pooled, SIZES)
    # With ᾱ ≡ 1 the noised latents are the clean ones, so the UNet's inputs are known exactly.
    vectors = calibrate_nulltext(tiny_sdxl.unet, LATENTS, context, timesteps=TIMESTEPS,
                                 alphas_cumprod=torch.ones(1000), vector=y)
    measured = attn2_means(tiny_sdxl.unet, LATENTS, TIMESTEPS, context.expand(3, -1, -1), y)
    assert len(vectors) == len(measured) == 70  # SDXL base layout: depths (0, 2, 10), middle 10
    for name, mean in measured.items():
        torch.testing.assert_close(vectors[name], mean, rtol=0, atol=1e-5)
    # The vector input reaches the calibration pass: other size embeddings give other constants.
    other = calibrate_nulltext(tiny_sdxl.unet, LATENTS, context, timesteps=TIMESTEPS,
                               alphas_cumprod=torch.ones(1000), vector=vector_rows(pooled, SIZES[::-1]))
    assert any(not torch.allclose(other[name], vectors[name], atol=1e-5) for name in vectors)


def test_calibrating_sdxl_needs_the_vector_input_and_sd1_refuses_one(tiny_sdxl, tiny_model, empty_text):
    with pytest.raises(ValueError, match="SDXL UNet is calibrated with its vector input"):
        calibrate_nulltext(tiny_sdxl.unet, LATENTS, empty_text[0])
    with pytest.raises(ValueError, match="only SDXL UNets take a vector input"):
        calibrate_nulltext(tiny_model.unet, LATENTS, tiny_model.encode_prompts([""]), vector=torch.zeros(1, 8))


@torch.no_grad()
def test_the_converted_unet_ignores_the_text_condition_but_not_the_size_embeddings(tiny_sdxl, sdxl_concept,
                                                                                  empty_text):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([30, 700])
    y = vector_rows(empty_text[1], SIZES[:2])
    context_a, _ = tiny_sdxl.encode_text(["a cat", "a dog"])
    context_b = torch.randn(2, 154, SDXL_TINY.unet.context_dim)
    # The base UNet does read its context; the converted one cannot.
    assert not torch.allclose(tiny_sdxl.unet(x, t, context=context_a, y=y), tiny_sdxl.unet(x, t, context=context_b,
                                                                                         y=y), atol=1e-4)
    without = sdxl_concept(x, t, context=None, y=y)
    assert torch.equal(without, sdxl_concept(x, t, context=context_a, y=y))
    assert torch.equal(without, sdxl_concept(x, t, context=context_b, y=y))
    blocks = [sdxl_concept.get_submodule(name) for name in transformer_block_names(sdxl_concept)]
    assert len(blocks) == 70 and all(isinstance(block.attn2, NullTextCrossAttention) for block in blocks)
    assert not torch.allclose(without, sdxl_concept(x, t, y=vector_rows(empty_text[1], SIZES[1:])), atol=1e-4)


def test_the_vector_input_is_the_fixed_pooled_part_then_each_images_size_embeddings(sdxl_concept, empty_text):
    _, pooled = empty_text
    assert torch.equal(sdxl_concept.nulltext_pooled, pooled)
    torch.testing.assert_close(nulltext_vector(sdxl_concept, SIZES), vector_rows(pooled, SIZES), rtol=0, atol=1e-4)
    assert nulltext_vector(sdxl_concept, SIZES[0]).shape == (1, SDXL_TINY.unet.adm_in_channels)


def test_sdxl_conversion_needs_the_pooled_input_of_the_right_width(tiny_sdxl, sdxl_concept):
    vectors = {name: sdxl_concept.get_submodule(name).attn2.vector for name in transformer_block_names(sdxl_concept)}
    with pytest.raises(ValueError, match="needs the empty prompt's pooled text embedding"):
        convert_to_nulltext(copy.deepcopy(tiny_sdxl.unet), vectors)
    with pytest.raises(ValueError, match=f"has 5 values; .* takes {POOLED} before the size embeddings"):
        convert_to_nulltext(copy.deepcopy(tiny_sdxl.unet), vectors, torch.zeros(5))


def test_the_concept_file_round_trips_with_its_family(sdxl_concept_path, sdxl_concept, empty_text):
    metadata = read_concept_metadata(sdxl_concept_path)
    assert metadata.base_family == "sdxl" and metadata.family_label == "SDXL" and metadata.steps == 7
    unet, loaded = load_concept_model(sdxl_concept_path, expected_family="sdxl")
    assert loaded == metadata and type(unet) is type(sdxl_concept)
    saved = nulltext_state_dict(sdxl_concept)
    state = nulltext_state_dict(unet)
    assert state.keys() == saved.keys() and all(torch.equal(state[key], saved[key]) for key in saved)
    assert not [key for key in state if ".attn2.to_" in key or ".norm2." in key]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = vector_rows(empty_text[1], SIZES[:1])
    with torch.no_grad():
        assert torch.equal(unet(x, torch.tensor([500]), y=y), sdxl_concept(x, torch.tensor([500]), y=y))


def test_a_family_mismatch_of_the_file_is_refused_naming_both_families(sdxl_concept_path, sd1_concept_path,
                                                                        sdxl_concept, tmp_path):
    with pytest.raises(ConceptFileError, match=r"xl-faces\.safetensors: this concept model was trained on an SDXL "
                                               r"base \(sdxl\), but this slot needs SD 1\.x \(sd1\)"):
        load_concept_model(sdxl_concept_path, expected_family="sd1")
    with pytest.raises(ConceptFileError, match=r"sd1-faces\.safetensors: .* an SD 1\.x base \(sd1\), but this slot "
                                               r"needs SDXL \(sdxl\)"):
        load_concept_model(sd1_concept_path, expected_family="sdxl")
    with pytest.raises(ConceptFileError, match="metadata says base family 'sd1' but the UNet is SDXL"):
        save_concept_model(tmp_path / "wrong.safetensors", sdxl_concept, ConceptMetadata(base_family="sd1"))


def small_request(**changes) -> GenerationRequest:
    values = dict(prompt="", cfg_scale=0.0, steps=1, width=64, height=64, seed=5, sampler="Euler",
                  gcfg=GCFGSettings(enabled=True, concept_weight=2.5))
    return GenerationRequest(**{**values, **changes})


@torch.no_grad()
def test_gcfg_with_an_sdxl_concept_term_is_prior_plus_w_times_concept_minus_prior(tiny_sdxl, sdxl_concept):
    """One Euler step from σ_max lands on the guided x₀ = x − σ·ε̂, ε̂ = ε_prior + w·(ε_concept − ε_prior), with the
    prior on the host's empty negative (zero text, size embeddings kept) and the concept on its pooled part and
    the image's size embeddings; everything here is written out from those definitions."""
    captured = {}
    prior = copy.copy(tiny_sdxl)
    prior.decode_latents = lambda latents: captured.setdefault("x0", latents) * 0  # keep the latents, not pixels
    generate(small_request(), prior=prior, concept_unet=sdxl_concept, progress=False)
    alphas = sd1_alphas_cumprod().double()
    sigma = float(((1 - alphas[-1]) / alphas[-1]).sqrt())
    x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(5)).unsqueeze(0) * sigma
    x_in, t = x / math.sqrt(sigma**2 + 1), torch.tensor([999])
    size = SizeConditioning((64, 64), (0, 0), (64, 64))
    prior_y = torch.cat([torch.zeros(POOLED), size_part(size)]).unsqueeze(0)
    eps_prior = tiny_sdxl.unet(x_in, t, context=torch.zeros(1, 77, SDXL_TINY.unet.context_dim), y=prior_y)
    eps_concept = sdxl_concept(x_in, t, y=vector_rows(sdxl_concept.nulltext_pooled, [size]))
    expected = x - sigma * (eps_prior + 2.5 * (eps_concept - eps_prior))
    torch.testing.assert_close(captured["x0"], expected, rtol=1e-4, atol=1e-3 * sigma)
    assert not torch.allclose(eps_concept, eps_prior, atol=1e-3)  # the concept term does move the result


def test_the_engine_refuses_a_concept_of_the_other_family_naming_both(tiny_model, tiny_sdxl, sdxl_concept,
                                                                      sd1_concept_path):
    sd1_concept, _ = load_concept_model(sd1_concept_path)
    for prior, concept, words in ((tiny_sdxl, sd1_concept, ("SD 1.x UNet (sd1)", "is SDXL (sdxl)")),
                                  (tiny_model, sdxl_concept, ("SDXL UNet (sdxl)", "is SD 1.x (sd1)"))):
        with pytest.raises(ValueError) as caught:
            generate(small_request(steps=2), prior=prior, concept_unet=concept, progress=False)
        assert all(word in str(caught.value) for word in words) and prior.name in str(caught.value)


def test_cli_samples_with_an_sdxl_concept_and_refuses_mismatches_naming_both_files(
        tiny_sdxl_checkpoint, tiny_checkpoint, sdxl_concept_path, sd1_concept_path, tmp_path, capsys):
    base = ["sample", "--steps", "2", "--width", "64", "--height", "64", "--no-progress", "--seed", "1"]
    out = tmp_path / "ok"
    assert cli_main([*base, "--prior", str(tiny_sdxl_checkpoint), "--concept", str(sdxl_concept_path),
                     "--out", str(out)]) == 0
    (png,) = out.glob("*.png")
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as image:
        assert "GCFG concept: xl-faces.safetensors" in image.info["parameters"]
    for prior, concept, families in ((tiny_sdxl_checkpoint, sd1_concept_path, ("SD 1.x base (sd1)", "SDXL (sdxl)")),
                                     (tiny_checkpoint, sdxl_concept_path, ("SDXL base (sdxl)", "SD 1.x (sd1)"))):
        code = cli_main([*base, "--prior", str(prior), "--concept", str(concept), "--out", str(tmp_path / "no")])
        error = capsys.readouterr().err
        assert code == 2 and f"--concept {concept}:" in error and str(prior) in error
        assert all(family in error for family in families), error
        assert not (tmp_path / "no").exists() or not list((tmp_path / "no").glob("*.png"))
