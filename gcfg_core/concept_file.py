"""The concept-model file: a null-text UNet in `.safetensors` with a self-describing header (DESIGN §3).

Tensors: the UNet state dict in the ldm layout (`model.diffusion_model.*`) without attn2/norm2 weights,
plus one `<block>.attn2.vector` [1, 1, C] per transformer block. `__metadata__` holds the format tag
`gcfg.concept-unet/1`, the base model's family (`base_family`: "sd1", or "sdxl" for an SDXL UNet in the sgm
layout, which also stores its fixed pooled text input as `model.diffusion_model.nulltext_pooled` [1, P]), hash
and name, the UNet config, the training config, progress counters and the dataset fingerprint. Readers check the
tag and the family before any tensor; files written before SDXL support carry "sd1" (also the default).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gcfg_core.checkpoint import UNET_PREFIX, CheckpointError, ModelFamily, base_family, read_safetensors_header
from gcfg_core.configs import SDXLUNetConfig, UNetConfig
from gcfg_core.models import atomic_save_safetensors, infer_unet_config
from gcfg_core.nulltext import build_nulltext_unet, is_nulltext, is_sdxl_unet, nulltext_state_dict

logger = logging.getLogger("gcfg.concept_file")

CONCEPT_FORMAT = "gcfg.concept-unet/1"
FORMAT_KEY = "format"
FAMILY_LABELS = {"sd1": "SD 1.x", "sdxl": "SDXL"}  # the base families a concept model can be trained on
_JSON_FIELDS = ("unet_config", "train_config", "extra")
_INT_FIELDS = ("steps", "images_seen")
_SD_CHECKPOINT_PREFIXES = ("first_stage_model.", "cond_stage_model.")
_CROSS_ATTENTION_WEIGHT = ".attn2.to_k.weight"  # present in full SD UNets, absent from null-text ones


class ConceptFileError(ValueError):
    """A concept-model file is missing, corrupt, of another format or for another base family."""


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ConceptMetadata:
    """What a concept-model file says about itself (safetensors `__metadata__`, all values strings on disk)."""

    base_family: str = "sd1"
    base_sha256: str = ""
    base_name: str = ""
    unet_config: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    steps: int = 0
    images_seen: int = 0
    dataset_fingerprint: str = ""
    created: str = field(default_factory=_now_iso)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Store dict fields as their JSON form (tuples become lists) so a saved-and-read copy compares equal.
        for name in _JSON_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ConceptFileError(f"concept metadata field {name!r} must be a dict, got {type(value).__name__}")
            try:
                object.__setattr__(self, name, json.loads(json.dumps(value, sort_keys=True)))
            except (TypeError, ValueError) as exc:
                raise ConceptFileError(f"concept metadata field {name!r} is not JSON-serialisable: {exc}") from exc
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConceptFileError(f"concept metadata field {name!r} must be a non-negative integer, got {value!r}")

    def to_header(self) -> dict[str, str]:
        """The `__metadata__` mapping: the format tag plus every field, dicts JSON-encoded, numbers as text."""
        header = {FORMAT_KEY: CONCEPT_FORMAT}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            header[item.name] = json.dumps(value, sort_keys=True) if item.name in _JSON_FIELDS else str(value)
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None, *, source: str = "concept file") -> ConceptMetadata:
        """Parse and validate a `__metadata__` mapping; `ConceptFileError` names `source` and the problem."""
        header = dict(header or {})
        found = header.get(FORMAT_KEY)
        if found != CONCEPT_FORMAT:
            raise ConceptFileError(f"{source}: not a concept model (format tag {found!r}, expected {CONCEPT_FORMAT!r})")
        values: dict[str, object] = {}
        for item in dataclasses.fields(cls):
            if item.name not in header:
                continue
            raw = header[item.name]
            try:
                if item.name in _JSON_FIELDS:
                    values[item.name] = json.loads(raw)
                    if not isinstance(values[item.name], dict):
                        raise ValueError("not a JSON object")
                elif item.name in _INT_FIELDS:
                    values[item.name] = int(raw)
                else:
                    values[item.name] = str(raw)
            except ValueError as exc:
                raise ConceptFileError(f"{source}: metadata field {item.name!r} is invalid ({raw!r}): {exc}") from exc
        try:
            return cls(**values)
        except ConceptFileError as exc:
            raise ConceptFileError(f"{source}: {exc}") from exc

    @property
    def family_label(self) -> str:
        """The base family as people name it ("SD 1.x", "SDXL")."""
        return FAMILY_LABELS.get(self.base_family, self.base_family)

    def unet_config_object(self) -> UNetConfig | SDXLUNetConfig | None:
        """The stored `UNetConfig` (SD 1.x) or `SDXLUNetConfig` (SDXL), or None when the file has none."""
        if not self.unet_config:
            return None
        kind = SDXLUNetConfig if self.base_family == "sdxl" else UNetConfig
        known = {item.name for item in dataclasses.fields(kind)}
        kwargs = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in self.unet_config.items() if key in known}
        return kind(**kwargs)


def save_concept_model(path: str | os.PathLike, unet: torch.nn.Module, metadata: ConceptMetadata) -> None:
    """Write a null-text UNet and its metadata as a concept-model file, atomically (temp file, fsync, replace)."""
    path = pathlib.Path(path)
    if not is_nulltext(unet):
        raise ConceptFileError(f"{path}: refusing to save a UNet that is not in null-text mode as a concept model")
    state_dict = nulltext_state_dict(unet)
    family = "sdxl" if is_sdxl_unet(unet) else "sd1"
    if metadata.base_family != family:
        raise ConceptFileError(f"{path}: the metadata says base family {metadata.base_family!r} but the UNet is "
                               f"{FAMILY_LABELS[family]} ({family!r})")
    if not metadata.unet_config:
        config = unet.config if family == "sdxl" else infer_unet_config(state_dict)
        metadata = dataclasses.replace(metadata, unet_config=dataclasses.asdict(config))
    tensors = {UNET_PREFIX + key: value for key, value in state_dict.items()}
    atomic_save_safetensors(tensors, path, metadata=metadata.to_header())
    logger.info("saved concept model %s (%d tensors, %d steps)", path, len(tensors), metadata.steps)


def _describe_foreign(header: Mapping[str, object]) -> str:
    keys = [key for key in header if key != "__metadata__"]
    if any(key.startswith(_SD_CHECKPOINT_PREFIXES) or key.endswith(_CROSS_ATTENTION_WEIGHT) for key in keys):
        return "this is a Stable Diffusion checkpoint, not a concept model; pick a file saved by the GCFG trainer"
    return "not a concept model"


def _read_header(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise ConceptFileError(f"{path}: no such concept-model file")
    if path.suffix.lower() != ".safetensors":
        raise ConceptFileError(f"{path}: concept models are .safetensors files, got {path.suffix or 'no suffix'!r}")
    try:
        return read_safetensors_header(path)
    except CheckpointError as exc:
        raise ConceptFileError(str(exc)) from exc


def read_concept_metadata(path: str | os.PathLike) -> ConceptMetadata:
    """The metadata of a concept-model file, from its header only (no tensor is read)."""
    path = pathlib.Path(path)
    header = _read_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get(FORMAT_KEY) != CONCEPT_FORMAT:
        found = metadata.get(FORMAT_KEY)
        raise ConceptFileError(f"{path}: {_describe_foreign(header)} (format tag {found!r}, "
                               f"expected {CONCEPT_FORMAT!r})")
    return ConceptMetadata.from_header(metadata, source=str(path))


CHECKPOINT_FILE_NAME = "concept.safetensors"  # the same name in every checkpoint folder of the trainer


def concept_label(path: str | os.PathLike, metadata: ConceptMetadata) -> str:
    """A name that identifies the concept model in infotext.

    Its file name (how the WebUI's concept list names it, e.g. a published `faces.safetensors`); for the generic
    `concept.safetensors` of a trainer checkpoint, the job name and step (`faces step 2000`), or, without a job
    name in its metadata, the file's short hash as the WebUI gives checkpoints (`concept [0123456789]`).
    """
    from gcfg_core.checkpoint import file_sha256, short_hash

    path = pathlib.Path(path)
    if path.name != CHECKPOINT_FILE_NAME:
        return path.name
    job_name = str(metadata.train_config.get("name") or "").strip()
    if job_name:
        return f"{job_name} step {metadata.steps}"
    return f"{path.stem} [{short_hash(file_sha256(path))}]"


def concept_family_for(main_family: ModelFamily) -> str | None:
    """The concept-model family ("sd1", "sdxl") that guides a main model of `main_family` (None: no family can)."""
    return {ModelFamily.SD1: "sd1", ModelFamily.SDXL: "sdxl"}.get(base_family(main_family))


def require_concept_family(path: str | os.PathLike, metadata: ConceptMetadata, expected_family: str | None, *,
                           main: str = "") -> None:
    """Raise `ConceptFileError` naming both families (and `main`, the main model) unless the concept model was
    trained on `expected_family` (None accepts any)."""
    if expected_family is None or metadata.base_family == expected_family:
        return
    against = f"the main model {main} is" if main else "this slot needs"
    wanted = FAMILY_LABELS.get(expected_family, expected_family)
    raise ConceptFileError(f"{os.fspath(path)}: this concept model was trained on an {metadata.family_label} base "
                           f"({metadata.base_family}), but {against} {wanted} ({expected_family}): a concept model "
                           "guides main models of its own family")


def read_concept_state_dict(
    path: str | os.PathLike,
    *,
    expected_family: str | None = "sd1",
) -> tuple[dict[str, torch.Tensor], ConceptMetadata]:
    """A concept-model file's null-text UNet state dict (prefix stripped, on the CPU) and its metadata; checks the
    format tag and the base family. Hosts that build the UNet with their own classes (Forge) start from this."""
    path = pathlib.Path(path)
    metadata = read_concept_metadata(path)
    require_concept_family(path, metadata, expected_family)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ConceptFileError(f"{path}: file is corrupt: {exc}") from exc
    state_dict = {key[len(UNET_PREFIX):]: value for key, value in tensors.items() if key.startswith(UNET_PREFIX)}
    if not state_dict:
        raise ConceptFileError(f"{path}: holds no UNet tensors ({UNET_PREFIX}*)")
    return state_dict, metadata


def load_concept_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    expected_family: str | None = "sd1",
) -> tuple[torch.nn.Module, ConceptMetadata]:
    """Load a concept-model file as a null-text ldm UNet (eval mode) with its metadata; checks tag and family.

    `expected_family` "sd1" or "sdxl" (the main model's base family), or None to take the file's.
    """
    state_dict, metadata = read_concept_state_dict(path, expected_family=expected_family)
    try:
        config = metadata.unet_config_object()
        if config is None:
            if metadata.base_family == "sdxl":
                from gcfg_core.sdxl_unet import infer_sdxl_unet_config

                config = infer_sdxl_unet_config(state_dict)
            else:
                config = infer_unet_config(state_dict)
        unet = build_nulltext_unet(config, state_dict, device=device, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ConceptFileError(f"{pathlib.Path(path)}: tensors do not form a null-text UNet: {exc}") from exc
    return unet.eval(), metadata
