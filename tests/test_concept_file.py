"""Concept-model files: exact round trip, cheap header reads, and clear refusals of wrong or broken files."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from gcfg_core import concept_file
from gcfg_core.concept_file import (
    CONCEPT_FORMAT,
    ConceptFileError,
    ConceptMetadata,
    load_concept_model,
    read_concept_metadata,
    save_concept_model,
)
from gcfg_core.configs import TINY
from gcfg_core.nulltext import calibrate_nulltext, convert_to_nulltext, is_nulltext, nulltext_state_dict

METADATA = ConceptMetadata(
    base_family="sd1", base_sha256="ab" * 32, base_name="v1-5-pruned-emaonly",
    unet_config=dataclasses.asdict(TINY.unet), train_config={"lr": 1e-5, "batch_size": 32, "flip": True},
    steps=1200, images_seen=38400, dataset_fingerprint="f00d", created="2026-11-21T12:00:00+00:00",
    extra={"note": "faces"},
)


@pytest.fixture(scope="module")
def concept_unet(tiny_model):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vectors = calibrate_nulltext(tiny_model.unet, latents, tiny_model.encode_prompts([""]), seed=0)
    return convert_to_nulltext(copy.deepcopy(tiny_model.unet), vectors)


@pytest.fixture(scope="module")
def concept_path(concept_unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("concepts") / "faces.safetensors"
    save_concept_model(path, concept_unet, METADATA)
    return path


def eps(unet) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return unet(x, torch.tensor([50, 850]))


def test_round_trip_gives_identical_outputs_and_metadata(concept_path, concept_unet):
    unet, metadata = load_concept_model(concept_path)
    assert is_nulltext(unet) and not unet.training
    assert metadata == METADATA
    assert torch.equal(eps(unet), eps(concept_unet))
    saved = nulltext_state_dict(concept_unet)
    assert all(torch.equal(value, saved[key]) for key, value in nulltext_state_dict(unet).items())


def test_saved_file_layout(concept_path):
    header = concept_file.read_safetensors_header(concept_path)
    metadata = header.pop("__metadata__")
    assert metadata["format"] == CONCEPT_FORMAT and metadata["base_family"] == "sd1"
    assert all(isinstance(value, str) for value in metadata.values())
    assert all(key.startswith("model.diffusion_model.") for key in header)
    assert len([key for key in header if key.endswith(".attn2.vector")]) == 16
    assert not [key for key in header if ".attn2.to_" in key or ".norm2." in key]
    assert [entry.name for entry in concept_path.parent.iterdir()] == [concept_path.name]  # no temp file left


def test_metadata_header_round_trip():
    header = METADATA.to_header()
    assert header["format"] == CONCEPT_FORMAT
    assert json.loads(header["train_config"]) == METADATA.train_config and header["steps"] == "1200"
    assert ConceptMetadata.from_header(header) == METADATA
    assert METADATA.unet_config_object() == TINY.unet
    assert ConceptMetadata().created  # defaults to now


@pytest.mark.parametrize(
    ("field", "value"), [("steps", "many"), ("steps", "-3"), ("train_config", "[1, 2]"), ("extra", "{not json")]
)
def test_invalid_metadata_fields(field, value):
    header = dict(METADATA.to_header(), **{field: value})
    with pytest.raises(ConceptFileError, match=rf"x\.safetensors: .*metadata field '{field}'"):
        ConceptMetadata.from_header(header, source="x.safetensors")


def test_metadata_is_read_from_the_header_only(concept_path, monkeypatch):
    def no_tensors(*_args, **_kwargs):
        raise AssertionError("tensors were read")

    monkeypatch.setattr(concept_file, "load_file", no_tensors)
    assert read_concept_metadata(concept_path) == METADATA


def test_unet_config_is_inferred_when_metadata_has_none(concept_unet, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_concept_model(path, concept_unet, ConceptMetadata())
    assert read_concept_metadata(path).unet_config["model_channels"] == 32
    unet, _ = load_concept_model(path)
    assert torch.equal(eps(unet), eps(concept_unet))


def test_saving_a_normal_unet_is_refused(tiny_model, tmp_path):
    with pytest.raises(ConceptFileError, match="not in null-text mode"):
        save_concept_model(tmp_path / "x.safetensors", tiny_model.unet, METADATA)
    assert not list(tmp_path.iterdir())


def _write_with_metadata(path, concept_path, **changes):
    header = read_concept_metadata(concept_path).to_header()
    header.update(changes)
    tensors = concept_file.load_file(str(concept_path))
    save_file(tensors, str(path), metadata=header)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator()
                                   .manual_seed(0)).numpy().tobytes())
    with pytest.raises(ConceptFileError, match=r"noise\.safetensors: not a safetensors file"):
        load_concept_model(path)


def test_truncated_file(concept_path, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(concept_path.read_bytes()[:-1000])
    with pytest.raises(ConceptFileError, match=r"cut\.safetensors: file is truncated or corrupt"):
        load_concept_model(path)


def test_sd_checkpoint_passed_as_concept(tiny_checkpoint):
    with pytest.raises(ConceptFileError, match=r"tiny-sd1\.safetensors: this is a Stable Diffusion checkpoint, not a "
                                               r"concept model"):
        load_concept_model(tiny_checkpoint)


def test_wrong_format_tag(concept_path, tmp_path):
    path = tmp_path / "future.safetensors"
    _write_with_metadata(path, concept_path, format="gcfg.concept-unet/2")
    with pytest.raises(ConceptFileError, match=r"future\.safetensors: not a concept model \(format tag "
                                               r"'gcfg\.concept-unet/2', expected 'gcfg\.concept-unet/1'\)"):
        read_concept_metadata(path)


def test_wrong_family(concept_path, tmp_path):
    path = tmp_path / "xl.safetensors"
    _write_with_metadata(path, concept_path, base_family="sdxl")
    with pytest.raises(ConceptFileError, match=r"xl\.safetensors: this concept model was trained on an SDXL base "
                                               r"\(sdxl\), but this slot needs SD 1\.x \(sd1\)"):
        load_concept_model(path)
    # Taken at its word, the file's SD 1.x tensors do not form the SDXL UNet its metadata names.
    with pytest.raises(ConceptFileError, match=r"xl\.safetensors: tensors do not form a null-text UNet"):
        load_concept_model(path, expected_family=None)
    unet, metadata = load_concept_model(concept_path, expected_family=None)
    assert metadata.base_family == "sd1" and is_nulltext(unet)


def test_missing_keys(concept_path, tmp_path):
    path = tmp_path / "partial.safetensors"
    tensors = concept_file.load_file(str(concept_path))
    del tensors["model.diffusion_model.out.2.weight"]
    save_file(tensors, str(path), metadata=read_concept_metadata(concept_path).to_header())
    with pytest.raises(ConceptFileError, match=r"partial\.safetensors: tensors do not form a null-text UNet: .*"
                                               r"missing keys: out\.2\.weight"):
        load_concept_model(path)


@pytest.mark.parametrize("name", ["absent.safetensors", "model.ckpt"])
def test_not_a_file_or_not_safetensors(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".ckpt"):
        path.write_bytes(b"x")
    with pytest.raises(ConceptFileError, match=name.replace(".", r"\.")):
        load_concept_model(path)
