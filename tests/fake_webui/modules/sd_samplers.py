from modules import sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_lcm, sd_samplers_timesteps

all_samplers_map = {
    "Euler": sd_samplers_common.SamplerData("Euler", lambda m: sd_samplers_kdiffusion.KDiffusionSampler("euler", m)),
    "DDIM": sd_samplers_common.SamplerData("DDIM", lambda m: sd_samplers_timesteps.CompVisSampler("ddim", m)),
    "LCM": sd_samplers_common.SamplerData("LCM", lambda m: sd_samplers_lcm.LCMSampler("lcm", m)),
}


def find_sampler_config(name):
    return all_samplers_map.get(name)


def create_sampler(name, model):
    config = all_samplers_map[name]
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
