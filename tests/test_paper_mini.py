"""The paper-mini world generator and its attribute detectors (tests/benchmarks/paper_mini); fast, no models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))

from paper_mini import detect, world  # noqa: E402


def test_captions_name_the_attributes():
    scene = world.Scene("disc", "red", "white", 12.0, 30.0, 30.0)
    assert world.caption(scene) == "a red disc on a white background"
    assert world.caption(scene, colour=False) == "a disc on a white background"
    assert world.caption(scene, shape=False, background=False) == "a red shape"
    assert world.caption(scene, colour=False, shape=False, background=False) == ""
    assert world.prompt("blue", "ring", "gray") == "a blue ring on a gray background"


def test_render_paints_exactly_the_shape_area():
    # Independent area formulas: a disc covers about πr², a square (2r)², an upright triangle half its box.
    for shape, area in (("disc", np.pi * 15**2), ("square", 30.0**2), ("triangle", 30.0**2 / 2),
                        ("ring", np.pi * 15**2 * (1 - 0.5**2))):
        scene = world.Scene(shape, "green", "black", 15.0, 32.0, 32.0, 0.5 if shape == "ring" else 0.0)
        image = world.render(scene)
        painted = (image == world.OBJECT_COLOURS["green"]).all(axis=-1).sum()
        assert abs(painted - area) / area < 0.04, (shape, painted, area)
        assert ((image == world.OBJECT_COLOURS["green"]).all(axis=-1)
                | (image == world.BACKGROUNDS["black"]).all(axis=-1)).all()


def test_scene_distributions_are_seeded_and_within_bounds():
    assert world.scenes("base", 50, 7) == world.scenes("base", 50, 7)
    assert world.scenes("base", 50, 7) != world.scenes("base", 50, 8)
    for scene in world.scenes("base", 300, 0):
        assert world.MARGIN <= scene.cx - scene.radius and scene.cx + scene.radius <= world.SIZE - world.MARGIN
        assert world.BASE_RADIUS[0] <= scene.radius <= world.BASE_RADIUS[1]
    concept = world.scenes("concept", 300, 0)
    assert {s.shape for s in concept} == {"ring"} and {s.background for s in concept} == {"black"}
    assert {s.colour for s in concept} == set(world.CONCEPT_COLOURS)
    assert all(abs(s.cx - 32) <= world.CONCEPT_CENTRE_JITTER and s.hole == world.CONCEPT_HOLE for s in concept)
    with pytest.raises(ValueError, match="shape 'star'"):
        world.Scene("star", "red", "black", 10.0, 32.0, 32.0)


@pytest.mark.parametrize("kind", ["base", "concept"])
def test_detectors_read_dataset_images_exactly(kind):
    scenes = world.scenes(kind, 400, 11)
    readings = detect.read_images(world.render_all(scenes))
    for reading, scene in zip(readings, scenes, strict=True):
        assert (reading.shape, reading.colour, reading.background) == (scene.shape, scene.colour, scene.background)
        assert abs(reading.radius - scene.radius) <= 1.0 and abs(reading.cx - scene.cx) <= 0.6
        if scene.shape == "ring":
            assert abs(reading.hole - scene.hole**2) < 0.02  # hole area / outer area = (r / R)²


def test_detector_sees_no_object_on_a_blank_image_and_survives_noise():
    blank = np.full((64, 64, 3), world.BACKGROUNDS["gray"], dtype=np.uint8)
    assert detect.read_image(blank).shape == "none" and detect.read_image(blank).background == "gray"
    scene = world.Scene("triangle", "cyan", "white", 16.0, 30.0, 34.0)
    rng = np.random.default_rng(0)
    noisy = np.clip(world.render(scene) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    reading = detect.read_image(noisy)
    assert (reading.shape, reading.colour, reading.background) == ("triangle", "cyan", "white")


def test_frechet_distance_matches_the_closed_form_and_orders_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 1))
    b = rng.normal(3, 2, (4000, 1))
    # 1-D Gaussians: (μa − μb)² + (σa − σb)².
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert detect.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert detect.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    concept = detect.read_images(world.render_all(world.scenes("concept", 200, 1)))
    close = detect.read_images(world.render_all(world.scenes("concept", 200, 2)))
    far = detect.read_images(world.render_all(world.scenes("base", 200, 2)))
    scale = detect.FeatureScale.from_readings(far)
    assert detect.concept_fidelity(close, concept, scale) < 0.1 * detect.concept_fidelity(far, concept, scale)


def test_total_variation():
    assert detect.total_variation([1, 0], [0, 1]) == 1.0
    assert detect.total_variation([2, 2], [1, 1]) == 0.0
    assert detect.total_variation([3, 1], [1, 1]) == pytest.approx(0.25)


def test_a_change_upstream_reruns_every_stage_that_reads_it():
    """A longer base invalidates the stages built on it (their cache markers), and nothing before it."""
    import dataclasses

    from paper_mini import run

    plan = run.Plan()
    longer = dataclasses.replace(plan, base=dataclasses.replace(plan.base, steps=plan.base.steps + 1))
    changed = {name for name in run.STAGES if run.stage_settings(name, plan) != run.stage_settings(name, longer)}
    assert changed == {"base", "finetune", "dreambooth", "concept", "table", "sweep", "docs"}
    more_decoder = dataclasses.replace(plan, decoder=dataclasses.replace(plan.decoder, steps=plan.decoder.steps + 1))
    changed = {name for name in run.STAGES
               if run.stage_settings(name, plan) != run.stage_settings(name, more_decoder)}
    assert changed == {"decoder", "table", "sweep", "docs"}


def test_a_finished_stage_is_skipped_also_when_its_settings_hold_tuples(tmp_path):
    """The marker is JSON (tuples come back as lists): a rerun with the same settings must still skip the stage."""
    from paper_mini.stages import run_stage

    runs = []

    def body():
        runs.append(1)
        return {"value": len(runs)}

    assert run_stage(tmp_path, "stage", {"snapshots": (20, 40)}, body) == {"value": 1}
    assert run_stage(tmp_path, "stage", {"snapshots": (20, 40)}, body) == {"value": 1}
    assert run_stage(tmp_path, "stage", {"snapshots": (20, 40, 60)}, body) == {"value": 2}
    assert len(runs) == 2
