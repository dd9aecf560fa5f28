"""The unpatched ldm `UNetModel.forward`, as `sd_hijack.ldm_original_forward` (webui-internals §4.4)."""

from ldm.modules.diffusionmodules.openaimodel import UNetModel

ldm_original_forward = UNetModel.forward
