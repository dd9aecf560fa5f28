"""WebUI install hook: installs only the packages the WebUI's venv lacks (idempotent, no work when complete).

The WebUI runs this file as `python install.py` with `launch` importable, at every start unless
`--skip-install` / `--skip-prepare-environment` is given. Everything GCFG and its trainer need at run time already
ships with WebUI 1.10.x (torch, safetensors, transformers, omegaconf, einops, accelerate, psutil, filelock,
k-diffusion and `ldm` from `repositories/`, open-clip's CLIP vocabulary file), so normally nothing is installed and
this returns in a few hundredths of a second. The pins are the WebUI 1.10.1 ones (`requirements_versions.txt`), so
installing a missing package never moves one the WebUI already has.

Oldest supported stack: these pins with torch 2.1.2 on Python 3.10 (what WebUI 1.10.1 installs), tested in CI by
.ci/old-stack.sh. An older torch is not installed over (that is the WebUI's choice), only reported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from typing import NamedTuple

log = logging.getLogger("gcfg.install")

OLDEST_TORCH = (2, 1, 2)


class Requirement(NamedTuple):
    distribution: str
    module: str
    pip_args: str  # what follows `pip install`


REQUIRED = (
    Requirement("safetensors", "safetensors", "safetensors==0.4.2"),
    Requirement("transformers", "transformers", "transformers==4.30.2"),
    Requirement("omegaconf", "omegaconf", "omegaconf==2.2.3"),
    Requirement("einops", "einops", "einops==0.4.1"),
    Requirement("accelerate", "accelerate", "accelerate==0.21.0"),
    Requirement("psutil", "psutil", "psutil==5.9.5"),
    # Ships with torch; the job manager's cross-process lock (portable: flock on POSIX, msvcrt on Windows).
    Requirement("filelock", "filelock", "filelock==3.13.1"),
    # Only its CLIP BPE vocabulary file is read; its declared dependencies would pull another torch.
    Requirement("open-clip-torch", "open_clip", "--no-deps open-clip-torch==2.20.0"),
)


def is_present(requirement: Requirement) -> bool:
    try:
        importlib.metadata.distribution(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(requirement.module) is not None
    return True


def missing() -> list[Requirement]:
    return [requirement for requirement in REQUIRED if not is_present(requirement)]


def torch_older_than_supported(version: str | None = None) -> bool:
    """Whether the installed torch (or `version`) is older than `OLDEST_TORCH`; False when it cannot tell."""
    if version is None:
        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return False
    numbers = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if numbers is None:
        return False
    return tuple(int(n or 0) for n in numbers.groups()) < OLDEST_TORCH


def main() -> None:
    if torch_older_than_supported():
        log.warning("sd-webui-gcfg: torch %s is older than the oldest tested version, %s",
                    importlib.metadata.version("torch"), ".".join(map(str, OLDEST_TORCH)))
    for requirement in missing():
        import launch  # the WebUI's launcher module; only importable when the WebUI runs this file

        launch.run_pip(f"install {requirement.pip_args}", f"sd-webui-gcfg requirement: {requirement.distribution}")


if __name__ == "__main__":
    main()
