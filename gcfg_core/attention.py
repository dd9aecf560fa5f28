"""Per-instance switch of ldm cross-attention to `torch.nn.functional.scaled_dot_product_attention`.

ldm's `CrossAttention` materialises the full [B·heads, N, M] similarity matrix; SDPA computes the
same softmax attention with fused (flash / memory-efficient) kernels. Only the given UNet's modules
change class, so other models in the process (the WebUI's own) are untouched.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("gcfg.attention")


def _sdpa_forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask=None) -> torch.Tensor:
    context = x if context is None else context
    batch, heads = x.shape[0], self.heads
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    attn_mask = None
    if mask is not None:  # ldm's mask: [B, M...] booleans, True = attend
        attn_mask = mask.reshape(batch, 1, 1, -1).to(torch.bool)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
    out = out.transpose(1, 2).reshape(batch, x.shape[1], -1)
    return self.to_out(out)


@functools.cache
def _sdpa_class() -> type:
    """ldm `CrossAttention` (same parameters and keys) computed with `scaled_dot_product_attention`; built on first
    use, since `ldm` is imported where it is used, not at import (Forge ships no `ldm`)."""
    from ldm.modules.attention import CrossAttention

    return type("SDPACrossAttention", (CrossAttention,), {"forward": _sdpa_forward, "__module__": __name__,
                                                          "__doc__": _sdpa_class.__doc__})


def __getattr__(name: str):
    if name == "SDPACrossAttention":
        return _sdpa_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_sdpa_attention(unet: nn.Module) -> None:
    """Make every ldm `CrossAttention` of this UNet instance use SDPA (idempotent; weights and keys unchanged)."""
    from ldm.modules.attention import CrossAttention

    sdpa = _sdpa_class()
    switched = 0
    for module in unet.modules():
        if type(module) is CrossAttention:
            module.__class__ = sdpa
            switched += 1
    logger.debug("switched %d cross-attention modules to SDPA", switched)
