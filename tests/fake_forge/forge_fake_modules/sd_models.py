"""Forge's `sd_models`: the WebUI's checkpoint registry; unloading goes through Forge's memory management, and
`send_model_to_device` does nothing (Forge loads models when sampling starts)."""

from backend import memory_management
from modules import _a1111

_registry = _a1111.load("sd_models")
CheckpointInfo = _registry.CheckpointInfo
checkpoints_list = _registry.checkpoints_list
checkpoint_aliases = _registry.checkpoint_aliases
register = _registry.register
checkpoint_tiles = _registry.checkpoint_tiles
get_closet_checkpoint_match = _registry.get_closet_checkpoint_match


def unload_model_weights(sd_model=None, info=None):
    memory_management.unload_all_models()


def send_model_to_device(model):
    pass
