from modules import sd_samplers_kdiffusion


class LCMSampler(sd_samplers_kdiffusion.KDiffusionSampler):
    pass
