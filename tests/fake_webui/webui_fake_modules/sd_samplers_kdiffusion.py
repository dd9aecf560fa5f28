"""k-diffusion samplers: the inner model is `CompVisDenoiser(sd_model)`, outputs are denoised x0 (§3.1-3.2).

The sampling functions are k-diffusion's own (`sample_euler`, `sample_heun`: a second-order sampler whose
corrector evaluates at the next σ), driven with the schedule `get_sigmas` returns, as the WebUI does.
"""

import inspect

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared

from gcfg_core.kdiff import k_diffusion_modules


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = k_diffusion_modules()[1].CompVisDenoiser(shared.sd_model)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.func = getattr(k_diffusion_modules()[0], funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        return self.model_wrap.get_sigmas(steps).cpu()

    def _launch(self, steps, x, sigmas, extra):
        parameters = inspect.signature(self.func).parameters
        kwargs = {"sigmas": sigmas} if "sigmas" in parameters else {}
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=extra, disable=True,
                                                             **kwargs))

    def sample(self, p, x, conditioning, unconditional, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        self.initialize(p)
        extra = self.extra_args(p, conditioning, unconditional, image_conditioning)
        return self._launch(steps, x * sigmas[0], sigmas, extra)

    def sample_img2img(self, p, x, noise, conditioning, unconditional, steps=None, image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        extra = self.extra_args(p, conditioning, unconditional, image_conditioning)
        return self._launch(t_enc + 1, x + noise * sigma_sched[0], sigma_sched, extra)
