"""Readers that turn a dataset on disk into a list of labelled image paths.

Supported formats:

- ``voc2007``: the official VOCdevkit layout, labels from
  ``ImageSets/Main/<class>_<split>.txt`` (1 positive, -1 negative, 0 difficult).
- ``coco2014`` / ``coco2017``: ``annotations/instances_<split><year>.json`` read with
  pycocotools; an image is positive for every category with at least one annotation.
- ``csv``: ``<split>.csv`` with the header ``image,labels`` (class names separated by
  ``;``) next to an ``images/`` folder, with an optional ``classes.txt``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlprobe.errors import DatasetError

logger = logging.getLogger(__name__)

DATASETS = ("voc2007", "coco2014", "coco2017", "csv")
COCO_YEARS = {"coco2014": "2014", "coco2017": "2017"}
CSV_LABEL_SEPARATOR = ";"
CSV_HEADER = ["image", "labels"]


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    image_id: VOC id such as "000005", COCO image id as a string, or the CSV file name.
    path: absolute image path.
    labels: int8 [K], 1 = positive, -1 = negative, 0 = difficult.
    """

    image_id: str
    path: Path
    labels: np.ndarray


@dataclass
class Split:
    """The samples of one split of a dataset, with the class names in label order."""

    dataset: str
    split: str
    class_names: list[str]
    samples: list[Sample]
    info: dict = field(default_factory=dict)

    def labels(self) -> np.ndarray:
        """Stack the labels of all samples: int8 [N, K] in -1/0/1."""
        if not self.samples:
            return np.zeros((0, len(self.class_names)), dtype=np.int8)
        return np.stack([sample.labels for sample in self.samples]).astype(np.int8)


def load_split(dataset: str, root: Path, split: str, *, classes_file: Path | None = None) -> Split:
    """Read one split of a dataset from disk.

    Args:
        dataset: one of ``DATASETS``.
        root: dataset folder. For VOC it may be the folder holding ``VOCdevkit/``,
            ``VOCdevkit/`` itself, or ``VOCdevkit/VOC2007``.
        split: split name, for example ``trainval``/``test`` (VOC), ``train``/``val``
            (COCO) or the CSV file stem.
        classes_file: CSV only. Text file with one class name per line that fixes the
            class list and order, in place of ``root/classes.txt``.

    Returns:
        A Split whose samples carry absolute image paths and int8 [K] labels.

    Raises:
        DatasetError: unknown dataset, missing root, annotation file or image, an
            invalid annotation line, an unknown class name, or an empty split.
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")

    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} not found; pass the folder that contains the {dataset} data"
            f"{_download_hint(dataset, root)}"
        )
    if classes_file is not None and dataset != "csv":
        raise DatasetError(f"classes_file {classes_file} applies to the csv dataset only, not {dataset}")

    started = time.perf_counter()
    logger.info("reading %s split %r from %s", dataset, split, root)
    if dataset == "voc2007":
        result = _load_voc(root, split)
    elif dataset in COCO_YEARS:
        result = _load_coco(dataset, root, split)
    else:
        result = _load_csv(root, split, classes_file)

    _check_images_exist(result)
    logger.info(
        "read %s split %r: %d images, %d classes in %.2f s",
        dataset, split, len(result.samples), len(result.class_names), time.perf_counter() - started,
    )
    return result



def load_splits(dataset: str, root: Path, splits: list[str], *, classes_file: Path | None = None) -> list[Split]:
    """Read several splits with load_split and check that they share one class list.

    Every split is read before any work starts, so a missing or empty split is
    reported at once rather than after the others were extracted.

    Raises:
        DatasetError: as load_split, or when two splits have different class lists.
    """
    loaded = [load_split(dataset, root, split, classes_file=classes_file) for split in splits]

    first = loaded[0]
    for split in loaded[1:]:
        if split.class_names != first.class_names:
            differing = sorted(set(first.class_names) ^ set(split.class_names)) or "same names, other order"
            raise DatasetError(
                f"splits {first.split!r} and {split.split!r} of {root} have different class lists "
                f"(differing: {differing}); write one class name per line into {Path(root) / 'classes.txt'} "
                "or pass --classes FILE"
            )
    return loaded

def _download_hint(dataset: str, root: Path) -> str:
    """Return the clause that points to `mlprobe download` for datasets it can fetch."""
    if dataset == "csv":
        return ""
    return f", or fetch it with `mlprobe download {dataset} --root {root}`"


def _check_not_empty(dataset: str, split: str, source: Path, count: int) -> None:
    """Raise DatasetError when the annotation file of a split lists no images."""
    if count == 0:
        raise DatasetError(f"split {split!r} of {dataset} is empty: {source} lists no images; check the file or pick another split")


def _check_images_exist(result: Split) -> None:
    """Raise DatasetError naming the first listed image that is not on disk."""
    missing = [sample.path for sample in result.samples if not sample.path.is_file()]
    if missing:
        raise DatasetError(
            f"image {missing[0]} listed in {result.info['annotation_file']} not found "
            f"({len(missing)} of {len(result.samples)} images of split {result.split!r} missing); "
            f"restore the image files or remove them from the annotations"
        )


# --- Pascal VOC ---------------------------------------------------------------------------


def find_voc_dir(root: Path) -> Path:
    """Locate the VOC2007 folder from root, VOCdevkit/ or VOCdevkit/VOC2007.

    Raises:
        DatasetError: none of the three contains ``ImageSets/Main``.
    """
    candidates = [root / "VOCdevkit" / "VOC2007", root / "VOC2007", root]
    for candidate in candidates:
        if (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    raise DatasetError(
        f"no VOC 2007 annotations under {root}: expected {root / 'VOCdevkit/VOC2007/ImageSets/Main'} "
        f"and {root / 'VOCdevkit/VOC2007/JPEGImages'}; extract VOCtrainval_06-Nov-2007.tar and "
        f"VOCtest_06-Nov-2007.tar there{_download_hint('voc2007', root)}"
    )


def _load_voc(root: Path, split: str) -> Split:
    """Read VOC labels of one split from ImageSets/Main/<class>_<split>.txt."""
    voc_dir = find_voc_dir(root)
    main_dir = voc_dir / "ImageSets" / "Main"

    suffix = f"_{split}.txt"
    class_files = sorted(path for path in main_dir.glob(f"*{suffix}") if path.is_file())
    if not class_files:
        available = _voc_splits(main_dir)
        raise DatasetError(
            f"no VOC class files {main_dir}/<class>{suffix} for split {split!r} "
            f"(splits found there: {', '.join(available) or 'none'}); extract the archive that contains "
            f"this split into {voc_dir.parent.parent}{_download_hint('voc2007', voc_dir.parent.parent)}"
        )
    class_names = [path.name[: -len(suffix)] for path in class_files]

    columns = [_read_voc_class_file(path) for path in class_files]
    image_ids = list(columns[0])
    _check_not_empty("voc2007", split, class_files[0], len(image_ids))
    _check_same_ids(class_files, columns)

    labels = np.array([[column[image_id] for column in columns] for image_id in image_ids], dtype=np.int8)

    image_dir = voc_dir / "JPEGImages"
    samples = [
        Sample(image_id=image_id, path=image_dir / f"{image_id}.jpg", labels=labels[row])
        for row, image_id in enumerate(image_ids)
    ]
    info = {
        "annotation_file": str(main_dir / f"<class>{suffix}"),
        "difficult_labels": int((labels == 0).sum()),
    }
    return Split(dataset="voc2007", split=split, class_names=class_names, samples=samples, info=info)


def _voc_splits(main_dir: Path) -> list[str]:
    """Return the split names that have a plain <split>.txt id list in ImageSets/Main."""
    return sorted(path.stem for path in main_dir.glob("*.txt") if "_" not in path.stem)


def _read_voc_class_file(path: Path) -> dict[str, int]:
    """Parse "<id> <1|-1|0>" lines into {image_id: label} in file order."""
    labels: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("1", "-1", "0"):
                raise DatasetError(
                    f"{path} line {line_number}: expected '<image id> <1|-1|0>', found {line.strip()!r}; "
                    f"restore the file from the VOC archive"
                )
            if fields[0] in labels:
                raise DatasetError(f"{path} line {line_number}: image id {fields[0]} listed twice; remove the duplicate")
            labels[fields[0]] = int(fields[1])
    return labels


def _check_same_ids(class_files: list[Path], columns: list[dict[str, int]]) -> None:
    """Raise DatasetError when a class file lists other image ids than the first one."""
    reference = set(columns[0])
    for path, column in zip(class_files[1:], columns[1:]):
        ids = set(column)
        if ids != reference:
            extra = sorted(ids - reference)[:3]
            lacking = sorted(reference - ids)[:3]
            raise DatasetError(
                f"{path} lists other image ids than {class_files[0]} (extra: {extra}, missing: {lacking}); "
                f"every class file of a split must list the same images, so restore the files from the VOC archive"
            )


# --- MS-COCO ------------------------------------------------------------------------------


def _load_coco(dataset: str, root: Path, split: str) -> Split:
    """Read COCO image-level labels of one split through pycocotools."""
    year = COCO_YEARS[dataset]
    annotation_file = root / "annotations" / f"instances_{split}{year}.json"
    if not annotation_file.is_file():
        found = sorted(path.name for path in (root / "annotations").glob("instances_*.json"))
        raise DatasetError(
            f"COCO annotation file {annotation_file} not found (instances files there: "
            f"{', '.join(found) or 'none'}); extract annotations_trainval{year}.zip into {root}"
            f"{_download_hint(dataset, root)}"
        )

    coco = _read_coco(annotation_file)
    category_ids = sorted(coco.cats)
    class_names = [coco.cats[category_id]["name"] for category_id in category_ids]
    column_of = {category_id: column for column, category_id in enumerate(category_ids)}

    image_ids = sorted(coco.imgs)
    _check_not_empty(dataset, split, annotation_file, len(image_ids))
    labels = np.full((len(image_ids), len(category_ids)), -1, dtype=np.int8)
    for row, image_id in enumerate(image_ids):
        for annotation in coco.imgToAnns.get(image_id, []):
            column = column_of.get(annotation["category_id"])
            if column is None:
                raise DatasetError(
                    f"{annotation_file}: annotation {annotation['id']} has category_id "
                    f"{annotation['category_id']}, which is not in 'categories'; fix the annotation file"
                )
            labels[row, column] = 1

    without_annotations = int((labels == -1).all(axis=1).sum())
    if without_annotations:
        logger.info(
            "%s: %d of %d images have no annotations and stay in as all-negative",
            annotation_file, without_annotations, len(image_ids),
        )

    image_dir = root / f"{split}{year}"
    samples = [
        Sample(image_id=str(image_id), path=image_dir / coco.imgs[image_id]["file_name"], labels=labels[row])
        for row, image_id in enumerate(image_ids)
    ]
    info = {"annotation_file": str(annotation_file), "images_without_annotations": without_annotations}
    return Split(dataset=dataset, split=split, class_names=class_names, samples=samples, info=info)


def _read_coco(annotation_file: Path):
    """Load a COCO annotation file, sending pycocotools' stdout messages to the log."""
    from pycocotools.coco import COCO

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            coco = COCO(str(annotation_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"COCO annotation file {annotation_file} is not valid JSON ({error}); download it again") from error
    except (AssertionError, KeyError, TypeError) as error:
        raise DatasetError(
            f"COCO annotation file {annotation_file} lacks the images/annotations/categories lists "
            f"({type(error).__name__}: {error}); use an instances_*.json file"
        ) from error
    finally:
        for line in captured.getvalue().splitlines():
            logger.debug("pycocotools: %s", line)
    return coco


# --- CSV ----------------------------------------------------------------------------------


def _load_csv(root: Path, split: str, classes_file: Path | None) -> Split:
    """Read <split>.csv (columns image,labels) with images under root/images/."""
    csv_file = root / f"{split}.csv"
    if not csv_file.is_file():
        found = sorted(path.name for path in root.glob("*.csv"))
        raise DatasetError(
            f"CSV file {csv_file} for split {split!r} not found (CSV files there: {', '.join(found) or 'none'}); "
            f"write it with the header 'image,labels' and class names separated by '{CSV_LABEL_SEPARATOR}'"
        )

    class_source = classes_file if classes_file is not None else root / "classes.txt"
    if classes_file is not None and not Path(classes_file).is_file():
        raise DatasetError(f"classes file {classes_file} not found; pass a text file with one class name per line")
    known_classes = _read_class_list(Path(class_source)) if Path(class_source).is_file() else None

    rows = _read_csv_rows(csv_file)
    _check_not_empty("csv", split, csv_file, len(rows))

    if known_classes is None:
        class_names = sorted({name for _, _, names in rows for name in names})
        logger.info("%s: no class list given, using the %d class names found in the file", csv_file, len(class_names))
    else:
        class_names = known_classes
    column_of = {name: column for column, name in enumerate(class_names)}

    image_dir = root / "images"
    samples = []
    for line_number, image, names in rows:
        labels = np.full(len(class_names), -1, dtype=np.int8)
        for name in names:
            if name not in column_of:
                raise DatasetError(
                    f"{csv_file} line {line_number}: unknown class {name!r}; known classes "
                    f"(from {class_source}): {', '.join(class_names)}; fix the name or add it to the class list"
                )
            labels[column_of[name]] = 1
        samples.append(Sample(image_id=image, path=image_dir / image, labels=labels))

    info = {"annotation_file": str(csv_file), "classes_file": str(class_source) if known_classes else None}
    return Split(dataset="csv", split=split, class_names=class_names, samples=samples, info=info)


def _read_class_list(path: Path) -> list[str]:
    """Read one class name per line and skip blank lines.

    Raises:
        DatasetError: the file is empty or lists a name twice.
    """
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"classes file {path} lists {', '.join(duplicates)} more than once; keep one line per class")
    if not names:
        raise DatasetError(f"classes file {path} is empty; write one class name per line")
    return names


def _read_csv_rows(csv_file: Path) -> list[tuple[int, str, list[str]]]:
    """Parse a split CSV into (line number, image file name, class names) rows."""
    rows: list[tuple[int, str, list[str]]] = []
    seen: dict[str, int] = {}
    with csv_file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [cell.strip() for cell in next(reader, [])]
        if header != CSV_HEADER:
            raise DatasetError(f"{csv_file} line 1: expected the header 'image,labels', found {','.join(header)!r}; add that header")

        for record in reader:
            if not record or not any(cell.strip() for cell in record):
                continue
            if len(record) > 2:
                raise DatasetError(
                    f"{csv_file} line {reader.line_num}: expected 2 columns, found {len(record)}; "
                    f"separate class names with '{CSV_LABEL_SEPARATOR}', not ','"
                )
            image = record[0].strip()
            label_field = record[1] if len(record) > 1 else ""
            names = [name.strip() for name in label_field.split(CSV_LABEL_SEPARATOR) if name.strip()]
            if image in seen:
                raise DatasetError(
                    f"{csv_file} line {reader.line_num}: image {image} already listed on line {seen[image]}; "
                    f"merge its labels into one row"
                )
            seen[image] = reader.line_num
            rows.append((reader.line_num, image, names))
    return rows
