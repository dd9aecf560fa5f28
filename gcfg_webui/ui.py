"""The GCFG accordion (txt2img and img2img), one component per `gcfg_core.params.PARAMS` entry, in that order."""

from __future__ import annotations

import gradio as gr
from modules import shared
from modules.ui_components import InputAccordion, ToolButton

from gcfg_core.params import PARAMS_BY_NAME, GCFGSettings
from gcfg_webui import extra_models
from gcfg_webui.api import validate_terms
from gcfg_webui.args import NONE_CHOICE
from gcfg_webui.decouple import decouple_prompt, merge_terms
from gcfg_webui.infotext import ui_value

REFRESH_SYMBOL = "\U0001f504"
SYNTAX_HELP = (
    "One term per line: `<weight> [@model] [{start-end}] <prompt>`. Weight with a sign (`+4`, `-1.5`); model "
    "`main` (default), `prior`, `concept` or a checkpoint name; optional step window as fractions (`{0-0.5}`). "
    "Example: `+4 in Van Gogh style`, `-2 @prior {0-0.5} blurry`. `#` starts a comment line."
)


def _help(name: str) -> str:
    return PARAMS_BY_NAME[name].help


def prior_choices() -> list[str]:
    return [NONE_CHOICE, *extra_models.list_prior_titles()]


def concept_choices() -> list[str]:
    return [NONE_CHOICE, *extra_models.list_concept_models()]


def effective_negative_scale(text: str, cfg_scale: float | None) -> str:
    """Markdown showing the negative prompt's weight: classic = 1 − CFG (without extra terms)."""
    try:
        scale = GCFGSettings(negative_scale=text).negative_scale
    except ValueError as error:
        return f"⚠ {error}"
    if scale is None:
        cfg = 7.0 if cfg_scale is None else float(cfg_scale)
        return f"Negative prompt weight: classic, 1 − CFG = {1 - cfg:g} (the prior has no effect)"
    return f"Negative prompt weight: {scale:g} (the prior carries the rest)"


def terms_status(text: str) -> str:
    result = validate_terms(text or "")
    if result["valid"]:
        count = len(result["terms"])
        return f"✓ {count} term{'s' if count != 1 else ''}" if count else ""
    return f"⚠ {result['error']['message']}"


def build(tabname: str, elem_id, prompt_component=None, cfg_component=None) -> list:
    """Build the accordion; returns the argument components in `PARAMS` order."""
    default_prior = shared.opts.data.get("gcfg_default_prior", NONE_CHOICE)
    with InputAccordion(False, label="GCFG", elem_id=elem_id("enabled"),
                        tooltip=_help("enabled")) as enabled:
        with gr.Row():
            prior = gr.Dropdown(label="Prior checkpoint (None = current checkpoint)", choices=prior_choices(),
                                value=default_prior if default_prior in prior_choices() else NONE_CHOICE,
                                elem_id=elem_id("prior"), tooltip=_help("prior"))
            refresh_prior = ToolButton(REFRESH_SYMBOL, elem_id=elem_id("prior_refresh"),
                                       tooltip="Refresh the checkpoint list")
            concept = gr.Dropdown(label="Concept model", choices=concept_choices(), value=NONE_CHOICE,
                                  elem_id=elem_id("concept"), tooltip=_help("concept"))
            refresh_concept = ToolButton(REFRESH_SYMBOL, elem_id=elem_id("concept_refresh"),
                                         tooltip="Refresh the concept-model list (models/GCFG)")
        with gr.Row():
            param = PARAMS_BY_NAME["concept_weight"]
            concept_weight = gr.Slider(label=param.label, minimum=param.minimum, maximum=param.maximum,
                                       step=param.step, value=param.default, elem_id=elem_id("concept_weight"),
                                       tooltip=param.help)
            negative_scale = gr.Textbox(label="Negative prompt scale ('classic' or a number)",
                                        value=ui_value(PARAMS_BY_NAME["negative_scale"], None), max_lines=1,
                                        elem_id=elem_id("negative_scale"), tooltip=_help("negative_scale"))
        negative_info = gr.Markdown(effective_negative_scale("classic", None))
        terms = gr.Textbox(label=PARAMS_BY_NAME["terms"].label, lines=3, value="", elem_id=elem_id("terms"),
                           placeholder="+4 in Van Gogh style", tooltip=_help("terms"))
        with gr.Row():
            terms_info = gr.Markdown("")
            decouple = gr.Button("Decouple prompt", elem_id=elem_id("decouple"),
                                 tooltip="Move the prompt's comma-separated parts after the first into independent "
                                         "terms, each weighted by the CFG scale")
        gr.Markdown(SYNTAX_HELP)

    refresh_prior.click(fn=lambda: gr.update(choices=prior_choices()), outputs=[prior])
    refresh_concept.click(fn=lambda: gr.update(choices=concept_choices()), outputs=[concept])
    terms.change(fn=terms_status, inputs=[terms], outputs=[terms_info], show_progress=False)
    if cfg_component is not None:
        for source in (negative_scale, cfg_component):
            source.change(fn=effective_negative_scale, inputs=[negative_scale, cfg_component],
                          outputs=[negative_info], show_progress=False)
    if prompt_component is not None:
        def on_decouple(prompt, existing, cfg):
            main, added = decouple_prompt(prompt, float(cfg) if cfg is not None else 4.0)
            return main, merge_terms(existing, added)

        decouple.click(fn=on_decouple, inputs=[prompt_component, terms, cfg_component or concept_weight],
                       outputs=[prompt_component, terms])
    return [enabled, prior, concept, concept_weight, negative_scale, terms]
