"""The training benchmark's bookkeeping (not its timings): interleaved repetitions, min and median, their ratios."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repetitions_interleave_in_alternating_order(bench):
    calls = []

    def measure(name, values):
        values = iter(values)

        def call() -> float:
            calls.append(name)
            return next(values)
        return call

    samples = bench.interleaved({"ours": measure("ours", [1.0, 2.0, 3.0, 4.0]),
                                 "reference": measure("reference", [5.0, 6.0, 7.0, 8.0])}, 4)
    assert calls == ["ours", "reference", "reference", "ours", "ours", "reference", "reference", "ours"]
    assert samples == {"ours": [1.0, 2.0, 3.0, 4.0], "reference": [5.0, 6.0, 7.0, 8.0]}


def test_min_median_and_speedups_survive_a_noisy_repetition(bench):
    # one repetition of ours ran while the machine was busy (5.0 s/image): min and median ignore it
    ours, reference = [1.0, 5.0, 1.2], [2.0, 2.4, 9.0]
    assert bench.summary(ours) == {"min": 1.0, "median": 1.2}
    ratio = bench.speedups(ours, reference)
    assert ratio["min"] == pytest.approx(2.0 / 1.0) and ratio["median"] == pytest.approx(2.4 / 1.2)


def test_images_per_second_counts_the_steps_after_the_warmup(bench):
    # step ends at 10, 20 (warm-up), then 21, 22, 23: 3 steps of batch 2 in 3 s
    assert bench.images_per_second([10.0, 20.0, 21.0, 22.0, 23.0], warmup=2, batch=2) == pytest.approx(2.0)


def test_kohya_run_uses_the_settings_of_ours(bench, tmp_path):
    args = bench.kohya_fine_tune_args(tmp_path / "m.safetensors", tmp_path / "d", tmp_path / "m.json", tmp_path / "o",
                                      resolution=128, batch=2, steps=6, learning_rate=1e-5, setting="fp32-adamw")
    flags = dict(zip(args[::2], args[1::2], strict=False))
    assert {"--gradient_checkpointing", "--sdpa", "--cache_latents"} <= set(args)
    assert args[args.index("--resolution") + 1] == "128,128" and args[args.index("--train_batch_size") + 1] == "2"
    assert args[args.index("--mixed_precision") + 1] == "no" and args[args.index("--optimizer_type") + 1] == "AdamW"
    assert flags["--pretrained_model_name_or_path"] == str(tmp_path / "m.safetensors")
    ours, _ = bench.KOHYA_SETTINGS["fp32-adamw"]
    assert (ours["mixed_precision"], ours["optimizer"], ours["weight_dtype"]) == ("no", "adamw", "fp32")
    bf16 = bench.kohya_fine_tune_args(tmp_path, tmp_path, tmp_path, tmp_path, resolution=128, batch=2, steps=6,
                                      learning_rate=1e-5, setting="bf16-adafactor")
    assert "--full_bf16" in bf16 and bf16[bf16.index("--optimizer_type") + 1] == "Adafactor"


def test_kohya_metadata_keys_are_the_image_files_relative_to_their_folder(bench, tmp_path):
    for name in ("b.png", "a.png"):
        (tmp_path / name).write_bytes(b"")
    metadata = bench.kohya_metadata(tmp_path)
    assert list(metadata) == ["a.png", "b.png"] and metadata["a.png"] == {"caption": ""}
    assert all((tmp_path / key).is_file() for key in metadata)  # sd-scripts opens image_dir / key
