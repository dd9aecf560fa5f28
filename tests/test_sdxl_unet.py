"""`SDXLUNet`: sgm's state-dict layout (keys and shapes derived here from the architecture), inference, forward."""

from __future__ import annotations

import pytest
import torch

from gcfg_core.configs import SDXL, SDXL_REFINER_UNET, SDXL_TINY, SDXLUNetConfig
from gcfg_core.models import dezero_
from gcfg_core.sdxl_unet import SDXLLayoutError, SDXLUNet, infer_sdxl_unet_config, instantiate_sdxl_unet

# Published size of the SDXL 1.0 base UNet (the UNet of stabilityai/stable-diffusion-xl-base-1.0).
SDXL_BASE_UNET_PARAMETERS = 2_567_463_684


def expected_shapes(base, mult, res_blocks, depth, middle, context, adm, cin=4, cout=4) -> dict[str, tuple]:
    """sgm `UNetModel` keys and shapes as `sd_xl_base.yaml` describes the network, written out block by block."""
    shapes: dict[str, tuple] = {}
    embed = 4 * base

    def linear(name, fan_in, fan_out, bias=True):
        shapes[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            shapes[f"{name}.bias"] = (fan_out,)

    def conv(name, fan_in, fan_out, kernel):
        shapes[f"{name}.weight"] = (fan_out, fan_in, kernel, kernel)
        shapes[f"{name}.bias"] = (fan_out,)

    def norm(name, channels):
        shapes[f"{name}.weight"] = (channels,)
        shapes[f"{name}.bias"] = (channels,)

    def resblock(name, fan_in, fan_out):
        norm(f"{name}.in_layers.0", fan_in)
        conv(f"{name}.in_layers.2", fan_in, fan_out, 3)
        linear(f"{name}.emb_layers.1", embed, fan_out)
        norm(f"{name}.out_layers.0", fan_out)
        conv(f"{name}.out_layers.3", fan_out, fan_out, 3)
        if fan_in != fan_out:
            conv(f"{name}.skip_connection", fan_in, fan_out, 1)

    def attention(name, channels, kv_width):
        linear(f"{name}.to_q", channels, channels, bias=False)
        linear(f"{name}.to_k", kv_width, channels, bias=False)
        linear(f"{name}.to_v", kv_width, channels, bias=False)
        linear(f"{name}.to_out.0", channels, channels)

    def transformer(name, channels, blocks):
        norm(f"{name}.norm", channels)
        linear(f"{name}.proj_in", channels, channels)  # use_linear_in_transformer: Linear, not 1×1 conv
        for block in range(blocks):
            prefix = f"{name}.transformer_blocks.{block}"
            attention(f"{prefix}.attn1", channels, channels)
            linear(f"{prefix}.ff.net.0.proj", channels, 2 * 4 * channels)  # GEGLU: value and gate
            linear(f"{prefix}.ff.net.2", 4 * channels, channels)
            attention(f"{prefix}.attn2", channels, context)
            for n in (1, 2, 3):
                norm(f"{prefix}.norm{n}", channels)
        linear(f"{name}.proj_out", channels, channels)

    linear("time_embed.0", base, embed)
    linear("time_embed.2", embed, embed)
    linear("label_emb.0.0", adm, embed)
    linear("label_emb.0.2", embed, embed)
    conv("input_blocks.0.0", cin, base, 3)
    index, channels, skips = 1, base, [base]
    for level, factor in enumerate(mult):
        for _ in range(res_blocks):
            resblock(f"input_blocks.{index}.0", channels, factor * base)
            channels = factor * base
            if depth[level]:
                transformer(f"input_blocks.{index}.1", channels, depth[level])
            skips.append(channels)
            index += 1
        if level < len(mult) - 1:
            conv(f"input_blocks.{index}.0.op", channels, channels, 3)
            skips.append(channels)
            index += 1
    resblock("middle_block.0", channels, channels)
    transformer("middle_block.1", channels, middle)
    resblock("middle_block.2", channels, channels)
    index = 0
    for level in range(len(mult) - 1, -1, -1):
        for block in range(res_blocks + 1):
            resblock(f"output_blocks.{index}.0", channels + skips.pop(), mult[level] * base)
            channels = mult[level] * base
            if depth[level]:
                transformer(f"output_blocks.{index}.1", channels, depth[level])
            if level > 0 and block == res_blocks:
                conv(f"output_blocks.{index}.{2 if depth[level] else 1}.conv", channels, channels, 3)
            index += 1
    norm("out.0", channels)
    conv("out.2", base, cout, 3)
    return shapes


def shapes_of(config: SDXLUNetConfig) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in instantiate_sdxl_unet(config, meta=True).state_dict().items()}


def test_full_size_base_unet_has_sgm_keys_and_shapes():
    built = shapes_of(SDXL.unet)
    expected = expected_shapes(320, (1, 2, 4), 2, (0, 2, 10), 10, 2048, 2816)
    assert sorted(built.keys() - expected.keys()) == [] and sorted(expected.keys() - built.keys()) == []
    assert built == expected
    assert sum(torch.Size(shape).numel() for shape in built.values()) == SDXL_BASE_UNET_PARAMETERS
    # Transformer blocks: 2·2 + 2·3 at level 1, 10·2 + 10·3 at level 2, 10 in the middle (the 70 attn2 of SDXL).
    assert sum(key.endswith("attn2.to_k.weight") for key in built) == 70


def test_refiner_unet_has_sgm_keys_and_shapes():
    built = shapes_of(SDXL_REFINER_UNET)
    assert built == expected_shapes(384, (1, 2, 4, 4), 2, (0, 4, 4, 0), 4, 1280, 2560)


def test_tiny_unet_keeps_every_key_name_of_the_base():
    assert shapes_of(SDXL_TINY.unet).keys() == shapes_of(SDXL.unet).keys()


@pytest.mark.parametrize("config", [SDXL.unet, SDXL_REFINER_UNET, SDXL_TINY.unet], ids=["base", "refiner", "tiny"])
def test_config_is_inferred_from_the_state_dict(config):
    assert infer_sdxl_unet_config(instantiate_sdxl_unet(config, meta=True).state_dict()) == config


def test_config_inference_names_a_missing_key():
    state = instantiate_sdxl_unet(SDXL_TINY.unet, meta=True).state_dict()
    del state["label_emb.0.0.weight"]
    with pytest.raises(SDXLLayoutError, match="label_emb.0.0.weight"):
        infer_sdxl_unet_config(state)


@pytest.fixture(scope="module")
def tiny_unet() -> SDXLUNet:
    torch.manual_seed(0)
    return dezero_(SDXLUNet(SDXL_TINY.unet)).eval()


@torch.no_grad()
def test_tiny_forward_uses_the_context_and_every_row_of_the_vector(tiny_unet):
    config = SDXL_TINY.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 250.5])
    context = torch.randn(2, 77, config.context_dim, generator=g)
    y = torch.randn(2, config.adm_in_channels, generator=g)
    out = tiny_unet(x, t, context=context, y=y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    y_changed = y.clone()
    y_changed[1] += 1
    changed = tiny_unet(x, t, context=context, y=y_changed)
    assert torch.equal(changed[0], out[0]) and not torch.allclose(changed[1], out[1])
    assert not torch.allclose(tiny_unet(x, t, context=context * 2, y=y), out)
    # Rows are independent: image 1 alone gives its row of the batch.
    alone = tiny_unet(x[1:], t[1:], context=context[1:], y=y[1:])
    assert torch.allclose(alone[0], out[1], atol=1e-5)


def test_forward_without_vector_is_refused(tiny_unet):
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="vector conditioning"):
        tiny_unet(x, torch.tensor([1.0]), context=torch.zeros(1, 77, SDXL_TINY.unet.context_dim))


@pytest.mark.slow
def test_full_size_forward_shapes_on_meta():
    unet = instantiate_sdxl_unet(SDXL.unet, meta=True)
    with torch.device("meta"):
        x = torch.empty(2, 4, 128, 128)
        out = unet(x, torch.empty(2), context=torch.empty(2, 77, 2048), y=torch.empty(2, 2816))
    assert out.shape == (2, 4, 128, 128) and out.device.type == "meta"
