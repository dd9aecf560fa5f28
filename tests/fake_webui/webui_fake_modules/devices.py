import contextlib

import torch

device = torch.device("cpu")
cpu = torch.device("cpu")
dtype = torch.float32
dtype_unet = torch.float32
gc_calls = []


def autocast(disable=False):
    return contextlib.nullcontext()  # fp32 / --precision full: the WebUI's autocast is a no-op


def torch_gc():
    gc_calls.append(1)
