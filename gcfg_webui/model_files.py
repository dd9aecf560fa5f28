"""Model files every host lists the same way: checkpoint titles, the concept folder, and the side-model cache.

The side models themselves are loaded by the host adapter (`gcfg_webui.a1111.side_models`); this module only
knows files, names and a small LRU cache of whatever the adapter loaded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

from modules import devices, paths, sd_models

from gcfg_webui.errors import GCFGRequestError

logger = logging.getLogger("gcfg.models")

CONCEPT_DIR_NAME = "GCFG"
CONCEPT_SUFFIXES = (".safetensors",)


def concept_dir() -> str:
    """The concept-model folder: `<models>/GCFG` (created on first listing)."""
    return os.path.join(paths.models_path, CONCEPT_DIR_NAME)


def list_concept_models() -> list[str]:
    """Concept-model file names (relative to `concept_dir()`), sorted."""
    root = concept_dir()
    os.makedirs(root, exist_ok=True)
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(CONCEPT_SUFFIXES):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def list_prior_titles() -> list[str]:
    """The WebUI's checkpoint titles (`name [hash]`), as in its own checkpoint dropdown."""
    return list(sd_models.checkpoint_tiles())


def resolve_checkpoint(name: str, argument: str):
    """The WebUI's `CheckpointInfo` for a title or name, or a `GCFGRequestError` naming `argument`."""
    info = sd_models.get_closet_checkpoint_match(name)
    if info is None:
        raise GCFGRequestError(argument, f"no checkpoint matches {name!r}; see /gcfg/v1/priors for the choices")
    return info


def checkpoint_name(name: str) -> str:
    """The stable name (path under the checkpoint folder, no hash) of the checkpoint `name` matches, for infotext."""
    info = sd_models.get_closet_checkpoint_match(name) if name else None
    return name if info is None else info.name


def prior_choice(name: str) -> str:
    """The prior dropdown's current title for a pasted checkpoint name or title (unchanged when nothing matches)."""
    info = sd_models.get_closet_checkpoint_match(name)
    return name if info is None else info.title


def resolve_concept(name: str) -> str:
    """The path of a concept model given by its listed name. Only names `list_concept_models` lists are
    accepted, so a name cannot reach outside the folder, while files the user linked into it (symlinks to a
    models drive) work like copies."""
    root = concept_dir()
    normalised = str(name).replace("\\", "/")
    if normalised not in list_concept_models():
        raise GCFGRequestError("concept", f"no concept model {name!r} in {root}; see /gcfg/v1/concepts")
    path = os.path.join(root, *normalised.split("/"))
    if not os.path.isfile(path):  # a dangling link
        raise GCFGRequestError("concept", f"concept model {name!r} points to a missing file ({path})")
    return path


class ModelCache:
    """A small LRU cache of loaded side models, keyed by (kind, file, dtype); thread-safe."""

    def __init__(self) -> None:
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], object], capacity: int) -> object:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        model = load()
        with self._lock:
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > max(int(capacity), 1):
                evicted_key, _ = self._models.popitem(last=False)
                logger.info("GCFG: unloaded %s", evicted_key)
        return model

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._models)

    def clear(self) -> int:
        """Free every cached model; returns how many were held."""
        with self._lock:
            count = len(self._models)
            self._models.clear()
        devices.torch_gc()
        return count


CACHE = ModelCache()
