"""SDXL's OpenCLIP text tower as a Hugging Face `CLIPTextModelWithProjection`, by key mapping.

SDXL checkpoints store the second text encoder in open_clip's layout (`conditioner.embedders.1.model.*`):
`nn.MultiheadAttention` with one packed `in_proj_weight` (q, k, v stacked), `mlp.c_fc`/`mlp.c_proj`,
`positional_embedding` and `text_projection` as bare parameters (used as ``x @ text_projection``). The network is
the same as transformers' CLIP text model with exact GELU, so the weights are renamed, the packed projection is
split in three and the projection matrix transposed. `logit_scale` (used only for image-text scores) is dropped
on reading and written back as open_clip initialises it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import transformers
from torch import Tensor

from gcfg_core.configs import SDXL, SDXL_TINY, OpenCLIPTextConfig
from gcfg_core.models import check_state_dict, load_state_dict_assigned

_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_QKV = ("q_proj", "k_proj", "v_proj")
POSITION_IDS_KEY = "text_model.embeddings.position_ids"
# open_clip's initial logit scale, log(1/0.07); only image-text similarity uses it.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
_IGNORED = ("logit_scale", "attn_mask")


class OpenCLIPLayoutError(ValueError):
    """A state dict is not an open_clip text tower (or not a converted one)."""


def _show(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")


def openclip_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip text-tower keys (prefix stripped) → `CLIPTextModelWithProjection` keys; unknown keys are an error."""
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _IGNORED:
            continue
        if key in _TOP_NAMES:
            converted[_TOP_NAMES[key]] = value
        elif key == "text_projection":
            converted["text_projection.weight"] = value.t().contiguous()
        elif (match := _LAYER.match(key)) is not None:
            layer, name = match.groups()
            target = f"text_model.encoder.layers.{layer}."
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = name.rsplit("_", 1)[1]
                for projection, part in zip(_QKV, value.chunk(3, dim=0), strict=True):
                    converted[f"{target}self_attn.{projection}.{kind}"] = part.contiguous()
            elif name in _LAYER_NAMES:
                converted[target + _LAYER_NAMES[name]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise OpenCLIPLayoutError(f"not an open_clip text tower: unexpected keys {_show(unknown)}")
    return converted


def hf_to_openclip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `openclip_to_hf`, plus `logit_scale` at open_clip's initial value (position ids dropped)."""
    top = {hf: name for name, hf in _TOP_NAMES.items()}
    layer_names = {hf: name for name, hf in _LAYER_NAMES.items()}
    converted: dict[str, Tensor] = {}
    packed: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key == POSITION_IDS_KEY:
            continue
        if key in top:
            converted[top[key]] = value
        elif key == "text_projection.weight":
            converted["text_projection"] = value.t().contiguous()
        elif (match := _HF_LAYER.match(key)) is not None:
            layer, name = match.groups()
            projection, _, kind = name.removeprefix("self_attn.").partition(".")
            if name.startswith("self_attn.") and projection in _QKV:
                packed.setdefault((layer, kind), {})[projection] = value
            elif name in layer_names:
                converted[f"transformer.resblocks.{layer}.{layer_names[name]}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise OpenCLIPLayoutError(f"not a CLIPTextModelWithProjection state dict: unexpected keys {_show(unknown)}")
    for (layer, kind), parts in packed.items():
        if set(parts) != set(_QKV):
            raise OpenCLIPLayoutError(f"layer {layer}: {kind} of q/k/v incomplete ({sorted(parts)})")
        converted[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV])
    if "text_projection" in converted:
        converted["logit_scale"] = torch.tensor(LOGIT_SCALE_INIT, dtype=converted["text_projection"].dtype)
    return converted


_KNOWN_HEADS = {SDXL.text_encoder_2.width: SDXL.text_encoder_2.heads,
                SDXL_TINY.text_encoder_2.width: SDXL_TINY.text_encoder_2.heads}


def infer_openclip_config(state_dict: Mapping[str, Tensor]) -> OpenCLIPTextConfig:
    """An `OpenCLIPTextConfig` from an open_clip text tower's shapes; heads (invisible) by open_clip's 64-wide rule."""
    try:
        vocab_size, width = state_dict["token_embedding.weight"].shape
        context_length = state_dict["positional_embedding"].shape[0]
        mlp_width = state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = state_dict["text_projection"].shape[1]
    except KeyError as exc:
        raise OpenCLIPLayoutError(f"not an open_clip text tower: key {exc.args[0]} is missing") from exc
    layers = 0
    while f"transformer.resblocks.{layers}.ln_1.weight" in state_dict:
        layers += 1
    heads = _KNOWN_HEADS.get(int(width), max(1, int(width) // 64))
    return OpenCLIPTextConfig(width=int(width), layers=layers, heads=heads, mlp_width=int(mlp_width),
                              embed_dim=int(embed_dim), vocab_size=int(vocab_size), context_length=int(context_length))


def build_openclip_text_encoder(
    config: OpenCLIPTextConfig,
    hf_state_dict: Mapping[str, Tensor] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> transformers.CLIPTextModelWithProjection:
    """A `CLIPTextModelWithProjection` for `config`, loaded from converted keys (`openclip_to_hf`) or random."""
    hf_config = transformers.CLIPTextConfig(**config.hf_kwargs())
    if hf_state_dict is None:
        return transformers.CLIPTextModelWithProjection(hf_config).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        model = transformers.CLIPTextModelWithProjection(hf_config)
    expected = model.state_dict()
    state = dict(hf_state_dict)
    if POSITION_IDS_KEY in expected:  # transformers 4.30 keeps it in the state dict, newer versions do not
        state[POSITION_IDS_KEY] = torch.arange(config.context_length).unsqueeze(0)
    check_state_dict("OpenCLIP text encoder", expected, state)
    load_state_dict_assigned(model, state, device, dtype)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # a non-persistent position_ids buffer left by the meta build
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer(name.rsplit(".", 1)[1], torch.arange(config.context_length, device=device)
                                  .unsqueeze(0), persistent=False)
    return model.eval()
