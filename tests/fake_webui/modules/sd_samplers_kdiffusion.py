"""k-diffusion samplers: the inner model is `CompVisDenoiser(sd_model)`, outputs are denoised x0 (§3.1-3.2)."""


from gcfg_core.kdiff import k_diffusion_modules
from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = k_diffusion_modules()[1].CompVisDenoiser(shared.sd_model)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def _run(self, p, x, sigmas, conditioning, unconditional, image_conditioning):
        self.initialize(p)
        self.model_wrap_cfg.steps = len(sigmas) - 1
        self.model_wrap_cfg.total_steps = len(sigmas) - 1
        self.sampler_extra_args = {"cond": conditioning, "uncond": unconditional, "image_cond": image_conditioning,
                                   "cond_scale": p.cfg_scale, "s_min_uncond": getattr(p, "s_min_uncond", 0.0)}
        for i in range(len(sigmas) - 1):  # Euler
            sigma = sigmas[i] * x.new_ones([x.shape[0]])
            denoised = self.model_wrap_cfg(x, sigma, **self.sampler_extra_args)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    def sample(self, p, x, conditioning, unconditional, steps=None, image_conditioning=None):
        sigmas = self.model_wrap.get_sigmas(steps or p.steps)
        return self._run(p, x * sigmas[0], sigmas, conditioning, unconditional, image_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.model_wrap.get_sigmas(steps)[-(int(steps * p.denoising_strength) + 2):]
        self.model_wrap_cfg.init_latent = x
        return self._run(p, x + noise * sigmas[0], sigmas, conditioning, unconditional, image_conditioning)


samplers = [("Euler", "sample_euler"), ("Heun", "sample_heun")]
