"""Dataset scan (bad files skipped and reported), image loading policies, fingerprint."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import ResizePolicy
from trainer.data import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageLoadError,
    ImageRecord,
    dataset_fingerprint,
    load_image,
    scan_dataset,
)


def _save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def make_messy_dataset(root: Path) -> dict[str, Path]:
    """Good images of every kind plus every kind of bad file, in nested and hidden folders."""
    p = {}
    p["square"] = _save(root / "a_square.png", _gradient(64, 64))
    p["wide"] = _save(root / "b_wide.jpg", _gradient(96, 64), quality=95)
    p["rgba"] = _save(root / "sub" / "c_rgba.png", Image.new("RGBA", (64, 64), (255, 0, 0, 0)))
    p["grey"] = _save(root / "sub" / "deeper" / "d_grey.webp", Image.new("L", (64, 80), 128), lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    p["exif"] = _save(root / "sub" / "e_exif.JPG", _gradient(96, 64), exif=exif.tobytes(), quality=95)
    p["bmp"] = _save(root / "f_palette.bmp", _gradient(64, 64).convert("P"))
    (root / "z_empty.png").write_bytes(b"")
    p["empty"] = root / "z_empty.png"
    buf = io.BytesIO()
    _gradient(64, 64).save(buf, "JPEG", quality=95)
    (root / "z_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    p["truncated"] = root / "z_truncated.jpg"
    (root / "z_text.jpg").write_text("this is not an image\n")
    p["text"] = root / "z_text.jpg"
    p["small"] = _save(root / "z_small.png", _gradient(40, 64))
    _save(root / ".hidden" / "h.png", _gradient(64, 64))  # hidden folder: never visited
    _save(root / "._appledouble.png", _gradient(64, 64))  # hidden file: never visited
    (root / "caption.txt").write_text("ignored")  # not an image extension: ignored, not reported
    return p


@pytest.fixture()
def messy(tmp_path):
    root = tmp_path / "data"
    return root, make_messy_dataset(root)


def test_scan_keeps_good_images_in_sorted_order_and_reports_bad_ones(messy):
    root, p = messy
    scan = scan_dataset(root, min_image_size=48)
    good = [p[k] for k in ("square", "wide", "bmp", "rgba", "grey", "exif")]
    assert [Path(r.path) for r in scan.images] == sorted((x.resolve() for x in good),
                                                        key=lambda x: x.relative_to(root.resolve()).as_posix())
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert set(reasons) == {"z_empty.png", "z_truncated.jpg", "z_text.jpg", "z_small.png"}
    assert "0 bytes" in reasons["z_empty.png"]
    assert "unreadable" in reasons["z_truncated.jpg"] and "unreadable" in reasons["z_text.jpg"]
    assert reasons["z_small.png"] == "too small: 40×64 px, short side < min_image_size=48"
    assert "z_small.png\ttoo small" in scan.skipped_report()
    assert scan.root == str(root.resolve())


def test_scan_records_exif_oriented_size(messy):
    root, p = messy
    scan = scan_dataset(root, min_image_size=0)
    by_name = {Path(r.path).name: r for r in scan.images}
    assert (by_name["e_exif.JPG"].width, by_name["e_exif.JPG"].height) == (64, 96)
    assert (by_name["b_wide.jpg"].width, by_name["b_wide.jpg"].height) == (96, 64)
    assert "z_small.png" in by_name  # min_image_size=0 keeps every size


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="nope.*does not exist"):
        scan_dataset(tmp_path / "nope", min_image_size=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"bad.*no usable image.*x\.png: empty file"):
        scan_dataset(tmp_path / "bad", min_image_size=0)


def test_fingerprint_is_stable_and_tracks_the_file_set(messy):
    root, p = messy
    a = scan_dataset(root, min_image_size=48)
    assert scan_dataset(root, min_image_size=48, workers=1).fingerprint == a.fingerprint
    assert scan_dataset(root, min_image_size=0).fingerprint != a.fingerprint  # the 40×64 image joins the set
    st = p["square"].stat()
    os.utime(p["square"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert scan_dataset(root, min_image_size=48).fingerprint != a.fingerprint
    os.utime(p["square"], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert scan_dataset(root, min_image_size=48).fingerprint == a.fingerprint
    _save(root / "sub" / "new.png", _gradient(64, 64))
    assert scan_dataset(root, min_image_size=48).fingerprint != a.fingerprint


def test_fingerprint_uses_relative_paths(tmp_path):
    recs_a = [ImageRecord(str(tmp_path / "a" / "x.png"), 64, 64, 10, 5)]
    recs_b = [ImageRecord(str(tmp_path / "b" / "x.png"), 64, 64, 10, 5)]
    assert dataset_fingerprint(tmp_path / "a", recs_a) == dataset_fingerprint(tmp_path / "b", recs_b)


def test_previous_scan_is_reused_without_decoding(messy, monkeypatch):
    root, _ = messy
    first = scan_dataset(root, min_image_size=48)
    import trainer.data as data_module

    decoded = []
    real = data_module._check_file
    monkeypatch.setattr(data_module, "_check_file", lambda path, *a: decoded.append(path.name) or real(path, *a))
    again = scan_dataset(root, min_image_size=48, previous=first)
    assert again == first
    assert sorted(decoded) == sorted(Path(s.path).name for s in first.skipped)  # only the bad files re-checked


def test_scan_json_round_trip(messy):
    root, _ = messy
    scan = scan_dataset(root, min_image_size=48)
    assert type(scan).from_json(scan.to_json()) == scan


def test_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp"} == IMAGE_EXTENSIONS


def test_load_image_range_shape_and_conversions(messy):
    root, p = messy
    for key in ("square", "wide", "rgba", "grey", "exif", "bmp"):
        x = load_image(p[key], 32, ResizePolicy.CENTER_CROP)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    # Fully transparent red composited on white is white.
    assert torch.allclose(load_image(p["rgba"], 32, "squash"), torch.ones(3, 32, 32))
    grey = load_image(p["grey"], 32, "squash")
    assert torch.allclose(grey, torch.full_like(grey, 128 / 127.5 - 1), atol=1e-6)


def test_load_image_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 32))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: left half → top half
    path = _save(tmp_path / "o.png", img, exif=exif.tobytes())
    x = load_image(path, 32, ResizePolicy.SQUASH)
    assert x[:, :12].mean() > 0.9 and x[:, -12:].mean() < -0.9


def test_resize_policies_on_non_square(tmp_path):
    # 96×32: left third red, middle green, right third blue.
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :32, 0] = arr[:, 32:64, 1] = arr[:, 64:, 2] = 255
    path = _save(tmp_path / "rgb.png", Image.fromarray(arr))
    crop = load_image(path, 32, ResizePolicy.CENTER_CROP)
    assert torch.allclose(crop[1], torch.ones(32, 32), atol=0.02)  # only the green centre remains
    squash = load_image(path, 32, ResizePolicy.SQUASH)
    assert squash[0, :, :8].mean() > 0.9 and squash[2, :, -8:].mean() > 0.9  # red left, blue right survive


def test_load_image_scales_16bit_greyscale(tmp_path):
    arr = np.full((32, 32), 32768, np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    x = load_image(path, 32, "squash")
    assert torch.allclose(x, torch.full_like(x, 128 / 127.5 - 1), atol=1e-6)


def test_load_image_error_names_path(tmp_path):
    bad = tmp_path / "gone.png"
    with pytest.raises(ImageLoadError, match="gone.png"):
        load_image(bad, 32, "squash")
