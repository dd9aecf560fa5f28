"""WebUI entry point of the "GCFG Training" tab and the /gcfg/v1/jobs routes; the logic lives in gcfg_webui and
trainer.jobs. Executed by the WebUI with the extension root on `sys.path`, on every start and UI reload.

Jobs live in `<models>/GCFG-training/<name>/`; a finished or stopped job's concept model is copied to `<models>/GCFG/`
(the GCFG accordion's list). Datasets must lie in the dedicated folder `<data dir>/GCFG-datasets/` (created at start,
named in the tab) or in a folder listed in the environment variable GCFG_DATASET_ROOTS (separated by os.pathsep):
never anywhere else in the WebUI's tree, whose models and outputs a request must not reach.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from modules import paths, script_callbacks, sd_models, shared

from gcfg_webui import access, jobs_api, training_tab
from gcfg_webui.model_files import concept_dir
from trainer.jobfolder import ACTIVE_STATES
from trainer.jobs import JobInfo, JobManager, LaunchSpec, PathPolicy

logger = logging.getLogger("gcfg.training")

EXTENSION_ROOT = str(Path(__file__).resolve().parents[1])
JOBS_DIR_NAME = "GCFG-training"
DATASETS_DIR_NAME = "GCFG-datasets"


def _devices() -> list[str]:
    import torch

    return ["auto", *(f"cuda:{i}" for i in range(torch.cuda.device_count())), "cpu"]


def _resolve_checkpoint(title: str) -> str | None:
    info = sd_models.get_closet_checkpoint_match(title)
    return info.filename if info is not None else None


def _unload_webui_model(info: JobInfo) -> None:
    if info.unload_webui_model and shared.sd_model is not None:
        from modules import call_queue

        with call_queue.queue_lock:  # never in the middle of a generation
            sd_models.unload_model_weights()
        logger.info("GCFG: moved the WebUI's model to the CPU while %s trains", info.id)


def _reload_webui_model(info: JobInfo) -> None:
    still_needed = any(j.unload_webui_model and j.id != info.id and j.state in ACTIVE_STATES
                       for j in _host().manager.list_jobs())
    if info.unload_webui_model and not still_needed and shared.sd_model is not None:
        from modules import call_queue

        with call_queue.queue_lock:
            sd_models.send_model_to_device(shared.sd_model)
        logger.info("GCFG: moved the WebUI's model back to %s", shared.device)


def dataset_roots(data_path: str, environ: dict | os._Environ = os.environ) -> tuple[str, ...]:
    """The folders datasets may come from: the dedicated one (created here) first, then GCFG_DATASET_ROOTS."""
    dedicated = os.path.join(data_path, DATASETS_DIR_NAME)
    os.makedirs(dedicated, exist_ok=True)
    extra = [p for p in environ.get("GCFG_DATASET_ROOTS", "").split(os.pathsep) if p.strip()]
    return tuple(dict.fromkeys(os.path.realpath(os.path.expanduser(p.strip())) for p in [dedicated, *extra]))


def _make_host() -> jobs_api.TrainingHost:
    data_path = getattr(paths, "data_path", os.path.dirname(paths.models_path))
    # The trainer runs on the WebUI's Python, with this extension first on the path (PyPI has another `trainer`),
    # then everything the WebUI put there (the ldm and k-diffusion repositories).
    python_path = (EXTENSION_ROOT, *(p for p in sys.path if p and os.path.isdir(p) and p != EXTENSION_ROOT))
    default_device = "cuda:0" if "cuda:0" in _devices() else "cpu"
    manager = JobManager(os.path.join(paths.models_path, JOBS_DIR_NAME),
                         launch=LaunchSpec(python=sys.executable, pythonpath=python_path),
                         default_device=default_device, publish_dir=concept_dir(),
                         on_start=_unload_webui_model, on_finish=_reload_webui_model)
    return jobs_api.TrainingHost(manager=manager, policy=PathPolicy(dataset_roots(data_path)),
                                 checkpoint_titles=lambda: list(sd_models.checkpoint_tiles()),
                                 resolve_checkpoint=_resolve_checkpoint, devices=_devices,
                                 auto_device=default_device)


def _host() -> jobs_api.TrainingHost:
    # Kept on the gcfg_webui package (it stays in sys.modules), so a UI reload re-uses the manager and its thread.
    host = getattr(jobs_api, "_webui_host", None)
    if host is None:
        host = jobs_api._webui_host = _make_host()
        host.manager.start_background()
    return host


def _on_ui_tabs():
    return [(training_tab.build(_host()), training_tab.TAB_TITLE, training_tab.TAB_ID)]


def _on_app_started(demo, app) -> None:
    jobs_api.add_job_routes(app, access.AccessPolicy.from_cmd_opts(shared.cmd_opts), _host)


script_callbacks.on_ui_tabs(_on_ui_tabs)
script_callbacks.on_app_started(_on_app_started)
