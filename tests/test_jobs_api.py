"""REST routes /gcfg/v1/jobs: the job life cycle, 422 answers that name the argument, --api-auth, path attacks."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from waiting import wait_until  # noqa: E402

from gcfg_webui.access import AccessPolicy  # noqa: E402
from gcfg_webui.jobs_api import PREFIX, TrainingHost, add_job_routes, config_error_problems  # noqa: E402
from trainer.config import ConfigError  # noqa: E402
from trainer.jobs import JobManager, LaunchSpec, PathPolicy  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TITLE = "base.safetensors [0123456789]"


@pytest.fixture()
def host(tmp_path):
    datasets = tmp_path / "datasets"
    (datasets / "faces").mkdir(parents=True)
    (datasets / "faces" / "a.png").write_bytes(b"")
    base = tmp_path / "models" / "base.safetensors"
    base.parent.mkdir()
    base.write_bytes(b"weights")
    launch = LaunchSpec(pythonpath=(str(TESTS_DIR), str(REPO_ROOT)), module="fake_trainer",
                        env={"FAKE_STEP_S": "0.05"})
    manager = JobManager(tmp_path / "jobs", launch=launch, publish_dir=tmp_path / "concepts")
    checkpoints = {TITLE: str(base), "base.safetensors": str(base), "base": str(base)}
    yield TrainingHost(manager=manager, policy=PathPolicy((str(datasets),)), checkpoint_titles=lambda: [TITLE],
                       resolve_checkpoint=checkpoints.get, devices=lambda: ["auto", "cpu"])
    for info in manager.list_jobs():
        if "cancel" in [a.value for a in info.actions]:
            manager.cancel(info.id)


def make_client(host: TrainingHost, api_auth: str | None = None) -> TestClient:
    app = FastAPI()
    add_job_routes(app, AccessPolicy.from_cmd_opts(SimpleNamespace(api=True, api_auth=api_auth), environ={}), host)
    return TestClient(app)


def body(host: TrainingHost, **overrides) -> dict:
    values = dict(name="faces", dataset_dir=str(Path(host.policy.dataset_roots[0]) / "faces"), base_checkpoint=TITLE,
                  resolution=64, batch_size=4, micro_batch_size=2, max_steps=10_000, device="cpu",
                  preview_every_steps=0)
    values.update(overrides)
    return values


def wait_state(client: TestClient, job_id: str, states: set[str]) -> dict:
    def seen() -> dict | None:
        client.app.state  # noqa: B018 - keep the client alive
        info = client.get(f"{PREFIX}/{job_id}").json()
        if info["state"] in states:
            return info
        _tick(client)
        return None

    return wait_until(seen, f"job {job_id!r} in {sorted(states)}",
                      describe=lambda: str(client.get(f"{PREFIX}/{job_id}").json()))


def _tick(client: TestClient) -> None:
    client.get(PREFIX)  # listing does not start anything; the manager's tick does
    HOSTS[id(client)].manager.tick()


HOSTS: dict[int, TrainingHost] = {}


@pytest.fixture()
def client(host):
    c = make_client(host)
    HOSTS[id(c)] = host
    yield c
    HOSTS.pop(id(c), None)


def errors_by_argument(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {tuple(e["loc"])[-1]: e["msg"] for e in response.json()["detail"]}


# --- life cycle


def test_create_list_get_stop_resume_cancel_delete(client, host):
    assert client.get(PREFIX).json() == {"jobs": []}
    created = client.post(PREFIX, json=body(host, name="My faces!", unload_webui_model=True))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["id"] == "My_faces" and job["state"] == "preparing" and job["unload_webui_model"] is True
    assert job["base_checkpoint"] == host.resolve_checkpoint(TITLE)
    assert [j["id"] for j in client.get(PREFIX).json()["jobs"]] == ["My_faces"]
    detail = client.get(f"{PREFIX}/My_faces").json()
    assert detail["config"]["job_dir"] == str(host.manager.root / "My_faces")
    assert detail["config"]["name"] == "My_faces"

    wait_state(client, "My_faces", {"training"})
    assert client.post(f"{PREFIX}/My_faces/resume").status_code == 409
    assert client.delete(f"{PREFIX}/My_faces").status_code == 409
    assert client.post(f"{PREFIX}/My_faces/stop").json()["requested"] == "stop"
    stopped = wait_state(client, "My_faces", {"stopped"})
    assert stopped["actions"] == ["resume", "delete"]
    assert client.get(f"{PREFIX}/My_faces/loss").json()["points"][0] == {"step": 1, "loss": 1.0}
    assert client.get(f"{PREFIX}/My_faces/loss.png").content.startswith(b"\x89PNG")
    dark = client.get(f"{PREFIX}/My_faces/loss.png", params={"theme": "dark"}).content
    assert Image.open(io.BytesIO(dark)).convert("L").getpixel((1, 1)) < 40
    assert client.get(f"{PREFIX}/My_faces/loss.png", params={"theme": "sepia"}).status_code == 422
    assert client.get(f"{PREFIX}/My_faces/preview.png").status_code == 404
    assert client.get(f"{PREFIX}/My_faces/log", params={"lines": 5}).status_code == 200

    bad_resume = client.post(f"{PREFIX}/My_faces/resume", json={"seed": 3})
    assert errors_by_argument(bad_resume)["seed"].startswith("seed cannot change on resume")
    resumed = client.post(f"{PREFIX}/My_faces/resume", json={"max_steps": 20_000})
    assert resumed.status_code == 200 and resumed.json()["total_steps"] == 20_000
    wait_state(client, "My_faces", {"training"})
    cancelled = client.post(f"{PREFIX}/My_faces/cancel")
    assert cancelled.json()["state"] == "cancelled"
    assert client.delete(f"{PREFIX}/My_faces").json() == {"deleted": "My_faces"}
    assert client.get(f"{PREFIX}/My_faces").status_code == 404
    assert client.get(PREFIX).json() == {"jobs": []}


def test_preview_png_serves_the_newest_grid(client, host):
    client.post(PREFIX, json=body(host, max_steps=2))
    previews = host.manager.root / "faces" / "previews"
    (previews / "step-000001.png").write_bytes(b"\x89PNG one")
    (previews / "step-000002.png").write_bytes(b"\x89PNG two")
    assert client.get(f"{PREFIX}/faces/preview.png").content == b"\x89PNG two"


# --- validation: 422 names the argument


@pytest.mark.parametrize(("overrides", "argument", "text"), [
    ({"learning_rate": -1}, "learning_rate", "learning_rate=-1.0 must be in (0, 1]"),
    ({"resolution": 100}, "resolution", "must be a multiple of 64"),
    ({"batch_size": 5}, "batch_size", "not a multiple of micro_batch_size"),
    ({"preview_seeds": ["x"]}, "preview_seeds", "must be an integer"),
    ({"lr_schedule": "sometimes"}, "lr_schedule", "is not one of"),
    ({"bogus": 1}, "bogus", "unknown config key(s): bogus"),
    ({"name": "../.."}, "name", "no usable characters"),
    ({"job_dir": "/tmp/x"}, "job_dir", "chosen by the server"),
    ({"base_checkpoint": "/etc/passwd"}, "base_checkpoint", "not in the WebUI's checkpoint list"),
    ({"base_checkpoint": None}, "base_checkpoint", "not in the WebUI's checkpoint list"),
    ({"device": "cuda:7"}, "device", "is not one of auto, cpu"),
    ({"unload_webui_model": "yes"}, "unload_webui_model", "must be true or false"),
])
def test_bad_values_give_422_naming_the_argument(client, host, overrides, argument, text):
    errors = errors_by_argument(client.post(PREFIX, json=body(host, **overrides)))
    assert argument in errors and text in errors[argument], errors
    assert client.get(PREFIX).json() == {"jobs": []}  # nothing was created


def test_every_problem_is_reported_at_once(client, host):
    errors = errors_by_argument(client.post(PREFIX, json=body(host, learning_rate=0, max_steps=0, dataset_dir="")))
    assert {"learning_rate", "max_steps", "dataset_dir"} <= set(errors)


def test_body_must_be_an_object(client):
    assert errors_by_argument(client.post(PREFIX, json=[1, 2])) == {
        "body": "the request body must be a JSON object of config fields"}


def test_a_used_name_is_a_422_on_name(client, host):
    assert client.post(PREFIX, json=body(host, max_steps=1)).status_code == 201
    assert "already used by a job" in errors_by_argument(client.post(PREFIX, json=body(host)))["name"]


def test_config_error_problems_find_the_field():
    error = ConfigError(["learning_rate=0.0 must be in (0, 1]", "preview_seeds[1]='x' must be an integer",
                         "missing required config key(s): name, dataset_dir", "seed cannot change on resume (was 0)",
                         "something else"])
    assert [arg for arg, _ in config_error_problems(error)] == [
        "learning_rate", "preview_seeds", "name", "dataset_dir", "seed", "body"]


# --- path attacks


def test_dataset_folders_outside_the_allowed_roots_are_refused(client, host, tmp_path):
    root = Path(host.policy.dataset_roots[0])
    secret = tmp_path / "secret"
    secret.mkdir()
    (root / "escape").symlink_to(secret, target_is_directory=True)
    for path in (str(secret), "/etc", str(root / ".." / "secret"), str(root / "faces" / ".." / ".." / "secret"),
                 str(root / "escape"), "~/", "faces"):
        errors = errors_by_argument(client.post(PREFIX, json=body(host, dataset_dir=path)))
        assert "outside the allowed dataset folders" in errors["dataset_dir"], (path, errors)
    assert "not an existing folder" in errors_by_argument(
        client.post(PREFIX, json=body(host, dataset_dir=str(root / "missing"))))["dataset_dir"]
    assert not any(p.name != ".jobs.lock" for p in host.manager.root.iterdir())


def test_job_ids_cannot_reach_outside_the_jobs_folder(client, host, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (outside / "train.log").write_text("secret log")
    (host.manager.root / "linked").symlink_to(outside, target_is_directory=True)
    for job_id in ("..", "...", "linked", "%2e%2e", "..%2F..%2Fetc", "%2Fetc", "a%00b"):
        for suffix in ("", "/log", "/loss", "/loss.png", "/preview.png"):
            response = client.get(f"{PREFIX}/{job_id}{suffix}")
            assert response.status_code == 404, (job_id, suffix, response.text)
            assert "secret" not in response.text
        assert client.delete(f"{PREFIX}/{job_id}").status_code in (404, 405)
        assert client.post(f"{PREFIX}/{job_id}/cancel").status_code == 404
    assert (outside / "config.json").exists() and (outside / "train.log").exists()


# --- auth


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_api_auth_protects_every_route(host):
    client = make_client(host, "alice:s3cret,bob:pw")
    routes = [(route.path, sorted(route.methods)[0]) for route in client.app.routes if route.path.startswith(PREFIX)]
    assert len(routes) == 11
    for path, method in routes:
        url = path.replace("{job_id}", "x")
        for headers in ({}, basic("alice", "wrong"), basic("mallory", "s3cret")):
            response = client.request(method, url, headers=headers)
            assert response.status_code == 401, (method, url, headers)
            assert response.headers.get("www-authenticate") == "Basic"
    assert client.get(PREFIX, headers=basic("alice", "s3cret")).status_code == 200
    assert client.get(PREFIX, headers=basic("bob", "pw")).status_code == 200
    assert client.get(f"{PREFIX}/nope", headers=basic("bob", "pw")).status_code == 404


def test_without_api_auth_the_routes_are_open(host):
    assert make_client(host, None).get(PREFIX).status_code == 200
    assert make_client(host, "").get(PREFIX).status_code == 200
