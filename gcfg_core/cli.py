"""Command line: ``python -m gcfg_core {sample,random-checkpoint} ...`` — GCFG text-to-image outside the WebUI.

``sample`` writes ``NNNNN-<seed>.png`` files carrying WebUI `parameters` text (the WebUI's PNG Info reads them)
and prints their paths on stdout; the progress bar goes to stderr. Bad input prints one line and exits with code 2.
``--demo`` builds tiny random models in memory, so the command runs in seconds with no files.
``random-checkpoint`` writes a random-weight SD 1 checkpoint file (ldm key layout) for trying the tools, e.g. the
trainer, without downloading a model; it generates noise, not pictures.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gcfg_core.console import ldm_chatter_filtered
from gcfg_core.params import PARAMS_BY_NAME, GCFGSettings
from gcfg_core.syntax import TermSyntaxError, format_terms, parse_terms

logger = logging.getLogger("gcfg.cli")

EXIT_USAGE = 2
_OUTPUT_NAME = re.compile(r"^(\d{5})-")
DEMO_PROMPT = "a photo of a cat"  # --demo without --prompt: the prompt term still takes part


class CliError(ValueError):
    """A usage problem reported as one line."""


def _scale(text: str) -> float | None:
    if text.strip().lower() == "classic":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'classic', got {text!r}") from None


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help once: not when the help already states its default, not for
    flags, and not for defaults that mean "not given" (None, empty), whose meaning the help spells out instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or action.nargs == 0 or default is argparse.SUPPRESS
                or default is None or default is False or default in ("", [])):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gcfg_core", description="Generalized classifier-free guidance "
                                     "(arXiv 2312.08195) for SD 1.x and SDXL, outside the WebUI.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="generate images with GCFG", description="Generate images with "
                                 "GCFG; prints the paths of the PNGs it writes.", formatter_class=_HelpFormatter)
    models = sample.add_argument_group("models")
    models.add_argument("--prior", type=Path, help="SD 1.x or SDXL checkpoint for the unconditional term (e.g. base "
                        "SD 1.5 or SDXL base); required unless --demo")
    models.add_argument("--model", type=Path, help="checkpoint for the prompts, of the prior's family (default: the "
                        "prior)")
    models.add_argument("--concept", type=Path, help="concept model file (.safetensors, text-free UNet); "
                        "without it there is no concept term")
    models.add_argument("--concept-weight", type=float, default=PARAMS_BY_NAME["concept_weight"].default,
                        help=PARAMS_BY_NAME["concept_weight"].help)
    models.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="a checkpoint for the terms that name it ('+2 @NAME prompt'), of the main model's "
                             "family; repeatable (default: none)")
    models.add_argument("--prediction", action="append", default=[], metavar="ROLE=KIND",
                        help="what an SDXL file predicts when it has no marker keys or metadata (or to override "
                             "them): ROLE is prior, main or a --checkpoint NAME, KIND is eps, v, eps-ztsnr or v-ztsnr "
                             "(ztsnr: zero-terminal-SNR schedule); repeatable (default: read from each file, else eps)")
    models.add_argument("--demo", action="store_true",
                        help="use tiny random models built in memory (no files; 64x64 px, 8 steps and the prompt "
                             f"{DEMO_PROMPT!r} unless given)")
    prompts = sample.add_argument_group("prompts")
    prompts.add_argument("--prompt", default=None,
                         help=f"the prompt, weight --cfg-scale (default: empty; {DEMO_PROMPT!r} with --demo)")
    prompts.add_argument("--negative-prompt", default="", help="the negative prompt (default: empty)")
    prompts.add_argument("--negative-scale", type=_scale, default=None,
                         help="negative prompt weight, or 'classic' (1 - CFG scale) (default: classic)")
    prompts.add_argument("--uncond-prompt", choices=PARAMS_BY_NAME["uncond_prompt"].choices,
                         default=PARAMS_BY_NAME["uncond_prompt"].default,
                         help=PARAMS_BY_NAME["uncond_prompt"].help)
    prompts.add_argument("--term", action="append", default=[], metavar="TERM",
                         help="extra term, repeatable: '<weight> [@model] [{start-end}] <prompt>', e.g. "
                              "'+4 in Van Gogh style' (default: none)")
    run = sample.add_argument_group("sampling")
    run.add_argument("--sampler", default="Euler", help="k-diffusion sampler by its WebUI name")
    run.add_argument("--scheduler", default="Automatic", help="schedule type: Automatic, Uniform, Karras, Exponential")
    run.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20, or 8 with --demo)")
    run.add_argument("--cfg-scale", type=float, default=7.0, help="weight of the prompt")
    run.add_argument("--seed", type=int, default=-1, help="-1 = random; image i uses seed + i")
    run.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 as in the WebUI (default: 512, "
                     "or 64 with --demo)")
    run.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 as in the WebUI (default: "
                     "512, or 64 with --demo)")
    run.add_argument("--batch-size", type=int, default=1, help="images per run")
    _add_sdxl_size_arguments(sample)
    run.add_argument("--clip-skip", type=int, default=1, help="use the CLIP text encoder's n-th last layer")
    run.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")

    text = "write a random-weight SD 1 checkpoint for trying the tools (it generates noise, not pictures)"
    random = commands.add_parser(
        "random-checkpoint", help=text, formatter_class=_HelpFormatter,
        description=text[0].upper() + text[1:] + ": the ldm key layout of an SD 1.5 .safetensors checkpoint, so "
        "the sampler, the trainer and the WebUI script load it like a real one. Use it to try the command lines "
        "without downloading a model; prints the file's path.")
    random.add_argument("out", type=Path, metavar="OUT.safetensors", help="output file")
    size = random.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="architecture", action="store_const", const="tiny",
                      help="SD 1.5 key names and block structure at tiny widths, about 40 MB; fast on a CPU (default)")
    size.add_argument("--full", dest="architecture", action="store_const", const="sd1",
                      help="full SD 1.5 size (1.07 billion parameters, about 4.3 GB in fp32)")
    size.add_argument("--sdxl-tiny", dest="architecture", action="store_const", const="sdxl-tiny",
                      help="SDXL base key names and block structure (70 transformer blocks) at tiny widths, about "
                      "100 MB")
    random.set_defaults(architecture="tiny")
    random.add_argument("--seed", type=int, default=0, help="weights seed; the same file for the same seed")
    return parser


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.strip().lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels such as 1024x1024, got {text!r}")
    return int(width), int(height)


def _crop(text: str) -> tuple[int, int]:
    top, sep, left = text.strip().partition(",")
    if not sep or not top.strip().isdigit() or not left.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected TOP,LEFT in pixels such as 0,0, got {text!r}")
    return int(top), int(left)


def _add_sdxl_size_arguments(sample: argparse.ArgumentParser) -> None:
    group = sample.add_argument_group("SDXL size conditioning", "What every image is conditioned on (SDXL models "
                                      "only); the WebUI sends the image's own size and crop 0,0.")
    group.add_argument("--original-size", type=_size, metavar="WxH", help="original image size (default: the image "
                       "size)")
    group.add_argument("--target-size", type=_size, metavar="WxH", help="target image size (default: the image size)")
    group.add_argument("--crop-top-left", type=_crop, metavar="TOP,LEFT", help="crop coordinates (default: 0,0)")


def write_random_checkpoint(out: Path, *, architecture: str = "tiny", seed: int = 0) -> Path:
    """Save a random-weight SD 1 model (`gcfg_core.configs` TINY or SD1) as an ldm-layout `.safetensors` file, or
    a tiny SDXL one (SDXL_TINY) in the sgm layout."""
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"{out}: the output file name must end in .safetensors")
    from gcfg_core.configs import SD1, TINY
    from gcfg_core.models import random_sd_model, save_sd_checkpoint

    if architecture == "sdxl-tiny":
        from gcfg_core.sdxl import random_sdxl_model, save_sdxl_checkpoint

        save_sdxl_checkpoint(random_sdxl_model(seed=seed), out)
        return out
    model = random_sd_model({"tiny": TINY, "sd1": SD1}[architecture], seed=seed)
    save_sd_checkpoint(model, out)
    return out


def _terms_text(lines: Sequence[str]) -> str:
    """The --term values as one terms box; each value must hold exactly one term."""
    for index, line in enumerate(lines, start=1):
        try:
            terms = parse_terms(line)
        except TermSyntaxError as error:
            raise CliError(f"--term #{index} {line!r}: column {error.column}: expected {error.expected}") from None
        if len(terms) != 1:
            raise CliError(f"--term #{index} {line!r}: expected exactly one term")
    return format_terms(term for line in lines for term in parse_terms(line))


def _demo_models():
    """(prior, main, concept UNet): tiny random SD 1.x-shaped models, deterministic."""
    from gcfg_core.configs import TINY
    from gcfg_core.models import random_sd_model
    from gcfg_core.nulltext import convert_to_nulltext, transformer_block_names

    prior, main = random_sd_model(TINY, seed=1), random_sd_model(TINY, seed=0)
    concept = random_sd_model(TINY, seed=2).unet
    generator = torch.Generator().manual_seed(2)
    vectors = {name: torch.randn(concept.get_submodule(name).norm1.normalized_shape[0], generator=generator) * 0.1
               for name in transformer_block_names(concept)}
    return prior, main, convert_to_nulltext(concept, vectors)


def _named_paths(values: Sequence[str], flag: str) -> dict[str, Path]:
    """`--checkpoint NAME=PATH` values; a name must be new, free of blanks and not a model slot."""
    from gcfg_core.terms import ModelSlot

    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path or any(char.isspace() for char in name):
            raise CliError(f"{flag} {value!r}: expected NAME=PATH with a name without blanks")
        if name in {slot.value for slot in ModelSlot} or name in named:
            raise CliError(f"{flag} {value!r}: the name {name!r} is " + ("a model slot" if name not in named else
                                                                           "given twice"))
        named[name] = Path(path)
    return named


def _prediction_overrides(values: Sequence[str], roles: set[str]):
    from gcfg_core.parameterization import Parameterization

    overrides = {}
    for value in values:
        role, sep, kind = value.partition("=")
        role = role.strip()
        if not sep or role not in roles:
            raise CliError(f"--prediction {value!r}: expected ROLE=KIND with ROLE one of {', '.join(sorted(roles))}")
        try:
            overrides[role] = Parameterization.parse(kind)
        except ValueError as error:
            raise CliError(f"--prediction {value!r}: {error}") from None
    return overrides


@dataclasses.dataclass(frozen=True)
class _ModelFiles:
    """The checked model files of a run: extra checkpoints by name, parameterisation overrides by role, the main
    model's family."""

    checkpoints: dict
    overrides: dict
    main_family: object


def _check_model_files(args: argparse.Namespace) -> _ModelFiles:
    """Every model file exists, the overrides parse and the families match, from the headers alone."""
    from gcfg_core.model_files import file_family, require_matching_files

    if args.prior is None:
        raise CliError("--prior PATH is required (or use --demo)")
    checkpoints = _named_paths(args.checkpoint, "--checkpoint")
    files = [("--prior", args.prior), ("--model", args.model), ("--concept", args.concept),
             *((f"--checkpoint {name}", path) for name, path in checkpoints.items())]
    for flag, path in files:
        if path is not None and not path.is_file():
            raise CliError(f"{flag}: file not found: {path}")
    overrides = _prediction_overrides(args.prediction, {"prior", "main", *checkpoints})
    if args.model is None and "main" in overrides:  # the prior is the main model
        if overrides.setdefault("prior", overrides["main"]) != overrides["main"]:
            raise CliError("--prediction: prior and main are the same file (no --model) but got different kinds")
    main_path = args.model or args.prior
    main_family = file_family(main_path)
    others = {"prior": (args.prior, file_family(args.prior))} if args.model else {}
    others.update({f"checkpoint {name!r}": (path, file_family(path)) for name, path in checkpoints.items()})
    require_matching_files((main_path, main_family), others)
    if args.concept is not None:
        _check_concept_file(args.concept, main_path, main_family)
    return _ModelFiles(checkpoints, overrides, main_family)


def _check_concept_file(concept: Path, main_path: Path, main_family) -> None:
    """The concept file's own family (from its header) must be the main model's; the message names both."""
    from gcfg_core.concept_file import (
        ConceptFileError,
        concept_family_for,
        read_concept_metadata,
        require_concept_family,
    )

    try:
        metadata = read_concept_metadata(concept)
        wanted = concept_family_for(main_family)
        if wanted is None:
            raise CliError(f"--concept {concept}: concept models guide SD 1.x and SDXL main models; the main model "
                           f"{main_path} is {main_family.label}")
        require_concept_family(concept, metadata, wanted, main=str(main_path))
    except ConceptFileError as error:
        raise CliError(f"--concept {error}") from None


def _load_models(args: argparse.Namespace, files: _ModelFiles):
    """(prior, main, concept UNet or None, the concept's infotext name, {name: checkpoint})."""
    from gcfg_core.concept_file import concept_family_for, concept_label, load_concept_model
    from gcfg_core.model_files import load_checkpoint

    def load(path: Path, role: str):
        return load_checkpoint(path, device=args.device, parameterization=files.overrides.get(role))

    prior = load(args.prior, "prior")
    main = load(args.model, "main") if args.model else prior
    extras = {name: load(path, name) for name, path in files.checkpoints.items()}
    if args.concept is None:
        return prior, main, None, "", extras
    concept, metadata = load_concept_model(args.concept, device=args.device,
                                           expected_family=concept_family_for(files.main_family))
    return prior, main, concept, concept_label(args.concept, metadata), extras


def _sdxl_size(args: argparse.Namespace, main_family, width: int, height: int):
    """The size conditioning the flags give, for an SDXL main model (None: the image's own size, crop 0,0)."""
    from gcfg_core.checkpoint import ModelFamily, base_family
    from gcfg_core.conditioning import SizeConditioning

    given = [flag for flag, value in (("--original-size", args.original_size), ("--target-size", args.target_size),
                                      ("--crop-top-left", args.crop_top_left)) if value is not None]
    if not given:
        return None
    if base_family(main_family) is not ModelFamily.SDXL:
        raise CliError(f"{', '.join(given)}: size conditioning applies to SDXL models; the main model is "
                       f"{main_family.label}")
    original = args.original_size or (width, height)
    target = args.target_size or (width, height)
    return SizeConditioning((original[1], original[0]), args.crop_top_left or (0, 0), (target[1], target[0]))


# Request and settings fields -> the flag that sets them, for messages; a message starting with the key is about it.
_FLAGS = {"cfg_scale": "--cfg-scale", "steps": "--steps", "batch_size": "--batch-size", "clip_skip": "--clip-skip",
          "width": "--width", "height": "--height", "seed": "--seed", "concept_weight": "--concept-weight",
          "negative_scale": "--negative-scale", "unknown sampler": "--sampler:",
          "unknown schedule type": "--scheduler:"}


def _named_by_flag(error: ValueError) -> CliError:
    message = str(error)
    for key, flag in _FLAGS.items():
        if message.startswith(key):
            return CliError(f"{flag} {message}" if flag.endswith(":") else flag + message[len(key):])
    return CliError(message)


def _checked_request(args: argparse.Namespace, settings: GCFGSettings, prompt: str):
    """The request the flags describe; a bad value is a `CliError` naming its flag (no model needed)."""
    from gcfg_core.pipeline import GenerationRequest

    try:
        torch.device(args.device)
    except RuntimeError:
        raise CliError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    demo_size = 64 if args.demo else 512
    try:
        return GenerationRequest(
            prompt=prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
            steps=args.steps if args.steps is not None else (8 if args.demo else 20),
            sampler=args.sampler, scheduler=args.scheduler, seed=args.seed,
            width=args.width if args.width is not None else demo_size,
            height=args.height if args.height is not None else demo_size,
            batch_size=args.batch_size, clip_skip=args.clip_skip, gcfg=settings,
        )
    except ValueError as error:
        raise _named_by_flag(error) from None


def _checked_settings(args: argparse.Namespace) -> GCFGSettings:
    terms = _terms_text(args.term)
    try:
        return GCFGSettings(enabled=True, concept_weight=args.concept_weight, negative_scale=args.negative_scale,
                            terms=terms, uncond_prompt=args.uncond_prompt)
    except ValueError as error:
        raise _named_by_flag(error) from None


def _next_index(out: Path) -> int:
    numbers = [int(match.group(1)) for path in out.glob("*.png") if (match := _OUTPUT_NAME.match(path.name))]
    return max(numbers, default=-1) + 1


def run_sample(args: argparse.Namespace) -> list[Path]:
    from gcfg_core.fileio import folder_write_problem
    from gcfg_core.pipeline import generate
    from gcfg_core.pngmeta import save_png

    # Every value, the output folder and the model files are checked before any model is loaded.
    prompt = args.prompt if args.prompt is not None else (DEMO_PROMPT if args.demo else "")
    request = _checked_request(args, _checked_settings(args), prompt)
    problem = folder_write_problem(args.out)
    if problem:
        raise CliError(f"--out {str(args.out)!r}: cannot write there ({problem})")
    if not args.demo:
        files = _check_model_files(args)
        request = dataclasses.replace(request, sdxl_size=_sdxl_size(args, files.main_family, request.width,
                                                                    request.height))

    if args.demo:
        prior, main, concept = _demo_models()
        extras: dict = {}
        concept_name = "demo-concept"
    else:
        prior, main, concept, concept_name, extras = _load_models(args, files)
    settings = dataclasses.replace(request.gcfg, prior=prior.name if main is not prior else "", concept=concept_name)
    request = dataclasses.replace(request, gcfg=settings)
    result = generate(request, prior=prior, main=main, concept_unet=concept, extra_models=extras,
                      progress=not args.no_progress)
    start = _next_index(args.out)
    paths = []
    for offset, (image, seed, infotext) in enumerate(zip(result.images, result.seeds, result.infotexts, strict=True)):
        paths.append(save_png(image, args.out / f"{start + offset:05d}-{seed}.png", infotext))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    try:
        # stdout is reserved for the saved paths: anything printed goes to stderr, ldm's build messages only
        # with --verbose.
        with ldm_chatter_filtered(verbose=getattr(args, "verbose", False), target=sys.stderr):
            if args.command == "random-checkpoint":
                paths = [write_random_checkpoint(args.out, architecture=args.architecture, seed=args.seed)]
            else:
                paths = run_sample(args)
    except (ValueError, OSError) as error:  # bad input (incl. checkpoint/concept/term errors) or unreadable files
        sys.stderr.write(f"error: {error}\n")
        return EXIT_USAGE
    for path in paths:
        sys.stdout.write(f"{path}\n")
    return 0
