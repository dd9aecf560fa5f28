"""Import hook for the test fakes of the hosts (tests/fake_webui, tests/fake_forge, tests/fake_forge_classic).

The glue imports the hosts' own top-level packages (`modules`, `backend`, `modules_forge`, `ldm_patched`). Their
fakes live in folders named for what they are (`fake_webui/webui_fake_modules`, ...), so that no folder of this
repository looks like a host's checkout. A fake host is switched on as before, by putting its folder on
`sys.path`; this finder then resolves those top-level names in the first such folder on `sys.path`, and their
submodules come from the package folder as usual.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# fake host folder name -> {host package name: folder of its fake}
FAKE_PACKAGES: dict[str, dict[str, str]] = {
    "fake_webui": {"modules": "webui_fake_modules"},
    "fake_forge": {"modules": "forge_fake_modules", "backend": "forge_fake_backend",
                   "modules_forge": "forge_fake_modules_forge"},
    "fake_forge_classic": {"ldm_patched": "classic_fake_ldm_patched", "modules_forge": "classic_fake_modules_forge"},
}


def fake_package_dir(entry: str, name: str) -> Path | None:
    """The folder of the fake `name` in the fake host folder `entry` (a sys.path entry), if it has one."""
    folder = FAKE_PACKAGES.get(Path(entry).name, {}).get(name)
    if folder is None:
        return None
    path = Path(entry) / folder
    return path if (path / "__init__.py").is_file() else None


class FakeHostFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if "." in fullname:
            return None
        for entry in sys.path:
            folder = fake_package_dir(entry, fullname)
            if folder is not None:
                return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                              submodule_search_locations=[str(folder)])
        return None


def install() -> None:
    """Add the finder to `sys.meta_path` once (before the default finders)."""
    if not any(isinstance(finder, FakeHostFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, FakeHostFinder())
