"""Write random-weight Stable Diffusion 1.5 checkpoints (and an offline CLIP tokenizer) for WebUI tests.

Nothing is downloaded. The checkpoints have the SD 1.5 architecture and the original ``ldm`` key layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*`` plus the
DDPM schedule buffers), so AUTOMATIC1111's WebUI loads them like a real SD 1.5 file. They produce noise, not
pictures; they are for exercising code paths (hooks, samplers, a second "prior" UNet) on a CPU.

Files written into ``--out-dir`` (names can be changed, each part can be switched off):

* ``sd15-random-a.safetensors``     full size (1.07 B params, ~2 GiB in fp16), seed ``--seed``.
  The WebUI detects it as ``v1-inference.yaml`` by itself.
* ``sd15-random-prior.safetensors`` the same architecture with another seed (``--prior-seed``), e.g. a prior.
* ``sd15-tiny-random.safetensors`` + ``sd15-tiny-random.yaml``: the same keys and block structure, but UNet
  ``model_channels: 32`` and VAE ``ch: 32`` (the CLIP text encoder stays ViT-L/14 size, because the WebUI builds it
  from ``openai/clip-vit-large-patch14``'s ``config.json``). The WebUI picks up the same-named ``.yaml`` as the
  config override. Fast, but code that assumes SD 1.5's channel counts is not exercised faithfully by it.

With ``--hf-home DIR`` it also writes ``openai/clip-vit-large-patch14``'s tokenizer files (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) and a ``config.json`` of the ViT-L/14 text
tower into the Hugging Face hub cache layout under ``DIR/hub``, derived from the CLIP BPE file that
``open-clip-torch`` ships (``bpe_simple_vocab_16e6.txt.gz``). Then, with ``HF_HOME=DIR HF_HUB_OFFLINE=1``,
``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`` works offline and gives the real token ids
("a photo of a cat" -> 49406 320 1125 539 320 2368 49407). The hub commit hash used is only a label.

Traps that are handled:

* ldm zero-initialises the UNet's output conv, every ``proj_out`` and every ResBlock's last conv (``zero_module``);
  left at zero the UNet returns exactly 0 and cond == uncond. Those modules are re-randomised (``--zero-std``).
* With LayerNorm weight 1 / bias 0 the random CLIP output has mean ~0, and the WebUI's "Original" emphasis divides
  0 by 0 (``NansException``). All LayerNorms are jittered (``--norm-jitter``) and the CLIP
  ``final_layer_norm.bias`` is shifted (``--final-ln-shift``).

Requirements: torch, safetensors, transformers, omegaconf and an importable ``ldm`` package: either the WebUI's
``repositories/stable-diffusion-stability-ai`` (pass it as ``--ldm-path``) or PyPI's ``stable-diffusion-sdkit``.
pytorch_lightning is not needed. Building the full size takes about 4-5 GB of RAM and some seconds per model.
Weights are seeded; the same seed, torch version and thread count give the same file.

Examples::

    # everything, with the WebUI's own ldm and venv
    /work/webui/venv/bin/python tests/webui/make_random_sd15.py --out-dir /work/webui/models \\
        --ldm-path /work/webui/stable-diffusion-webui/repositories/stable-diffusion-stability-ai \\
        --hf-home /work/webui/hf-home

    # only the tiny variant, fp32, another seed
    python tests/webui/make_random_sd15.py --out-dir /tmp/models --no-full --no-prior --tiny-seed 7 --dtype fp32

    # only the offline tokenizer files
    python tests/webui/make_random_sd15.py --hf-home /tmp/hf-home --no-full --no-prior --no-tiny
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

LOG = logging.getLogger("make_random_sd15")

CLIP_REPO_ID = "openai/clip-vit-large-patch14"
# Only a label for the hub cache layout (refs/main -> snapshots/<hash>); nothing checks it against the hub.
CLIP_REPO_COMMIT = "32bd64288804d66eefd0ccbe215aa642df71cc41"
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_CHECK = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])

# The model part of the WebUI's configs/v1-inference.yaml (SD 1.x); the tiny variant's .yaml is derived from it.
V1_INFERENCE: dict = {
    "model": {
        "base_learning_rate": 1.0e-04,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.0120,
            "num_timesteps_cond": 1,
            "log_every_t": 200,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": 64,
            "channels": 4,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema",
            "scale_factor": 0.18215,
            "use_ema": False,
            "scheduler_config": {
                "target": "ldm.lr_scheduler.LambdaLinearScheduler",
                "params": {
                    "warm_up_steps": [10000],
                    "cycle_lengths": [10000000000000],
                    "f_start": [1.0e-6],
                    "f_max": [1.0],
                    "f_min": [1.0],
                },
            },
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 32,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4, 4],
                    "num_heads": 8,
                    "use_spatial_transformer": True,
                    "transformer_depth": 1,
                    "context_dim": 768,
                    "use_checkpoint": False,
                    "legacy": False,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4,
                    "monitor": "val/rec_loss",
                    "ddconfig": {
                        "double_z": True,
                        "z_channels": 4,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        },
    }
}

# Text tower of openai/clip-vit-large-patch14 (the text_config of its config.json).
CLIP_TEXT_CONFIG: dict = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "torch_dtype": "float32",
}

_SPECIAL = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "__type": "AddedToken"}
TOKENIZER_CONFIG: dict = {
    "unk_token": {"content": "<|endoftext|>", **_SPECIAL},
    "bos_token": {"content": "<|startoftext|>", **_SPECIAL},
    "eos_token": {"content": "<|endoftext|>", **_SPECIAL},
    "pad_token": "<|endoftext|>",
    "add_prefix_space": False,
    "errors": "replace",
    "do_lower_case": True,
    "name_or_path": CLIP_REPO_ID,
    "model_max_length": 77,
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
}
SPECIAL_TOKENS_MAP: dict = {
    "bos_token": {"content": "<|startoftext|>", **{k: v for k, v in _SPECIAL.items() if k != "__type"}},
    "eos_token": {"content": "<|endoftext|>", **{k: v for k, v in _SPECIAL.items() if k != "__type"}},
    "unk_token": {"content": "<|endoftext|>", **{k: v for k, v in _SPECIAL.items() if k != "__type"}},
    "pad_token": "<|endoftext|>",
}


# ----------------------------------------------------------------------------------------------------------------
# Offline tokenizer in the hub cache layout
# ----------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> unicode map (simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def find_bpe_file() -> Path:
    """Find open_clip's (or OpenAI clip's) BPE file on sys.path without importing the package."""
    for entry in sys.path:
        for pkg in ("open_clip", "clip"):
            candidate = Path(entry or ".") / pkg / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{BPE_FILE_NAME} not found on sys.path; install open-clip-torch "
        "(pip install --no-deps open-clip-torch==2.20.0) "
        "or pass --bpe-file"
    )


def clip_vocab_and_merges(bpe_file: Path) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's 49 408-token vocab and its 48 894 merges exactly as OpenAI's simple_tokenizer does."""
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != 49408:
        raise ValueError(f"unexpected vocabulary size {len(tokens)} from {bpe_file}")
    return {t: i for i, t in enumerate(tokens)}, merges


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(hf_home: Path, bpe_file: Path) -> Path:
    """Write openai/clip-vit-large-patch14's tokenizer + text config into ``hf_home/hub``; return the snapshot dir."""
    vocab, merges = clip_vocab_and_merges(bpe_file)
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n",
        "config.json": json.dumps(CLIP_TEXT_CONFIG, indent=2) + "\n",
    }
    repo_dir = hf_home / "hub" / ("models--" + CLIP_REPO_ID.replace("/", "--"))
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / CLIP_REPO_COMMIT
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(CLIP_REPO_COMMIT)
    for name, text in files.items():
        data = text.encode("utf-8")
        blob = blobs / _git_blob_sha1(data)
        blob.write_bytes(data)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    LOG.info(
        "wrote %s tokenizer/config files (%d tokens, %d merges) to %s", CLIP_REPO_ID, len(vocab), len(merges), snapshot
    )
    return snapshot


def check_tokenizer(hf_home: Path) -> None:
    """Load the tokenizer from the hub cache offline and compare a known sentence with the real ids."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # huggingface_hub reads these variables when it is imported, so check in a fresh interpreter.
    code = (
        "import json, sys\nfrom transformers import CLIPTokenizer, CLIPTextConfig\n"
        f"t = CLIPTokenizer.from_pretrained({CLIP_REPO_ID!r})\n"
        f"c = CLIPTextConfig.from_pretrained({CLIP_REPO_ID!r})\n"
        f"print(json.dumps([t({TOKENIZER_CHECK[0]!r})['input_ids'], c.hidden_size, c.num_hidden_layers]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"offline tokenizer check failed:\n{out.stderr[-2000:]}")
    ids, hidden, layers = json.loads(out.stdout.strip().splitlines()[-1])
    if ids != TOKENIZER_CHECK[1] or hidden != 768 or layers != 12:
        raise RuntimeError(f"offline tokenizer check: got ids {ids}, hidden {hidden}, layers {layers}")
    LOG.info("offline tokenizer check passed: %r -> %s", TOKENIZER_CHECK[0], " ".join(map(str, ids)))


# ----------------------------------------------------------------------------------------------------------------
# Random-weight models
# ----------------------------------------------------------------------------------------------------------------


def tiny_config(base: dict, model_channels: int = 32, vae_ch: int = 32) -> dict:
    """The v1 config with a narrower UNet and VAE; keys and block structure stay those of SD 1.5."""
    cfg = copy.deepcopy(base)
    params = cfg["model"]["params"]
    params["unet_config"]["params"]["model_channels"] = model_channels
    params["first_stage_config"]["params"]["ddconfig"]["ch"] = vae_ch
    return cfg


def _dezero_(module, std: float, gen) -> int:
    """Re-randomise every sub-module whose weight ldm left at exactly zero (zero_module). Returns tensors changed."""
    import torch

    changed = 0
    with torch.no_grad():
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            if not isinstance(weight, torch.nn.Parameter) or weight.dim() < 2 or weight.any():
                continue
            weight.copy_(torch.randn(weight.shape, generator=gen) * std)
            changed += 1
            bias = getattr(sub, "bias", None)
            if isinstance(bias, torch.nn.Parameter) and not bias.any():
                bias.copy_(torch.randn(bias.shape, generator=gen) * std)
                changed += 1
    return changed


def _jitter_layer_norms_(module, std: float, gen) -> int:
    """weight <- 1 + N(0, std), bias <- N(0, std) for every LayerNorm (a trained model never has exact 1 / 0)."""
    import torch

    count = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.LayerNorm) and sub.elementwise_affine:
                sub.weight.add_(torch.randn(sub.weight.shape, generator=gen) * std)
                sub.bias.add_(torch.randn(sub.bias.shape, generator=gen) * std)
                count += 1
    return count


def _state_dict_to(module, prefix: str, dtype) -> dict:
    out = {}
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[prefix + key] = tensor.contiguous().clone()
    return out


class _AutoencoderKLWeights:
    """Builds ldm's AutoencoderKL parameter set (encoder, decoder, quant convs) without pytorch_lightning."""

    @staticmethod
    def build(params: dict):
        import torch
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        ddconfig, embed_dim = params["ddconfig"], params["embed_dim"]
        vae = torch.nn.Module()
        vae.encoder = Encoder(**ddconfig)
        vae.decoder = Decoder(**ddconfig)
        vae.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        vae.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        return vae


def schedule_buffers(params: dict) -> dict:
    """The DDPM buffers LatentDiffusion.register_schedule() stores in a checkpoint (linear schedule, eps, fp32)."""
    import numpy as np
    import torch

    n = int(params["timesteps"])
    betas = np.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, n, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    acp = np.cumprod(alphas, axis=0)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    values = {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "log_one_minus_alphas_cumprod": np.log(1.0 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def build_random_state_dict(
    cfg: dict, seed: int, dtype, zero_std: float, norm_jitter: float, final_ln_shift: float, check: bool
) -> dict:
    """Build UNet, VAE and CLIP text encoder with seeded random weights; return the ldm-layout state dict."""
    import torch
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    params = cfg["model"]["params"]
    state: dict = {}

    # UNet
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    unet = UNetModel(**params["unet_config"]["params"]).eval()
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    n_dezero = _dezero_(unet, zero_std, gen)
    n_ln = _jitter_layer_norms_(unet, norm_jitter, gen)
    if check:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 4, 8, 8, generator=g)
            ctx = torch.randn(2, 77, params["unet_config"]["params"]["context_dim"], generator=g)
            eps = unet(x, torch.tensor([999, 500]), context=ctx)
        if not torch.isfinite(eps).all() or eps.std() == 0:
            raise RuntimeError("UNet sanity check failed (non-finite or constant output)")
        LOG.info("  UNet 8x8 check: output std %.4f", eps.std().item())
    n_unet = sum(p.numel() for p in unet.parameters())
    state.update(_state_dict_to(unet, "model.diffusion_model.", dtype))
    del unet
    LOG.info(
        "  UNet: %.1f M params, %d zero-initialised tensors re-randomised, %d LayerNorms jittered (%.1f s)",
        n_unet / 1e6,
        n_dezero,
        n_ln,
        time.perf_counter() - t0,
    )

    # VAE (first stage)
    t0 = time.perf_counter()
    torch.manual_seed(seed * 1000 + 2)
    vae = _AutoencoderKLWeights.build(params["first_stage_config"]["params"]).eval()
    gen = torch.Generator().manual_seed(seed * 1000 + 3)
    n_dezero = _dezero_(vae, zero_std, gen)
    n_vae = sum(p.numel() for p in vae.parameters())
    state.update(_state_dict_to(vae, "first_stage_model.", dtype))
    del vae
    LOG.info(
        "  VAE: %.1f M params, %d zero tensors re-randomised (%.1f s)", n_vae / 1e6, n_dezero, time.perf_counter() - t0
    )

    # CLIP ViT-L/14 text encoder (cond stage), HF layout
    t0 = time.perf_counter()
    torch.manual_seed(seed * 1000 + 4)
    clip_cfg = {k: v for k, v in CLIP_TEXT_CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")}
    clip = CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval()
    gen = torch.Generator().manual_seed(seed * 1000 + 5)
    n_ln = _jitter_layer_norms_(clip, norm_jitter, gen)
    with torch.no_grad():
        clip.text_model.final_layer_norm.bias.add_(final_ln_shift)
    if check:
        with torch.no_grad():
            ids = torch.tensor([TOKENIZER_CHECK[1] + [49407] * (77 - len(TOKENIZER_CHECK[1]))])
            z = clip(input_ids=ids).last_hidden_state
        if not torch.isfinite(z).all() or abs(z.mean().item()) < 1e-3:
            raise RuntimeError(f"CLIP sanity check failed: mean {z.mean().item()}")
        LOG.info("  CLIP check: last_hidden_state mean %.4f std %.4f", z.mean().item(), z.std().item())
    n_clip = sum(p.numel() for p in clip.parameters())
    state.update(_state_dict_to(clip, "cond_stage_model.transformer.", dtype))
    del clip
    # transformers >= 4.31 no longer saves position_ids; SD 1.x checkpoints (and transformers 4.30.2) have it.
    state.setdefault(
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        torch.arange(CLIP_TEXT_CONFIG["max_position_embeddings"], dtype=torch.int64).unsqueeze(0),
    )
    LOG.info(
        "  CLIP text: %.1f M params, %d LayerNorms jittered, final_layer_norm.bias +%.3g (%.1f s)",
        n_clip / 1e6,
        n_ln,
        final_ln_shift,
        time.perf_counter() - t0,
    )

    # DDPM schedule buffers, fp32 as ldm registers them (fp16 would round alphas_cumprod)
    state.update(schedule_buffers(params))
    return state


def write_checkpoint(path: Path, cfg: dict, seed: int, args: argparse.Namespace, yaml_config: bool) -> None:
    import torch
    from safetensors.torch import save_file

    if args.skip_existing and path.exists() and (not yaml_config or path.with_suffix(".yaml").exists()):
        LOG.info("%s exists, skipped", path)
        return
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    LOG.info("building %s (seed %d, %s)", path.name, seed, args.dtype)
    t0 = time.perf_counter()
    state = build_random_state_dict(
        cfg, seed, dtype, args.zero_std, args.norm_jitter, args.final_ln_shift, not args.no_check
    )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"non-finite values after conversion to {args.dtype}: {bad[:5]}")
    unet_p = cfg["model"]["params"]["unet_config"]["params"]
    info = {
        "generator": "make_random_sd15.py",
        "random_weights": True,
        "seed": seed,
        "architecture": "sd-v1 (ldm layout)",
        "model_channels": unet_p["model_channels"],
        "vae_ch": cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch"],
    }
    # One metadata entry only: safetensors writes several in a random (hash map) order, which would make the file
    # bytes, and so the WebUI's sha256 model hash, differ from run to run.
    metadata = {"random_sd15": json.dumps(info, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    n_params = sum(v.numel() for v in state.values())
    LOG.info(
        "wrote %s: %d tensors, %.3f B values, %.1f MiB (%.1f s)",
        path,
        len(state),
        n_params / 1e9,
        path.stat().st_size / 2**20,
        time.perf_counter() - t0,
    )
    if yaml_config:
        from omegaconf import OmegaConf

        yaml_path = path.with_suffix(".yaml")
        OmegaConf.save(OmegaConf.create(cfg), yaml_path)
        LOG.info("wrote %s (config override picked up by the WebUI)", yaml_path)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for details and examples.",
    )
    p.add_argument("--out-dir", type=Path, help="where the checkpoints go (needed unless only --hf-home is done)")
    p.add_argument("--full-name", default="sd15-random-a.safetensors", help="file name of the main full-size model")
    p.add_argument("--seed", type=int, default=1, help="seed of the main full-size model (default 1)")
    p.add_argument("--no-full", action="store_true", help="do not write the main full-size model")
    p.add_argument("--prior-name", default="sd15-random-prior.safetensors", help="file name of the second model")
    p.add_argument("--prior-seed", type=int, default=2, help="seed of the second full-size model (default 2)")
    p.add_argument("--no-prior", action="store_true", help="do not write the second full-size model")
    p.add_argument("--tiny-name", default="sd15-tiny-random.safetensors", help="file name of the reduced-width model")
    p.add_argument("--tiny-seed", type=int, default=3, help="seed of the reduced-width model (default 3)")
    p.add_argument("--tiny-model-channels", type=int, default=32, help="UNet model_channels of the tiny model")
    p.add_argument("--tiny-vae-ch", type=int, default=32, help="VAE ch of the tiny model")
    p.add_argument("--no-tiny", action="store_true", help="do not write the reduced-width model and its .yaml")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="dtype of the weights (default fp16)")
    p.add_argument("--zero-std", type=float, default=0.02, help="std for re-randomised zero-initialised weights")
    p.add_argument("--norm-jitter", type=float, default=0.02, help="std of the LayerNorm weight/bias jitter")
    p.add_argument("--final-ln-shift", type=float, default=0.1, help="added to CLIP final_layer_norm.bias")
    p.add_argument("--skip-existing", action="store_true", help="keep files that already exist")
    p.add_argument("--no-check", action="store_true", help="skip the UNet/CLIP forward sanity checks")
    p.add_argument("--hf-home", type=Path, help="also write the offline CLIP tokenizer hub cache into this HF_HOME")
    p.add_argument("--bpe-file", type=Path, help=f"CLIP BPE file (default: open_clip's {BPE_FILE_NAME} on sys.path)")
    p.add_argument(
        "--ldm-path",
        type=Path,
        help="directory that contains the `ldm` package, put first on sys.path "
        "(e.g. <webui>/repositories/stable-diffusion-stability-ai)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    wants_models = not (args.no_full and args.no_prior and args.no_tiny)
    if wants_models and args.out_dir is None:
        p.error("--out-dir is required unless --no-full --no-prior --no-tiny are all given")
    if not wants_models and args.hf_home is None:
        p.error("nothing to do")
    for ch in (args.tiny_model_channels, args.tiny_vae_ch):
        if ch <= 0 or ch % 32:
            p.error("tiny widths must be positive multiples of 32 (GroupNorm with 32 groups)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    t_start = time.perf_counter()

    if args.hf_home is not None:
        bpe = args.bpe_file or find_bpe_file()
        write_hub_cache(args.hf_home.resolve(), bpe)
        check_tokenizer(args.hf_home.resolve())

    if args.no_full and args.no_prior and args.no_tiny:
        return 0

    if args.ldm_path is not None:
        sys.path.insert(0, str(args.ldm_path.resolve()))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import ldm.modules.diffusionmodules.openaimodel as openaimodel
    except ImportError as exc:
        raise SystemExit(
            f"cannot import ldm ({exc}); pass --ldm-path or pip install --no-deps " "stable-diffusion-sdkit"
        ) from exc
    LOG.info(
        "torch %s, ldm from %s, %d threads",
        torch.__version__,
        Path(openaimodel.__file__).parents[3],
        torch.get_num_threads(),
    )

    out_dir: Path = args.out_dir
    jobs = []
    if not args.no_full:
        jobs.append((out_dir / args.full_name, V1_INFERENCE, args.seed, False))
    if not args.no_prior:
        jobs.append((out_dir / args.prior_name, V1_INFERENCE, args.prior_seed, False))
    if not args.no_tiny:
        jobs.append(
            (
                out_dir / args.tiny_name,
                tiny_config(V1_INFERENCE, args.tiny_model_channels, args.tiny_vae_ch),
                args.tiny_seed,
                True,
            )
        )
    seeds = [seed for _, cfg, seed, _ in jobs if cfg is V1_INFERENCE]
    if len(seeds) != len(set(seeds)):
        LOG.warning("the full-size models share a seed, so they are identical")
    for path, cfg, seed, yaml_config in jobs:
        write_checkpoint(path, cfg, seed, args, yaml_config)
    LOG.info("done in %.1f s", time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
