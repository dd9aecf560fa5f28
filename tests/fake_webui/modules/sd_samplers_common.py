class InterruptedException(BaseException):
    pass


class SamplerData:
    def __init__(self, name, constructor, second_order=False):
        self.name, self.constructor, self.second_order = name, constructor, second_order

    def total_steps(self, steps):
        return steps * 2 if self.second_order else steps


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.model_wrap_cfg = None
        self.model_wrap = None
        self.config = None
        self.p = None
        self.last_latent = None
        self.sampler_extra_args = {}

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.init_latent = getattr(p, "init_latent", None)
