"""Every /gcfg/v1 route under every auth configuration of the WebUI's flags (gcfg_webui.access).

Expected outcomes are written out per configuration below, from the rules in the issue: routes exist only with
--api/--nowebui (like /sdapi); reads follow /sdapi (--api-auth if set, else open); state changes need the
--api-auth or gradio-auth credentials when any is set, else a loopback-only server, else 403 naming the flag.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from gcfg_webui import access, api, jobs_api  # noqa: E402
from gcfg_webui.access import AccessPolicy, is_loopback_name, network_exposure, parse_gradio_auth  # noqa: E402
from trainer.jobs import JobManager, LaunchSpec, PathPolicy  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent

# (method, path, body): every route, with an id or body that reaches the handler without creating anything.
READS = [("GET", "/gcfg/v1/priors", None), ("GET", "/gcfg/v1/concepts", None),
         ("POST", "/gcfg/v1/terms/validate", {"terms": "+1 a cat"}), ("GET", "/gcfg/v1/last-run", None),
         ("GET", "/gcfg/v1/jobs", None), ("GET", "/gcfg/v1/jobs/nope", None), ("GET", "/gcfg/v1/jobs/nope/log", None),
         ("GET", "/gcfg/v1/jobs/nope/loss", None), ("GET", "/gcfg/v1/jobs/nope/loss.png", None),
         ("GET", "/gcfg/v1/jobs/nope/preview.png", None)]
WRITES = [("POST", "/gcfg/v1/models/free", None), ("POST", "/gcfg/v1/jobs", {}),
          ("POST", "/gcfg/v1/jobs/nope/cancel", None), ("POST", "/gcfg/v1/jobs/nope/stop", None),
          ("POST", "/gcfg/v1/jobs/nope/resume", None), ("DELETE", "/gcfg/v1/jobs/nope", None)]

API, UI, WRONG = ("alice", "s3cret"), ("gina", "pw:with:colons"), ("alice", "nope")
ABSENT, OPEN, DENIED, FORBIDDEN = "absent", "reached", "401", "403"

# name: (flags, {credentials sent: (outcome of a read, outcome of a state change)}, flag named by a 403)
CONFIGS = {
    "no --api": ({}, {None: (ABSENT, ABSENT)}, None),
    "no --api, --listen --gradio-auth": ({"api": False, "listen": True, "gradio_auth": "gina:pw:with:colons"},
                                         {None: (ABSENT, ABSENT), UI: (ABSENT, ABSENT)}, None),
    "--api": ({"api": True}, {None: (OPEN, OPEN)}, None),
    "--api --server-name 127.0.0.1": ({"api": True, "server_name": "127.0.0.1"}, {None: (OPEN, OPEN)}, None),
    "--api --server-name localhost": ({"api": True, "server_name": "localhost"}, {None: (OPEN, OPEN)}, None),
    "--api --server-name ::1": ({"api": True, "server_name": "::1"}, {None: (OPEN, OPEN)}, None),
    "--api --listen": ({"api": True, "listen": True}, {None: (OPEN, FORBIDDEN), WRONG: (OPEN, FORBIDDEN)},
                       "--listen"),
    "--api --listen --server-name 127.0.0.1": ({"api": True, "listen": True, "server_name": "127.0.0.1"},
                                               {None: (OPEN, FORBIDDEN)}, "--listen"),
    "--api --share": ({"api": True, "share": True}, {None: (OPEN, FORBIDDEN)}, "--share"),
    "--api --ngrok": ({"api": True, "ngrok": "token"}, {None: (OPEN, FORBIDDEN)}, "--ngrok"),
    "--api --server-name 0.0.0.0": ({"api": True, "server_name": "0.0.0.0"}, {None: (OPEN, FORBIDDEN)},
                                    "--server-name 0.0.0.0"),
    "--api --server-name box.lan": ({"api": True, "server_name": "box.lan"}, {None: (OPEN, FORBIDDEN)},
                                    "--server-name box.lan"),
    "--nowebui": ({"nowebui": True}, {None: (OPEN, FORBIDDEN)}, "--nowebui"),
    "--nowebui --server-name 127.0.0.1": ({"nowebui": True, "server_name": "127.0.0.1"}, {None: (OPEN, OPEN)}, None),
    "--api, GRADIO_SERVER_NAME=0.0.0.0": ({"api": True, "env": {"GRADIO_SERVER_NAME": "0.0.0.0"}},
                                          {None: (OPEN, FORBIDDEN)}, "GRADIO_SERVER_NAME=0.0.0.0"),
    "--api --api-auth": ({"api": True, "api_auth": "alice:s3cret,bob:pw"},
                         {None: (DENIED, DENIED), WRONG: (DENIED, DENIED), API: (OPEN, OPEN), UI: (DENIED, DENIED),
                          ("bob", "pw"): (OPEN, OPEN)}, None),
    "--api --listen --api-auth": ({"api": True, "listen": True, "api_auth": "alice:s3cret"},
                                  {None: (DENIED, DENIED), API: (OPEN, OPEN)}, None),
    "--api --listen --gradio-auth": ({"api": True, "listen": True, "gradio_auth": "gina:pw:with:colons"},
                                     {None: (OPEN, DENIED), WRONG: (OPEN, DENIED), UI: (OPEN, OPEN)}, None),
    "--api --gradio-auth (loopback)": ({"api": True, "gradio_auth": " gina:pw:with:colons , "},
                                       {None: (OPEN, DENIED), UI: (OPEN, OPEN)}, None),
    "--api --listen --gradio-auth-path": ({"api": True, "listen": True, "auth_file": "x:y\ngina:pw:with:colons,z:w\n"},
                                          {None: (OPEN, DENIED), UI: (OPEN, OPEN), ("z", "w"): (OPEN, OPEN)}, None),
    "--api --listen --gradio-auth-path (unreadable)": ({"api": True, "listen": True, "auth_file": None},
                                                       {None: (OPEN, FORBIDDEN), UI: (OPEN, FORBIDDEN)},
                                                       "--gradio-auth-path"),
    "--api --listen --api-auth --gradio-auth": ({"api": True, "listen": True, "api_auth": "alice:s3cret",
                                                 "gradio_auth": "gina:pw:with:colons"},
                                                {None: (DENIED, DENIED), API: (OPEN, OPEN), UI: (DENIED, OPEN),
                                                 WRONG: (DENIED, DENIED)}, None),
}


def cmd_opts(flags: dict, tmp_path: Path) -> tuple[SimpleNamespace, dict]:
    flags = dict(flags)
    env = flags.pop("env", {})
    if "auth_file" in flags:
        content = flags.pop("auth_file")
        path = tmp_path / "auth.txt"
        if content is not None:
            path.write_text(content)
        flags["gradio_auth_path"] = str(path)
    opts = SimpleNamespace(api=False, nowebui=False, api_auth=None, gradio_auth=None, gradio_auth_path=None,
                           listen=False, share=False, ngrok=None, server_name=None)
    for key, value in flags.items():
        setattr(opts, key, value)
    return opts, env


@pytest.fixture()
def host(tmp_path):
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    launch = LaunchSpec(pythonpath=(str(TESTS_DIR), str(TESTS_DIR.parent)), module="fake_trainer")
    manager = JobManager(tmp_path / "jobs", launch=launch, publish_dir=tmp_path / "concepts")
    return jobs_api.TrainingHost(manager=manager, policy=PathPolicy((str(datasets),)), checkpoint_titles=list,
                                 resolve_checkpoint=lambda title: None, devices=lambda: ["auto", "cpu"])


def build_app(policy: AccessPolicy, host) -> FastAPI:
    app = FastAPI()
    api.add_routes(app, policy, priors=lambda: ["p [0]"], concepts=list, free_models=lambda: 0, last_run=dict)
    jobs_api.add_job_routes(app, policy, host)
    return app


def outcome(response) -> str:
    if response.status_code == 404 and response.json() == {"detail": "Not Found"}:
        return ABSENT
    if response.status_code == 401:
        assert response.headers.get("www-authenticate") == "Basic"
        return DENIED
    if response.status_code == 403:
        return FORBIDDEN
    return OPEN


def headers_for(credentials) -> dict:
    if credentials is None:
        return {}
    token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_the_route_lists_cover_every_registered_route(host):
    app = build_app(AccessPolicy.from_cmd_opts(SimpleNamespace(api=True), environ={}), host)
    registered = {(method, route.path) for route in app.routes if route.path.startswith("/gcfg/v1")
                  for method in route.methods}
    listed = {(method, path.replace("/nope", "/{job_id}")) for method, path, _ in READS + WRITES}
    assert registered == listed and len(registered) == 16


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_route_under_every_configuration(name, host, tmp_path):
    flags, expected, named_flag = CONFIGS[name]
    opts, env = cmd_opts(flags, tmp_path)
    client = TestClient(build_app(AccessPolicy.from_cmd_opts(opts, environ=env), host))
    for credentials, (read_outcome, write_outcome) in expected.items():
        for routes, want in ((READS, read_outcome), (WRITES, write_outcome)):
            for method, path, body in routes:
                response = client.request(method, path, json=body, headers=headers_for(credentials))
                got = outcome(response)
                assert got == want, (name, credentials, method, path, response.status_code, response.text)
                if got == FORBIDDEN:
                    detail = response.json()["detail"]
                    assert named_flag in detail and f"{method} {path}" in detail, detail
                    if named_flag != "--gradio-auth-path":
                        assert "--api-auth user:password" in detail, detail
    assert host.manager.list_jobs() == []  # nothing was created or changed on the way


def test_a_state_change_from_another_origin_is_refused_even_with_credentials(host):
    policy = AccessPolicy.from_cmd_opts(SimpleNamespace(api=True, api_auth="alice:s3cret"), environ={})
    client = TestClient(build_app(policy, host))
    for method, path, body in WRITES:
        evil = client.request(method, path, json=body, headers={**headers_for(API), "Origin": "http://evil.example"})
        assert evil.status_code == 403 and "another origin (http://evil.example)" in evil.json()["detail"]
        same = client.request(method, path, json=body, headers={**headers_for(API), "Origin": "http://testserver"})
        assert outcome(same) == OPEN, (method, path, same.text)
    # reads are not state changes: a page may read what /sdapi would let it read
    assert client.get("/gcfg/v1/jobs", headers={**headers_for(API), "Origin": "http://evil.example"}).status_code == 200


def test_unauthenticated_loopback_state_changes_are_refused_from_another_origin(host):
    client = TestClient(build_app(AccessPolicy.from_cmd_opts(SimpleNamespace(api=True), environ={}), host))
    response = client.post("/gcfg/v1/jobs/nope/cancel", headers={"Origin": "http://127.0.0.1:9999"})
    assert response.status_code == 403
    assert outcome(client.post("/gcfg/v1/jobs/nope/cancel")) == OPEN


def test_the_policy_is_logged_once_at_start(host, caplog, monkeypatch):
    monkeypatch.setattr(access, "_logged", set())
    policy = AccessPolicy.from_cmd_opts(SimpleNamespace(api=True, listen=True), environ={})
    with caplog.at_level(logging.INFO, logger="gcfg.access"):
        build_app(policy, host)
        build_app(policy, host)  # a UI reload registers the routes again
    lines = [r.getMessage() for r in caplog.records if r.name == "gcfg.access"]
    assert len(lines) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "state changes answer 403" in lines[0] and "--listen" in lines[0] and "--api-auth" in lines[0]


@pytest.mark.parametrize(("flags", "line"), [
    ({}, "REST routes under /gcfg/v1 are off (like /sdapi they need --api)"),
    ({"api": True}, "state changes are open to this machine only (loopback)"),
    ({"api": True, "api_auth": "a:b"}, "reads need the --api-auth credentials; state changes need the --api-auth"),
    ({"api": True, "listen": True, "gradio_auth": "a:b"}, "reads are open; state changes need the gradio-auth"),
])
def test_the_log_line_says_who_may_call(flags, line):
    opts = SimpleNamespace(**{"api": False, **flags})
    assert line in AccessPolicy.from_cmd_opts(opts, environ={}).describe()


def test_helpers():
    assert [is_loopback_name(n) for n in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "LOCALHOST", "0.0.0.0", "::",
                                          "10.0.0.2", "myhost")] == [True] * 5 + [False] * 4
    assert parse_gradio_auth("a:b, c:d:e ,", ["f:g\n", " h:i , j:k\n"]) == (
        ("a", "b"), ("c", "d:e"), ("f", "g"), ("h", "i"), ("j", "k"))
    assert network_exposure(SimpleNamespace(), environ={"GRADIO_SERVER_NAME": "127.0.0.1"}) is None
