"""Helpers shared by the real-WebUI e2e suites: checked responses and pixel comparisons of returned images."""

from __future__ import annotations

import base64
import contextlib
import io
import os

import pytest
from waiting import BACKSTOP_S

API_AUTH = os.environ.get("GCFG_E2E_API_AUTH", "")  # user:password of a host started with --api-auth


@contextlib.contextmanager
def api_client(url: str):
    """An HTTP client of the host at `url`, with the `GCFG_E2E_API_AUTH` credentials when they are set."""
    httpx = pytest.importorskip("httpx")
    auth = tuple(API_AUTH.split(":", 1)) if API_AUTH else None
    with httpx.Client(base_url=url, timeout=BACKSTOP_S, auth=auth) as session:
        yield session


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
