"""`forge_loader(path)`: Forge's model loader — detects the family and builds the engine (UNet patcher around a
KModel, its own text engine, a VAE). The fake reads SD 1.x checkpoints with `gcfg_core` and records every load."""

import torch
from backend import memory_management

loads: list = []  # paths, in order


def forge_loader(sd, additional_state_dicts=None):
    from fake_forge_runtime import ForgeEngine

    loads.append(str(sd))
    from gcfg_core.models import load_sd_checkpoint

    model = load_sd_checkpoint(sd, parts=("unet", "text_encoder"), device="cpu", dtype=torch.float32,
                               compute_hash=False)
    return ForgeEngine(model, device=memory_management.get_torch_device())
