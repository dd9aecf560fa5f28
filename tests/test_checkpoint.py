"""Checkpoint reading: safe loading, family detection, refusal messages, key splitting, hashes."""

from __future__ import annotations

import hashlib
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from gcfg_core.checkpoint import (
    CheckpointError,
    ModelFamily,
    SplitStateDict,
    detect_family,
    file_sha256,
    join_state_dict,
    read_state_dict,
    read_state_dict_shapes,
    require_family,
    short_hash,
    split_state_dict,
)
from gcfg_core.models import load_sd_checkpoint

UNET = "model.diffusion_model."


def fake_unet_keys(*, context_dim: int = 768, in_channels: int = 4, linear_proj: bool = False) -> dict:
    """The few UNet tensors family detection looks at, with real SD shapes and tiny storage."""
    width = 320
    proj_in = torch.zeros(width, width) if linear_proj else torch.zeros(width, width, 1, 1)
    return {
        UNET + "input_blocks.0.0.weight": torch.zeros(width, in_channels, 3, 3),
        UNET + "input_blocks.1.1.proj_in.weight": proj_in,
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(width, context_dim),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }


def test_tiny_checkpoint_is_sd1(tiny_checkpoint):
    assert detect_family(read_state_dict_shapes(tiny_checkpoint)) is ModelFamily.SD1
    assert detect_family(read_state_dict(tiny_checkpoint)) is ModelFamily.SD1


@pytest.mark.parametrize(
    ("state_dict", "family"),
    [
        (fake_unet_keys(), ModelFamily.SD1),
        (fake_unet_keys(in_channels=9), ModelFamily.SD1_INPAINT),
        (fake_unet_keys(in_channels=8), ModelFamily.SD1_INSTRUCT),
        (fake_unet_keys(context_dim=1024, linear_proj=True), ModelFamily.SD2),
        (fake_unet_keys(context_dim=1024), ModelFamily.SD2),
        ({**fake_unet_keys(context_dim=1024, linear_proj=True), "v_pred": torch.zeros(())}, ModelFamily.SD2_V),
        ({**fake_unet_keys(context_dim=2048), "conditioner.embedders.0.transformer.x": torch.zeros(1)},
         ModelFamily.SDXL),
        ({**fake_unet_keys(context_dim=2048), UNET + "label_emb.0.0.weight": torch.zeros(1280, 2816)},
         ModelFamily.SDXL),
        ({"first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, ModelFamily.UNKNOWN),
        ({}, ModelFamily.UNKNOWN),
    ],
    ids=["sd1", "sd1-inpaint", "sd1-instruct", "sd2", "sd2-conv-proj", "sd2-v", "sdxl-conditioner", "sdxl-label-emb",
         "vae-only", "empty"],
)
def test_detect_family(state_dict, family):
    assert detect_family(state_dict) is family


def test_detect_family_on_bare_unet_keys():
    bare = {key[len(UNET):]: value for key, value in fake_unet_keys(in_channels=9).items() if key.startswith(UNET)}
    assert detect_family(bare) is ModelFamily.SD1_INPAINT


def test_family_values_and_labels():
    assert ModelFamily("sd1-inpaint") is ModelFamily.SD1_INPAINT
    assert ModelFamily.SDXL.value == "sdxl"
    assert all(family.label for family in ModelFamily)


def test_require_family_message_names_file_family_and_supported():
    with pytest.raises(CheckpointError) as info:
        require_family("models/v2-1_768.safetensors", fake_unet_keys(context_dim=1024, linear_proj=True))
    message = str(info.value)
    assert "v2-1_768.safetensors" in message
    assert "SD 2.x" in message and "(sd2)" in message
    assert "supported here: SD 1.x" in message
    assert require_family("x", fake_unet_keys(in_channels=9), allowed=[ModelFamily.SD1, ModelFamily.SD1_INPAINT]) \
        is ModelFamily.SD1_INPAINT


def test_loading_an_sdxl_file_is_refused_before_reading_tensors(tmp_path):
    path = tmp_path / "sdxl_base.safetensors"
    save_file({**fake_unet_keys(context_dim=2048), "conditioner.embedders.0.x": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match=r"sdxl_base\.safetensors: is a SDXL checkpoint"):
        load_sd_checkpoint(path)


def test_split_and_join_round_trip(tiny_checkpoint):
    state_dict = read_state_dict(tiny_checkpoint)
    split = split_state_dict(state_dict)
    assert isinstance(split, SplitStateDict)
    assert "input_blocks.0.0.weight" in split.unet
    assert "encoder.conv_in.weight" in split.vae
    assert "text_model.embeddings.token_embedding.weight" in split.text_encoder
    assert set(split.other) == {"alphas_cumprod"}
    assert join_state_dict(split).keys() == state_dict.keys()
    assert sum(map(len, (split.unet, split.vae, split.text_encoder, split.other))) == len(state_dict)


def test_split_maps_the_old_text_encoder_layout():
    weight = torch.ones(3)
    split = split_state_dict({"cond_stage_model.transformer.embeddings.token_embedding.weight": weight,
                              "cond_stage_model.transformer.text_model.final_layer_norm.weight": weight})
    assert set(split.text_encoder) == {"text_model.embeddings.token_embedding.weight",
                                       "text_model.final_layer_norm.weight"}


def test_read_state_dict_prefix_reads_only_those_keys(tiny_checkpoint):
    vae = read_state_dict(tiny_checkpoint, prefix="first_stage_model.")
    assert vae and all(not key.startswith("first_stage_model.") for key in vae)
    assert vae.keys() == split_state_dict(read_state_dict(tiny_checkpoint)).vae.keys()


def test_ckpt_is_read_with_the_safe_loader(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a.weight": torch.arange(4.0)}, "global_step": 7, "epoch": 1}, path)
    assert list(read_state_dict(path)) == ["a.weight"]
    assert torch.equal(read_state_dict(path)["a.weight"], torch.arange(4.0))
    assert read_state_dict(path, prefix="a.").keys() == {"weight"}


class _Payload:
    """A pickle whose unpickling would create a file: the kind of object a safe loader must refuse."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Payload(marker)}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["notes.txt", "missing.safetensors"])
def test_unsupported_or_missing_files(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("hello")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_state_dict(path)


def test_truncated_safetensors_names_the_file(tiny_checkpoint, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: file is truncated"):
        read_state_dict(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors: not a safetensors file"):
        read_state_dict_shapes(garbage)


def test_file_sha256_streams_and_follows_changes(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
    path.write_bytes(b"abcd" * 1000)  # new size (and mtime): the cache must not answer the old digest
    assert file_sha256(path) == hashlib.sha256(b"abcd" * 1000).hexdigest()
    assert short_hash(file_sha256(path)) == hashlib.sha256(b"abcd" * 1000).hexdigest()[:10]
