"""The SDXL UNet assembled from ldm's own blocks, with the state-dict keys of sgm's `UNetModel`.

SDXL checkpoints hold the UNet of Stability-AI/generative-models (`sgm`), which is not on PyPI. ldm's
`UNetModel` (the WebUI's and stable-diffusion-sdkit's) cannot express it: it has one transformer depth for all
levels and no `label_emb` MLP for the `vector` input. The blocks themselves (ResBlock, Downsample, Upsample,
TimestepEmbedSequential, SpatialTransformer with linear projections) are the same modules with the same key
names, so `SDXLUNet` arranges ldm's blocks the way sgm's `sd_xl_base.yaml` arranges its own:

* ``time_embed`` and ``label_emb.0`` are Linear–SiLU–Linear MLPs to 4× the base width; their outputs are added;
* per level: `num_res_blocks` × (ResBlock [+ SpatialTransformer of that level's depth]), then a Downsample
  (not after the last level); every input block's output is kept for the skip connections;
* middle: ResBlock, SpatialTransformer (its own depth), ResBlock;
* per level, deepest first: `num_res_blocks` + 1 × (ResBlock on [h, skip] [+ SpatialTransformer]), an Upsample
  closing every level but the first;
* ``out``: GroupNorm, SiLU, 3×3 conv.

Every transformer block of a SpatialTransformer attends to the same context (ldm's version would index a
per-block list).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, TimestepEmbedSequential, Upsample
from ldm.modules.diffusionmodules.util import conv_nd, normalization, timestep_embedding, zero_module
from torch import Tensor, nn

from gcfg_core.configs import SDXL, SDXL_TINY, SDXLUNetConfig

logger = logging.getLogger("gcfg.sdxl_unet")


class SharedContextTransformer(SpatialTransformer):
    """ldm's `SpatialTransformer` (same parameters and keys) feeding one context to each of its blocks, as sgm does."""

    def forward(self, x: Tensor, context: Tensor | list | None = None) -> Tensor:
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        return super().forward(x, context)


class SDXLUNet(nn.Module):
    """SDXL's UNet: ``unet(x_t, timesteps, context=[B, T, 2048], y=[B, 2816]) -> ε or v`` (see the module doc)."""

    def __init__(self, config: SDXLUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.model_channels = base = config.model_channels
        embed = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, embed), nn.SiLU(), nn.Linear(embed, embed))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(config.adm_in_channels, embed), nn.SiLU(), nn.Linear(embed, embed)))

        def resblock(channels: int, out_channels: int) -> ResBlock:
            return ResBlock(channels, embed, 0.0, out_channels=out_channels, dims=2, use_checkpoint=False)

        def transformer(channels: int, depth: int) -> SharedContextTransformer:
            head = config.num_head_channels
            return SharedContextTransformer(channels, channels // head, head, depth=depth,
                                            context_dim=[config.context_dim] * depth, use_linear=True,
                                            use_checkpoint=False)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(2, config.in_channels, base, 3, padding=1))])
        skip_widths, width = [base], base
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [resblock(width, mult * base)]
                width = mult * base
                if config.transformer_depth[level]:
                    layers.append(transformer(width, config.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(width)
            if level != last_level:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(width, True, dims=2, out_channels=width)))
                skip_widths.append(width)

        self.middle_block = TimestepEmbedSequential(
            resblock(width, width), transformer(width, config.transformer_depth_middle), resblock(width, width))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(config.channel_mult))):
            for index in range(config.num_res_blocks + 1):
                layers = [resblock(width + skip_widths.pop(), config.channel_mult[level] * base)]
                width = config.channel_mult[level] * base
                if config.transformer_depth[level]:
                    layers.append(transformer(width, config.transformer_depth[level]))
                if level and index == config.num_res_blocks:
                    layers.append(Upsample(width, True, dims=2, out_channels=width))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(width), nn.SiLU(),
                                 zero_module(conv_nd(2, base, config.out_channels, 3, padding=1)))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None,
                **kwargs) -> Tensor:
        if y is None:
            raise ValueError("the SDXL UNet needs its vector conditioning y (pooled text embedding and size "
                             f"embeddings, {self.config.adm_in_channels} values per image)")
        weight_dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(weight_dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(weight_dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype))


def instantiate_sdxl_unet(config: SDXLUNetConfig, *, meta: bool) -> SDXLUNet:
    """An `SDXLUNet` for `config`; on the meta device (no memory, no init) when `meta`."""
    if meta:
        with torch.device("meta"):
            return SDXLUNet(config)
    return SDXLUNet(config)


_INPUT_CONV = "input_blocks.0.0.weight"
_TO_K_SUFFIX = ".attn2.to_k.weight"
_KNOWN_HEAD_CHANNELS = {SDXL.unet.model_channels: SDXL.unet.num_head_channels,
                        SDXL_TINY.unet.model_channels: SDXL_TINY.unet.num_head_channels}


class SDXLLayoutError(ValueError):
    """A state dict is not in the SDXL UNet key layout."""


def _depth(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    depth = 0
    while f"{prefix}.transformer_blocks.{depth}.norm1.weight" in state_dict:
        depth += 1
    return depth


def infer_sdxl_unet_config(state_dict: Mapping[str, Tensor]) -> SDXLUNetConfig:
    """An `SDXLUNetConfig` from a bare sgm-layout UNet state dict's keys and shapes.

    The per-head width is not visible in shapes: 64 (sgm's `num_head_channels`) unless the base width is one this
    package builds with another value (the tiny test size).
    """
    try:
        conv_in = state_dict[_INPUT_CONV]
        base, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        out_channels = int(state_dict["out.2.weight"].shape[0])
        adm_in_channels = int(state_dict["label_emb.0.0.weight"].shape[1])
    except KeyError as exc:
        raise SDXLLayoutError(f"not an SDXL UNet state dict: key {exc.args[0]} is missing") from exc
    context_dims = {int(value.shape[1]) for key, value in state_dict.items() if key.endswith(_TO_K_SUFFIX)}
    if len(context_dims) > 1:
        raise SDXLLayoutError(f"cross-attention context widths differ between blocks: {sorted(context_dims)}")
    context_dim = context_dims.pop() if context_dims else SDXL.unet.context_dim  # null-text: no attn2 weights

    channel_mult, depths, blocks_per_level = [], [], []
    index, res_blocks = 1, 0
    while f"input_blocks.{index}.0.op.weight" in state_dict or f"input_blocks.{index}.0.in_layers.0.weight" \
            in state_dict:
        if f"input_blocks.{index}.0.op.weight" in state_dict:  # a Downsample closes the level
            blocks_per_level.append(res_blocks)
            res_blocks = 0
        else:
            if res_blocks == 0:
                width = int(state_dict[f"input_blocks.{index}.0.out_layers.3.weight"].shape[0])
                channel_mult.append(width // base)
                depths.append(_depth(state_dict, f"input_blocks.{index}.1"))
            res_blocks += 1
        index += 1
    blocks_per_level.append(res_blocks)
    if not channel_mult or len(set(blocks_per_level)) != 1:
        raise SDXLLayoutError(f"unsupported SDXL UNet layout: residual blocks per level {blocks_per_level}")
    middle = _depth(state_dict, "middle_block.1")
    return SDXLUNetConfig(
        model_channels=base, in_channels=in_channels, out_channels=out_channels, channel_mult=tuple(channel_mult),
        num_res_blocks=blocks_per_level[0], transformer_depth=tuple(depths), transformer_depth_middle=middle,
        num_head_channels=_KNOWN_HEAD_CHANNELS.get(base, 64), context_dim=context_dim,
        adm_in_channels=adm_in_channels,
    )
