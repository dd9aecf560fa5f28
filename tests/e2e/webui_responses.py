"""Helpers shared by the real-WebUI e2e suites: checked responses and pixel comparisons of returned images."""

from __future__ import annotations

import base64
import io

import pytest


def ok(response):
    assert response.status_code == 200, response.text[:2000]
    return response.json()


def pixels(body) -> list:
    np = pytest.importorskip("numpy")
    image_module = pytest.importorskip("PIL.Image")
    return [np.asarray(image_module.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)
            for data in body["images"]]


def max_difference(first, second) -> int:
    a, b = pixels(first), pixels(second)
    assert len(a) == len(b)
    return max(int(abs(x - y).max()) for x, y in zip(a, b, strict=True))
