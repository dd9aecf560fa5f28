from modules import sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_timesteps

all_samplers_map = {
    "Euler": sd_samplers_common.SamplerData(
        "Euler", lambda m: sd_samplers_kdiffusion.KDiffusionSampler("sample_euler", m)),
    "Heun": sd_samplers_common.SamplerData(
        "Heun", lambda m: sd_samplers_kdiffusion.KDiffusionSampler("sample_heun", m), second_order=True),
    "DDIM": sd_samplers_common.SamplerData("DDIM", lambda m: sd_samplers_timesteps.CompVisSampler("ddim", m)),
    "DDIM CFG++": sd_samplers_common.SamplerData(
        "DDIM CFG++", lambda m: sd_samplers_timesteps.CompVisSampler("ddim_cfgpp", m)),
}


def find_sampler_config(name):
    return all_samplers_map.get(name)


def create_sampler(name, model):
    config = all_samplers_map[name]
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
