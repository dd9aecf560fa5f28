"""`python -m trainer {prepare,train,resume,sample,status,demo-data}`: the concept-UNet trainer's command line.

Multi-GPU / multi-node: `accelerate launch [--multi_gpu --num_processes N ...] -m trainer train ...` runs the
same command in every process (Hugging Face Accelerate, DDP); only process 0 writes the job folder. On CPUs,
`accelerate launch --multi_gpu --num_processes N -m trainer train ... --device cpu` runs N gloo processes.
Bad input ends the program with one line on stderr and exit code 2; a run that fails (non-finite loss) exits 1.
A job the machine cannot hold (disk, memory) is refused by the preflight right after the dataset scan, exit code 2.

To try the trainer with no files of your own: `python -m gcfg_core random-checkpoint base.safetensors` (a tiny
random-weight SD 1 model) and `python -m trainer demo-data DIR` (synthetic images of one simple concept).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gcfg_core.console import ldm_chatter_filtered
from trainer.config import (
    DEVICE_RE,
    RESUME_FIXED_REASONS,
    RESUME_MUTABLE_FIELDS,
    ConfigError,
    FieldSpec,
    TrainConfig,
    changed_fixed_fields,
    check_resume_compatible,
    check_resume_length,
)
from trainer.config import config_fields as _config_fields
from trainer.progress import format_duration

log = logging.getLogger("gcfg.trainer.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """A command-line mistake the user can fix (reported as one line, exit code 2)."""


def is_main_process() -> bool:
    """Process 0 of an `accelerate launch`/torchrun job (RANK is set by the launcher), or a plain run."""
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------------------------
# flags generated from the config fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_text(spec: FieldSpec, value: object) -> str:
    """A config value as the user would type it after its flag (`--flip`/`--no-flip` for booleans)."""
    if spec.type is bool:
        return _flag(spec.name) if value else "--no-" + _flag(spec.name)[2:]
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple | list):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def _flag_with_value(spec: FieldSpec, value: object) -> str:
    return _value_text(spec, value) if spec.type is bool else f"{_flag(spec.name)} {_value_text(spec, value)}"


def _add_config_flags(parser: argparse.ArgumentParser, fields: Sequence[FieldSpec], *, title: str,
                      shown: TrainConfig | None = None, shown_label: str = "default") -> None:
    """One flag per field; its help ends with the default, or with `shown`'s value (a job's stored config)."""
    group = parser.add_argument_group(title)
    for spec in fields:
        text = spec.help.replace("%", "%%")  # argparse formats help text with %
        value = getattr(shown, spec.name) if shown is not None else spec.default
        if spec.required and shown is None:
            text += " (required unless the --config file has it)"
        elif shown is not None or spec.type is bool or value not in (None, ()):
            text += f" ({shown_label}: {_value_text(spec, value)})".replace("%", "%%")
        group.add_argument(_flag(spec.name), **_flag_kwargs(spec, text))


def _flag_kwargs(spec: FieldSpec, help_text: str) -> dict:
    kwargs: dict = {"dest": spec.name, "default": None, "help": help_text}
    if spec.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif spec.type is tuple:
        kwargs.update(nargs="*", type=int if spec.name == "preview_seeds" else str)
        kwargs["metavar"] = "SEED" if spec.name == "preview_seeds" else "PROMPT"
    elif isinstance(spec.type, type) and issubclass(spec.type, enum.Enum):
        kwargs["choices"] = spec.choices
    else:
        kwargs["type"] = spec.type
    return kwargs


def _add_fixed_flags(parser: argparse.ArgumentParser, fields: Sequence[FieldSpec]) -> None:
    """Flags of fields that may not change on resume: accepted (hidden from the help) so that giving one gets a
    message saying why, instead of argparse's "unrecognized arguments"."""
    for spec in fields:
        parser.add_argument(_flag(spec.name), **_flag_kwargs(spec, argparse.SUPPRESS))


def _overrides(args: argparse.Namespace, fields: Sequence[FieldSpec]) -> dict:
    return {spec.name: getattr(args, spec.name) for spec in fields if getattr(args, spec.name, None) is not None}


_FIELD_TOKEN = re.compile(r"(?<![\w-])(" + "|".join(sorted((s.name for s in _config_fields()), key=len, reverse=True))
                          + r")(?=[=\[]| cannot change| ×)")


def spelled_as_flags(message: str, given: set[str], source: str | None) -> str:
    """A config message with each field written as the flag the user typed (`learning_rate=2` -> `--learning-rate=2`).

    Fields that were not given as flags but come from a config file keep their name, and the message says which
    file; fields that took their default are written as the flag that sets them.
    """
    from_file = []

    def spell(match: re.Match) -> str:
        name = match.group(1)
        if name in given or source is None:
            return _flag(name)
        from_file.append(name)
        return name

    text = _FIELD_TOKEN.sub(spell, message)
    return f"{text} (from {source}; a flag overrides it)" if from_file else text


@contextlib.contextmanager
def _flag_errors(given: set[str], source: str | None) -> Iterator[None]:
    """Config and preflight problems as one-line usage errors that name the flags."""
    from trainer.preflight import PreflightError

    try:
        yield
    except (ConfigError, PreflightError) as exc:
        raise UsageError(spelled_as_flags(str(exc), given, source)) from exc


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of `prepare`/`train`: the --config file (if any) with the flags given on top."""
    overrides = _overrides(args, _config_fields())
    if args.config:
        return TrainConfig.load(args.config).with_overrides(**overrides)
    missing = [_flag(spec.name) for spec in _config_fields() if spec.required and spec.name not in overrides]
    if missing:
        raise UsageError(f"give --config FILE or all of {', '.join(missing)}")
    return TrainConfig(**overrides)


# ----------------------------------------------------------------------------------------------------------------
# commands


def _open_job(config: TrainConfig, *, allow_existing_checkpoints: bool):
    from trainer import checkpoints
    from trainer.jobfolder import JobFolder

    job = JobFolder(config.job_dir)
    if not allow_existing_checkpoints and checkpoints.latest_checkpoint(job.checkpoints_dir) is not None:
        raise UsageError(f"job {config.job_dir!r} already has checkpoints; continue it with "
                         f"`python -m trainer resume {config.job_dir}` or choose a new --job-dir")
    if is_main_process():
        job.create()
        config.save(job.config_path)
        from trainer.jobfolder import configure_file_logging

        configure_file_logging(job)
    return job


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_writable_folder(path: str | os.PathLike, flag: str) -> None:
    from gcfg_core.fileio import folder_write_problem

    problem = folder_write_problem(path)
    if problem:
        raise UsageError(f"{flag} {str(path)!r}: cannot write there ({problem})")


def validate_for_run(config: TrainConfig) -> None:
    """Every check that needs no dataset scan: values, paths, the process split, mixed precision on the device;
    then the job folder is created and written to, so that a folder we cannot use fails now, not after the scan."""
    from trainer.preflight import check_mixed_precision

    config.validate(check_paths=True, num_processes=_world_size())
    check_mixed_precision(config)
    if is_main_process():
        _check_writable_folder(config.job_dir, "--job-dir")


def _run_config(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    given = set(_overrides(args, _config_fields()))
    with _flag_errors(given, args.config):
        config = config_from_args(args)
        validate_for_run(config)
    return config, given


def cmd_prepare(args: argparse.Namespace) -> int:
    from trainer.loop import prepare

    config, given = _run_config(args)
    job = _open_job(config, allow_existing_checkpoints=True)
    with _flag_errors(given, args.config):
        prepared = prepare(config, job, progress=not args.quiet, num_processes=_world_size())
    sys.stdout.write(f"prepared {config.job_dir}: {prepared.num_images} images ({prepared.num_skipped} skipped), "
                     f"latent cache and null-text vectors ready\n")
    sys.stdout.write("buckets: " + ", ".join(f"{name} {count}" for name, count in prepared.buckets.items()) + "\n")
    return EXIT_OK


def _run(config: TrainConfig, job, *, resume: bool, quiet: bool) -> int:
    from trainer.jobfolder import JobState
    from trainer.loop import train
    from trainer.stopping import StopFileFlag, stop_on_break

    stop = StopFileFlag(job=job)  # the job manager's stop file works where signals do not (Windows)
    with stop_on_break(stop):
        result = train(config, job, resume=resume, stop=stop, progress=not quiet)
    if is_main_process():
        sys.stdout.write(result.message + "\n")
    return EXIT_FAILED if result.state == JobState.FAILED else EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    config, given = _run_config(args)
    job = _open_job(config, allow_existing_checkpoints=False)
    with _flag_errors(given, args.config):
        return _run(config, job, resume=False, quiet=args.quiet)


def _fixed_field_message(old: TrainConfig, new: TrainConfig, changed: list[str], config_path: Path) -> str:
    specs = {spec.name: spec for spec in _config_fields()}
    parts = [f"{_flag(name)} is fixed for this job: {RESUME_FIXED_REASONS.get(name, 'it defines the run')} "
             f"(this job: {_flag_with_value(specs[name], getattr(old, name))})" for name in changed]
    asked = " ".join(_flag_with_value(specs[name], getattr(new, name)) for name in changed)
    return ("; ".join(parts) + f". To train with {asked}, start a new job from this one's settings: python -m "
            f"trainer train --config {config_path} {asked} --job-dir NEW_DIR --name NEW_NAME")


def _current_step(job) -> int:
    from trainer.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(job.checkpoints_dir)
    return checkpoint.step if checkpoint is not None else 0


def cmd_resume(args: argparse.Namespace) -> int:
    from trainer.jobfolder import JobFolder

    job = JobFolder(args.job_dir)
    if not job.config_path.is_file():
        raise UsageError(f"{args.job_dir!r} is not a job folder (no {job.config_path.name})")
    given = set(_overrides(args, _config_fields()))
    source = str(job.config_path)
    with _flag_errors(given, source):
        old = TrainConfig.load(job.config_path)
        new = old.with_overrides(**_overrides(args, _config_fields()))
        changed = changed_fixed_fields(old, new)
        if changed:
            raise UsageError(_fixed_field_message(old, new, changed, job.config_path))
        check_resume_compatible(old, new)
        # Before anything is written: a shorter run would leave status.json at step 20 of 10.
        check_resume_length(new, _current_step(job))
        validate_for_run(new)
    if is_main_process():
        new.save(job.config_path)
        from trainer.jobfolder import configure_file_logging

        configure_file_logging(job)
    with _flag_errors(given, source):
        return _run(new, job, resume=True, quiet=args.quiet)


def _sample_spec(args: argparse.Namespace, trained: dict):
    """The preview grid the `sample` flags ask for, checked before any model is loaded (errors name the flag)."""
    from trainer.previews import PreviewSpec

    spec = PreviewSpec(
        prompts=tuple(args.prompts if args.prompts is not None else trained.get("preview_prompts", ())),
        seeds=tuple(args.seeds if args.seeds is not None else trained.get("preview_seeds", (0, 1, 2, 3))),
        concept_weight=args.concept_weight if args.concept_weight is not None
        else trained.get("preview_concept_weight", 2.5),
        steps=args.steps if args.steps is not None else trained.get("preview_steps", 25),
        sampler=args.sampler or trained.get("preview_sampler", "DPM++ 2M"),
        size=args.size or trained.get("resolution", 512),
    )
    if not spec.seeds:
        raise UsageError("--seeds must name at least one seed")
    # a message that starts with a request field is about that field; the prefix becomes the flag
    flags = {"steps": "--steps", "concept_weight": "--concept-weight", "width": "--size", "height": "--size",
             "seed": "--seeds", "unknown sampler": "--sampler:"}
    try:
        spec.requests()  # every value through the sampler's own checks
    except ValueError as exc:
        message = str(exc)
        key = next((k for k in flags if message.startswith(k)), None)
        if key is None:
            raise UsageError(message) from None
        flag = flags[key]
        raise UsageError(f"{flag} {message}" if flag.endswith(":") else flag + message[len(key):]) from None
    return spec


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from gcfg_core.checkpoint import CheckpointError
    from gcfg_core.concept_file import (
        ConceptFileError,
        concept_family_for,
        load_concept_model,
        read_concept_metadata,
        require_concept_family,
    )
    from gcfg_core.model_files import file_family, load_checkpoint
    from trainer.checkpoints import resolve_checkpoint
    from trainer.previews import render_grid, save_png

    # everything that can be checked is checked before the models load
    if not DEVICE_RE.match(args.device):
        raise UsageError(f"--device {args.device!r} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if not Path(args.prior).is_file():
        raise UsageError(f"--prior {args.prior!r} is not an existing file")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a folder; give the path of the PNG to write")
    _check_writable_folder(out.parent, "--out")
    source = Path(args.source)
    concept_path = source if source.is_file() else resolve_checkpoint(source).concept_path
    metadata = read_concept_metadata(concept_path)
    try:
        prior_family = file_family(args.prior)
    except CheckpointError as exc:
        raise UsageError(f"--prior {exc}") from None
    family = concept_family_for(prior_family)
    if family is None:
        raise UsageError(f"--prior {args.prior!r} is {prior_family.label}; concept models guide SD 1.x and SDXL models")
    try:
        require_concept_family(concept_path, metadata, family, main=f"(--prior) {args.prior}")
    except ConceptFileError as exc:
        raise UsageError(str(exc)) from None
    spec = _sample_spec(args, metadata.train_config or {})

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    concept, metadata = load_concept_model(concept_path, device=device, dtype=dtype, expected_family=family)
    prior = load_checkpoint(args.prior, device=device, dtype=dtype, compute_hash=False)
    grid, description = render_grid(spec, prior, concept)
    out = save_png(grid, out, f"{description}; concept {concept_path} ({metadata.steps} steps)")
    sys.stdout.write(f"wrote {out}\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# demo data: a synthetic one-concept dataset for trying the trainer


def demo_image(rng: np.random.Generator, size: int) -> Image.Image:
    """One image of the demo concept: a warm-coloured disc on a two-colour vertical gradient.

    Position, radius, disc colour and background are jittered per image; the concept (a round orange-red blob
    on a cooler background) stays the same, so a trained concept model has one thing to learn.
    """
    top, bottom = rng.uniform(20, 200, 3), rng.uniform(20, 200, 3)
    rows = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (top * (1 - rows) + bottom * rows) * np.array([0.7, 0.9, 1.1])  # cooler than the disc
    pixels = np.broadcast_to(background, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    supersample = 4  # draw large and shrink: antialiased edges
    big = image.resize((size * supersample, size * supersample), Image.Resampling.NEAREST)
    radius = rng.uniform(0.18, 0.32) * size * supersample
    cx, cy = rng.uniform(radius, size * supersample - radius, 2)
    colour = tuple(int(c) for c in np.array([235, 110, 40]) + rng.integers(-25, 26, 3))
    ImageDraw.Draw(big).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    return big.resize((size, size), Image.Resampling.LANCZOS)


def write_demo_dataset(folder: str | os.PathLike, *, count: int = 16, size: int = 64, seed: int = 0) -> list[Path]:
    """`count` demo-concept PNGs (`demo-0000.png`, ...) of `size`² pixels in `folder`; the same files for a seed."""
    if count < 1:
        raise UsageError(f"--count={count} must be ≥ 1")
    if size < 16:
        raise UsageError(f"--size={size} must be ≥ 16")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"demo-{index:04d}.png"
        demo_image(rng, size).save(path)
        paths.append(path)
    return paths


def cmd_demo_data(args: argparse.Namespace) -> int:
    paths = write_demo_dataset(args.folder, count=args.count, size=args.size, seed=args.seed)
    sys.stdout.write(f"wrote {len(paths)} demo images ({args.size}x{args.size} px) to {args.folder}\n")
    return EXIT_OK


def status_summary(job) -> dict:
    """The effective status of a job plus its last loss and newest checkpoint, as plain data."""
    from trainer.checkpoints import latest_checkpoint

    status = job.effective_status()
    if status is None:
        raise UsageError(f"{str(job.path)!r} has no status.json (not a job folder, or never started)")
    last_loss = next((e["loss"] for e in reversed(job.read_events())
                      if e.get("type") == "step" and isinstance(e.get("loss"), int | float)), None)
    checkpoint = latest_checkpoint(job.checkpoints_dir)
    return {**status.to_dict(), "last_loss": last_loss,
            "latest_checkpoint": str(checkpoint.path) if checkpoint else None}


def cmd_status(args: argparse.Namespace) -> int:
    from trainer.jobfolder import JobFolder

    summary = status_summary(JobFolder(args.job_dir))
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return EXIT_OK
    speed = summary["images_per_second"]
    loss = summary["last_loss"]
    lines = [
        f"job        {args.job_dir}",
        f"state      {summary['state']}" + (f"  ({summary['message']})" if summary["message"] else ""),
        f"step       {summary['step']} / {summary['total_steps']}",
        f"loss       {loss:.4g}" if loss is not None else "loss       -",
        f"speed      {speed:.2f} images/s" if speed else "speed      -",
        f"eta        {format_duration(summary['eta_seconds'])}",
        f"checkpoint {summary['latest_checkpoint'] or '-'}",
    ]
    if summary["last_error"]:
        lines.append(f"error      {summary['last_error']}")
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# parser and entry point


def _resume_fields() -> tuple[FieldSpec, ...]:
    # The job folder and name come from the positional JOB_DIR; only settings that may change are offered.
    return tuple(s for s in _config_fields() if s.name in RESUME_MUTABLE_FIELDS and s.name not in ("job_dir", "name"))


def _fixed_fields() -> tuple[FieldSpec, ...]:
    return tuple(s for s in _config_fields() if s.name not in RESUME_MUTABLE_FIELDS)


def _common_options(default: object) -> argparse.ArgumentParser:
    """-q/-v, accepted before the command (`default` False) and after it (`default` SUPPRESS keeps the first)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bar or progress lines, warnings and errors only")
    common.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug log lines, and the build messages of the ldm model code")
    return common


def _stored_config_for_help(argv: Sequence[str]) -> TrainConfig | None:
    """For `resume JOB_DIR --help`: the job's stored config, read before parsing so the help can show its values."""
    if not {"-h", "--help"} & set(argv) or "resume" not in argv:
        return None
    rest = list(argv)[list(argv).index("resume") + 1:]
    job_dir = next((a for a in rest if not a.startswith("-")), None)
    if job_dir is None:
        return None
    try:
        return TrainConfig.load(Path(job_dir) / "config.json")
    except ConfigError:
        return None


def build_parser(resume_job: TrainConfig | None = None) -> argparse.ArgumentParser:
    """The parser; `resume_job` (a job's stored config) makes `resume --help` show that job's values."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0],
                                     parents=[_common_options(False)])
    common = _common_options(argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, func, text in (("prepare", cmd_prepare, "scan images, build the latent cache, calibrate null-text"),
                             ("train", cmd_train, "create a job folder and train (prepares first if needed)")):
        p = sub.add_parser(name, help=text, description=text, parents=[common])
        p.add_argument("--config", metavar="FILE",
                       help="config JSON (e.g. a job's config.json); flags given on top override its values")
        _add_config_flags(p, _config_fields(), title="training config (each overrides the --config file)")
        p.set_defaults(func=func)

    text = "continue a stopped, interrupted or failed job from its newest checkpoint"
    fixed = ", ".join(_flag(s.name) for s in _fixed_fields() if s.name not in ("job_dir", "name"))
    shown = ("shown below" if resume_job is not None else "`python -m trainer resume JOB_DIR --help` shows them")
    p = sub.add_parser("resume", help=text, parents=[common], description=(
        f"{text[0].upper()}{text[1:]}. Flags not given keep the job's stored values ({shown}). These settings are "
        f"fixed for a job, because its latent cache, data order and optimizer state depend on them: {fixed}."))
    p.add_argument("job_dir", metavar="JOB_DIR",
                   help="the job folder (made by `train` or `prepare`, or by the WebUI's training tab)")
    if resume_job is not None:
        _add_config_flags(p, _resume_fields(), shown=resume_job, shown_label="this job",
                          title=f"settings that may change on resume (this job: {resume_job.name})")
    else:
        group = p.add_argument_group("settings that may change on resume (default: the job's stored value)")
        for spec in _resume_fields():
            group.add_argument(_flag(spec.name), **_flag_kwargs(spec, spec.help.replace("%", "%%")))
    _add_fixed_flags(p, _fixed_fields())
    p.set_defaults(func=cmd_resume)

    text = "GCFG preview grid of a concept model (prior uncond + concept), with the job's preview settings"
    p = sub.add_parser("sample", help=text, description=text + "; each flag overrides one of them.",
                       parents=[common])
    p.add_argument("source", metavar="CHECKPOINT_OR_JOB",
                   help="a concept .safetensors file, a checkpoint folder or a job folder (its latest checkpoint)")
    p.add_argument("--prior", required=True, help="base SD 1.5 checkpoint file (unconditional term, VAE, text)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--prompts", nargs="*", default=None, metavar="PROMPT",
                   help="control prompts, one grid row each below the concept-only row (default: the job's "
                        "preview_prompts)")
    p.add_argument("--seeds", nargs="*", type=int, default=None, metavar="SEED",
                   help="seeds, one grid column each (default: the job's preview_seeds)")
    p.add_argument("--concept-weight", type=float, default=None,
                   help="GCFG weight of the concept term (default: the job's preview_concept_weight, else 2.5)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the job's preview_steps, else 25)")
    p.add_argument("--sampler", default=None,
                   help="k-diffusion sampler by its WebUI name, e.g. 'DPM++ 2M' or 'Euler a' (default: the job's "
                        "preview_sampler, else DPM++ 2M)")
    p.add_argument("--size", type=int, default=None,
                   help="image width and height in pixels, a multiple of 8 (default: the training resolution)")
    p.add_argument("--device", default="auto",
                   help="'auto' (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps' (default: auto)")
    p.set_defaults(func=cmd_sample)

    text = "print a job's state, progress, speed and ETA"
    p = sub.add_parser("status", help=text, description=text + ".", parents=[common])
    p.add_argument("job_dir", metavar="JOB_DIR", help="the job folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    text = ("write synthetic images of one simple concept (a coloured disc on a varying background) to try the "
            "trainer with no dataset of your own")
    p = sub.add_parser("demo-data", help=text, description=text + "; the same files for the same --seed.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, parents=[common])
    p.add_argument("folder", metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--count", type=int, default=16, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of positions, sizes and colours")
    p.set_defaults(func=cmd_demo_data)
    return parser


class _ConsoleHandler(logging.StreamHandler):
    """The command line's handler: writes to whatever `sys.stderr` is now (tests and notebooks replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging(quiet: bool, verbose: bool = False) -> None:
    logger = logging.getLogger("gcfg")
    handler = next((h for h in logger.handlers if isinstance(h, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    # The level sits on the handler: the job's train.log (trainer.jobfolder) keeps INFO even with --quiet.
    if quiet or not is_main_process():
        handler.setLevel(logging.WARNING)
    else:
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your input": reported in one line with exit code 2, no traceback."""
    from gcfg_core.checkpoint import CheckpointError as ModelFileError
    from gcfg_core.concept_file import ConceptFileError
    from trainer.checkpoints import CheckpointError
    from trainer.data import DatasetError
    from trainer.preflight import PreflightError

    return (UsageError, ConfigError, CheckpointError, ConceptFileError, ModelFileError, DatasetError, PreflightError,
            FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the trainer never downloads; fail fast instead
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_stored_config_for_help(argv)).parse_args(argv)
    _configure_logging(args.quiet, args.verbose)
    with ldm_chatter_filtered(verbose=args.verbose):
        try:
            return args.func(args)
        except _user_errors() as exc:  # (importing them loads ldm: inside the filter)
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_USAGE
        except KeyboardInterrupt:  # a second Ctrl-C during the final save
            sys.stderr.write("error: interrupted\n")
            return 130
