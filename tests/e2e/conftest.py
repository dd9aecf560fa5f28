"""What the real-host e2e suites share: an HTTP client of the running host."""

from __future__ import annotations

import os

import pytest
from webui_responses import api_client


@pytest.fixture(scope="module")
def client():
    """A client of the host at `GCFG_WEBUI_URL` (default http://127.0.0.1:7860)."""
    with api_client(os.environ.get("GCFG_WEBUI_URL", "http://127.0.0.1:7860")) as session:
        yield session
