"""SDXL checkpoints: reading and writing the sgm key layout, text encoding, the VAE's latent scale.

A base-layout SDXL file holds (Stability-AI/generative-models, `configs/inference/sd_xl_base.yaml`):

* ``model.diffusion_model.*``: the UNet (`gcfg_core.sdxl_unet.SDXLUNet`);
* ``conditioner.embedders.0.transformer.*``: CLIP ViT-L/14 in the Hugging Face layout;
* ``conditioner.embedders.1.model.*``: OpenCLIP ViT-bigG-14 in open_clip's layout (`gcfg_core.openclip`);
* ``first_stage_model.*``: the KL VAE of SD 1.x's architecture, latents scaled by 0.13025.

Conditioning as the WebUI 1.10 computes it for SDXL (`modules/sd_models_xl.py`, `sd_hijack_clip.py`,
`sd_hijack_open_clip.py`): each prompt in 75-token chunks; per chunk the penultimate hidden state of CLIP-L
(before its final LayerNorm) and of OpenCLIP-G, concatenated to a 2048-d context, the chunks joined along the
tokens; the pooled part is OpenCLIP-G's projected EOS embedding of the first chunk. An all-empty negative prompt
is encoded with the text embeddings forced to zero (``force_zero_embeddings=['txt']``: context and pooled part are
zeros, the size embeddings stay). Prompt emphasis syntax is not parsed (as for SD 1.x in this package).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from gcfg_core.checkpoint import (
    SDXL_CLIP_L_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    V_PRED_KEY,
    VAE_PREFIX,
    ZTSNR_KEY,
    CheckpointError,
    ModelFamily,
    file_sha256,
    read_metadata,
    read_safetensors_header,
    read_state_dict,
    read_state_dict_shapes,
    require_family,
    resolve_parameterization,
)
from gcfg_core.conditioning import SDXLConditioning, SizeConditioning, size_embedding
from gcfg_core.configs import SDXL, SDXL_SCALE_FACTOR, SDXL_TINY, SDXLArchitecture, SDXLUNetConfig, sd1_alphas_cumprod
from gcfg_core.models import (
    POSITION_IDS_KEY,
    VAE,
    StateDictMismatchError,
    _jitter_norms_,
    atomic_save_safetensors,
    build_network,
    build_text_encoder,
    build_vae,
    dezero_,
    infer_text_encoder_config,
    infer_vae_config,
    tokenize_chunks,
)
from gcfg_core.openclip import (
    OpenCLIPLayoutError,
    build_openclip_text_encoder,
    hf_to_openclip,
    infer_openclip_config,
    openclip_to_hf,
)
from gcfg_core.parameterization import EPS, Parameterization, Prediction
from gcfg_core.sdxl_unet import SDXLLayoutError, SDXLUNet, infer_sdxl_unet_config, instantiate_sdxl_unet

logger = logging.getLogger("gcfg.sdxl")

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
OPENCLIP_PAD_TOKEN_ID = 0  # open_clip pads after the EOS token with 0, CLIP ViT-L (Hugging Face) with EOS
_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": SDXL_CLIP_L_PREFIX,
             "text_encoder_2": SDXL_OPENCLIP_PREFIX}


def build_sdxl_unet(
    config: SDXLUNetConfig,
    state_dict: Mapping[str, Tensor] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SDXLUNet:
    """An `SDXLUNet`: loaded from a bare sgm UNet state dict (meta build, no double allocation) or random."""
    return build_network("SDXL UNet", functools.partial(instantiate_sdxl_unet, config), state_dict, device, dtype)


def _split(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    parts: dict[str, dict[str, Tensor]] = {part: {} for part in SDXL_PARTS}
    for key, value in state_dict.items():
        for part, prefix in _PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
                break
    return parts


def infer_sdxl_architecture(state_dict: Mapping[str, Tensor]) -> SDXLArchitecture:
    """The `SDXLArchitecture` of a full sgm-layout state dict, from shapes; named after SDXL/SDXL_TINY if equal."""
    parts = _split(state_dict)
    missing = [part for part in SDXL_PARTS if not parts[part]]
    if missing:
        raise StateDictMismatchError(f"not a complete SDXL base checkpoint: no {', '.join(missing)} weights "
                                     f"(prefixes {', '.join(_PREFIXES[part] for part in missing)})")
    try:
        architecture = SDXLArchitecture(
            infer_sdxl_unet_config(parts["unet"]), infer_vae_config(parts["vae"]),
            infer_text_encoder_config(parts["text_encoder"]), infer_openclip_config(parts["text_encoder_2"]),
            name="custom",
        )
    except (SDXLLayoutError, OpenCLIPLayoutError) as exc:
        raise StateDictMismatchError(str(exc)) from exc
    for known in (SDXL, SDXL_TINY):
        if dataclasses.replace(architecture, name=known.name) == known:
            return known
    return architecture


@dataclass(eq=False)
class SDXLModel:
    """The networks of one SDXL base-layout checkpoint plus its parameterisation, schedule and identity."""

    unet: nn.Module | None
    vae: VAE | None
    text_encoder: transformers.CLIPTextModel | None
    text_encoder_2: transformers.CLIPTextModelWithProjection | None
    architecture: SDXLArchitecture
    family: ModelFamily = ModelFamily.SDXL
    parameterization: Parameterization = EPS
    name: str = ""
    sha256: str | None = None
    # The ᾱ_t the UNet was trained with (SDXL's scaled-linear schedule, rescaled for zero terminal SNR).
    alphas_cumprod: Tensor = dataclasses.field(default_factory=sd1_alphas_cumprod)

    scale_factor = SDXL_SCALE_FACTOR

    @property
    def prediction(self) -> Prediction:
        return self.parameterization.prediction

    def _require(self, part: str):
        module = getattr(self, part)
        if module is None:
            raise ValueError(f"model {self.name!r} was loaded without its {part}")
        return module

    def tokenize_chunks(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids [B, k, 77] for CLIP-L (EOS padding) and for OpenCLIP-G (0 padding after the EOS)."""
        return tokenize_chunks(prompts), tokenize_chunks(prompts, pad_token_id=OPENCLIP_PAD_TOKEN_ID)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], *, clip_l_skip: int | None = None) -> tuple[Tensor, Tensor]:
        """(context [B, 77·k, C_L + C_G], pooled [B, P]) of prompts, as the WebUI encodes them for SDXL.

        `clip_l_skip` None uses CLIP-L's penultimate layer (sgm's ``layer_idx: 11``); an integer n takes
        ``hidden_states[-n]`` instead, which is what the WebUI does with its "Clip skip SDXL" setting on.
        """
        clip_l, clip_g = self._require("text_encoder"), self._require("text_encoder_2")
        layers = clip_l.config.num_hidden_layers
        if clip_l_skip is not None and (isinstance(clip_l_skip, bool) or not isinstance(clip_l_skip, int)
                                        or not 1 <= clip_l_skip <= layers):
            raise ValueError(f"clip_l_skip={clip_l_skip!r} is out of range: must be None or an integer from 1 to "
                             f"{layers}")
        ids_l, ids_g = self.tokenize_chunks(prompts)
        batch, chunks, tokens = ids_l.shape
        device_l, device_g = next(clip_l.parameters()).device, next(clip_g.parameters()).device
        out_l = clip_l(input_ids=ids_l.reshape(batch * chunks, tokens).to(device_l), output_hidden_states=True)
        out_g = clip_g(input_ids=ids_g.reshape(batch * chunks, tokens).to(device_g), output_hidden_states=True)
        hidden_l = out_l.hidden_states[-2 if clip_l_skip is None else -clip_l_skip]
        hidden_g = out_g.hidden_states[-2].to(hidden_l.device)
        context = torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1)
        pooled = out_g.text_embeds.reshape(batch, chunks, -1)[:, 0]
        return context.reshape(batch, chunks * tokens, context.shape[-1]), pooled.to(context.device)

    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        sizes: SizeConditioning | Sequence[SizeConditioning],
        negative: bool = False,
        clip_l_skip: int | None = None,
    ) -> SDXLConditioning:
        """The SDXL conditioning of prompts with per-image size conditioning.

        Rows: the context has one row per prompt, the vector one per image, `max(len(prompts), len(sizes))`
        (one prompt or one size serves every image). `negative`: encode as the WebUI encodes negative prompts,
        so that when every prompt is empty the context and the pooled part are zeros.
        """
        sizes = [sizes] if isinstance(sizes, SizeConditioning) else list(sizes)
        rows = max(len(prompts), len(sizes))
        if not sizes or {len(prompts), len(sizes)} - {1, rows}:
            raise ValueError(f"{len(prompts)} prompts and {len(sizes)} sizes: each must be 1 or the batch size")
        context, pooled = self.encode_text(prompts, clip_l_skip=clip_l_skip)
        if negative and all(prompt == "" for prompt in prompts):
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        embedded = size_embedding(sizes, device=pooled.device).to(pooled.dtype)
        vector = torch.cat([pooled.expand(rows, -1), embedded.expand(rows, -1)], dim=-1)
        return SDXLConditioning(context, vector)

    def encode_condition(self, prompt: str, *, clip_skip: int = 1, negative: bool = False,
                         sizes: SizeConditioning | Sequence[SizeConditioning] | None = None) -> SDXLConditioning:
        """One prompt's conditioning for the images' `sizes`; the CLI's clip skip does not apply to SDXL."""
        if clip_skip != 1:
            raise ValueError(f"clip skip {clip_skip} does not apply to SDXL: its text encoders use fixed penultimate "
                             "layers (the WebUI ignores clip skip on SDXL unless its 'Clip skip SDXL' setting is on)")
        if sizes is None:
            raise ValueError("SDXL conditioning needs the image sizes (original, crop, target)")
        return self.encode_prompts([prompt], sizes=sizes, negative=negative)

    @torch.no_grad()
    def encode_images(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of images in [-1, 1]: the posterior mode, or a sample drawn with `generator`."""
        vae = self._require("vae")
        parameter = next(vae.parameters())
        posterior = vae.encode(images.to(device=parameter.device, dtype=parameter.dtype))
        if generator is None:
            latents = posterior.mode()
        else:
            noise = torch.randn(posterior.mean.shape, generator=generator, device=generator.device)
            noise = noise.to(device=posterior.mean.device, dtype=posterior.mean.dtype)
            latents = posterior.mean + posterior.std * noise
        return latents * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in about [-1, 1] from scaled latents."""
        vae = self._require("vae")
        parameter = next(vae.parameters())
        return vae.decode(latents.to(device=parameter.device, dtype=parameter.dtype) / self.scale_factor)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SDXLModel:
        """Move every network in place (the schedule keeps fp32); returns self."""
        for part in SDXL_PARTS:
            module = getattr(self, part)
            if module is not None:
                module.to(device=device, dtype=dtype)
        if device is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self


def load_sdxl_checkpoint(
    path: str | os.PathLike,
    *,
    parts: Sequence[str] = SDXL_PARTS,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    parameterization: Parameterization | None = None,
    compute_hash: bool = True,
) -> SDXLModel:
    """Load the chosen networks of an SDXL base-layout checkpoint; family and layout are checked from the header.

    `parameterization` overrides what the file's marker keys or metadata say (ε when they say nothing).
    """
    path = pathlib.Path(path)
    unknown = set(parts) - set(SDXL_PARTS)
    if unknown:
        raise ValueError(f"unknown checkpoint parts {sorted(unknown)}; choose from {SDXL_PARTS}")
    shapes = read_state_dict_shapes(path)
    family = require_family(path, shapes, (ModelFamily.SDXL,))
    try:
        architecture = infer_sdxl_architecture(shapes)
    except (StateDictMismatchError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    resolved = resolve_parameterization(path, shapes.keys(), read_metadata(path), parameterization)
    builders = {
        "unet": lambda state: build_sdxl_unet(architecture.unet, state, device=device, dtype=dtype),
        "vae": lambda state: build_vae(architecture.vae, state, device=device, dtype=dtype),
        "text_encoder": lambda state: build_text_encoder(architecture.text_encoder, state, device=device, dtype=dtype),
        "text_encoder_2": lambda state: build_openclip_text_encoder(architecture.text_encoder_2, openclip_to_hf(state),
                                                                    device=device, dtype=dtype),
    }
    modules: dict[str, nn.Module | None] = dict.fromkeys(SDXL_PARTS)
    for part in parts:
        try:
            modules[part] = builders[part](_read_part(path, _PREFIXES[part], device, dtype)).eval()
        except (StateDictMismatchError, OpenCLIPLayoutError) as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    logger.info("loaded %s (%s, %s, %s) parts=%s", path.name, family.value, architecture.name, resolved.label,
                ",".join(parts))
    return SDXLModel(
        unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"],
        text_encoder_2=modules["text_encoder_2"], architecture=architecture, family=family,
        parameterization=resolved, name=path.stem, sha256=file_sha256(path) if compute_hash else None,
        alphas_cumprod=resolved.schedule(sd1_alphas_cumprod()).to(device),
    )


def _read_part(path: pathlib.Path, prefix: str, device, dtype: torch.dtype) -> dict[str, Tensor]:
    """One network's tensors (prefix stripped), each converted to `dtype` as it is read.

    Converting tensor by tensor keeps the peak at the converted network plus one tensor: the fp16 file copy of
    SDXL's UNet (5 GB) is never held beside its fp32 version (10 GB). A pickled `.ckpt` is read whole anyway.
    """

    def convert(tensor: Tensor) -> Tensor:
        return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    if path.suffix.lower() != ".safetensors":
        state = read_state_dict(path, prefix=prefix)
        return {key: convert(state.pop(key)) for key in list(state)}
    read_safetensors_header(path)  # clear messages for truncated or foreign files
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key[len(prefix):]: convert(handle.get_tensor(key)) for key in handle.keys()
                    if key.startswith(prefix)}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from exc


def sdxl_state_dict(model: SDXLModel) -> dict[str, Tensor]:
    """The sgm-layout tensors of a model's networks, with the parameterisation's marker keys."""
    state: dict[str, Tensor] = {}
    if model.unet is not None:
        state.update({UNET_PREFIX + key: value for key, value in model.unet.state_dict().items()})
    if model.vae is not None:
        state.update({VAE_PREFIX + key: value for key, value in model.vae.state_dict().items()})
    if model.text_encoder is not None:
        clip_l = model.text_encoder.state_dict()
        clip_l.setdefault(POSITION_IDS_KEY, torch.arange(model.architecture.text_encoder.max_position_embeddings)
                          .unsqueeze(0))
        state.update({SDXL_CLIP_L_PREFIX + key: value for key, value in clip_l.items()})
    if model.text_encoder_2 is not None:
        state.update({SDXL_OPENCLIP_PREFIX + key: value
                      for key, value in hf_to_openclip(model.text_encoder_2.state_dict()).items()})
    state.update(marker_tensors(model.parameterization))
    return state


def marker_tensors(parameterization: Parameterization) -> dict[str, Tensor]:
    """The empty marker tensors that tell Forge and ComfyUI a checkpoint is v-prediction (and zero terminal SNR)."""
    if parameterization.prediction is not Prediction.V:
        if parameterization.zero_terminal_snr:
            raise ValueError("a zero-terminal-SNR ε model has no marker key that hosts read; it cannot be saved so")
        return {}
    markers = {V_PRED_KEY: torch.tensor([])}
    if parameterization.zero_terminal_snr:
        markers[ZTSNR_KEY] = torch.tensor([])
    return markers


def save_sdxl_checkpoint(model: SDXLModel, path: str | os.PathLike) -> None:
    """Save an `SDXLModel` as an sgm-layout `.safetensors` checkpoint, atomically."""
    atomic_save_safetensors(sdxl_state_dict(model), path,
                            metadata={"format": "pt", "gcfg.architecture": model.architecture.name})


def random_sdxl_model(architecture: SDXLArchitecture = SDXL_TINY, *, seed: int = 0,
                      parameterization: Parameterization = EPS) -> SDXLModel:
    """An `SDXLModel` with random (de-zeroed, LayerNorm-jittered) weights, deterministic for `seed`; no files."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = dezero_(build_sdxl_unet(architecture.unet), seed=seed).eval()
        vae = dezero_(build_vae(architecture.vae), seed=seed + 1).eval()
        clip_l = build_text_encoder(architecture.text_encoder)
        clip_g = build_openclip_text_encoder(architecture.text_encoder_2)
    for offset, encoder in ((2, clip_l), (4, clip_g)):
        _jitter_norms_(encoder, torch.Generator().manual_seed(seed + offset))
        dezero_(encoder, seed=seed + offset + 1)
    return SDXLModel(unet=unet, vae=vae, text_encoder=clip_l.eval(), text_encoder_2=clip_g.eval(),
                     architecture=architecture, parameterization=parameterization,
                     name=f"random-{architecture.name}-{seed}",
                     alphas_cumprod=parameterization.schedule(sd1_alphas_cumprod()))
