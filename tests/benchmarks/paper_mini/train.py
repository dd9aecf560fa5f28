"""Training loops of paper-mini's own models: the VAE, and the text-conditioned UNet (base and fine-tunes).

The concept UNet is not trained here: it is trained by this project's trainer (`python -m trainer train`).

Both loops are resumable: every `save_every` steps the weights, the optimizer state and the step go to
`<job>/state.pt` (written to a temporary file and renamed), and every random draw of step `s` comes from a
generator seeded by (seed, s), so a resumed run continues exactly as an uninterrupted one would. One JSON line
per `log_every` steps goes to `<job>/log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gcfg_core.attention import use_sdpa_attention
from gcfg_core.configs import SCALE_FACTOR, sd1_alphas_cumprod
from gcfg_core.fileio import atomic_path
from gcfg_core.models import VAE, build_unet, build_vae
from paper_mini import world
from paper_mini.arch import PAPER_MINI

log = logging.getLogger("gcfg.paper_mini.train")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The one random source of step `step` (stateless across steps, so resuming needs only the step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def save_state(path: Path, state: dict) -> None:
    """`torch.save` through a temporary file and a rename: a kill mid-write leaves the previous state."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _log_line(job: Path, record: dict) -> None:
    with (job / "log.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def lr_at(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then constant (EMA does the averaging)."""
    return peak * min(1.0, (step + 1) / max(1, warmup))


# ----------------------------------------------------------------------------------------------------------------
# VAE


@dataclass(frozen=True)
class VAESettings:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup: int = 50
    kl_weight: float = 1e-6  # per latent value against per-pixel L1 sums, as SD's first-stage config
    object_weight: float = 4.0  # object pixels count this many times (the background is most of every image)
    mse_weight: float = 1.0  # + squared error: large colour errors on small objects pull harder than under L1
    save_every: int = 100
    log_every: int = 25


def _vae_batch(settings: VAESettings, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh open-world scenes for one step, in [-1, 1], and their per-pixel loss weights [B, 1, 64, 64]."""
    rng = np.random.default_rng(settings.seed * 1_000_003 + step)
    scenes = [world.base_scene(rng) for _ in range(settings.batch_size)]
    masks = torch.from_numpy(np.stack([world.object_mask(scene) for scene in scenes])).float().unsqueeze(1)
    return to_tensor(world.render_all(scenes)), 1 + (settings.object_weight - 1) * masks


def cosine_lr(step: int, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from `peak` to `floor · peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(job: Path, settings: VAESettings) -> VAE:
    """Train the VAE on freshly rendered open-world scenes, resumable; returns it in eval mode.

    Trained as a deterministic autoencoder (the decoder sees the posterior mean; L1 plus SD's small KL term on the
    mean), which learns these flat images several times faster than sampling the posterior; `make_deterministic_`
    then gives the posterior a negligible variance, so sampling it (as the trainer's latent cache does) is exact.
    """
    job.mkdir(parents=True, exist_ok=True)
    vae = build_vae(PAPER_MINI.vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    state_path, step = job / "state.pt", 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        log.info("VAE: resuming at step %d", step)
    vae.train()
    started = time.monotonic()
    while step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.learning_rate, settings.warmup, settings.steps)
        images, weights = _vae_batch(settings, step)
        posterior = vae.encode(images)
        error = vae.decode(posterior.mean) - images
        l1 = error.abs().sum(dim=(1, 2, 3)).mean()
        rec = (weights * (error.abs() + settings.mse_weight * error.pow(2))).sum(dim=(1, 2, 3)).mean()
        kl = 0.5 * posterior.mean.pow(2).sum(dim=(1, 2, 3)).mean()
        loss = rec + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % settings.log_every == 0:
            pixels = images[0].numel()
            _log_line(job, {"step": step, "l1_per_value": l1.item() / pixels, "kl": kl.item(),
                            "s_per_step": (time.monotonic() - started) / settings.log_every})
            started = time.monotonic()
        if step % settings.save_every == 0 or step == settings.steps:
            save_state(state_path, {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                    "settings": dataclasses.asdict(settings)})
    return vae.eval()


@dataclass(frozen=True)
class DecoderSettings:
    seed: int = 5
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 5e-4
    warmup: int = 20
    object_weight: float = 4.0
    mse_weight: float = 1.0
    save_every: int = 100
    log_every: int = 25


def train_decoder(job: Path, settings: DecoderSettings, vae: VAE) -> VAE:
    """Go on training the decoder alone, the encoder frozen: the latent space (and all UNet training) is unchanged.

    The decoder is where the VAE's errors are (colours through the narrow GroupNorms), and its training can run
    while the UNets train on latents of the frozen encoder. Resumable like `train_vae`.
    """
    job.mkdir(parents=True, exist_ok=True)
    vae.requires_grad_(False)
    parts = nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})
    parts.requires_grad_(True)
    optimizer = torch.optim.AdamW(parts.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    state_path, step = job / "state.pt", 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        parts.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        log.info("decoder: resuming at step %d", step)
    vae.eval()
    parts.train()
    started = time.monotonic()
    while step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.learning_rate, settings.warmup, settings.steps)
        images, weights = _vae_batch(dataclasses.replace(VAESettings(), seed=settings.seed,
                                                         batch_size=settings.batch_size), step)
        with torch.no_grad():
            latents = vae.encode(images).mean
        error = vae.decode(latents) - images
        l1 = error.abs().sum(dim=(1, 2, 3)).mean()
        loss = (weights * (error.abs() + settings.mse_weight * error.pow(2))).sum(dim=(1, 2, 3)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % settings.log_every == 0:
            _log_line(job, {"step": step, "l1_per_value": l1.item() / images[0].numel(),
                            "s_per_step": (time.monotonic() - started) / settings.log_every})
            started = time.monotonic()
        if step % settings.save_every == 0 or step == settings.steps:
            save_state(state_path, {"decoder": parts.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                    "settings": dataclasses.asdict(settings)})
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def make_deterministic_(vae: VAE, log_variance: float = -30.0) -> VAE:
    """Give the posterior the log-variance `log_variance` everywhere (std ≈ 3e-7): its mean is the latent."""
    channels = vae.quant_conv.out_channels // 2
    vae.quant_conv.weight[channels:] = 0
    vae.quant_conv.bias[channels:] = log_variance
    return vae


@torch.no_grad()
def latent_statistics(vae: VAE, images: np.ndarray, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the posterior means of `images` (uint8 [N, 64, 64, 3])."""
    means = torch.cat([vae.encode(to_tensor(images[i:i + batch_size])).mean
                       for i in range(0, len(images), batch_size)])
    return means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3))


@torch.no_grad()
def standardise_latents_(vae: VAE, mean: torch.Tensor, std: torch.Tensor) -> VAE:
    """Reparametrise in place so that latents become (z − mean)/std · 1/0.18215 per channel, images unchanged.

    The encoder's `quant_conv` (1×1) outputs [mean, logvar]: its mean rows get the affine map (the log-variance,
    set by `make_deterministic_`, stays negligible); the decoder's `post_quant_conv` (1×1) gets the inverse. After
    this, SD's fixed scale factor gives the diffusion model unit-variance latents, as in SD 1.x.
    """
    k = 1.0 / (SCALE_FACTOR * std)  # per channel
    channels = mean.numel()
    quant = vae.quant_conv
    quant.weight[:channels] *= k.reshape(-1, 1, 1, 1)
    quant.bias[:channels] = (quant.bias[:channels] - mean) * k
    post = vae.post_quant_conv
    post.bias += (post.weight[:, :, 0, 0] * mean.reshape(1, -1)).sum(dim=1)
    post.weight /= k.reshape(1, -1, 1, 1)
    return vae


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in about [-1, 1] → uint8 [N, H, W, 3] (the WebUI's and `gcfg_core.pipeline`'s rounding)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode_moments(vae: VAE, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Posterior [mean, std] of unscaled latents, [N, 8, 8, 8] (sampled per step during UNet training)."""
    parts = []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(to_tensor(images[i:i + batch_size]))
        parts.append(torch.cat([posterior.mean, posterior.std], dim=1))
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------------------
# text-conditioned UNet


@dataclass(frozen=True)
class UNetSettings:
    seed: int = 0
    steps: int = 6000
    batch_size: int = 64
    learning_rate: float = 3e-4
    warmup: int = 300
    weight_decay: float = 0.01
    ema_decay: float = 0.0  # 0 = off
    uncond_probability: float = 0.1  # captions replaced by "" (classifier-free guidance training)
    save_every: int = 250
    log_every: int = 50
    snapshot_steps: tuple[int, ...] = ()  # also keep the weights at these steps (e.g. a drift curve)


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: value.detach().clone() for name, value in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                self.shadow[name].lerp_(value, 1 - self.decay)
            else:
                self.shadow[name].copy_(value)


def train_unet(
    job: Path,
    settings: UNetSettings,
    moments: torch.Tensor,
    caption_for: Callable[[int, np.random.Generator], str],
    contexts: dict[str, torch.Tensor],
    init: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Eps-prediction training of the cross-attention UNet on the SD 1 schedule; returns the final (EMA) weights.

    `moments` [N, 8, h, w] holds each image's posterior mean and std (unscaled), `caption_for(index, rng)` gives a
    caption per draw (it must be a key of `contexts`, the encoded captions [77, C]); a draw becomes "" with
    probability `uncond_probability`. `init` is the starting UNet state (None: ldm's initialisation).
    """
    job.mkdir(parents=True, exist_ok=True)
    unet = build_unet(PAPER_MINI.unet)
    if init is not None:
        unet.load_state_dict(init)
    use_sdpa_attention(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    ema = EMA(unet, settings.ema_decay) if settings.ema_decay else None
    state_path, step = job / "state.pt", 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.shadow = state["ema"]
        step = state["step"]
        log.info("%s: resuming at step %d", job.name, step)
    alphas = sd1_alphas_cumprod()
    channels = moments.shape[1] // 2
    unet.train()
    started, losses = time.monotonic(), []
    while step < settings.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.learning_rate, settings.warmup)
        generator = step_generator(settings.seed, step)
        rng = np.random.default_rng(settings.seed * 1_000_003 + step)
        indices = torch.randint(0, len(moments), (settings.batch_size,), generator=generator)
        chosen = moments[indices]
        latents = (chosen[:, :channels] + chosen[:, channels:] * torch.randn(chosen[:, :channels].shape,
                                                                             generator=generator)) * SCALE_FACTOR
        captions = ["" if rng.random() < settings.uncond_probability else caption_for(int(i), rng)
                    for i in indices.tolist()]
        context = torch.stack([contexts[text] for text in captions])
        timesteps = torch.randint(0, 1000, (settings.batch_size,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        alpha = alphas[timesteps].reshape(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        loss = F.mse_loss(unet(noisy, timesteps, context=context), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if ema is not None:
            ema.update(unet)
        step += 1
        losses.append(loss.item())
        if step % settings.log_every == 0:
            _log_line(job, {"step": step, "loss": float(np.mean(losses)),
                            "s_per_step": (time.monotonic() - started) / settings.log_every})
            started, losses = time.monotonic(), []
        weights = ema.shadow if ema is not None else unet.state_dict()
        if step in settings.snapshot_steps:
            save_state(job / f"snapshot-{step:06d}.pt", {k: v.clone() for k, v in weights.items()})
        if step % settings.save_every == 0 or step == settings.steps:
            save_state(state_path, {"unet": unet.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                    "ema": ema.shadow if ema is not None else None,
                                    "settings": dataclasses.asdict(settings)})
    weights = ema.shadow if ema is not None else unet.state_dict()
    return {key: value.clone() for key, value in weights.items()}


def snapshot_weights(job: Path) -> dict[int, Path]:
    """Step → file of the snapshots `train_unet` kept."""
    return {int(path.stem.split("-")[1]): path for path in sorted(job.glob("snapshot-*.pt"))}


def log_records(job: Path) -> list[dict]:
    path = job / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mean_tail(records: Sequence[dict], key: str, count: int = 5) -> float:
    values = [record[key] for record in records[-count:] if key in record]
    return float(np.mean(values)) if values else math.nan
