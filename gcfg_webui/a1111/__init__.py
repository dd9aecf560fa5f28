"""The AUTOMATIC1111 WebUI 1.10 adapter: GCFG's sampling hook and side-model loading on that host.

* `session` — model checks and side models per generation, one controller per sampler run;
* `passes` — the pass plan and its controller, the single owner of each denoiser call's state;
* `routing` — the fast path: GCFG's rows inside the WebUI's own batched UNet call;
* `combine` — the `combine_denoised` wrapper: the combination itself;
* `install` — installing and removing the per-instance wrappers;
* `rows` — conditioning dicts and one UNet call per model;
* `side_models` — prior, concept and checkpoint UNets built from their files.
"""

from __future__ import annotations

from gcfg_webui.a1111.install import capture_inputs
from gcfg_webui.a1111.session import begin_pass, end_generation, load

NAME = "AUTOMATIC1111"


def register_callbacks(script_callbacks) -> None:
    """The callbacks this adapter needs (the WebUI clears all callbacks before every script reload)."""
    script_callbacks.on_cfg_denoiser(capture_inputs)


__all__ = ["NAME", "begin_pass", "capture_inputs", "end_generation", "load", "register_callbacks"]
