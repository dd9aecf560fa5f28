"""Which host GCFG runs in, detected by capability at load time, and its adapter.

Everything the user sees (accordion, API args, infotext, XYZ axes, REST routes, the training tab) is shared;
only the sampling hook and the side-model loading differ per host, in one adapter package each
(`gcfg_webui.a1111`). A host GCFG has no adapter for gets one that refuses every request that asks GCFG to
change something, with a message naming the host — never a silently unguided image.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType

from gcfg_webui.errors import GCFGRequestError

logger = logging.getLogger("gcfg.hosts")


@dataclass(frozen=True)
class Host:
    name: str
    adapter: ModuleType | None  # None: GCFG cannot guide on this host
    reason: str = ""  # why not, for the log, the accordion and the 422

    @property
    def supported(self) -> bool:
        return self.adapter is not None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def detect() -> Host:
    """The host, by what it can do: Forge's `backend` (lllyasviel Forge, Forge Neo) or `ldm_patched` (Forge
    Classic) packages, else AUTOMATIC1111 1.10's CFGDenoiser with `combine_denoised`."""
    if _has_module("backend.sampling.sampling_function"):
        return Host("Forge", None, "Forge samples through its own backend, which GCFG does not hook yet")
    if _has_module("ldm_patched.modules.samplers"):
        return Host("Forge Classic", None, "Forge Classic samples through ldm_patched, which GCFG does not hook yet")
    from gcfg_webui import a1111

    return Host(a1111.NAME, a1111)


def unsupported_error(host: Host) -> GCFGRequestError:
    return GCFGRequestError("enabled", f"GCFG cannot guide on {host.name}: {host.reason}; disable GCFG "
                                       "(the image would not get the guidance you asked for)")
