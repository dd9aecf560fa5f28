"""TrainConfig: paper defaults, validation messages, JSON round trip, overrides, resume compatibility."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trainer.config import (
    CONFIG_VERSION,
    RESUME_FIXED_REASONS,
    RESUME_MUTABLE_FIELDS,
    ConfigError,
    LRSchedule,
    MixedPrecision,
    Optimizer,
    ResizePolicy,
    TrainConfig,
    check_resume_compatible,
    check_resume_length,
    config_fields,
    folder_problem,
)

REQUIRED = dict(dataset_dir="data", base_checkpoint="sd15.safetensors", job_dir="jobs/faces", name="faces")


def make(**kw) -> TrainConfig:
    return TrainConfig(**{**REQUIRED, **kw})


def test_defaults_follow_the_paper():
    c = make()
    assert (c.optimizer, c.learning_rate, c.batch_size, c.resolution) == (Optimizer.ADAMW, 1e-5, 32, 512)
    assert c.resize_policy is ResizePolicy.CENTER_CROP and c.mixed_precision is MixedPrecision.BF16
    assert c.preview_concept_weight == 2.5 and c.preview_steps == 25
    assert c.gradient_accumulation(1) == 8 and c.gradient_accumulation(2) == 4 and c.gradient_accumulation(8) == 1


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(batch_size=30), "batch_size=30 is not a multiple of micro_batch_size × processes = 4 × 1; "
                          "use e.g. batch_size=32"),
    (dict(resolution=500), "resolution=500 must be a multiple of 64"),
    (dict(learning_rate=0.0), "learning_rate=0.0 must be in (0, 1]"),
    (dict(learning_rate=float("nan")), "learning_rate=nan must be in (0, 1]"),
    (dict(ema_decay=1.0), "ema_decay=1.0 must be 0 (off) or in (0, 1)"),
    (dict(warmup_steps=20, max_steps=10), "warmup_steps=20 must be in [0, max_steps=10]"),
    (dict(keep_last=0), "keep_last=0 must be ≥ 1"),
    (dict(name="../evil"), "name='../evil' must be 1-100 letters"),
    (dict(device="gpu"), "device='gpu' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (dict(resize_policy="crop"), "resize_policy='crop' is not one of 'center-crop', 'squash'"),
    (dict(optimizer="sgd"), "optimizer='sgd' is not one of 'adamw', 'adamw8bit'"),
    (dict(micro_batch_size="4"), "micro_batch_size='4' must be an integer"),
    (dict(flip=1), "flip=1 must be true or false"),
    (dict(preview_seeds=[0, -1]), "preview_seeds=[0, -1] must all be in [0, 4294967295]"),
    (dict(preview_seeds=[]), "preview_seeds=[] must not be empty while previews are on"),
    (dict(preview_prompts=["a cat", " "]), "preview_prompts=['a cat', ' '] must not contain empty prompts"),
    (dict(preview_prompts="a cat"), "preview_prompts='a cat' must be a list"),
    (dict(dataset_dir=""), "dataset_dir='' must not be empty"),
])
def test_bad_values_are_rejected_with_a_message_naming_them(overrides, message):
    with pytest.raises(ConfigError) as info:
        make(**overrides)
    assert message in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        make(resolution=100, keep_last=-1, optimizer="x", flip="yes")
    assert len(info.value.problems) == 2  # type errors first: range checks need well-typed values
    with pytest.raises(ConfigError) as info:
        make(resolution=100, keep_last=-1)
    assert [p.split("=")[0] for p in info.value.problems] == ["resolution", "keep_last"]


def test_gradient_accumulation_names_the_process_split():
    with pytest.raises(ConfigError, match=r"batch_size=32 is not a multiple of micro_batch_size × processes = 4 × 3"):
        make().gradient_accumulation(3)


def test_validate_checks_paths_and_processes(tmp_path):
    c = make(dataset_dir=str(tmp_path / "missing"), base_checkpoint=str(tmp_path / "no.safetensors"),
             job_dir=str(tmp_path / "job"))
    with pytest.raises(ConfigError) as info:
        c.validate()
    assert "dataset_dir=" in str(info.value) and "is not an existing folder" in str(info.value)
    assert "base_checkpoint=" in str(info.value) and "is not an existing file" in str(info.value)
    c.validate(check_paths=False)
    (tmp_path / "missing").mkdir()
    (tmp_path / "no.safetensors").write_bytes(b"x")
    c.validate()
    with pytest.raises(ConfigError, match="× 3"):
        c.validate(num_processes=3)


def test_json_round_trip_and_file_format(tmp_path):
    c = make(preview_prompts=("a photo", "a painting"), preview_seeds=(5,), lr_schedule="cosine", flip=True)
    assert c.lr_schedule is LRSchedule.COSINE and c.preview_seeds == (5,)
    path = tmp_path / "config.json"
    c.save(path)
    data = json.loads(path.read_text())
    assert data["config_version"] == CONFIG_VERSION
    assert data["lr_schedule"] == "cosine" and data["preview_prompts"] == ["a photo", "a painting"]
    assert TrainConfig.load(path) == c
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert not list(tmp_path.glob(".*.tmp"))


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match="unknown config key\\(s\\): lr, steps"):
        TrainConfig.from_dict({**make().to_dict(), "lr": 1, "steps": 2})
    data = make().to_dict()
    del data["name"], data["job_dir"]
    with pytest.raises(ConfigError, match="missing required config key\\(s\\): job_dir, name"):
        TrainConfig.from_dict(data)
    with pytest.raises(ConfigError, match="config_version=99"):
        TrainConfig.from_dict({**make().to_dict(), "config_version": 99})
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json("{")


def test_missing_optional_keys_take_defaults():
    assert TrainConfig.from_dict(REQUIRED) == make()


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.json"):
        TrainConfig.load(tmp_path / "nope.json")


def test_with_overrides_validates_and_ignores_none():
    c = make()
    assert c.with_overrides(learning_rate=2e-5, max_steps=None).learning_rate == 2e-5
    assert c.with_overrides(max_steps=None) == c
    with pytest.raises(ConfigError, match="unknown config key\\(s\\): lr"):
        c.with_overrides(lr=1e-4)
    with pytest.raises(ConfigError, match="batch_size=33"):
        c.with_overrides(batch_size=33)
    assert c.with_overrides(resize_policy="squash").resize_policy is ResizePolicy.SQUASH


def test_resume_allows_lr_and_cadence_changes_but_not_the_run_definition():
    old = make()
    check_resume_compatible(old, old.with_overrides(learning_rate=3e-6, max_steps=20000, lr_schedule="cosine",
                                                    micro_batch_size=2, checkpoint_every_steps=100))
    with pytest.raises(ConfigError) as info:
        check_resume_compatible(old, old.with_overrides(resolution=768, seed=1, learning_rate=1e-6))
    problems = info.value.problems
    assert problems[0] == ("resolution cannot change on resume (was 512, now 768): the latent cache was built "
                           "with it; start a new job to change it")
    assert problems[1].startswith("seed cannot change on resume (was 0, now 1): the data order and every step's "
                                  "noise follow from it")
    assert "learning_rate" in problems[-1] and len(problems) == 3


def test_every_fixed_field_has_a_reason():
    fixed = {f.name for f in dataclasses.fields(TrainConfig)} - RESUME_MUTABLE_FIELDS
    assert fixed == set(RESUME_FIXED_REASONS)


def test_resume_length_must_reach_the_current_step():
    check_resume_length(make(max_steps=20), 20)
    with pytest.raises(ConfigError, match=r"^max_steps=10 is below this job's current step 20: .*max_steps=20 or more"):
        check_resume_length(make(max_steps=10), 20)


def test_a_broken_config_file_is_named(tmp_path):
    broken = tmp_path / "my.json"
    broken.write_text('{"name": ')
    with pytest.raises(ConfigError, match=rf"^config file '{broken}': config is not valid JSON"):
        TrainConfig.load(broken)
    broken.write_text(json.dumps({**REQUIRED, "learning_rate": 5}))
    with pytest.raises(ConfigError) as info:
        TrainConfig.load(broken)
    assert info.value.problems[0] == f"config file '{broken}' has bad values"
    assert info.value.problems[1].startswith("learning_rate=5.0 must be in (0, 1]")


def test_job_dir_problems_are_found_without_creating_anything(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert folder_problem(a_file) == "exists and is not a folder"
    assert folder_problem(a_file / "job") == f"cannot be created: '{a_file}' is not a folder"
    assert folder_problem(tmp_path / "new" / "job") is None and not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match=r"job_dir='.*/file/job' cannot be created: .* is not a folder"):
        make(job_dir=str(a_file / "job"), dataset_dir=str(tmp_path), base_checkpoint=str(a_file)).validate()


def test_resume_mutable_fields_exist_and_exclude_run_defining_ones():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names >= RESUME_MUTABLE_FIELDS
    for fixed in ("resolution", "dataset_dir", "base_checkpoint", "seed", "batch_size", "flip", "optimizer",
                  "resize_policy", "mixed_precision", "ema_decay"):
        assert fixed not in RESUME_MUTABLE_FIELDS


def test_config_fields_describe_every_field():
    specs = {s.name: s for s in config_fields()}
    assert list(specs) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(s.help for s in specs.values())
    assert specs["optimizer"].choices == ("adamw", "adamw8bit") and specs["optimizer"].default is Optimizer.ADAMW
    assert specs["name"].required and not specs["resolution"].required
    assert specs["learning_rate"].resume_mutable and not specs["seed"].resume_mutable


@pytest.mark.parametrize("name", ["faces\n", ".hidden", "a/b", "", "x" * 101, "a b"])
def test_job_name_must_be_a_plain_file_name(name):
    with pytest.raises(ConfigError, match="name"):
        make(name=name)
