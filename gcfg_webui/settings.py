"""The "GCFG" section of the WebUI's Settings page."""

from __future__ import annotations

from gcfg_webui.args import NONE_CHOICE
from gcfg_webui.model_files import list_prior_titles

SECTION = ("gcfg", "GCFG")
EMPTY_PROMPT_OWN = "Prior's own text encoder"
EMPTY_PROMPT_CURRENT = "Current model's text encoder"
PREDICTION_OPTION = "gcfg_unmarked_sdxl_prediction"
PREDICTION_DEFAULT = "eps"
PREDICTION_CHOICES = ("eps", "v", "eps-ztsnr", "v-ztsnr")


def options(shared, gr) -> dict:
    """name → OptionInfo for every GCFG setting."""
    return {
        "gcfg_cache_size": shared.OptionInfo(
            2, "Side models kept loaded (prior, concept and checkpoint UNets; least recently used is freed)",
            gr.Slider, {"minimum": 1, "maximum": 8, "step": 1}),
        "gcfg_keep_on_cpu": shared.OptionInfo(
            False, "Keep side models on the CPU between calls (saves VRAM; always on with --lowvram/--medvram)"),
        "gcfg_default_prior": shared.OptionInfo(
            NONE_CHOICE, "Default prior checkpoint in the GCFG accordion", gr.Dropdown,
            lambda: {"choices": [NONE_CHOICE, *list_prior_titles()]}).needs_reload_ui(),
        "gcfg_empty_prompt_encoder": shared.OptionInfo(
            EMPTY_PROMPT_OWN, "Encode the prior's empty prompt with", gr.Radio,
            {"choices": [EMPTY_PROMPT_OWN, EMPTY_PROMPT_CURRENT]}).info(
            "the prior's own text encoder is faithful; the current model's is cheaper and equal when both share "
            "the SD 1.5 text encoder"),
        PREDICTION_OPTION: shared.OptionInfo(
            PREDICTION_DEFAULT, "What a prior or checkpoint-term SDXL file predicts when its keys and metadata do not "
            "say", gr.Radio, {"choices": list(PREDICTION_CHOICES)}).info(
            "v-prediction and zero-terminal-SNR fine-tunes usually carry v_pred/ztsnr marker keys or metadata, "
            "which always win; set this for one that does not"),
        "gcfg_routing": shared.OptionInfo(
            True, "Route the uncond rows to the prior inside the WebUI's batched UNet call").info(
            "saves rows; turn off when another extension hooks the UNet and expects the WebUI's [cond, uncond] "
            "rows (GCFG also turns it off by itself when it sees the UNet's forward patched)"),
    }


def register(shared, gr) -> None:
    """`on_ui_settings` callback body."""
    for name, option in options(shared, gr).items():
        option.section = SECTION
        shared.opts.add_option(name, option)
