"""Training throughput of the trainer against the diffusers `train_text_to_image` recipe, on the same model and batch.

Reference loop (written here, the recipe's per-step work): decode + resize the images from disk, VAE-encode them
(posterior sample), CLIP-encode the (empty) captions, UNet with cross-attention in fp32 (ldm's own attention),
MSE on eps, `torch.optim.AdamW` (default foreach). Ours: `trainer.loop.train` on a real job folder (latent cache,
null-text UNet without cross-attention, bf16 autocast, SDPA, fused AdamW), timed from its per-step events after
warm-up; the one-time cache build is reported apart.

The model keeps SD 1.5's block structure and its VAE-encode : UNet-train FLOP ratio (0.46, perf-anchors.md §0) at
a quarter of the width (UNet 160 channels, VAE 64, text 384), at 128 px, so it runs on a CPU in under a minute.
Under load: the repetitions of the two loops are interleaved (ours, reference, reference, ours, ...), so a change
of the machine's load hits both alike, and each is reported by its minimum and median seconds per image; the
speed-ups are the ratios of the minima and of the medians. Also: achieved UNet FLOP rate (FlopCounterMode,
fwd+bwd) against a bf16/fp32 matmul peak measured in this run, and the process's peak RSS after our first
repetition (before the reference loop ran). The last line printed is one JSON object.

    python tests/benchmarks/bench_train.py [--quick] [--repetitions N]

Peer comparison, when a checkout of kohya sd-scripts is given (never downloaded here):

    python tests/benchmarks/bench_train.py --kohya DIR --kohya-python DIR_VENV/bin/python \
        [--checkpoint SD15.safetensors] [--settings fp32-adamw|bf16-adafactor] [--steps 6] [--warmup 2]

trains the same full-size SD 1.5-layout checkpoint (a random one written here unless `--checkpoint` names one) with
kohya's `fine_tune.py` (run by `kohya_driver.py` under `--kohya-python`) and with ours, each in its own process, on
the same 128 px random images, batch 2, optimizer and precision (`--settings`), gradient checkpointing, SDPA, latents
cached before training on both sides, 0 data-loader workers. kohya's text encoder encodes the (empty) captions
every step, as its fine-tune does; our null-text UNet has no text input. A third run is ours with the low-memory
options (8-bit AdamW, bf16 weights with stochastic rounding, optimizer step fused into the backward). Each side
reports images/s over the steps after the warm-up and its resident-set peak up to its last optimizer step
(loading, latent caching and training; the final save is not counted); the last line is one JSON object with both
and their ratios (ours / kohya).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
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


def interleaved(measures: Mapping[str, Callable[[], float]], repetitions: int) -> dict[str, list[float]]:
    """Each measure `repetitions` times, in turns whose order alternates (A B, B A, A B, ...): a load change during
    the run then slows both alike instead of skewing their ratio."""
    names = list(measures)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repetitions):
        for name in names if repetition % 2 == 0 else reversed(names):
            samples[name].append(measures[name]())
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    return {"min": min(samples), "median": statistics.median(samples)}


def speedups(ours: list[float], reference: list[float]) -> dict[str, float]:
    """Reference time / our time (per image), from the minima and from the medians."""
    a, b = summary(ours), summary(reference)
    return {"min": b["min"] / a["min"], "median": b["median"] / a["median"]}


def reference_loop(model, records, config: TrainConfig, steps: int, warmup: int) -> Callable[[], float]:
    """The diffusers text-to-image recipe's step: pixels → VAE → CLIP → UNet (fp32), AdamW; each call runs
    `warmup + steps` steps and returns seconds per image over the last `steps`.

    The optimizer is made per call and dropped after it, so that its states (twice the UNet) are not held while our
    loop runs: the two loops' memory never adds up.
    """
    unet = model.unet.train()
    unet.requires_grad_(True)
    alphas = model.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    position = 0

    def measure() -> float:
        nonlocal position
        optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        start = None
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            batch = [records[(position + i) % len(records)] for i in range(config.batch_size)]
            position += config.batch_size
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
        return (time.perf_counter() - start) / (steps * config.batch_size)

    return measure


def our_loop(config: TrainConfig, steps: int, warmup: int) -> Callable[[], float]:
    """`trainer.loop.train` on one job, each call resuming it for `warmup + steps` more steps; seconds per image
    between the step events after the warm-up and the last one (the first call also prepares the job)."""
    job = JobFolder(config.job_dir)
    done = 0

    def measure() -> float:
        nonlocal done
        target = done + warmup + steps
        train(config.with_overrides(max_steps=target), job, resume=done > 0, progress=False)
        events = [e for e in job.read_events() if e.get("type") == "step" and e["step"] > done]
        done = target
        first, last = events[warmup - 1], events[-1]
        return (last["time"] - first["time"]) / ((last["step"] - first["step"]) * config.batch_size)

    return measure


# --- the kohya sd-scripts comparison

# (our config overrides, kohya fine_tune.py arguments) per setting; both sides use the same optimizer and precision.
KOHYA_SETTINGS: dict[str, tuple[dict, list[str]]] = {
    "fp32-adamw": (dict(mixed_precision="no", optimizer="adamw", weight_dtype="fp32", fused_backward="off"),
                   ["--mixed_precision", "no", "--optimizer_type", "AdamW"]),
    "bf16-adafactor": (dict(mixed_precision="bf16", optimizer="adafactor", weight_dtype="bf16", fused_backward="off"),
                       ["--mixed_precision", "bf16", "--full_bf16", "--optimizer_type", "Adafactor", "--optimizer_args",
                        "relative_step=False", "scale_parameter=False", "warmup_init=False"]),
}
LOW_MEMORY = dict(mixed_precision="bf16", optimizer="adamw8bit", weight_dtype="bf16", fused_backward="on")


def images_per_second(step_times: list[float], warmup: int, batch: int) -> float:
    """Throughput between the end of step `warmup` and the end of the last step (times are step ends)."""
    measured = step_times[warmup - 1:]
    return (len(measured) - 1) * batch / (measured[-1] - measured[0])


def kohya_fine_tune_args(checkpoint: Path, data: Path, metadata: Path, output: Path, *, resolution: int, batch: int,
                         steps: int, learning_rate: float, setting: str) -> list[str]:
    """fine_tune.py arguments for the comparison run (module docstring)."""
    return ["--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(data), "--in_json",
            str(metadata), "--output_dir", str(output), "--output_name", "kohya", "--save_model_as", "safetensors",
            "--resolution", f"{resolution},{resolution}", "--train_batch_size", str(batch), "--max_train_steps",
            str(steps), "--learning_rate", str(learning_rate), "--lr_scheduler", "constant", "--max_grad_norm", "1.0",
            "--gradient_checkpointing", "--sdpa", "--cache_latents", "--max_data_loader_n_workers", "0", "--seed",
            "0", *KOHYA_SETTINGS[setting][1]]


def kohya_metadata(images: Path) -> dict[str, dict]:
    """fine_tune.py's `--in_json`: an empty caption per image, keyed by the file's path relative to the image folder
    (how sd-scripts v0.10 resolves a key; older versions took the stem)."""
    return {path.name: {"caption": ""} for path in sorted(images.glob("*.png"))}


def ours_child(config_json: str, out_path: str) -> None:
    """Train `config_json`'s job from scratch; write step end times and the resident-set peak after each step."""
    config = TrainConfig.from_json(config_json)
    times: list[float] = []
    peaks: list[int] = []

    def on_step(_step: int, _loss: float) -> None:
        times.append(time.perf_counter())
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    train(config, JobFolder(config.job_dir), progress=False, on_step=on_step)
    Path(out_path).write_text(json.dumps({"step_times": times, "peak_rss_bytes": peaks}))


def _side(command: list[str], out: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def kohya_main(args: argparse.Namespace) -> None:
    resolution, batch, steps, warmup = args.resolution, args.batch, args.steps, args.warmup
    ours_overrides, _ = KOHYA_SETTINGS[args.settings]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data", 16, resolution)
        metadata = root / "meta.json"
        metadata.write_text(json.dumps(kohya_metadata(root / "data")))
        checkpoint = Path(args.checkpoint) if args.checkpoint else root / "sd15.safetensors"
        if not args.checkpoint:  # full-size SD 1.5 layout, random weights (several GB of RAM while written)
            model = random_sd_model(SD1, seed=0)
            for part in (model.unet, model.vae, model.text_encoder):
                part.half()  # fp16 on disk, as released SD 1.5 checkpoints are
            save_sd_checkpoint(model, checkpoint)
            del model
        base = TrainConfig(dataset_dir=str(root / "data"), base_checkpoint=str(checkpoint), job_dir=str(root / "job"),
                           name="bench", resolution=resolution, min_image_size=0, batch_size=batch,
                           micro_batch_size=batch, max_steps=steps, gradient_checkpointing=True, device="cpu",
                           calibration_images=4, checkpoint_every_steps=0, checkpoint_every_minutes=0,
                           preview_every_steps=0, max_grad_norm=1.0, ema_decay=0.0, keep_last=1, **ours_overrides)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # sd-scripts loads CLIP's tokenizer from the hub by name: give it a local hub cache with the tokenizer files
        # built from open-clip's vocabulary (tests/webui/make_random_sd15.py), so nothing is downloaded
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "webui"))
        import make_random_sd15

        hub_home = root / "hf-home"
        make_random_sd15.write_hub_cache(hub_home, make_random_sd15.find_bpe_file())
        kohya_env = dict(env, HF_HOME=str(hub_home))

        def ours(overrides: dict, label: str) -> dict:
            config = base.with_overrides(job_dir=str(root / f"job-{label}"), **overrides)
            out = root / f"{label}.json"
            return _side([sys.executable, __file__, "--ours-child", config.to_json(), str(out)], out, env)

        def kohya(label: str) -> dict:
            out = root / f"{label}.json"
            command = [args.kohya_python, str(Path(__file__).with_name("kohya_driver.py")), str(args.kohya), str(out),
                       "--", *kohya_fine_tune_args(checkpoint, root / "data", metadata, root / f"out-{label}",
                                                   resolution=resolution, batch=batch, steps=steps,
                                                   learning_rate=base.learning_rate, setting=args.settings)]
            return _side(command, out, kohya_env, cwd=Path(args.kohya))

        runs: dict[str, list[dict]] = {"ours": [], "kohya": [], "ours_low_memory": []}
        for repetition in range(args.repetitions):
            order = ("ours", "kohya") if repetition % 2 == 0 else ("kohya", "ours")
            for side in order:
                label = f"{side}-{repetition}"
                runs[side].append(ours({}, label) if side == "ours" else kohya(label))
        if not args.no_low_memory:
            runs["ours_low_memory"].append(ours(LOW_MEMORY, "low-memory"))

    def best(side: str) -> dict:
        speeds = [images_per_second(r["step_times"], warmup, batch) for r in runs[side]]
        peaks = [r["peak_rss_bytes"][-1] for r in runs[side]]
        return {"images_per_s": round(max(speeds), 4), "images_per_s_all": [round(v, 4) for v in speeds],
                "peak_rss_mb": round(min(peaks) / 1e6), "wall_s": [round(r["wall_s"]) for r in runs[side]]}

    result = {"settings": args.settings, "resolution": resolution, "batch": batch, "steps": steps, "warmup": warmup,
              "checkpoint": str(args.checkpoint or "random SD 1.5 (written here)"), "threads": torch.get_num_threads(),
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    for side in runs:
        if runs[side]:
            result[side] = best(side)
    k = result["kohya"]
    for side in ("ours", "ours_low_memory"):
        if side in result:
            result[f"{side}_images_per_s_ratio"] = round(result[side]["images_per_s"] / k["images_per_s"], 3)
            result[f"{side}_peak_rss_ratio"] = round(result[side]["peak_rss_mb"] / k["peak_rss_mb"], 3)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (about a minute on 2 idle CPU cores)")
    parser.add_argument("--repetitions", type=int, default=None, help="measured turns of each loop (default 5, "
                        "3 with --quick; 1 with --kohya)")
    parser.add_argument("--kohya", type=Path, help="a kohya sd-scripts checkout: compare with its fine_tune.py")
    parser.add_argument("--kohya-python", default=sys.executable, help="the Python of the checkout's environment")
    parser.add_argument("--checkpoint", help="full-size SD 1.5 checkpoint for --kohya (default: a random one)")
    parser.add_argument("--settings", choices=sorted(KOHYA_SETTINGS), default="fp32-adamw")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per --kohya run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-low-memory", action="store_true", help="skip the low-memory run of --kohya")
    parser.add_argument("--ours-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.ours_child:
        ours_child(*args.ours_child)
        return
    if args.kohya:
        args.repetitions = args.repetitions or 1
        kohya_main(args)
        return
    steps, warmup = (2, 1) if args.quick else (4, 1)
    repetitions = args.repetitions or (3 if args.quick else 5)
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
        records = list(scan_dataset(config.dataset_dir, min_image_size=0).images)

        t0 = time.perf_counter()
        ours = our_loop(config, steps, warmup)
        first = ours()  # prepares the job (cache, calibration) too; timed apart, not a sample
        ours_first_call_s = time.perf_counter() - t0
        peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; before the reference
        samples = interleaved({"ours": ours, "reference": reference_loop(model, records, config, steps, warmup)},
                              repetitions)

        from gcfg_core.concept_file import load_concept_model
        from trainer.checkpoints import latest_checkpoint

        concept, _ = load_concept_model(latest_checkpoint(JobFolder(config.job_dir).checkpoints_dir).concept_path)
        flops_per_image = unet_train_flops(concept.train(), resolution // 8, None)

    ratio = speedups(samples["ours"], samples["reference"])
    achieved = flops_per_image / summary(samples["ours"])["min"]
    result = {
        "speedup_vs_reference_min": round(ratio["min"], 3),
        "speedup_vs_reference_median": round(ratio["median"], 3),
        "mfu_vs_matmul_peak": round(achieved / peak, 4),
        "peak_mem_mb": round(peak_mem_mb, 1),
    }
    details = {
        "seconds_per_image": {name: {key: round(value, 4) for key, value in summary(values).items()}
                              for name, values in samples.items()},
        "samples": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "ours_first_call_s_including_prepare": round(ours_first_call_s, 1), "ours_first_call_s_per_image":
        round(first, 4), "repetitions": repetitions, "steps_per_repetition": steps, "warmup_steps": warmup,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "unet_train_gflop_per_image": flops_per_image / 1e9, "achieved_tflops": achieved / 1e12,
        "matmul_peak_tflops": peak / 1e12, "resolution": resolution, "batch": batch,
        "threads": torch.get_num_threads(),
        # on paper, an H100 at 512 px (2.41 TFLOP per image): the FLOP ceiling and the MFU MLPerf's best implies
        "h100_ceiling_images_per_s": round(H100_DENSE_BF16_FLOPS / SD15_TRAIN_FLOPS_512, 1),
        "mlperf_h100_images_per_s": MLPERF_H100_IMAGES_PER_S,
        "mlperf_h100_mfu": round(MLPERF_H100_IMAGES_PER_S * SD15_TRAIN_FLOPS_512 / H100_DENSE_BF16_FLOPS, 3),
    }
    print("details:", json.dumps(details))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
