"""WebUI install hook: installs only the packages the WebUI's venv lacks (idempotent, no work when complete).

The WebUI runs this file as `python install.py` with `launch` importable, at every start unless
`--skip-install` / `--skip-prepare-environment` is given. Everything GCFG needs at run time (torch, safetensors,
transformers, omegaconf, k-diffusion, ldm, open-clip's BPE file) already ships with WebUI 1.10.x, so normally
nothing is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

# (distribution name, import name, pip requirement)
REQUIRED = (
    ("safetensors", "safetensors", "safetensors"),
    ("transformers", "transformers", "transformers"),
    ("omegaconf", "omegaconf", "omegaconf"),
    ("einops", "einops", "einops"),
)


def is_present(distribution: str, module: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(module) is not None
    return True


def missing() -> list[str]:
    return [requirement for distribution, module, requirement in REQUIRED if not is_present(distribution, module)]


def main() -> None:
    needed = missing()
    if not needed:
        return
    import launch  # the WebUI's launcher module; only importable when the WebUI runs this file

    launch.run_pip("install " + " ".join(needed), f"sd-webui-gcfg requirements: {', '.join(needed)}")


if __name__ == "__main__":
    main()
