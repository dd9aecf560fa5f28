"""Forge's own SD UNet class (`IntegratedUNet2DConditionModel`, ldm's key layout) and its transformer block.

The fake builds ldm's `UNetModel` from a config dict (the fields of `gcfg_core.configs.UNetConfig`; Forge's own
config comes from huggingface_guess) and evaluates it row by row, so that results do not depend on how rows are
batched. Every call is recorded with its rows and `transformer_options`, per instance.
"""

import dataclasses

import torch
from ldm.modules.attention import BasicTransformerBlock  # noqa: F401  (Forge has its own class of that name)
from ldm.modules.diffusionmodules.openaimodel import UNetModel

from gcfg_core.configs import UNetConfig


class IntegratedUNet2DConditionModel(UNetModel):
    def __init__(self, **config):
        unet_config = UNetConfig(**{key: tuple(value) if isinstance(value, list) else value
                                    for key, value in config.items()})
        super().__init__(**unet_config.ldm_kwargs())
        self.config = dataclasses.asdict(unet_config)
        self.calls: list = []

    @classmethod
    def from_config(cls, config):
        return cls(**dict(config))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        self.calls.append({"rows": int(x.shape[0]), "transformer_options": transformer_options,
                           "context_length": None if context is None else int(context.shape[1])})
        with torch.no_grad():
            return torch.cat([UNetModel.forward(self, x[row:row + 1], timesteps[row:row + 1],
                                                context=None if context is None else context[row:row + 1])
                              for row in range(x.shape[0])])
