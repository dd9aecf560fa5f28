"""WebUI entry point of the "GCFG" AlwaysOn script; all logic lives in the `gcfg_webui` package.

The WebUI executes this file with the extension root on `sys.path`, so the packages are imported here, at
load time. Callbacks are registered at import: the WebUI clears them before every script reload.
"""

from __future__ import annotations

import dataclasses
import logging

import modules.scripts as scripts
from modules import script_callbacks, shared

from gcfg_webui import access, api, extra_models, hook, infotext, session, settings, xyz

logger = logging.getLogger("gcfg")

TITLE = "GCFG"  # public API: alwayson_scripts {"GCFG": {"args": [...]}}


class GCFGScript(scripts.Script):
    """Generalized classifier-free guidance (arXiv 2312.08195): prior uncond, concept model, extra terms."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_component = None
        self.negative_component = None
        self.cfg_component = None

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
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from gcfg_webui import ui

        components = ui.build("img2img" if is_img2img else "txt2img", self.elem_id, self.prompt_component,
                              self.cfg_component, self.negative_component)
        self.infotext_fields = infotext.infotext_fields(components)
        self.paste_field_names = infotext.paste_field_names()
        return components

    def process(self, p, *args):
        generation = session.start_generation(p, args)
        setattr(p, session.GENERATION_ATTRIBUTE, generation)
        if generation is not None and generation.error is None:
            settings = generation.settings
            if settings.prior:
                settings = dataclasses.replace(settings, prior=extra_models.checkpoint_name(settings.prior))
            p.extra_generation_params.update(infotext.generation_params(settings))

    def process_before_every_sampling(self, p, *args, **kwargs):
        generation = getattr(p, session.GENERATION_ATTRIBUTE, None)
        if generation is not None:
            session.begin_pass(p, generation)

    def postprocess(self, p, processed, *args):
        generation = session.end_generation(p)
        session.record_last_run(generation)
        if generation is not None and generation.stats:
            logger.info("GCFG: UNet rows per denoiser call: %s",
                        "; ".join(str(stats.per_call()) for stats in generation.stats))


def _on_app_started(demo, app) -> None:
    api.add_routes(app, access.AccessPolicy.from_cmd_opts(shared.cmd_opts), priors=extra_models.list_prior_titles,
                   concepts=extra_models.list_concept_models, free_models=extra_models.CACHE.clear,
                   last_run=session.last_run)


def _on_ui_settings() -> None:
    import gradio as gr

    settings.register(shared, gr)


def _on_before_ui() -> None:
    module = xyz.find_xyz_module(scripts.scripts_data)
    if module is not None:
        xyz.add_axes(module, lambda: ["None", *extra_models.list_prior_titles()])


def _on_infotext_pasted(text: str, params: dict) -> None:
    infotext.complete_pasted(params, extra_models.prior_choice)


script_callbacks.on_cfg_denoiser(hook.capture_inputs)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_ui_settings(_on_ui_settings)
script_callbacks.on_before_ui(_on_before_ui)
script_callbacks.on_infotext_pasted(_on_infotext_pasted)
