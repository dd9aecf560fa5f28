"""The "GCFG Training" tab: form derived from the config fields, handlers, Blocks, and the entry script on the fake
WebUI host."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from waiting import wait_until

from gcfg_webui import training_tab
from gcfg_webui.jobs_api import TrainingHost
from gcfg_webui.training_tab import TrainingTab, form_fields, parse_widget, render_jobs_html, widget_value
from trainer.config import TrainConfig, config_fields
from trainer.jobfolder import JobState
from trainer.jobs import JobAction, JobError, JobInfo, JobManager, LaunchSpec, PathPolicy

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TITLE = "base.safetensors [0123456789]"


@pytest.fixture()
def host(tmp_path):
    datasets = tmp_path / "datasets"
    (datasets / "faces").mkdir(parents=True)
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights")
    launch = LaunchSpec(pythonpath=(str(TESTS_DIR), str(REPO_ROOT)), module="fake_trainer",
                        env={"FAKE_STEP_S": "0.05"})
    manager = JobManager(tmp_path / "jobs", launch=launch, publish_dir=tmp_path / "concepts")
    yield TrainingHost(manager=manager, policy=PathPolicy((str(datasets),)), checkpoint_titles=lambda: [TITLE],
                       resolve_checkpoint={TITLE: str(base)}.get, devices=lambda: ["auto", "cpu"])
    for info in manager.list_jobs():
        if JobAction.CANCEL in info.actions:
            manager.cancel(info.id)


def form_values(tab: TrainingTab, **overrides) -> list:
    """The widget values of the form in `create`'s argument order, defaults plus overrides."""
    values = []
    for spec in tab.main_fields + tab.advanced_fields:
        values.append(overrides.pop(spec.name, widget_value(spec)))
    assert not overrides, overrides
    return values


def tiny_form(tab: TrainingTab, host: TrainingHost, name: str = "faces", **overrides):
    fields = dict(resolution=64, batch_size=4, micro_batch_size=2, max_steps=10_000, preview_every_steps=0)
    fields.update(overrides)
    dataset = str(Path(host.policy.dataset_roots[0]) / "faces")
    return (name, dataset, TITLE, "cpu", False, *form_values(tab, **fields))


# --- the form is derived from the config declaration


def test_form_covers_every_config_field_once():
    main, advanced = form_fields()
    names = [s.name for s in main + advanced] + list(training_tab.SPECIAL_FIELDS)
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name != "job_dir")
    assert len(names) == len(set(names))


@pytest.mark.parametrize("spec", config_fields(), ids=lambda s: s.name)
def test_widget_values_round_trip_to_the_config_defaults(spec):
    if spec.required:
        return
    expected = spec.default.value if isinstance(spec.default, enum.Enum) else spec.default
    parsed = parse_widget(spec, widget_value(spec))
    assert (tuple(parsed) if spec.type is tuple else parsed) == expected


def test_parse_widget_reads_prompt_lines_and_seed_lists():
    specs = {s.name: s for s in config_fields()}
    assert parse_widget(specs["preview_prompts"], " a cat \n\n in snow\n") == ["a cat", "in snow"]
    assert parse_widget(specs["preview_seeds"], "1, 2 3,,x") == [1, 2, 3, "x"]  # "x" is left for the config to name
    assert parse_widget(specs["max_steps"], 100.0) == 100 and isinstance(parse_widget(specs["max_steps"], 1.0), int)


def test_format_duration():
    assert training_tab.format_duration(None) == "–"
    assert training_tab.format_duration(75) == "1m 15s"
    assert training_tab.format_duration(3 * 3600 + 120) == "3h 02m"
    assert training_tab.format_duration(50 * 3600) == "2d 2h"


def _info(**changes) -> JobInfo:
    values = dict(id="a", name="a", state=JobState.TRAINING, step=25, total_steps=100, progress=0.25,
                  images_per_second=3.5, eta_seconds=90.0, message="loss 0.1", last_error=None, created="",
                  updated="", device="cpu", queue_position=None, actions=(JobAction.STOP, JobAction.CANCEL),
                  requested=None, pid=1, last_checkpoint=None, published=None, published_step=None, dataset_dir="",
                  base_checkpoint="", unload_webui_model=False)
    values.update(changes)
    return JobInfo(**values)


def test_jobs_html_shows_progress_and_escapes_text():
    text = render_jobs_html([_info(message='<img src=x onerror="alert(1)">'),
                             _info(id="b", name="b", state=JobState.QUEUED, queue_position=2, progress=0.0,
                                   eta_seconds=None, images_per_second=None)], "a")
    assert 'data-job-id="a"' in text and 'class="gcfg-train-row selected"' in text
    assert "width:25.0%" in text and "25/100" in text and "3.50" in text and "1m 30s" in text
    assert "queued #2" in text
    assert "<img" not in text and "&lt;img" in text
    assert "No training jobs yet" in render_jobs_html([], None)


# --- handlers


def test_create_reports_every_problem_by_label_and_creates_nothing(host):
    tab = TrainingTab(host)
    message, job_id = tab.create(*tiny_form(tab, host, name="", learning_rate=0, batch_size=5))
    assert job_id == ""
    assert "Output name" in message and "Learning rate" in message and "Batch size" in message
    assert host.manager.list_jobs() == []


def test_create_poll_and_actions(host):
    gr = pytest.importorskip("gradio")
    tab = TrainingTab(host)
    message, job_id = tab.create(*tiny_form(tab, host, name="my faces"))
    assert job_id == "my_faces" and "created" in message

    def ticked(condition):
        def check() -> bool:
            host.manager.tick()
            return condition()
        return check

    wait_until(ticked(lambda: host.manager.get(job_id).step >= 2), "step 2")
    selected, sent, jobs, detail, loss, preview, log, status, stop, cancel, resume, delete = tab.poll("", {})
    assert selected == job_id and sent["job"] == job_id  # the running job is selected by default
    assert 'data-job-id="my_faces"' in jobs and "training" in detail
    assert loss["type"] == "altair" and loss["chart"] == "line"  # gradio themes it like its own LinePlot
    spec = json.loads(loss["plot"])  # the Vega-Lite chart the browser draws
    [rows] = spec["datasets"].values()
    assert {r["series"] for r in rows} == {"loss", "smoothed"} and max(r["step"] for r in rows) >= 2
    low, high = spec["layer"][0]["encoding"]["y"]["scale"]["domain"]
    assert low < min(r["loss"] for r in rows) and high > max(r["loss"] for r in rows)
    assert status == gr.update()  # no action yet: nothing to follow
    assert [b["interactive"] for b in (stop, cancel, resume, delete)] == [True, True, False, False]
    # unchanged images are not sent again
    again = tab.poll(selected, sent)
    assert again[5] == gr.update()
    line, followed = tab.act("stop", selected, True, {})
    assert "Stopping" in line and followed == {"job": job_id, "state": "training"}
    wait_until(ticked(lambda: host.manager.get(job_id).state == JobState.STOPPED), "the stopped state")
    selected, sent, *_, status, stop, cancel, resume, delete = tab.poll(selected, {}, followed)
    assert "stopped at step" in status and "Resume continues" in status  # the line followed the job, even with a
    # `sent` from a poll that started before the action (it knows nothing of the action)
    assert [b["interactive"] for b in (stop, cancel, resume, delete)] == [False, False, True, True]
    assert tab.act("delete", selected, False, followed)[0] == ""  # the confirm dialog said no
    assert host.manager.get(job_id).state == JobState.STOPPED
    assert "cannot stop" in tab.act("stop", selected, True, followed)[0]
    assert "Deleted" in tab.act("delete", selected, True, followed)[0]
    assert tab.poll(selected, sent)[0] == ""
    assert "Select a job first" in tab.act("resume", "")[0]


def test_the_status_line_follows_a_resumed_job_to_completion(host):
    """After Resume the line said "queued to resume" for good (issue 14); it must end at "completed"."""
    tab = TrainingTab(host)
    tab.create(*tiny_form(tab, host, name="discs", max_steps=60))

    def reached(predicate):
        host.manager.tick()
        return predicate(host.manager.get("discs"))

    wait_until(lambda: reached(lambda j: j.step >= 1), "a first step")
    host.manager.stop("discs")
    wait_until(lambda: reached(lambda j: j.state == JobState.STOPPED), "the stop")
    line, followed = tab.act("resume", "discs", True, {})
    assert "queued to resume" in line
    lines = []
    sent = {}

    def completed_line():
        nonlocal sent
        host.manager.tick()
        out = tab.poll("discs", sent, followed)
        sent = out[1]
        if isinstance(out[7], str):
            lines.append(out[7])
        return lines and "completed" in lines[-1]

    wait_until(completed_line, "the status line to say completed", describe=lambda: str(lines))
    assert "queued to resume" not in lines[-1] and 'data-state="completed"' in lines[-1]


@pytest.mark.parametrize(("state", "changes", "text"), [
    (JobState.QUEUED, {"queue_position": 2}, "is queued (position 2)."),
    (JobState.TRAINING, {}, "is training: step 25/100."),
    (JobState.CACHING, {"message": "caching latents 3 / 9"}, "is caching: caching latents 3 / 9"),
    (JobState.STOPPING, {}, "is saving a checkpoint, then stops."),
    (JobState.STOPPED, {}, "stopped at step 25; Resume continues from there."),
    (JobState.COMPLETED, {"published": "/m/GCFG/a.safetensors"}, "completed 25 steps: concept model <code>/m/GCFG/"),
    (JobState.FAILED, {"last_error": "disk <full>"}, "failed: disk &lt;full&gt;"),
    (JobState.INTERRUPTED, {}, "was interrupted at step 25; Resume continues from the last checkpoint."),
    (JobState.CANCELLED, {}, "was cancelled."),
])
def test_status_line_per_state(state, changes, text):
    line = training_tab.status_line_html(_info(state=state, **changes))
    assert text in line and f'data-state="{state.value}"' in line and "<b>a</b>" in line


def test_device_choices_say_what_auto_means():
    assert training_tab.device_choices(["auto", "cuda:0", "cpu"], "cuda:0") == ["auto → cuda:0", "cuda:0", "cpu"]
    assert training_tab.device_value("auto → cpu") == "auto" and training_tab.device_value("cuda:1") == "cuda:1"


def test_cpu_only_machines_get_a_run_a_cpu_can_finish(host):
    assert host.auto_device == "cpu"
    tab = TrainingTab(host)
    assert tab.on_cpu and tab.defaults == training_tab.CPU_DEFAULTS
    specs = {s.name: s for s in config_fields()}
    assert widget_value(specs["mixed_precision"], tab.defaults) == "no"  # fp16 cannot run, bf16 crawls on CPUs
    assert widget_value(specs["resolution"], tab.defaults) < specs["resolution"].default
    assert "takes days here" in training_tab.cpu_warning_html()
    gpu = TrainingTab(dataclasses.replace(host, auto_device="cuda:0"))
    assert not gpu.on_cpu and gpu.defaults == {}  # the paper's settings
    assert widget_value(specs["resolution"], gpu.defaults) == 512 and widget_value(specs["batch_size"]) == 32
    # every CPU default is a valid config value
    TrainConfig.from_dict({**{s.name: parse_widget(s, widget_value(s, tab.defaults)) for s in config_fields()
                              if not s.required}, "name": "x", "dataset_dir": "d", "base_checkpoint": "b",
                           "job_dir": "j"}).validate(check_paths=False)


def test_build_wires_the_poll_through_javascript_without_the_queue(host):
    pytest.importorskip("gradio")
    blocks = training_tab.build(host)
    polls = [d for d in blocks.config["dependencies"] if d.get("js") == "gcfgTrainPollArgs"]
    assert len(polls) == 1 and polls[0]["queue"] is False and polls[0]["show_progress"] == "hidden"
    confirms = [d["js"] for d in blocks.config["dependencies"] if "gcfgTrainConfirm" in (d.get("js") or "")]
    assert len(confirms) == 4
    ids = {c["props"].get("elem_id") for c in blocks.config["components"]}
    assert {"gcfg_train_poll", "gcfg_train_jobs", "gcfg_train_start", "gcfg_train_learning_rate",
            "gcfg_train_ema_decay", "gcfg_train_device", "gcfg_train_unload", "gcfg_train_cpu_warning"} <= ids
    props = {c["props"].get("elem_id"): c for c in blocks.config["components"]}
    assert props["gcfg_train_loss"]["type"] == "plot"  # gradio serialises LinePlot as its plot component
    assert props["gcfg_train_device"]["props"]["label"] == "Device"
    assert props["gcfg_train_device"]["props"]["choices"][0] == "auto → cpu"
    # one-line values are one-line inputs (gradio 3 renders <input> only with lines == max_lines == 1)
    for elem_id in ("gcfg_train_name", "gcfg_train_dataset_dir", "gcfg_train_preview_seeds",
                    "gcfg_train_preview_sampler"):
        assert (props[elem_id]["props"]["lines"], props[elem_id]["props"]["max_lines"]) == (1, 1), elem_id
    assert props["gcfg_train_preview_prompts"]["props"]["lines"] == 3
    assert str(Path(host.policy.dataset_roots[0])) in props["gcfg_train_dataset_dir"]["props"]["info"]


# --- the entry script on the fake WebUI host


_WEBUI_BOUND = ("modules", "harness", "fake_runtime")  # top-level names bound to one fake WebUI instance
_HOST_FREE = {"gcfg_webui", "gcfg_webui.access", "gcfg_webui.api", "gcfg_webui.jobs_api", "gcfg_webui.training_tab"}


def _bound(name: str) -> bool:
    return name.split(".")[0] in _WEBUI_BOUND or (name.startswith("gcfg_webui.") and name not in _HOST_FREE)


@pytest.fixture()
def fresh_fake_webui():
    """A fresh fake WebUI for this test only: modules bound to another test's fake `modules` (gcfg_webui's glue
    imports `modules.paths` once) are set aside and put back afterwards, so test order does not matter."""
    import gcfg_webui

    def drop_bound() -> dict:
        dropped = {name: sys.modules.pop(name) for name in [n for n in sys.modules if _bound(n)]}
        for name in dropped:  # `from gcfg_webui import x` reads the package attribute before sys.modules
            if name.startswith("gcfg_webui."):
                gcfg_webui.__dict__.pop(name.split(".", 1)[1], None)
        return dropped

    saved = drop_bound()
    sys.path.insert(0, str(TESTS_DIR / "fake_webui"))
    yield
    sys.path.remove(str(TESTS_DIR / "fake_webui"))
    drop_bound()
    sys.modules.update(saved)
    for name, module in saved.items():
        if name.startswith("gcfg_webui.") and "." not in name.split(".", 1)[1]:
            setattr(gcfg_webui, name.split(".", 1)[1], module)


def test_entry_script_registers_the_tab_and_the_routes(tmp_path, monkeypatch, fresh_fake_webui):
    pytest.importorskip("gradio")
    from harness import enable_fake_modules

    enable_fake_modules()
    from modules import paths, script_callbacks, sd_models

    from gcfg_webui import jobs_api

    registered: dict[str, list] = {}
    monkeypatch.setattr(script_callbacks, "on_ui_tabs", lambda fn, **_: registered.setdefault("tabs", []).append(fn),
                        raising=False)
    monkeypatch.setattr(script_callbacks, "on_app_started",
                        lambda fn, **_: registered.setdefault("app", []).append(fn))
    monkeypatch.setattr(paths, "models_path", str(tmp_path / "models"))
    monkeypatch.setattr(paths, "data_path", str(tmp_path), raising=False)
    monkeypatch.setattr(jobs_api, "_webui_host", None, raising=False)
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    monkeypatch.setenv("GCFG_DATASET_ROOTS", str(extra))
    base = tmp_path / "models" / "Stable-diffusion" / "base.safetensors"
    base.parent.mkdir(parents=True)
    base.write_bytes(b"")
    monkeypatch.setattr(sd_models, "checkpoints_list", {})
    monkeypatch.setattr(sd_models, "checkpoint_aliases", {})
    sd_models.register(str(base))

    spec = importlib.util.spec_from_file_location("gcfg_training.py", REPO_ROOT / "scripts" / "gcfg_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        [(blocks, title, elem_id)] = registered["tabs"][0]()
        assert (title, elem_id) == ("GCFG Training", "gcfg_training")
        host = jobs_api._webui_host
        assert host.manager.root == (tmp_path / "models" / "GCFG-training").resolve()
        assert host.manager.publish_dir == (tmp_path / "models" / "GCFG").resolve()
        assert host.manager.launch.pythonpath[0] == str(REPO_ROOT)
        datasets = tmp_path.resolve() / "GCFG-datasets"
        assert host.policy.dataset_roots == (str(datasets), str(extra.resolve())) and datasets.is_dir()
        (datasets / "faces").mkdir()
        assert host.policy.check_dataset(str(datasets / "faces")) == str(datasets / "faces")
        for inside_the_webui in (tmp_path / "models", tmp_path / "outputs", tmp_path):
            inside_the_webui.mkdir(exist_ok=True)
            with pytest.raises(JobError, match="outside the allowed dataset folders"):
                host.policy.check_dataset(str(inside_the_webui))
        assert host.resolve_checkpoint("base.safetensors [0123456789]") == str(base)
        assert host.resolve_checkpoint("nothing-like-it") is None
        from fastapi import FastAPI
        from fastapi.testclient import TestClient

        app = FastAPI()
        registered["app"][0](None, app)
        assert TestClient(app).get("/gcfg/v1/jobs").json() == {"jobs": []}
        # The WebUI's flags decide who may call: --listen without credentials refuses state changes.
        from modules import shared

        monkeypatch.setattr(shared, "cmd_opts", SimpleNamespace(**{**vars(shared.cmd_opts), "listen": True}))
        app = FastAPI()
        registered["app"][0](None, app)
        refused = TestClient(app).post("/gcfg/v1/jobs", json={})
        assert refused.status_code == 403 and "--listen" in refused.json()["detail"]
        monkeypatch.setattr(shared, "cmd_opts", SimpleNamespace(**{**vars(shared.cmd_opts), "api": False}))
        app = FastAPI()
        registered["app"][0](None, app)
        assert TestClient(app).get("/gcfg/v1/jobs").status_code == 404  # like /sdapi: no routes without --api
    finally:
        if jobs_api._webui_host is not None:
            jobs_api._webui_host.manager.shutdown()
