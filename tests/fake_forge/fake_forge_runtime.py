"""Test-side helpers for the fake Forge: the loaded model (an engine with `forge_objects`) and a `process_images`
stand-in in Forge's order: per batch the UNet patcher is reset to the one after LoRA, then
`process_before_every_sampling`, then sampling; the hires pass calls that hook twice, once before and once after
Forge resets the patcher."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

FORGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = FORGE_ROOT.parents[1]


def enable() -> None:
    for path in (str(FORGE_ROOT), str(REPO_ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    if str(FORGE_ROOT.parent) not in sys.path:
        sys.path.append(str(FORGE_ROOT.parent))
    import fake_hosts  # finds the fake `modules`, `backend` and `modules_forge` packages in this folder

    fake_hosts.install()
    loaded = sys.modules.get("modules")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(FORGE_ROOT)):
        raise RuntimeError("another `modules` package is already imported")


def load_script_module(name: str = "gcfg.py"):
    """Execute a script file as Forge does: a fresh module object, not registered in sys.modules."""
    from modules import script_callbacks

    script_callbacks.clear_callbacks()
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ForgeObjects:
    def __init__(self, unet, clip, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeEngine:
    """What `forge_loader` returns for an SD 1.x checkpoint, around a `gcfg_core` model's weights."""

    def __init__(self, model, device=None):
        from backend.modules.k_model import KModel, Predictor
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.patcher.base import ModelPatcher
        from backend.patcher.unet import UnetPatcher

        from gcfg_core.models import infer_unet_config

        device = torch.device("cpu") if device is None else device
        state_dict = model.unet.state_dict()
        unet = IntegratedUNet2DConditionModel(**dataclasses.asdict(infer_unet_config(state_dict)))
        unet.load_state_dict(state_dict)
        unet.eval().requires_grad_(False)
        unet.storage_dtype = unet.computation_dtype = torch.float32
        kmodel = KModel(unet, k_predictor=Predictor(model.alphas_cumprod.float()))
        self.sd = model
        self.forge_objects = ForgeObjects(UnetPatcher(kmodel, device, device),
                                          SimpleNamespace(patcher=ModelPatcher(model.text_encoder, device, device)))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.text_processing_engine = self.get_learned_conditioning
        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False
        self.sd_checkpoint_info = None

    @property
    def unet(self):
        return self.forge_objects_original.unet.model.diffusion_model

    @torch.no_grad()
    def get_learned_conditioning(self, prompts):
        return self.sd.encode_prompts(list(prompts))


def engine_from(model) -> ForgeEngine:
    return ForgeEngine(model)


@dataclasses.dataclass
class FakeForgeProcessing:
    prompt: str = "a cat"
    negative_prompt: str = ""
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 3
    cfg_scale: float = 5.0
    width: int = 64
    height: int = 64
    seed: int = 1
    sampler_name: str = "Euler"
    enable_hr: bool = False
    hr_cfg: float = 5.0
    hr_second_pass_steps: int = 2
    hr_sampler_name: str | None = None
    s_min_uncond: float = 0.0
    refiner_checkpoint_info: object = None
    refiner_switch_at: float | None = None
    is_api: bool = True

    def __post_init__(self):
        self.extra_generation_params = {}
        self.extra_network_data = self.hr_extra_network_data = {}
        self.is_hr_pass = False
        self.sampler = None
        self.mask = self.nmask = None
        self.hr_upscale_to_x, self.hr_upscale_to_y = self.width * 2, self.height * 2
        self.seeds = [self.seed]

    @property
    def sd_model(self):
        from modules import shared

        return shared.sd_model

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data,
                               hires_steps=None):
        from modules import shared

        key = (tuple(required_prompts), steps, hires_steps, id(shared.sd_model))
        for cache in caches:
            if cache[0] == key:
                return cache[1]
        value = function(shared.sd_model, required_prompts, steps, hires_steps, False)
        caches[0][0], caches[0][1] = key, value
        return value


def _all(value, count):
    return list(value) if isinstance(value, list) else [value] * count


def process_images(p: FakeForgeProcessing, script, args, before_sampling=None):
    """Sample every batch of `p` with `script` hooked in (Forge's order); returns the final latents.

    `before_sampling(p)` runs after GCFG's `process_before_every_sampling`, where a later script would patch the
    UNet (it gets the patcher GCFG put on the model)."""
    from modules import prompt_parser, sd_samplers, shared

    model = shared.sd_model
    total = p.batch_size * p.n_iter
    p.all_prompts, p.all_negative_prompts = _all(p.prompt, total), _all(p.negative_prompt, total)
    script.process(p, *args)
    outputs = []
    for n in range(p.n_iter):
        batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
        p.hr_negative_prompts = p.negative_prompts
        config = sd_samplers.find_sampler_config(p.sampler_name)
        p.firstpass_steps = config.total_steps(p.steps)
        c = prompt_parser.get_multicond_learned_conditioning(model, p.prompts, p.firstpass_steps)
        uc = prompt_parser.get_learned_conditioning(model, p.negative_prompts, p.firstpass_steps)
        noise = torch.randn([p.batch_size, 4, p.height // 8, p.width // 8],
                            generator=torch.Generator().manual_seed(p.seed + n))
        p.sampler = sd_samplers.create_sampler(p.sampler_name, model)
        model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
        script.process_before_every_sampling(p, *args, x=noise, noise=noise, c=c, uc=uc)
        if before_sampling is not None:
            before_sampling(p)
        samples = p.sampler.sample(p, noise, c, uc, image_conditioning=noise.new_zeros([p.batch_size, 5, 1, 1]))
        if p.enable_hr:
            samples = _hires_pass(p, script, args, samples, c)
        outputs.append(samples)
    p.gcfg_generation_seen = getattr(p, "gcfg_generation", None)
    script.postprocess(p, SimpleNamespace(images=outputs), *args)
    return torch.cat(outputs)


def _hires_pass(p, script, args, samples, c):
    from modules import prompt_parser, sd_samplers, shared

    model = shared.sd_model
    p.is_hr_pass = True
    samples = torch.nn.functional.interpolate(samples, scale_factor=2, mode="nearest")
    uc = None if p.hr_cfg == 1 else prompt_parser.get_learned_conditioning(model, p.hr_negative_prompts,
                                                                            p.firstpass_steps)
    p.sampler = sd_samplers.create_sampler(p.hr_sampler_name or p.sampler_name, model)
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(p.seed + 100))
    script.process_before_every_sampling(p, *args, x=samples, noise=noise, c=c, uc=uc)
    model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
    script.process_before_every_sampling(p, *args, x=samples, noise=noise, c=c, uc=uc)
    p.denoising_strength = 0.6
    out = p.sampler.sample_img2img(p, samples, noise, c, uc, steps=p.hr_second_pass_steps,
                                   image_conditioning=samples.new_zeros([samples.shape[0], 5, 1, 1]))
    p.sampler = None
    p.is_hr_pass = False
    return out
