"""Training jobs over REST, under /gcfg/v1/jobs, and the request checks the tab shares with it.

    GET    /gcfg/v1/jobs                    every job, newest first
    POST   /gcfg/v1/jobs                    create and queue (201); 422 names the bad argument
    GET    /gcfg/v1/jobs/{id}               one job, with its config
    GET    /gcfg/v1/jobs/{id}/log?lines=N   the end of its log
    GET    /gcfg/v1/jobs/{id}/loss          (step, loss) points
    GET    /gcfg/v1/jobs/{id}/loss.png      the loss plot (?theme=dark for a dark background)
    GET    /gcfg/v1/jobs/{id}/preview.png   the newest preview grid (404 when none yet)
    POST   /gcfg/v1/jobs/{id}/cancel|stop|resume   (resume takes optional config overrides as its body)
    DELETE /gcfg/v1/jobs/{id}

Who may call them: gcfg_webui.access (they exist only with --api; every POST and the DELETE change state and need
credentials, or a server reachable from this machine alone). A request never names a file: the
dataset folder must resolve inside the allowed dataset roots, the base checkpoint is looked up in the WebUI's
checkpoint list, the job folder is chosen by the server from the sanitised name, and job files are reached only
through a validated job id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Body, FastAPI, Query
from fastapi.responses import FileResponse, JSONResponse, Response

from gcfg_webui import access
from trainer.config import ConfigError, TrainConfig
from trainer.jobs import JobConflictError, JobError, JobManager, JobNotFoundError, PathPolicy

logger = logging.getLogger("gcfg.jobs_api")

PREFIX = "/gcfg/v1/jobs"
UNLOAD_FIELD = "unload_webui_model"  # request field beside the config fields: free the WebUI's model while training


@dataclass(frozen=True)
class TrainingHost:
    """What the tab and the routes need from the WebUI, passed in so both run against a fake host in tests."""

    manager: JobManager
    policy: PathPolicy
    checkpoint_titles: Callable[[], list[str]]  # the WebUI's checkpoint list (dropdown choices)
    resolve_checkpoint: Callable[[str], str | None]  # a title or name from that list -> its file, else None
    devices: Callable[[], list[str]]  # device choices: "auto", "cpu", "cuda:0", ...
    auto_device: str = "cpu"  # what "auto" means on this machine (the tab says so; CPU-only machines get CPU defaults)


class RequestError(ValueError):
    """Bad request values: `problems` is a list of (argument, message); becomes a 422 answer."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


_FIELD_RE = re.compile(r"^([a-z_][a-z0-9_]*)(?:\[\d+\])?(?:=| cannot| is | must)")
_KEYS_RE = re.compile(r"^(?:unknown|missing required) config key\(s\): (.+)$")


def config_error_problems(error: ConfigError) -> list[tuple[str, str]]:
    """(argument, message) pairs from a `ConfigError`, the argument parsed from each message's leading field."""
    problems = []
    for message in error.problems:
        keys = _KEYS_RE.match(message)
        if keys:
            problems.extend((key.strip(), message) for key in keys.group(1).split(","))
            continue
        field = _FIELD_RE.match(message)
        problems.append((field.group(1) if field else "body", message))
    return problems


def build_job_config(host: TrainingHost, values: Mapping[str, Any]) -> tuple[TrainConfig, bool]:
    """The validated config and the unload flag of a create request (form or REST), or `RequestError`."""
    if not isinstance(values, Mapping):
        raise RequestError([("body", "the request body must be a JSON object of config fields")])
    values = dict(values)
    unload = values.pop(UNLOAD_FIELD, False)
    if not isinstance(unload, bool):
        raise RequestError([(UNLOAD_FIELD, f"{UNLOAD_FIELD}={unload!r} must be true or false")])
    problems: list[tuple[str, str]] = []
    try:
        values["dataset_dir"] = host.policy.check_dataset(values.get("dataset_dir", ""))
    except JobError as e:
        problems.append((e.argument, str(e)))
    title = values.get("base_checkpoint")
    checkpoint = host.resolve_checkpoint(title) if isinstance(title, str) and title.strip() else None
    if checkpoint is None:
        problems.append(("base_checkpoint", f"base_checkpoint={title!r} is not in the WebUI's checkpoint list; "
                                            f"choose one of: {', '.join(host.checkpoint_titles()) or '(none)'}"))
    else:
        values["base_checkpoint"] = checkpoint
    device = values.get("device", "auto")
    if device not in host.devices():
        problems.append(("device", f"device={device!r} is not one of {', '.join(host.devices())}"))
    try:
        config = host.manager.new_config(values)
    except ConfigError as e:
        named = {argument for argument, _ in problems}  # one message per argument: ours are the more specific
        problems.extend(p for p in config_error_problems(e) if p[0] not in named)
    except JobError as e:
        problems.append((e.argument, str(e)))
    if problems:
        raise RequestError(problems)
    return config, unload


def create_job(host: TrainingHost, values: Mapping[str, Any]):
    """Validate and queue a job; `RequestError` for bad values (including a name already in use)."""
    config, unload = build_job_config(host, values)
    try:
        return host.manager.create(config, unload_webui_model=unload)
    except ConfigError as e:
        raise RequestError(config_error_problems(e)) from e
    except JobError as e:
        raise RequestError([(e.argument, str(e))]) from e


def _problems_response(problems: list[tuple[str, str]], status: int = 422) -> JSONResponse:
    # The shape of FastAPI's own validation errors, so clients handle both alike.
    return JSONResponse(status_code=status, content={"detail": [
        {"loc": ["body", argument] if argument != "body" else ["body"], "msg": message, "type": "value_error"}
        for argument, message in problems]})


def _job_error_response(error: JobError) -> JSONResponse:
    if isinstance(error, JobNotFoundError):
        return JSONResponse(status_code=404, content={"detail": str(error)})
    if isinstance(error, JobConflictError):
        return JSONResponse(status_code=409, content={"detail": str(error)})
    return _problems_response([(error.argument, str(error))])


def add_job_routes(app: FastAPI, policy: access.AccessPolicy,
                   host: TrainingHost | Callable[[], TrainingHost]) -> None:
    """Register the job routes on `app` as `policy` allows; `host` may be a callable so a reloaded UI serves the
    current host."""
    current = host if callable(host) and not isinstance(host, TrainingHost) else (lambda: host)

    def guarded(action: Callable[[], Any]) -> Any:
        try:
            return action()
        except RequestError as e:
            return _problems_response(e.problems)
        except ConfigError as e:
            return _problems_response(config_error_problems(e))
        except JobError as e:
            return _job_error_response(e)

    def list_jobs() -> dict:
        return {"jobs": [info.to_dict() for info in current().manager.list_jobs()]}

    def create(body: Any = Body(None)) -> Any:  # noqa: B008 - FastAPI declares the body as a default
        def run():
            info = create_job(current(), body if body is not None else {})
            return JSONResponse(status_code=201, content=info.to_dict())

        return guarded(run)

    def get(job_id: str) -> Any:
        def run():
            manager = current().manager
            return {**manager.get(job_id).to_dict(), "config": manager.config(job_id).to_dict()}

        return guarded(run)

    def log_tail(job_id: str, lines: int = Query(100, ge=1, le=5000)) -> Any:  # noqa: B008
        return guarded(lambda: {"id": job_id, "log": current().manager.log_tail(job_id, lines)})

    def loss(job_id: str) -> Any:
        return guarded(lambda: {"id": job_id, "points": current().manager.loss_points(job_id)})

    def loss_png(job_id: str, theme: str = Query("light", regex="^(light|dark)$")) -> Any:  # noqa: B008
        return guarded(lambda: Response(current().manager.loss_plot_png(job_id, theme=theme), media_type="image/png"))

    def preview_png(job_id: str) -> Any:
        def run():
            path = current().manager.latest_preview(job_id)
            if path is None:
                return JSONResponse(status_code=404, content={"detail": f"job {job_id!r} has no preview yet"})
            return FileResponse(path, media_type="image/png")

        return guarded(run)

    def cancel(job_id: str) -> Any:
        return guarded(lambda: current().manager.cancel(job_id).to_dict())

    def stop(job_id: str) -> Any:
        return guarded(lambda: current().manager.stop(job_id).to_dict())

    def resume(job_id: str, body: Any = Body(None)) -> Any:  # noqa: B008
        def run():
            overrides = body or {}
            if not isinstance(overrides, Mapping):
                raise RequestError([("body", "the body must be a JSON object of config fields to change")])
            return current().manager.resume(job_id, **overrides).to_dict()

        return guarded(run)

    def delete(job_id: str) -> Any:
        def run():
            current().manager.delete(job_id)
            return {"deleted": job_id}

        return guarded(run)

    access.add_routes(app, policy, [
        (PREFIX, list_jobs, ["GET"], False), (PREFIX, create, ["POST"], True),
        (PREFIX + "/{job_id}", get, ["GET"], False), (PREFIX + "/{job_id}/log", log_tail, ["GET"], False),
        (PREFIX + "/{job_id}/loss", loss, ["GET"], False), (PREFIX + "/{job_id}/loss.png", loss_png, ["GET"], False),
        (PREFIX + "/{job_id}/preview.png", preview_png, ["GET"], False),
        (PREFIX + "/{job_id}/cancel", cancel, ["POST"], True), (PREFIX + "/{job_id}/stop", stop, ["POST"], True),
        (PREFIX + "/{job_id}/resume", resume, ["POST"], True), (PREFIX + "/{job_id}", delete, ["DELETE"], True),
    ])
    access.log_policy_once(policy)
