"""VAE posterior moments of every training image, computed once and kept on disk in shards.

Layout of a cache folder:

* `manifest.json` — the `CacheKey`, image count, shard size, latent shape, storage dtype, finished shards and
  `complete`. Rewritten atomically after every shard, so an interrupted build resumes at the first unfinished
  shard (at most `SHARD_SIZE` images are encoded again).
* `shard-00000.safetensors`, … — `SHARD_SIZE` images each, tensor `moments` `[n, 8, h, w]` (mean and logvar
  concatenated: ldm's `quant_conv` output, i.e. `DiagonalGaussianDistribution.parameters`), plus
  `moments_flipped` (moments of the horizontally mirrored image) when the key has `flip`.

Storing the moments instead of one latent sample keeps VAE sampling noise fresh at every step, as training on
pixels would (sd-scripts and diffusers cache only one sample or the mean). Storage dtype: float32 by default
(exact; 128 KiB per image at 512 px, 9.2 GB for FFHQ's 70k), float16 halves that; its rounding (~1e-3
relative on the mean) is far below the diffusion noise added at every step, so fp16 is a sound choice
when disk is short.

With flips, the cache has `2 × images` entries: entry `i < N` is image `i`, entry `N + i` its mirror. An epoch
over the entries shows every image once each way.

Aspect-ratio buckets (trainer.buckets): each image is encoded at its own size, given to the build as
`sizes`; `layout.json` records them, and shards hold the images of one size each — the images of each size in
scan order, sizes in sorted order (`shard_layout`). With a single size this is the plain layout above, so a
square dataset's cache looks as it did before buckets.

Masks (masked loss): with `masks` given, each shard also holds `mask` `[n, 1, h, w]`, the image's mask
average-pooled to latent resolution (ones for an image without a mask); a mirrored entry reads it mirrored.

Any change of the key (dataset files, VAE weights, resolution, resize policy, flips, storage dtype) deletes
the old shards and rebuilds; the log says which part changed.

Shards are read through numpy memory maps of the safetensors data (the format is an 8-byte header length,
a JSON header, raw little-endian tensors), so opening a cache costs nothing and the page cache keeps hot rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from gcfg_core.configs import SCALE_FACTOR
from gcfg_core.fileio import atomic_path, atomic_write_text
from trainer.config import ResizePolicy
from trainer.data import DatasetScan, ImageDataset
from trainer.progress import ConsoleProgress

log = logging.getLogger("gcfg.trainer.latent_cache")

CACHE_FORMAT_VERSION = 1
SHARD_SIZE = 256
MANIFEST_NAME = "manifest.json"
LAYOUT_NAME = "layout.json"
LATENT_DOWNSAMPLE = 8  # pixels per latent pixel (every SD VAE)
_STORAGE_DTYPES = {"float32": (torch.float32, np.float32, "F32"), "float16": (torch.float16, np.float16, "F16")}
# ldm's DiagonalGaussianDistribution clamps logvar to this range before sampling; we match it exactly.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


class CacheInterrupted(RuntimeError):
    """The build was asked to stop; finished shards are kept and the next build resumes from them."""


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached moments depend on; any difference means the cache must be rebuilt."""

    dataset_fingerprint: str
    vae_sha256: str
    resolution: int
    resize_policy: str
    flip: bool
    storage_dtype: str = "float32"
    buckets: str = ""  # how image sizes were chosen ("" = every image square at `resolution`; trainer.buckets)
    masks: str = ""  # fingerprint of the loss masks ("" = no masks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize_policy", ResizePolicy(self.resize_policy).value)
        if self.storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={self.storage_dtype!r} is not one of {', '.join(_STORAGE_DTYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differences(self, other: CacheKey) -> list[str]:
        """Human-readable 'field: old → new' for every field that differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} → {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def state_dict_fingerprint(module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted (name, dtype, shape, bytes) of every tensor, e.g. the VAE as used for encoding."""
    state = (module_or_state_dict.state_dict() if isinstance(module_or_state_dict, torch.nn.Module)
             else module_or_state_dict)
    h = hashlib.sha256(b"gcfg-state-dict-v1")
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vae_moments_fn(vae: torch.nn.Module, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An encoder for `build_latent_cache`: images in [-1, 1] → fp32 CPU moments `[B, 8, h, w]` (ldm VAE)."""
    parameter = next(vae.parameters())
    device = parameter.device if device is None else torch.device(device)
    dtype = parameter.dtype if dtype is None else dtype

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return vae.encode(images.to(device=device, dtype=dtype)).parameters.float().cpu()

    return encode


def _shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / f"shard-{shard:05d}.safetensors"


def _read_manifest(cache_dir: Path) -> dict | None:
    try:
        data = json.loads((cache_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("latent cache manifest in %s is unreadable (%s); rebuilding", cache_dir, e)
        return None
    return data if isinstance(data, dict) else None


def _manifest_key(manifest: Mapping) -> CacheKey | None:
    try:
        return CacheKey(**manifest["key"])
    except (KeyError, TypeError, ValueError):
        return None


def _write_manifest(cache_dir: Path, key: CacheKey, num_images: int, latent_shape: Sequence[int] | None,
                    finished: Sequence[int], complete: bool) -> None:
    manifest = {"format_version": CACHE_FORMAT_VERSION, "key": key.to_dict(), "num_images": num_images,
                "shard_size": SHARD_SIZE, "latent_shape": list(latent_shape) if latent_shape else None,
                "finished_shards": sorted(finished), "complete": complete}
    atomic_write_text(cache_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def _clear_cache_dir(cache_dir: Path) -> None:
    """Delete only what a cache build writes (shards, manifest, layout, stray temp files), nothing else."""
    for path in cache_dir.glob("shard-*.safetensors"):
        path.unlink()
    for path in cache_dir.glob(".shard-*.tmp"):
        path.unlink()
    for name in (MANIFEST_NAME, LAYOUT_NAME):
        if (cache_dir / name).exists():
            (cache_dir / name).unlink()


def shard_layout(sizes: Sequence[tuple[int, int]], shard_size: int) -> list[list[int]]:
    """The images of each shard: grouped by size (sizes sorted), scan order within a size, `shard_size` each."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for image, size in enumerate(sizes):
        by_size.setdefault(tuple(size), []).append(image)
    return [images[start:start + shard_size] for size in sorted(by_size) for images in [by_size[size]]
            for start in range(0, len(images), shard_size)]


def _read_sizes(cache_dir: Path, num_images: int, resolution: int) -> list[tuple[int, int]]:
    """Each image's (width, height) from `layout.json`; a cache without one is square at `resolution`."""
    path = cache_dir / LAYOUT_NAME
    if not path.is_file():
        return [(resolution, resolution)] * num_images
    sizes = [tuple(size) for size in json.loads(path.read_text(encoding="utf-8"))["sizes"]]
    if len(sizes) != num_images:
        raise ValueError(f"{path} lists {len(sizes)} images, the manifest {num_images}")
    return sizes


def _memmap_safetensors(path: Path) -> dict[str, np.memmap]:
    """Zero-copy read-only numpy views of every tensor in a safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    np_dtypes = {code: np_dtype for _, np_dtype, code in _STORAGE_DTYPES.values()}
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if start == end:
            arrays[name] = np.zeros(shape, np_dtypes[info["dtype"]])
            continue
        arrays[name] = np.memmap(path, dtype=np_dtypes[info["dtype"]], mode="r", offset=base + start, shape=shape)
    return arrays


class LatentCache:
    """Read access to a finished cache: posterior moments and sampled, scaled latents by entry index."""

    def __init__(self, cache_dir: str | os.PathLike, manifest: Mapping):
        self.cache_dir = Path(cache_dir)
        self.key = CacheKey(**manifest["key"])
        self.num_images: int = manifest["num_images"]
        self.shard_size: int = manifest["shard_size"]
        self.latent_shape: tuple[int, ...] = tuple(manifest["latent_shape"])  # of the first shard
        self.image_sizes: tuple[tuple[int, int], ...] = tuple(_read_sizes(self.cache_dir, self.num_images,
                                                                          self.key.resolution))
        layout = shard_layout(self.image_sizes, self.shard_size)
        self._where = [(0, 0)] * self.num_images  # image -> (shard, row)
        for shard, images in enumerate(layout):
            for row, image in enumerate(images):
                self._where[image] = (shard, row)
        self._shards = [_memmap_safetensors(_shard_path(self.cache_dir, s)) for s in range(len(layout))]

    @property
    def has_masks(self) -> bool:
        return bool(self.key.masks)

    def entry_size(self, index: int) -> tuple[int, int]:
        """(width, height) in pixels of a cache entry's image (its bucket)."""
        return self.image_sizes[self.entry(index)[0]]

    def __len__(self) -> int:
        return self.num_images * (2 if self.key.flip else 1)

    def entry(self, index: int) -> tuple[int, bool]:
        """(image index in the scan, flipped?) of a cache entry."""
        if not 0 <= index < len(self):
            raise IndexError(f"latent cache index {index} out of range [0, {len(self)})")
        return index % self.num_images, index >= self.num_images

    def moments(self, indices: Sequence[int]) -> torch.Tensor:
        """fp32 moments `[B, 2·C, h, w]` (mean, logvar) of the given entries, in order."""
        rows = []
        for index in indices:
            image, flipped = self.entry(int(index))
            shard, row = self._where[image]
            rows.append(self._shards[shard]["moments_flipped" if flipped else "moments"][row])
        self._check_one_size(indices)
        return torch.from_numpy(np.stack(rows).astype(np.float32, copy=False))

    def _check_one_size(self, indices: Sequence[int]) -> None:
        sizes = {self.entry_size(int(i)) for i in indices}
        if len(sizes) > 1:
            raise ValueError(f"latent cache entries {list(indices)} have different sizes "
                             f"({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}); a batch takes one bucket")

    def masks(self, indices: Sequence[int]) -> torch.Tensor | None:
        """fp32 loss masks `[B, 1, h, w]` of the given entries (mirrored for mirrored entries), or None without
        masks."""
        if not self.has_masks:
            return None
        self._check_one_size(indices)
        rows = []
        for index in indices:
            image, flipped = self.entry(int(index))
            shard, row = self._where[image]
            mask = np.asarray(self._shards[shard]["mask"][row], dtype=np.float32)
            rows.append(mask[..., ::-1] if flipped else mask)
        return torch.from_numpy(np.ascontiguousarray(np.stack(rows)))

    def sample_latents(self, indices: Sequence[int], generator: torch.Generator | None = None,
                       device: torch.device | str | None = None, *, scale_factor: float = SCALE_FACTOR) -> torch.Tensor:
        """Scaled latents `(mean + exp(logvar / 2) · n) · scale_factor`, n ~ N(0, 1) drawn from `generator`.

        Same as ldm's `DiagonalGaussianDistribution.sample()` times the model's scale factor (SD 1's 0.18215 by
        default, SDXL's 0.13025; logvar clamped to [-30, 20] as ldm does); a fixed generator state gives
        bit-identical latents, as exact resume needs.
        """
        mean, logvar = self.moments(indices).chunk(2, dim=1)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32).cpu()
        std = torch.exp(0.5 * logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX))
        latents = (mean + std * noise) * scale_factor
        return latents if device is None else latents.to(device)


def open_latent_cache(cache_dir: str | os.PathLike, key: CacheKey) -> LatentCache | None:
    """The finished cache in `cache_dir` if it was built for exactly `key`, else None."""
    cache_dir = Path(cache_dir)
    manifest = _read_manifest(cache_dir)
    if manifest is None or not manifest.get("complete") or manifest.get("format_version") != CACHE_FORMAT_VERSION:
        return None
    if _manifest_key(manifest) != key:
        return None
    try:
        sizes = _read_sizes(cache_dir, manifest["num_images"], key.resolution)
    except (OSError, ValueError, KeyError) as e:
        log.warning("latent cache layout in %s is unreadable (%s); it will be rebuilt", cache_dir, e)
        return None
    num_shards = len(shard_layout(sizes, manifest["shard_size"]))
    missing = [s for s in range(num_shards) if not _shard_path(cache_dir, s).is_file()]
    if missing:
        log.warning("latent cache in %s lacks shard(s) %s; it will be rebuilt", cache_dir, missing)
        return None
    return LatentCache(cache_dir, manifest)


def _resumable_shards(cache_dir: Path, key: CacheKey, num_images: int,
                      sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Finished shards of an earlier build for the same key and sizes; clears the folder otherwise."""
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        _clear_cache_dir(cache_dir)
        return []
    old_key = _manifest_key(manifest)
    if (manifest.get("format_version") != CACHE_FORMAT_VERSION or manifest.get("shard_size") != SHARD_SIZE
            or old_key is None):
        log.info("latent cache in %s has an older layout; rebuilding", cache_dir)
        _clear_cache_dir(cache_dir)
        return []
    if old_key != key:
        log.info("latent cache in %s is stale (%s); deleting it and rebuilding", cache_dir,
                 "; ".join(old_key.differences(key)))
        _clear_cache_dir(cache_dir)
        return []
    if manifest.get("num_images") != num_images:  # same fingerprint implies same count; guard anyway
        _clear_cache_dir(cache_dir)
        return []
    try:
        same_sizes = _read_sizes(cache_dir, num_images, key.resolution) == list(sizes)
    except (OSError, ValueError, KeyError):
        same_sizes = False
    if not same_sizes:  # the key names the bucket settings, so this is a guard too
        _clear_cache_dir(cache_dir)
        return []
    return [s for s in manifest.get("finished_shards", []) if _shard_path(cache_dir, s).is_file()]


def _encode_shard(images: Sequence, key: CacheKey, vae_encode: Callable[[torch.Tensor], torch.Tensor],
                  batch_size: int, num_workers: int, on_batch: Callable[[int], None],
                  should_stop: Callable[[], bool] | None, sizes: Sequence[tuple[int, int]],
                  masks: Sequence[str | None] | None) -> dict[str, torch.Tensor]:
    storage = _STORAGE_DTYPES[key.storage_dtype][0]
    dataset = ImageDataset(images, key.resolution, key.resize_policy, sizes=sizes, masks=masks)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    plain, flipped, pooled_masks = [], [], []
    for batch in loader:
        if should_stop is not None and should_stop():
            raise CacheInterrupted("latent cache build stopped on request; finished shards are kept")
        if masks is not None:
            batch, mask = batch
            pooled_masks.append(torch.nn.functional.avg_pool2d(mask, LATENT_DOWNSAMPLE).to(storage))
        plain.append(vae_encode(batch).float().cpu().to(storage))
        if key.flip:
            flipped.append(vae_encode(torch.flip(batch, dims=[-1])).float().cpu().to(storage))
        on_batch(len(batch))
    tensors = {"moments": torch.cat(plain).contiguous()}
    if key.flip:
        tensors["moments_flipped"] = torch.cat(flipped).contiguous()
    if masks is not None:
        tensors["mask"] = torch.cat(pooled_masks).contiguous()
    return tensors


def build_latent_cache(
    cache_dir: str | os.PathLike,
    scan: DatasetScan,
    key: CacheKey,
    vae_encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    progress_callback: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    masks: Sequence[str | None] | None = None,
) -> LatentCache:
    """Encode every image of `scan` once (reusing a finished or partial cache for the same key) and open it.

    `vae_encode` maps images `[B, 3, H, W]` in [-1, 1] to moments `[B, 8, h, w]` (see `vae_moments_fn`).
    `should_stop` is polled between batches; when it returns True, `CacheInterrupted` is raised.
    `sizes`: each image's (width, height) (its bucket; default `key.resolution`²). `masks`: with `key.masks`,
    each image's mask file or None (alpha channel, else no mask; trainer.data.load_mask).
    """
    if key.dataset_fingerprint != scan.fingerprint:
        raise ValueError(f"CacheKey.dataset_fingerprint={key.dataset_fingerprint!r} does not match "
                         f"the scan's fingerprint {scan.fingerprint!r}")
    if bool(key.masks) != (masks is not None):
        raise ValueError("masks must be given exactly when CacheKey.masks is set")
    sizes = [tuple(s) for s in sizes] if sizes is not None else [(key.resolution, key.resolution)] * len(scan.images)
    if len(sizes) != len(scan.images) or (masks is not None and len(masks) != len(scan.images)):
        raise ValueError(f"sizes/masks must have one entry per image ({len(scan.images)})")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    existing = open_latent_cache(cache_dir, key)
    if existing is not None:
        log.info("latent cache in %s is up to date (%d images)", cache_dir, existing.num_images)
        return existing
    num_images = len(scan.images)
    finished = _resumable_shards(cache_dir, key, num_images, sizes)
    manifest = _read_manifest(cache_dir)
    latent_shape = manifest.get("latent_shape") if manifest and finished else None
    layout = shard_layout(sizes, SHARD_SIZE)
    if any(s != (key.resolution, key.resolution) for s in sizes) and not (cache_dir / LAYOUT_NAME).is_file():
        atomic_write_text(cache_dir / LAYOUT_NAME, json.dumps({"sizes": [list(s) for s in sizes]}) + "\n")
    done = sum(len(layout[s]) for s in finished)
    if finished:
        log.info("resuming latent cache build in %s: %d of %d images already encoded", cache_dir, done, num_images)
    bar = ConsoleProgress(num_images, initial=done, desc="caching latents", unit="images", enabled=progress)
    if progress_callback is not None:
        progress_callback(done, num_images)

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        bar.update(done)
        if progress_callback is not None:
            progress_callback(done, num_images)

    try:
        for shard, members in enumerate(layout):
            if shard in finished:
                continue
            tensors = _encode_shard([scan.images[i] for i in members], key, vae_encode, batch_size, num_workers,
                                    on_batch, should_stop, [sizes[i] for i in members],
                                    None if masks is None else [masks[i] for i in members])
            if shard == 0:
                latent_shape = list(tensors["moments"].shape[1:])
            with atomic_path(_shard_path(cache_dir, shard)) as tmp:
                save_file(tensors, str(tmp), metadata={"first_image": str(members[0])})
            finished.append(shard)
            _write_manifest(cache_dir, key, num_images, latent_shape, finished, complete=False)
    finally:
        bar.close()
    _write_manifest(cache_dir, key, num_images, latent_shape, finished, complete=True)
    cache = open_latent_cache(cache_dir, key)
    assert cache is not None  # just written
    return cache
