"""Attribute detectors for paper-mini images (generated or not), and the concept-fidelity distance.

`read_image` recovers a scene from pixels alone:

1. background: the median colour of the 2-pixel frame, named by the nearest palette colour;
2. object pixels: first those more than `OBJECT_DISTANCE` from that background colour; their median colour names
   the object colour; then every pixel nearer to that median than to the background (the midpoint rule keeps the
   area of a blurred edge unbiased), largest 8-connected component only;
3. form: the object's bounding box gives the outer radius and the centre; the holes (mask pixels that
   `binary_fill_holes` adds) give the hole fraction; the filled area over the box area gives the fill
   (square 1, disc and ring π/4, triangle 1/2); the shape is a ring when there is a hole, else the nearest fill.

On dataset images every pixel is exactly one of two palette colours, so the readings are exact up to pixelation;
`tests/test_paper_mini.py` and the `detectors` stage check that on rendered scenes.

Concept fidelity (the analogue of FID): the Fréchet distance between Gaussians fitted to the form features
(radius, centre x, centre y, hole fraction, fill) of two image sets, each feature divided by its spread over the
open-world dataset, so that one unit is "as different as two typical images of the base world". It is colour-free
on purpose: the control prompts change the colours, and what the concept must keep is its form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import linalg, ndimage

from paper_mini.world import BACKGROUNDS, OBJECT_COLOURS, PALETTE, SIZE

OBJECT_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is a candidate object pixel
MIN_OBJECT_PIXELS = 24  # fewer object pixels than this is "no object"
HOLE_MIN = 0.05  # hole fraction above which the shape is a ring (thick base rings have 0.16, concept rings 0.36)
FILL_SQUARE_DISC = (1.0 + np.pi / 4) / 2  # midpoints between the ideal fills 1, π/4 and 1/2
FILL_DISC_TRIANGLE = (np.pi / 4 + 0.5) / 2
FRAME = 2
NONE = "none"

_NAMES = tuple(PALETTE)
_RGB = np.array([PALETTE[name] for name in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Reading:
    """What the detector sees in one image."""

    shape: str
    colour: str
    background: str
    radius: float = 0.0
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    hole: float = 0.0  # hole area / filled outer area: (inner / outer radius)² for a ring
    fill: float = 0.0  # filled outer area / bounding-box area
    pixels: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def features(self) -> np.ndarray:
        """The form features of the fidelity distance: radius, centre x, centre y, hole fraction, fill."""
        return np.array([self.radius, self.cx, self.cy, self.hole, self.fill], dtype=np.float64)


FEATURE_NAMES = ("radius", "cx", "cy", "hole", "fill")


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name nearest to one RGB colour (Euclidean in RGB)."""
    return _NAMES[int(np.argmin(((_RGB - np.asarray(rgb, np.float64)) ** 2).sum(axis=1)))]


def _frame(image: np.ndarray) -> np.ndarray:
    frame = np.ones(image.shape[:2], dtype=bool)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    return image[frame]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def classify_form(hole: float, fill: float) -> str:
    """Ring if there is a hole, else the shape whose ideal fill (square 1, disc π/4, triangle 1/2) is nearest."""
    if hole > HOLE_MIN:
        return "ring"
    if fill > FILL_SQUARE_DISC:
        return "square"
    return "disc" if fill > FILL_DISC_TRIANGLE else "triangle"


def read_image(image: np.ndarray) -> Reading:
    """Read shape, colours and form of one uint8 RGB [64, 64, 3] image."""
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected a {SIZE}x{SIZE} RGB image, got shape {image.shape}")
    pixels = image.astype(np.float64)
    background_rgb = np.median(_frame(pixels), axis=0)
    background = nearest_colour(background_rgb)
    to_background = np.linalg.norm(pixels - background_rgb, axis=-1)
    candidates = to_background > OBJECT_DISTANCE
    if candidates.sum() < MIN_OBJECT_PIXELS:
        return Reading(NONE, NONE, background)
    object_rgb = np.median(pixels[candidates], axis=0)
    colour = nearest_colour(object_rgb)
    mask = _largest_component(np.linalg.norm(pixels - object_rgb, axis=-1) < to_background)
    count = int(mask.sum())
    if count < MIN_OBJECT_PIXELS:
        return Reading(NONE, colour, background, pixels=count)
    filled = ndimage.binary_fill_holes(mask)
    rows, cols = np.flatnonzero(filled.any(axis=1)), np.flatnonzero(filled.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    area = float(filled.sum())
    hole = (area - count) / area
    fill = area / float(height * width)
    return Reading(classify_form(hole, fill), colour, background, radius=(height + width) / 4,
                   cx=(cols[0] + cols[-1] + 1) / 2, cy=(rows[0] + rows[-1] + 1) / 2, hole=hole, fill=fill,
                   pixels=count)


def read_images(images: np.ndarray) -> list[Reading]:
    """`read_image` over uint8 [N, 64, 64, 3]."""
    return [read_image(image) for image in images]


def is_object_colour(name: str) -> bool:
    return name in OBJECT_COLOURS


def is_background(name: str) -> bool:
    return name in BACKGROUNDS


# ----------------------------------------------------------------------------------------------------------------
# fidelity


@dataclass(frozen=True)
class FeatureScale:
    """Per-feature spread used to make the form features unit-free (the open world's standard deviations)."""

    std: tuple[float, ...]

    @classmethod
    def from_readings(cls, readings: Sequence[Reading]) -> FeatureScale:
        values = np.stack([reading.features() for reading in readings])
        return cls(tuple(float(s) for s in np.maximum(values.std(axis=0), 1e-6)))

    def apply(self, readings: Sequence[Reading]) -> np.ndarray:
        return np.stack([reading.features() for reading in readings]) / np.asarray(self.std)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(Σa Σb)^½) between Gaussians fitted to the rows of `a` and `b` (FID's formula)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [N ≥ 2, D] feature sets of equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def concept_fidelity(readings: Sequence[Reading], concept_readings: Sequence[Reading], scale: FeatureScale) -> float:
    """Fréchet distance of the scaled form features of generated images to those of the concept set (lower = closer)."""
    return frechet_distance(scale.apply(readings), scale.apply(concept_readings))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """½ Σ |p − q| between two histograms (normalised here)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())
