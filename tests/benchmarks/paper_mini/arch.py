"""The paper-mini model: SD 1.x key layout and block structure at a small width, plus its WebUI config files.

* UNet: ldm `UNetModel`, 64 base channels, channel_mult (1, 1, 2), one residual block per level, a spatial
  transformer (self- and cross-attention, 8 heads as in SD 1.5) at every level, 128-wide context. 8×8 latents.
* VAE: ldm `Encoder`/`Decoder`, 64 base channels, four levels (8× downsampling, as SD's, so a 64×64 image is an
  8×8×4 latent and the WebUI's fixed 8× latent size holds), scale factor 0.18215 (the latents are standardised
  per channel after training so that this factor gives them unit variance).

Why not narrower: ldm normalises with `GroupNorm(32 groups)`. At 32 channels every group is one channel, normalised
over the image, so a layer can no longer carry a channel's absolute level — a flat background's colour — through
the VAE decoder's or the UNet's last normalisation. A 32-wide VAE stalls at an L1 error of about 0.5 (in [-1, 1])
where a 64-wide one (2 channels per group) keeps learning; SD 1.5's narrowest layer has 128 (VAE) and 320 (UNet).
* Text encoder: a Hugging Face `CLIPTextModel` with CLIP's 49 408-token vocabulary and 77 positions, 128 wide,
  2 layers, 2 heads — random and frozen (it is never trained: the UNet learns to read it).

The WebUI builds the text encoder from a Hugging Face config named in the model's `.yaml`
(`cond_stage_config.params.version`, default `openai/clip-vit-large-patch14`). `write_webui_files` writes that
config and CLIP's tokenizer files into a folder beside the checkpoint and a same-named `.yaml` that points at it
by absolute path, so a 128-wide text encoder loads in the real WebUI without any download.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf

from gcfg_core.configs import SDArchitecture, TextEncoderConfig, UNetConfig, VAEConfig
from gcfg_core.models import build_text_encoder

REPO_ROOT = Path(__file__).resolve().parents[3]

PAPER_MINI = SDArchitecture(
    UNetConfig(model_channels=64, context_dim=128, channel_mult=(1, 1, 2), num_res_blocks=1,
               attention_resolutions=(4, 2, 1)),
    VAEConfig(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    TextEncoderConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2),
    name="paper-mini",
)
LATENT_SIZE = 8
FINAL_NORM_SHIFT = 0.1  # keeps the context's mean away from 0 (the WebUI's emphasis rescaling divides by it)


def make_text_encoder(seed: int) -> transformers.CLIPTextModel:
    """The frozen random text encoder: HF init, LayerNorms jittered (a trained CLIP never has exact 1/0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_text_encoder(PAPER_MINI.text_encoder)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.add_(torch.randn(module.weight.shape) * 0.1)
                    module.bias.add_(torch.randn(module.bias.shape) * 0.1)
            model.text_model.final_layer_norm.bias.add_(FINAL_NORM_SHIFT)
    return model.eval().requires_grad_(False)


def _webui_helpers():
    """`tests/webui/make_random_sd15.py`: the v1 inference config and the offline CLIP tokenizer files."""
    folder = str(REPO_ROOT / "tests" / "webui")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import make_random_sd15

    return make_random_sd15


def inference_config(text_encoder_dir: Path) -> dict:
    """The WebUI's v1 inference config with paper-mini's widths and the text encoder read from a local folder."""
    helpers = _webui_helpers()
    cfg = copy.deepcopy(helpers.V1_INFERENCE)
    params = cfg["model"]["params"]
    unet = params["unet_config"]["params"]
    arch = PAPER_MINI.unet
    unet.update(model_channels=arch.model_channels, context_dim=arch.context_dim, channel_mult=list(arch.channel_mult),
                num_res_blocks=arch.num_res_blocks, attention_resolutions=list(arch.attention_resolutions),
                num_heads=arch.num_heads, image_size=LATENT_SIZE)
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    ddconfig.update(ch=PAPER_MINI.vae.ch, ch_mult=list(PAPER_MINI.vae.ch_mult),
                    num_res_blocks=PAPER_MINI.vae.num_res_blocks)
    params["image_size"] = LATENT_SIZE
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                   "params": {"version": str(text_encoder_dir.resolve())}}
    return cfg


def write_text_encoder_dir(folder: Path) -> Path:
    """A Hugging Face model folder (config.json + CLIP tokenizer files) the WebUI's `FrozenCLIPEmbedder` reads."""
    helpers = _webui_helpers()
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = helpers.clip_vocab_and_merges(helpers.find_bpe_file())
    text = PAPER_MINI.text_encoder
    config = dict(helpers.CLIP_TEXT_CONFIG, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                  projection_dim=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
                  num_attention_heads=text.num_attention_heads)
    tokenizer_config = dict(helpers.TOKENIZER_CONFIG, name_or_path=str(folder))
    files = {
        "config.json": json.dumps(config, indent=2) + "\n",
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(helpers.SPECIAL_TOKENS_MAP, indent=2) + "\n",
    }
    for name, content in files.items():
        (folder / name).write_text(content, encoding="utf-8")
    return folder


def write_webui_files(checkpoint: Path, text_encoder_dir: Path) -> Path:
    """Write `<checkpoint>.yaml` (the WebUI's per-checkpoint config override) pointing at `text_encoder_dir`."""
    yaml_path = checkpoint.with_suffix(".yaml")
    OmegaConf.save(OmegaConf.create(inference_config(text_encoder_dir)), yaml_path)
    return yaml_path
