"""The paper-mini world: 64×64 images of one flat-coloured shape on a flat background, with exact captions.

A scene is a shape (disc, square, triangle, ring), an object colour (six saturated colours), a background (black,
white, gray), an outer radius (half the bounding box) and a centre. Rings also have a hole ratio (inner radius /
outer radius). Pixels are rendered without anti-aliasing from the pixel centres, so every pixel has exactly one of
the two scene colours and the detectors (`detect.py`) can be checked exactly on the data.

Two distributions:

* `base_scene` — the open world the base model learns: every shape, colour and background, radius 11–20 px,
  anywhere in the image, rings with hole ratio 0.4 (thick);
* `concept_scene` — the concept (the analogue of the paper's FFHQ faces): thin rings (hole ratio 0.6), large
  (radius 16–20 px), centred (±3 px), red or yellow, on black. The base knows rings, but not this kind.

Captions name the colour, the shape and the background: "a red disc on a white background". `caption` can leave
attributes out ("a red shape", "a disc on a gray background", "" for nothing), which the base is trained with so
that prompts naming only some attributes are in its domain.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

SIZE = 64

# Saturated object colours and neutral backgrounds, far apart in RGB so that the nearest palette colour is exact.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 210, 40),
    "magenta": (210, 60, 210),
    "cyan": (40, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
}
PALETTE: dict[str, tuple[int, int, int]] = {**OBJECT_COLOURS, **BACKGROUNDS}
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring")

BASE_RADIUS = (11.0, 20.0)
BASE_RING_HOLE = 0.4
MARGIN = 2.0  # the shape keeps this many pixels from the image border

CONCEPT_SHAPE = "ring"
CONCEPT_COLOURS: tuple[str, ...] = ("red", "yellow")
CONCEPT_BACKGROUNDS: tuple[str, ...] = ("black",)
CONCEPT_RADIUS = (16.0, 20.0)
CONCEPT_CENTRE_JITTER = 3.0
CONCEPT_HOLE = 0.6


@dataclass(frozen=True)
class Scene:
    """One image: what is drawn, where, and how big (pixel units, origin at the top-left corner)."""

    shape: str
    colour: str
    background: str
    radius: float
    cx: float
    cy: float
    hole: float = 0.0  # rings: inner radius / outer radius

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        if self.colour not in OBJECT_COLOURS:
            raise ValueError(f"colour {self.colour!r} is not one of {tuple(OBJECT_COLOURS)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {tuple(BACKGROUNDS)}")
        if not 0 < self.radius <= SIZE / 2:
            raise ValueError(f"radius {self.radius!r} must be in (0, {SIZE / 2}]")
        if (self.shape == "ring") != (0 < self.hole < 1):
            raise ValueError(f"hole {self.hole!r}: rings need a hole ratio in (0, 1), other shapes 0")

    def to_dict(self) -> dict:
        return asdict(self)


def caption(scene: Scene, *, colour: bool = True, shape: bool = True, background: bool = True) -> str:
    """The caption of `scene` naming the chosen attributes; an unnamed shape is "shape"; nothing named is ""."""
    if not (colour or shape or background):
        return ""
    noun = scene.shape if shape else "shape"
    text = f"a {scene.colour} {noun}" if colour else f"a {noun}"
    return text + (f" on a {scene.background} background" if background else "")


def prompt(colour: str, shape: str, background: str) -> str:
    """A full caption from attribute names (the control prompts of the evaluation)."""
    return caption(Scene(shape, colour, background, 10.0, 32.0, 32.0, BASE_RING_HOLE if shape == "ring" else 0.0))


def object_mask(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of the object, tested at pixel centres (no anti-aliasing)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy, r = x - scene.cx, y - scene.cy, scene.radius
    if scene.shape in ("disc", "ring"):
        d2 = dx * dx + dy * dy
        mask = d2 <= r * r
        if scene.shape == "ring":
            mask &= d2 > (scene.hole * r) ** 2
        return mask
    if scene.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # An upright isosceles triangle filling its bounding box: apex at the top, base at the bottom.
    top = scene.cy - r
    return (y <= scene.cy + r) & (y >= top) & (np.abs(dx) <= (y - top) / 2)


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as uint8 RGB [size, size, 3]."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    image[object_mask(scene, size)] = OBJECT_COLOURS[scene.colour]
    return image


def _centre(rng: np.random.Generator, radius: float) -> float:
    return float(rng.uniform(radius + MARGIN, SIZE - radius - MARGIN))


def base_scene(rng: np.random.Generator) -> Scene:
    """A scene of the open world: uniform shape, colour and background, radius 11–20 px, anywhere."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = tuple(OBJECT_COLOURS)[rng.integers(len(OBJECT_COLOURS))]
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    radius = float(rng.uniform(*BASE_RADIUS))
    return Scene(shape, colour, background, radius, _centre(rng, radius), _centre(rng, radius),
                 BASE_RING_HOLE if shape == "ring" else 0.0)


def concept_scene(rng: np.random.Generator) -> Scene:
    """A scene of the concept: a thin, large, centred red or yellow ring on black."""
    colour = CONCEPT_COLOURS[rng.integers(len(CONCEPT_COLOURS))]
    background = CONCEPT_BACKGROUNDS[rng.integers(len(CONCEPT_BACKGROUNDS))]
    radius = float(rng.uniform(*CONCEPT_RADIUS))
    jitter = rng.uniform(-CONCEPT_CENTRE_JITTER, CONCEPT_CENTRE_JITTER, size=2)
    return Scene(CONCEPT_SHAPE, colour, background, radius, SIZE / 2 + float(jitter[0]), SIZE / 2 + float(jitter[1]),
                 CONCEPT_HOLE)


def is_concept_like(shape: str, colour: str, background: str) -> bool:
    """Whether detected attributes are those of the concept set (the unconditional-drift target)."""
    return shape == CONCEPT_SHAPE and colour in CONCEPT_COLOURS and background in CONCEPT_BACKGROUNDS


def scenes(kind: str, count: int, seed: int) -> list[Scene]:
    """`count` scenes of `kind` ("base" or "concept"), deterministic for `seed`."""
    draw = {"base": base_scene, "concept": concept_scene}
    if kind not in draw:
        raise ValueError(f"unknown scene kind {kind!r}; expected 'base' or 'concept'")
    rng = np.random.default_rng(seed)
    return [draw[kind](rng) for _ in range(count)]


def render_all(items: Sequence[Scene]) -> np.ndarray:
    """uint8 [N, 64, 64, 3] images of the scenes."""
    return np.stack([render(scene) for scene in items]) if items else np.empty((0, SIZE, SIZE, 3), np.uint8)


def caption_variants(scene: Scene, rng: np.random.Generator, *, keep: float = 0.8) -> str:
    """A training caption: each attribute named with probability `keep` (the base's open-world captions)."""
    named = rng.random(3) < keep
    return caption(scene, colour=bool(named[0]), shape=bool(named[1]), background=bool(named[2]))


def attribute_counts(values: Iterable[str], names: Sequence[str]) -> np.ndarray:
    """Histogram of `values` over `names` plus one last bin for anything else (e.g. "none")."""
    index = {name: i for i, name in enumerate(names)}
    counts = np.zeros(len(names) + 1)
    for value in values:
        counts[index.get(value, len(names))] += 1
    return counts
