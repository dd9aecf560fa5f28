"""The GCFG accordion (txt2img and img2img), one component per `gcfg_core.params.PARAMS` entry, in that order."""

from __future__ import annotations

import dataclasses

import gradio as gr
from modules import shared
from modules.ui_components import InputAccordion, ToolButton

from gcfg_core.params import PARAMS_BY_NAME, GCFGSettings
from gcfg_core.terms import GuidanceTerm, ModelSlot
from gcfg_webui import extra_models
from gcfg_webui.api import validate_terms
from gcfg_webui.args import NONE_CHOICE
from gcfg_webui.coefficients import step_coefficients
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


def _format(value: float) -> str:
    return format(value, "g").replace("-", "−")


def effective_weights(negative_scale: str, cfg_scale: float | None, negative_prompt: str | None = None,
                      terms: str = "", concept: str = NONE_CHOICE, concept_weight: float | None = None) -> str:
    """Markdown: the weights the negative prompt and the unconditional term (prior) get, as the hook computes them.

    Extra-term step windows are ignored here (every term counted), so this is the weight while all are active.
    """
    try:
        settings = GCFGSettings(negative_scale=negative_scale)
    except ValueError as error:
        return f"⚠ {error}"
    try:
        settings = GCFGSettings(negative_scale=negative_scale, terms=terms or "")
    except ValueError:
        return "The weights show once the extra terms are valid."
    cfg = 7.0 if cfg_scale is None else float(cfg_scale)
    extra = [dataclasses.replace(term, window=None) for term in settings.parsed_terms()]
    if concept and concept != NONE_CHOICE and concept_weight:
        extra.append(GuidanceTerm(ModelSlot.CONCEPT.value, None, float(concept_weight)))
    has_negative = negative_prompt is None or bool(negative_prompt.strip())
    weights = step_coefficients(cfg, [1.0], [has_negative], settings.negative_scale, extra, 0, 1)
    unconditional, negative = weights.uncond[0], weights.negative[0]
    if not has_negative:
        return (f"No negative prompt: the unconditional term (the prior, or the current checkpoint) gets "
                f"{_format(unconditional)}.")
    if settings.negative_scale is None:
        return (f"Negative prompt weight {_format(negative)} (classic: it takes the unconditional term's place, "
                "so the prior is not used).")
    return (f"Negative prompt weight {_format(negative)}; the unconditional term (the prior) gets "
            f"{_format(unconditional)}.")


def terms_status(text: str) -> str:
    result = validate_terms(text or "")
    if result["valid"]:
        count = len(result["terms"])
        return f"✓ {count} term{'s' if count != 1 else ''}" if count else ""
    return f"⚠ {result['error']['message']}"


def build(tabname: str, elem_id, prompt_component=None, cfg_component=None, negative_component=None) -> list:
    """Build the accordion; returns the argument components in `PARAMS` order.

    The main prompt, negative prompt and CFG scale components (captured by the script with `on_after_component`)
    drive the decouple button and the live weights line; without them those parts are static.
    """
    default_prior = shared.opts.data.get("gcfg_default_prior", NONE_CHOICE)
    with InputAccordion(False, label="GCFG", elem_id=elem_id("enabled"), tooltip=_help("enabled")) as enabled:
        with gr.Row():
            prior = gr.Dropdown(label="Prior checkpoint", choices=prior_choices(),
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
            negative_scale = gr.Textbox(label="Negative prompt scale", placeholder="classic, or a number such as -2",
                                        value=ui_value(PARAMS_BY_NAME["negative_scale"], None), max_lines=1,
                                        elem_id=elem_id("negative_scale"), tooltip=_help("negative_scale"))
        weights_info = gr.Markdown(effective_weights("classic", None), elem_id=elem_id("weights"))
        terms = gr.Textbox(label=PARAMS_BY_NAME["terms"].label, lines=3, value="", elem_id=elem_id("terms"),
                           placeholder="+4 in Van Gogh style", tooltip=_help("terms"))
        terms_info = gr.Markdown("", elem_id=elem_id("terms_status"))
        with gr.Row(equal_height=False):
            gr.Markdown(SYNTAX_HELP)
            decouple = gr.Button("Decouple prompt", elem_id=elem_id("decouple"), scale=0, min_width=160,
                                 tooltip="Move the prompt's comma-separated parts after the first into independent "
                                         "extra terms, each weighted by the CFG scale (paper §4.4)")

    refresh_prior.click(fn=lambda: gr.update(choices=prior_choices()), outputs=[prior])
    refresh_concept.click(fn=lambda: gr.update(choices=concept_choices()), outputs=[concept])
    terms.change(fn=terms_status, inputs=[terms], outputs=[terms_info], show_progress=False)
    if cfg_component is not None and negative_component is not None:
        weight_inputs = [negative_scale, cfg_component, negative_component, terms, concept, concept_weight]
        for source in weight_inputs:
            source.change(fn=effective_weights, inputs=weight_inputs, outputs=[weights_info], show_progress=False)
    if prompt_component is not None and cfg_component is not None:
        def on_decouple(prompt, existing, cfg):
            main, added = decouple_prompt(prompt, float(cfg))
            return main, merge_terms(existing, added)

        decouple.click(fn=on_decouple, inputs=[prompt_component, terms, cfg_component],
                       outputs=[prompt_component, terms])
    return [enabled, prior, concept, concept_weight, negative_scale, terms]
