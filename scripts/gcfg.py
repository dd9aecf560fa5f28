"""WebUI entry point of the "GCFG" AlwaysOn script; all logic lives in the `gcfg_webui` package.

The WebUI executes this file with the extension root on `sys.path`, so the packages are imported here, at
load time. Callbacks are registered at import: the WebUI clears them before every script reload. The host is
detected once here (`gcfg_webui.hosts`); everything but the sampling hook and the side models is shared.
"""

from __future__ import annotations

import dataclasses
import logging

import modules.scripts as scripts
from modules import script_callbacks, shared

from gcfg_webui import access, api, generation, hosts, infotext, model_files, settings, xyz

logger = logging.getLogger("gcfg")

TITLE = "GCFG"  # public API: alwayson_scripts {"GCFG": {"args": [...]}}
HOST = hosts.detect()
if not HOST.supported:
    logger.warning("GCFG: %s; requests that enable GCFG will be refused", HOST.reason)
elif HOST.caution:
    logger.warning("GCFG: %s", HOST.caution)


class GCFGScript(scripts.Script):
    """Generalized classifier-free guidance (arXiv 2312.08195): prior uncond, concept model, extra terms."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_component = None
        self.negative_component = None
        self.cfg_component = None
        self.sampler_component = None

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        self.on_after_component(lambda event: setattr(self, "prompt_component", event.component),
                                elem_id=f"{tab}_prompt")
        self.on_after_component(lambda event: setattr(self, "negative_component", event.component),
                                elem_id=f"{tab}_neg_prompt")
        self.on_after_component(lambda event: setattr(self, "cfg_component", event.component),
                                elem_id=f"{tab}_cfg_scale")
        self.on_after_component(lambda event: setattr(self, "sampler_component", event.component),
                                elem_id=f"{tab}_sampling")
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from gcfg_webui import ui

        components = ui.build("img2img" if is_img2img else "txt2img", self.elem_id, self.prompt_component,
                              self.cfg_component, self.negative_component, host=HOST,
                              sampler_component=self.sampler_component)
        self.infotext_fields = infotext.infotext_fields(components)
        self.paste_field_names = infotext.paste_field_names()
        return components

    def process(self, p, *args):
        load = HOST.adapter.load if HOST.supported else _refuse_unsupported
        state = generation.start_generation(p, args, load)
        setattr(p, generation.GENERATION_ATTRIBUTE, state)
        if state is not None and state.error is None:
            gcfg_settings = state.settings
            if gcfg_settings.prior:
                gcfg_settings = dataclasses.replace(gcfg_settings,
                                                    prior=model_files.checkpoint_name(gcfg_settings.prior))
            p.extra_generation_params.update(infotext.generation_params(gcfg_settings))

    def process_before_every_sampling(self, p, *args, **kwargs):
        state = getattr(p, generation.GENERATION_ATTRIBUTE, None)
        if state is None:
            return
        if HOST.supported:
            HOST.adapter.begin_pass(p, state)
        elif state.error is not None:
            _fail_sampler(p, state.error)

    def postprocess(self, p, processed, *args):
        state = HOST.adapter.end_generation(p) if HOST.supported else _detach(p)
        generation.record_last_run(state)
        if state is not None and state.stats:
            logger.info("GCFG: UNet rows per denoiser call: %s",
                        "; ".join(str(stats.per_call()) for stats in state.stats))


def _refuse_unsupported(state, p) -> None:
    raise hosts.unsupported_error(HOST)


def _fail_sampler(p, error) -> None:
    """Raise `error` at the first denoiser call: the WebUI swallows exceptions raised in script hooks."""

    def forward(*args, **kwargs):
        raise error

    p.sampler.model_wrap_cfg.forward = forward


def _detach(p):
    state = getattr(p, generation.GENERATION_ATTRIBUTE, None)
    sampler = getattr(p, "sampler", None)
    denoiser = getattr(sampler, "model_wrap_cfg", None)
    if denoiser is not None:
        denoiser.__dict__.pop("forward", None)
    setattr(p, generation.GENERATION_ATTRIBUTE, None)
    return state


def _on_app_started(demo, app) -> None:
    api.add_routes(app, access.AccessPolicy.from_cmd_opts(shared.cmd_opts), priors=model_files.list_prior_titles,
                   concepts=model_files.list_concept_models, free_models=model_files.CACHE.clear,
                   last_run=generation.last_run)


def _on_ui_settings() -> None:
    import gradio as gr

    settings.register(shared, gr)


def _on_before_ui() -> None:
    module = xyz.find_xyz_module(scripts.scripts_data)
    if module is not None:
        xyz.add_axes(module, lambda: ["None", *model_files.list_prior_titles()])


def _on_infotext_pasted(text: str, params: dict) -> None:
    infotext.complete_pasted(params, model_files.prior_choice)


if HOST.supported:
    HOST.adapter.register_callbacks(script_callbacks)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_ui_settings(_on_ui_settings)
script_callbacks.on_before_ui(_on_before_ui)
script_callbacks.on_infotext_pasted(_on_infotext_pasted)
