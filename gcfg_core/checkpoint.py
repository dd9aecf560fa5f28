"""Reading SD checkpoints safely: state dicts, family and parameterisation detection, part splitting, file hashes.

Key layout is ldm's (CompVis/Stability `v1-inference.yaml`): `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (Hugging Face CLIPTextModel). SDXL files use
sgm's layout: the same UNet and VAE prefixes, `conditioner.embedders.0.transformer.*` (CLIP ViT-L, Hugging Face)
and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG, open_clip).
`.ckpt` files are read only with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import pathlib
import pickle
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from gcfg_core.parameterization import Parameterization, Prediction

logger = logging.getLogger("gcfg.checkpoint")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
HF_TEXT_MODEL_PREFIX = "text_model."

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

_CROSS_ATTN_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_LABEL_EMB_KEY = "label_emb.0.0.weight"
_REFINER_VECTOR_DIM = 2560
_PROJ_IN_KEY = "input_blocks.1.1.proj_in.weight"
_CONV_IN_KEY = "input_blocks.0.0.weight"


class ModelFamily(enum.Enum):
    """Checkpoint families told apart by key names and tensor shapes."""

    SD1 = "sd1"
    SD1_INPAINT = "sd1-inpaint"
    SD1_INSTRUCT = "sd1-instruct-pix2pix"
    SD2 = "sd2"
    SD2_V = "sd2-v"
    SDXL = "sdxl"
    SDXL_INPAINT = "sdxl-inpaint"
    SDXL_REFINER = "sdxl-refiner"
    UNKNOWN = "unknown"

    @property
    def label(self) -> str:
        return _FAMILY_LABELS[self]


_FAMILY_LABELS = {
    ModelFamily.SD1: "SD 1.x",
    ModelFamily.SD1_INPAINT: "SD 1.x inpainting (9-channel UNet)",
    ModelFamily.SD1_INSTRUCT: "SD 1.x InstructPix2Pix (8-channel UNet)",
    ModelFamily.SD2: "SD 2.x",
    ModelFamily.SD2_V: "SD 2.x v-prediction",
    ModelFamily.SDXL: "SDXL",
    ModelFamily.SDXL_INPAINT: "SDXL inpainting (9-channel UNet)",
    ModelFamily.SDXL_REFINER: "SDXL refiner (OpenCLIP-G only, 1280-d context, 2560-d vector)",
    ModelFamily.UNKNOWN: "unknown (not an SD UNet key layout)",
}

# Families whose members share latent space, text conditioning and schedule, so that one can serve as another's
# prior or extra-term model: the variants with more input channels are main models of their base family.
_BASE_FAMILY = {
    ModelFamily.SD1_INPAINT: ModelFamily.SD1, ModelFamily.SD1_INSTRUCT: ModelFamily.SD1,
    ModelFamily.SD2_V: ModelFamily.SD2, ModelFamily.SDXL_INPAINT: ModelFamily.SDXL,
}


def base_family(family: ModelFamily) -> ModelFamily:
    """The family a variant belongs to (SD 1.x inpainting → SD 1.x, SDXL inpainting → SDXL); others are their own."""
    return _BASE_FAMILY.get(family, family)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or is not a supported model; the message names the file."""


def _error(path: str | os.PathLike, problem: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {problem}")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a `.safetensors` file (tensor entries plus `__metadata__`), read without tensors."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _error(path, f"not a safetensors file ({size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8 or header_len > 100_000_000:
            raise _error(path, "not a safetensors file (header length field is out of range)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(path, f"not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise _error(path, "not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise _error(path, f"corrupt safetensors header (entry {name!r} has no data_offsets)")
        if offsets[1] > data_len:
            raise _error(path, f"file is truncated or corrupt (tensor {name!r} ends at byte {offsets[1]} "
                               f"of a {data_len}-byte data section)")
    return header


def read_state_dict_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Meta-device tensors with each tensor's shape and dtype; cheap for `.safetensors` (header only)."""
    path = pathlib.Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header = read_safetensors_header(path)
        return {
            name: torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES.get(entry["dtype"], torch.float32),
                              device="meta")
            for name, entry in header.items() if name != "__metadata__"
        }
    return {name: tensor.to("meta") for name, tensor in read_state_dict(path).items()}


def _unwrap_pickled(path: pathlib.Path, loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise _error(path, f"does not hold a state dict (found {type(loaded).__name__})")
    return {key: value for key, value in loaded.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


def read_state_dict(
    path: str | os.PathLike, *, prefix: str | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or (safely unpickled) `.ckpt`; with `prefix`, only those keys, prefix stripped."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise _error(path, "no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        read_safetensors_header(path)  # clear messages for truncated or foreign files
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                keys = [key for key in handle.keys() if prefix is None or key.startswith(prefix)]
                state_dict = {key: handle.get_tensor(key) for key in keys}
        except (SafetensorError, OSError) as exc:
            raise _error(path, f"cannot read safetensors file: {exc}") from exc
    elif suffix in PICKLE_SUFFIXES:
        try:
            loaded = torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _error(path, "refused: the pickle holds code or objects the safe loader does not allow "
                               f"(torch.load weights_only=True): {exc}") from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise _error(path, f"cannot read checkpoint (truncated or not a torch file): {exc}") from exc
        state_dict = _unwrap_pickled(path, loaded)
        if prefix is not None:
            state_dict = {key: value for key, value in state_dict.items() if key.startswith(prefix)}
    else:
        raise _error(path, f"unsupported file type {suffix!r} (expected .safetensors or .ckpt)")
    if prefix is not None:
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _unet_keys(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if any(key.startswith(UNET_PREFIX) for key in state_dict):
        return {key[len(UNET_PREFIX):]: value for key, value in state_dict.items() if key.startswith(UNET_PREFIX)}
    return state_dict  # a bare UNet state dict


def _sdxl_family(unet: Mapping[str, torch.Tensor], *, refiner: bool) -> ModelFamily:
    if refiner:
        return ModelFamily.SDXL_REFINER
    conv_in = unet.get(_CONV_IN_KEY)
    return ModelFamily.SDXL_INPAINT if conv_in is not None and conv_in.shape[1] == 9 else ModelFamily.SDXL


def detect_family(state_dict: Mapping[str, torch.Tensor]) -> ModelFamily:
    """The model family of a full ldm/sgm state dict (or a bare UNet one), from key names and shapes only.

    SDXL files are told apart by their text encoders as the WebUI does: the base (and its inpainting variant)
    has CLIP-L as `conditioner.embedders.0` and OpenCLIP-G as `conditioner.embedders.1`, the refiner OpenCLIP-G
    as `conditioner.embedders.0`. A bare SDXL UNet is a refiner when its vector input is the refiner's 2560 values.
    """
    unet = _unet_keys(state_dict)
    if any(key.startswith((SDXL_OPENCLIP_PREFIX, SDXL_CLIP_L_PREFIX)) for key in state_dict):
        return _sdxl_family(unet, refiner=False)
    if any(key.startswith(SDXL_REFINER_OPENCLIP_PREFIX) for key in state_dict):
        return _sdxl_family(unet, refiner=True)
    if _LABEL_EMB_KEY in unet:
        return _sdxl_family(unet, refiner=unet[_LABEL_EMB_KEY].shape[1] == _REFINER_VECTOR_DIM)
    if any(key.startswith("conditioner.") for key in state_dict):  # another sgm-layout file
        return _sdxl_family(unet, refiner=False)
    if _CROSS_ATTN_KEY not in unet or _CONV_IN_KEY not in unet:
        return ModelFamily.UNKNOWN
    context_dim = unet[_CROSS_ATTN_KEY].shape[1]
    in_channels = unet[_CONV_IN_KEY].shape[1]
    linear_proj = _PROJ_IN_KEY in unet and unet[_PROJ_IN_KEY].dim() == 2  # SD 2 uses Linear proj_in/out
    if context_dim == 1024 or linear_proj:
        # v-prediction is not visible in the weights; only an explicit marker key tells.
        return ModelFamily.SD2_V if "v_pred" in state_dict else ModelFamily.SD2
    if context_dim == 2048:
        return ModelFamily.SDXL
    return {4: ModelFamily.SD1, 9: ModelFamily.SD1_INPAINT, 8: ModelFamily.SD1_INSTRUCT}.get(
        in_channels, ModelFamily.UNKNOWN
    )


def require_family(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    allowed: Iterable[ModelFamily] = (ModelFamily.SD1,),
) -> ModelFamily:
    """Detect the family and raise `CheckpointError` naming the file, the family found and what is supported."""
    allowed = tuple(allowed)
    family = detect_family(state_dict)
    if family not in allowed:
        supported = ", ".join(item.label for item in allowed)
        raise _error(path, f"is a {family.label} checkpoint ({family.value}); supported here: {supported}")
    return family


def require_same_family(
    reference_path: str | os.PathLike,
    reference_family: ModelFamily,
    path: str | os.PathLike,
    family: ModelFamily,
    *,
    role: str = "prior",
    reference_role: str = "main model",
) -> None:
    """Raise `CheckpointError` naming both files and both families unless they share a base family."""
    if base_family(family) is not base_family(reference_family):
        raise CheckpointError(
            f"the {role} {os.fspath(path)} is a {family.label} checkpoint ({family.value}), but the {reference_role} "
            f"{os.fspath(reference_path)} is {reference_family.label} ({reference_family.value}): the {role} must be "
            f"of the {reference_role}'s family"
        )


# Marker keys as Forge and ComfyUI read them: empty tensors that training tools add to v-prediction checkpoints.
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
_EDM_KEYS = ("edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")
_MODELSPEC_PREDICTION = "modelspec.prediction_type"
_MODELSPEC_NAMES = {"epsilon": Prediction.EPS, "eps": Prediction.EPS, "v": Prediction.V,
                    "v_prediction": Prediction.V, "v-prediction": Prediction.V}
# kohya-ss sd-scripts' training metadata.
_KOHYA_V = "ss_v_parameterization"
_KOHYA_ZTSNR = "ss_zero_terminal_snr"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` strings of a `.safetensors` file ({} for other files or none)."""
    if pathlib.Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    return {str(key): str(value) for key, value in metadata.items()} if isinstance(metadata, dict) else {}


def detect_parameterization(
    path: str | os.PathLike, keys: Iterable[str], metadata: Mapping[str, str] | None = None
) -> tuple[Parameterization | None, str]:
    """What the file says about its prediction type and schedule, and where it says it; (None, reason) if nothing.

    In order: the `v_pred` marker key (with `ztsnr` beside it: zero terminal SNR; `ztsnr` alone is ignored, as
    Forge does), the SAI model spec's `modelspec.prediction_type` ("epsilon" or "v"), kohya's
    `ss_v_parameterization`/`ss_zero_terminal_snr`. EDM-schedule files (Playground v2.5, EDM v-prediction)
    are refused: their σ schedule is not a DDPM one.
    """
    keys = set(keys)
    metadata = metadata or {}
    edm = sorted(keys.intersection(_EDM_KEYS))
    if edm:
        raise _error(path, f"has an EDM noise schedule (keys {', '.join(edm)}), which GCFG does not support")
    if V_PRED_KEY in keys:
        return Parameterization(Prediction.V, ZTSNR_KEY in keys), f"marker keys {V_PRED_KEY}" + (
            f" and {ZTSNR_KEY}" if ZTSNR_KEY in keys else "")
    if ZTSNR_KEY in keys:
        logger.warning("%s: has a %r key but no %r key; ignored, as Forge does", path, ZTSNR_KEY, V_PRED_KEY)
    stated = metadata.get(_MODELSPEC_PREDICTION)
    if stated is not None:
        prediction = _MODELSPEC_NAMES.get(stated.strip().lower())
        if prediction is None:
            logger.warning("%s: unknown %s %r ignored", path, _MODELSPEC_PREDICTION, stated)
        else:
            return Parameterization(prediction), f"metadata {_MODELSPEC_PREDICTION}={stated}"
    if _KOHYA_V in metadata:
        v_pred = metadata[_KOHYA_V].strip().lower() == "true"
        ztsnr = metadata.get(_KOHYA_ZTSNR, "").strip().lower() == "true"
        return (Parameterization(Prediction.V if v_pred else Prediction.EPS, ztsnr),
                f"metadata {_KOHYA_V}={metadata[_KOHYA_V]}")
    return None, "no marker key or metadata"


def resolve_parameterization(
    path: str | os.PathLike,
    keys: Iterable[str],
    metadata: Mapping[str, str] | None = None,
    override: Parameterization | None = None,
) -> Parameterization:
    """The parameterisation to use: `override` when given, else what the file says, else ε (logged)."""
    detected, source = detect_parameterization(path, keys, metadata)
    if override is not None:
        if detected is not None and detected != override:
            logger.warning("%s: %s says %s; using the override %s", path, source, detected.label, override.label)
        return override
    if detected is None:
        logger.info("%s: %s about the parameterisation; assuming eps", path, source)
        return Parameterization()
    logger.info("%s: %s (%s)", path, detected.label, source)
    return detected


@dataclass(frozen=True)
class SplitStateDict:
    """A checkpoint's tensors per network, with the ldm prefixes stripped."""

    unet: dict
    vae: dict
    text_encoder: dict
    other: dict


def _text_encoder_key(key: str) -> str:
    # Early SD 1 checkpoints were saved with a transformers version whose CLIPTextModel had no `text_model` level.
    return key if key.startswith(HF_TEXT_MODEL_PREFIX) else HF_TEXT_MODEL_PREFIX + key


def split_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SplitStateDict:
    """Split a full ldm state dict into UNet, VAE and text-encoder dicts (HF `text_model.*` names) and the rest."""
    unet, vae, text_encoder, other = {}, {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX):]] = value
        elif key.startswith(TEXT_ENCODER_PREFIX):
            text_encoder[_text_encoder_key(key[len(TEXT_ENCODER_PREFIX):])] = value
        else:
            other[key] = value
    return SplitStateDict(unet=unet, vae=vae, text_encoder=text_encoder, other=other)


def join_state_dict(split: SplitStateDict) -> dict[str, torch.Tensor]:
    """Inverse of `split_state_dict` (text-encoder keys are written in the `text_model.*` layout)."""
    joined = dict(split.other)
    joined.update({UNET_PREFIX + key: value for key, value in split.unet.items()})
    joined.update({VAE_PREFIX + key: value for key, value in split.vae.items()})
    joined.update({TEXT_ENCODER_PREFIX + key: value for key, value in split.text_encoder.items()})
    return joined


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Full SHA-256 hex digest of a file, streamed; cached in-process by (path, mtime, size)."""
    path = pathlib.Path(path).resolve()
    stat = path.stat()
    cache_key = (str(path), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASH_CACHE[cache_key] = digest.hexdigest()
    return _HASH_CACHE[cache_key]


def short_hash(sha256: str) -> str:
    """The WebUI's short model hash: the first 10 hex digits of the full SHA-256."""
    return sha256[:10]
