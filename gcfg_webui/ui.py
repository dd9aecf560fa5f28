"""The GCFG accordion (txt2img and img2img), generated from `gcfg_core.params.PARAMS`: one component per
parameter, with the parameter's label, help, default and range, laid out in rows by `Param.row` and returned in
`PARAMS` order."""

from __future__ import annotations

import dataclasses
import itertools

import gradio as gr
from modules import shared
from modules.ui_components import InputAccordion, ToolButton

from gcfg_core.coefficients import GuidanceWeights, step_coefficients
from gcfg_core.params import PARAMS, GCFGSettings, Param, Widget
from gcfg_core.terms import GuidanceTerm, ModelSlot
from gcfg_webui import model_files
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
# The samplers whose CFG AUTOMATIC1111 rescales (DDIM CFG++ divides the CFG scale by 12.5); every GCFG weight is
# rescaled the same way, which the weights line shows. Each host gives its own (`Host.cfg_multipliers`).
CFG_MULTIPLIERS = {"DDIM CFG++": 1 / 12.5}


def prior_choices() -> list[str]:
    return [NONE_CHOICE, *model_files.list_prior_titles()]


def concept_choices() -> list[str]:
    return [NONE_CHOICE, *model_files.list_concept_models()]


def _format(value: float) -> str:
    return format(value, "g").replace("-", "−")


def effective_weights(negative_scale: str, cfg_scale: float | None, negative_prompt: str | None = None,
                      terms: str = "", concept: str = NONE_CHOICE, concept_weight: float | None = None,
                      sampler: str | None = None, multipliers: dict | None = None) -> str:
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
    multiplier = (CFG_MULTIPLIERS if multipliers is None else multipliers).get(sampler or "", 1.0)
    weights = GuidanceWeights(cfg, settings.negative_scale, tuple(extra), multiplier)
    image = step_coefficients(weights, [(1.0,)], [has_negative], 0, 1).images[0]
    note = f" ({sampler}: every weight × {_format(multiplier)})" if multiplier != 1.0 else ""
    if not has_negative:
        return (f"No negative prompt: the unconditional term (the prior, or the current checkpoint) gets "
                f"{_format(image.uncond)}.{note}")
    if settings.negative_scale is None:
        return (f"Negative prompt weight {_format(image.negative)} (classic: it takes the unconditional term's "
                f"place, so the prior is not used).{note}")
    return (f"Negative prompt weight {_format(image.negative)}; the unconditional term (the prior) gets "
            f"{_format(image.uncond)}.{note}")


def terms_status(text: str) -> str:
    result = validate_terms(text or "")
    if not result["valid"]:
        return f"⚠ {result['error']['message']}"
    warnings = "".join(f"\n\n⚠ {warning['message']}" for warning in result["warnings"])
    count = len(result["terms"])
    return (f"✓ {count} term{'s' if count != 1 else ''}" if count else "") + warnings


def _component(param: Param, elem_id, default_prior: str):
    """The gradio component of one parameter (the accordion's own checkbox is made by `build`)."""
    common = dict(label=param.label, elem_id=elem_id(param.name), tooltip=param.help)
    value = ui_value(param, param.default)
    if param.widget is Widget.CHECKPOINT:
        choices = prior_choices()
        value = default_prior if default_prior in choices else NONE_CHOICE
        return gr.Dropdown(choices=choices, value=value, **common)
    if param.widget is Widget.CONCEPT:
        return gr.Dropdown(choices=concept_choices(), value=value, **common)
    if param.widget is Widget.SLIDER:
        return gr.Slider(minimum=param.minimum, maximum=param.maximum, step=param.step, value=value, **common)
    if param.widget is Widget.RADIO:
        return gr.Radio(choices=list(param.choices), value=value, **common)
    if param.widget is Widget.TEXTAREA:
        return gr.Textbox(lines=3, value=value, placeholder=param.placeholder, **common)
    return gr.Textbox(value=value, max_lines=1, placeholder=param.placeholder, **common)


_REFRESH = {Widget.CHECKPOINT: (prior_choices, "Refresh the checkpoint list"),
            Widget.CONCEPT: (concept_choices, "Refresh the concept-model list (models/GCFG)")}


def build(tabname: str, elem_id, prompt_component=None, cfg_component=None, negative_component=None,
          host=None, sampler_component=None) -> list:
    """Build the accordion; returns the argument components in `PARAMS` order.

    The main prompt, negative prompt, CFG scale and sampler components (captured by the script with
    `on_after_component`) drive the decouple button and the live weights line; without them those parts are
    static. `host` (`gcfg_webui.hosts.Host`) adds a warning line where GCFG cannot guide.
    """
    default_prior = shared.opts.data.get("gcfg_default_prior", NONE_CHOICE)
    components: dict[str, object] = {}
    enabled_param = PARAMS[0]
    # No tooltip on the accordion: gradio 4 (Forge) refuses one on containers, and its checkbox is hidden anyway.
    with InputAccordion(False, label=enabled_param.label, elem_id=elem_id(enabled_param.name)) as enabled:
        components[enabled_param.name] = enabled
        if host is not None and not host.supported:
            gr.Markdown(f"⚠ GCFG cannot guide on {host.name}: {host.reason}. Requests with GCFG enabled are "
                        "refused.", elem_id=elem_id("host"))
        elif host is not None and host.caution:
            gr.Markdown(f"ℹ {host.caution}.", elem_id=elem_id("host"))
        # Laid out by row; returned in PARAMS order (the API's positional order) whatever the layout.
        by_row = sorted(PARAMS[1:], key=lambda param: param.row)
        for _row, params in itertools.groupby(by_row, key=lambda param: param.row):
            params = list(params)
            with gr.Row():
                for param in params:
                    components[param.name] = _component(param, elem_id, default_prior)
                    if param.widget in _REFRESH:
                        choices, tooltip = _REFRESH[param.widget]
                        button = ToolButton(REFRESH_SYMBOL, elem_id=elem_id(f"{param.name}_refresh"),
                                            tooltip=tooltip)
                        button.click(fn=lambda choices=choices: gr.update(choices=choices()),
                                     outputs=[components[param.name]])
            if "negative_scale" in (param.name for param in params):
                weights_info = gr.Markdown(effective_weights("classic", None), elem_id=elem_id("weights"))
        terms_info = gr.Markdown("", elem_id=elem_id("terms_status"))
        with gr.Row(equal_height=False):
            gr.Markdown(SYNTAX_HELP)
            decouple = gr.Button("Decouple prompt", elem_id=elem_id("decouple"), scale=0, min_width=160,
                                 tooltip="Move the prompt's comma-separated parts after the first into independent "
                                         "extra terms, each weighted by the CFG scale (paper §4.4)")

    terms = components["terms"]
    terms.change(fn=terms_status, inputs=[terms], outputs=[terms_info], show_progress=False)
    if cfg_component is not None and negative_component is not None:
        weight_inputs = [components["negative_scale"], cfg_component, negative_component, terms,
                         components["concept"], components["concept_weight"]]
        if sampler_component is not None:
            weight_inputs.append(sampler_component)
        multipliers = None if host is None else host.cfg_multipliers

        def on_weights(*values):
            return effective_weights(*values, multipliers=multipliers)

        for source in weight_inputs:
            source.change(fn=on_weights, inputs=weight_inputs, outputs=[weights_info], show_progress=False)
    if prompt_component is not None and cfg_component is not None:
        def on_decouple(prompt, existing, cfg):
            main, added = decouple_prompt(prompt, float(cfg))
            return main, merge_terms(existing, added)

        decouple.click(fn=on_decouple, inputs=[prompt_component, terms, cfg_component],
                       outputs=[prompt_component, terms])
    return [components[param.name] for param in PARAMS]
