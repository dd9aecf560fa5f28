"""Forge's k-diffusion sampler: the schedule comes from the model's predictor, `sampling_prepare` runs before
sampling (memory management loads the UNet patcher and its extra patchers)."""

import inspect

from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared

from gcfg_core.kdiff import k_diffusion_modules


class ScheduleLinker:
    def __init__(self, model):
        self.inner_model = model
        self.predictor = model.forge_objects.unet.model.predictor

    @property
    def sigmas(self):
        return self.predictor.sigmas

    def get_sigmas(self, n):
        return self.predictor.get_sigmas(n)


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = ScheduleLinker(shared.sd_model)
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
        unet = shared.sd_model.forge_objects.unet
        sampling_prepare(unet, x)
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        self.initialize(p)
        extra = self.extra_args(p, conditioning, unconditional, image_conditioning)
        samples = self._launch(steps, x * sigmas[0], sigmas, extra)
        sampling_cleanup(unet)
        return samples

    def sample_img2img(self, p, x, noise, conditioning, unconditional, steps=None, image_conditioning=None):
        unet = shared.sd_model.forge_objects.unet
        sampling_prepare(unet, x)
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        extra = self.extra_args(p, conditioning, unconditional, image_conditioning)
        samples = self._launch(t_enc + 1, x + noise * sigma_sched[0], sigma_sched, extra)
        sampling_cleanup(unet)
        return samples
