"""Loads the fake WebUI and the extension's script file the way the WebUI does (for tests only)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FAKE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = FAKE_ROOT.parents[1]


def enable_fake_modules() -> None:
    for path in (str(FAKE_ROOT), str(REPO_ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    install_fake_host_finder()
    loaded = sys.modules.get("modules")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(FAKE_ROOT)):
        raise RuntimeError("a real WebUI `modules` package is already imported")


def install_fake_host_finder() -> None:
    """`tests/fake_hosts.py`'s import hook, which finds the fake `modules` package in this folder."""
    if str(FAKE_ROOT.parent) not in sys.path:
        sys.path.append(str(FAKE_ROOT.parent))
    import fake_hosts

    fake_hosts.install()


def load_script_module():
    """Execute scripts/gcfg.py as the WebUI does: a fresh module object, not registered in sys.modules."""
    from modules import script_callbacks

    script_callbacks.clear_callbacks()
    spec = importlib.util.spec_from_file_location("gcfg.py", REPO_ROOT / "scripts" / "gcfg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
