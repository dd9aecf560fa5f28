"""Runs kohya sd-scripts' `fine_tune.py` in this process and writes its per-step times and resident-set peak.

Started by `bench_train.py --kohya DIR` with the Python of that checkout's environment (it imports only sd-scripts,
its dependencies and the standard library, never this project):

    python kohya_driver.py KOHYA_DIR OUT.json -- <fine_tune.py arguments>

Each optimizer step (accelerate's `AcceleratedOptimizer.step`, which fine_tune.py calls once per step) records
`time.perf_counter()` and the process's peak resident set so far; the model saved at the end of training is
skipped (nothing of it is measured, and it would write gigabytes).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    kohya_dir, out_path, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: kohya_driver.py KOHYA_DIR OUT.json -- ARGS"
    sys.path.insert(0, kohya_dir)
    import accelerate.optimizer
    import fine_tune
    from library import train_util

    times: list[float] = []
    peaks: list[int] = []
    original_step = accelerate.optimizer.AcceleratedOptimizer.step

    def timed_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        times.append(time.perf_counter())
        peaks.append(peak_rss_bytes())
        return result

    accelerate.optimizer.AcceleratedOptimizer.step = timed_step
    train_util.save_sd_model_on_train_end = lambda *args, **kwargs: None

    parser = fine_tune.setup_parser()
    args = parser.parse_args(argv)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    fine_tune.train(args)
    Path(out_path).write_text(json.dumps({"step_times": times, "peak_rss_bytes": peaks}))


if __name__ == "__main__":
    main()
