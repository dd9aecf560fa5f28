"""The unpatched ldm `UNetModel.forward`, as `sd_hijack.ldm_original_forward` (webui-internals §4.4).

The fake evaluates it row by row: CPU kernels give results that differ by ~4e-7 between batch sizes, and the
tests compare ways of batching the same rows bit for bit.
"""

import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel


def ldm_original_forward(unet, x, timesteps=None, context=None, **kwargs):
    return torch.cat([UNetModel.forward(unet, x[row:row + 1], timesteps[row:row + 1],
                                        context=None if context is None else context[row:row + 1], **kwargs)
                      for row in range(x.shape[0])])
