"""Null-text UNet: calibration is the measured mean of attn2 outputs; conversion makes the UNet text-free."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gcfg_core.configs import TINY
from gcfg_core.nulltext import (
    NullTextCrossAttention,
    build_nulltext_unet,
    calibrate_nulltext,
    convert_to_nulltext,
    is_nulltext,
    nulltext_state_dict,
    transformer_block_names,
)

LATENTS = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(42))
TIMESTEPS = torch.tensor([0, 250, 500, 750, 999])


@pytest.fixture(scope="module")
def empty_context(tiny_model):
    return tiny_model.encode_prompts([""])


@pytest.fixture(scope="module")
def vectors(tiny_model, empty_context):
    return calibrate_nulltext(tiny_model.unet, LATENTS, empty_context, seed=0)


@pytest.fixture(scope="module")
def nulltext_unet(tiny_model, vectors):
    return convert_to_nulltext(copy.deepcopy(tiny_model.unet), vectors)


def attn2_outputs(unet, x, t, context) -> dict[str, torch.Tensor]:
    """Record each block's attn2 output with forward hooks, independently of calibrate_nulltext."""
    outputs, handles = {}, []
    for name in transformer_block_names(unet):
        def hook(_module, _inputs, output, name=name):
            outputs[name] = output.detach().clone()
        handles.append(unet.get_submodule(name).attn2.register_forward_hook(hook))
    with torch.no_grad():
        unet(x, t, context=context)
    for handle in handles:
        handle.remove()
    return outputs


def test_block_names_follow_the_ldm_module_paths(tiny_model):
    names = transformer_block_names(tiny_model.unet)
    assert len(names) == 16  # SD 1.x: 6 down, 1 middle, 9 up
    assert names[0] == "input_blocks.1.1.transformer_blocks.0"
    assert "middle_block.1.transformer_blocks.0" in names
    assert names[-1] == "output_blocks.11.1.transformer_blocks.0"


def test_calibration_constant_equals_the_measured_mean(tiny_model, empty_context):
    # With ᾱ ≡ 1 the noised latents are the clean ones, so the expected inputs are known exactly.
    ones = torch.ones(1000)
    vectors = calibrate_nulltext(tiny_model.unet, LATENTS, empty_context, timesteps=TIMESTEPS, alphas_cumprod=ones)
    measured = attn2_outputs(tiny_model.unet, LATENTS, TIMESTEPS, empty_context.expand(5, -1, -1))
    assert vectors.keys() == measured.keys()
    for name, output in measured.items():
        width = output.shape[-1]
        assert vectors[name].shape == (1, 1, width) and vectors[name].dtype == torch.float32
        torch.testing.assert_close(vectors[name], output.mean(dim=(0, 1), keepdim=True), rtol=0, atol=1e-6)
        assert output.std(dim=(0, 1)).mean() > 1e-4  # the outputs vary, so the mean is a real reduction


def test_calibration_uses_noised_latents(tiny_model, empty_context):
    clean = calibrate_nulltext(tiny_model.unet, LATENTS, empty_context, timesteps=TIMESTEPS,
                               alphas_cumprod=torch.ones(1000))
    noised = calibrate_nulltext(tiny_model.unet, LATENTS, empty_context, timesteps=TIMESTEPS)
    assert any(not torch.allclose(clean[name], noised[name]) for name in clean)


def test_calibration_is_deterministic_for_a_seed_and_batching_free(tiny_model, empty_context, vectors):
    again = calibrate_nulltext(tiny_model.unet, LATENTS, empty_context, seed=0)
    chunked = calibrate_nulltext(tiny_model.unet, LATENTS, empty_context, seed=0, batch_size=2)
    other = calibrate_nulltext(tiny_model.unet, LATENTS, empty_context, seed=1)
    for name in vectors:
        assert torch.equal(again[name], vectors[name])
        torch.testing.assert_close(chunked[name], vectors[name], rtol=0, atol=1e-6)
    assert any(not torch.allclose(other[name], vectors[name]) for name in vectors)


def test_calibration_leaves_the_unet_as_it_was(tiny_model, empty_context):
    unet = copy.deepcopy(tiny_model.unet).train()
    calibrate_nulltext(unet, LATENTS[:2], empty_context, seed=0)
    assert unet.training
    assert all(not module._forward_hooks for module in unet.modules())


def test_conversion_replaces_attn2_and_norm2(nulltext_unet, vectors):
    assert is_nulltext(nulltext_unet)
    for name in transformer_block_names(nulltext_unet):
        block = nulltext_unet.get_submodule(name)
        assert isinstance(block.attn2, NullTextCrossAttention) and isinstance(block.norm2, nn.Identity)
        assert torch.equal(block.attn2.vector, vectors[name])
        assert "vector" in dict(block.attn2.named_buffers()) and not list(block.attn2.parameters())


def test_nulltext_output_ignores_the_context(nulltext_unet, tiny_model):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([20, 600])
    with torch.no_grad():
        without = nulltext_unet(x, t)
        with_prompt = nulltext_unet(x, t, context=tiny_model.encode_prompts(["a cat", "a dog"]))
        with_noise = nulltext_unet(x, t, context=torch.randn(2, 154, 32))
    assert torch.equal(without, with_prompt) and torch.equal(without, with_noise)
    assert without.abs().mean() > 1e-3


def test_null_text_attention_is_the_vector_for_every_token():
    module = NullTextCrossAttention(torch.arange(4.0))
    x = torch.randn(3, 5, 4, dtype=torch.bfloat16)
    out = module(x, context=torch.randn(3, 7, 8))
    assert out.shape == (3, 5, 4) and out.dtype == torch.bfloat16
    assert torch.equal(out.float(), torch.arange(4.0).expand(3, 5, 4))


def test_conversion_errors_name_the_blocks(tiny_model, vectors):
    first = "input_blocks.1.1.transformer_blocks.0"
    incomplete = {name: value for name, value in vectors.items() if name != first}
    with pytest.raises(ValueError, match=r"missing \['input_blocks\.1\.1\.transformer_blocks\.0'\]"):
        convert_to_nulltext(copy.deepcopy(tiny_model.unet), incomplete)
    with pytest.raises(ValueError, match=r"unknown \['bogus'\]"):
        convert_to_nulltext(copy.deepcopy(tiny_model.unet), dict(vectors, bogus=torch.zeros(1, 1, 32)))
    with pytest.raises(ValueError, match=f"{first} has 3 values; the block is 32 wide"):
        convert_to_nulltext(copy.deepcopy(tiny_model.unet), dict(vectors, **{first: torch.zeros(3)}))


def test_double_conversion_and_calibrating_a_nulltext_unet_fail(nulltext_unet, vectors, empty_context):
    with pytest.raises(ValueError, match="already in null-text mode"):
        convert_to_nulltext(nulltext_unet, vectors)
    with pytest.raises(ValueError, match="needs the original UNet"):
        calibrate_nulltext(nulltext_unet, LATENTS, empty_context)


def test_state_dict_round_trip(nulltext_unet):
    state_dict = nulltext_state_dict(nulltext_unet)
    assert not [key for key in state_dict if ".attn2.to_" in key or ".norm2." in key]
    assert len([key for key in state_dict if key.endswith(".attn2.vector")]) == 16
    rebuilt = build_nulltext_unet(TINY.unet, state_dict)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, torch.tensor([300])), nulltext_unet(x, torch.tensor([300])))
    del state_dict["out.2.weight"]
    with pytest.raises(ValueError, match=r"missing keys: out\.2\.weight"):
        build_nulltext_unet(TINY.unet, state_dict)


def test_everything_but_the_vectors_trains(nulltext_unet):
    unet = copy.deepcopy(nulltext_unet).train()
    # 16x16 latents: at 8x8 the middle block sees one token, where attn1's q/k get no gradient by construction.
    loss = unet(torch.randn(2, 4, 16, 16), torch.tensor([1, 900])).square().mean()
    loss.backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in unet.parameters())
    assert all(not buffer.requires_grad for buffer in unet.buffers())


def test_nulltext_state_dict_refuses_a_normal_unet(tiny_model):
    with pytest.raises(ValueError, match="not a null-text UNet"):
        nulltext_state_dict(tiny_model.unet)
