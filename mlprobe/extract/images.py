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

``ImageDataset`` serves decoded, resized and normalised images, optionally as augmented
views. ``EncodedImageDataset`` and ``decode_on_device`` split the same work for JPEG
decoding on the GPU (torchvision.io.decode_jpeg): loader workers read the file bytes and
the main process decodes and resizes a whole batch on the device.
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
# NOTE: torchvision 0.29 deprecates its image decoders (a DeprecationWarning per call) in
# favour of TorchCodec; decode_jpeg and read_file still work in the pinned 0.29.1.
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from mlprobe import defaults
from mlprobe.errors import DatasetError

logger = logging.getLogger(__name__)

ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
INTEGER_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
WHITE = (255, 255, 255, 255)
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
DEVICE_JPEG_MODES = {"RGB", "L"}  # JPEG colour modes sent to decode_jpeg; CMYK and others go through Pillow


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
    except READ_ERRORS as error:
        raise DatasetError(
            f"cannot read image {path}: {error}; replace or delete the file"
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


def build_resize(config: dict) -> transforms.Resize:
    """Return the square resize to image_size x image_size of a data config.

    The aspect ratio is not kept and nothing is cropped, so every part of a multi-label
    image stays in view.
    """
    size = int(config["image_size"])
    return transforms.Resize((size, size), interpolation=InterpolationMode(config["interpolation"]))


def build_transform(config: dict) -> transforms.Compose:
    """Return the preprocessing of a data config: square resize, to tensor, normalise.

    Output: float32 [3, image_size, image_size].
    """
    return transforms.Compose(
        [
            build_resize(config),
            transforms.ToTensor(),
            transforms.Normalize(mean=config["mean"], std=config["std"]),
        ]
    )


def normalize_batch(images: torch.Tensor, config: dict) -> torch.Tensor:
    """Turn uint8 [B, 3, S, S] images into float32 normalised ones on the same device."""
    mean = torch.tensor(config["mean"], dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class ImageDataset(Dataset):
    """Decoded, resized and normalised images of a list of samples, optionally as augmented views.

    Item ``position`` is ``(index, image, error)``, where ``index`` is the sample index in
    ``samples``. ``image`` is float32 [3, S, S], uint8 [3, S, S] with ``normalize=False``,
    or float32 [V, 3, S, S] with an ``augmenter``. ``error`` is an empty string, or the
    DatasetError message of an unreadable file, whose ``image`` is zeros. Errors are
    returned rather than raised so that the caller can stop with the file's name or skip it.

    Args:
        samples: objects with a ``path`` attribute, such as ``mlprobe.extract.datasets.Sample``.
        config: data config with image_size, mean, std, interpolation.
        indices: the sample indices to serve, in order; default all.
        augmenter: ``mlprobe.extract.augment.ViewAugmenter`` drawing V views of the resized
            image; None serves the single unaugmented view.
        normalize: False serves the resized uint8 image without an augmenter, for
            ``normalize_batch`` on the device; it moves a quarter of the bytes between processes.
    """

    def __init__(
        self, samples: list, config: dict, indices: list[int] | None = None, augmenter=None, normalize: bool = True
    ):
        self.samples = samples
        self.indices = list(range(len(samples))) if indices is None else list(indices)
        self.image_size = int(config["image_size"])
        self.resize = build_resize(config)
        self.transform = build_transform(config)
        self.augmenter = augmenter
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, str]:
        index = self.indices[position]
        try:
            image = load_image(self.samples[index].path, min_size=self.image_size)
        except DatasetError as error:
            return index, self._empty_image(), str(error)

        if self.augmenter is not None:
            return index, self.augmenter(F.pil_to_tensor(self.resize(image)), index), ""
        if not self.normalize:
            return index, F.pil_to_tensor(self.resize(image)), ""
        return index, self.transform(image), ""

    def _empty_image(self) -> torch.Tensor:
        """Return the zeros served for an unreadable file, shaped and typed like a readable one."""
        shape = (3, self.image_size, self.image_size)
        if self.augmenter is not None:
            return torch.zeros((self.augmenter.views, *shape))
        if not self.normalize:
            return torch.zeros(shape, dtype=torch.uint8)
        return torch.zeros(shape)


class EncodedImageDataset(Dataset):
    """Images of a list of samples prepared for decoding on a GPU.

    Item ``position`` is ``(index, payload, error)``. ``payload`` is one of:

    - uint8 [L], the file's bytes, for JPEGs in RGB or grayscale of at most
      ``defaults.LARGE_IMAGE_PIXELS`` pixels, for ``decode_on_device``;
    - uint8 [3, S, S], any other image decoded by ``load_image`` and resized here;
    - uint8 [0] with ``error`` set to the DatasetError message of an unreadable file.

    Use ``collate_encoded`` as the DataLoader's collate_fn, because payload sizes differ.
    """

    def __init__(self, samples: list, config: dict, indices: list[int] | None = None):
        self.samples = samples
        self.indices = list(range(len(samples))) if indices is None else list(indices)
        self.image_size = int(config["image_size"])
        self.resize = build_resize(config)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, str]:
        index = self.indices[position]
        path = Path(self.samples[index].path)
        if _is_device_jpeg(path):
            return index, read_file(str(path)), ""

        try:
            image = load_image(path, min_size=self.image_size)
        except DatasetError as error:
            return index, torch.zeros(0, dtype=torch.uint8), str(error)
        return index, F.pil_to_tensor(self.resize(image)), ""


def _is_device_jpeg(path: Path) -> bool:
    """Return whether the file's header names a JPEG that decode_jpeg can turn into RGB."""
    try:
        with Image.open(path) as image:
            return (
                image.format == "JPEG"
                and image.mode in DEVICE_JPEG_MODES
                and image.width * image.height <= defaults.LARGE_IMAGE_PIXELS
            )
    except READ_ERRORS:
        return False  # load_image raises the error that names the file


def collate_encoded(items: list[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """Batch ``EncodedImageDataset`` items: int64 [B] indices, B payloads, B error strings."""
    indices = torch.tensor([item[0] for item in items], dtype=torch.int64)
    return indices, [item[1] for item in items], [item[2] for item in items]


def decode_on_device(
    payloads: list[torch.Tensor], paths: list[Path], config: dict, device: torch.device, errors: list[str]
) -> tuple[torch.Tensor, list[str]]:
    """Decode and resize one batch of ``EncodedImageDataset`` payloads on ``device``.

    JPEG bytes go through torchvision.io.decode_jpeg on the device (with EXIF orientation
    applied), then a bicubic (or the config's) antialiased resize to S x S. A JPEG that
    decode_jpeg rejects is decoded again with Pillow by ``load_image``, so its error, if any,
    names the file.

    Args:
        payloads: B payloads as described in ``EncodedImageDataset``.
        paths: the B image files, for fallback decoding and error messages.
        config: data config with image_size and interpolation.
        device: where to decode; "cuda" uses nvJPEG, "cpu" uses libjpeg.
        errors: B error strings from the loader workers.

    Returns:
        (uint8 [B, 3, S, S] on ``device``, B error strings). Rows with an error are zeros.
    """
    # NOTE: tests run this with device "cpu" (libjpeg) only. The nvJPEG path on a CUDA device
    # has not been run, and whether nvJPEG rejects truncated JPEGs as Pillow does is unverified.
    size = int(config["image_size"])
    errors = list(errors)
    images = torch.zeros((len(payloads), 3, size, size), dtype=torch.uint8, device=device)

    jpeg_rows = [row for row, payload in enumerate(payloads) if payload.ndim == 1 and payload.numel() > 0]
    decoded = _decode_jpegs([payloads[row] for row in jpeg_rows], device)
    for row, image in zip(jpeg_rows, decoded):
        if image is None:
            image, errors[row] = _decode_with_pillow(paths[row], config, device)
        if image is not None:
            images[row] = _resize_on_device(image, config)

    for row, payload in enumerate(payloads):
        if payload.ndim == 3:
            images[row] = payload.to(device, non_blocking=True)
    return images, errors


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG bytes to uint8 [3, H, W] on ``device``; None for each file decode_jpeg rejects."""
    if not data:
        return []

    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except RuntimeError as error:
        logger.debug("batched decode_jpeg failed (%s); decoding the batch one image at a time", error)

    images: list[torch.Tensor | None] = []
    for item in data:
        try:
            images.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
        except RuntimeError:
            images.append(None)
    return images


def _decode_with_pillow(path: Path, config: dict, device: torch.device) -> tuple[torch.Tensor | None, str]:
    """Decode one image with ``load_image`` as uint8 [3, H, W] on ``device``, or return its error message."""
    try:
        image = load_image(path, min_size=int(config["image_size"]))
    except DatasetError as error:
        return None, str(error)

    logger.info("decode_jpeg rejected %s; decoded it with Pillow instead", path)
    return F.pil_to_tensor(image).to(device), ""


def _resize_on_device(image: torch.Tensor, config: dict) -> torch.Tensor:
    """Resize uint8 [3, H, W] to uint8 [3, S, S] on its device, antialiased as Pillow's resize is.

    Torch's antialiased bicubic differs from Pillow's by a few grey levels, so features of a
    GPU-decoded store are close to, not equal to, those of a Pillow-decoded one.
    """
    size = int(config["image_size"])
    resized = F.resize(
        image.float(), [size, size], interpolation=InterpolationMode(config["interpolation"]), antialias=True
    )
    return resized.round_().clamp_(0, 255).to(torch.uint8)
