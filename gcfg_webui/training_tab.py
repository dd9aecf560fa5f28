"""The "GCFG Training" tab (gradio 3.41 Blocks): a job form derived from `trainer.config.config_fields()`, the job
list with live progress, and the selected job's loss plot, preview grid and log.

Nothing here trains: the form creates a job in the `JobManager`, which runs the trainer as a separate process. The
page polls with a hidden button that javascript/gcfg_training.js clicks every two seconds while the tab is visible
(`queue=False`: a poll never waits behind a generation). Every handler reads the job folders, so a reloaded page or a
restarted WebUI shows the same jobs. The WebUI is reached only through the `TrainingHost` (gcfg_webui.jobs_api).

On a machine without a GPU the form starts with a run the CPU can finish (`CPU_DEFAULTS`) and says why; with a GPU
it starts with the paper's settings (the config defaults). The loss plot is gradio's interactive LinePlot (zoom,
pan, tooltips; it follows the light or dark theme); the PNG of the same curve stays for the REST route.
"""

from __future__ import annotations

import enum
import html
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gcfg_webui.jobs_api import UNLOAD_FIELD, RequestError, TrainingHost, create_job
from trainer.config import FieldSpec, config_fields
from trainer.jobfolder import ACTIVE_STATES, JobState
from trainer.jobs import JobAction, JobError, JobInfo
from trainer.jobs.losses import plot_rows

logger = logging.getLogger("gcfg.training_tab")

TAB_TITLE = "GCFG Training"
TAB_ID = "gcfg_training"  # the WebUI wraps the tab as #tab_gcfg_training
POLL_BUTTON_ID = "gcfg_train_poll"

# Always shown, in this order, after name / dataset / checkpoint; every other field goes to "Advanced".
MAIN_FIELDS = ("resolution", "max_steps", "learning_rate", "batch_size", "micro_batch_size", "lr_schedule",
               "warmup_steps", "mixed_precision", "checkpoint_every_steps", "preview_every_steps", "preview_prompts")
SPECIAL_FIELDS = ("name", "dataset_dir", "base_checkpoint", "device")  # built by hand (choices come from the host)
SERVER_FIELDS = ("job_dir",)  # chosen by the server, never in the form

_LABELS = {"lr_schedule": "LR schedule", "ema_decay": "EMA decay", "min_snr_gamma": "Min-SNR γ",
           "adam_beta1": "Adam β1", "adam_beta2": "Adam β2", "adam_epsilon": "Adam ε",
           "dataset_dir": "Dataset folder", "base_checkpoint": "Base checkpoint (SD 1.5)", "name": "Output name",
           "device": "Device", "preview_seeds": "Preview seeds", "preview_prompts": "Preview prompts"}


# Where there is no GPU: a run a CPU finishes (the paper's 512 px / batch 32 / 10,000 steps take days there) in
# full precision (fp16 does not run on CPUs, bf16 autocast is slow on most of them).
CPU_DEFAULTS: Mapping[str, Any] = {"resolution": 256, "max_steps": 500, "batch_size": 4, "micro_batch_size": 1,
                                   "mixed_precision": "no", "checkpoint_every_steps": 100, "preview_every_steps": 250}
AUTO = "auto"
ARROW = " → "


def cpu_warning_html(defaults: Mapping[str, Any] = CPU_DEFAULTS) -> str:
    return ('<div class="gcfg-train-warning"><b>No GPU found: training runs on the CPU.</b> A full-size concept '
            "UNet (the paper's 512 px, batch 32, 10,000 steps) takes days here. The form starts with a small run "
            f"instead ({defaults['resolution']} px, batch {defaults['batch_size']}, {defaults['max_steps']} steps, "
            "full precision); use a machine with a GPU for real training.</div>")


def device_choices(devices: Sequence[str], auto_device: str) -> list[str]:
    """Dropdown entries: "auto" shows what it resolves to on this machine ("auto → cpu")."""
    return [f"{AUTO}{ARROW}{auto_device}" if d == AUTO else d for d in devices]


def device_value(choice: str) -> str:
    """The config value of a dropdown entry ("auto → cuda:0" -> "auto")."""
    return choice.split(ARROW, 1)[0].strip() if isinstance(choice, str) else choice


def field_label(name: str) -> str:
    return _LABELS.get(name, name.replace("_", " ").capitalize())


def form_fields() -> tuple[tuple[FieldSpec, ...], tuple[FieldSpec, ...]]:
    """(main, advanced) field specs of the form, derived from the config declaration."""
    specs = {spec.name: spec for spec in config_fields()}
    main = tuple(specs[name] for name in MAIN_FIELDS)
    advanced = tuple(spec for spec in specs.values()
                     if spec.name not in MAIN_FIELDS + SPECIAL_FIELDS + SERVER_FIELDS)
    return main, advanced


def widget_value(spec: FieldSpec, defaults: Mapping[str, Any] | None = None) -> Any:
    """The form's initial value of a field (tuples as text: one prompt per line, seeds comma-separated); `defaults`
    replaces some config defaults (e.g. `CPU_DEFAULTS`)."""
    default = (defaults or {}).get(spec.name, spec.default)
    if isinstance(default, enum.Enum):
        return default.value
    if spec.name == "preview_prompts":
        return "\n".join(default)
    if spec.type is tuple:
        return ", ".join(str(v) for v in default)
    return default


def parse_widget(spec: FieldSpec, value: Any) -> Any:
    """A widget's value as the config expects it; malformed text is passed on for the config to name."""
    if spec.name == "preview_prompts":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if spec.type is tuple:
        items = [item for item in re.split(r"[,\s]+", str(value or "")) if item]
        return [int(item) if re.fullmatch(r"-?\d+", item) else item for item in items]
    if spec.type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if spec.type is str and isinstance(value, str):
        return value.strip()
    return value


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 24:
        return f"{hours // 24}d {hours % 24}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _state_class(state: JobState) -> str:
    return "active" if state in ACTIVE_STATES else state.value


def render_jobs_html(jobs: Sequence[JobInfo], selected: str | None) -> str:
    """The job list: one clickable row per job with state, progress bar, step/total, images/s and ETA."""
    if not jobs:
        return '<div class="gcfg-train-empty">No training jobs yet. Fill in the form and press Start.</div>'
    rows = []
    for job in jobs:
        percent = 100 * job.progress
        state = job.state.value + (f" #{job.queue_position}" if job.queue_position else "")
        speed = f"{job.images_per_second:.2f}" if job.images_per_second else "–"
        eta = format_duration(job.eta_seconds) if job.state in ACTIVE_STATES else "–"
        classes = "gcfg-train-row" + (" selected" if job.id == selected else "")
        rows.append(
            f'<tr class="{classes}" data-job-id="{html.escape(job.id)}" title="{html.escape(job.message)}">'
            f'<td class="gcfg-train-name">{html.escape(job.name)}</td>'
            f'<td><span class="gcfg-train-state gcfg-state-{_state_class(job.state)}">{html.escape(state)}</span></td>'
            f'<td class="gcfg-train-progress"><div class="gcfg-progress"><div class="gcfg-progress-bar" '
            f'style="width:{percent:.1f}%"></div></div></td>'
            f'<td class="gcfg-num">{job.step}/{job.total_steps}</td>'
            f'<td class="gcfg-num">{speed}</td>'
            f'<td class="gcfg-num" data-eta="{job.eta_seconds if job.eta_seconds is not None else ""}">{eta}</td>'
            f'<td>{html.escape(job.device)}</td></tr>')
    return ('<table class="gcfg-train-jobs"><thead><tr><th>Job</th><th>State</th><th>Progress</th><th>Step</th>'
            '<th>img/s</th><th>ETA</th><th>Device</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def render_detail_html(job: JobInfo | None) -> str:
    """The selected job's summary: state, message, error, checkpoint and published model."""
    if job is None:
        return '<div class="gcfg-train-detail">Select a job in the list.</div>'
    parts = [f"<b>{html.escape(job.name)}</b> — {html.escape(job.state.value)}",
             html.escape(job.message or "")]
    if job.last_error:
        parts.append(f'<span class="gcfg-train-error">{html.escape(job.last_error)}</span>')
    if job.last_checkpoint:
        parts.append(f"last checkpoint: <code>{html.escape(job.last_checkpoint)}</code>")
    if job.published:
        parts.append(f"concept model: <code>{html.escape(job.published)}</code> (choose it in the GCFG accordion)")
    parts.append(f'<span class="gcfg-train-updated" data-updated="{html.escape(job.updated)}">'
                 f"updated {html.escape(job.updated)}</span>")
    return '<div class="gcfg-train-detail">' + "<br>".join(p for p in parts if p) + "</div>"


def status_line_html(job: JobInfo) -> str:
    """One sentence on where the job stands now, for the line under the action buttons."""
    name = f"<b>{html.escape(job.name)}</b>"
    state = job.state
    if state == JobState.QUEUED:
        where = f" (position {job.queue_position})" if job.queue_position else ""
        text = f"{name} is queued{where}."
    elif state == JobState.TRAINING:
        text = f"{name} is training: step {job.step}/{job.total_steps}."
    elif state == JobState.STOPPING:
        text = f"{name} is saving a checkpoint, then stops."
    elif state in ACTIVE_STATES:
        text = f"{name} is {html.escape(state.value)}: {html.escape(job.message)}"
    elif state == JobState.STOPPED:
        text = f"{name} stopped at step {job.step}; Resume continues from there."
    elif state == JobState.COMPLETED:
        model = f": concept model <code>{html.escape(job.published)}</code>" if job.published else ""
        text = f"{name} completed {job.step} steps{model}."
    elif state == JobState.FAILED:
        text = f"{name} failed: {html.escape(job.last_error or job.message)}"
    elif state == JobState.INTERRUPTED:
        text = f"{name} was interrupted at step {job.step}; Resume continues from the last checkpoint."
    else:
        text = f"{name} was {html.escape(state.value)}."
    kind = "problems" if state == JobState.FAILED else "ok"
    return f'<div class="gcfg-train-{kind}" data-state="{html.escape(state.value)}">{text}</div>'


LOSS_PLOT_HEIGHT = 260


def loss_chart_spec(rows: Sequence[Mapping[str, object]], y_domain: tuple[float, float]) -> str:
    """Vega-Lite JSON of the loss chart: raw losses as faint dots, the smoothed curve as a line, tooltips, zoom and
    pan (drag, wheel; double-click resets), as wide as its box."""
    import altair as alt
    import pandas as pd

    color = alt.Color("series:N", scale=alt.Scale(domain=["loss", "smoothed"], range=[0, 1]),
                      legend=alt.Legend(title=None, orient="top-right"))
    x = alt.X("step:Q", title="step", axis=alt.Axis(tickMinStep=1, format="d", labelOverlap=True))
    y = alt.Y("loss:Q", title="training loss", scale=alt.Scale(domain=list(y_domain), zero=False))
    tooltip = [alt.Tooltip("step:Q"), alt.Tooltip("loss:Q", format=".4g"), alt.Tooltip("series:N")]
    base = alt.Chart(pd.DataFrame(list(rows)))
    raw = base.transform_filter(alt.datum.series == "loss").mark_circle(size=18, opacity=0.6, clip=True).encode(
        x=x, y=y, color=color, tooltip=tooltip)
    smoothed = base.transform_filter(alt.datum.series == "smoothed").mark_line(strokeWidth=2.5, clip=True).encode(
        x=x, y=y, color=color, tooltip=tooltip)
    chart = alt.layer(raw, smoothed).properties(width="container", height=LOSS_PLOT_HEIGHT, background="transparent",
                                                padding={"top": 30, "left": 8, "right": 12, "bottom": 6})
    return chart.interactive().to_json()


def loss_plot_value(points: Sequence[Mapping[str, float]]) -> dict | None:
    """The plot's value for `points`, y range robust to a few diverged steps; None when there are none yet.

    Handed to gradio as an already built chart marked as a line chart ("chart": "line"), so gradio's front end
    gives it the page's theme (light or dark text and grid) and palette, as it does for its own LinePlot.
    """
    rows = plot_rows(list(points))
    if not rows:
        return None
    losses = sorted(r["loss"] for r in rows if r["series"] == "loss")
    smoothed = [r["loss"] for r in rows if r["series"] == "smoothed"]
    lo = min(losses[int(0.01 * (len(losses) - 1))], min(smoothed))
    hi = max(losses[math.ceil(0.99 * (len(losses) - 1))], max(smoothed))
    pad = 0.05 * (hi - lo) or 0.05 * (abs(hi) or 1)
    return {"type": "altair", "plot": loss_chart_spec(rows, (lo - pad, hi + pad)), "chart": "line"}


def render_problems_html(problems: Sequence[tuple[str, str]]) -> str:
    items = "".join(f"<li><b>{html.escape(field_label(arg))}</b>: {html.escape(msg)}</li>" for arg, msg in problems)
    return f'<div class="gcfg-train-problems"><p>The job was not created:</p><ul>{items}</ul></div>'


class TrainingTab:
    """Handlers of the tab; pure functions of the host and the widget values, so tests call them directly."""

    def __init__(self, host: TrainingHost):
        self.host = host
        self.main_fields, self.advanced_fields = form_fields()
        self.on_cpu = host.auto_device == "cpu"
        self.defaults: Mapping[str, Any] = CPU_DEFAULTS if self.on_cpu else {}

    # --- form

    def create(self, name: str, dataset_dir: str, base_checkpoint: str, device: str, unload: bool,
               *values: Any) -> tuple[str, str]:
        """(message html, id of the new job or "") for the Start button."""
        specs = self.main_fields + self.advanced_fields
        request: dict[str, Any] = {spec.name: parse_widget(spec, value) for spec, value in zip(specs, values,
                                                                                               strict=True)}
        request.update(name=name, dataset_dir=dataset_dir, base_checkpoint=base_checkpoint,
                       device=device_value(device))
        request[UNLOAD_FIELD] = bool(unload)
        try:
            info = create_job(self.host, request)
        except RequestError as e:
            return render_problems_html(e.problems), ""
        where = f"position {info.queue_position} in the queue" if info.queue_position else "started"
        return (f'<div class="gcfg-train-ok">Job <b>{html.escape(info.id)}</b> created ({where}).</div>', info.id)

    # --- live view

    def poll(self, selected: str | None, sent: dict | None, followed: dict | None = None) -> tuple[Any, ...]:
        """Everything the live view shows; the plot, preview and log are only re-sent when they changed (see
        `sent`). The status line under the buttons follows the job of the last action: `followed` is {"job", "state"}
        as the action left it (written by `act` only, so a poll that overlaps an action cannot lose it); once that
        job's state differs, every poll shows the line for its current state."""
        import gradio as gr

        sent = dict(sent or {})
        jobs = self.host.manager.list_jobs()
        by_id = {job.id: job for job in jobs}
        job = by_id.get(selected or "")
        if job is None and jobs and not selected:
            job = next((j for j in jobs if j.state in ACTIVE_STATES), jobs[0])
        selected = job.id if job else ""

        loss: Any = gr.update()
        preview: Any = gr.update()
        log_text: Any = gr.update()
        status: Any = gr.update()
        if job is None:
            if sent.get("job"):
                loss, preview, log_text, sent = None, None, "", {}
        else:
            if sent.get("job") != job.id:
                sent = {"job": job.id}
            points = self.host.manager.loss_points(job.id)
            if sent.get("loss") != len(points):
                loss, sent["loss"] = loss_plot_value(points), len(points)
            preview_path = self.host.manager.latest_preview(job.id)
            preview_key = str(preview_path) if preview_path else ""
            if sent.get("preview", None) != preview_key:
                preview, sent["preview"] = (str(preview_path) if preview_path else None), preview_key
            text = self.host.manager.log_tail(job.id, 80)
            if sent.get("log") != text:
                log_text, sent["log"] = text, text
        followed = followed or {}
        target = by_id.get(followed.get("job") or "")
        if target is not None and target.state.value != followed.get("state"):
            status = status_line_html(target)
        actions = set(job.actions) if job else set()
        buttons = [gr.update(interactive=action in actions) for action in
                   (JobAction.STOP, JobAction.CANCEL, JobAction.RESUME, JobAction.DELETE)]
        return (selected, sent, render_jobs_html(jobs, selected), render_detail_html(job), loss, preview, log_text,
                status, *buttons)

    def act(self, action: str, selected: str | None, confirmed: Any = True,
            followed: dict | None = None) -> tuple[str, dict]:
        """Run a job action on the selected job; returns (the status line html, the job and state the line
        describes, for `poll` to move the line on with the job)."""
        followed = dict(followed or {})
        if not selected:
            return '<div class="gcfg-train-problems">Select a job first.</div>', followed
        if confirmed is False:
            return "", followed
        manager = self.host.manager
        name = f"<b>{html.escape(selected)}</b>"
        try:
            if action == JobAction.STOP.value:
                info = manager.stop(selected)
                text = f"Stopping {name}: it saves a checkpoint after this step."
            elif action == JobAction.CANCEL.value:
                info = manager.cancel(selected)
                text = f"Cancelled {name}."
            elif action == JobAction.RESUME.value:
                info = manager.resume(selected)
                text = f"{name} is queued to resume."
            elif action == JobAction.DELETE.value:
                manager.delete(selected)
                return f'<div class="gcfg-train-ok">Deleted {name}.</div>', {}
            else:
                raise JobError("action", f"unknown action {action!r}")
        except JobError as e:
            return f'<div class="gcfg-train-problems">{html.escape(str(e))}</div>', followed
        followed = {"job": info.id, "state": info.state.value}
        return f'<div class="gcfg-train-ok" data-state="{html.escape(info.state.value)}">{text}</div>', followed


def _widget(gr, spec: FieldSpec, defaults: Mapping[str, Any]):
    label, info = field_label(spec.name), spec.help
    value = widget_value(spec, defaults)
    elem_id = f"gcfg_train_{spec.name}"
    if spec.choices:
        return gr.Dropdown(choices=list(spec.choices), value=value, label=label, info=info, elem_id=elem_id)
    if spec.type is bool:
        return gr.Checkbox(value=value, label=label, info=info, elem_id=elem_id)
    if spec.type is int:
        return gr.Number(value=value, label=label, info=info, precision=0, elem_id=elem_id)
    if spec.type is float:
        return gr.Number(value=value, label=label, info=info, elem_id=elem_id)
    if spec.name == "preview_prompts":
        return gr.Textbox(value=value, label=label, info=info + " One per line.", lines=3, elem_id=elem_id)
    # One line: gradio 3 renders an <input> (not a resizable text area) only with lines == max_lines == 1.
    return gr.Textbox(value=value, label=label, info=info, lines=1, max_lines=1, elem_id=elem_id)


def dataset_info(host: TrainingHost, help_text: str) -> str:
    roots = host.policy.dataset_roots
    where = f"Put each dataset in its own folder in {roots[0]}" if roots else "No dataset folder is configured"
    more = f" (also allowed: {', '.join(roots[1:])})" if len(roots) > 1 else ""
    return f"{help_text} {where}{more}; more folders: environment variable GCFG_DATASET_ROOTS."


def build(host: TrainingHost):
    """The tab's Blocks (for `on_ui_tabs`, or served on its own in tests)."""
    import gradio as gr

    tab = TrainingTab(host)
    specs = {spec.name: spec for spec in config_fields()}
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row(elem_id="gcfg_train_main"):
            with gr.Column(scale=2, elem_id="gcfg_train_form"):
                gr.HTML('<h3 class="gcfg-train-title">New concept UNet</h3>')
                if tab.on_cpu:
                    gr.HTML(cpu_warning_html(), elem_id="gcfg_train_cpu_warning")
                name = gr.Textbox(label=field_label("name"), info=specs["name"].help, lines=1, max_lines=1,
                                  elem_id="gcfg_train_name")
                roots = host.policy.dataset_roots
                dataset_dir = gr.Textbox(label=field_label("dataset_dir"), lines=1, max_lines=1,
                                         info=dataset_info(host, specs["dataset_dir"].help),
                                         placeholder=os.path.join(roots[0], "my-concept") if roots else "",
                                         elem_id="gcfg_train_dataset_dir")
                with gr.Row():
                    titles = host.checkpoint_titles()
                    base = gr.Dropdown(choices=titles, value=titles[0] if titles else None,
                                       label=field_label("base_checkpoint"), elem_id="gcfg_train_base_checkpoint")
                    refresh_checkpoints = gr.Button("🔄", elem_id="gcfg_train_refresh_checkpoints",
                                                    elem_classes=["gcfg-tool"])
                with gr.Row():
                    devices = device_choices(host.devices(), host.auto_device)
                    device = gr.Dropdown(choices=devices, value=devices[0], label=field_label("device"),
                                         info=specs["device"].help, elem_id="gcfg_train_device")
                    unload = gr.Checkbox(value=False, label="Unload the WebUI's model while training",
                                         info="Frees GPU memory; generation waits until the job ends.",
                                         elem_id="gcfg_train_unload")
                main_widgets = []
                for pair in range(0, len(tab.main_fields), 2):  # two per row: the form stays one screen high
                    with gr.Row():
                        main_widgets += [_widget(gr, spec, tab.defaults) for spec in tab.main_fields[pair:pair + 2]]
                with gr.Accordion("Advanced", open=False, elem_id="gcfg_train_advanced"):
                    advanced_widgets = [_widget(gr, spec, tab.defaults) for spec in tab.advanced_fields]
                start = gr.Button("Start training", variant="primary", elem_id="gcfg_train_start")
                form_message = gr.HTML(elem_id="gcfg_train_form_message")
            with gr.Column(scale=3, elem_id="gcfg_train_live"):
                jobs_html = gr.HTML(render_jobs_html([], None), elem_id="gcfg_train_jobs")
                with gr.Row(elem_id="gcfg_train_actions"):
                    stop = gr.Button("Stop (keep, resumable)", elem_id="gcfg_train_stop", interactive=False)
                    cancel = gr.Button("Cancel", elem_id="gcfg_train_cancel", interactive=False)
                    resume = gr.Button("Resume", elem_id="gcfg_train_resume", interactive=False)
                    delete = gr.Button("Delete", variant="stop", elem_id="gcfg_train_delete", interactive=False)
                action_message = gr.HTML(elem_id="gcfg_train_action_message")
                detail = gr.HTML(render_detail_html(None), elem_id="gcfg_train_detail")
                loss = gr.LinePlot(x="step", y="loss", show_label=True, elem_id="gcfg_train_loss",
                                   label="Loss (drag to pan, scroll to zoom, double-click to reset)")
                preview = gr.Image(label="Latest preview", interactive=False, elem_id="gcfg_train_preview",
                                   height=320)
                log_box = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False,
                                     elem_id="gcfg_train_log")
        selected = gr.Textbox(visible=False, elem_id="gcfg_train_selected")
        sent = gr.State({})
        followed = gr.State({})  # the job of the last action and its state then; written by the actions only
        poll = gr.Button(visible=False, elem_id=POLL_BUTTON_ID)

        poll_outputs = [selected, sent, jobs_html, detail, loss, preview, log_box, action_message,
                        stop, cancel, resume, delete]
        poll.click(fn=tab.poll, _js="gcfgTrainPollArgs", inputs=[selected, sent, followed], outputs=poll_outputs,
                   show_progress="hidden", queue=False)
        refresh_checkpoints.click(fn=lambda: gr.update(choices=host.checkpoint_titles()), inputs=[], outputs=[base],
                                  show_progress="hidden", queue=False)
        start.click(fn=tab.create, inputs=[name, dataset_dir, base, device, unload, *main_widgets, *advanced_widgets],
                    outputs=[form_message, selected], queue=False).then(
            fn=tab.poll, inputs=[selected, sent, followed], outputs=poll_outputs, show_progress="hidden", queue=False)
        for button, action in ((stop, "stop"), (cancel, "cancel"), (resume, "resume"), (delete, "delete")):
            confirmed = gr.Checkbox(visible=False, value=True)
            button.click(fn=lambda sel, ok, fol, action=action: tab.act(action, sel, ok, fol),
                         _js=f"(sel, ok, fol) => gcfgTrainConfirm({action!r}, sel, fol)",
                         inputs=[selected, confirmed, followed], outputs=[action_message, followed],
                         queue=False).then(
                fn=tab.poll, inputs=[selected, sent, followed], outputs=poll_outputs, show_progress="hidden",
                queue=False)
    return blocks
