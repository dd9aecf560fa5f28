"""Loads a module of the fake WebUI under a private name, for the Forge modules that extend it."""

import importlib.util
import os
import sys

_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fake_webui",
                     "webui_fake_modules")


def load(name):
    key = f"modules._a1111_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(_ROOT, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
