"""Shared pytest fixtures: tiny random-weight SD 1.x and SDXL models and checkpoint files; no downloads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Any stray Hugging Face download must fail fast instead of reaching for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_hosts  # noqa: E402

fake_hosts.install()  # the fake hosts' packages, for the tests that put a fake host on sys.path

from gcfg_core.configs import TINY  # noqa: E402
from gcfg_core.models import SDModel, random_sd_model, save_sd_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> SDModel:
    """Random TINY SD 1.x model, seed 0 (SD 1.5 UNet key names, tiny widths). Do not mutate it."""
    return random_sd_model(TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_prior() -> SDModel:
    """A second random TINY model (seed 1), e.g. the prior beside `tiny_model`. Do not mutate it."""
    return random_sd_model(TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model: SDModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_model` saved as an ldm-layout `.safetensors` checkpoint."""
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-sd1.safetensors"
    save_sd_checkpoint(tiny_model, path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl():
    """Random SDXL_TINY model, seed 0 (SDXL key names and block structure, tiny widths). Do not mutate it."""
    from gcfg_core.sdxl import random_sdxl_model

    return random_sdxl_model(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tiny_sdxl, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sdxl` saved as an sgm-layout `.safetensors` checkpoint."""
    from gcfg_core.sdxl import save_sdxl_checkpoint

    path = tmp_path_factory.mktemp("checkpoints") / "tiny-sdxl.safetensors"
    save_sdxl_checkpoint(tiny_sdxl, path)
    return path
