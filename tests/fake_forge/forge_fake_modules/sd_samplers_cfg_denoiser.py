"""Forge's CFG denoiser, written from what its code does: it reconstructs the conds of the step, fires
`on_cfg_denoiser`, takes the hires CFG scale in the hires pass, sets the scale to 1 for Skip Early CFG / NGMS
steps, and hands everything to `backend.sampling.sampling_function` (no `combine_denoised`, no
`on_cfg_denoised`). DDIM-style samplers pass a timestep, which it turns into σ first
(`classic_ddim_eps_estimation`), and get ε back."""

import torch
from backend.sampling.sampling_function import sampling_function
from modules import prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.model_wrap = None
        self.p = None
        self.step = 0
        self.steps = self.total_steps = None
        self.mask = self.nmask = self.init_latent = None
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.cond_scale_miltiplier = 1.0  # set by DDIM CFG++, never read by Forge's denoiser
        self.classic_ddim_eps_estimation = False

    @property
    def inner_model(self):
        raise NotImplementedError

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if shared.state.interrupted:
            raise sd_samplers_common.InterruptedException
        if self.classic_ddim_eps_estimation:
            alphas = self.inner_model.inner_model.alphas_cumprod
            sigmas = ((1 - alphas) / alphas) ** 0.5
            sigma = sigmas[sigma.round().long().clip(0, int(sigmas.shape[0]) - 1)]
            x = x * ((sigma ** 2 + 1) ** 0.5)[:, None, None, None]
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        params = CFGDenoiserParams(x, image_cond, sigma, shared.state.sampling_step, shared.state.sampling_steps,
                                   tensor, uncond, self)
        cfg_denoiser_callback(params)
        if getattr(self.p, "is_hr_pass", False):
            cond_scale = self.p.hr_cfg
        if shared.opts.skip_early_cond > 0 and self.step / self.total_steps <= shared.opts.skip_early_cond:
            cond_scale = 1.0
        elif (self.step % 2 or shared.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            cond_scale = 1.0
        denoised, cond_pred, uncond_pred = sampling_function(self, params, cond_scale, conds_list)
        if self.need_last_noise_uncond:
            self.last_noise_uncond = (x - uncond_pred) / sigma[:, None, None, None]
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.step += 1
        if self.classic_ddim_eps_estimation:
            return (x - denoised) / sigma[:, None, None, None]
        return denoised
