"""The CFG denoiser, written from webui-internals §3.3 (edit models only detected).

Its inner-model calls follow the WebUI's layouts (steps 10-11): one batched call of the very tensors the
`on_cfg_denoiser` callback saw when the token lengths agree and `batch_cond_uncond` is on, slices of B rows
when it is off, and with different lengths (no padding option) cond slices plus one separate uncond call.
"""

import torch
from modules import prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoisedParams, CFGDenoiserParams, cfg_denoised_callback, cfg_denoiser_callback


def _cat(conds):
    if isinstance(conds[0], dict):
        return prompt_parser.DictWithShape({key: torch.cat([c[key] for c in conds]) for key in conds[0]})
    return torch.cat(conds)


def _rows(cond, rows):
    if isinstance(cond, dict):
        return {key: value[rows] for key, value in cond.items()}
    return cond[rows]


def _condition(cond, image_cond):
    """§3.3 step 6: SDXL dict conds keep their keys; SD 1.x ones become c_crossattn."""
    if isinstance(cond, dict):
        return {**cond, "c_concat": [image_cond]}
    return {"c_crossattn": [cond], "c_concat": [image_cond]}


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.p = None
        self.step = 0
        self.steps = None
        self.total_steps = None
        self.mask = self.nmask = self.init_latent = None
        self.image_cfg_scale = None
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.mask_before_denoising = False
        self.model_wrap = None

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        base = x_out[-uncond.shape[0]:]
        result = base.clone()
        for image, conds in enumerate(conds_list):
            for row, weight in conds:
                result[image] += (x_out[row] - base[image]) * (weight * cond_scale)
        return result

    def _inner_calls(self, x_in, sigma_in, image_cond_in, tensor, uncond, batch, skip):
        def call(rows, text):
            return self.inner_model(x_in[rows], sigma_in[rows], cond=_condition(text, image_cond_in[rows]))

        if tensor.shape[1] == uncond.shape[1] or skip:
            cond_in = tensor if skip else _cat([tensor, uncond])
            if shared.opts.batch_cond_uncond:
                return self.inner_model(x_in, sigma_in, cond=_condition(cond_in, image_cond_in))
            x_out = torch.zeros_like(x_in)
            for start in range(0, x_in.shape[0], batch):
                rows = slice(start, start + batch)
                x_out[rows] = call(rows, _rows(cond_in, rows))
            return x_out
        x_out = torch.zeros_like(x_in)
        step = batch * 2 if shared.opts.batch_cond_uncond else batch
        for start in range(0, tensor.shape[0], step):
            rows = slice(start, min(start + step, tensor.shape[0]))
            x_out[rows] = call(rows, _rows(tensor, rows))
        rows = slice(x_in.shape[0] - batch, None)
        x_out[rows] = call(rows, uncond)
        return x_out

    def skips_uncond(self, sigma, s_min_uncond):
        """Skip Early CFG and NGMS (§3.3 step 9); a separate method so that tests can give the fake another rule."""
        if shared.opts.skip_early_cond != 0 and self.step / self.total_steps <= shared.opts.skip_early_cond:
            return True
        return bool((self.step % 2 or shared.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond)

    def update_inner_model(self):
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def _blend(self, latent):
        return latent * self.nmask + self.init_latent * self.mask

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if shared.state.interrupted:
            raise sd_samplers_common.InterruptedException
        if sd_samplers_common.apply_refiner(self, sigma):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if self.mask_before_denoising and self.mask is not None:
            x = self._blend(x)
        batch = len(conds_list)
        repeats = [len(conds) for conds in conds_list]
        x_in = torch.cat([x[i:i + 1].repeat(n, *([1] * (x.dim() - 1))) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([sigma[i:i + 1].repeat(n) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([image_cond[i:i + 1].repeat(n, *([1] * (image_cond.dim() - 1)))
                                   for i, n in enumerate(repeats)] + [image_cond])
        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, shared.state.sampling_step,
                                   shared.state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        skip = self.skips_uncond(sigma, s_min_uncond)
        if skip:
            x_in, sigma_in, image_cond_in = x_in[:-batch], sigma_in[:-batch], image_cond_in[:-batch]
        if shared.opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = _pad_to_same_length(tensor, uncond, shared.sd_model.cond_stage_model_empty_prompt)
        x_out = self._inner_calls(x_in, sigma_in, image_cond_in, tensor, uncond, batch, skip)
        self.rows_evaluated = getattr(self, "rows_evaluated", 0) + x_in.shape[0]
        if skip:
            x_out = torch.cat([x_out, torch.cat([x_out[conds[0][0]:conds[0][0] + 1] for conds in conds_list])])
        cfg_denoised_callback(CFGDenoisedParams(x_out, shared.state.sampling_step, shared.state.sampling_steps,
                                                self.inner_model))
        if self.need_last_noise_uncond:
            self.last_noise_uncond = x_out[-batch:].clone()
        scale = 1.0 if skip else cond_scale * self.cond_scale_miltiplier
        denoised = self.combine_denoised(x_out, conds_list, uncond, scale)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = self._blend(denoised)
        self.step += 1
        return denoised


def _pad_to_same_length(tensor, uncond, empty):
    """`pad_cond_uncond`: append empty-prompt chunks to the shorter of cond and uncond (§3.3 step 10)."""
    chunks = (tensor.shape[1] - uncond.shape[1]) // empty.shape[1]
    if chunks > 0:
        uncond = torch.cat([uncond, empty.repeat(uncond.shape[0], chunks, 1)], dim=1)
    elif chunks < 0:
        tensor = torch.cat([tensor, empty.repeat(tensor.shape[0], -chunks, 1)], dim=1)
    return tensor, uncond
