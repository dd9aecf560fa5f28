"""install.py: nothing to do in a complete environment, one pinned pip call per missing package otherwise."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def install_module():
    spec = importlib.util.spec_from_file_location("gcfg_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fake_launch(monkeypatch):
    calls = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda command, desc: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    return calls


def test_complete_environment_installs_nothing(install_module, fake_launch):
    assert install_module.missing() == []  # the test venv has everything the WebUI's venv has
    install_module.main()
    assert fake_launch == []


def test_missing_packages_are_installed_pinned_one_by_one(install_module, fake_launch, monkeypatch):
    absent = {"accelerate", "open-clip-torch"}
    monkeypatch.setattr(install_module, "is_present", lambda requirement: requirement.distribution not in absent)
    install_module.main()
    assert fake_launch == ["install accelerate==0.21.0", "install --no-deps open-clip-torch==2.20.0"]


def test_every_requirement_is_pinned(install_module):
    assert all("==" in requirement.pip_args for requirement in install_module.REQUIRED)


def test_the_torch_floor_is_the_webui_1_10_1_one(install_module):
    assert install_module.OLDEST_TORCH == (2, 1, 2)
    older = install_module.torch_older_than_supported
    assert older("2.0.1+cu118") and older("2.1.1") and older("1.13.1")
    assert not older("2.1.2+cu121") and not older("2.1.2") and not older("2.13.0+cpu") and not older("nightly")
