"""Forge's memory management, reduced to a record of what it is asked to load and unload (CPU only)."""

import torch

cpu = torch.device("cpu")
signal_empty_cache = False
loaded_models: list = []  # every patcher `load_models_gpu` was given, in order, over the whole test session
unload_calls: list = []


def get_torch_device():
    return cpu


def unet_offload_device():
    return cpu


def get_free_memory(device=None, torch_free_too=False):
    return 1 << 40


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    loaded_models.extend(models)


def load_model_gpu(model):
    load_models_gpu([model])


def unload_all_models():
    unload_calls.append(len(loaded_models))


def soft_empty_cache(force=False):
    pass


def module_size(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())
