"""Demo dataset: multi-label mosaics of scikit-learn's handwritten digits.

Each image is a 2x2 grid of cells. One to four cells hold a digit of a distinct class
and the other cells stay black, so an image has one to four positive labels out of ten
classes. The 1,797 source digits (8x8, values 0..16) are split by a seeded permutation
into a train pool and a test pool, so no source digit appears in both splits. The same
images and labels are written in the VOC 2007 layout and in the COCO 2017 layout, so the
demo goes through the same readers as real data.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mlprobe.defaults import DEMO_CELL, DEMO_SEED, DEMO_TEST_IMAGES, DEMO_TRAIN_IMAGES
from mlprobe.errors import DatasetError

logger = logging.getLogger(__name__)

DEMO_CLASS_NAMES = tuple(f"digit{digit}" for digit in range(10))
DEMO_FORMAT_VERSION = 1  # bump when the rendering changes, so existing demo folders are rebuilt
TRAIN_POOL_FRACTION = 2 / 3  # share of the source digits reserved for training mosaics
GRID = 2  # cells per side of a mosaic
JPEG_QUALITY = 95
MAX_IMAGES = 999_999  # image ids have six digits, as in VOC
MIN_CELL = 8  # pixels, because smaller cells would shrink the 8x8 source digits

VOC_SPLITS = {"train": "trainval", "test": "test"}
COCO_SPLITS = {"train": "train", "test": "val"}
COCO_YEAR = "2017"


@dataclass
class Mosaic:
    """One demo image before encoding.

    pixels: uint8 [GRID * cell, GRID * cell], grey levels 0..255.
    labels: int8 [10], 1 for each digit class present, -1 otherwise.
    digits: (cell index 0..3 in row-major order, class, source digit index) per filled cell.
    """

    pixels: np.ndarray
    labels: np.ndarray
    digits: list[tuple[int, int, int]]


def build_demo_data(
    out: Path,
    n_train: int = DEMO_TRAIN_IMAGES,
    n_test: int = DEMO_TEST_IMAGES,
    seed: int = DEMO_SEED,
    cell: int = DEMO_CELL,
) -> dict:
    """Write the digit-mosaic demo dataset to ``out`` in the VOC and the COCO layout.

    Layout: ``out/VOCdevkit/VOC2007`` (splits trainval and test), ``out/coco``
    (``annotations/instances_{train,val}2017.json``, images in ``train2017/`` and
    ``val2017/``) and ``out/demo.json`` (parameters, counts and the source digit of every
    cell). The folder is built under a temporary sibling name and renamed into place, so
    a killed run never leaves a folder that looks complete. When ``out`` already contains a
    complete demo set with the same parameters, nothing is rebuilt.

    Args:
        out: destination folder; it must be absent, empty or an earlier demo folder.
        n_train: number of training images (VOC trainval, COCO train2017).
        n_test: number of test images (VOC test, COCO val2017).
        seed: seed of the pool split and of the mosaic composition.
        cell: side of one grid cell in pixels; images are ``2 * cell`` pixels square.

    Returns:
        Summary dict with keys out, voc_root, coco_root, voc_splits, coco_splits,
        class_names, counts, label_cardinality (mean positive labels per image),
        params and built (False when an existing folder was kept).

    Raises:
        DatasetError: invalid parameters, or ``out`` contains files that are not a demo set.
    """
    out = Path(out).expanduser().resolve()
    params = _check_params(n_train, n_test, seed, cell)

    existing = _read_complete_demo(out, params)
    if existing is not None:
        logger.info("demo data in %s is complete for %s; keeping it", out, params)
        return _summary(out, existing, built=False)
    _check_replaceable(out)
    _remove_stale_temporaries(out)

    started = time.perf_counter()
    logger.info("building demo data in %s: %s", out, params)
    digits, targets = _load_source_digits()
    pools = split_pools(len(targets), seed)
    mosaics = {
        "train": compose_mosaics(digits, targets, pools["train"], n_train, cell, np.random.default_rng([seed, 1])),
        "test": compose_mosaics(digits, targets, pools["test"], n_test, cell, np.random.default_rng([seed, 2])),
    }
    image_ids = {
        "train": [f"{number:06d}" for number in range(1, n_train + 1)],
        "test": [f"{number:06d}" for number in range(n_train + 1, n_train + n_test + 1)],
    }

    temporary = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        _write_images(temporary, mosaics, image_ids)
        _write_voc_labels(temporary, mosaics, image_ids)
        _write_coco_annotations(temporary, mosaics, image_ids, cell)
        manifest = _manifest(params, mosaics, image_ids, pools)
        _write_json(temporary / "demo.json", manifest, indent=1)
        _move_into_place(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

    logger.info(
        "built demo data in %s: %d train and %d test images in %.1f s",
        out, n_train, n_test, time.perf_counter() - started,
    )
    return _summary(out, manifest, built=True)


def _check_params(n_train: int, n_test: int, seed: int, cell: int) -> dict:
    """Validate the parameters and return them as the dict stored in demo.json."""
    if n_train < 1 or n_test < 1:
        raise DatasetError(f"demo image counts must be at least 1, got n_train={n_train}, n_test={n_test}")
    if n_train + n_test > MAX_IMAGES:
        raise DatasetError(f"demo image counts n_train + n_test = {n_train + n_test} exceed {MAX_IMAGES}; use fewer images")
    if cell < MIN_CELL:
        raise DatasetError(f"demo cell size {cell} px is below {MIN_CELL} px; use a larger cell")
    return {"format_version": DEMO_FORMAT_VERSION, "n_train": n_train, "n_test": n_test, "seed": seed, "cell": cell}


# --- Composition --------------------------------------------------------------------------


def _load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits: float64 [1797, 8, 8] in 0..16 and int [1797] classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def split_pools(count: int, seed: int) -> dict[str, np.ndarray]:
    """Split source digit indices 0..count-1 into disjoint sorted train and test pools."""
    order = np.random.default_rng([seed, 0]).permutation(count)
    train_size = int(round(count * TRAIN_POOL_FRACTION))
    return {"train": np.sort(order[:train_size]), "test": np.sort(order[train_size:])}


def compose_mosaics(
    digits: np.ndarray,
    targets: np.ndarray,
    pool: np.ndarray,
    count: int,
    cell: int,
    rng: np.random.Generator,
) -> list[Mosaic]:
    """Compose ``count`` mosaics from the digits in ``pool``.

    Each mosaic gets 1 to 4 distinct classes, each in a distinct random cell, and for each
    class a random source digit of that class from the pool.
    """
    by_class = [pool[targets[pool] == digit] for digit in range(len(DEMO_CLASS_NAMES))]
    mosaics = []
    for _ in range(count):
        filled = int(rng.integers(1, GRID * GRID + 1))
        classes = rng.choice(len(DEMO_CLASS_NAMES), size=filled, replace=False)
        cells = rng.choice(GRID * GRID, size=filled, replace=False)

        pixels = np.zeros((GRID * cell, GRID * cell), dtype=np.uint8)
        labels = np.full(len(DEMO_CLASS_NAMES), -1, dtype=np.int8)
        placed = []
        for cell_index, digit_class in zip(cells.tolist(), classes.tolist()):
            source = int(rng.choice(by_class[digit_class]))
            row, column = divmod(cell_index, GRID)
            pixels[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell] = upscale_digit(digits[source], cell)
            labels[digit_class] = 1
            placed.append((cell_index, digit_class, source))

        mosaics.append(Mosaic(pixels=pixels, labels=labels, digits=sorted(placed)))
    return mosaics


def upscale_digit(digit: np.ndarray, cell: int) -> np.ndarray:
    """Scale an 8x8 digit in 0..16 to uint8 [cell, cell] in 0..255 with bicubic filtering."""
    grey = np.round(digit * (255.0 / 16.0)).astype(np.uint8)
    return np.asarray(Image.fromarray(grey).resize((cell, cell), Image.Resampling.BICUBIC))


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    """Encode a grey uint8 [H, W] image as an RGB JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# --- Writing ------------------------------------------------------------------------------


def _write_images(folder: Path, mosaics: dict[str, list[Mosaic]], image_ids: dict[str, list[str]]) -> None:
    """Write every mosaic once into VOC JPEGImages/ and once into the COCO image folder."""
    voc_images = folder / "VOCdevkit" / "VOC2007" / "JPEGImages"
    voc_images.mkdir(parents=True)
    for split, split_mosaics in mosaics.items():
        coco_images = folder / "coco" / f"{COCO_SPLITS[split]}{COCO_YEAR}"
        coco_images.mkdir(parents=True)
        for image_id, mosaic in zip(image_ids[split], split_mosaics):
            encoded = _encode_jpeg(mosaic.pixels)
            (voc_images / f"{image_id}.jpg").write_bytes(encoded)
            (coco_images / f"{image_id}.jpg").write_bytes(encoded)


def _write_voc_labels(folder: Path, mosaics: dict[str, list[Mosaic]], image_ids: dict[str, list[str]]) -> None:
    """Write ImageSets/Main/<split>.txt and <class>_<split>.txt in the VOC line format."""
    main_dir = folder / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    main_dir.mkdir(parents=True)
    for split, split_mosaics in mosaics.items():
        voc_split = VOC_SPLITS[split]
        ids = image_ids[split]
        (main_dir / f"{voc_split}.txt").write_text("".join(f"{image_id}\n" for image_id in ids))
        for column, name in enumerate(DEMO_CLASS_NAMES):
            lines = [f"{image_id} {int(mosaic.labels[column]):2d}\n" for image_id, mosaic in zip(ids, split_mosaics)]
            (main_dir / f"{name}_{voc_split}.txt").write_text("".join(lines))


def _write_coco_annotations(
    folder: Path, mosaics: dict[str, list[Mosaic]], image_ids: dict[str, list[str]], cell: int
) -> None:
    """Write instances_<split>2017.json with one box annotation per filled cell."""
    annotation_dir = folder / "coco" / "annotations"
    annotation_dir.mkdir(parents=True)
    categories = [
        {"id": column + 1, "name": name, "supercategory": "digit"} for column, name in enumerate(DEMO_CLASS_NAMES)
    ]
    for split, split_mosaics in mosaics.items():
        images = []
        annotations = []
        for image_id, mosaic in zip(image_ids[split], split_mosaics):
            images.append({"id": int(image_id), "file_name": f"{image_id}.jpg", "width": GRID * cell, "height": GRID * cell})
            for cell_index, digit_class, _ in mosaic.digits:
                annotations.append(_cell_annotation(len(annotations) + 1, int(image_id), cell_index, digit_class, cell))

        document = {
            "info": {"description": "mlprobe demo: 2x2 mosaics of scikit-learn handwritten digits"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        _write_json(annotation_dir / f"instances_{COCO_SPLITS[split]}{COCO_YEAR}.json", document)


def _cell_annotation(annotation_id: int, image_id: int, cell_index: int, digit_class: int, cell: int) -> dict:
    """Return the COCO annotation of one filled cell, whose box is the whole cell in pixels."""
    row, column = divmod(cell_index, GRID)
    x, y = column * cell, row * cell
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": digit_class + 1,
        "bbox": [x, y, cell, cell],
        "area": cell * cell,
        "iscrowd": 0,
        "segmentation": [[x, y, x + cell, y, x + cell, y + cell, x, y + cell]],
    }


def _manifest(
    params: dict,
    mosaics: dict[str, list[Mosaic]],
    image_ids: dict[str, list[str]],
    pools: dict[str, np.ndarray],
) -> dict:
    """Return the demo.json content: parameters, counts and the source digits per image."""
    return {
        "params": params,
        "class_names": list(DEMO_CLASS_NAMES),
        "counts": {split: len(split_mosaics) for split, split_mosaics in mosaics.items()},
        "label_cardinality": {
            split: float(np.mean([(mosaic.labels == 1).sum() for mosaic in split_mosaics]))
            for split, split_mosaics in mosaics.items()
        },
        "source_pools": {split: pool.tolist() for split, pool in pools.items()},
        "sources": {
            split: {
                image_id: [list(placed) for placed in mosaic.digits]
                for image_id, mosaic in zip(image_ids[split], split_mosaics)
            }
            for split, split_mosaics in mosaics.items()
        },
    }


def _write_json(path: Path, document: dict, indent: int | None = None) -> None:
    """Write a JSON file with a trailing newline."""
    path.write_text(json.dumps(document, indent=indent) + "\n", encoding="utf-8")


# --- Folder handling ----------------------------------------------------------------------


def _required_files(out: Path) -> list[Path]:
    """Return files whose presence marks a complete demo folder."""
    main_dir = out / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    annotation_dir = out / "coco" / "annotations"
    return [
        out / "demo.json",
        main_dir / "trainval.txt",
        main_dir / "test.txt",
        annotation_dir / f"instances_train{COCO_YEAR}.json",
        annotation_dir / f"instances_val{COCO_YEAR}.json",
    ]


def _read_complete_demo(out: Path, params: dict) -> dict | None:
    """Return demo.json of ``out`` when it is complete and was built with ``params``."""
    if not all(path.is_file() for path in _required_files(out)):
        return None
    try:
        manifest = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("%s is unreadable (%s); rebuilding the demo data", out / "demo.json", error)
        return None
    if manifest.get("params") != params:
        logger.info("demo data in %s was built with %s; rebuilding with %s", out, manifest.get("params"), params)
        return None
    return manifest


def _check_replaceable(out: Path) -> None:
    """Raise DatasetError when ``out`` contains files that are not an earlier demo set."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"demo output {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / "demo.json").is_file():
        raise DatasetError(
            f"demo output folder {out} is not empty and contains no demo.json; "
            f"pass an empty or new folder so that no other files are replaced"
        )


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary siblings of ``out`` left by demo builds whose process has ended."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _process_alive(int(pid)):
            continue
        logger.info("removing %s, left by an interrupted demo build", path)
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """Return whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(temporary: Path, out: Path) -> None:
    """Rename the finished folder to ``out``, replacing an earlier demo folder there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.replace(temporary, out)
        return

    previous = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(out, previous)
    os.replace(temporary, out)
    shutil.rmtree(previous, ignore_errors=True)


def _summary(out: Path, manifest: dict, *, built: bool) -> dict:
    """Return the summary of a demo folder from its demo.json content."""
    return {
        "out": str(out),
        "voc_root": str(out / "VOCdevkit"),
        "coco_root": str(out / "coco"),
        "voc_splits": dict(VOC_SPLITS),
        "coco_splits": dict(COCO_SPLITS),
        "class_names": list(manifest["class_names"]),
        "counts": dict(manifest["counts"]),
        "label_cardinality": dict(manifest["label_cardinality"]),
        "params": dict(manifest["params"]),
        "built": built,
    }
