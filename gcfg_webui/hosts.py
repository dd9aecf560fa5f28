"""Which host GCFG runs in, detected by capability at load time, and its adapter.

Everything the user sees (accordion, API args, infotext, XYZ axes, REST routes, the training tab) is shared;
only the sampling hook and the side-model loading differ per host, in one adapter package each
(`gcfg_webui.a1111`, `gcfg_webui.forge`). A host GCFG has no adapter for gets one that refuses every request that
asks GCFG to change something, with a message naming the host — never a silently unguided image.

* lllyasviel Forge: its `backend` package (sampling function, UNet patcher) → `gcfg_webui.forge`;
* Forge Neo (Haoming02's continuation of it) keeps that `backend` API and adds models lllyasviel Forge lacks
  (Wan, Qwen-Image): the same adapter, under its own name;
* Forge Classic samples through the older `ldm_patched` backend;
* otherwise AUTOMATIC1111 1.10.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from types import ModuleType

from gcfg_webui.errors import GCFGRequestError

logger = logging.getLogger("gcfg.hosts")


@dataclass(frozen=True)
class Host:
    name: str
    adapter: ModuleType | None  # None: GCFG cannot guide on this host
    reason: str = ""  # why not, for the log, the accordion and the 422
    caution: str = ""  # a supported host GCFG is not proven on: said at start and in the accordion
    # Samplers whose CFG scale the host rescales before combining (every GCFG weight follows it); A1111 applies
    # DDIM CFG++'s ÷12.5, Forge sets that multiplier but combines with the plain scale.
    cfg_multipliers: dict = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return self.adapter is not None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


FORGE_BACKEND = ("backend.sampling.sampling_function", "backend.patcher.unet", "backend.loader")
NEO_MODULES = ("backend.diffusion_engine.wan", "backend.diffusion_engine.qwen")  # models only Forge Neo has
NEO_CAUTION = ("GCFG's Forge adapter is not proven on Forge Neo; should Forge Neo sample without the UNet patcher "
               "hooks GCFG uses, a generation with GCFG enabled stops with an error at its first step, never an "
               "unguided image")
CLASSIC_BACKEND = "ldm_patched.modules.samplers"
CLASSIC_REASON = ("Forge Classic samples through its older ldm_patched backend, whose sampling hook and model "
                  "loader GCFG has no adapter for")


def detect() -> Host:
    """The host, by what it can do: Forge's `backend` (lllyasviel Forge, Forge Neo) or `ldm_patched` (Forge
    Classic) packages beside `modules_forge`, else AUTOMATIC1111 1.10's CFGDenoiser with `combine_denoised`."""
    forge_family = _has_module("modules_forge")
    if forge_family and all(_has_module(name) for name in FORGE_BACKEND):
        from gcfg_webui import forge

        if any(_has_module(name) for name in NEO_MODULES):
            return Host("Forge Neo", forge, caution=NEO_CAUTION)
        return Host(forge.NAME, forge)
    if forge_family and _has_module(CLASSIC_BACKEND):
        return Host("Forge Classic", None, CLASSIC_REASON)
    if forge_family:  # a Forge whose backend GCFG does not know: A1111's hooks would never be called there
        missing = [name for name in FORGE_BACKEND if not _has_module(name)]
        return Host("Forge", None, f"its backend lacks {', '.join(missing)}, which GCFG's Forge adapter uses")
    from gcfg_webui import a1111

    return Host(a1111.NAME, a1111, cfg_multipliers={"DDIM CFG++": 1 / 12.5})


def unsupported_error(host: Host) -> GCFGRequestError:
    return GCFGRequestError("enabled", f"GCFG cannot guide on {host.name}: {host.reason}; disable GCFG "
                                       "(the image would not get the guidance you asked for)")
