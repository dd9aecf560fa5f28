"""Which host the end-to-end suites run against, read from the checkout in ``GCFG_WEBUI_DIR``: lllyasviel Forge
(its `backend/sampling`), Forge Classic (`ldm_patched/`) or AUTOMATIC1111 1.10 (neither)."""

from __future__ import annotations

import os

import pytest

A1111, FORGE, FORGE_CLASSIC = "a1111", "forge", "forge-classic"


def host_of(webui_dir: str) -> str:
    if os.path.isfile(os.path.join(webui_dir, "backend", "sampling", "sampling_function.py")):
        return FORGE
    if os.path.isdir(os.path.join(webui_dir, "ldm_patched")):
        return FORGE_CLASSIC
    return A1111


HOST = host_of(os.environ.get("GCFG_WEBUI_DIR", ""))
ON_FORGE = HOST == FORGE
FORGE_ALL = os.environ.get("GCFG_E2E_FORGE_ALL") == "1"  # run the left-out cases on Forge too


def only_on(*hosts: str, why: str):
    return pytest.mark.skipif(HOST not in hosts, reason=f"{why} (host: {HOST})")


def left_out_on_forge(why: str = "left out of the Forge subset (GCFG_E2E_FORGE_ALL=1 runs it): a full-size SD 1.5 "
                                   "image takes 3-16 s there"):
    """Skip a case on Forge to keep its run short; what is left out is listed in tests/e2e/README.md."""
    if ON_FORGE and not FORGE_ALL:
        pytest.skip(why)
