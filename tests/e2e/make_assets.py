"""Write the extra models the WebUI end-to-end suite uses, next to the random checkpoints of `make_random_sd15.py`.

* ``--concept OUT``: a null-text concept model (`gcfg_core.concept_file` format) from a checkpoint's UNet, its
  null-text vectors calibrated with `gcfg_core.nulltext` on seeded random latents. Put it in the WebUI's
  ``models/GCFG``.
* ``--inpaint OUT``: a 9-channel SD 1.x inpainting variant of a checkpoint (the first input conv widened with
  seeded random weights for the 5 extra channels) and the ``.yaml`` beside it that the WebUI picks up
  (``LatentInpaintDiffusion``, ``conditioning_key: hybrid``, ``finetune_keys: null``,
  ``in_channels: 9``), made from the source's own
  ``.yaml`` (a reduced-width checkpoint has one) or the WebUI's ``v1-inference.yaml`` passed as ``--yaml``.

Example (project venv, from the repository root)::

    python tests/e2e/make_assets.py --source /work/webui/models/sd15-tiny-prior.safetensors \\
        --concept /work/webui/stable-diffusion-webui/models/GCFG/tiny-face.safetensors
    python tests/e2e/make_assets.py --source /work/webui/models/sd15-tiny-random.safetensors \\
        --inpaint /work/webui/models/sd15-tiny-inpaint.safetensors
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import re
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger("gcfg.e2e_assets")

FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
INPAINT_CHANNELS = 9
_YAML_EDITS = (
    (r"(target: ldm\.models\.diffusion\.ddpm\.)LatentDiffusion\b", r"\1LatentInpaintDiffusion"),
    # LatentInpaintDiffusion fine-tunes from a checkpoint unless finetune_keys is null
    (r"(\n[ \t]*)conditioning_key: crossattn", r"\1conditioning_key: hybrid\1finetune_keys: null"),
    (r"\bin_channels: 4\b", "in_channels: 9"),  # the first one is the UNet's (the VAE's is 3)
)


def write_concept(source: pathlib.Path, out: pathlib.Path, seed: int) -> None:
    from gcfg_core.concept_file import ConceptMetadata, save_concept_model
    from gcfg_core.models import load_sd_checkpoint
    from gcfg_core.nulltext import calibrate_nulltext, convert_to_nulltext

    model = load_sd_checkpoint(source, parts=("unet", "text_encoder"), device="cpu", dtype=torch.float32,
                               compute_hash=False)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        vectors = calibrate_nulltext(model.unet, latents, model.encode_prompts([""]), seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_concept_model(out, convert_to_nulltext(model.unet, vectors), ConceptMetadata(base_name=source.name))
    logger.info("wrote concept model %s", out)


def inpaint_yaml(text: str) -> str:
    """A v1 inference yaml turned into the inpainting one (the differences of `v1-inpainting-inference.yaml`)."""
    for pattern, replacement in _YAML_EDITS:
        text, count = re.subn(pattern, replacement, text, count=1)
        if count != 1:
            raise ValueError(f"the source yaml has no {pattern!r}: is it an SD 1.x inference config?")
    return text


def write_inpaint(source: pathlib.Path, out: pathlib.Path, yaml: pathlib.Path | None, seed: int) -> None:
    yaml = yaml or source.with_suffix(".yaml")
    if not yaml.is_file():
        raise FileNotFoundError(f"{yaml}: pass --yaml (the WebUI's configs/v1-inference.yaml for a full-size model)")
    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    weight = tensors[FIRST_CONV]
    generator = torch.Generator().manual_seed(seed)
    widened = torch.randn(weight.shape[0], INPAINT_CHANNELS, *weight.shape[2:], generator=generator)
    widened = (widened * weight.float().std()).to(weight.dtype)
    widened[:, : weight.shape[1]] = weight
    tensors[FIRST_CONV] = widened.contiguous()
    save_file(tensors, str(out), metadata=metadata)
    out.with_suffix(".yaml").write_text(inpaint_yaml(yaml.read_text()))
    logger.info("wrote 9-channel inpainting checkpoint %s and %s", out, out.with_suffix(".yaml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--source", type=pathlib.Path, required=True, help="an SD 1.x .safetensors checkpoint")
    parser.add_argument("--concept", type=pathlib.Path, help="write a concept model here")
    parser.add_argument("--inpaint", type=pathlib.Path, help="write a 9-channel inpainting checkpoint here")
    parser.add_argument("--yaml", type=pathlib.Path, help="inference yaml of --source (default: beside it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if not (args.concept or args.inpaint):
        parser.error("nothing to do: pass --concept and/or --inpaint")
    if args.concept:
        write_concept(args.source, args.concept, args.seed)
    if args.inpaint:
        write_inpaint(args.source, args.inpaint, args.yaml, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
