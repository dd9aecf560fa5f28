"""The Forge adapter (lllyasviel's stable-diffusion-webui-forge and Forge Neo, which keep its `backend`): GCFG's
sampling hook and side-model loading on that host.

* `session` — model checks and side models per generation; one controller per sampler run;
* `passes` — the pass plan and its controller, the single owner of each denoiser call's state;
* `routing` — the UNet wrapper: GCFG's rows inside Forge's batched UNet call;
* `combine` — the post-CFG function: the combination itself;
* `install` — the hooks on the pass's UNet patcher clone, and taking them off;
* `batching` — rearranging Forge's batched call;
* `side_models` — prior, concept and checkpoint UNets through Forge's loader and memory management;
* `host_api` — the Forge internals all of the above use, in one place.
"""

from __future__ import annotations

from gcfg_webui.forge.session import begin_pass, end_generation, load

NAME = "Forge"


def register_callbacks(script_callbacks) -> None:
    """Nothing: on Forge every hook lives on the pass's UNet patcher clone."""


__all__ = ["NAME", "begin_pass", "end_generation", "load", "register_callbacks"]
