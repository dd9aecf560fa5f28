"""Aspect-ratio buckets: non-square images train at their own shape instead of a centre square.

* **Buckets** (`bucket_sizes`): every width × height whose sides are multiples of 64 (8 latent pixels: the SD
  UNet halves the latent three times), whose area is at most `resolution²` and as close to it as the 64-px grid
  allows (the height is the largest multiple of 64 with width · height ≤ resolution²), and whose long side is at
  most `max_aspect` times the short one. `resolution × resolution` is always one of them. At 512 px and aspect
  ≤ 2 these are 384×640, 448×576, 512×512, 576×448, 640×384 (0.94–1.0 of 512² pixels).
* **Assignment** (`nearest_bucket`): the bucket with the nearest aspect ratio on a log scale (so 2:1 and 1:2
  are equally far from 1:1); ties go to the larger area, then the wider bucket. Square images always land in
  the square bucket, so a square dataset trains exactly as without buckets.
* **Fitting** (`image_geometry`): `center-crop` takes the largest centred region of the image with the bucket's
  aspect ratio and resizes it to the bucket (crops are small: the bucket's aspect is the nearest available);
  `squash` resizes the whole image to the bucket. One LANCZOS resampling either way (trainer.data).
* **Batches** (`BucketBatches`): a batch never mixes buckets. Each epoch permutes each bucket's entries (seeded
  by seed, epoch and bucket), cuts them into batches of `batch_size` — a bucket's last batch is filled up with
  the first entries of the same permutation, so every entry is seen every epoch and small buckets are not
  starved — and shuffles the batches of all buckets together. Optimizer step `s` takes batch `s mod E` of epoch
  `s div E` (E batches per epoch, fixed by the bucket sizes): a pure function of (seed, step), which is what
  exact resume needs. With one bucket it is the plain stream of epoch permutations (trainer.loop.global_batch).

SDXL size and crop conditioning (`ImageGeometry`): `original_size` is the image's (height, width) after EXIF
rotation, `crop_top_left` the (top, left) of the crop in pixels of the image scaled to cover the bucket, and
`target_size` the bucket's (height, width), the three values SDXL's micro-conditioning embeds. For a mirrored
copy, `flipped()` gives the crop's left measured from the other side.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from trainer.config import TrainConfig

BUCKET_STEP = 64  # pixels: 8 latent pixels, the SD 1.x / SDXL UNet's total downsampling of the latent


@dataclass(frozen=True, order=True)
class Bucket:
    """A training size in pixels."""

    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @classmethod
    def parse(cls, name: str) -> Bucket:
        width, height = name.split("x")
        return cls(int(width), int(height))


def square_bucket(resolution: int) -> Bucket:
    return Bucket(resolution, resolution)


def bucket_sizes(resolution: int, max_aspect: float, step: int = BUCKET_STEP) -> tuple[Bucket, ...]:
    """Every bucket for `resolution` and `max_aspect` (module docstring), sorted by width."""
    area = resolution * resolution
    found = {square_bucket(resolution)}
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect + 1e-9:
            found.add(Bucket(width, height))
    return tuple(sorted(found))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest to width/height on a log scale; ties: larger area, then wider."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b.aspect) - target), 12), -b.width * b.height, -b.width))


def assign_buckets(sizes: Sequence[tuple[int, int]], resolution: int, *, enabled: bool,
                   max_aspect: float) -> tuple[Bucket, ...]:
    """The bucket of each image, given its (width, height); without buckets every image is square."""
    if not enabled:
        return tuple(square_bucket(resolution) for _ in sizes)
    buckets = bucket_sizes(resolution, max_aspect)
    return tuple(nearest_bucket(w, h, buckets) for w, h in sizes)


def bucket_histogram(assignment: Sequence[Bucket]) -> dict[str, int]:
    """Images per bucket, `"WxH": count`, largest first (ties by name)."""
    counts = Counter(assignment)
    return {b.name: n for b, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))}


def dominant_bucket(assignment: Sequence[Bucket]) -> Bucket:
    """The bucket with the most images (ties: the one nearest to square, then the larger area)."""
    counts = Counter(assignment)
    return min(counts, key=lambda b: (-counts[b], abs(math.log(b.aspect)), -b.width * b.height, b))


@dataclass(frozen=True)
class ImageGeometry:
    """How one image becomes its training size; pixel boxes in (left, top, right, bottom) of the original."""

    original_size: tuple[int, int]  # (height, width) after EXIF rotation
    crop_top_left: tuple[int, int]  # (top, left) in pixels of the image scaled to cover the target
    target_size: tuple[int, int]  # (height, width) of the bucket
    box: tuple[float, float, float, float]  # the region of the original that is resized to the target

    def flipped(self) -> ImageGeometry:
        """The same for the horizontally mirrored image (the crop's left counted from the other side)."""
        top, left = self.crop_top_left
        height, width = self.original_size
        box_left, box_top, box_right, box_bottom = self.box
        scale = self.target_size[1] / (box_right - box_left)
        scaled_width = round(width * scale)
        return ImageGeometry(self.original_size, (top, scaled_width - self.target_size[1] - left), self.target_size,
                             (width - box_right, box_top, width - box_left, box_bottom))


def image_geometry(width: int, height: int, bucket: Bucket, policy: str) -> ImageGeometry:
    """Crop box and SDXL conditioning of a width × height image trained at `bucket` under `policy`."""
    box = (0.0, 0.0, float(width), float(height))
    if policy == "center-crop":
        if width * bucket.height > height * bucket.width:  # wider than the bucket: crop the sides
            crop_width = height * bucket.width / bucket.height
            left = (width - crop_width) / 2
            box = (left, 0.0, left + crop_width, float(height))
        else:  # taller (or the same): crop top and bottom
            crop_height = width * bucket.height / bucket.width
            top = (height - crop_height) / 2
            box = (0.0, top, float(width), top + crop_height)
    elif policy != "squash":
        raise ValueError(f"resize policy {policy!r} is not 'center-crop' or 'squash'")
    scale_x = bucket.width / (box[2] - box[0])
    scale_y = bucket.height / (box[3] - box[1])
    crop_top_left = (round(box[1] * scale_y), round(box[0] * scale_x))
    return ImageGeometry((height, width), crop_top_left, (bucket.height, bucket.width), box)


def entry_groups(entry_buckets: Sequence[Bucket], entries: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """`entries` grouped by their bucket (`entry_buckets[e]`), groups in bucket order, entries in given order."""
    groups: dict[Bucket, list[int]] = {}
    for entry in entries:
        groups.setdefault(entry_buckets[entry], []).append(entry)
    return tuple(tuple(groups[b]) for b in sorted(groups))


def _permutation(count: int, seed: int) -> list[int]:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def bucket_batches_of_epoch(groups: Sequence[Sequence[int]], batch_size: int, seeds: Mapping[str, int]
                            ) -> list[tuple[int, ...]]:
    """One epoch's batches (module docstring); `seeds` has "order" and one seed per group index (as str)."""
    batches: list[tuple[int, ...]] = []
    for index, group in enumerate(groups):
        order = [group[i] for i in _permutation(len(group), seeds[str(index)])]
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            while len(batch) < batch_size:  # fill the last batch from the start of the same permutation
                batch += order[:batch_size - len(batch)]
            batches.append(tuple(batch))
    return [batches[i] for i in _permutation(len(batches), seeds["order"])]


@dataclass(frozen=True)
class BucketBatches:
    """The endless, seeded stream of single-bucket batches over `groups` (each group: entries of one bucket)."""

    groups: tuple[tuple[int, ...], ...]
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups)

    @functools.lru_cache(maxsize=2)  # noqa: B019 (a handful of small frozen instances per run)
    def epoch(self, epoch: int) -> list[tuple[int, ...]]:
        from trainer.loop import seed_for

        seeds = {str(i): seed_for("bucket", self.seed, epoch, i) for i in range(len(self.groups))}
        seeds["order"] = seed_for("bucket-order", self.seed, epoch)
        return bucket_batches_of_epoch(self.groups, self.batch_size, seeds)

    def batch(self, step: int) -> list[int]:
        """The entries of optimizer step `step`'s global batch."""
        if len(self.groups) == 1:  # one bucket: the plain stream (square datasets train exactly as before)
            from trainer.loop import global_batch

            group = self.groups[0]
            return [group[i] for i in global_batch(len(group), self.seed, step * self.batch_size, self.batch_size)]
        epoch, index = divmod(step, self.batches_per_epoch)
        return list(self.epoch(epoch)[index])


def dataset_buckets(sizes: Sequence[tuple[int, int]], config: TrainConfig) -> tuple[Bucket, ...]:
    """Each image's bucket under `config` (resolution, aspect_buckets, bucket_max_aspect), from (width, height)."""
    return assign_buckets(sizes, config.resolution, enabled=config.aspect_buckets,
                          max_aspect=config.bucket_max_aspect)


def dataset_geometry(sizes: Sequence[tuple[int, int]], config: TrainConfig) -> tuple[ImageGeometry, ...]:
    """Each image's (original size, crop, target size) under `config`: what SDXL's size/crop conditioning needs.

    `sizes` are the scanned (width, height) after EXIF rotation (`DatasetScan.images[i].width/height`), in scan
    order, so index i here is image i of the scan and of the latent cache (entry i; entry N + i is its mirror:
    use `.flipped()`).
    """
    policy = config.resize_policy.value
    return tuple(image_geometry(w, h, bucket, policy) for (w, h), bucket in zip(sizes, dataset_buckets(sizes, config),
                                                                               strict=True))
