"""Write a random-weight SD 1.5 ControlNet (cldm layout, ``control_model.*`` keys) for the ControlNet end-to-end tests.

The model is built with sd-webui-controlnet's own ``scripts.cldm.ControlNet`` class and the SD 1.5 config that the
extension uses when it guesses a cldm state dict (``scripts.controlnet_model_guess.controlnet_default_config``:
320 channels, so it pairs with a full-width SD 1.5 checkpoint only). ControlNet zero-initialises its output
convolutions (``zero_convs``, ``middle_block_out``, the last ``input_hint_block`` conv) and, like the ldm UNet, some
inner output layers; left at zero the control adds nothing, so every all-zero tensor is re-randomised.

Run it with the WebUI's Python (it needs ldm or sgm from the WebUI's ``repositories``)::

    /work/webui/venv/bin/python tests/e2e/make_controlnet.py --controlnet-dir <webui>/extensions/sd-webui-controlnet \
        --webui-dir <webui checkout> --out <models>/ControlNet/control_sd15_random.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import types
from pathlib import Path

import torch

log = logging.getLogger("gcfg.tests.make_controlnet")

# The std of the re-randomised tensors: large enough that the control visibly changes a random UNet's output.
DEZERO_STD = 0.02
FORMAT_METADATA = "gcfg-e2e-random-controlnet"


def add_import_paths(controlnet_dir: Path, webui_dir: Path) -> None:
    """Put the ControlNet extension and the WebUI's ldm/sgm repositories on ``sys.path``."""
    repositories = webui_dir / "repositories"
    for path in (repositories / "generative-models", repositories / "stable-diffusion-stability-ai", controlnet_dir):
        if not path.is_dir():
            raise ValueError(f"not a directory: {path}")
        sys.path.insert(0, str(path))
    # generative-models has a regular ``scripts`` package, which would shadow the extension's namespace one.
    package = types.ModuleType("scripts")
    package.__path__ = [str(controlnet_dir / "scripts")]
    sys.modules["scripts"] = package


def stub_webui_devices() -> None:
    """Register a minimal ``modules.devices``: ``scripts.cldm`` imports it only for its low-VRAM helpers."""
    modules = types.ModuleType("modules")
    devices = types.ModuleType("modules.devices")
    devices.get_device_for = lambda _task: torch.device("cpu")
    devices.dtype_unet = torch.float32
    modules.devices = devices
    sys.modules.setdefault("modules", modules)
    sys.modules.setdefault("modules.devices", devices)


def sd15_config(controlnet_dir: Path) -> dict:
    """The extension's SD 1.5 cldm config, read from its model-guess module without importing the whole module."""
    source = (controlnet_dir / "scripts" / "controlnet_model_guess.py").read_text(encoding="utf-8")
    start = source.index("controlnet_default_config = {")
    end = source.index("}", start) + 1
    namespace: dict = {}
    exec(source[start:end], {}, namespace)  # noqa: S102 - a dict literal from the extension's own source
    config = copy.deepcopy(namespace["controlnet_default_config"])
    config.update(hint_channels=3, use_fp16=False)
    return config


def dezero_(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Re-randomise every all-zero floating-point parameter in place; returns how many tensors changed."""
    changed = 0
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * DEZERO_STD)
                changed += 1
    return changed


def build_state_dict(controlnet_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """A random SD 1.5 ControlNet's weights with ``control_model.`` keys, fp16."""
    from scripts.cldm import ControlNet  # noqa: PLC0415 - importable only after add_import_paths

    torch.manual_seed(seed)
    model = ControlNet(**sd15_config(controlnet_dir))
    changed = dezero_(model, torch.Generator().manual_seed(seed + 1))
    log.info("built ControlNet: %d tensors, %d re-randomised", len(model.state_dict()), changed)
    return {f"control_model.{key}": value.detach().to(torch.float16).contiguous()
            for key, value in model.state_dict().items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controlnet-dir", type=Path, required=True, help="sd-webui-controlnet checkout")
    parser.add_argument("--webui-dir", type=Path, required=True, help="WebUI checkout (for repositories/)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--seed", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    add_import_paths(args.controlnet_dir.resolve(), args.webui_dir.resolve())
    stub_webui_devices()
    from safetensors.torch import save_file  # noqa: PLC0415 - kept local: only this step needs it

    state_dict = build_state_dict(args.controlnet_dir.resolve(), args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry keeps the file bytes (and so the WebUI's hash) reproducible.
    save_file(state_dict, str(args.out), metadata={"gcfg": json.dumps({"format": FORMAT_METADATA,
                                                                        "seed": args.seed})})
    log.info("wrote %s (%d tensors)", args.out, len(state_dict))


if __name__ == "__main__":
    main()
