"""Cond dicts: `compile_conditions` of a prompt's conditioning, `compile_weighted_conditions` of the AND parts
(one dict per part index, the last image's weight as its strength), and Forge's context concatenation (contexts
of different lengths repeated to their lcm when that is at most 4× the shorter)."""

import math

import torch


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, device, **kwargs):
        cond = self.cond
        if cond.shape[0] < batch_size:
            cond = cond.repeat(math.ceil(batch_size / cond.shape[0]), *([1] * (cond.dim() - 1)))[:batch_size]
        return type(self)(cond[:batch_size].to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond, *(other.cond for other in others)])


class ConditionCrossAttn(Condition):
    def can_concat(self, other):
        a, b = self.cond.shape, other.cond.shape
        if a == b:
            return True
        return a[0] == b[0] and a[2] == b[2] and math.lcm(a[1], b[1]) // min(a[1], b[1]) <= 4

    def concat(self, others):
        conds = [self.cond, *(other.cond for other in others)]
        length = math.lcm(*(cond.shape[1] for cond in conds))
        return torch.cat([cond.repeat(1, length // cond.shape[1], 1) for cond in conds])


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [{"cross_attn": cond, "model_conds": {"c_crossattn": ConditionCrossAttn(cond)}}]
    return [{"cross_attn": cond["crossattn"], "pooled_output": cond["vector"],
             "model_conds": {"c_crossattn": ConditionCrossAttn(cond["crossattn"]), "y": Condition(cond["vector"])}}]


def compile_weighted_conditions(cond, weights):
    results = []
    for part in map(list, zip(*weights, strict=False)):
        rows = [row for row, _ in part]
        entry = compile_conditions(cond[rows])[0]
        entry["strength"] = part[-1][1]
        results.append(entry)
    return results
