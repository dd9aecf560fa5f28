"""The random SDXL checkpoint writer (tests/webui/make_random_sdxl.py), exercised at the tiny SDXL size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gcfg_core.checkpoint import ModelFamily, detect_family
from gcfg_core.configs import SDXL, SDXL_TINY
from gcfg_core.parameterization import Parameterization, Prediction
from gcfg_core.sdxl import load_sdxl_checkpoint
from gcfg_core.sdxl_unet import instantiate_sdxl_unet

sys.path.insert(0, str(Path(__file__).parent / "webui"))
import make_random_sdxl as writer  # noqa: E402

UNET = "model.diffusion_model."
OPENCLIP = "conditioner.embedders.1.model."


def options(seed: int = 7) -> writer.Options:
    return writer.Options(seed=seed, dtype=torch.float16, zero_std=0.02, norm_jitter=0.02, final_ln_shift=0.1)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("writer") / "tiny.safetensors"
    writer.write_checkpoint(path, SDXL_TINY, options(), v_prediction=True, ztsnr=True, info={"seed": 7})
    return path


def test_file_has_the_sgm_layout_in_fp16_with_markers(tiny_file):
    state = load_file(str(tiny_file))  # safetensors' own reader accepts the streamed file
    unet_keys = {key[len(UNET):] for key in state if key.startswith(UNET)}
    assert unet_keys == set(instantiate_sdxl_unet(SDXL_TINY.unet, meta=True).state_dict())
    assert f"{OPENCLIP}transformer.resblocks.0.attn.in_proj_weight" in state
    assert not any("q_proj" in key for key in state if key.startswith(OPENCLIP))
    assert state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert {value.dtype for key, value in state.items() if key.startswith(UNET)} == {torch.float16}
    assert state["v_pred"].numel() == 0 and state["ztsnr"].numel() == 0
    assert detect_family(state) is ModelFamily.SDXL


def test_zero_init_and_layer_norm_traps_are_handled(tiny_file):
    state = load_file(str(tiny_file))
    weights = {key: value for key, value in state.items() if key.endswith(".weight") and value.dim() > 1}
    assert not [key for key, value in weights.items() if not value.any()]
    assert state[UNET + "out.2.weight"].float().std() == pytest.approx(0.02, rel=0.3)
    norms = [value for key, value in state.items()
             if key.endswith(("transformer_blocks.0.norm1.weight", "ln_1.weight", "layer_norm1.weight"))]
    assert norms and all(not torch.equal(norm, torch.ones_like(norm)) for norm in norms)


def test_file_loads_and_runs_with_its_parameterisation(tiny_file):
    model = load_sdxl_checkpoint(tiny_file, compute_hash=False)
    assert model.architecture == SDXL_TINY and model.parameterization == Parameterization(Prediction.V, True)
    writer.check_checkpoint(tiny_file)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_file, tmp_path):
    again = tmp_path / "again.safetensors"
    writer.write_checkpoint(again, SDXL_TINY, options(), v_prediction=True, ztsnr=True, info={"seed": 7})
    assert again.read_bytes() == tiny_file.read_bytes()
    other = tmp_path / "other.safetensors"
    writer.write_checkpoint(other, SDXL_TINY, options(seed=8), v_prediction=False, ztsnr=False, info={"seed": 8})
    a, b = load_file(str(tiny_file)), load_file(str(other))
    assert "v_pred" not in b and not torch.equal(a[UNET + "input_blocks.4.1.proj_in.weight"],
                                                 b[UNET + "input_blocks.4.1.proj_in.weight"])


def test_streaming_writer_refuses_tensors_out_of_header_order(tmp_path):
    entries = [("a", "F32", (2,)), ("b", "F32", (3,))]
    stream = writer.StreamingSafetensorsWriter(tmp_path / "x.safetensors", entries, {})
    with pytest.raises(RuntimeError, match="header says a"):
        stream.write("b", torch.zeros(3))
    stream.handle.close()


def test_yaml_describes_the_written_architecture():
    _, reduced, _ = writer.architectures()
    config = writer.yaml_config(reduced, openclip_arch="ViT-S-32-alt", v_prediction=True)["model"]["params"]
    network = config["network_config"]["params"]
    assert network["model_channels"] == 64 and network["context_dim"] == 768 + 256
    assert network["adm_in_channels"] == 256 + 6 * 256 and network["transformer_depth"] == [1, 2, 10]
    assert config["conditioner_config"]["params"]["emb_models"][1]["params"]["arch"] == "ViT-S-32-alt"
    assert config["first_stage_config"]["params"]["ddconfig"]["ch"] == 32
    assert config["denoiser_config"]["params"]["scaling_config"]["target"].endswith("VScaling")
    base = writer.yaml_config(SDXL, openclip_arch="ViT-bigG-14", v_prediction=False)["model"]["params"]
    assert base["network_config"]["params"]["context_dim"] == 2048 and base["scale_factor"] == 0.13025
    assert base["network_config"]["params"]["attention_resolutions"] == [4, 2]
    assert base["denoiser_config"]["params"]["scaling_config"]["target"].endswith("EpsScaling")
    tower = writer.openclip_arch_width("ViT-S-32-alt")
    assert (tower["width"], tower["layers"], tower["heads"], tower["embed_dim"]) == (256, 10, 4, 256)
    assert reduced.text_encoder_2.width == tower["width"] and reduced.text_encoder_2.embed_dim == tower["embed_dim"]
