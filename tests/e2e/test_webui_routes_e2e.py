"""Every /gcfg/v1 route against a running real WebUI, with the outcome its flags call for (skipped otherwise).

Set ``GCFG_WEBUI_DIR`` (the suite's switch), ``GCFG_WEBUI_URL`` and ``GCFG_E2E_FLAGS``: the command-line flags the
WebUI was started with, e.g. ``--api --listen --gradio-auth u:p --server-name 127.0.0.1``. Each route is called
without credentials, with wrong ones and with every user:password the flags name; the expected outcome comes from
the rules below (written here, not taken from gcfg_webui.access):

* no route without --api / --nowebui (like /sdapi);
* reads: the --api-auth credentials when set, else open;
* state changes: the --api-auth or gradio-auth credentials when any is set, else open on a loopback-only server and
  403 (naming the flag that enables them) on one reachable from the network (--listen, --share, --ngrok, a
  non-loopback --server-name, --nowebui without --server-name).

Nothing is created: job routes get an id that does not exist, the create route an empty body.
"""

from __future__ import annotations

import os
import shlex

import pytest
from waiting import BACKSTOP_S

pytestmark = [pytest.mark.webui, pytest.mark.skipif(not os.environ.get("GCFG_WEBUI_DIR"),
                                                    reason="needs a real WebUI (GCFG_WEBUI_DIR)")]
URL = os.environ.get("GCFG_WEBUI_URL", "http://127.0.0.1:7860")
FLAGS = shlex.split(os.environ.get("GCFG_E2E_FLAGS", "--api"))

READS = [("GET", "/gcfg/v1/priors", None), ("GET", "/gcfg/v1/concepts", None),
         ("POST", "/gcfg/v1/terms/validate", {"terms": "+1 a cat"}), ("GET", "/gcfg/v1/last-run", None),
         ("GET", "/gcfg/v1/jobs", None), ("GET", "/gcfg/v1/jobs/no-such-job", None),
         ("GET", "/gcfg/v1/jobs/no-such-job/log", None), ("GET", "/gcfg/v1/jobs/no-such-job/loss", None),
         ("GET", "/gcfg/v1/jobs/no-such-job/loss.png", None), ("GET", "/gcfg/v1/jobs/no-such-job/preview.png", None)]
WRITES = [("POST", "/gcfg/v1/models/free", None), ("POST", "/gcfg/v1/jobs", {}),
          ("POST", "/gcfg/v1/jobs/no-such-job/cancel", None), ("POST", "/gcfg/v1/jobs/no-such-job/stop", None),
          ("POST", "/gcfg/v1/jobs/no-such-job/resume", None), ("DELETE", "/gcfg/v1/jobs/no-such-job", None)]


def flag(name: str) -> str | bool | None:
    """The value of `--name value` / `--name=value`, True for a bare switch, None when absent."""
    for i, arg in enumerate(FLAGS):
        if arg == name:
            following = FLAGS[i + 1] if i + 1 < len(FLAGS) else ""
            return following if following and not following.startswith("--") else True
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def pairs(text) -> list[tuple[str, str]]:
    return [tuple(item.strip().split(":", 1)) for item in (text or "").split(",") if ":" in item]


API_CREDS = pairs(flag("--api-auth"))
UI_CREDS = pairs(flag("--gradio-auth"))
EXPOSED = bool(flag("--listen") or flag("--share") or flag("--ngrok")
               or (flag("--server-name") not in (None, "127.0.0.1", "localhost", "::1"))
               or (flag("--nowebui") and not flag("--server-name")))


def expected(write: bool, creds) -> str:
    if not (flag("--api") or flag("--nowebui")):
        return "absent"
    if write:
        allowed = API_CREDS + UI_CREDS
        if allowed:
            return "reached" if creds in allowed else "401"
        return "403" if EXPOSED else "reached"
    if API_CREDS:
        return "reached" if creds in API_CREDS else "401"
    return "reached"


def outcome(response) -> str:
    if response.status_code == 404 and response.json().get("detail") == "Not Found":
        return "absent"
    if response.status_code in (401, 403):
        return str(response.status_code)
    return "reached"


def test_every_route_answers_as_the_flags_say():
    httpx = pytest.importorskip("httpx")
    tried = [None, ("nobody", "wrong"), *API_CREDS, *UI_CREDS]
    counts: dict[str, int] = {}
    with httpx.Client(base_url=URL, timeout=BACKSTOP_S) as client:
        for creds in tried:
            for routes, write in ((READS, False), (WRITES, True)):
                for method, path, body in routes:
                    response = client.request(method, path, json=body, auth=creds)
                    got, want = outcome(response), expected(write, creds)
                    assert got == want, (FLAGS, creds, method, path, response.status_code, response.text)
                    if got == "403":
                        assert "--api-auth" in response.json()["detail"], response.text
                    counts[got] = counts.get(got, 0) + 1
    print(f"flags {' '.join(FLAGS)}: {sum(counts.values())} requests, outcomes {counts}")  # noqa: T201
