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
                                     "(arXiv 2312.08195) for SD 1.x, outside the WebUI.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="generate images with GCFG", description="Generate images with "
                                 "GCFG; prints the paths of the PNGs it writes.", formatter_class=_HelpFormatter)
    models = sample.add_argument_group("models")
    models.add_argument("--prior", type=Path, help="SD 1.x checkpoint for the unconditional term (e.g. base SD 1.5); "
                        "required unless --demo")
    models.add_argument("--model", type=Path, help="SD 1.x checkpoint for the prompts (default: the prior)")
    models.add_argument("--concept", type=Path, help="concept model file (.safetensors, text-free UNet); "
                        "without it there is no concept term")
    models.add_argument("--concept-weight", type=float, default=PARAMS_BY_NAME["concept_weight"].default,
                        help=PARAMS_BY_NAME["concept_weight"].help)
    models.add_argument("--demo", action="store_true",
                        help="use tiny random models built in memory (no files; 64x64 px, 8 steps and the prompt "
                             f"{DEMO_PROMPT!r} unless given)")
    prompts = sample.add_argument_group("prompts")
    prompts.add_argument("--prompt", default=None,
                         help=f"the prompt, weight --cfg-scale (default: empty; {DEMO_PROMPT!r} with --demo)")
    prompts.add_argument("--negative-prompt", default="", help="the negative prompt (default: empty)")
    prompts.add_argument("--negative-scale", type=_scale, default=None,
                         help="negative prompt weight, or 'classic' (1 - CFG scale) (default: classic)")
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
    random.set_defaults(architecture="tiny")
    random.add_argument("--seed", type=int, default=0, help="weights seed; the same file for the same seed")
    return parser


def write_random_checkpoint(out: Path, *, architecture: str = "tiny", seed: int = 0) -> Path:
    """Save a random-weight SD 1 model (`gcfg_core.configs` TINY or SD1) as an ldm-layout `.safetensors` file."""
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"{out}: the output file name must end in .safetensors")
    from gcfg_core.configs import SD1, TINY
    from gcfg_core.models import random_sd_model, save_sd_checkpoint

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


def _check_model_files(args: argparse.Namespace) -> None:
    if args.prior is None:
        raise CliError("--prior PATH is required (or use --demo)")
    for flag, path in (("--prior", args.prior), ("--model", args.model), ("--concept", args.concept)):
        if path is not None and not path.is_file():
            raise CliError(f"{flag}: file not found: {path}")


def _load_models(args: argparse.Namespace):
    """(prior, main, concept UNet or None, the concept's infotext name)."""
    from gcfg_core.concept_file import concept_label, load_concept_model
    from gcfg_core.models import load_sd_checkpoint

    prior = load_sd_checkpoint(args.prior, device=args.device)
    main = load_sd_checkpoint(args.model, device=args.device) if args.model else prior
    if args.concept is None:
        return prior, main, None, ""
    concept, metadata = load_concept_model(args.concept, device=args.device)
    return prior, main, concept, concept_label(args.concept, metadata)


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
                            terms=terms)
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
        _check_model_files(args)

    if args.demo:
        prior, main, concept = _demo_models()
        concept_name = "demo-concept"
    else:
        prior, main, concept, concept_name = _load_models(args)
    settings = dataclasses.replace(request.gcfg, prior=prior.name if main is not prior else "", concept=concept_name)
    request = dataclasses.replace(request, gcfg=settings)
    result = generate(request, prior=prior, main=main, concept_unet=concept, progress=not args.no_progress)
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
