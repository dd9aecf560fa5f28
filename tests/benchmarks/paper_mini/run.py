"""Paper-mini: the paper's two claims measured on a small model trained here, end to end with this project's code.

    python tests/benchmarks/paper_mini/run.py [STAGE ...] [--cache DIR] [--threads N] [--quick]
    python tests/benchmarks/paper_mini/run.py assets --webui-dir WEBUI   # install the models into a WebUI

Stages (default: all, in this order; each is cached in --cache and skipped when done):

  data        render the open-world dataset, the concept set (PNG files, for the trainer) and an evaluation set
  detectors   validate the attribute detectors on dataset images (accuracy is reported)
  vae         train the VAE, standardise its latents
  latents     encode the datasets once (posterior moments)
  decoder     train the decoder further with the encoder frozen (can run beside `base`: the latents do not
              change); check the detectors on VAE round trips
  base        train the base (the prior): text-conditioned UNet with a frozen text encoder; caption adherence
  finetune    the "community fine-tune": the base fine-tuned on the concept set, every caption "a ring";
              its unconditional drift along training
  dreambooth  the base fully fine-tuned on the concept set with descriptive captions ("a red ring on a black ...")
  concept     the null-text concept UNet, trained by `python -m trainer train` on the concept images (no captions)
  table       the paper's table in miniature (5 rows, same seeds) and a grid image per row
  sweep       concept weight × CFG scale for the paper's method, CFG scale for the other rows
  docs        the grids as small PNGs in docs/ and the README tables in <cache>/README-section.md

`--quick` runs every stage at toy sizes (minutes) into <cache>/quick, to check the pipeline. Stage results are in
<cache>/<stage>.done.json; the last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
for entry in (str(HERE.parent), str(REPO_ROOT)):
    if entry not in sys.path:
        sys.path.insert(0, entry)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from gcfg_core.checkpoint import CheckpointError  # noqa: E402
from gcfg_core.concept_file import load_concept_model  # noqa: E402
from gcfg_core.configs import sd1_alphas_cumprod  # noqa: E402
from gcfg_core.models import (  # noqa: E402
    SDModel,
    build_text_encoder,
    build_vae,
    load_sd_checkpoint,
    save_sd_checkpoint,
)
from paper_mini import arch, detect, evaluate, train, world  # noqa: E402
from paper_mini.stages import read_marker, run_stage, stage_result  # noqa: E402

log = logging.getLogger("gcfg.paper_mini")

STAGES = ("data", "detectors", "vae", "latents", "decoder", "base", "finetune", "dreambooth", "concept", "table",
          "sweep", "docs")
CONTROL_COLOURS = ("green", "blue", "magenta", "cyan")  # none of them in the concept set (red, yellow)
CONTROL_BACKGROUNDS = ("white", "gray")  # the concept set is all black
FINETUNE_CAPTION = "a ring"
DOCS_DIR = REPO_ROOT / "docs"


@dataclass(frozen=True)
class Plan:
    """Every size and hyper-parameter of a run (the full run, or `quick()` for a pipeline check)."""

    base_images: int = 12000
    concept_images: int = 3000
    eval_images: int = 2000
    # Sized for a 2-core CPU: one training step of batch 32 takes 0.35-0.6 s on a core of its own (one torch thread
    # per process; two processes of two threads each on two cores were 8-10 times slower) and a 15-step image
    # ~0.5 s. The base needs its 4000 steps: its noise prediction starts to depend on the caption only after about
    # a thousand (README).
    vae: train.VAESettings = train.VAESettings()
    decoder: train.DecoderSettings = train.DecoderSettings(steps=300)
    # No EMA: the run is short for a 0.999 average (0.999^4000 = 2 % of the initialisation, but the average lags
    # the caption-following that appears late) and the fine-tunes must start from the trained weights themselves.
    base: train.UNetSettings = train.UNetSettings(steps=4000, batch_size=32, learning_rate=4e-4, warmup=200,
                                                  ema_decay=0.0, uncond_probability=0.1, save_every=50)
    finetune: train.UNetSettings = train.UNetSettings(seed=1, steps=300, batch_size=32, learning_rate=5e-4,
                                                      warmup=5, uncond_probability=0.0, save_every=50,
                                                      snapshot_steps=(50, 100, 200, 300))
    dreambooth: train.UNetSettings = train.UNetSettings(seed=2, steps=300, batch_size=32, learning_rate=5e-4,
                                                        warmup=5, uncond_probability=0.0, save_every=50)
    concept_steps: int = 300  # same steps, batch and learning rate as the fine-tunes
    concept_batch: int = 32
    concept_learning_rate: float = 5e-4
    text_seed: int = 0
    base_eval_stride: int = 7  # every 7th of the 72 open-world captions: 11, every colour and background
    base_eval_seeds: int = 2  # per caption
    table_seeds: int = 3  # per control prompt (8 prompts)
    uncond_seeds: int = 16
    cfg_scale: float = 2.5  # the paper's w_control
    concept_weight: float = 2.5  # the paper's w_concept
    sweep_seeds: int = 3  # per prompt: 24 images per cell
    sweep_prompts: int = 8  # every control prompt
    # From a concept that barely shows to the paper's 2.5, at the table's CFG and at twice it.
    sweep_weights: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5)
    sweep_cfg: tuple[float, ...] = (2.5, 5.0)
    sweep_rows: tuple[str, ...] = ("finetune_cfg", "finetune_prior", "dreambooth")  # swept over the CFG scale
    grid_seeds: int = 3
    round_trip_images: int = 200  # per set, for the decoder's check
    seed0: int = 1000

    @classmethod
    def quick(cls) -> Plan:
        tiny = dict(save_every=10, log_every=5)
        return cls(base_images=1000, concept_images=200, eval_images=200,
                   vae=train.VAESettings(steps=20, **tiny), decoder=train.DecoderSettings(steps=10, **tiny),
                   base=train.UNetSettings(steps=40, batch_size=16, warmup=5, ema_decay=0.9, **tiny),
                   finetune=train.UNetSettings(seed=1, steps=20, batch_size=16, uncond_probability=0.0,
                                               snapshot_steps=(10, 20), **tiny),
                   dreambooth=train.UNetSettings(seed=2, steps=20, batch_size=16, uncond_probability=0.0, **tiny),
                   concept_steps=20, concept_batch=16, base_eval_stride=12, base_eval_seeds=1, table_seeds=2,
                   uncond_seeds=8, sweep_seeds=2, sweep_prompts=2, sweep_weights=(1.0, 2.5), sweep_cfg=(2.5,),
                   grid_seeds=2)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class Context:
    cache: Path
    plan: Plan
    threads: int
    _models: dict[str, SDModel] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.cache.joinpath(*parts)

    def model(self, key: str) -> SDModel:
        """A trained checkpoint (base, finetune, dreambooth), loaded once through `gcfg_core.models`."""
        if key not in self._models:
            model = load_sd_checkpoint(self.path(f"{key}.safetensors"), compute_hash=False)
            final = self.path("vae-final.safetensors")
            if final.is_file():  # a checkpoint saved before the decoder finished still decodes with the final one
                model.vae.load_state_dict(load_file(str(final)))
            self._models[key] = model
        return self._models[key]

    def models(self, *keys: str) -> dict[str, SDModel]:
        return {key: self.model(key) for key in keys}


# ----------------------------------------------------------------------------------------------------------------
# data and detectors


def _save_scenes(path: Path, scenes: list[world.Scene]) -> None:
    path.write_text("\n".join(json.dumps(scene.to_dict()) for scene in scenes) + "\n", encoding="utf-8")


def load_scenes(path: Path) -> list[world.Scene]:
    return [world.Scene(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def stage_data(ctx: Context) -> dict:
    plan = ctx.plan
    folder = ctx.path("data")
    folder.mkdir(parents=True, exist_ok=True)
    result = {}
    for kind, count, seed in (("base", plan.base_images, 1), ("concept", plan.concept_images, 2),
                              ("eval", plan.eval_images, 3)):
        scenes = world.scenes("concept" if kind == "concept" else "base", count, seed)
        np.save(folder / f"{kind}.npy", world.render_all(scenes))
        _save_scenes(folder / f"{kind}.jsonl", scenes)
        result[kind] = count
    # The trainer reads an image folder: the concept set as PNG files.
    images = np.load(folder / "concept.npy")
    png_dir = folder / "concept-png"
    if png_dir.exists():
        shutil.rmtree(png_dir)
    png_dir.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(png_dir / f"{index:05d}.png")
    result["concept_png_dir"] = str(png_dir)
    return result


def images_of(ctx: Context, kind: str) -> tuple[np.ndarray, list[world.Scene]]:
    return np.load(ctx.path("data", f"{kind}.npy")), load_scenes(ctx.path("data", f"{kind}.jsonl"))


def detector_report(readings: list[detect.Reading], scenes: list[world.Scene]) -> dict:
    """Accuracy of the detectors against the true scenes, and the largest geometry errors (pixels)."""
    acc = evaluate.caption_adherence(readings, scenes)
    rings = [(r, s) for r, s in zip(readings, scenes, strict=True) if s.shape == "ring"]
    return {
        "images": len(scenes),
        "accuracy": acc,
        "radius_error_max": float(max(abs(r.radius - s.radius) for r, s in zip(readings, scenes, strict=True))),
        "centre_error_max": float(max(max(abs(r.cx - s.cx), abs(r.cy - s.cy))
                                      for r, s in zip(readings, scenes, strict=True))),
        "ring_hole_error_max": float(max((abs(r.hole - s.hole ** 2) for r, s in rings), default=0.0)),
    }


def stage_detectors(ctx: Context) -> dict:
    result = {}
    for kind in ("eval", "concept"):
        images, scenes = images_of(ctx, kind)
        result[kind] = detector_report(detect.read_images(images), scenes)
    return result


def feature_scale(ctx: Context) -> detect.FeatureScale:
    images, _ = images_of(ctx, "eval")
    return detect.FeatureScale.from_readings(detect.read_images(images))


def concept_readings(ctx: Context) -> list[detect.Reading]:
    images, _ = images_of(ctx, "concept")
    return detect.read_images(images)


# ----------------------------------------------------------------------------------------------------------------
# VAE, text encoder, latents


def load_vae(ctx: Context):
    """The VAE: with the decoder trained further once stage `decoder` has trained it (its check may still run)."""
    final = ctx.path("vae-final.safetensors")
    path = final if final.is_file() else ctx.path("vae.safetensors")
    return build_vae(arch.PAPER_MINI.vae, load_file(str(path))).eval()


def stage_vae(ctx: Context) -> dict:
    settings = ctx.plan.vae
    vae = train.train_vae(ctx.path("vae"), settings)
    images, _ = images_of(ctx, "base")
    mean, std = train.latent_statistics(vae, images[:4000])
    train.standardise_latents_(train.make_deterministic_(vae), mean, std)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(ctx.path("vae.safetensors")))
    check_mean, check_std = train.latent_statistics(vae, images[4000:6000] if len(images) > 6000 else images)
    return {"raw_latent_mean": mean.tolist(), "raw_latent_std": std.tolist(),
            "scaled_latent_std": (check_std * 0.18215).tolist(),
            "scaled_latent_mean": (check_mean * 0.18215).tolist(),
            "final_l1_per_value": train.mean_tail(train.log_records(ctx.path("vae")), "l1_per_value")}


def vae_round_trips(ctx: Context, vae) -> dict:
    """Detector accuracy on dataset images after encoding and decoding (what generation can at best give)."""
    result, scale, concept_ref = {}, feature_scale(ctx), concept_readings(ctx)
    for kind in ("eval", "concept"):
        images, scenes = images_of(ctx, kind)
        images, scenes = images[:ctx.plan.round_trip_images], scenes[:ctx.plan.round_trip_images]
        with torch.no_grad():
            round_trip = np.concatenate([train.to_uint8(vae.decode(vae.encode(train.to_tensor(images[i:i + 64])).mean))
                                         for i in range(0, len(images), 64)])
        readings = detect.read_images(round_trip)
        result[f"round_trip_{kind}"] = detector_report(readings, scenes)
        result[f"round_trip_{kind}"]["mean_abs_pixel_error"] = float(np.abs(round_trip.astype(float) - images).mean())
        if kind == "concept":
            result["round_trip_concept_fidelity"] = detect.concept_fidelity(readings, concept_ref, scale)
        Image.fromarray(np.concatenate([np.concatenate(list(images[:8]), axis=1),
                                        np.concatenate(list(round_trip[:8]), axis=1)])).save(
            ctx.path(f"vae-round-trip-{kind}.png"))
    return result


def stage_decoder(ctx: Context) -> dict:
    vae = build_vae(arch.PAPER_MINI.vae, load_file(str(ctx.path("vae.safetensors")))).eval()
    train.train_decoder(ctx.path("decoder"), ctx.plan.decoder, vae)
    final = ctx.path("vae-final.safetensors")
    partial = final.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(partial))
    partial.replace(final)  # `load_vae` takes it as soon as it exists: never half-written
    return {"final_l1_per_value": train.mean_tail(train.log_records(ctx.path("decoder")), "l1_per_value"),
            **vae_round_trips(ctx, vae)}


def text_encoder_state(ctx: Context) -> dict:
    path = ctx.path("text_encoder.safetensors")
    if not path.is_file():
        encoder = arch.make_text_encoder(ctx.plan.text_seed)
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path))
    return load_file(str(path))


def text_model(ctx: Context) -> SDModel:
    encoder = build_text_encoder(arch.PAPER_MINI.text_encoder, text_encoder_state(ctx))
    return SDModel(unet=None, vae=None, text_encoder=encoder, architecture=arch.PAPER_MINI, name="text")


def encode_captions(ctx: Context, captions: set[str]) -> dict[str, torch.Tensor]:
    """Caption → context [77, 128] with this project's prompt encoding (`SDModel.encode_prompts`)."""
    model, ordered = text_model(ctx), sorted(captions | {""})
    contexts = torch.cat([model.encode_prompts(ordered[i:i + 64]) for i in range(0, len(ordered), 64)])
    return dict(zip(ordered, contexts, strict=True))


def stage_latents(ctx: Context) -> dict:
    vae, result = load_vae(ctx), {}
    tensors = {}
    for kind in ("base", "concept"):
        images, _ = images_of(ctx, kind)
        tensors[kind] = train.encode_moments(vae, images).contiguous()
        result[kind] = list(tensors[kind].shape)
    save_file(tensors, str(ctx.path("latents.safetensors")))
    return result


def moments(ctx: Context, kind: str) -> torch.Tensor:
    return load_file(str(ctx.path("latents.safetensors")))[kind]


def save_checkpoint(ctx: Context, key: str, unet_state: dict) -> Path:
    """A full SD 1.x-layout checkpoint: this UNet, the shared VAE and text encoder, the SD 1 schedule."""
    from gcfg_core.models import build_unet

    model = SDModel(unet=build_unet(arch.PAPER_MINI.unet, unet_state), vae=load_vae(ctx),
                    text_encoder=build_text_encoder(arch.PAPER_MINI.text_encoder, text_encoder_state(ctx)),
                    architecture=arch.PAPER_MINI, name=key, alphas_cumprod=sd1_alphas_cumprod())
    path = ctx.path(f"{key}.safetensors")
    save_sd_checkpoint(model, path)
    ctx._models.pop(key, None)
    return path


# ----------------------------------------------------------------------------------------------------------------
# base and fine-tunes


def all_base_captions() -> set[str]:
    probe = world.Scene("disc", "red", "black", 10.0, 32.0, 32.0)
    captions = set()
    for shape in world.SHAPES:
        for colour in world.OBJECT_COLOURS:
            for background in world.BACKGROUNDS:
                scene = world.Scene(shape, colour, background, probe.radius, probe.cx, probe.cy,
                                    world.BASE_RING_HOLE if shape == "ring" else 0.0)
                for mask in range(8):
                    captions.add(world.caption(scene, colour=bool(mask & 1), shape=bool(mask & 2),
                                               background=bool(mask & 4)))
    return captions


def open_world_scenes() -> list[world.Scene]:
    """One scene per (shape, colour, background) of the open world: the captions of the adherence check."""
    return [world.Scene(shape, colour, background, 15.0, 32.0, 32.0, world.BASE_RING_HOLE if shape == "ring" else 0.0)
            for shape in world.SHAPES for colour in world.OBJECT_COLOURS for background in world.BACKGROUNDS]


def base_eval(ctx: Context, key: str, cfg_scales: tuple[float, ...] = (2.5,)) -> dict:
    """Caption adherence of a model on full captions of the open world (every `base_eval_stride`-th of 72)."""
    models, result = ctx.models(key), {}
    seeds = range(ctx.plan.seed0, ctx.plan.seed0 + ctx.plan.base_eval_seeds)
    for cfg in cfg_scales:
        readings, prompted = [], []
        for scene in open_world_scenes()[::ctx.plan.base_eval_stride]:
            readings.extend(detect.read_images(evaluate.sample(models, evaluate.Setup(key), world.caption(scene), cfg,
                                                               seeds)))
            prompted.extend([scene] * len(seeds))
        result[f"cfg_{cfg:g}"] = evaluate.caption_adherence(readings, prompted)
    return result


def stage_base(ctx: Context) -> dict:
    _, scenes = images_of(ctx, "base")
    contexts = encode_captions(ctx, all_base_captions())
    settings = ctx.plan.base
    state = train.train_unet(ctx.path("base"), settings, moments(ctx, "base"),
                             lambda index, rng: world.caption_variants(scenes[index], rng), contexts)
    save_checkpoint(ctx, "base", state)
    return {"final_loss": train.mean_tail(train.log_records(ctx.path("base")), "loss"),
            "adherence": base_eval(ctx, "base")}


def uncond_readings(ctx: Context, models: dict[str, SDModel], key: str, seeds: int) -> list[detect.Reading]:
    return detect.read_images(evaluate.unconditional(models, key, range(ctx.plan.seed0, ctx.plan.seed0 + seeds)))


def stage_finetune(ctx: Context) -> dict:
    settings = ctx.plan.finetune
    base_state = ctx.model("base").unet.state_dict()
    contexts = encode_captions(ctx, {FINETUNE_CAPTION})
    state = train.train_unet(ctx.path("finetune"), settings, moments(ctx, "concept"),
                             lambda index, rng: FINETUNE_CAPTION, contexts, init=base_state)
    save_checkpoint(ctx, "finetune", state)
    # Drift along training: unconditional samples of each snapshot against the base's.
    reference = uncond_readings(ctx, ctx.models("base"), "base", ctx.plan.uncond_seeds)
    curve = {"0": evaluate.drift(reference, reference)}
    for step, path in train.snapshot_weights(ctx.path("finetune")).items():
        save_checkpoint(ctx, "finetune-snapshot", torch.load(path, map_location="cpu", weights_only=True))
        readings = uncond_readings(ctx, ctx.models("finetune-snapshot"), "finetune-snapshot", ctx.plan.uncond_seeds)
        curve[str(step)] = evaluate.drift(readings, reference)
        log.info("fine-tune step %d: unconditional drift %s", step, curve[str(step)])
    ctx.path("finetune-snapshot.safetensors").unlink(missing_ok=True)
    ctx._models.pop("finetune-snapshot", None)
    return {"final_loss": train.mean_tail(train.log_records(ctx.path("finetune")), "loss"), "drift_curve": curve,
            "open_world_adherence": base_eval(ctx, "finetune", (2.5,))}


def stage_dreambooth(ctx: Context) -> dict:
    settings = ctx.plan.dreambooth
    _, scenes = images_of(ctx, "concept")
    contexts = encode_captions(ctx, {world.caption(scene) for scene in scenes})
    state = train.train_unet(ctx.path("dreambooth"), settings, moments(ctx, "concept"),
                             lambda index, rng: world.caption(scenes[index]), contexts,
                             init=ctx.model("base").unet.state_dict())
    save_checkpoint(ctx, "dreambooth", state)
    return {"final_loss": train.mean_tail(train.log_records(ctx.path("dreambooth")), "loss"),
            "captions": sorted(contexts), "open_world_adherence": base_eval(ctx, "dreambooth", (2.5,))}


# ----------------------------------------------------------------------------------------------------------------
# concept UNet: this project's trainer, as a user runs it


def concept_config(ctx: Context) -> dict:
    plan = ctx.plan
    return {
        "name": "paper-mini-rings", "dataset_dir": str(ctx.path("data", "concept-png")),
        "base_checkpoint": str(ctx.path("base.safetensors")), "job_dir": str(ctx.path("concept-job")),
        "resolution": world.SIZE, "min_image_size": 0, "learning_rate": plan.concept_learning_rate,
        "batch_size": plan.concept_batch, "micro_batch_size": plan.concept_batch, "max_steps": plan.concept_steps,
        "warmup_steps": min(50, plan.concept_steps), "mixed_precision": "no", "gradient_checkpointing": False,
        "checkpoint_every_steps": max(1, plan.concept_steps // 4), "checkpoint_every_minutes": 0.0,
        "keep_last": 2, "preview_every_steps": plan.concept_steps,
        "preview_prompts": ["a blue ring on a white background"], "preview_steps": evaluate.STEPS,
        "calibration_images": 64, "cache_batch_size": 64, "device": "cpu", "seed": 0,
    }


def stage_concept(ctx: Context) -> dict:
    config = concept_config(ctx)
    job = Path(config["job_dir"])
    config_path = ctx.path("concept-train.json")
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS=str(ctx.threads), MKL_NUM_THREADS=str(ctx.threads),
               PYTHONPATH=str(REPO_ROOT))
    has_checkpoint = (job / "checkpoints" / "latest").is_file()
    command = ([sys.executable, "-m", "trainer", "resume", str(job)] if has_checkpoint
               else [sys.executable, "-m", "trainer", "train", "--config", str(config_path)])
    status_path = job / "status.json"
    done = status_path.is_file() and json.loads(status_path.read_text())["state"] == "completed"
    if not done:
        log.info("concept UNet: %s", " ".join(command))
        with (ctx.path("concept-trainer.log")).open("a", encoding="utf-8") as out:
            subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    latest = (job / "checkpoints" / "latest").read_text().strip()
    source = job / "checkpoints" / latest / "concept.safetensors"
    shutil.copyfile(source, ctx.path("concept.safetensors"))
    status = json.loads(status_path.read_text())
    return {"checkpoint": str(source), "state": status["state"], "step": status.get("step"),
            "final_loss": _trainer_final_loss(job), "command": " ".join(command[1:])}


def _trainer_final_loss(job: Path) -> float:
    losses = [json.loads(line)["loss"] for line in (job / "events.jsonl").read_text().splitlines()
              if '"type": "step"' in line or '"type":"step"' in line]
    return float(np.mean(losses[-20:])) if losses else float("nan")


def concept_unet(ctx: Context):
    unet, _ = load_concept_model(ctx.path("concept.safetensors"))
    return unet


# ----------------------------------------------------------------------------------------------------------------
# the table, the grids and the sweep

ROWS: tuple[tuple[str, str, evaluate.Setup], ...] = (
    ("finetune_cfg", "fine-tune, plain CFG", evaluate.Setup("finetune")),
    ("finetune_prior", "fine-tune, GCFG prior uncond (ε₀ = base)", evaluate.Setup("finetune", prior="base")),
    ("base_concept", "base + concept UNet through GCFG (the paper's method)",
     evaluate.Setup("base", prior="base", concept_weight=1.0)),
    ("base", "base alone", evaluate.Setup("base")),
    ("dreambooth", "DreamBooth-style full fine-tune with captions", evaluate.Setup("dreambooth")),
)


def control_prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, background): colours and backgrounds the concept set never shows."""
    return [(world.prompt(colour, world.CONCEPT_SHAPE, background), colour, background)
            for background in CONTROL_BACKGROUNDS for colour in CONTROL_COLOURS]


def uncond_key(setup: evaluate.Setup) -> str:
    """The model whose unconditional prediction a setup uses as ε₀."""
    return setup.prior or setup.main


def measure(ctx: Context, setup: evaluate.Setup, cfg: float, seeds: int, concept, scale, concept_ref,
            prompts: list[tuple[str, str, str]] | None = None) -> dict:
    """Adherence and fidelity of one setup over the control prompts (default: all); also returns the images."""
    models = ctx.models(*{setup.main, uncond_key(setup)})
    per_prompt, all_readings, images = {}, [], []
    for text, colour, background in prompts or control_prompts():
        batch = evaluate.sample(models, setup, text, cfg, range(ctx.plan.seed0, ctx.plan.seed0 + seeds), concept)
        readings = detect.read_images(batch)
        per_prompt[text] = evaluate.adherence(readings, colour, background)
        all_readings.extend(readings)
        images.append(batch)
    return {
        "adherence": float(np.mean([value["both"] for value in per_prompt.values()])),
        "colour_adherence": float(np.mean([value["colour"] for value in per_prompt.values()])),
        "background_adherence": float(np.mean([value["background"] for value in per_prompt.values()])),
        "fidelity_fd": detect.concept_fidelity(all_readings, concept_ref, scale),
        "ring_rate": evaluate.ring_rate(all_readings),
        "per_prompt": per_prompt,
        "_images": np.stack(images),
    }


def grid_image(rows: list[np.ndarray]) -> Image.Image:
    """Rows of equal-sized uint8 images pasted into one grid with 2-px gaps."""
    gap, size = 2, world.SIZE
    width = max(len(row) for row in rows) * (size + gap) - gap
    canvas = np.full((len(rows) * (size + gap) - gap, width, 3), 255, dtype=np.uint8)
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            canvas[y * (size + gap):y * (size + gap) + size, x * (size + gap):x * (size + gap) + size] = image
    return Image.fromarray(canvas)


def wait_for_stage(ctx: Context, name: str) -> None:
    """Block until stage `name` has finished (it may be running beside this one, e.g. the concept UNet's training)."""
    import time

    while read_marker(ctx.cache, name) is None:
        log.info("waiting for stage %s to finish", name)
        time.sleep(30)


def stage_table(ctx: Context) -> dict:
    plan = ctx.plan
    scale, concept_ref, concept = feature_scale(ctx), concept_readings(ctx), None
    grids = ctx.path("grids")
    grids.mkdir(exist_ok=True)
    every = ctx.models("base", "finetune", "dreambooth")
    uncond = {key: uncond_readings(ctx, every, key, plan.uncond_seeds) for key in every}
    # The noise floor of the drift measure: the base against itself on other seeds.
    other_seeds = range(plan.seed0 + 10_000, plan.seed0 + 10_000 + plan.uncond_seeds)
    floor = evaluate.drift(detect.read_images(evaluate.unconditional(every, "base", other_seeds)), uncond["base"])
    rows = {}
    # The rows without the concept UNet first: its training may still be running beside this stage.
    for key, label, setup in sorted(ROWS, key=lambda row: row[2].concept_weight != 0):
        if setup.concept_weight and concept is None:
            wait_for_stage(ctx, "concept")
            concept = concept_unet(ctx)
        setup = dataclasses.replace(setup, concept_weight=plan.concept_weight) if setup.concept_weight else setup
        result = measure(ctx, setup, plan.cfg_scale, plan.table_seeds, concept, scale, concept_ref)
        images = result.pop("_images")
        result["drift"] = evaluate.drift(uncond[uncond_key(setup)], uncond["base"])
        result["label"], result["setup"] = label, dataclasses.asdict(setup)
        rows[key] = result
        grid_seeds = range(plan.seed0, plan.seed0 + plan.grid_seeds)
        uncond_images = evaluate.unconditional(every, uncond_key(setup), grid_seeds)
        grid_rows = [list(uncond_images)] + [list(batch[:plan.grid_seeds]) for batch in images]
        grid_image(grid_rows).save(grids / f"{key}.png", optimize=True)
        log.info("%s: adherence %.2f, fidelity FD %.2f, drift %s", key, result["adherence"], result["fidelity_fd"],
                 result["drift"])
    reference = {"concept_set_fd_floor": stage_result(ctx.cache, "decoder")["round_trip_concept_fidelity"],
                 "drift_floor": floor}
    return {"rows": rows, "reference": reference, "cfg_scale": plan.cfg_scale, "concept_weight": plan.concept_weight,
            "seeds_per_prompt": plan.table_seeds, "prompts": [p for p, _, _ in control_prompts()],
            "sampler": f"{evaluate.SAMPLER}, {evaluate.STEPS} steps"}


def sweep_prompts(count: int) -> list[tuple[str, str, str]]:
    """`count` control prompts, one per colour first, the backgrounds alternating."""
    by_colour = [[p for p in control_prompts() if p[1] == colour] for colour in CONTROL_COLOURS]
    ordered = [prompts[i % len(prompts)] for i, prompts in enumerate(by_colour)]
    ordered += [p for p in control_prompts() if p not in ordered]
    return ordered[:count]


def stage_sweep(ctx: Context) -> dict:
    plan = ctx.plan
    scale, concept_ref, concept = feature_scale(ctx), concept_readings(ctx), concept_unet(ctx)
    prompts = sweep_prompts(plan.sweep_prompts)
    cells = []
    for weight in plan.sweep_weights:
        for cfg in plan.sweep_cfg:
            setup = evaluate.Setup("base", prior="base", concept_weight=weight)
            result = measure(ctx, setup, cfg, plan.sweep_seeds, concept, scale, concept_ref, prompts)
            result.pop("_images")
            result.pop("per_prompt")
            cells.append({"row": "base_concept", "concept_weight": weight, "cfg_scale": cfg, **result})
            log.info("sweep w=%g cfg=%g: %s", weight, cfg, {k: round(v, 3) for k, v in result.items()})
    for key, _, setup in ROWS:
        if key not in plan.sweep_rows:
            continue
        for cfg in plan.sweep_cfg:
            result = measure(ctx, setup, cfg, plan.sweep_seeds, concept, scale, concept_ref, prompts)
            result.pop("_images")
            result.pop("per_prompt")
            cells.append({"row": key, "concept_weight": 0.0, "cfg_scale": cfg, **result})
    return {"cells": cells, "seeds_per_prompt": plan.sweep_seeds, "prompts": [p for p, _, _ in prompts]}


# ----------------------------------------------------------------------------------------------------------------
# docs: README tables and small figures


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def readme_tables(ctx: Context) -> str:
    table = stage_result(ctx.cache, "table")
    lines = ["| row | control-prompt adherence (colour and background) | concept fidelity FD ↓ | ring rate | "
             "unconditional drift TV ↓ | uncond. samples like the concept set |",
             "|---|---|---|---|---|---|"]
    for key, _, _ in ROWS:
        result = table["rows"][key]
        lines.append(f"| {result['label']} | {_pct(result['adherence'])} (colour {_pct(result['colour_adherence'])}, "
                     f"background {_pct(result['background_adherence'])}) | {result['fidelity_fd']:.2f} | "
                     f"{_pct(result['ring_rate'])} | {result['drift']['tv']:.2f} | "
                     f"{_pct(result['drift']['concept_share'])} |")
    sweep = stage_result(ctx.cache, "sweep")
    method = [cell for cell in sweep["cells"] if cell["row"] == "base_concept"]
    cfgs = sorted({cell["cfg_scale"] for cell in method})
    weights = sorted({cell["concept_weight"] for cell in method})
    lookup = {(cell["concept_weight"], cell["cfg_scale"]): cell for cell in method}
    lines += ["", "| concept weight \\ CFG scale | " + " | ".join(f"{c:g}" for c in cfgs) + " |",
              "|---|" + "---|" * len(cfgs)]
    for weight in weights:
        cells = [lookup[(weight, c)] for c in cfgs]
        lines.append(f"| {weight:g} | " + " | ".join(
            f"{_pct(cell['adherence'])} / {cell['fidelity_fd']:.2f}" for cell in cells) + " |")
    others = [cell for cell in sweep["cells"] if cell["row"] != "base_concept"]
    if others:
        lines += ["", "| row \\ CFG scale | " + " | ".join(f"{c:g}" for c in cfgs) + " |",
                  "|---|" + "---|" * len(cfgs)]
        labels = {key: label for key, label, _ in ROWS}
        for key in dict.fromkeys(cell["row"] for cell in others):
            cells = {cell["cfg_scale"]: cell for cell in others if cell["row"] == key}
            lines.append(f"| {labels[key]} | " + " | ".join(
                f"{_pct(cells[c]['adherence'])} / {cells[c]['fidelity_fd']:.2f}" for c in cfgs) + " |")
    return "\n".join(lines) + "\n"


def stage_docs(ctx: Context) -> dict:
    written = []
    if ctx.cache.name != "quick":
        DOCS_DIR.mkdir(exist_ok=True)
        sources = {f"paper-mini-{key}.png": ctx.path("grids", f"{key}.png") for key, _, _ in ROWS}
        sources.update({f"paper-mini-vae-{kind}.png": ctx.path(f"vae-round-trip-{kind}.png")
                        for kind in ("eval", "concept")})
        for name, source in sources.items():
            # 64 palette colours: a quarter of the size, and these flat images lose nothing visible.
            target = DOCS_DIR / name
            Image.open(source).convert("RGB").quantize(64).save(target, optimize=True)
            written.append(str(target.relative_to(REPO_ROOT)))
    ctx.path("README-section.md").write_text(readme_tables(ctx), encoding="utf-8")
    return {"figures": written, "readme_section": str(ctx.path("README-section.md"))}


# ----------------------------------------------------------------------------------------------------------------
# assets for a real WebUI


def install_assets(ctx: Context, webui_models: Path) -> list[str]:
    """Copy base, fine-tune and DreamBooth checkpoints (with their .yaml) and the concept model into a WebUI."""
    checkpoints = webui_models / "Stable-diffusion"
    concepts = webui_models / "GCFG"
    checkpoints.mkdir(parents=True, exist_ok=True)
    concepts.mkdir(parents=True, exist_ok=True)
    text_dir = arch.write_text_encoder_dir(checkpoints / "paper-mini-text-encoder")
    written = [str(text_dir)]
    for key in ("base", "finetune", "dreambooth"):
        target = checkpoints / f"paper-mini-{key}.safetensors"
        shutil.copyfile(ctx.path(f"{key}.safetensors"), target)
        written += [str(target), str(arch.write_webui_files(target, text_dir))]
    target = concepts / "paper-mini-rings.safetensors"
    shutil.copyfile(ctx.path("concept.safetensors"), target)
    written.append(str(target))
    return written


# ----------------------------------------------------------------------------------------------------------------


STAGE_FUNCTIONS = {
    "data": stage_data, "detectors": stage_detectors, "vae": stage_vae, "latents": stage_latents,
    "decoder": stage_decoder,
    "base": stage_base, "finetune": stage_finetune, "dreambooth": stage_dreambooth, "concept": stage_concept,
    "table": stage_table, "sweep": stage_sweep, "docs": stage_docs,
}
# What each stage's own result depends on; `stage_settings` adds the settings of the stages it reads, so that a
# change upstream (a longer base) reruns everything after it instead of leaving stale results.
OWN_SETTINGS = {
    "data": lambda p: [p.base_images, p.concept_images, p.eval_images],
    "detectors": lambda p: [p.eval_images, p.concept_images],
    "vae": lambda p: dataclasses.asdict(p.vae),
    "latents": lambda p: [p.base_images, p.concept_images],
    "decoder": lambda p: [dataclasses.asdict(p.decoder), p.round_trip_images],
    "base": lambda p: [dataclasses.asdict(p.base), p.text_seed, p.base_eval_seeds, p.base_eval_stride],
    "finetune": lambda p: [dataclasses.asdict(p.finetune), p.uncond_seeds, p.base_eval_seeds, p.base_eval_stride],
    "dreambooth": lambda p: [dataclasses.asdict(p.dreambooth), p.base_eval_seeds, p.base_eval_stride],
    "concept": lambda p: [p.concept_steps, p.concept_batch, p.concept_learning_rate],
    "table": lambda p: [p.table_seeds, p.uncond_seeds, p.cfg_scale, p.concept_weight, p.grid_seeds, p.seed0],
    "sweep": lambda p: [p.sweep_seeds, p.sweep_prompts, list(p.sweep_weights), list(p.sweep_cfg),
                        list(p.sweep_rows), p.seed0],
    "docs": lambda p: [],
}
READS = {
    "detectors": ("data",), "vae": ("data",), "latents": ("vae",), "decoder": ("latents",), "base": ("latents",),
    "finetune": ("base",), "dreambooth": ("base",), "concept": ("base",),
    "table": ("decoder", "finetune", "dreambooth", "concept"),
    "sweep": ("decoder", "finetune", "dreambooth", "concept"),
    "docs": ("table", "sweep"),
}


def stage_settings(name: str, plan: Plan) -> Any:
    """The stage's own settings and, if it reads other stages, theirs (recursively)."""
    own = OWN_SETTINGS[name](plan)
    reads = READS.get(name, ())
    return own if not reads else {"own": own, "reads": {dep: stage_settings(dep, plan) for dep in reads}}


def headline(ctx: Context) -> dict:
    out = {}
    for name in ("detectors", "decoder", "base", "finetune", "table"):
        try:
            out[name] = stage_result(ctx.cache, name)
        except RuntimeError:
            continue
    summary = {}
    if "table" in out:
        summary["table"] = {key: {"adherence": round(r["adherence"], 3), "fidelity_fd": round(r["fidelity_fd"], 3),
                                  "ring_rate": round(r["ring_rate"], 3), "drift_tv": round(r["drift"]["tv"], 3),
                                  "uncond_concept_share": round(r["drift"]["concept_share"], 3)}
                            for key, r in ((key, out["table"]["rows"][key]) for key, _, _ in ROWS)}
    if "base" in out:
        summary["base_caption_adherence"] = out["base"]["adherence"]
    if "detectors" in out:
        summary["detector_accuracy"] = {kind: value["accuracy"] for kind, value in out["detectors"].items()}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("stages", nargs="*", help=f"stages to run (default: all): {', '.join(STAGES)}; or 'assets'")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("PAPER_MINI_CACHE", "paper-mini-cache")),
                        help="cache folder (default: $PAPER_MINI_CACHE or ./paper-mini-cache)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1; on a shared machine more threads can be slower)")
    parser.add_argument("--quick", action="store_true", help="toy sizes into <cache>/quick (checks the pipeline)")
    parser.add_argument("--webui-dir", type=Path, help="for 'assets': the WebUI folder (or its models folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    cache = (args.cache / "quick" if args.quick else args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    ctx = Context(cache, plan, args.threads)
    if args.stages == ["assets"]:
        if args.webui_dir is None:
            parser.error("assets needs --webui-dir")
        models_dir = args.webui_dir if args.webui_dir.name == "models" else args.webui_dir / "models"
        written = install_assets(ctx, models_dir)
        print(json.dumps({"assets": written}))
        return 0
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)} or 'assets'")
    for name in args.stages or STAGES:
        try:
            run_stage(cache, name, stage_settings(name, plan), lambda name=name: STAGE_FUNCTIONS[name](ctx))
        except (CheckpointError, FileNotFoundError) as error:
            log.error("stage %s needs the earlier stages: %s", name, error)
            return 2
    print(json.dumps(headline(ctx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
