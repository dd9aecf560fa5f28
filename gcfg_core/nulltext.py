"""Null-text mode for an ldm UNet: every cross-attention becomes a calibrated constant (paper §4.3).

In each `BasicTransformerBlock`, `attn2` is replaced by a frozen per-block vector [1, 1, C] and `norm2`
(the LayerNorm that only fed `attn2`) by the identity, as in the reference code
(PRIV-Creation/Concept-centric-Personalization, `nulltext_unet.py`). The vector is the base model's
`attn2` output for the empty prompt, averaged over batch and spatial positions of noised calibration
latents; the released preparation script never ran that pass, `calibrate_nulltext` does.

SDXL (`gcfg_core.sdxl_unet.SDXLUNet`, 70 transformer blocks in the base layout) is converted the same way. Its
UNet also reads the `vector` input `y` = [pooled text embedding | size embeddings]: the pooled part is fixed at
the empty prompt's (stored with the model as the buffer `nulltext_pooled`), the size embeddings stay an input
(`nulltext_vector`), so the concept UNet still knows each image's original size, crop and target size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from gcfg_core.configs import SDXLUNetConfig, UNetConfig, sd1_alphas_cumprod

logger = logging.getLogger("gcfg.nulltext")

VECTOR_SUFFIX = ".attn2.vector"
POOLED_BUFFER = "nulltext_pooled"  # an SDXL null-text UNet's fixed pooled text input [1, P]
NUM_TRAIN_TIMESTEPS = 1000


class NullTextCrossAttention(nn.Module):
    """Stands in for a cross-attention: returns a constant vector [1, 1, C] for every token, whatever the context."""

    def __init__(self, vector: torch.Tensor):
        super().__init__()
        self.register_buffer("vector", vector.detach().clone().reshape(1, 1, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask=None, **host_kwargs) -> torch.Tensor:
        # `host_kwargs`: what a host's own transformer block passes its cross-attention (Forge: value=,
        # transformer_options=); the constant ignores them like the context.
        return self.vector.to(dtype=x.dtype).expand(x.shape[0], x.shape[1], -1)


def transformer_block_names(unet: nn.Module, block_type: type | None = None) -> list[str]:
    """Module paths of the UNet's transformer blocks, e.g. "input_blocks.1.1.transformer_blocks.0".

    `block_type` is the block class (default ldm's `BasicTransformerBlock`); a host with its own UNet class of the
    same layout (Forge's `backend.nn.unet`) passes its own, since it has no `ldm`."""
    if block_type is None:
        from ldm.modules.attention import BasicTransformerBlock as block_type
    return [name for name, module in unet.named_modules() if isinstance(module, block_type)]


def is_nulltext(unet: nn.Module) -> bool:
    """Whether the UNet's cross-attentions have been replaced by null-text constants."""
    return any(isinstance(module, NullTextCrossAttention) for module in unet.modules())


def is_sdxl_unet(unet: nn.Module) -> bool:
    """Whether the UNet is SDXL's (it takes the `vector` input `y`)."""
    from gcfg_core.sdxl_unet import SDXLUNet

    return isinstance(unet, SDXLUNet)


def nulltext_vector(unet: nn.Module, sizes) -> torch.Tensor:
    """The `y` input of an SDXL null-text UNet: its fixed pooled part, then each image's size embeddings.

    `sizes` is one `SizeConditioning` or one per image; returns fp32 [len(sizes), P + 6·256] on the CPU.
    """
    from gcfg_core.conditioning import SizeConditioning, size_embedding

    pooled = getattr(unet, POOLED_BUFFER, None)
    if pooled is None:
        raise ValueError("not an SDXL null-text UNet: it has no fixed pooled text input")
    sizes = [sizes] if isinstance(sizes, SizeConditioning) else list(sizes)
    embedded = size_embedding(sizes)
    return torch.cat([pooled.detach().float().cpu().expand(len(sizes), -1), embedded], dim=-1)


def _batched(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{what} has batch size {tensor.shape[0]}; expected 1 or {batch}")


@torch.no_grad()
def calibrate_nulltext(
    unet: nn.Module,
    latents: torch.Tensor,
    empty_context: torch.Tensor,
    *,
    seed: int = 0,
    timesteps: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    batch_size: int | None = None,
    vector: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-block null-text vectors: the mean `attn2` output of the original UNet for the empty prompt.

    An SDXL UNet also needs its `vector` input: the empty prompt's pooled embedding with each calibration image's
    size embeddings, one row for all latents or one per latent.

    The latents (scaled, clean) are noised at timesteps drawn uniformly from [0, 1000) with noise from a
    CPU generator seeded by `seed` (unless `timesteps` is given), so the result is deterministic for a
    seed. The mean runs over the whole calibration batch and every spatial position; `batch_size` only
    splits the forward passes. Returns fp32 vectors [1, 1, C] on the CPU.
    """
    if is_nulltext(unet):
        raise ValueError("calibrate_nulltext needs the original UNet; this one is already in null-text mode")
    if latents.dim() != 4 or latents.shape[0] == 0:
        raise ValueError(f"latents must be a non-empty [B, C, H, W] batch, got shape {tuple(latents.shape)}")
    count = latents.shape[0]
    generator = torch.Generator().manual_seed(seed)
    if timesteps is None:
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (count,), generator=generator)
    timesteps = _batched(torch.as_tensor(timesteps).reshape(-1), count, "timesteps").long()
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    schedule = (alphas_cumprod if alphas_cumprod is not None else sd1_alphas_cumprod()).float().cpu()
    alpha = schedule[timesteps.cpu()].reshape(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents.float().cpu() + (1 - alpha).sqrt() * noise
    context = _batched(empty_context, count, "empty_context")
    sdxl = is_sdxl_unet(unet)
    if sdxl != (vector is not None):
        raise ValueError("an SDXL UNet is calibrated with its vector input (pooled text and size embeddings)" if sdxl
                         else "only SDXL UNets take a vector input; this UNet is SD 1.x")
    rows = _batched(vector, count, "vector") if sdxl else None

    parameter = next(unet.parameters())
    names = transformer_block_names(unet)
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = dict.fromkeys(names, 0)

    def recorder(name: str):
        def hook(_module, _inputs, output):
            flat = output.detach().double().reshape(-1, output.shape[-1])
            sums[name] = sums.get(name, 0) + flat.sum(dim=0).cpu()
            tokens[name] += flat.shape[0]
        return hook

    handles = [unet.get_submodule(name).attn2.register_forward_hook(recorder(name)) for name in names]
    was_training = unet.training
    unet.eval()
    try:
        step = batch_size or count
        for start in range(0, count, step):
            stop = min(start + step, count)
            extra = {"y": rows[start:stop].to(device=parameter.device, dtype=parameter.dtype)} if sdxl else {}
            unet(noisy[start:stop].to(device=parameter.device, dtype=parameter.dtype),
                 timesteps[start:stop].to(parameter.device),
                 context=context[start:stop].to(device=parameter.device, dtype=parameter.dtype), **extra)
    finally:
        for handle in handles:
            handle.remove()
        unet.train(was_training)
    logger.info("calibrated %d null-text vectors on %d latents (seed %d)", len(names), count, seed)
    return {name: (sums[name] / tokens[name]).float().reshape(1, 1, -1) for name in names}


def convert_to_nulltext(unet: nn.Module, vectors: Mapping[str, torch.Tensor],
                        pooled: torch.Tensor | None = None, block_type: type | None = None) -> nn.Module:
    """In place: each block's `attn2` → `NullTextCrossAttention(vectors[name])`, `norm2` → identity; returns unet.

    An SDXL UNet also keeps `pooled`, the empty prompt's pooled text embedding [1, P] (or [P]), as its fixed pooled
    input (buffer `nulltext_pooled`); SD 1.x UNets have no such input. `block_type` as in `transformer_block_names`.
    """
    if is_nulltext(unet):
        raise ValueError("this UNet is already in null-text mode")
    if is_sdxl_unet(unet):
        if pooled is None:
            raise ValueError("an SDXL UNet needs the empty prompt's pooled text embedding for null-text mode")
        width = unet.config.adm_in_channels - _size_width()
        if pooled.numel() != width:
            raise ValueError(f"pooled text embedding has {pooled.numel()} values; this SDXL UNet's vector input "
                             f"takes {width} before the size embeddings")
    elif pooled is not None:
        raise ValueError("only SDXL UNets take a pooled text input; this UNet is SD 1.x")
    names = transformer_block_names(unet, block_type)
    missing, extra = sorted(set(names) - set(vectors)), sorted(set(vectors) - set(names))
    if missing or extra:
        raise ValueError(f"null-text vectors do not match the UNet's transformer blocks: missing {missing or 'none'}; "
                         f"unknown {extra or 'none'}")
    for name in names:
        block = unet.get_submodule(name)
        width = block.norm1.normalized_shape[0]
        vector = vectors[name]
        if vector.numel() != width:
            raise ValueError(f"null-text vector for {name} has {vector.numel()} values; the block is {width} wide")
        reference = block.norm1.weight
        target_device = "cpu" if reference.is_meta else reference.device
        block.attn2 = NullTextCrossAttention(vector.to(device=target_device, dtype=reference.dtype))
        block.norm2 = nn.Identity()
    if pooled is not None:
        reference = unet.time_embed[0].weight
        target_device = "cpu" if reference.is_meta else reference.device
        unet.register_buffer(POOLED_BUFFER, pooled.detach().clone().reshape(1, -1).to(device=target_device,
                                                                                        dtype=reference.dtype))
    return unet


def _size_width() -> int:
    from gcfg_core.configs import SIZE_EMBED_DIM, SIZE_FIELDS

    return SIZE_FIELDS * SIZE_EMBED_DIM


def nulltext_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """A null-text UNet's state dict: no attn2/norm2 weights, vectors under "<block>.attn2.vector"."""
    if not is_nulltext(unet):
        raise ValueError("not a null-text UNet; convert it with convert_to_nulltext first")
    return dict(unet.state_dict())


def vectors_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-block vectors stored in a null-text UNet state dict, keyed by block name."""
    return {key[: -len(VECTOR_SUFFIX)]: value for key, value in state_dict.items() if key.endswith(VECTOR_SUFFIX)}


def build_nulltext_unet(
    config: UNetConfig | SDXLUNetConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A null-text ldm (SD 1.x) or SDXL UNet from a `nulltext_state_dict` (meta build, conversion, strict load)."""
    from gcfg_core.models import check_state_dict, instantiate_unet, load_state_dict_assigned
    from gcfg_core.sdxl_unet import instantiate_sdxl_unet

    if isinstance(config, SDXLUNetConfig):
        unet = instantiate_sdxl_unet(config, meta=True)
        pooled = state_dict.get(POOLED_BUFFER)
        if pooled is None:
            raise ValueError(f"an SDXL null-text UNet state dict needs its fixed pooled text input {POOLED_BUFFER!r}")
        convert_to_nulltext(unet, vectors_from_state_dict(state_dict), pooled)
    else:
        unet = instantiate_unet(config, meta=True)
        convert_to_nulltext(unet, vectors_from_state_dict(state_dict))
    check_state_dict("null-text UNet", unet.state_dict(), state_dict)
    return load_state_dict_assigned(unet, state_dict, device, dtype)
