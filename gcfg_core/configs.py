"""Architecture descriptions of the SD 1.x parts we build, and the SD 1 noise schedule.

`SD1_*` are the real Stable Diffusion 1.x shapes (the WebUI's `v1-inference.yaml`). `TINY_*` keep
every SD 1 key name and block structure at a fraction of the width, so tests, `--demo` runs and
benchmarks exercise exactly the code paths the full model takes, in milliseconds and with no files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UNetConfig:
    """Keyword arguments of ldm's `UNetModel` (SD 1.x layout)."""

    model_channels: int = 320
    context_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    num_heads: int = 8
    transformer_depth: int = 1
    image_size: int = 32  # unused by ldm at run time; kept for parity with the yaml

    def ldm_kwargs(self) -> dict:
        kwargs = dataclasses.asdict(self)
        kwargs["attention_resolutions"] = list(self.attention_resolutions)
        kwargs["channel_mult"] = list(self.channel_mult)
        kwargs.update(use_spatial_transformer=True, use_checkpoint=False, legacy=False)
        return kwargs


@dataclass(frozen=True)
class VAEConfig:
    """`ddconfig` of ldm's `AutoencoderKL` plus its latent width."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    resolution: int = 256

    def ddconfig(self) -> dict:
        return dict(double_z=True, z_channels=self.z_channels, resolution=self.resolution, in_channels=3,
                    out_ch=3, ch=self.ch, ch_mult=list(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=[], dropout=0.0)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Fields of a Hugging Face `CLIPTextConfig` (OpenAI ViT-L/14 text tower for SD 1.x)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    vocab_size: int = 49408
    max_position_embeddings: int = 77

    def hf_kwargs(self) -> dict:
        return dict(dataclasses.asdict(self), projection_dim=self.hidden_size, hidden_act="quick_gelu",
                    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


@dataclass(frozen=True)
class SDArchitecture:
    """The three networks of an SD 1.x checkpoint."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    name: str = "sd1"


SD1 = SDArchitecture(UNetConfig(), VAEConfig(), TextEncoderConfig(), name="sd1")

# Same key names and block structure as SD1 (the UNet has exactly SD 1.5's 686 keys), tiny widths.
TINY = SDArchitecture(
    UNetConfig(model_channels=32, context_dim=32),
    VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    name="tiny",
)

SCALE_FACTOR = 0.18215  # SD 1.x latent scaling (v1-inference.yaml)


def sd1_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of the SD 1 "scaled linear" schedule; equals ldm's `LatentDiffusion.alphas_cumprod`."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()
