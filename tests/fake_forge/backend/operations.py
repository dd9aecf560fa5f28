"""`using_forge_operations`: Forge swaps torch.nn layer classes for its casting/offloading ones while a model is
built; on this fake (CPU, one dtype) the plain layers stand in for them. Builds are recorded."""

import contextlib

builds: list = []


@contextlib.contextmanager
def using_forge_operations(operations=None, device=None, dtype=None, manual_cast_enabled=False, bnb_dtype=None):
    builds.append({"device": device, "dtype": dtype, "manual_cast": manual_cast_enabled})
    yield
