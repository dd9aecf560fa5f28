"""Forge's timesteps samplers (DDIM, DDIM CFG++): the denoiser gets a timestep and returns ε
(`classic_ddim_eps_estimation`); ᾱ is derived from the predictor's σ; CFG++ sets the CFG multiplier, which Forge
never applies, and renoises with the uncond prediction the denoiser stores."""

import torch
from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        self.inner_model.alphas_cumprod = 1.0 / (model.forge_objects.unet.model.predictor.sigmas ** 2 + 1.0)


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.classic_ddim_eps_estimation = True

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
        x = (a_prev ** 0.5 * pred_x0 + (1 - a_prev) ** 0.5 * direction).float()
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
        unet = shared.sd_model.forge_objects.unet
        sampling_prepare(unet, x)
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)
        self.initialize(p)
        extra = self.extra_args(p, conditioning, unconditional, image_conditioning)
        samples = self.launch_sampling(steps, lambda: ddim(self.model_wrap_cfg, x, timesteps, extra,
                                                           self.cfg_plus_plus))
        sampling_cleanup(unet)
        return samples
