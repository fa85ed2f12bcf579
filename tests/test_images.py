"""Image preprocessing on Pillow and numpy with torchvision's semantics (dedn/data/images.py).

torchvision does not import against this machine's CPU torch, so its steps are checked here by
what they are: the resize arithmetic, the crop offsets on images whose pixels encode their own
coordinates, the float32 scaling and normalisation against the same operations in torch, and
every common image mode. Where torchvision imports (a GPU node), the last test compares the whole
pipeline with torchvision's transforms exactly.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from dedn.data.images import (DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD, center_crop_box, load_image, preprocess,
                              resized_size)
from dedn.errors import DatasetError

PIL = pytest.importorskip("PIL.Image")
Image = PIL


def _coords(width: int, height: int) -> Image.Image:
    """R = x, G = y (mod 256), B = 7: a pixel says where it came from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    arr = np.stack([x % 256, y % 256, np.full_like(x, 7)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _unnormalise(x: np.ndarray) -> np.ndarray:
    return np.rint((x.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(int)


@pytest.mark.parametrize("w,h,size,want", [
    (500, 333, 448, (672, 448)), (333, 500, 448, (448, 672)), (448, 448, 448, (448, 448)),
    (301, 199, 224, (338, 224)), (199, 301, 224, (224, 338)), (1000, 7, 224, (32000, 224)),
])
def test_resize_sets_the_shorter_side_and_truncates_the_longer(w, h, size, want):
    assert resized_size(w, h, size) == want
    assert want == ((size, int(size * h / w)) if w <= h else (int(size * w / h), size))


@pytest.mark.parametrize("extra,offset", [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 2), (7, 4), (9, 4)])
def test_crop_offsets_round_half_to_even_as_torchvision(extra, offset):
    # (w - size) / 2 = 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 4.5 -> 4: Python's round, torchvision's rule
    assert center_crop_box(224 + extra, 224, 224) == (offset, 0, offset + 224, 224)
    assert center_crop_box(224, 224 + extra, 224) == (0, offset, 224, offset + 224)


@pytest.mark.parametrize("extra", [0, 3, 5, 8])
def test_the_crop_takes_the_pixels_at_those_offsets(extra):
    size = 32
    img = _coords(size + extra, size)  # shorter side already `size`: the resize keeps every pixel
    assert resized_size(*img.size, size) == img.size
    out = _unnormalise(preprocess(img, size))
    left = center_crop_box(size + extra, size, size)[0]
    assert (out[:, :, 0] == np.arange(left, left + size)[None, :]).all()
    assert (out[:, :, 1] == np.arange(size)[:, None]).all() and (out[:, :, 2] == 7).all()


def test_scaling_and_normalisation_equal_torchs_float32_operations_bit_for_bit():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")
    ours = preprocess(img, 31)
    # torchvision's ToTensor and Normalize, on the same resized and cropped pixels
    w, h = resized_size(*img.size, 31)
    pixels = np.array(img.resize((w, h), Image.BILINEAR).crop(center_crop_box(w, h, 31)), np.uint8)
    t = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    t = t.sub_(torch.as_tensor(IMAGENET_MEAN)[:, None, None]).div_(torch.as_tensor(IMAGENET_STD)[:, None, None])
    assert ours.dtype == np.float32 and ours.shape == (3, 31, 31)
    assert np.array_equal(ours, t.numpy())


def _modes() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (41, 29, 3), dtype=np.uint8), "RGB")
    grey16 = Image.fromarray(rng.integers(0, 65536, (41, 29), dtype=np.uint16))  # a 16-bit greyscale image
    return {"RGB": rgb, "L": rgb.convert("L"), "LA": rgb.convert("LA"), "P": rgb.convert("P"),
            "RGBA": rgb.convert("RGBA"), "CMYK": rgb.convert("CMYK"), "1": rgb.convert("1"), "I;16": grey16}


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16"])
def test_every_common_mode_becomes_three_channels_as_pillows_rgb_conversion(mode):
    img = _modes()[mode]
    assert img.mode == mode
    out = preprocess(img, 17)
    assert out.shape == (3, 17, 17) and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.array_equal(out, preprocess(img.convert("RGB"), 17))  # what the authors' convert("RGB") makes
    if mode in ("L", "1", "I;16"):  # grey: three equal channels before normalisation
        px = out.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
        assert np.allclose(px[..., 0], px[..., 1], atol=1e-6) and np.allclose(px[..., 1], px[..., 2], atol=1e-6)


def test_the_authors_sizes():
    assert DEFAULT_SIZE == {"CUB": 448, "SUN": 448, "AWA2": 224}


def test_a_missing_or_broken_image_is_named(tmp_path: Path):
    with pytest.raises(DatasetError, match="no such file") as e:
        load_image(tmp_path / "gone.jpg", 32)
    assert str(tmp_path / "gone.jpg") in str(e.value)
    buf = io.BytesIO()
    _coords(64, 48).save(buf, "JPEG")
    broken = tmp_path / "cut.jpg"
    broken.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a truncated download
    with pytest.raises(DatasetError) as e:
        load_image(broken, 32)
    assert str(broken) in str(e.value)
    good = tmp_path / "ok.jpg"
    good.write_bytes(buf.getvalue())
    assert load_image(good, 32).shape == (3, 32, 32)


def test_equal_to_torchvisions_transforms_where_torchvision_imports():
    try:
        from torchvision import transforms
    except Exception as e:  # noqa: BLE001 - absent, or built against another torch (this CPU machine)
        pytest.skip(f"torchvision does not import here ({type(e).__name__}); run on a GPU node")
    tv = transforms.Compose([transforms.Resize(448), transforms.CenterCrop(448), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())])
    for mode, img in _modes().items():
        for size in ((451, 600), (600, 451), (1023, 767)):
            im = img.resize(size).convert("RGB")
            assert np.array_equal(preprocess(im, 448), tv(im).numpy()), (mode, size)
