"""Benchmark: the cost of GCFG over the UNet calls it needs (run on demand; pytest does not collect bench_*.py).

    python tests/benchmarks/bench_guidance.py [--quick]

On a mid-size ldm UNet (SD 1 layout, 64 channels, 768-d context, 32×32 latent, batch 1) on the CPU, times in one
run, interleaved, medians over repeats:
  (a) classic CFG: one model, cond + uncond batched in one call;
  (b) GCFG with prior (uncond) + main (prompt) + concept (text-free) through `GCFGDenoiser`;
  (c) the floor: the same three UNet calls, inputs prepared in advance, timed bare.
The last line printed is JSON: {"gcfg_vs_floor": b/c, "gcfg_vs_cfg": b/a, "unet_rows_per_step": ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gcfg_core.configs import UNetConfig, sd1_alphas_cumprod  # noqa: E402
from gcfg_core.denoiser import GCFGDenoiser, UNetDenoiser  # noqa: E402
from gcfg_core.models import build_unet, dezero_  # noqa: E402
from gcfg_core.nulltext import convert_to_nulltext, transformer_block_names  # noqa: E402
from gcfg_core.plan import standard_plan  # noqa: E402

CONFIG = UNetConfig(model_channels=64, context_dim=768)
LATENT = (1, 4, 32, 32)
CFG_SCALE = 7.0


def unet(seed: int, nulltext: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = dezero_(build_unet(CONFIG), seed=seed).eval()
    if nulltext:
        g = torch.Generator().manual_seed(seed)
        convert_to_nulltext(model, {name: torch.randn(model.get_submodule(name).norm1.normalized_shape[0],
                                                      generator=g) * 0.1 for name in transformer_block_names(model)})
    return model


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (well under a minute on 2 cores)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps medians stable on a shared machine (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 7 if args.quick else 25

    ac = sd1_alphas_cumprod()
    prior_unet, main_unet, concept_unet = unet(1), unet(0), unet(2, nulltext=True)
    prior, main_model = UNetDenoiser(prior_unet, ac), UNetDenoiser(main_unet, ac)
    concept = UNetDenoiser(concept_unet, ac)
    g = torch.Generator().manual_seed(0)
    conds = {"": torch.randn(77, CONFIG.context_dim, generator=g), "a cat": torch.randn(77, CONFIG.context_dim,
                                                                                        generator=g)}
    sigmas = prior.get_sigmas(20)
    x = torch.randn(*LATENT, generator=g) * float(sigmas[5])
    sigma = sigmas[5].expand(LATENT[0])

    gcfg = GCFGDenoiser({"prior": prior, "main": main_model, "concept": concept},
                        standard_plan(CFG_SCALE, "a cat", "", concept_weight=2.5), conds, sigmas)

    cfg_context = torch.cat([conds["a cat"][None], conds[""][None]])

    def classic_step():
        cond, uncond = main_model(torch.cat([x, x]), torch.cat([sigma, sigma]), context=cfg_context).split(1)
        return uncond + CFG_SCALE * (cond - uncond)

    t = prior.schedule.sigma_to_t(sigma)
    x_in = x * (sigma**2 + 1).rsqrt().view(-1, 1, 1, 1)
    uncond_context, cond_context = conds[""][None], conds["a cat"][None]

    def floor_step():
        prior_unet(x_in, t, context=uncond_context)
        main_unet(x_in, t, context=cond_context)
        concept_unet(x_in, t, context=None)

    def gcfg_step():
        return gcfg(x, sigma)

    steps = {"floor": floor_step, "gcfg": gcfg_step, "cfg": classic_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    with torch.inference_mode():
        for step in steps.values():  # warm-up
            step()
        for _ in range(repeats):  # interleaved step by step, so that load changes hit all three alike
            for name, step in steps.items():
                times[name].append(timed(step))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>6}: median {value * 1000:8.1f} ms/step over {len(times[name])} runs", file=sys.stderr)
    gcfg.calls = gcfg.unet_rows = 0
    with torch.inference_mode():
        gcfg(x, sigma)
    print(json.dumps({"gcfg_vs_floor": round(medians["gcfg"] / medians["floor"], 4),
                      "gcfg_vs_cfg": round(medians["gcfg"] / medians["cfg"], 4),
                      "unet_rows_per_step": gcfg.rows_per_call}))


if __name__ == "__main__":
    main()
