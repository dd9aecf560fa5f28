"""Forge's sampling function, written from what its code does (whole-image conds only: no areas or masks).

Order of one denoiser call: conditioning modifiers → the CFG-1 shortcut (no uncond at scale 1 unless
`disable_cfg1_optimization`) → pre-CFG functions → `calc_cond_uncond_batch` → `sampler_cfg_function` or Forge's
CFG ``U + (C − U)·s·Σstrength`` → post-CFG functions (``denoised``, ``cond_denoised``, ``uncond_denoised``, …).

`calc_cond_uncond_batch` lists the cond dicts (prompt parts, then the uncond), takes the first and every dict
that can share its call, in reverse order (so the uncond chunk comes first), and evaluates them as one call of B
rows per chunk: through `model_options["model_function_wrapper"](apply_model, {input, timestep, c,
cond_or_uncond})` when set, with `transformer_options` describing the chunks. Prompt chunks are averaged with
their strengths as weights. Every batched call is recorded in `calls`.
"""

import math

import torch
from backend import memory_management
from backend.sampling.condition import Condition, compile_conditions, compile_weighted_conditions

calls: list = []  # (cond_or_uncond, rows) of every batched call
max_chunks_per_call = None  # tests set it to split calls, as Forge does when memory is short


def _can_share(first, other):
    if (first["control"] is None) != (other["control"] is None) or (
            first["control"] is not None and first["control"] is not other["control"]):
        return False
    a, b = first["model_conds"], other["model_conds"]
    return a.keys() == b.keys() and all(a[key].can_concat(b[key]) for key in a)


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond = torch.zeros_like(x_in)
    weight_cond = torch.zeros_like(x_in) + 1e-37
    out_uncond = torch.zeros_like(x_in)
    weight_uncond = torch.zeros_like(x_in) + 1e-37
    to_run = [({**entry, "control": entry.get("control")}, 0) for entry in cond]
    to_run += [({**entry, "control": entry.get("control")}, 1) for entry in (uncond or [])]
    while to_run:
        first = to_run[0][0]
        shareable = [index for index, (entry, _) in enumerate(to_run) if _can_share(first, entry)]
        shareable.reverse()
        if max_chunks_per_call is not None:
            shareable = shareable[:max_chunks_per_call]
        picked = [to_run.pop(index) for index in shareable]
        flags = [flag for _, flag in picked]
        entries = [entry for entry, _ in picked]
        conditionings = [{key: entry["model_conds"][key].process_cond(batch_size=x_in.shape[0], device=x_in.device)
                          for key in entry["model_conds"]} for entry in entries]
        c = {key: conditionings[0][key].concat([other[key] for other in conditionings[1:]])
             for key in conditionings[0]}
        input_x = torch.cat([x_in] * len(picked))
        timestep_ = torch.cat([timestep] * len(picked))
        options = dict(model_options.get("transformer_options", {}))
        options["cond_or_uncond"] = flags[:]
        options["sigmas"] = timestep
        rows = int(timestep.shape[0])
        options["cond_mark"] = torch.tensor([flag for flag in flags for _ in range(rows)]).to(timestep)
        options["cond_indices"] = [i * rows + r for i, flag in enumerate(flags) if flag == 0 for r in range(rows)]
        options["uncond_indices"] = [i * rows + r for i, flag in enumerate(flags) if flag == 1 for r in range(rows)]
        c["transformer_options"] = options
        calls.append((flags[:], int(input_x.shape[0])))
        wrapper = model_options.get("model_function_wrapper")
        if wrapper is not None:
            output = wrapper(model.apply_model, {"input": input_x, "timestep": timestep_, "c": c,
                                                 "cond_or_uncond": flags})
        else:
            output = model.apply_model(input_x, timestep_, **c)
        for chunk, flag, entry in zip(output.chunk(len(picked)), flags, entries, strict=True):
            strength = float(entry.get("strength", 1.0))
            if flag == 0:
                out_cond += chunk * strength
                weight_cond += strength
            else:
                out_uncond += chunk * strength
                weight_uncond += strength
    return out_cond / weight_cond, out_uncond / weight_uncond


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None,
                            return_full=False):
    model_options = {} if model_options is None else model_options
    edit_strength = sum(float(entry.get("strength", 1.0)) for entry in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization") else uncond
    for function in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = function(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for function in model_options.get("sampler_post_cfg_function", []):
        result = function({"denoised": result, "cond": cond, "uncond": uncond, "model": model,
                           "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                           "model_options": model_options, "input": x})
    return (result, cond_pred, uncond_pred) if return_full else result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet = self.inner_model.inner_model.forge_objects.unet
    model, control = unet.model, unet.controlnet_linked_list
    x, timestep = denoiser_params.x, denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    image_cond = unet.extra_concat_condition if unet.extra_concat_condition is not None else denoiser_params.image_cond
    if isinstance(image_cond, torch.Tensor) and image_cond.shape[0] == x.shape[0] and \
            image_cond.shape[2:] == x.shape[2:]:
        for entry in [*(uncond or []), *cond]:
            entry["model_conds"]["c_concat"] = Condition(image_cond)
    if control is not None:
        for entry in [*(uncond or []), *cond]:
            entry["control"] = control
    options = unet.model_options
    seed = self.p.seeds[0] if getattr(self.p, "seeds", None) else 0
    for modifier in options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, options, seed = modifier(model, x, timestep, uncond, cond,
                                                                               cond_scale, options, seed)
    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, options, seed, return_full=True)


def sampling_prepare(unet, x):
    memory_management.load_models_gpu([unet, *unet.extra_model_patchers_during_sampling])


def sampling_cleanup(unet):
    pass
