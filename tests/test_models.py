"""Model building, prompt encoding, checkpoint round trips, architecture inference and SDPA attention."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from ldm.modules.attention import CrossAttention

from gcfg_core.attention import SDPACrossAttention, use_sdpa_attention
from gcfg_core.checkpoint import CheckpointError, file_sha256, split_state_dict
from gcfg_core.configs import SD1, TINY, sd1_alphas_cumprod
from gcfg_core.models import (
    POSITION_IDS_KEY,
    VAE,
    StateDictMismatchError,
    build_text_encoder,
    build_unet,
    build_vae,
    dezero_,
    infer_architecture,
    instantiate_unet,
    load_sd_checkpoint,
    random_sd_model,
    save_sd_checkpoint,
)
from gcfg_core.tokenizer import clip_tokenizer

LONG_PROMPT = "a photo of a cat, " * 20  # 120 tokens -> 2 chunks


def unet_eps(model, seed: int = 0, context: torch.Tensor | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    if context is None:
        context = torch.randn(2, 77, model.architecture.unet.context_dim, generator=generator)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 700]), context=context)


def test_dezero_randomises_only_all_zero_matrices():
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    dezero_(layer, std=0.5, seed=3)
    assert layer.weight.abs().sum() > 0
    assert not layer.bias.any()  # 1-D: biases are legitimately zero
    kept = layer.weight.clone()
    dezero_(layer, seed=4)
    assert torch.equal(layer.weight, kept)


def test_fresh_ldm_unet_predicts_zero_until_dezeroed():
    unet = build_unet(TINY.unet)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert not unet(x, t, context=context).any()
        assert unet(x, t, context=context).shape == x.shape
        assert dezero_(unet)(x, t, context=context).abs().mean() > 1e-3


def test_random_model_is_deterministic_for_a_seed(tiny_model):
    again = random_sd_model(TINY, seed=0)
    other = random_sd_model(TINY, seed=5)
    assert again.name == "random-tiny-0"
    assert torch.equal(unet_eps(again), unet_eps(tiny_model))
    assert not torch.allclose(unet_eps(other), unet_eps(tiny_model))
    for name, value in tiny_model.text_encoder.state_dict().items():
        assert torch.equal(value, again.text_encoder.state_dict()[name]), name


def test_random_model_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_sd_model(TINY, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_encode_prompts_shapes_and_padding_chunks(tiny_model):
    empty = tiny_model.encode_prompts([""])
    assert empty.shape == (1, 77, 32)
    assert tiny_model.tokenize_chunks([LONG_PROMPT]).shape == (1, 2, 77)
    batch = tiny_model.encode_prompts(["a photo of a cat", LONG_PROMPT])
    assert batch.shape == (2, 154, 32)
    short = tiny_model.encode_prompts(["a photo of a cat"])
    torch.testing.assert_close(batch[0, :77], short[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[0, 77:], empty[0], rtol=0, atol=1e-6)  # padding chunk = the empty prompt
    assert not torch.allclose(empty[0], short[0])


def test_long_prompt_chunks_are_wrapped_in_bos_eos(tiny_model):
    tokens = clip_tokenizer()(LONG_PROMPT + "dog", add_special_tokens=False)["input_ids"]
    assert len(tokens) == 121
    ids = tiny_model.tokenize_chunks([LONG_PROMPT + "dog"])
    assert ids.shape == (1, 2, 77)
    first, second = ids[0].tolist()
    assert first == [49406, *tokens[:75], 49407]
    assert second == [49406, *tokens[75:], 49407] + [49407] * 29


def test_clip_skip_two_is_penultimate_layer_plus_final_norm(tiny_model):
    prompts = ["a photo of a cat", "dog"]
    skip1 = tiny_model.encode_prompts(prompts, clip_skip=1)
    skip2 = tiny_model.encode_prompts(prompts, clip_skip=2)
    assert not torch.allclose(skip1, skip2)
    ids = tiny_model.tokenize_chunks(prompts).reshape(2, 77)
    with torch.no_grad():
        out = tiny_model.text_encoder(input_ids=ids, output_hidden_states=True)
        manual = tiny_model.text_encoder.text_model.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(skip2, manual, rtol=0, atol=1e-6)
    torch.testing.assert_close(skip1, out.last_hidden_state, rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip_skip", [0, 3, -1])
def test_clip_skip_out_of_range(tiny_model, clip_skip):
    with pytest.raises(ValueError, match=f"clip_skip={clip_skip}"):
        tiny_model.encode_prompts(["x"], clip_skip=clip_skip)


def test_images_to_latents_and_back(tiny_model):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = tiny_model.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    sampled = tiny_model.encode_images(images, generator=torch.Generator().manual_seed(1))
    again = tiny_model.encode_images(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, again) and not torch.equal(sampled, latents)
    posterior = tiny_model.vae.encode(images)
    torch.testing.assert_close(latents, posterior.mode() * 0.18215)
    decoded = tiny_model.decode_latents(latents)
    assert decoded.shape == images.shape
    torch.testing.assert_close(decoded, tiny_model.vae.decode(latents / 0.18215))


def test_checkpoint_round_trip_is_exact(tiny_model, tiny_checkpoint):
    loaded = load_sd_checkpoint(tiny_checkpoint)
    assert loaded.architecture == TINY
    assert loaded.sha256 == file_sha256(tiny_checkpoint) and loaded.name == "tiny-sd1"
    assert torch.equal(loaded.alphas_cumprod, sd1_alphas_cumprod())
    assert torch.equal(unet_eps(loaded), unet_eps(tiny_model))
    prompts = ["a photo of a cat", LONG_PROMPT]
    assert torch.equal(loaded.encode_prompts(prompts, clip_skip=2), tiny_model.encode_prompts(prompts, clip_skip=2))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.decode_latents(latents), tiny_model.decode_latents(latents))
    for module in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert not any(tensor.is_meta for tensor in [*module.parameters(), *module.buffers()])


def test_loading_only_the_unet(tiny_checkpoint):
    loaded = load_sd_checkpoint(tiny_checkpoint, parts=("unet",), compute_hash=False)
    assert loaded.vae is None and loaded.text_encoder is None and loaded.sha256 is None
    with pytest.raises(ValueError, match="without its text_encoder"):
        loaded.encode_prompts([""])
    with pytest.raises(ValueError, match="unknown checkpoint parts"):
        load_sd_checkpoint(tiny_checkpoint, parts=("unet", "lora"))


def test_checkpoint_save_is_atomic_and_refuses_null_text(tiny_model, tmp_path):
    path = tmp_path / "out" / "model.safetensors"
    save_sd_checkpoint(tiny_model, path)
    assert [entry.name for entry in path.parent.iterdir()] == ["model.safetensors"]
    from gcfg_core.nulltext import convert_to_nulltext, transformer_block_names

    concept = copy.deepcopy(tiny_model)
    width = {name: concept.unet.get_submodule(name).norm1.normalized_shape[0]
             for name in transformer_block_names(concept.unet)}
    convert_to_nulltext(concept.unet, {name: torch.zeros(1, 1, channels) for name, channels in width.items()})
    with pytest.raises(ValueError, match="save_concept_model"):
        save_sd_checkpoint(concept, tmp_path / "concept.safetensors")


def test_wrong_architecture_lists_missing_and_unexpected_keys(tiny_model, tiny_checkpoint):
    state_dict = dict(tiny_model.unet.state_dict())
    del state_dict["out.2.weight"]
    state_dict["bogus.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError, match=r"missing keys: out\.2\.weight; unexpected keys: bogus\.weight"):
        build_unet(TINY.unet, state_dict)
    wrong_shape = dict(tiny_model.unet.state_dict(), **{"out.2.bias": torch.zeros(5)})
    with pytest.raises(StateDictMismatchError, match=r"out\.2\.bias has shape \(5,\), expected \(4,\)"):
        build_unet(TINY.unet, wrong_shape)
    with pytest.raises(CheckpointError, match=r"tiny-sd1\.safetensors: UNet state dict does not match"):
        load_sd_checkpoint(tiny_checkpoint, architecture=SD1)


def test_text_encoder_loads_with_or_without_position_ids(tiny_model):
    state_dict = dict(tiny_model.text_encoder.state_dict())
    with_ids = dict(state_dict, **{POSITION_IDS_KEY: torch.arange(77).unsqueeze(0)})
    without_ids = {key: value for key, value in state_dict.items() if key != POSITION_IDS_KEY}
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    expected = tiny_model.text_encoder(input_ids=ids).last_hidden_state
    for variant in (with_ids, without_ids):
        encoder = build_text_encoder(TINY.text_encoder, variant)
        torch.testing.assert_close(encoder(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)


def test_vae_key_layout_matches_autoencoder_kl(tiny_model):
    keys = set(tiny_model.vae.state_dict())
    assert {"quant_conv.weight", "post_quant_conv.weight", "encoder.conv_in.weight", "decoder.conv_out.weight"} <= keys
    assert isinstance(build_vae(TINY.vae, tiny_model.vae.state_dict()), VAE)
    with_loss = dict(tiny_model.vae.state_dict(), **{"loss.logvar": torch.zeros(())})
    build_vae(TINY.vae, with_loss)  # LPIPS/loss weights from AutoencoderKL checkpoints are ignored


def test_infer_architecture_on_tiny(tiny_checkpoint):
    from gcfg_core.checkpoint import read_state_dict_shapes

    assert infer_architecture(read_state_dict_shapes(tiny_checkpoint)) == TINY


def test_real_sd1_shapes_build_on_meta_and_share_tiny_key_names(tiny_model):
    """SD 1.5-sized networks on the meta device: inference finds SD1 and the UNet keys equal TINY's."""
    unet = instantiate_unet(SD1.unet, meta=True)
    with torch.device("meta"):
        vae = VAE(SD1.vae)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD1.text_encoder.hf_kwargs()))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert set(unet.state_dict()) == set(tiny_model.unet.state_dict())
    assert len(unet.state_dict()) == 686
    full = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    full.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    full.update({"cond_stage_model.transformer." + k: v for k, v in text.state_dict().items()})
    assert infer_architecture(split_state_dict(full)) == SD1
    assert infer_architecture(full) is SD1


def test_sdpa_attention_equals_ldm_attention(tiny_model):
    unet = copy.deepcopy(tiny_model.unet)
    context = tiny_model.encode_prompts(["a photo of a cat", ""])
    expected = unet_eps(tiny_model, context=context)
    use_sdpa_attention(unet)
    use_sdpa_attention(unet)  # idempotent
    attentions = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    assert len(attentions) == 32 and all(type(m) is SDPACrossAttention for m in attentions)
    assert all(type(m) is CrossAttention for m in tiny_model.unet.modules() if isinstance(m, CrossAttention))
    assert set(unet.state_dict()) == set(tiny_model.unet.state_dict())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        actual = unet(x, torch.tensor([10, 700]), context=context)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_sdpa_attention_with_a_mask_equals_ldm():
    torch.manual_seed(0)
    attention = CrossAttention(query_dim=16, context_dim=16, heads=2, dim_head=8)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    expected = attention(x, context=context, mask=mask)
    self_expected = attention(x)
    use_sdpa_attention(attention)
    assert type(attention) is SDPACrossAttention
    torch.testing.assert_close(attention(x, context=context, mask=mask), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(attention(x), self_expected, rtol=0, atol=1e-5)


def test_ckpt_checkpoint_loads_like_the_safetensors_one(tiny_model, tiny_checkpoint, tmp_path):
    from gcfg_core.checkpoint import read_state_dict

    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": read_state_dict(tiny_checkpoint), "global_step": 1}, path)
    loaded = load_sd_checkpoint(path, parts=("unet", "text_encoder"))
    assert loaded.architecture == TINY and loaded.vae is None
    assert torch.equal(unet_eps(loaded), unet_eps(tiny_model))
    assert torch.equal(loaded.encode_prompts(["cat"]), tiny_model.encode_prompts(["cat"]))
