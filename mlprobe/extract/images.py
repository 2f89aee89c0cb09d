"""Decoding real-world image files into normalised tensors for a backbone.

``load_image`` turns any image Pillow can read into an 8-bit RGB image:

- grayscale, bilevel, CMYK, YCbCr and palette images are converted to RGB (CMYK by
  Pillow's plain formula, without ICC colour management);
- images with transparency (RGBA, LA, PA, palette or RGB/L with a transparent colour) are
  composited onto a white background, as viewers show them;
- 16-bit and 32-bit integer images ("I;16*", "I") are read as 0..65535 and scaled to
  0..255; float images ("F") are read as 0..1 when their maximum is at most 1, else as 0..255;
- the EXIF orientation tag is applied, so rotated camera photos come out upright;
- images up to ``defaults.MAX_IMAGE_PIXELS`` pixels are accepted; JPEGs above
  ``defaults.LARGE_IMAGE_PIXELS`` are decoded at a reduced scale (Pillow draft mode) that
  still leaves at least the requested size on each side;
- truncated, corrupt or unknown files raise DatasetError naming the file.
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from mlprobe import defaults
from mlprobe.errors import DatasetError

logger = logging.getLogger(__name__)

ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
INTEGER_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
WHITE = (255, 255, 255, 255)


def load_image(path: Path, *, min_size: int | None = None) -> Image.Image:
    """Read an image file as an 8-bit RGB Pillow image (see the module docstring for the conversions).

    Args:
        path: image file.
        min_size: the side length the image will be resized to. Large JPEGs are decoded at a
            reduced scale that keeps both sides at least this long. None decodes at full size.

    Raises:
        DatasetError: the file is missing, truncated, corrupt, too large or not an image.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89.5 million pixels on; mlprobe's own limit is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _decode(Path(path), min_size)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as error:
        raise DatasetError(
            f"cannot read image {path}: {error}; replace or delete the file, or pass --skip-bad to record it and go on"
        ) from error

    image = _apply_exif_orientation(image, path)
    return _to_rgb(image)


def _decode(path: Path, min_size: int | None) -> Image.Image:
    """Open and fully decode an image file, with mlprobe's pixel limit in place of Pillow's."""
    previous_limit = Image.MAX_IMAGE_PIXELS
    # Pillow raises DecompressionBombError above twice this value; the limit is restored at once.
    Image.MAX_IMAGE_PIXELS = defaults.MAX_IMAGE_PIXELS // 2
    try:
        image = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit

    pixels = image.width * image.height
    if pixels > defaults.MAX_IMAGE_PIXELS:
        image.close()
        raise ValueError(
            f"{image.width}x{image.height} pixels exceed the limit of {defaults.MAX_IMAGE_PIXELS} "
            f"(defaults.MAX_IMAGE_PIXELS)"
        )

    if min_size is not None and image.format == "JPEG" and pixels > defaults.LARGE_IMAGE_PIXELS:
        image.draft("RGB", (min_size, min_size))
        logger.info("decoding %s (%dx%d) at reduced scale %s", path, image.width, image.height, image.size)

    image.load()
    return image


def _apply_exif_orientation(image: Image.Image, path: Path) -> Image.Image:
    """Rotate or flip the image by its EXIF orientation tag; a broken EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error) as error:
        logger.warning("ignoring the unreadable EXIF orientation of %s: %s", path, error)
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image

    if image.mode in INTEGER_MODES or image.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode), mode="L").convert("RGB")

    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")

    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit integer or float single-channel array to uint8 [H, W]."""
    values = values.astype(np.float64)
    if mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        scaled = np.nan_to_num(values) * scale
    else:
        scaled = np.clip(values, 0, 65535) / 257.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def build_transform(config: dict) -> transforms.Compose:
    """Return the preprocessing of a data config: square resize, to tensor, normalise.

    The image is resized to image_size x image_size without keeping its aspect ratio or
    cropping, so every part of a multi-label image stays in view.
    Output: float32 [3, image_size, image_size].
    """
    size = int(config["image_size"])
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=InterpolationMode(config["interpolation"])),
            transforms.ToTensor(),
            transforms.Normalize(mean=config["mean"], std=config["std"]),
        ]
    )


class ImageDataset(Dataset):
    """Decoded, resized and normalised images of a list of samples.

    Item ``position`` is ``(index, image, error)``: ``index`` is the sample index in
    ``samples``, ``image`` a float32 [3, S, S] tensor, and ``error`` an empty string, or the
    DatasetError message of an unreadable file (then ``image`` is zeros). Errors are returned
    rather than raised so that the caller can stop with the file's name or skip it.

    Args:
        samples: objects with a ``path`` attribute, such as ``mlprobe.extract.datasets.Sample``.
        config: data config with image_size, mean, std, interpolation.
        indices: the sample indices to serve, in order; default all.
    """

    def __init__(self, samples: list, config: dict, indices: list[int] | None = None):
        self.samples = samples
        self.indices = list(range(len(samples))) if indices is None else list(indices)
        self.image_size = int(config["image_size"])
        self.transform = build_transform(config)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, str]:
        index = self.indices[position]
        try:
            image = load_image(self.samples[index].path, min_size=self.image_size)
        except DatasetError as error:
            return index, torch.zeros(3, self.image_size, self.image_size), str(error)
        return index, self.transform(image), ""
