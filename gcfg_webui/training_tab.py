"""The "GCFG Training" tab (gradio 3.41 Blocks): a job form derived from `trainer.config.config_fields()`, the job
list with live progress, and the selected job's loss plot, preview grid and log.

Nothing here trains: the form creates a job in the `JobManager`, which runs the trainer as a separate process. The
page polls with a hidden button that javascript/gcfg_training.js clicks every two seconds while the tab is visible
(`queue=False`: a poll never waits behind a generation). Every handler reads the job folders, so a reloaded page or a
restarted WebUI shows the same jobs. The WebUI is reached only through the `TrainingHost` (gcfg_webui.jobs_api).
"""

from __future__ import annotations

import enum
import html
import io
import logging
import re
from collections.abc import Sequence
from typing import Any

from gcfg_webui.jobs_api import UNLOAD_FIELD, RequestError, TrainingHost, create_job
from trainer.config import FieldSpec, config_fields
from trainer.jobfolder import ACTIVE_STATES, JobState
from trainer.jobs import JobAction, JobError, JobInfo

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
           "device": "GPU", "preview_seeds": "Preview seeds", "preview_prompts": "Preview prompts"}


def field_label(name: str) -> str:
    return _LABELS.get(name, name.replace("_", " ").capitalize())


def form_fields() -> tuple[tuple[FieldSpec, ...], tuple[FieldSpec, ...]]:
    """(main, advanced) field specs of the form, derived from the config declaration."""
    specs = {spec.name: spec for spec in config_fields()}
    main = tuple(specs[name] for name in MAIN_FIELDS)
    advanced = tuple(spec for spec in specs.values()
                     if spec.name not in MAIN_FIELDS + SPECIAL_FIELDS + SERVER_FIELDS)
    return main, advanced


def widget_value(spec: FieldSpec) -> Any:
    """The form's initial value of a field (tuples as text: one prompt per line, seeds comma-separated)."""
    default = spec.default
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


def render_problems_html(problems: Sequence[tuple[str, str]]) -> str:
    items = "".join(f"<li><b>{html.escape(field_label(arg))}</b>: {html.escape(msg)}</li>" for arg, msg in problems)
    return f'<div class="gcfg-train-problems"><p>The job was not created:</p><ul>{items}</ul></div>'


class TrainingTab:
    """Handlers of the tab; pure functions of the host and the widget values, so tests call them directly."""

    def __init__(self, host: TrainingHost):
        self.host = host
        self.main_fields, self.advanced_fields = form_fields()

    # --- form

    def create(self, name: str, dataset_dir: str, base_checkpoint: str, device: str, unload: bool,
               *values: Any) -> tuple[str, str]:
        """(message html, id of the new job or "") for the Start button."""
        specs = self.main_fields + self.advanced_fields
        request: dict[str, Any] = {spec.name: parse_widget(spec, value) for spec, value in zip(specs, values,
                                                                                               strict=True)}
        request.update(name=name, dataset_dir=dataset_dir, base_checkpoint=base_checkpoint, device=device)
        request[UNLOAD_FIELD] = bool(unload)
        try:
            info = create_job(self.host, request)
        except RequestError as e:
            return render_problems_html(e.problems), ""
        where = f"position {info.queue_position} in the queue" if info.queue_position else "started"
        return (f'<div class="gcfg-train-ok">Job <b>{html.escape(info.id)}</b> created ({where}).</div>', info.id)

    # --- live view

    def poll(self, selected: str | None, sent: dict | None) -> tuple[Any, ...]:
        """Everything the live view shows; images and log are only re-sent when they changed (see `sent`)."""
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
        if job is None:
            if sent.get("job"):
                loss, preview, log_text, sent = None, None, "", {}
        else:
            if sent.get("job") != job.id:
                sent = {"job": job.id}
            points = len(self.host.manager.loss_points(job.id))
            if sent.get("loss") != points:
                loss, sent["loss"] = _png_image(self.host.manager.loss_plot_png(job.id)), points
            preview_path = self.host.manager.latest_preview(job.id)
            preview_key = str(preview_path) if preview_path else ""
            if sent.get("preview", None) != preview_key:
                preview, sent["preview"] = (str(preview_path) if preview_path else None), preview_key
            text = self.host.manager.log_tail(job.id, 80)
            if sent.get("log") != text:
                log_text, sent["log"] = text, text
        actions = set(job.actions) if job else set()
        buttons = [gr.update(interactive=action in actions) for action in
                   (JobAction.STOP, JobAction.CANCEL, JobAction.RESUME, JobAction.DELETE)]
        return (selected, sent, render_jobs_html(jobs, selected), render_detail_html(job), loss, preview, log_text,
                *buttons)

    def act(self, action: str, selected: str | None, confirmed: Any = True) -> str:
        """Run a job action on the selected job; returns the message html."""
        if not selected:
            return '<div class="gcfg-train-problems">Select a job first.</div>'
        if confirmed is False:
            return ""
        manager = self.host.manager
        try:
            if action == JobAction.STOP.value:
                manager.stop(selected)
                text = f"Stopping <b>{html.escape(selected)}</b>: it saves a checkpoint after this step."
            elif action == JobAction.CANCEL.value:
                manager.cancel(selected)
                text = f"Cancelled <b>{html.escape(selected)}</b>."
            elif action == JobAction.RESUME.value:
                manager.resume(selected)
                text = f"<b>{html.escape(selected)}</b> is queued to resume."
            elif action == JobAction.DELETE.value:
                manager.delete(selected)
                text = f"Deleted <b>{html.escape(selected)}</b>."
            else:
                raise JobError("action", f"unknown action {action!r}")
        except JobError as e:
            return f'<div class="gcfg-train-problems">{html.escape(str(e))}</div>'
        return f'<div class="gcfg-train-ok">{text}</div>'


def _png_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _widget(gr, spec: FieldSpec):
    label, info = field_label(spec.name), spec.help
    value = widget_value(spec)
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
    return gr.Textbox(value=value, label=label, info=info, elem_id=elem_id)


def build(host: TrainingHost):
    """The tab's Blocks (for `on_ui_tabs`, or served on its own in tests)."""
    import gradio as gr

    tab = TrainingTab(host)
    specs = {spec.name: spec for spec in config_fields()}
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row(elem_id="gcfg_train_main"):
            with gr.Column(scale=2, elem_id="gcfg_train_form"):
                gr.HTML('<h3 class="gcfg-train-title">New concept UNet</h3>')
                name = gr.Textbox(label=field_label("name"), info=specs["name"].help, elem_id="gcfg_train_name")
                dataset_dir = gr.Textbox(label=field_label("dataset_dir"),
                                         info=specs["dataset_dir"].help + " Allowed under: "
                                         + ", ".join(host.policy.dataset_roots),
                                         elem_id="gcfg_train_dataset_dir")
                with gr.Row():
                    titles = host.checkpoint_titles()
                    base = gr.Dropdown(choices=titles, value=titles[0] if titles else None,
                                       label=field_label("base_checkpoint"), elem_id="gcfg_train_base_checkpoint")
                    refresh_checkpoints = gr.Button("🔄", elem_id="gcfg_train_refresh_checkpoints",
                                                    elem_classes=["gcfg-tool"])
                with gr.Row():
                    devices = host.devices()
                    device = gr.Dropdown(choices=devices, value=devices[0], label=field_label("device"),
                                         info=specs["device"].help, elem_id="gcfg_train_device")
                    unload = gr.Checkbox(value=False, label="Unload the WebUI's model while training",
                                         info="Frees GPU memory; generation waits until the job ends.",
                                         elem_id="gcfg_train_unload")
                main_widgets = []
                for pair in range(0, len(tab.main_fields), 2):  # two per row: the form stays one screen high
                    with gr.Row():
                        main_widgets += [_widget(gr, spec) for spec in tab.main_fields[pair:pair + 2]]
                with gr.Accordion("Advanced", open=False, elem_id="gcfg_train_advanced"):
                    advanced_widgets = [_widget(gr, spec) for spec in tab.advanced_fields]
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
                with gr.Row():
                    loss = gr.Image(label="Loss", interactive=False, elem_id="gcfg_train_loss", height=300)
                    preview = gr.Image(label="Latest preview", interactive=False, elem_id="gcfg_train_preview",
                                       height=300)
                log_box = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False,
                                     elem_id="gcfg_train_log")
        selected = gr.Textbox(visible=False, elem_id="gcfg_train_selected")
        sent = gr.State({})
        poll = gr.Button(visible=False, elem_id=POLL_BUTTON_ID)

        poll_outputs = [selected, sent, jobs_html, detail, loss, preview, log_box, stop, cancel, resume, delete]
        poll.click(fn=tab.poll, _js="gcfgTrainPollArgs", inputs=[selected, sent], outputs=poll_outputs,
                   show_progress="hidden", queue=False)
        refresh_checkpoints.click(fn=lambda: gr.update(choices=host.checkpoint_titles()), inputs=[], outputs=[base],
                                  show_progress="hidden", queue=False)
        start.click(fn=tab.create, inputs=[name, dataset_dir, base, device, unload, *main_widgets, *advanced_widgets],
                    outputs=[form_message, selected], queue=False).then(
            fn=tab.poll, inputs=[selected, sent], outputs=poll_outputs, show_progress="hidden", queue=False)
        for button, action in ((stop, "stop"), (cancel, "cancel"), (resume, "resume"), (delete, "delete")):
            confirmed = gr.Checkbox(visible=False, value=True)
            button.click(fn=lambda sel, ok, action=action: tab.act(action, sel, ok),
                         _js=f"(sel, ok) => gcfgTrainConfirm({action!r}, sel)", inputs=[selected, confirmed],
                         outputs=[action_message], queue=False).then(
                fn=tab.poll, inputs=[selected, sent], outputs=poll_outputs, show_progress="hidden", queue=False)
    return blocks
