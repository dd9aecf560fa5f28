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


# ----------------------------------------------------------------------------------------------------------------
# SDXL (Stability-AI/generative-models, `configs/inference/sd_xl_base.yaml`)
# ----------------------------------------------------------------------------------------------------------------

SDXL_SCALE_FACTOR = 0.13025  # SDXL latent scaling (sd_xl_base.yaml)
SIZE_EMBED_DIM = 256  # each original-size / crop / target-size number is a 256-d sinusoidal embedding
SIZE_FIELDS = 6  # (height, width) original, (top, left) crop, (height, width) target


@dataclass(frozen=True)
class SDXLUNetConfig:
    """The SDXL UNet (sgm `UNetModel` with `num_classes="sequential"`).

    `transformer_depth[level]` is the number of transformer blocks after each residual block of that level (0 = no
    attention there; SDXL base has none at full resolution), `transformer_depth_middle` the middle block's. Heads
    are `channels // num_head_channels`. `adm_in_channels` is the width of the `vector` input (`label_emb`).
    """

    model_channels: int = 320
    in_channels: int = 4
    out_channels: int = 4
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    num_head_channels: int = 64
    context_dim: int = 2048
    adm_in_channels: int = 2816

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(f"transformer_depth {self.transformer_depth} needs one entry per level of channel_mult "
                             f"{self.channel_mult}")
        if self.transformer_depth_middle < 1:
            raise ValueError(f"transformer_depth_middle must be ≥ 1, got {self.transformer_depth_middle}")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.num_head_channels:
                raise ValueError(f"{self.model_channels * mult} channels are not a multiple of num_head_channels "
                                 f"{self.num_head_channels}")

    @property
    def attention_resolutions(self) -> tuple[int, ...]:
        """Downsampling factors with attention (sgm's `attention_resolutions`)."""
        return tuple(sorted((2**level for level, depth in enumerate(self.transformer_depth) if depth), reverse=True))

    def sgm_kwargs(self) -> dict:
        """`network_config.params` of an sgm yaml for this UNet."""
        return dict(
            adm_in_channels=self.adm_in_channels, num_classes="sequential", use_checkpoint=False,
            in_channels=self.in_channels, out_channels=self.out_channels, model_channels=self.model_channels,
            attention_resolutions=list(self.attention_resolutions), num_res_blocks=self.num_res_blocks,
            channel_mult=list(self.channel_mult), num_head_channels=self.num_head_channels,
            use_spatial_transformer=True, use_linear_in_transformer=True,
            # sgm reads an entry for every level; levels without attention ignore theirs.
            transformer_depth=[max(depth, 1) for depth in self.transformer_depth],
            transformer_depth_middle=self.transformer_depth_middle, context_dim=self.context_dim,
            spatial_transformer_attn_type="softmax-xformers", legacy=False,
        )


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """An open_clip text tower (SDXL's second text encoder is ViT-bigG-14's), run as a Hugging Face
    `CLIPTextModelWithProjection` (exact GELU, LayerNorm ε 1e-5, causal mask, projection of the EOS token)."""

    width: int = 1280
    layers: int = 32
    heads: int = 20
    mlp_width: int = 5120
    embed_dim: int = 1280  # text_projection output: the pooled part of SDXL's vector
    vocab_size: int = 49408
    context_length: int = 77

    def hf_kwargs(self) -> dict:
        return dict(hidden_size=self.width, intermediate_size=self.mlp_width, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, projection_dim=self.embed_dim, vocab_size=self.vocab_size,
                    max_position_embeddings=self.context_length, hidden_act="gelu", layer_norm_eps=1e-5,
                    bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


@dataclass(frozen=True)
class SDXLArchitecture:
    """The four networks of an SDXL base-layout checkpoint; the UNet's input widths must fit the text encoders."""

    unet: SDXLUNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig  # CLIP ViT-L/14 (conditioner.embedders.0)
    text_encoder_2: OpenCLIPTextConfig  # OpenCLIP ViT-bigG-14 (conditioner.embedders.1)
    name: str = "sdxl"

    def __post_init__(self) -> None:
        if self.unet.context_dim != self.context_dim:
            raise ValueError(f"UNet context_dim {self.unet.context_dim} ≠ {self.text_encoder.hidden_size} + "
                             f"{self.text_encoder_2.width} (the two text encoders' widths)")
        if self.unet.adm_in_channels != self.vector_dim:
            raise ValueError(f"UNet adm_in_channels {self.unet.adm_in_channels} ≠ {self.text_encoder_2.embed_dim} + "
                             f"{SIZE_FIELDS}·{SIZE_EMBED_DIM} (pooled text embedding and size embeddings)")

    @property
    def context_dim(self) -> int:
        return self.text_encoder.hidden_size + self.text_encoder_2.width

    @property
    def vector_dim(self) -> int:
        return self.text_encoder_2.embed_dim + SIZE_FIELDS * SIZE_EMBED_DIM


SDXL = SDXLArchitecture(SDXLUNetConfig(), VAEConfig(), TextEncoderConfig(), OpenCLIPTextConfig(), name="sdxl")

# SDXL's key names and block structure (per-level depth, 10-block middle) at tiny widths, for tests and demos.
_TINY_G = OpenCLIPTextConfig(width=32, layers=2, heads=4, mlp_width=64, embed_dim=32)
SDXL_TINY = SDXLArchitecture(
    SDXLUNetConfig(model_channels=32, num_head_channels=8, context_dim=TINY.text_encoder.hidden_size + _TINY_G.width,
                   adm_in_channels=_TINY_G.embed_dim + SIZE_FIELDS * SIZE_EMBED_DIM),
    TINY.vae, TINY.text_encoder, _TINY_G, name="sdxl-tiny",
)

# The refiner's UNet (sd_xl_refiner.yaml): only recognised, to name it in messages.
SDXL_REFINER_UNET = SDXLUNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
                                   transformer_depth_middle=4, context_dim=1280, adm_in_channels=2560)
