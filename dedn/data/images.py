"""Image preprocessing for feature extraction: the authors' torchvision pipeline, on Pillow and numpy.

The authors' `preprocessing.py` feeds ResNet-101 with, per image: convert to RGB (grey, palette,
alpha, CMYK and 16-bit images alike), `Resize(w)` (the shorter side to w with Pillow's bilinear
filter), `CenterCrop(w)`, `ToTensor()` (uint8 to float32 in [0, 1]) and `Normalize` with the
ImageNet mean and std; w = 448 for CUB and SUN (14 x 14 maps), 224 for AWA2 (7 x 7).

torchvision does not import against the CPU build of torch (its wheels are built against the CUDA
one), so the same steps are written here with torchvision's exact semantics for a PIL image:

* resize: the shorter side becomes w, the longer `int(w * long / short)` (truncated), resampled by
  `PIL.Image.resize(..., BILINEAR)` itself (torchvision calls the same function for PIL input);
* centre crop: offsets `int(round((size - w) / 2))` (Python's round, half to even), as torchvision's
  `center_crop` computes them since 0.8 (older releases used `int((size - w + 1) * 0.5)`: a
  one-pixel shift where the difference is odd and its half rounds down);
* scaling and normalisation in float32: `x / 255`, then `(x - mean) / std`, channel by channel,
  the operations torchvision applies to float32 tensors (each correctly rounded: equal bits).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dedn.errors import DatasetError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_SIZE", "resized_size", "center_crop_box", "crop", "normalize",
           "preprocess", "load_crop", "load_image"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_SIZE = {"CUB": 448, "SUN": 448, "AWA2": 224}  # the authors' crop per dataset


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(size)`: the shorter side to `size`, the longer truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's `CenterCrop(size)` on a width x height image (no padding:
    after `Resize(size)` both sides are at least `size`)."""
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def crop(image, size: int) -> np.ndarray:
    """A PIL image resized and centre-cropped as the authors' pipeline: uint8 (size, size, 3), RGB."""
    from PIL import Image  # Pillow: imported on use (this module is imported by the converters)

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    w, h = resized_size(*rgb.size, size)
    resized = rgb.resize((w, h), Image.BILINEAR)
    return np.asarray(resized.crop(center_crop_box(w, h, size)), dtype=np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., size, size, 3) crops as the backbone's float32 input (..., 3, size, size): ToTensor, Normalize."""
    x = pixels.astype(np.float32) / np.float32(255)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD  # the last axis is the channel
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(image, size: int) -> np.ndarray:
    """A PIL image as the backbone's input: float32 (3, size, size), normalised as the authors' pipeline."""
    return normalize(crop(image, size))


def load_image(path: str | Path, size: int) -> np.ndarray:
    """`preprocess` of the image file at `path`; a missing or unreadable file is a DatasetError naming it."""
    return normalize(load_crop(path, size))


def load_crop(path: str | Path, size: int) -> np.ndarray:
    """`crop` of the image file at `path` (uint8, what travels between decoding and the backbone: a quarter
    of the float32 bytes); a missing or unreadable file is a DatasetError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode the whole file now: a truncated JPEG fails here, by name
            return crop(im, size)
    except FileNotFoundError:
        raise DatasetError(path, "image", "an image file", "no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying "broken"
        raise DatasetError(path, "image", "an image Pillow can decode", f"{type(e).__name__}: {e}") from None
