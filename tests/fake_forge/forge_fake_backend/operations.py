"""`using_forge_operations`: Forge swaps torch.nn layer classes for its casting/offloading ones while a model is
built. This fake swaps `torch.nn.Linear` only, for a layer that, like Forge's, holds a one-element placeholder
parameter (`dummy`) and no weight or bias until it loads a state dict (so a fresh model's state_dict lists
`.dummy` keys instead of the linear layers' weights). Builds are recorded."""

import contextlib

import torch

builds: list = []


class PlaceholderLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dummy = torch.nn.Parameter(torch.empty(1, dtype=dtype or torch.float32))
        self.weight = None
        self.bias = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not hasattr(self, "dummy"):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            return
        for name in ("weight", "bias"):
            if prefix + name in state_dict:
                setattr(self, name, torch.nn.Parameter(state_dict[prefix + name].to(self.dummy)))
        del self.dummy

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype),
                                          None if self.bias is None else self.bias.to(x.dtype))


@contextlib.contextmanager
def using_forge_operations(operations=None, device=None, dtype=None, manual_cast_enabled=False, bnb_dtype=None):
    builds.append({"device": device, "dtype": dtype, "manual_cast": manual_cast_enabled})
    linear = torch.nn.Linear
    torch.nn.Linear = PlaceholderLinear
    try:
        yield
    finally:
        torch.nn.Linear = linear
