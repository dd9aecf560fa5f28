"""Every shared module imports on every host: Forge ships no `ldm` (nor `sgm`), Forge Classic has no
`modules.lowvram`. Each check runs in a fresh interpreter in which those packages cannot be found."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_WEBUI = ROOT / "tests" / "fake_webui"
FAKE_FORGE = ROOT / "tests" / "fake_forge"
FAKE_CLASSIC = ROOT / "tests" / "fake_forge_classic"

# What a host lacks: top-level packages (and their submodules) or single modules.
HOST_LACKS = {
    "Forge": ("ldm", "sgm"),
    "Forge Classic": ("modules.lowvram",),
}


def _engine_modules() -> list[str]:
    return [".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for package in ("gcfg_core", "trainer") for path in sorted((ROOT / package).rglob("*.py"))
            if path.name != "__main__.py"]


def run_without(lacks: tuple[str, ...], body: str, path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """Run `body` in a new interpreter where importing anything named in `lacks` fails as on that host."""
    prelude = textwrap.dedent(f"""
        import importlib.abc, sys
        LACKS = {lacks!r}
        class Lacking(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == item or name.startswith(item + ".") for item in LACKS):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, Lacking())
        sys.path[:0] = {[str(item) for item in (*path, ROOT, ROOT / "tests")]!r}
        import fake_hosts
        fake_hosts.install()
        """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.parametrize("host", sorted(HOST_LACKS))
def test_engine_and_trainer_modules_import_without_what_the_host_lacks(host):
    result = run_without(HOST_LACKS[host], f"""
        import importlib
        for name in {_engine_modules()!r}:
            importlib.import_module(name)
        print("imported", len({_engine_modules()!r}))
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(f"imported {len(_engine_modules())}")


def test_the_blocker_really_blocks_ldm():
    """The check above could pass vacuously if the blocked names still imported."""
    result = run_without(HOST_LACKS["Forge"], "import ldm.modules.attention\n")
    assert result.returncode != 0 and "No module named 'ldm" in result.stderr


# Executing the scripts as the host does: the accordion's script and the training tab's.
SCRIPTS_BODY = """
    import importlib.util, os, tempfile
    os.environ.setdefault("FAKE_WEBUI_MODELS", tempfile.mkdtemp())
    loaded = {}
    for name in ("gcfg.py", "gcfg_training.py"):
        spec = importlib.util.spec_from_file_location(name, os.path.join("scripts", name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded[name] = module
    host = loaded["gcfg.py"].HOST
    print("HOST", host.name, host.supported, host.reason)
"""


def test_scripts_load_on_forge_without_ldm():
    result = run_without(HOST_LACKS["Forge"], SCRIPTS_BODY, path=(FAKE_FORGE,))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HOST Forge True" in result.stdout


def test_scripts_load_on_forge_classic_without_lowvram_and_refuse_with_the_reason():
    result = run_without(HOST_LACKS["Forge Classic"], SCRIPTS_BODY, path=(FAKE_CLASSIC, FAKE_WEBUI))
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("HOST"))
    assert line.startswith("HOST Forge Classic False") and "ldm_patched" in line
