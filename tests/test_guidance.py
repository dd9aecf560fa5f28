"""`combine`: paper Eq. 3, shapes, per-image weights, purity."""

from __future__ import annotations

import pytest
import torch

from gcfg_core.guidance import combine


def predictions(k: int, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), [torch.randn(batch, 4, 8, 8, generator=g) for _ in range(k)]


def test_matches_equation_3():
    uncond, terms = predictions(3)
    weights = [5.0, -2.0, 2.5]
    expected = uncond + sum(w * (t - uncond) for w, t in zip(weights, terms, strict=True))
    torch.testing.assert_close(combine(uncond, terms, weights), expected, rtol=0, atol=1e-5)


def test_one_term_is_classic_cfg_bit_for_bit():
    uncond, (cond,) = predictions(1)
    assert torch.equal(combine(uncond, [cond], [7.5]), uncond + 7.5 * (cond - uncond))


def test_affine_form_equals_weighted_sum():
    uncond, terms = predictions(2)
    w = [3.0, -1.0]
    torch.testing.assert_close(combine(uncond, terms, w), (1 - sum(w)) * uncond + w[0] * terms[0] + w[1] * terms[1])


def test_zero_weight_is_an_exact_no_op_even_for_non_finite_terms():
    uncond, (cond, other) = predictions(2)
    other = torch.full_like(other, float("nan"))
    assert torch.equal(combine(uncond, [cond, other], [4.0, 0.0]), combine(uncond, [cond], [4.0]))
    assert torch.equal(combine(uncond, [], []), uncond)


def test_per_image_weights():
    uncond, terms = predictions(2, batch=2)
    weights = torch.tensor([[1.0, 3.0], [-1.0, 0.5]])
    result = combine(uncond, terms, weights)
    for b in range(2):
        expected = combine(uncond[b:b + 1], [t[b:b + 1] for t in terms], weights[:, b].tolist())
        torch.testing.assert_close(result[b:b + 1], expected, rtol=0, atol=1e-6)


def test_x0_and_eps_space_agree():
    # float64: the identity is exact in real arithmetic; in float32 values ~40 carry ~1e-5 of rounding.
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g).double(), torch.tensor([3.0, 0.7]).double().view(2, 1, 1, 1)
    uncond_eps, terms_eps = predictions(3, batch=2, seed=2)
    uncond_eps, terms_eps = uncond_eps.double(), [e.double() for e in terms_eps]
    weights = [6.0, -3.0, 2.0]
    combined_x0 = combine(x - sigma * uncond_eps, [x - sigma * e for e in terms_eps], weights)
    torch.testing.assert_close(combined_x0, x - sigma * combine(uncond_eps, terms_eps, weights), rtol=0, atol=1e-6)


def test_inputs_are_not_modified_and_result_is_new():
    uncond, terms = predictions(2)
    copies = [uncond.clone(), *(t.clone() for t in terms)]
    result = combine(uncond, terms, [2.0, 3.0])
    assert all(torch.equal(a, b) for a, b in zip(copies, [uncond, *terms], strict=True))
    assert combine(uncond, [], []).data_ptr() != uncond.data_ptr() and result.data_ptr() != uncond.data_ptr()


def test_shape_errors_name_the_shapes():
    uncond, terms = predictions(2)
    with pytest.raises(ValueError, match=r"terms\[1\] must have uncond's shape \[3, 4, 8, 8\], got \[3, 4, 8\]"):
        combine(uncond, [terms[0], terms[1][..., 0]], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights must have shape \[K\] = \[2\] or \[K, B\] = \[2, 3\]"):
        combine(uncond, terms, [1.0])
    with pytest.raises(ValueError, match=r"got \[2, 2\]"):
        combine(uncond, terms, torch.ones(2, 2))
