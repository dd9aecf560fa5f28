"""Training throughput of the trainer against the diffusers `train_text_to_image` recipe, on the same model and batch.

Reference loop (written here, the recipe's per-step work): decode + resize the images from disk, VAE-encode them
(posterior sample), CLIP-encode the (empty) captions, UNet with cross-attention in fp32 (ldm's own attention),
MSE on eps, `torch.optim.AdamW` (default foreach). Ours: `trainer.loop.train` on a real job folder (latent cache,
null-text UNet without cross-attention, bf16 autocast, SDPA, fused AdamW), timed from its per-step events after
warm-up; the one-time cache build is reported apart.

The model keeps SD 1.5's block structure and its VAE-encode : UNet-train FLOP ratio (0.46, perf-anchors.md §0) at
a quarter of the width (UNet 160 channels, VAE 64, text 384), at 128 px, so it runs on a CPU in under a minute.
Also: achieved UNet FLOP rate (FlopCounterMode, fwd+bwd) against a bf16/fp32 matmul peak measured in this run,
and the process's peak RSS after our run. The last line printed is one JSON object.

    python tests/benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from gcfg_core.configs import SD1, SDArchitecture, TextEncoderConfig, UNetConfig, VAEConfig  # noqa: E402
from gcfg_core.models import random_sd_model, save_sd_checkpoint  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import load_image, scan_dataset  # noqa: E402
from trainer.jobfolder import JobFolder  # noqa: E402
from trainer.loop import train  # noqa: E402

BENCH = SDArchitecture(
    UNetConfig(model_channels=160, context_dim=384),
    VAEConfig(ch=64, ch_mult=SD1.vae.ch_mult, num_res_blocks=SD1.vae.num_res_blocks),
    TextEncoderConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    name="bench-quarter-width",
)
SD15_TRAIN_FLOPS_512 = 2.407e12  # UNet fwd+bwd per 512-px image (perf-anchors.md §0)
MLPERF_H100_IMAGES_PER_S = 127.5  # MLPerf v4.0 NeMo, per H100 (perf-anchors.md §4)
H100_DENSE_BF16_FLOPS = 989.4e12


def make_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def matmul_peak_flops(seconds: float = 2.0) -> float:
    """Best of bf16 and fp32 square-matmul throughput on this machine, now."""
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            a @ b
            count += 1
        best = max(best, 2 * 1024**3 * count / (time.perf_counter() - start))
    return best


def unet_train_flops(unet: torch.nn.Module, latent: int, context: torch.Tensor | None) -> float:
    """FLOPs of one fwd+bwd of `unet` on one latent (matmul/conv only, as FlopCounterMode counts)."""
    x = torch.randn(1, 4, latent, latent)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500]), context=context).float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def reference_images_per_s(model, records, config: TrainConfig, steps: int, warmup: int) -> float:
    """The diffusers text-to-image recipe's step: pixels → VAE → CLIP → UNet (fp32), AdamW."""
    unet, vae, text_encoder = model.unet.train(), model.vae, model.text_encoder
    unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    alphas = model.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch = [records[(step * config.batch_size + i) % len(records)] for i in range(config.batch_size)]
        pixels = torch.stack([load_image(r, config.resolution, config.resize_policy) for r in batch])
        with torch.no_grad():
            latents = model.encode_images(pixels, generator=g)
            context = model.encode_prompts([""] * len(batch))  # captions are encoded every step
        t = torch.randint(0, 1000, (len(batch),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        a = alphas[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, context=context), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del vae, text_encoder
    return steps * config.batch_size / (time.perf_counter() - start)


def ours_images_per_s(config: TrainConfig, warmup: int) -> float:
    """Run the trainer; images/s between the step events after `warmup` steps and the last one."""
    job = JobFolder(config.job_dir)
    train(config, job, progress=False)
    steps = [e for e in job.read_events() if e.get("type") == "step"]
    first, last = steps[warmup - 1], steps[-1]
    return (last["step"] - first["step"]) * config.batch_size / (last["time"] - first["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (under a minute on 2 CPU cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    steps, warmup = (3, 1) if args.quick else (10, 2)
    resolution, batch = 128, 4

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data", 16, resolution)
        model = random_sd_model(BENCH, seed=0)
        save_sd_checkpoint(model, root / "base.safetensors")
        config = TrainConfig(
            dataset_dir=str(root / "data"), base_checkpoint=str(root / "base.safetensors"),
            job_dir=str(root / "job"), name="bench", resolution=resolution, min_image_size=0, batch_size=batch,
            micro_batch_size=batch, max_steps=warmup + steps, mixed_precision="bf16", gradient_checkpointing=False,
            device="cpu", calibration_images=4, checkpoint_every_steps=0, checkpoint_every_minutes=0,
            preview_every_steps=0, max_grad_norm=1.0,
        )
        peak = matmul_peak_flops(1.0 if args.quick else 3.0)

        t0 = time.perf_counter()
        ours = ours_images_per_s(config, warmup)
        ours_total_s = time.perf_counter() - t0
        peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

        records = list(scan_dataset(config.dataset_dir, min_image_size=0).images)
        reference = reference_images_per_s(model, records, config, steps, warmup)

        from gcfg_core.concept_file import load_concept_model
        from trainer.checkpoints import latest_checkpoint

        concept, _ = load_concept_model(latest_checkpoint(JobFolder(config.job_dir).checkpoints_dir).concept_path)
        flops_per_image = unet_train_flops(concept.train(), resolution // 8, None)

    achieved = ours * flops_per_image
    result = {
        "speedup_vs_reference": round(ours / reference, 3),
        "mfu_vs_matmul_peak": round(achieved / peak, 4),
        "peak_mem_mb": round(peak_mem_mb, 1),
    }
    details = {
        "ours_images_per_s": round(ours, 3), "reference_images_per_s": round(reference, 3),
        "ours_wall_s_including_prepare": round(ours_total_s, 1), "unet_train_gflop_per_image": flops_per_image / 1e9,
        "achieved_tflops": achieved / 1e12, "matmul_peak_tflops": peak / 1e12, "resolution": resolution,
        "batch": batch, "steps": steps, "threads": torch.get_num_threads(),
        # on paper, an H100 at 512 px (2.41 TFLOP per image): the FLOP ceiling and the MFU MLPerf's best implies
        "h100_ceiling_images_per_s": round(H100_DENSE_BF16_FLOPS / SD15_TRAIN_FLOPS_512, 1),
        "mlperf_h100_images_per_s": MLPERF_H100_IMAGES_PER_S,
        "mlperf_h100_mfu": round(MLPERF_H100_IMAGES_PER_S * SD15_TRAIN_FLOPS_512 / H100_DENSE_BF16_FLOPS, 3),
    }
    print("details:", json.dumps(details))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
