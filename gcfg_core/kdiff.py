"""The one documented way to import k-diffusion's samplers.

`k_diffusion/__init__.py` imports training helpers with heavy optional dependencies (scikit-image,
clean-fid, CLIP, torchvision, jsonmerge, wandb), none of which sampling needs. Inside the WebUI the
real package is already imported and we use it as is. Everywhere else we register a bare package
object for `k_diffusion` so that only `k_diffusion.sampling` and `k_diffusion.external` (and their
`utils` import) run. `k_diffusion.utils` imports `torchvision.transforms.functional` for image
helpers we never call; when torchvision is absent (it cannot be installed beside a CPU torch from
PyPI) a placeholder stands in for that one import and is removed again, so nothing else in the
process sees a fake torchvision.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import ModuleType

_TORCHVISION_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision.transforms.functional")
    except (ImportError, RuntimeError):  # RuntimeError: a CUDA-only torchvision beside a CPU torch
        for name in _TORCHVISION_NAMES:
            sys.modules.pop(name, None)
        return False
    return True


def _register_bare_package() -> None:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["k_diffusion"] = package


def _import_with_placeholder_torchvision() -> None:
    placeholders = {name: types.ModuleType(name) for name in _TORCHVISION_NAMES}
    placeholders["torchvision"].transforms = placeholders["torchvision.transforms"]
    placeholders["torchvision.transforms"].functional = placeholders["torchvision.transforms.functional"]
    sys.modules.update(placeholders)
    try:
        importlib.import_module("k_diffusion.sampling")
        importlib.import_module("k_diffusion.external")
    finally:
        for name in _TORCHVISION_NAMES:
            if sys.modules.get(name) is placeholders[name]:
                del sys.modules[name]


def k_diffusion_modules() -> tuple[ModuleType, ModuleType]:
    """Return `(k_diffusion.sampling, k_diffusion.external)`, importing them without the package init."""
    if "k_diffusion.sampling" not in sys.modules:
        if "k_diffusion" not in sys.modules:
            _register_bare_package()
        if _torchvision_importable():
            importlib.import_module("k_diffusion.sampling")
            importlib.import_module("k_diffusion.external")
        else:
            _import_with_placeholder_torchvision()
    importlib.import_module("k_diffusion.external")
    return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
