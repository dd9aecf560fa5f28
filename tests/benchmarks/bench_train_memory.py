"""Peak memory of each low-memory training option: the preflight's model against a measured peak.

Each option trains a few steps of the same job in its own process. Measured: on the CPU, the growth of the
process's resident set over the training steps (Linux `VmHWM`, reset through /proc/self/clear_refs after the first
step, so loading the checkpoint does not count and the steady state does), above the resident set just before
`train` was called; on a GPU, `torch.cuda.max_memory_allocated` over the same steps. Modelled: the preflight's
`estimate_memory_bytes(...).training_bytes` for the run's resolved options (the CPU figure has no CUDA overhead).

The model is the SD 1.5 layout at a reduced width (default 128 channels: 0.16 of SD 1.5's parameters) so that a
full option sweep fits beside other work in a few GB; 128 px, batch 2, gradient checkpointing. The static part of
the model (bytes per parameter) is what the options change and what this checks; the activation constant is SD
1.5's, scaled only by resolution, so at this width it overstates the (small) activation share.

    python tests/benchmarks/bench_train_memory.py [--channels 128] [--steps 3] [--device cpu|cuda]

The last line printed is one JSON object: option -> modelled and measured MB, and their ratio.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

OPTIONS: dict[str, dict] = {
    "adamw fp32": dict(optimizer="adamw", weight_dtype="fp32", fused_backward="off", mixed_precision="no"),
    "adamw fp32 +ema": dict(optimizer="adamw", weight_dtype="fp32", fused_backward="off", mixed_precision="no",
                            ema_decay=0.999, ema_device="device"),
    "adamw fp32 fused": dict(optimizer="adamw", weight_dtype="fp32", fused_backward="on", mixed_precision="no"),
    "adamw8bit fp32": dict(optimizer="adamw8bit", weight_dtype="fp32", fused_backward="off", mixed_precision="no"),
    "adamw8bit fp32 fused": dict(optimizer="adamw8bit", weight_dtype="fp32", fused_backward="on",
                                 mixed_precision="no"),
    "adamw8bit bf16": dict(optimizer="adamw8bit", weight_dtype="bf16", fused_backward="off", mixed_precision="bf16"),
    "adamw8bit bf16 fused": dict(optimizer="adamw8bit", weight_dtype="bf16", fused_backward="on",
                                 mixed_precision="bf16"),
    "adafactor bf16 fused": dict(optimizer="adafactor", weight_dtype="bf16", fused_backward="on",
                                 mixed_precision="bf16"),
}
MB = 1e6


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(config_json: str, device: str) -> None:
    """Train the job of `config_json`; print the measured peak above the pre-`train` resident set (bytes)."""
    import torch

    from trainer.config import TrainConfig
    from trainer.jobfolder import JobFolder
    from trainer.loop import train

    config = TrainConfig.from_json(config_json)
    baseline = _rss_bytes("VmRSS")
    measured = {}

    def on_step(step: int, _loss: float) -> None:
        if step == 1:  # steady state from here: optimizer states exist, loading transients are gone
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages (loading, step 1) back first
            Path("/proc/self/clear_refs").write_text("5")
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        if step == config.max_steps:  # before the final checkpoint is written
            measured["cpu"] = _rss_bytes("VmHWM") - baseline
            if device == "cuda":
                measured["cuda"] = torch.cuda.max_memory_allocated()

    train(config, JobFolder(config.job_dir), progress=False, on_step=on_step)
    print(json.dumps(measured))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=128, help="UNet width (SD 1.5: 320)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per option (≥ 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="option names to run (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        child(args.child, args.device)
        return

    from bench_train import BENCH, make_images

    from gcfg_core.configs import UNetConfig
    from gcfg_core.models import random_sd_model, save_sd_checkpoint
    from trainer.config import TrainConfig
    from trainer.jobfolder import JobFolder
    from trainer.loop import prepare
    from trainer.memory import MemoryOptions
    from trainer.preflight import estimate_memory_bytes, largest_unet_tensor, nulltext_unet_param_count

    logging.basicConfig(level=logging.WARNING)
    # SD 1.5's UNet layout at `channels` width; the small VAE and text encoder of bench_train (only `prepare` uses them)
    arch = dataclasses.replace(BENCH, unet=UNetConfig(model_channels=args.channels, context_dim=384),
                               name="bench-memory")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data", 8, 128)
        save_sd_checkpoint(random_sd_model(arch, seed=0), root / "base.safetensors")
        base = TrainConfig(dataset_dir=str(root / "data"), base_checkpoint=str(root / "base.safetensors"),
                           job_dir=str(root / "prepared"), name="memory", resolution=128, min_image_size=0,
                           batch_size=2, micro_batch_size=2, max_steps=args.steps, device=args.device,
                           calibration_images=2, checkpoint_every_steps=0, checkpoint_every_minutes=0,
                           preview_every_steps=0, mixed_precision="no", gradient_checkpointing=True, keep_last=1)
        prepare(base, JobFolder(base.job_dir), progress=False)
        params = nulltext_unet_param_count(base.base_checkpoint)
        largest = largest_unet_tensor(base.base_checkpoint)
        for name, overrides in OPTIONS.items():
            if args.only and name not in args.only:
                continue
            config = base.with_overrides(job_dir=str(root / "job"), **overrides)
            shutil.copytree(base.job_dir, config.job_dir)
            options = MemoryOptions.from_dict({k: getattr(config, k).value for k in
                                               ("optimizer", "weight_dtype", "fused_backward", "ema_device")}
                                              | {"ema_device": "device"})
            modelled = estimate_memory_bytes(config, params, args.device, options, largest).training_bytes
            # Large blocks always from mmap, so a freed tensor leaves the resident set at once (as the CUDA
            # allocator's "allocated" figure does), rather than glibc's growing threshold keeping it in the heap.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            out = subprocess.run([sys.executable, __file__, "--child", config.to_json(), "--device", args.device],
                                 check=True, capture_output=True, text=True, cwd=Path(__file__).parent, env=env)
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            shutil.rmtree(config.job_dir)
            peak = measured.get("cuda", measured["cpu"])
            results[name] = {"modelled_mb": round(modelled / MB), "measured_mb": round(peak / MB),
                             "measured_over_modelled": round(peak / modelled, 2)}
            print(f"{name}: {results[name]}", file=sys.stderr)
    print(json.dumps({"unet_params": params, "device": args.device, "resolution": 128, "batch": 2,
                      "results": results}))


if __name__ == "__main__":
    main()
