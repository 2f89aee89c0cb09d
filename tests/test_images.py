"""Decoding of real-world image files: modes, transparency, bit depth, orientation, size, damage."""

import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlprobe import defaults
from mlprobe.errors import DatasetError
from mlprobe.extract.augment import ViewAugmenter, view_seed_for
from mlprobe.extract.images import (
    EncodedImageDataset,
    ImageDataset,
    build_transform,
    collate_encoded,
    decode_on_device,
    load_image,
    normalize_batch,
)

CONFIG = {"image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class FakeSample:
    """The one Sample attribute ImageDataset reads."""

    path: Path


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    value = image.getpixel((x, y))
    assert isinstance(value, tuple)
    return value


def assert_close(actual, expected, tolerance=3):
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected)), f"{actual} is not close to {expected}"


def test_rgb_jpeg_unchanged(tmp_path):
    path = tmp_path / "red.jpg"
    Image.new("RGB", (16, 12), RED).save(path, quality=95)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (16, 12)
    assert_close(pixel(image, 8, 6), RED, tolerance=4)


def test_grayscale_and_bilevel(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 4), 77).save(gray)
    bilevel = tmp_path / "bilevel.png"
    Image.new("1", (5, 4), 1).save(bilevel)

    assert pixel(load_image(gray), 0, 0) == (77, 77, 77)
    assert pixel(load_image(bilevel), 0, 0) == WHITE


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)

    image = load_image(path)

    assert image.mode == "RGB"
    assert_close(pixel(image, 4, 4), RED, tolerance=10)


def test_palette_png(tmp_path):
    path = tmp_path / "palette.png"
    source = Image.new("RGB", (6, 6), BLUE)
    source.paste(RED, (0, 0, 3, 6))
    source.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)

    image = load_image(path)

    assert Image.open(path).mode == "P"
    assert pixel(image, 0, 0) == RED
    assert pixel(image, 5, 0) == BLUE


def test_palette_transparency_becomes_white(tmp_path):
    path = tmp_path / "palette_alpha.png"
    source = Image.new("P", (4, 4), 0)
    source.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    source.putpixel((3, 3), 1)
    source.save(path, transparency=0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path)

    assert pixel(image, 0, 0) == WHITE
    assert pixel(image, 3, 3) == BLUE


def test_rgba_composited_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    source = Image.new("RGBA", (3, 1))
    source.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    source.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    source.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    source.save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    assert pixel(image, 0, 0) == WHITE
    assert pixel(image, 1, 0) == BLUE
    assert_close(pixel(image, 2, 0), (127, 127, 127), tolerance=1)


def test_grayscale_alpha_composited_on_white(tmp_path):
    path = tmp_path / "la.png"
    source = Image.new("LA", (2, 1))
    source.putpixel((0, 0), (0, 0))
    source.putpixel((1, 0), (0, 255))
    source.save(path)

    image = load_image(path)

    assert pixel(image, 0, 0) == WHITE
    assert pixel(image, 1, 0) == (0, 0, 0)


def test_16_bit_png_scaled_to_8_bit(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535, 128 * 257, 1000]], dtype=np.uint16)).save(path)

    image = load_image(path)

    assert Image.open(path).mode == "I;16"
    assert [pixel(image, x, 0)[0] for x in range(4)] == [0, 255, 128, 4]


def test_32_bit_integer_tiff_scaled_as_16_bit(tmp_path):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.array([[0, 65535, 257 * 10, 90000]], dtype=np.int32)).save(path)

    image = load_image(path)

    assert Image.open(path).mode == "I"
    assert [pixel(image, x, 0)[0] for x in range(4)] == [0, 255, 10, 255]


def test_float_tiff_in_unit_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(path)

    image = load_image(path)

    assert [pixel(image, x, 0)[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    source = Image.new("RGB", (40, 20), BLUE)
    source.paste(RED, (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    source.save(path, exif=exif, quality=95)

    image = load_image(path)

    assert image.size == (20, 40)
    assert_close(pixel(image, 10, 5), RED, tolerance=6)
    assert_close(pixel(image, 10, 35), BLUE, tolerance=6)


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), RED).save(path)
    config = {"image_size": 8, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bicubic"}

    index, tensor, error = ImageDataset([FakeSample(path)], config)[0]

    assert (index, error) == (0, "")
    assert tensor.shape == (3, 8, 8)
    assert torch.allclose(tensor[0], torch.ones(8, 8))
    assert torch.allclose(tensor[2], torch.zeros(8, 8))


def test_large_jpeg_above_pillow_limit(tmp_path):
    path = tmp_path / "large.jpg"
    width, height = 10_000, 9_000  # above Pillow's default limit of about 89.5 million pixels
    Image.new("L", (width, height), 200).save(path, quality=50)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path, min_size=64)

    assert width * height > Image.MAX_IMAGE_PIXELS
    assert image.mode == "RGB"
    assert min(image.size) >= 64
    assert image.size[0] / image.size[1] == pytest.approx(width / height, rel=0.01)
    assert_close(pixel(image, 5, 5), (200, 200, 200))


def png_with_size(path: Path, width: int, height: int) -> None:
    """Write a PNG whose header declares width x height, with one row of image data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (width + 1))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_image_over_pixel_limit_rejected(tmp_path):
    path = tmp_path / "huge.png"
    png_with_size(path, 40_000, 40_000)

    with pytest.raises(DatasetError) as raised:
        load_image(path)

    assert 40_000 * 40_000 > defaults.MAX_IMAGE_PIXELS
    assert str(path) in str(raised.value)


def test_truncated_jpeg_names_file(tmp_path):
    path = tmp_path / "truncated.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(DatasetError) as raised:
        load_image(path)

    assert str(path) in str(raised.value)


def test_not_an_image_names_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is text, not a JPEG")

    with pytest.raises(DatasetError) as raised:
        load_image(path)

    assert str(path) in str(raised.value)


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "absent.png"

    with pytest.raises(DatasetError) as raised:
        load_image(path)

    assert str(path) in str(raised.value)


def test_dataset_returns_error_for_bad_file(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (10, 10), WHITE).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    config = {"image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    dataset = ImageDataset([FakeSample(bad), FakeSample(good)], config, indices=[1, 0])

    first_index, first_tensor, first_error = dataset[0]
    second_index, second_tensor, second_error = dataset[1]

    assert len(dataset) == 2
    assert (first_index, first_error) == (1, "")
    assert torch.allclose(first_tensor, torch.full((3, 16, 16), 2.0))  # (1 - 0.5) / 0.25
    assert second_index == 0
    assert str(bad) in second_error
    assert torch.equal(second_tensor, torch.zeros(3, 16, 16))


def test_transform_square_resize_ignores_aspect(tmp_path):
    config = {"image_size": 12, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "nearest"}
    source = Image.new("RGB", (60, 10), BLUE)
    source.paste(RED, (0, 0, 30, 10))

    tensor = build_transform(config)(source)

    assert tensor.shape == (3, 12, 12)
    assert tensor[0, :, :6].min() == 1.0  # left half red
    assert tensor[2, :, 6:].min() == 1.0  # right half blue


def noise_image(seed: int = 0, size: int = 64) -> torch.Tensor:
    """A uint8 [3, size, size] image of smooth colour gradients plus noise."""
    rng = np.random.default_rng(seed)
    columns, rows = np.meshgrid(np.linspace(0, 200, size), np.linspace(0, 200, size))
    base = np.stack([columns, rows, 200 - columns])
    pixels = np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8)
    return torch.from_numpy(pixels)


def gradient_jpeg(path: Path, size: tuple[int, int] = (48, 40)) -> None:
    """Write a smooth RGB gradient as a high-quality JPEG, so resampling differences stay small."""
    width, height = size
    x = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, axis=1)
    pixels = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=98)


def test_views_deterministic_per_seed_index_view():
    augmenter = ViewAugmenter(CONFIG, views=4, view_seed=3)
    image = noise_image()

    first = augmenter(image, 5)
    again = augmenter(image.clone(), 5)
    other_index = augmenter(image, 6)

    assert first.shape == (4, 3, 64, 64)
    assert first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other_index)
    for view in range(1, 4):
        assert not torch.equal(first[0], first[view]), view


def test_view_seeds_distinct_and_stable():
    seeds = {view_seed_for(0, index, view) for index in range(50) for view in range(4)}

    assert len(seeds) == 200
    assert view_seed_for(0, 1, 2) == view_seed_for(0, 1, 2)
    assert view_seed_for(0, 1, 2) != view_seed_for(1, 1, 2)
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_views_leave_global_rng_alone():
    augmenter = ViewAugmenter(CONFIG, views=2)
    torch.manual_seed(11)
    expected = torch.rand(3)

    torch.manual_seed(11)
    augmenter(noise_image(), 0)
    actual = torch.rand(3)

    assert torch.equal(actual, expected)


def test_cutout_hole_is_mean_square():
    augmenter = ViewAugmenter(CONFIG, views=8, num_ops=0)
    image = torch.full((3, 64, 64), 255, dtype=torch.uint8)

    views = augmenter(image, 0)

    for view in views:
        hole = (view == 0.0).all(dim=0)
        rows = torch.nonzero(hole.any(dim=1)).flatten()
        columns = torch.nonzero(hole.any(dim=0)).flatten()
        assert 16 <= len(rows) <= 32
        assert 16 <= len(columns) <= 32
        assert hole[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1].all()
        assert int(hole.sum()) == len(rows) * len(columns)
        assert torch.equal(view[:, ~hole], torch.ones(3, int((~hole).sum())))  # (1 - 0.5) / 0.5


def test_randaugment_without_cutout_changes_image():
    augmenter = ViewAugmenter(CONFIG, views=6, cutout_factor=0.0)
    image = noise_image()
    plain = normalize_batch(image[None], CONFIG)[0]

    views = augmenter(image, 2)

    changed = [not torch.equal(view, plain) for view in views]
    assert sum(changed) >= 4  # a view is unchanged only when both operations drawn are Identity or no-ops


def test_augmenter_rejects_unresized_image():
    augmenter = ViewAugmenter(CONFIG, views=2)

    with pytest.raises(ValueError) as raised:
        augmenter(torch.zeros(3, 32, 64, dtype=torch.uint8), 0)

    assert "(3, 64, 64)" in str(raised.value)


def test_dataset_serves_views(tmp_path):
    good = tmp_path / "good.jpg"
    gradient_jpeg(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a JPEG")
    augmenter = ViewAugmenter(CONFIG, views=3, view_seed=1)
    dataset = ImageDataset([FakeSample(good), FakeSample(bad)], CONFIG, augmenter=augmenter)

    index, views, error = dataset[0]
    bad_index, bad_views, bad_error = dataset[1]

    assert (index, error) == (0, "")
    assert views.shape == (3, 3, 64, 64)
    assert torch.equal(views, augmenter(build_resized_tensor(good), 0))
    assert bad_index == 1
    assert str(bad) in bad_error
    assert torch.equal(bad_views, torch.zeros(3, 3, 64, 64))


def build_resized_tensor(path: Path) -> torch.Tensor:
    """The uint8 [3, 64, 64] image the dataset hands to the augmenter."""
    from torchvision.transforms import functional

    from mlprobe.extract.images import build_resize

    return functional.pil_to_tensor(build_resize(CONFIG)(load_image(path)))


def test_encoded_dataset_payloads(tmp_path):
    jpeg = tmp_path / "photo.jpg"
    gradient_jpeg(jpeg)
    png = tmp_path / "drawing.png"
    Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(png)
    cmyk = tmp_path / "print.jpg"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(cmyk)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpeg.read_bytes()[:30])
    dataset = EncodedImageDataset([FakeSample(path) for path in (jpeg, png, cmyk, broken)], CONFIG)

    indices, payloads, errors = collate_encoded([dataset[position] for position in range(4)])

    assert indices.tolist() == [0, 1, 2, 3]
    assert torch.equal(payloads[0], torch.frombuffer(bytearray(jpeg.read_bytes()), dtype=torch.uint8))
    assert payloads[1].shape == (3, 64, 64)
    assert payloads[1].dtype == torch.uint8
    assert tuple(payloads[1][:, 10, 10].tolist()) == WHITE  # transparent pixels on white
    assert payloads[2].shape == (3, 64, 64)
    assert payloads[3].numel() == 0
    assert errors[:3] == ["", "", ""]
    assert str(broken) in errors[3]


def test_device_decoding_close_to_pillow(tmp_path):
    jpeg = tmp_path / "photo.jpg"
    gradient_jpeg(jpeg)
    png = tmp_path / "drawing.png"
    Image.new("RGB", (30, 20), BLUE).save(png)
    dataset = EncodedImageDataset([FakeSample(jpeg), FakeSample(png)], CONFIG)
    _, payloads, errors = collate_encoded([dataset[0], dataset[1]])

    images, errors = decode_on_device(payloads, [jpeg, png], CONFIG, torch.device("cpu"), errors)

    expected = build_resized_tensor(jpeg).int()
    assert images.shape == (2, 3, 64, 64)
    assert images.dtype == torch.uint8
    assert errors == ["", ""]
    assert (images[0].int() - expected).abs().float().mean() < 1.0
    assert (images[0].int() - expected).abs().max() <= 3
    assert torch.equal(images[1], build_resized_tensor(png))


def test_device_decoding_falls_back_to_pillow(tmp_path):
    png = tmp_path / "drawing.png"
    Image.new("RGB", (30, 20), RED).save(png)
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a JPEG")
    not_jpeg = torch.tensor([1, 2, 3], dtype=torch.uint8)  # bytes decode_jpeg rejects

    images, errors = decode_on_device([not_jpeg, not_jpeg], [png, broken], CONFIG, torch.device("cpu"), ["", ""])

    assert errors[0] == ""
    assert tuple(images[0][:, 30, 30].tolist()) == RED
    assert str(broken) in errors[1]
    assert torch.equal(images[1], torch.zeros(3, 64, 64, dtype=torch.uint8))


def test_uint8_items_normalise_like_transform(tmp_path):
    path = tmp_path / "photo.jpg"
    gradient_jpeg(path)
    config = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"}

    _, normalised, _ = ImageDataset([FakeSample(path)], config)[0]
    _, raw, _ = ImageDataset([FakeSample(path)], config, normalize=False)[0]

    assert raw.dtype == torch.uint8
    assert torch.equal(normalize_batch(raw[None], config)[0], normalised)


def test_uint8_item_of_bad_file_is_zeros(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")

    _, image, error = ImageDataset([FakeSample(bad)], CONFIG, normalize=False)[0]

    assert str(bad) in error
    assert torch.equal(image, torch.zeros(3, 64, 64, dtype=torch.uint8))
