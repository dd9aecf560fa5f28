"""Building SD 1.x networks (ldm UNet, ldm VAE, Hugging Face CLIP text encoder) and loading/saving checkpoints.

The UNet and the VAE parts are ldm's own classes (Stability-AI/stablediffusion), so state dicts load
with the same key names the WebUI uses; the VAE wrapper avoids `AutoencoderKL`, which needs
pytorch_lightning. Prompt encoding follows the WebUI's 75-token chunking and clip-skip behaviour.

`ldm` is imported where a network is built, not at import: Forge ships no `ldm`, and its glue reads checkpoints and
concept files through this module without building ldm networks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from gcfg_core.checkpoint import (
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    ModelFamily,
    SplitStateDict,
    file_sha256,
    join_state_dict,
    read_state_dict,
    read_state_dict_shapes,
    require_family,
    split_state_dict,
)
from gcfg_core.configs import (
    SCALE_FACTOR,
    SD1,
    TINY,
    SDArchitecture,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    sd1_alphas_cumprod,
)
from gcfg_core.fileio import atomic_path
from gcfg_core.parameterization import Prediction
from gcfg_core.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MODEL_MAX_LENGTH, clip_tokenizer

if TYPE_CHECKING:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger("gcfg.models")

CHUNK_TOKENS = MODEL_MAX_LENGTH - 2  # 75 prompt tokens between BOS and EOS, as in the WebUI
POSITION_IDS_KEY = "text_model.embeddings.position_ids"
PARTS = ("unet", "vae", "text_encoder")


def tokenize_chunks(prompts: Sequence[str], *, pad_token_id: int = EOS_TOKEN_ID) -> torch.Tensor:
    """CLIP token ids [B, k, 77]: each prompt in 75-token chunks wrapped in BOS/EOS, the rest `pad_token_id`.

    The WebUI's layout: every prompt gets as many chunks as the longest one; chunks past a prompt's end are empty
    prompts (BOS, EOS, padding). CLIP ViT-L pads with EOS, OpenCLIP with 0. Chunks split at exactly 75 tokens.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    token_lists = clip_tokenizer()(list(prompts), add_special_tokens=False, truncation=False)["input_ids"]
    chunks_per_prompt = max([max(1, math.ceil(len(tokens) / CHUNK_TOKENS)) for tokens in token_lists] or [1])
    rows = []
    for tokens in token_lists:
        chunks = []
        for index in range(chunks_per_prompt):
            body = tokens[index * CHUNK_TOKENS:(index + 1) * CHUNK_TOKENS]
            chunk = [BOS_TOKEN_ID, *body, EOS_TOKEN_ID]
            chunks.append(chunk + [pad_token_id] * (MODEL_MAX_LENGTH - len(chunk)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.int64)


class StateDictMismatchError(ValueError):
    """A state dict does not fit the network built for it."""


def dezero_(module: nn.Module, *, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Re-randomise every all-zero parameter with ≥2 dims, in place.

    ldm zero-initialises each ResBlock's last conv, each SpatialTransformer's `proj_out` and the UNet's
    output conv, so a freshly built UNet predicts exactly 0 whatever its input: every guidance weight
    would then be a no-op and tests of the math could not fail. Random-weight models call this.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() > 1 and not parameter.any():
                noise = torch.randn(parameter.shape, generator=generator) * std
                parameter.copy_(noise.to(device=parameter.device, dtype=parameter.dtype))
    return module


def _show(keys: list[str]) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")


def check_state_dict(what: str, expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> None:
    """Raise `StateDictMismatchError` listing missing/unexpected keys or wrong shapes of `given`."""
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if missing or unexpected:
        raise StateDictMismatchError(
            f"{what} state dict does not match the architecture: missing keys: {_show(missing)}; "
            f"unexpected keys: {_show(unexpected)}"
        )
    wrong = [f"{key} has shape {tuple(given[key].shape)}, expected {tuple(expected[key].shape)}"
             for key in expected if tuple(given[key].shape) != tuple(expected[key].shape)]
    if wrong:
        raise StateDictMismatchError(f"{what} state dict does not match the architecture: {_show(wrong)}")


def load_state_dict_assigned(module: nn.Module, state_dict: Mapping[str, torch.Tensor], device, dtype) -> nn.Module:
    """Strict `load_state_dict(assign=True)` after moving floating tensors to `device`/`dtype` (meta builds)."""
    converted = {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in state_dict.items()
    }
    module.load_state_dict(converted, strict=True, assign=True)
    return module


def instantiate_unet(config: UNetConfig, *, meta: bool) -> UNetModel:
    """An ldm `UNetModel` for `config`; on the meta device (no memory, no init) when `meta`."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    if meta:
        with torch.device("meta"):
            return UNetModel(**config.ldm_kwargs())
    return UNetModel(**config.ldm_kwargs())


def build_unet(
    config: UNetConfig,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNetModel:
    """An ldm `UNetModel`: loaded from a bare UNet state dict (meta build, no double allocation) or random."""
    return build_network("UNet", functools.partial(instantiate_unet, config), state_dict, device, dtype)


def build_network(what: str, instantiate: Callable[..., nn.Module], state_dict: Mapping[str, torch.Tensor] | None,
                  device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """`instantiate(meta=...)` random on `device`, or built on the meta device and given `state_dict`'s tensors
    (checked against the network's keys and shapes first, so a wrong file names what differs)."""
    if state_dict is None:
        return instantiate(meta=False).to(device=device, dtype=dtype)
    network = instantiate(meta=True)
    check_state_dict(what, network.state_dict(), state_dict)
    return load_state_dict_assigned(network, state_dict, device, dtype)


class VAE(nn.Module):
    """SD's KL autoencoder with ldm `AutoencoderKL`'s submodules and key names, without pytorch_lightning."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        ddconfig = config.ddconfig()
        self.config = config
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior over latents for images in [-1, 1] (unscaled latents)."""
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from unscaled latents."""
        return self.decoder(self.post_quant_conv(latents))


def build_vae(
    config: VAEConfig,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VAE:
    """The SD VAE, loaded from a `first_stage_model.*`-stripped state dict or random."""
    if state_dict is None:
        return VAE(config).to(device=device, dtype=dtype)
    with torch.device("meta"):
        vae = VAE(config)
    # AutoencoderKL checkpoints may carry LPIPS loss weights; they are not part of the network.
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith("loss.")}
    check_state_dict("VAE", vae.state_dict(), state_dict)
    return load_state_dict_assigned(vae, state_dict, device, dtype)


def build_text_encoder(
    config: TextEncoderConfig,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> transformers.CLIPTextModel:
    """A Hugging Face `CLIPTextModel` (`text_model.*` keys), loaded or random; `position_ids` may be absent."""
    hf_config = transformers.CLIPTextConfig(**config.hf_kwargs())
    if state_dict is None:
        return transformers.CLIPTextModel(hf_config).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        model = transformers.CLIPTextModel(hf_config)
    expected = model.state_dict()
    # transformers 4.30 saves position_ids in the state dict, newer versions do not: accept both.
    state_dict = dict(state_dict)
    if POSITION_IDS_KEY in expected and POSITION_IDS_KEY not in state_dict:
        state_dict[POSITION_IDS_KEY] = torch.arange(config.max_position_embeddings).unsqueeze(0)
    elif POSITION_IDS_KEY not in expected:
        state_dict.pop(POSITION_IDS_KEY, None)
    if POSITION_IDS_KEY in state_dict:
        state_dict[POSITION_IDS_KEY] = state_dict[POSITION_IDS_KEY].to(torch.int64)
    check_state_dict("text encoder", expected, state_dict)
    load_state_dict_assigned(model, state_dict, device, dtype)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # a non-persistent buffer the meta build left behind
            if not name.endswith("position_ids"):
                raise StateDictMismatchError(f"text encoder buffer {name} has no value after loading")
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(config.max_position_embeddings, device=device)
                                  .unsqueeze(0), persistent=False)
    return model.eval()


def infer_unet_config(unet_state_dict: Mapping[str, torch.Tensor]) -> UNetConfig:
    """A `UNetConfig` from a bare ldm UNet state dict's shapes (the head count, invisible in shapes, stays 8)."""
    try:
        conv_in = unet_state_dict["input_blocks.0.0.weight"]
        model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
        out_channels = unet_state_dict["out.2.weight"].shape[0]
    except KeyError as exc:
        raise StateDictMismatchError(f"not an SD 1.x UNet state dict: key {exc.args[0]} is missing") from exc
    # A null-text UNet has no attn2 weights; its context width then matters to no tensor and stays SD 1's.
    to_k = unet_state_dict.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    context_dim = to_k.shape[1] if to_k is not None else UNetConfig().context_dim
    level, res_blocks, channel_mult, attention_levels, blocks_per_level = 0, 0, [], set(), []
    index = 1
    while f"input_blocks.{index}.0.op.weight" in unet_state_dict or \
            f"input_blocks.{index}.0.in_layers.0.weight" in unet_state_dict:
        if f"input_blocks.{index}.0.op.weight" in unet_state_dict:  # a Downsample closes the level
            blocks_per_level.append(res_blocks)
            level, res_blocks = level + 1, 0
        else:
            width = unet_state_dict[f"input_blocks.{index}.0.out_layers.3.weight"].shape[0]
            if res_blocks == 0:
                channel_mult.append(width // model_channels)
            if f"input_blocks.{index}.1.proj_in.weight" in unet_state_dict:
                attention_levels.add(2**level)
            res_blocks += 1
        index += 1
    blocks_per_level.append(res_blocks)
    if len(set(blocks_per_level)) != 1 or not channel_mult:
        raise StateDictMismatchError(f"unsupported UNet layout: residual blocks per level {blocks_per_level}")
    depth = 0
    while f"input_blocks.1.1.transformer_blocks.{depth}.attn1.to_q.weight" in unet_state_dict:
        depth += 1
    return UNetConfig(
        model_channels=model_channels, context_dim=context_dim, in_channels=in_channels, out_channels=out_channels,
        attention_resolutions=tuple(sorted(attention_levels, reverse=True)), channel_mult=tuple(channel_mult),
        num_res_blocks=blocks_per_level[0], num_heads=UNetConfig().num_heads, transformer_depth=max(depth, 1),
    )


def infer_vae_config(vae_state_dict: Mapping[str, torch.Tensor]) -> VAEConfig:
    """A `VAEConfig` read from a bare ldm VAE state dict's shapes."""
    try:
        ch = vae_state_dict["encoder.conv_in.weight"].shape[0]
        z_channels = vae_state_dict["decoder.conv_in.weight"].shape[1]
        embed_dim = vae_state_dict["post_quant_conv.weight"].shape[1]
    except KeyError as exc:
        raise StateDictMismatchError(f"not an SD VAE state dict: key {exc.args[0]} is missing") from exc
    ch_mult, level = [], 0
    while f"encoder.down.{level}.block.0.conv2.weight" in vae_state_dict:
        ch_mult.append(vae_state_dict[f"encoder.down.{level}.block.0.conv2.weight"].shape[0] // ch)
        level += 1
    num_res_blocks = 0
    while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in vae_state_dict:
        num_res_blocks += 1
    return VAEConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                     embed_dim=embed_dim)


_KNOWN_HEADS = {SD1.text_encoder.hidden_size: SD1.text_encoder.num_attention_heads,
                TINY.text_encoder.hidden_size: TINY.text_encoder.num_attention_heads}


def infer_text_encoder_config(text_state_dict: Mapping[str, torch.Tensor]) -> TextEncoderConfig:
    """A `TextEncoderConfig` from a `text_model.*` state dict; heads (invisible in shapes) by CLIP's 64-wide rule."""
    try:
        vocab_size, hidden = text_state_dict["text_model.embeddings.token_embedding.weight"].shape
        positions = text_state_dict["text_model.embeddings.position_embedding.weight"].shape[0]
        intermediate = text_state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise StateDictMismatchError(f"not a CLIP text encoder state dict: key {exc.args[0]} is missing") from exc
    layers = 0
    while f"text_model.encoder.layers.{layers}.mlp.fc1.weight" in text_state_dict:
        layers += 1
    heads = _KNOWN_HEADS.get(hidden, max(1, hidden // 64))
    return TextEncoderConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, vocab_size=vocab_size, max_position_embeddings=positions)


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> SDArchitecture:
    """The `SDArchitecture` of a full ldm state dict, from shapes; named "sd1"/"tiny" when it equals one of those."""
    split = state_dict if isinstance(state_dict, SplitStateDict) else split_state_dict(state_dict)
    unet = infer_unet_config(split.unet) if split.unet else SD1.unet
    vae = infer_vae_config(split.vae) if split.vae else SD1.vae
    text = infer_text_encoder_config(split.text_encoder) if split.text_encoder else SD1.text_encoder
    for known in (SD1, TINY):
        if (unet, vae, text) == (known.unet, known.vae, known.text_encoder):
            return known
    return SDArchitecture(unet, vae, text, name="custom")


@dataclass(eq=False)
class SDModel:
    """The networks of one SD 1.x checkpoint plus what is needed to use them (schedule, identity)."""

    unet: nn.Module | None
    vae: VAE | None
    text_encoder: transformers.CLIPTextModel | None
    architecture: SDArchitecture
    family: ModelFamily = ModelFamily.SD1
    name: str = ""
    sha256: str | None = None
    alphas_cumprod: torch.Tensor = dataclasses.field(default_factory=sd1_alphas_cumprod)

    def _require(self, part: str):
        module = getattr(self, part)
        if module is None:
            raise ValueError(f"model {self.name!r} was loaded without its {part}")
        return module

    def tokenize_chunks(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, k, 77]: each prompt in 75-token chunks wrapped in BOS/EOS, padded with EOS (WebUI layout)."""
        return tokenize_chunks(prompts)

    @property
    def prediction(self) -> Prediction:
        """What the UNet predicts: v for SD 2.x v-prediction checkpoints, else ε."""
        return Prediction.V if self.family is ModelFamily.SD2_V else Prediction.EPS

    def encode_condition(self, prompt: str, *, clip_skip: int = 1, negative: bool = False, sizes=None) -> torch.Tensor:
        """The context of one prompt ([1, 77·k, C]); SD 1.x encodes negative prompts and sizes no differently."""
        return self.encode_prompts([prompt], clip_skip=clip_skip)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], *, clip_skip: int = 1) -> torch.Tensor:
        """Cross-attention context [B, 77·k, C] for prompts; clip skip n = hidden_states[-n] + final LayerNorm.

        Same chunking and clip-skip rule as the WebUI (`FrozenCLIPEmbedderWithCustomWords`); attention
        emphasis syntax such as "(word:1.2)" is not parsed here, and chunks split at exactly 75 tokens.
        """
        text_encoder = self._require("text_encoder")
        layers = text_encoder.config.num_hidden_layers
        if not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip={clip_skip!r} is out of range: must be an integer from 1 to {layers}")
        ids = self.tokenize_chunks(prompts)
        batch, chunks, tokens = ids.shape
        device = next(text_encoder.parameters()).device
        outputs = text_encoder(input_ids=ids.reshape(batch * chunks, tokens).to(device),
                               output_hidden_states=clip_skip > 1)
        if clip_skip == 1:
            hidden = outputs.last_hidden_state
        else:
            hidden = text_encoder.text_model.final_layer_norm(outputs.hidden_states[-clip_skip])
        return hidden.reshape(batch, chunks * tokens, hidden.shape[-1])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]: the posterior mode, or a sample drawn with `generator`."""
        vae = self._require("vae")
        parameter = next(vae.parameters())
        posterior = vae.encode(images.to(device=parameter.device, dtype=parameter.dtype))
        if generator is None:
            latents = posterior.mode()
        else:
            noise = torch.randn(posterior.mean.shape, generator=generator, device=generator.device)
            latents = posterior.mean + posterior.std * noise.to(device=posterior.mean.device,
                                                                 dtype=posterior.mean.dtype)
        return latents * SCALE_FACTOR

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from scaled latents."""
        vae = self._require("vae")
        parameter = next(vae.parameters())
        return vae.decode(latents.to(device=parameter.device, dtype=parameter.dtype) / SCALE_FACTOR)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SDModel:
        """Move every network in place (the schedule keeps fp32); returns self."""
        for part in PARTS:
            module = getattr(self, part)
            if module is not None:
                module.to(device=device, dtype=dtype)
        if device is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self


def _alphas_cumprod_from(other: Mapping[str, torch.Tensor]) -> torch.Tensor:
    stored = other.get("alphas_cumprod")
    if stored is not None and stored.shape == (1000,):
        return stored.float().cpu()
    return sd1_alphas_cumprod()


def load_sd_checkpoint(
    path: str | os.PathLike,
    *,
    parts: Sequence[str] = PARTS,
    architecture: SDArchitecture | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allowed_families: Iterable[ModelFamily] = (ModelFamily.SD1,),
    compute_hash: bool = True,
) -> SDModel:
    """Load the chosen networks of an SD 1.x checkpoint; the family is checked from the header before any tensor."""
    path = pathlib.Path(path)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown checkpoint parts {sorted(unknown)}; choose from {PARTS}")
    shapes = read_state_dict_shapes(path)
    family = require_family(path, shapes, tuple(allowed_families))
    try:
        architecture = architecture or infer_architecture(shapes)
    except StateDictMismatchError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_ENCODER_PREFIX}
    needed = [prefixes[part] for part in parts]
    state_dict = _read_prefixes(path, [*needed, "alphas_cumprod"])
    split = split_state_dict(state_dict)
    builders = {"unet": (build_unet, architecture.unet, split.unet),
                "vae": (build_vae, architecture.vae, split.vae),
                "text_encoder": (build_text_encoder, architecture.text_encoder, split.text_encoder)}
    modules: dict[str, nn.Module | None] = dict.fromkeys(PARTS)
    for part in parts:
        build, config, part_state = builders[part]
        if not part_state:
            raise CheckpointError(f"{path}: has no {part} weights")
        try:
            modules[part] = build(config, part_state, device=device, dtype=dtype)
        except StateDictMismatchError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    if modules["unet"] is not None:
        modules["unet"].eval()
    if modules["vae"] is not None:
        modules["vae"].eval()
    logger.info("loaded %s (%s, %s) parts=%s", path.name, family.value, architecture.name, ",".join(parts))
    return SDModel(
        unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"], architecture=architecture,
        family=family, name=path.stem, sha256=file_sha256(path) if compute_hash else None,
        alphas_cumprod=_alphas_cumprod_from(split.other).to(device),
    )


def _read_prefixes(path: pathlib.Path, prefixes: list[str]) -> dict[str, torch.Tensor]:
    if path.suffix.lower() != ".safetensors":  # a pickle is read whole anyway
        return {key: value for key, value in read_state_dict(path).items()
                if any(key.startswith(prefix) for prefix in prefixes)}
    state_dict: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        state_dict.update({prefix + key: value for key, value in read_state_dict(path, prefix=prefix).items()})
    return state_dict


def _detached_unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone any that alias an earlier one.
    seen: set[tuple[int, int]] = set()
    result = {}
    for key, value in state_dict.items():
        tensor = value.detach().cpu().contiguous()
        marker = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if marker in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(marker)
        result[key] = tensor
    return result


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file through a temp file in the same folder, fsync and `os.replace`."""
    with atomic_path(path) as tmp:
        save_file(_detached_unshared(tensors), str(tmp), metadata=dict(metadata) if metadata else None)


def save_sd_checkpoint(model: SDModel, path: str | os.PathLike) -> None:
    """Save an `SDModel` as an ldm-layout `.safetensors` checkpoint (with `alphas_cumprod`), atomically."""
    from gcfg_core.nulltext import is_nulltext

    if model.unet is not None and is_nulltext(model.unet):
        raise ValueError(f"{model.name}: a null-text UNet is a concept model; save it with save_concept_model")
    split = SplitStateDict(
        unet=model.unet.state_dict() if model.unet is not None else {},
        vae=model.vae.state_dict() if model.vae is not None else {},
        text_encoder=model.text_encoder.state_dict() if model.text_encoder is not None else {},
        other={"alphas_cumprod": model.alphas_cumprod.float()},
    )
    atomic_save_safetensors(join_state_dict(split), path,
                            metadata={"format": "pt", "gcfg.architecture": model.architecture.name})


def _jitter_norms_(module: nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    # HF initialises LayerNorms to (1, 0), which makes every token's final features look alike; jitter them.
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.weight.add_(torch.randn(norm.weight.shape, generator=generator) * scale)
                norm.bias.add_(torch.randn(norm.bias.shape, generator=generator) * scale)


def random_sd_model(architecture: SDArchitecture = TINY, *, seed: int = 0) -> SDModel:
    """An `SDModel` with random (de-zeroed) weights, deterministic for `seed`; needs no files."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = dezero_(build_unet(architecture.unet), seed=seed).eval()
        vae = dezero_(build_vae(architecture.vae), seed=seed + 1).eval()
        text_encoder = build_text_encoder(architecture.text_encoder)
    _jitter_norms_(text_encoder, torch.Generator().manual_seed(seed + 2))
    dezero_(text_encoder, seed=seed + 3)
    return SDModel(unet=unet, vae=vae, text_encoder=text_encoder.eval(), architecture=architecture,
                   family=ModelFamily.SD1, name=f"random-{architecture.name}-{seed}", sha256=None)
