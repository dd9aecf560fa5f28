"""Training images: scan a folder, reject what cannot be used (reported, never fatal), load to a square tensor.

Policies (documented once, here):

* **Files.** Every file under the folder, recursively, whose extension is in `IMAGE_EXTENSIONS`
  (case-insensitive). Hidden folders and hidden files (name starting with '.', e.g. `.cache/`, macOS `._x.jpg`)
  are not visited. Other files (captions, `.txt`) are ignored: the concept UNet is trained without text.
  Order is the sorted relative POSIX path, so two scans of the same folder agree on every index.
* **Bad files.** Zero-byte, truncated, corrupt, not-an-image or decompression-bomb files are listed in
  `DatasetScan.skipped` with the reason and left out; a scan only fails when the folder is missing or has no
  usable image at all.
* **Minimum size.** An image whose short side (after EXIF rotation) is below `min_image_size` is skipped and
  reported, so no image is upscaled more than `resolution / min_image_size` (2× at the defaults 512 / 256).
* **Colour.** EXIF orientation is applied. Transparent images (RGBA, LA, palette with transparency) are
  composited on **white**, the usual background of cut-out product and portrait images; compositing on black
  would teach the model dark halos. Greyscale, palette, CMYK and bilevel images become RGB; 16-bit greyscale is
  scaled (not clipped) to 8 bits.
* **Resize** (`ResizePolicy`), one LANCZOS resampling from the original pixels (antialiased when shrinking):
  square images are resized under every policy; non-square images are either centre-cropped to their
  largest central square (`center-crop`, default) or resized to a square without cropping (`squash`, what the
  paper does for its square FFHQ/AFHQ data, distorts non-square images). With aspect-ratio buckets
  (trainer.buckets, on by default) the target is the image's bucket instead of the square, under the same
  two policies.
* **Masks** (masked loss, optional): a same-named file (any image extension) in the mask folder, else the
  image's alpha channel, else none (every pixel counts). A mask is greyscale, 0 = ignore … 255 = full weight,
  of any size (it is mapped onto the image's box); it is cropped and resized exactly like its image.
* **Fingerprint.** sha256 over the sorted (relative path, size in bytes, mtime in ns) of the usable images.
  It identifies the file set, not the training settings: the latent cache key adds resolution, resize policy,
  flips and the VAE. Copying a dataset elsewhere keeps relative paths and sizes but may change mtimes, which
  then (correctly, if cautiously) rebuilds the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from gcfg_core.conditioning import SizeConditioning
from trainer.config import ResizePolicy

log = logging.getLogger("gcfg.trainer.data")

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
FINGERPRINT_VERSION = "gcfg-dataset-v1"
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90° or 270°


class DatasetError(ValueError):
    """The dataset folder is missing or holds no usable image."""


class ImageLoadError(ValueError):
    """An image that passed the scan can no longer be read (changed or removed since)."""


@dataclass(frozen=True)
class ImageRecord:
    """A usable image; `width`/`height` are after EXIF rotation."""

    path: str
    width: int
    height: int
    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class DatasetScan:
    """Usable images in deterministic order, skipped files with reasons, and the file-set fingerprint."""

    images: tuple[ImageRecord, ...]
    skipped: tuple[SkippedFile, ...]
    fingerprint: str
    root: str = ""

    def summary(self) -> str:
        return f"{len(self.images)} usable image(s) in {self.root!r}, {len(self.skipped)} skipped"

    def skipped_report(self) -> str:
        """One line per skipped file, `path<TAB>reason`, for the job log or a file beside it."""
        return "".join(f"{s.path}\t{s.reason}\n" for s in self.skipped)

    def to_json(self) -> str:
        return json.dumps({"root": self.root, "fingerprint": self.fingerprint,
                           "images": [asdict(r) for r in self.images],
                           "skipped": [asdict(s) for s in self.skipped]})

    @classmethod
    def from_json(cls, text: str) -> DatasetScan:
        data = json.loads(text)
        return cls(tuple(ImageRecord(**r) for r in data["images"]), tuple(SkippedFile(**s) for s in data["skipped"]),
                   data["fingerprint"], data.get("root", ""))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_image_files(folder: Path) -> list[Path]:
    """Image-extension files under `folder`, recursively, hidden entries excluded, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]  # prune: os.walk honours in-place edits
        for name in filenames:
            if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def dataset_fingerprint(root: Path | str, images: Sequence[ImageRecord]) -> str:
    """sha256 of the sorted (relative path, size, mtime_ns) triples of `images`."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for rel, size, mtime in sorted((Path(r.path).relative_to(root).as_posix(), r.size_bytes, r.mtime_ns)
                                   for r in images):
        h.update(f"\0{rel}\0{size}\0{mtime}".encode())
    return h.hexdigest()


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    w, h = img.size
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def _check_file(path: Path, min_image_size: int, verify: bool) -> ImageRecord | SkippedFile:
    """Open (and with `verify`, fully decode) one file; a record if usable, else the reason it is not."""
    try:
        st = path.stat()
        if st.st_size == 0:
            return SkippedFile(str(path), "empty file (0 bytes)")
        with Image.open(path) as img:
            width, height = _oriented_size(img)
            if verify:
                img.load()  # full decode: catches truncated and corrupt data that the header alone does not show
    except Image.DecompressionBombError as e:
        return SkippedFile(str(path), f"too many pixels (decompression-bomb guard): {e}")
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # UnidentifiedImageError is an OSError
        return SkippedFile(str(path), f"unreadable image: {type(e).__name__}: {e}")
    if min(width, height) < min_image_size:
        return SkippedFile(str(path), f"too small: {width}×{height} px, short side < min_image_size={min_image_size}")
    return ImageRecord(str(path), width, height, st.st_size, st.st_mtime_ns)


def scan_dataset(
    folder: str | os.PathLike,
    *,
    min_image_size: int,
    verify: bool = True,
    previous: DatasetScan | None = None,
    workers: int | None = None,
    progress_callback: Callable[[int, int], None] | None = None,
) -> DatasetScan:
    """List the usable images of `folder` and the skipped files with reasons (see the module docstring).

    `previous`: an earlier scan of the same folder; files whose size and mtime are unchanged reuse its record
    instead of being decoded again (a resume over 70k images then takes seconds). Decoding runs in `workers`
    threads (PIL releases the GIL while decoding).
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(folder)!r} does not exist or is not a folder")
    files = list_image_files(root)
    known = {(r.path, r.size_bytes, r.mtime_ns): r for r in previous.images} if previous else {}

    def check(path: Path) -> ImageRecord | SkippedFile:
        try:
            st = path.stat()
        except OSError as e:
            return SkippedFile(str(path), f"cannot stat: {e}")
        reused = known.get((str(path), st.st_size, st.st_mtime_ns))
        if reused is not None and min(reused.width, reused.height) >= min_image_size:
            return reused
        return _check_file(path, min_image_size, verify)

    results: list[ImageRecord | SkippedFile] = []
    n_workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        for i, result in enumerate(pool.map(check, files), start=1):
            results.append(result)
            if progress_callback is not None:
                progress_callback(i, len(files))
    images = tuple(r for r in results if isinstance(r, ImageRecord))
    skipped = tuple(r for r in results if isinstance(r, SkippedFile))
    for s in skipped:
        log.warning("skipping %s: %s", s.path, s.reason)
    if not images:
        detail = f"; {len(skipped)} skipped, e.g. {skipped[0].path}: {skipped[0].reason}" if skipped else ""
        raise DatasetError(f"dataset folder {str(folder)!r} has no usable image "
                           f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))}){detail}")
    scan = DatasetScan(images, skipped, dataset_fingerprint(root, images), str(root))
    log.info("%s", scan.summary())
    return scan


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency composited on white, 16-bit scaled (see module docstring)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(img, dtype=np.float64) / 65535.0
        img = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_to_square(img: Image.Image, resolution: int, policy: ResizePolicy) -> Image.Image:
    """One LANCZOS resampling to `resolution`² (centre square crop or squash for non-square images)."""
    return resize_to(img, (resolution, resolution), policy)


def resize_to(img: Image.Image, size: tuple[int, int], policy: ResizePolicy | str) -> Image.Image:
    """One LANCZOS resampling to `size` = (width, height): the centred region of that aspect ratio, or squashed."""
    from trainer.buckets import Bucket, image_geometry

    box = image_geometry(img.width, img.height, Bucket(*size), ResizePolicy(policy).value).box
    return img.resize(size, Image.Resampling.LANCZOS, box=box)


def find_mask(image_path: str | os.PathLike, dataset_dir: str | os.PathLike,
              mask_dir: str | os.PathLike) -> Path | None:
    """The mask file of an image: same relative path and stem under `mask_dir`, any image extension."""
    relative = Path(image_path).resolve().relative_to(Path(dataset_dir).expanduser().resolve())
    folder = Path(mask_dir).expanduser() / relative.parent
    for extension in sorted(IMAGE_EXTENSIONS):
        for candidate in (folder / (relative.stem + extension), folder / (relative.stem + extension.upper())):
            if candidate.is_file():
                return candidate
    return None


def mask_files(scan: DatasetScan, config) -> tuple[str | None, ...]:
    """Each scanned image's mask file under `config.mask_dir` (None: none there; alpha channel or no mask)."""
    if not config.mask_dir:
        return (None,) * len(scan.images)
    root = scan.root or config.dataset_dir
    found = [find_mask(r.path, root, config.mask_dir) for r in scan.images]
    return tuple(None if path is None else str(path) for path in found)


def masks_fingerprint(masks: Sequence[str | None]) -> str:
    """sha256 over each image's mask file (index, path, size, mtime_ns); alpha masks are in the dataset's own."""
    h = hashlib.sha256(b"gcfg-masks-v1")
    for index, path in enumerate(masks):
        if path is not None:
            st = os.stat(path)
            h.update(f"\0{index}\0{Path(path).name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def load_mask(image_path: str | os.PathLike, mask_path: str | os.PathLike | None, size: tuple[int, int],
              policy: ResizePolicy | str) -> torch.Tensor:
    """The loss weight of an image's pixels at `size` = (width, height): float [1, height, width] in [0, 1].

    From `mask_path` when given, else the image's alpha channel, else ones (no mask: every pixel counts).
    """
    with Image.open(image_path) as img:
        img = ImageOps.exif_transpose(img)
        width, height = img.size
        if mask_path is None:
            if not _has_alpha(img):
                return torch.ones(1, size[1], size[0])
            mask = img.convert("RGBA").getchannel("A")
        else:
            mask = None
    if mask is None:
        try:
            with Image.open(mask_path) as opened:
                mask = ImageOps.exif_transpose(opened).convert("L")
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageLoadError(f"cannot read mask {str(mask_path)!r} of {str(image_path)!r}: {e}") from e
        if mask.size != (width, height):  # e.g. a half-size mask: mapped onto the whole image
            mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    resized = resize_to(mask, size, policy)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32).copy())[None].div_(255.0)


def size_conditioning(record: ImageRecord, resolution: int, policy: ResizePolicy | str, *,
                      flipped: bool = False) -> SizeConditioning:
    """SDXL's micro-conditioning of one training image as `resize_to_square` makes it: (original size, crop, target).

    As in SDXL's own training: the original size is the image's (height, width) after EXIF rotation; the crop is
    the (top, left) corner of the kept square in the pixels of the image resized so its short side is
    `resolution`; the target size is (`resolution`, `resolution`). `squash` crops nothing. A flipped copy mirrors
    the crop's left edge. Aspect-ratio buckets replace this function with one that returns the bucket's values.
    """
    original = (record.height, record.width)
    target = (resolution, resolution)
    if ResizePolicy(policy) is ResizePolicy.SQUASH or record.width == record.height:
        return SizeConditioning(original, (0, 0), target)
    scale = resolution / min(record.width, record.height)
    resized_w, resized_h = round(record.width * scale), round(record.height * scale)
    top, left = (resized_h - resolution) // 2, (resized_w - resolution) // 2
    if flipped:
        left = resized_w - resolution - left
    return SizeConditioning(original, (top, left), target)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image → float32 tensor [3, H, W] in [-1, 1] (the SD VAE's input range)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(record_or_path: ImageRecord | str | os.PathLike, resolution: int | tuple[int, int],
               policy: ResizePolicy | str = ResizePolicy.CENTER_CROP) -> torch.Tensor:
    """Decode, orient, convert to RGB and resize one image to `resolution`² (or (width, height)); tensor
    [3, height, width] in [-1, 1]."""
    path = record_or_path.path if isinstance(record_or_path, ImageRecord) else os.fspath(record_or_path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(f"cannot read image {path!r} (changed since the dataset scan?): {e}") from e
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    return pil_to_tensor(resize_to(img, size, ResizePolicy(policy)))


class ImageDataset(torch.utils.data.Dataset):
    """The scanned images as tensors, for a DataLoader (the latent-cache build uses it with workers).

    `sizes`: each image's (width, height), e.g. its bucket (default: `resolution`²). `masks`: when given, each
    image's mask file or None (alpha channel or no mask); items are then (image, mask) pairs (`load_mask`).
    """

    def __init__(self, images: Sequence[ImageRecord], resolution: int, policy: ResizePolicy | str,
                 sizes: Sequence[tuple[int, int]] | None = None, masks: Sequence[str | None] | None = None):
        self.images = tuple(images)
        self.sizes = tuple(sizes) if sizes is not None else ((resolution, resolution),) * len(self.images)
        self.masks = tuple(masks) if masks is not None else None
        self.policy = ResizePolicy(policy)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.images[index], self.sizes[index], self.policy)
        if self.masks is None:
            return image
        return image, load_mask(self.images[index].path, self.masks[index], self.sizes[index], self.policy)
