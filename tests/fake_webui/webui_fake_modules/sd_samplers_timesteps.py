"""Timesteps samplers: the inner model returns eps and "sigma" is the timestep (§3.1-3.2, §3.6).

DDIM and DDIM CFG++ follow `sd_samplers_timesteps_impl.py` of WebUI 1.10: the timesteps come from
`get_timesteps` (``range(0, 1000, 1000 // steps) + 1``, ascending), the loop evaluates ``len(timesteps) − 1`` of
them from the highest down, and CFG++ divides the CFG scale by 12.5 (`cond_scale_miltiplier`) and renoises
with the uncond prediction the denoiser stored (`last_noise_uncond`).
"""

import torch
from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.mask_before_denoising = True

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


@torch.no_grad()
def ddim(model, x, timesteps, extra_args=None, cfg_plus_plus=False):
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    if cfg_plus_plus:
        model.cond_scale_miltiplier = 1 / 12.5
        model.need_last_noise_uncond = True
    ones = x.new_ones(x.shape[0])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * ones, **extra_args)
        direction = model.last_noise_uncond if cfg_plus_plus else e_t
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        x = a_prev ** 0.5 * pred_x0 + (1 - a_prev) ** 0.5 * direction
    return x


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.cfg_plus_plus = funcname == "ddim_cfgpp"
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_timesteps(self, p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def sample(self, p, x, conditioning, unconditional, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)
        self.initialize(p)
        extra = self.extra_args(p, conditioning, unconditional, image_conditioning)
        return self.launch_sampling(steps, lambda: ddim(self.model_wrap_cfg, x, timesteps, extra, self.cfg_plus_plus))
