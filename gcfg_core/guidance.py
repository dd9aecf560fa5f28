"""The GCFG combination, paper Eq. 3 (Cao et al. 2023, arXiv 2312.08195): ``D₀ + Σᵢ wᵢ (Dᵢ − D₀)``.

This module is public API: other extensions may import `combine` (it depends on torch only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _weights_tensor(weights: Sequence[float] | Tensor, count: int, batch: int, like: Tensor) -> Tensor:
    if isinstance(weights, Tensor):
        tensor = weights.detach().to(device=like.device, dtype=like.dtype)
    else:
        tensor = torch.tensor([float(w) for w in weights], device=like.device, dtype=like.dtype)
    if tensor.dim() == 1 and tensor.shape[0] == count:
        return tensor.reshape(count, *([1] * like.dim()))
    if tensor.dim() == 2 and tensor.shape == (count, batch):
        return tensor.reshape(count, batch, *([1] * (like.dim() - 1)))
    raise ValueError(
        f"weights must have shape [K] = [{count}] or [K, B] = [{count}, {batch}] for {count} terms and a batch "
        f"of {batch}, got {list(tensor.shape)}"
    )


def combine(uncond: Tensor, terms: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """Return ``uncond + Σᵢ weights[i] · (terms[i] − uncond)`` (GCFG, paper Eq. 3), without touching the inputs.

    Args:
        uncond: the unconditional prediction D₀, shape ``[B, ...]`` (B images).
        terms: K predictions Dᵢ, each exactly ``uncond``'s shape (K may be 0: the result equals ``uncond``).
        weights: the K signed weights wᵢ, as a sequence of floats or a tensor of shape ``[K]`` (same weight for
            every image) or ``[K, B]`` (``weights[i, b]`` is term i's weight for image b).

    The combination is affine (the coefficients ``1 − Σwᵢ, w₁, …, w_K`` sum to 1), so it is the same in every
    prediction space that is affine in the model output with coefficients shared by all terms: denoised x₀,
    noise ε (``x₀ = x − σ·ε`` at one x and σ) and v. Only all predictions must be in the same space.

    The arithmetic runs in ``uncond``'s dtype and device; weights and terms are cast to it. A weight of exactly 0
    leaves the result bit-identical to leaving the term out. Raises `ValueError` naming the mismatching shape.
    """
    if not isinstance(uncond, Tensor):
        raise ValueError(f"uncond must be a tensor, got {type(uncond).__name__}")
    if uncond.dim() < 1:
        raise ValueError("uncond must have a batch dimension, got a 0-d tensor")
    for index, term in enumerate(terms):
        if not isinstance(term, Tensor) or term.shape != uncond.shape:
            shape = list(term.shape) if isinstance(term, Tensor) else type(term).__name__
            raise ValueError(f"terms[{index}] must have uncond's shape {list(uncond.shape)}, got {shape}")
    weight_rows = _weights_tensor(weights, len(terms), uncond.shape[0], uncond)
    # Zero weights given as numbers are skipped, which is exact and keeps an inf/nan in an unused term out of the
    # result; tensor weights are not inspected, as that would cost a device sync per term.
    skip = [False] * len(terms) if isinstance(weights, Tensor) else [float(w) == 0.0 for w in weights]
    result = uncond
    for term, weight, is_zero in zip(terms, weight_rows, skip, strict=True):
        if not is_zero:
            result = result + weight * (term.to(uncond.dtype) - uncond)
    if result is uncond:
        result = uncond.clone()
    return result


def combine_sources(sources: Sequence[tuple[Tensor, Sequence[float]]]) -> Tensor:
    """``Σₖ cₖ·Xₖ`` for predictions Xₖ whose per-image coefficients cₖ sum to 1 (`gcfg_core.coefficients`).

    Computed as ``X₀ + Σₖ₌₁ cₖ (Xₖ − X₀)`` with the first source as the base: equal to the sum in exact arithmetic
    because the coefficients sum to 1, and bit-equal to the WebUI's own ``N + s·(P − N)`` when the first source is
    the negative prompt of a classic CFG step. `sources` is ``[(prediction [B, ...], [c for each of the B
    images]), ...]``, the base first.
    """
    if not sources:
        raise ValueError("combine_sources needs at least one source")
    base, _ = sources[0]
    others = sources[1:]
    if not others:
        return base.clone()
    batch = base.shape[0]
    weights = torch.tensor([[float(value) for value in values] for _, values in others], dtype=torch.float64)
    if weights.shape != (len(others), batch):
        raise ValueError(f"each source needs one coefficient per image ({batch}), got shape {list(weights.shape)}")
    uniform = bool((weights == weights[:, :1]).all())
    if uniform:
        return combine(base, [prediction for prediction, _ in others], weights[:, 0].tolist())
    return combine(base, [prediction for prediction, _ in others], weights)
