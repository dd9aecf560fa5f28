"""Benchmark: one GCFG sampler step on SDXL-shaped UNets on the CPU (run on demand; pytest does not collect it).

    python tests/benchmarks/bench_sdxl.py [--quick] [--size 64]

Per UNet size, times in one run, interleaved, medians over repeats, batch 1, one step = one `GCFGDenoiser` call
with an empty negative prompt (the prior carries the unconditional term) and the prompt on the main model:
  (a) prior = main: one UNet call of 2 rows (the plain CFG cost);
  (b) prior ≠ main (the prior swap): the same 2 rows in one call per model;
for SD 1.x's tiny size (the baseline), SDXL's tiny test size and the reduced width of the random WebUI assets
(`tests/webui/make_random_sdxl.py`). The last line printed is JSON with seconds per step and the ratios
b/a (cost of the swap) and SDXL/SD 1.x (same pixel size).
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

from gcfg_core.conditioning import SDXLConditioning  # noqa: E402
from gcfg_core.configs import SDXL_TINY, TINY, SDXLUNetConfig, sd1_alphas_cumprod  # noqa: E402
from gcfg_core.denoiser import GCFGDenoiser, UNetDenoiser  # noqa: E402
from gcfg_core.models import build_unet, dezero_  # noqa: E402
from gcfg_core.plan import standard_plan  # noqa: E402
from gcfg_core.sdxl import build_sdxl_unet  # noqa: E402

REDUCED = SDXLUNetConfig(model_channels=64, context_dim=1024, adm_in_channels=1792)  # make_random_sdxl's reduced


def unets(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "sd1-tiny":
        return dezero_(build_unet(TINY.unet), seed=seed).eval()
    return dezero_(build_sdxl_unet(SDXL_TINY.unet if kind == "sdxl-tiny" else REDUCED), seed=seed).eval()


def conds(kind: str) -> dict:
    g = torch.Generator().manual_seed(0)
    if kind == "sd1-tiny":
        return {prompt: torch.randn(1, 77, TINY.unet.context_dim, generator=g) for prompt in ("", "a cat")}
    config = SDXL_TINY.unet if kind == "sdxl-tiny" else REDUCED
    return {prompt: SDXLConditioning(torch.randn(1, 77, config.context_dim, generator=g),
                                     torch.randn(1, config.adm_in_channels, generator=g)) for prompt in ("", "a cat")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (latent size / 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps medians stable on a shared "
                        "machine (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 9
    plan = standard_plan(7.0, "a cat")
    alphas = sd1_alphas_cumprod()
    cases = {}
    for kind in ("sd1-tiny", "sdxl-tiny", "sdxl-reduced"):
        main_denoiser = UNetDenoiser(unets(kind, 0), alphas)
        prior_denoiser = UNetDenoiser(unets(kind, 1), alphas)
        sigmas = main_denoiser.get_sigmas(20)
        encoded = conds(kind)
        cases[kind] = {
            "same": GCFGDenoiser({"prior": main_denoiser, "main": main_denoiser}, plan, encoded, sigmas),
            "swap": GCFGDenoiser({"prior": prior_denoiser, "main": main_denoiser}, plan, encoded, sigmas),
            "sigma": sigmas[5].reshape(1),
        }
    latent = args.size // 8
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    times: dict[str, dict[str, list[float]]] = {kind: {"same": [], "swap": []} for kind in cases}
    with torch.no_grad():
        for case in cases.values():  # warm-up
            case["same"](x, case["sigma"])
            case["swap"](x, case["sigma"])
        for _ in range(repeats):
            for kind, case in cases.items():
                for name in ("same", "swap"):
                    start = time.perf_counter()
                    case[name](x * case["sigma"], case["sigma"])
                    times[kind][name].append(time.perf_counter() - start)
    result = {"size_px": args.size, "threads": torch.get_num_threads()}
    for kind in cases:
        same, swap = statistics.median(times[kind]["same"]), statistics.median(times[kind]["swap"])
        result[kind] = {"s_per_step_same": round(same, 4), "s_per_step_swap": round(swap, 4),
                        "swap_vs_same": round(swap / same, 3), "rows_per_step": 2,
                        "calls_per_step_same": 1, "calls_per_step_swap": 2}
        print(f"{kind:13s} prior = main {same * 1000:8.1f} ms/step   prior swap {swap * 1000:8.1f} ms/step   "
              f"ratio {swap / same:.2f}")
    base = result["sd1-tiny"]["s_per_step_same"]
    result["sdxl_tiny_vs_sd1_tiny"] = round(result["sdxl-tiny"]["s_per_step_same"] / base, 2)
    result["sdxl_reduced_vs_sd1_tiny"] = round(result["sdxl-reduced"]["s_per_step_same"] / base, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
