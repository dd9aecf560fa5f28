"""Write random-weight SDXL checkpoints (sgm key layout) and the offline tokenizer files for WebUI and Forge tests.

Nothing is downloaded. The files have SDXL's key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``conditioner.embedders.0.transformer.text_model.*`` for CLIP ViT-L/14, ``conditioner.embedders.1.model.*`` for
OpenCLIP ViT-bigG-14 in open_clip's layout), so AUTOMATIC1111's WebUI, Forge and `gcfg_core` load them like real
SDXL files. They produce noise, not pictures; they are for exercising code paths on a CPU.

Files written into ``--out-dir`` (each can be switched off, names changed):

* ``sdxl-random-base.safetensors``: full size (UNet 2.57 B, OpenCLIP-G 695 M, CLIP-L 123 M, VAE 84 M parameters;
  6.9 GB in fp16), ε-prediction, seed ``--seed``. The WebUI detects it as ``sd_xl_base.yaml`` by itself.
* ``sdxl-random-vpred.safetensors`` (+ ``.yaml``): full size, another seed, with the empty ``v_pred`` and ``ztsnr``
  marker tensors that Forge and ComfyUI read as "v-prediction, zero terminal SNR". A1111 does not read markers: the
  ``.yaml`` beside it is ``sd_xl_base.yaml`` with ``VScaling`` (v-prediction); zero terminal SNR is the WebUI's
  "Noise schedule" setting.
* ``sdxl-reduced-random.safetensors`` + ``.yaml`` (and ``-prior`` / ``-vpred`` variants with other seeds): every
  UNet key of SDXL at a reduced width (``model_channels`` 64, 64-wide heads, transformer depths [0, 2, 10] and 10
  in the middle kept), VAE ``ch`` 32, CLIP-L at full size (the WebUI builds it from ``openai/clip-vit-large-patch14``'s
  ``config.json``), and the OpenCLIP tower of open_clip's ``ViT-S-32-alt`` configuration (width 256, 10 layers,
  projection 256): the WebUI builds that tower from the open_clip architecture *name* in the ``.yaml``
  (``conditioner_config.params.emb_models[1].params.arch``), so any configuration open_clip ships can be named
  there. The UNet's context is then 768 + 256 = 1024 wide and its vector 256 + 6·256 = 1792. The WebUI picks up
  the same-named ``.yaml`` as the config override.
* ``--tiny`` (off by default): SDXL's key names at test widths (`gcfg_core.configs.SDXL_TINY`), no ``.yaml`` (the
  WebUI cannot build a tiny CLIP-L).

With ``--hf-home DIR`` it also writes CLIP ViT-L/14's tokenizer files and text config into the Hugging Face hub
cache layout (`make_random_sd15.write_hub_cache`); with ``HF_HOME=DIR HF_HUB_OFFLINE=1`` the WebUI then finds
them offline. The OpenCLIP tokenizer needs no files: the WebUI and ``gcfg_core`` use the BPE vocabulary that
``open-clip-torch`` ships (``bpe_simple_vocab_16e6.txt.gz``, checked here), with 0 as padding after the EOS token.

Traps that are handled:

* The UNet is built on the meta device and materialised one top-level block at a time (at most ~1.4 GB of fp32
  weights live at once), each written to the file as soon as it is made: the header is computed from the meta
  model first, so nothing is held for the whole file. Peak memory stays under 6 GB for the full size (the fp32
  OpenCLIP-G tower is the largest single piece, 2.8 GB).
* ldm/sgm zero-initialise the UNet's output conv, every ``proj_out`` and every ResBlock's last conv; left at zero the
  UNet returns exactly 0 and cond == uncond. Those weights and biases are drawn from N(0, ``--zero-std``) instead.
* LayerNorms at weight 1 / bias 0 make random text features look alike; all are jittered (``--norm-jitter``) and the
  final LayerNorm biases shifted (``--final-ln-shift``).

Requirements: torch, safetensors, transformers, omegaconf, an importable ``ldm`` (the WebUI's
``repositories/stable-diffusion-stability-ai`` via ``--ldm-path``, or PyPI's ``stable-diffusion-sdkit``) and this
repository's ``gcfg_core`` (found from this file's location). Weights are seeded: the same seed and torch version
give the same file.

Examples::

    # everything, with the WebUI's own ldm and venv
    /work/webui/venv/bin/python tests/webui/make_random_sdxl.py --out-dir /work/webui/models \\
        --ldm-path /work/webui/stable-diffusion-webui/repositories/stable-diffusion-stability-ai \\
        --hf-home /work/webui/hf-home

    # only the reduced-width files
    python tests/webui/make_random_sdxl.py --out-dir /tmp/models --no-full --no-vpred
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
LOG = logging.getLogger("make_random_sdxl")

# The model part of the generative-models repository's configs/inference/sd_xl_base.yaml (SDXL 1.0 base), as data;
# the network, first-stage and OpenCLIP entries are filled in from the architecture written.
SD_XL_BASE: dict = {
    "model": {
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "scale_factor": 0.13025,
            "disable_first_stage_autocast": True,
            "denoiser_config": {
                "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                "params": {
                    "num_idx": 1000,
                    "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
                    "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
                    "discretization_config": {
                        "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
                },
            },
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {}},
            "conditioner_config": {
                "target": "sgm.modules.GeneralConditioner",
                "params": {
                    "emb_models": [
                        {"is_trainable": False, "input_key": "txt",
                         "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                         "params": {"layer": "hidden", "layer_idx": 11}},
                        {"is_trainable": False, "input_key": "txt",
                         "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                         "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                                    "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
                        {"is_trainable": False, "input_key": "original_size_as_tuple",
                         "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}},
                        {"is_trainable": False, "input_key": "crop_coords_top_left",
                         "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}},
                        {"is_trainable": False, "input_key": "target_size_as_tuple",
                         "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}},
                    ]
                },
            },
            "first_stage_config": {
                "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                "params": {
                    "embed_dim": 4,
                    "monitor": "val/rec_loss",
                    "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4, "resolution": 256,
                                 "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                 "attn_resolutions": [], "dropout": 0.0},
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
        },
    }
}
V_SCALING = "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"
REDUCED_OPENCLIP_ARCH = "ViT-S-32-alt"  # open_clip 2.20's text tower: width 256, 4 heads, 10 layers, projection 256
# Names of the modules ldm and sgm zero-initialise (`zero_module`): UNet output conv, ResBlock last conv, proj_out.
_ZERO_INIT = re.compile(r"(^out\.2|\.out_layers\.3|\.proj_out)\.(weight|bias)$")
_SAFETENSORS_DTYPE = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "int64": "I64"}


def architectures():
    """(full, reduced, tiny) `SDXLArchitecture`s; imported late so that --ldm-path can come first on sys.path."""
    from gcfg_core.configs import (
        SDXL,
        SDXL_TINY,
        OpenCLIPTextConfig,
        SDXLArchitecture,
        SDXLUNetConfig,
        TextEncoderConfig,
        VAEConfig,
    )

    reduced_g = OpenCLIPTextConfig(width=256, layers=10, heads=4, mlp_width=1024, embed_dim=256)
    text_l = TextEncoderConfig()
    reduced = SDXLArchitecture(
        SDXLUNetConfig(model_channels=64, context_dim=text_l.hidden_size + reduced_g.width,
                       adm_in_channels=reduced_g.embed_dim + 6 * 256),
        VAEConfig(ch=32), text_l, reduced_g, name="sdxl-reduced")
    return SDXL, reduced, SDXL_TINY


def yaml_config(architecture, *, openclip_arch: str, v_prediction: bool) -> dict:
    """sd_xl_base.yaml with this architecture's UNet, VAE width and OpenCLIP architecture name (and VScaling)."""
    config = copy.deepcopy(SD_XL_BASE)
    params = config["model"]["params"]
    params["network_config"]["params"] = architecture.unet.sgm_kwargs()
    params["first_stage_config"]["params"]["ddconfig"]["ch"] = architecture.vae.ch
    params["first_stage_config"]["params"]["ddconfig"]["ch_mult"] = list(architecture.vae.ch_mult)
    params["conditioner_config"]["params"]["emb_models"][1]["params"]["arch"] = openclip_arch
    if v_prediction:
        params["denoiser_config"]["params"]["scaling_config"]["target"] = V_SCALING
    return config


# ----------------------------------------------------------------------------------------------------------------
# A safetensors file written tensor by tensor
# ----------------------------------------------------------------------------------------------------------------


class StreamingSafetensorsWriter:
    """Writes a `.safetensors` file whose header is known up front, then each tensor in header order.

    Format (huggingface/safetensors): 8-byte little-endian header length, the JSON header (space-padded to a
    multiple of 8), then the tensors' bytes back to back at the header's `data_offsets`.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this writer needs a little-endian machine")
        self.path, self.entries, self.position = path, entries, 0
        header: dict = {"__metadata__": metadata}
        offset = 0
        self.sizes = []
        for name, dtype, shape in entries:
            size = _numel(shape) * {"F16": 2, "BF16": 2, "F32": 4, "I64": 8}[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes.append(size)
            offset += size
        encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self.tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.tmp.open("wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor) -> None:
        expected, dtype, shape = self.entries[self.position]
        if name != expected or tuple(tensor.shape) != tuple(shape) or _dtype_code(tensor) != dtype:
            raise RuntimeError(f"tensor {self.position}: got {name} {tuple(tensor.shape)} {tensor.dtype}, header says "
                               f"{expected} {tuple(shape)} {dtype}")
        data = tensor.detach().contiguous().cpu().numpy()
        if data.nbytes != self.sizes[self.position]:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, header says {self.sizes[self.position]}")
        self.handle.write(memoryview(data).cast("B"))
        self.position += 1

    def close(self) -> None:
        if self.position != len(self.entries):
            raise RuntimeError(f"only {self.position} of {len(self.entries)} tensors were written")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.tmp.replace(self.path)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _dtype_code(tensor) -> str:
    return _SAFETENSORS_DTYPE[str(tensor.dtype).removeprefix("torch.")]


# ----------------------------------------------------------------------------------------------------------------
# Random networks, one chunk at a time
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Options:
    seed: int
    dtype: object  # torch dtype of floating tensors
    zero_std: float
    norm_jitter: float
    final_ln_shift: float


@dataclass
class Chunk:
    """Tensors written together: their (name, shape, dtype) known from the meta model, made by `make`."""

    label: str
    entries: list[tuple[str, str, tuple[int, ...]]]
    make: Callable[[], dict]


def _target_dtype(tensor, options: Options):
    return options.dtype if tensor.is_floating_point() else tensor.dtype


def _entries(state: dict, prefix: str, options: Options) -> list[tuple[str, str, tuple[int, ...]]]:
    import torch

    return [(prefix + key, _SAFETENSORS_DTYPE[str(_target_dtype(value, options)).removeprefix("torch.")],
             tuple(value.shape)) for key, value in state.items() if isinstance(value, torch.Tensor)]


def _cast(state: dict, prefix: str, options: Options) -> dict:
    return {prefix + key: value.detach().to(_target_dtype(value, options)).contiguous() for key, value in state.items()}


def _jitter_layer_norms_(module, std: float, generator) -> int:
    import torch

    count = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.LayerNorm) and sub.elementwise_affine:
                sub.weight.add_(torch.randn(sub.weight.shape, generator=generator) * std)
                sub.bias.add_(torch.randn(sub.bias.shape, generator=generator) * std)
                count += 1
    return count


def _reset_(module) -> None:
    """PyTorch's default initialisation of every layer (what a normal, non-meta construction draws)."""
    for sub in module.modules():
        if callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()


def unet_chunks(config, options: Options, prefix: str = "model.diffusion_model.") -> Iterator[Chunk]:
    """The UNet's top-level blocks in state-dict order, each materialised from the meta build when asked for."""
    import torch

    from gcfg_core.sdxl_unet import instantiate_sdxl_unet

    meta = instantiate_sdxl_unet(config, meta=True)
    names = [name for name, _ in meta.named_children()]
    paths = []
    for name in names:
        child = getattr(meta, name)
        if isinstance(child, torch.nn.ModuleList):
            paths.extend(f"{name}.{index}" for index in range(len(child)))
        else:
            paths.append(name)

    def make(index: int, path: str) -> dict:
        torch.manual_seed(options.seed * 1000 + 100 + index)
        block = copy.deepcopy(meta.get_submodule(path)).to_empty(device="cpu")
        _reset_(block)
        generator = torch.Generator().manual_seed(options.seed * 1000 + 600 + index)
        with torch.no_grad():
            for name, parameter in block.named_parameters():
                if _ZERO_INIT.search(f"{path}.{name}"):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * options.zero_std)
        _jitter_layer_norms_(block, options.norm_jitter, generator)
        return _cast(block.state_dict(), f"{prefix}{path}.", options)

    for index, path in enumerate(paths):
        state = meta.get_submodule(path).state_dict()
        yield Chunk(f"UNet {path}", _entries(state, f"{prefix}{path}.", options),
                    lambda index=index, path=path: make(index, path))


def vae_chunk(config, options: Options) -> Chunk:
    import torch

    from gcfg_core.models import VAE

    with torch.device("meta"):
        meta = VAE(config)

    def make() -> dict:
        torch.manual_seed(options.seed * 1000 + 2)
        return _cast(VAE(config).state_dict(), "first_stage_model.", options)

    return Chunk("VAE", _entries(meta.state_dict(), "first_stage_model.", options), make)


def clip_l_chunk(config, options: Options) -> Chunk:
    import torch
    import transformers

    from gcfg_core.models import POSITION_IDS_KEY

    hf_config = transformers.CLIPTextConfig(**config.hf_kwargs())
    prefix = "conditioner.embedders.0.transformer."
    position_ids = torch.arange(config.max_position_embeddings, dtype=torch.int64).unsqueeze(0)

    def state_of(model) -> dict:
        state = model.state_dict()
        # transformers ≥ 4.31 no longer saves position_ids; SDXL checkpoints (and the WebUI's 4.30.2) have it.
        state[POSITION_IDS_KEY] = position_ids
        return state

    with torch.device("meta"):
        meta = transformers.CLIPTextModel(hf_config)

    def make() -> dict:
        torch.manual_seed(options.seed * 1000 + 4)
        model = transformers.CLIPTextModel(hf_config).eval()
        generator = torch.Generator().manual_seed(options.seed * 1000 + 5)
        _jitter_layer_norms_(model, options.norm_jitter, generator)
        with torch.no_grad():
            model.text_model.final_layer_norm.bias.add_(options.final_ln_shift)
        return _cast(state_of(model), prefix, options)

    return Chunk("CLIP-L", _entries(state_of(meta), prefix, options), make)


def openclip_chunk(config, options: Options) -> Chunk:
    import torch
    import transformers

    from gcfg_core.openclip import hf_to_openclip

    hf_config = transformers.CLIPTextConfig(**config.hf_kwargs())
    prefix = "conditioner.embedders.1.model."
    with torch.device("meta"):
        meta = transformers.CLIPTextModelWithProjection(hf_config)

    def make() -> dict:
        torch.manual_seed(options.seed * 1000 + 6)
        model = transformers.CLIPTextModelWithProjection(hf_config).eval()
        generator = torch.Generator().manual_seed(options.seed * 1000 + 7)
        _jitter_layer_norms_(model, options.norm_jitter, generator)
        with torch.no_grad():
            model.text_model.final_layer_norm.bias.add_(options.final_ln_shift)
        state = hf_to_openclip(model.state_dict())
        del model
        return _cast(state, prefix, options)

    return Chunk("OpenCLIP-G", _entries(hf_to_openclip(meta.state_dict()), prefix, options), make)


def marker_chunk(v_prediction: bool, ztsnr: bool) -> Chunk:
    import torch

    markers = {}
    if v_prediction:
        markers["v_pred"] = torch.tensor([])
        if ztsnr:
            markers["ztsnr"] = torch.tensor([])
    entries = [(name, "F32", (0,)) for name in markers]
    return Chunk("markers", entries, lambda: dict(markers))


def write_checkpoint(path: Path, architecture, options: Options, *, v_prediction: bool, ztsnr: bool,
                     info: dict) -> dict:
    """Write one checkpoint chunk by chunk; returns numbers for the log (tensors, values, seconds, peak RSS)."""
    started = time.perf_counter()
    chunks = [*unet_chunks(architecture.unet, options), vae_chunk(architecture.vae, options),
              clip_l_chunk(architecture.text_encoder, options), openclip_chunk(architecture.text_encoder_2, options),
              marker_chunk(v_prediction, ztsnr)]
    entries = [entry for chunk in chunks for entry in chunk.entries]
    # One metadata entry, serialised with sorted keys: the file bytes (and the WebUI's hash) are reproducible.
    writer = StreamingSafetensorsWriter(path, entries, {"random_sdxl": json.dumps(info, sort_keys=True)})
    values = 0
    try:
        for chunk in chunks:
            tensors = chunk.make()
            for name, _, _ in chunk.entries:
                tensor = tensors.pop(name)
                if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                    raise RuntimeError(f"{name}: non-finite values after conversion")
                writer.write(name, tensor)
                values += tensor.numel()
            if tensors:
                raise RuntimeError(f"{chunk.label}: tensors missing from the header: {sorted(tensors)[:5]}")
            del tensors
        writer.close()
    except BaseException:
        writer.handle.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    peak = peak_rss_gib()
    LOG.info("wrote %s: %d tensors, %.3f B values, %.1f MiB in %.1f s (peak RSS so far %s GiB)", path,
             len(entries), values / 1e9, path.stat().st_size / 2**20, seconds,
             "?" if peak is None else f"{peak:.2f}")
    return {"tensors": len(entries), "values": values, "seconds": seconds, "peak_rss_gib": peak}


def peak_rss_gib() -> float | None:
    """This process's peak resident memory (Linux/macOS `getrusage`); None where it is not available."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def check_checkpoint(path: Path) -> None:
    """Load a (small) written file with gcfg_core and run every network once: finite and not constant."""
    import torch

    from gcfg_core.conditioning import SizeConditioning
    from gcfg_core.sdxl import load_sdxl_checkpoint

    model = load_sdxl_checkpoint(path, compute_hash=False)
    with torch.no_grad():
        cond = model.encode_prompts(["a photo of a cat"], sizes=SizeConditioning.for_image(64, 64))
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = model.unet(x, torch.tensor([500.0]), context=cond.crossattn, y=cond.vector)
        image = model.decode_latents(x)
    for name, tensor in (("context", cond.crossattn), ("vector", cond.vector), ("UNet output", out),
                         ("decoded image", image)):
        if not bool(torch.isfinite(tensor).all()) or float(tensor.std()) == 0.0:
            raise RuntimeError(f"{path.name}: {name} is not finite or constant")
    LOG.info("checked %s (%s): UNet output std %.4f, context std %.4f", path.name, model.parameterization.label,
             float(out.std()), float(cond.crossattn.std()))


def write_yaml(path: Path, config: dict) -> None:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(config), path)
    LOG.info("wrote %s (config override the WebUI picks up)", path)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for details and examples.")
    p.add_argument("--out-dir", type=Path, help="where the checkpoints go (needed unless only --hf-home is done)")
    p.add_argument("--seed", type=int, default=1, help="seed of the full-size base model (default 1); the other files "
                   "use seed+1 (v-pred), seed+2 (reduced), seed+3 (reduced prior), seed+4 (reduced v-pred), seed+5 "
                   "(tiny)")
    for name, default, text in (
        ("full", "sdxl-random-base.safetensors", "the full-size ε model"),
        ("vpred", "sdxl-random-vpred.safetensors", "the full-size v-prediction + ztsnr model and its .yaml"),
        ("reduced", "sdxl-reduced-random.safetensors", "the reduced-width model and its .yaml"),
        ("reduced-prior", "sdxl-reduced-random-prior.safetensors", "a second reduced-width model (another seed)"),
        ("reduced-vpred", "sdxl-reduced-random-vpred.safetensors", "a reduced-width v-prediction + ztsnr model"),
    ):
        p.add_argument(f"--{name}-name", default=default, help=f"file name of {text}")
        p.add_argument(f"--no-{name}", action="store_true", help=f"do not write {text}")
    p.add_argument("--tiny", type=str, default=None, metavar="NAME",
                   help="also write an SDXL_TINY-sized file under this name (no .yaml)")
    p.add_argument("--reduced-openclip-arch", default=REDUCED_OPENCLIP_ARCH,
                   help=f"open_clip architecture of the reduced OpenCLIP tower, named in its .yaml (default "
                        f"{REDUCED_OPENCLIP_ARCH}; 'ViT-bigG-14' keeps SDXL's)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="dtype of the weights (default fp16)")
    p.add_argument("--zero-std", type=float, default=0.02, help="std for re-randomised zero-initialised weights")
    p.add_argument("--norm-jitter", type=float, default=0.02, help="std of the LayerNorm weight/bias jitter")
    p.add_argument("--final-ln-shift", type=float, default=0.1, help="added to both final LayerNorm biases")
    p.add_argument("--skip-existing", action="store_true", help="keep files that already exist")
    p.add_argument("--no-check", action="store_true", help="skip loading the small files back for a forward check")
    p.add_argument("--hf-home", type=Path, help="also write the offline CLIP-L tokenizer hub cache into this HF_HOME")
    p.add_argument("--ldm-path", type=Path, help="directory that contains the `ldm` package, put first on sys.path")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    wants = [not getattr(args, f"no_{name}") for name in ("full", "vpred", "reduced", "reduced_prior", "reduced_vpred")]
    if (any(wants) or args.tiny) and args.out_dir is None:
        p.error("--out-dir is required unless every checkpoint is switched off")
    if not any(wants) and not args.tiny and args.hf_home is None:
        p.error("nothing to do")
    return args


def openclip_arch_width(arch: str) -> dict:
    """The text tower of an open_clip architecture name, read from the config open_clip ships (no import)."""
    for entry in sys.path:
        candidate = Path(entry or ".") / "open_clip" / "model_configs" / f"{arch}.json"
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            if data.get("quick_gelu") or data["text_cfg"].get("hf_model_name"):
                raise ValueError(f"open_clip architecture {arch} has no plain GELU CLIP text tower; choose another")
            return {"embed_dim": data["embed_dim"], **data["text_cfg"]}
    raise FileNotFoundError(f"open_clip model config {arch}.json not found on sys.path (install open-clip-torch)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    if args.ldm_path is not None:
        sys.path.insert(0, str(args.ldm_path.resolve()))
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(HERE))
    from make_random_sd15 import check_tokenizer, find_bpe_file, write_hub_cache

    bpe = find_bpe_file()
    LOG.info("OpenCLIP tokenizer vocabulary: %s (open_clip pads with 0 after EOS)", bpe)
    if args.hf_home is not None:
        write_hub_cache(args.hf_home.resolve(), bpe)
        check_tokenizer(args.hf_home.resolve())
    import torch

    from gcfg_core.configs import OpenCLIPTextConfig, SDXLArchitecture

    if args.threads:
        torch.set_num_threads(args.threads)
    full, reduced, tiny = architectures()
    tower = openclip_arch_width(args.reduced_openclip_arch)
    if tower["width"] != reduced.text_encoder_2.width or tower["layers"] != reduced.text_encoder_2.layers:
        g = OpenCLIPTextConfig(width=tower["width"], layers=tower["layers"], heads=tower["heads"],
                               mlp_width=4 * tower["width"], embed_dim=tower["embed_dim"])
        unet = type(reduced.unet)(**{**reduced.unet.__dict__, "context_dim": reduced.text_encoder.hidden_size
                                     + g.width, "adm_in_channels": g.embed_dim + 6 * 256})
        reduced = SDXLArchitecture(unet, reduced.vae, reduced.text_encoder, g, name="sdxl-reduced")
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out: Path = args.out_dir
    jobs = []  # (path, architecture, seed, v-prediction, yaml arch or None)
    if not args.no_full:
        jobs.append((out / args.full_name, full, args.seed, False, None))
    if not args.no_vpred:
        jobs.append((out / args.vpred_name, full, args.seed + 1, True, "ViT-bigG-14"))
    for flag, name, offset, v_pred in (("reduced", args.reduced_name, 2, False),
                                       ("reduced_prior", args.reduced_prior_name, 3, False),
                                       ("reduced_vpred", args.reduced_vpred_name, 4, True)):
        if not getattr(args, f"no_{flag}"):
            jobs.append((out / name, reduced, args.seed + offset, v_pred, args.reduced_openclip_arch))
    if args.tiny:
        jobs.append((out / args.tiny, tiny, args.seed + 5, False, None))
    for path, architecture, seed, v_prediction, yaml_arch in jobs:
        if args.skip_existing and path.exists():
            LOG.info("%s exists, skipped", path)
            continue
        options = Options(seed, dtype, args.zero_std, args.norm_jitter, args.final_ln_shift)
        info = {"generator": "make_random_sdxl.py", "random_weights": True, "seed": seed,
                "architecture": architecture.name, "model_channels": architecture.unet.model_channels,
                "parameterization": "v-ztsnr" if v_prediction else "eps"}
        LOG.info("building %s (%s, seed %d, %s, %s)", path.name, architecture.name, seed, args.dtype,
                 info["parameterization"])
        write_checkpoint(path, architecture, options, v_prediction=v_prediction, ztsnr=v_prediction, info=info)
        if yaml_arch is not None:
            write_yaml(path.with_suffix(".yaml"), yaml_config(architecture, openclip_arch=yaml_arch,
                                                              v_prediction=v_prediction))
        if not args.no_check and architecture is not full:
            check_checkpoint(path)
    LOG.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
