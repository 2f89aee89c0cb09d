"""Tests of the digit-mosaic demo dataset writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlprobe.errors import DatasetError
from mlprobe.extract.datasets import load_split
from mlprobe.extract.demo_data import DEMO_CLASS_NAMES, build_demo_data

SMALL = {"n_train": 12, "n_test": 8, "cell": 16}


def label_files(out: Path) -> dict[str, bytes]:
    """Return the bytes of every VOC label file and COCO annotation file of a demo folder."""
    files = sorted((out / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main").glob("*.txt"))
    files += sorted((out / "coco" / "annotations").glob("*.json"))
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in files}


def read_manifest(out: Path) -> dict:
    """Return the parsed demo.json of a demo folder."""
    return json.loads((out / "demo.json").read_text())


def test_demo_same_seed_identical(tmp_path):
    build_demo_data(tmp_path / "a", seed=3, **SMALL)
    build_demo_data(tmp_path / "b", seed=3, **SMALL)

    first = label_files(tmp_path / "a")
    second = label_files(tmp_path / "b")
    assert len(first) == 2 + 2 * len(DEMO_CLASS_NAMES) + 2
    assert first == second
    image = Path("VOCdevkit/VOC2007/JPEGImages/000005.jpg")
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()


def test_demo_other_seed_differs(tmp_path):
    build_demo_data(tmp_path / "a", seed=0, **SMALL)
    build_demo_data(tmp_path / "b", seed=1, **SMALL)

    assert label_files(tmp_path / "a") != label_files(tmp_path / "b")


def test_demo_pools_disjoint(tmp_path):
    build_demo_data(tmp_path / "demo", n_train=60, n_test=40, seed=0, cell=16)

    manifest = read_manifest(tmp_path / "demo")
    train_pool = set(manifest["source_pools"]["train"])
    test_pool = set(manifest["source_pools"]["test"])
    assert not train_pool & test_pool
    assert len(train_pool | test_pool) == 1797
    train_used = {source for cells in manifest["sources"]["train"].values() for _, _, source in cells}
    test_used = {source for cells in manifest["sources"]["test"].values() for _, _, source in cells}
    assert train_used <= train_pool
    assert test_used <= test_pool


def test_demo_labels_match_sources(tmp_path):
    from sklearn.datasets import load_digits

    build_demo_data(tmp_path / "demo", seed=0, **SMALL)
    targets = load_digits().target
    manifest = read_manifest(tmp_path / "demo")
    found = load_split("voc2007", tmp_path / "demo", "trainval")

    for sample in found.samples:
        cells = manifest["sources"]["train"][sample.image_id]
        classes = [digit_class for _, digit_class, _ in cells]
        assert 1 <= len(cells) <= 4
        assert len(set(classes)) == len(classes)
        assert len({cell for cell, _, _ in cells}) == len(cells)
        assert all(targets[source] == digit_class for _, digit_class, source in cells)
        assert sorted(np.flatnonzero(sample.labels == 1).tolist()) == sorted(classes)


def test_demo_empty_cells_black(tmp_path):
    build_demo_data(tmp_path / "demo", seed=0, **SMALL)
    manifest = read_manifest(tmp_path / "demo")

    for image_id, cells in manifest["sources"]["train"].items():
        with Image.open(tmp_path / "demo" / "coco" / "train2017" / f"{image_id}.jpg") as image:
            assert image.mode == "RGB"
            assert image.size == (32, 32)
            pixels = np.asarray(image.convert("L"), dtype=np.int16)
        filled = {cell for cell, _, _ in cells}
        for cell in range(4):
            row, column = divmod(cell, 2)
            block = pixels[row * 16:(row + 1) * 16, column * 16:(column + 1) * 16]
            if cell in filled:
                assert block.max() > 100
            else:
                # JPEG ringing from a neighbouring digit can lift black pixels a little.
                assert block.mean() < 8


def test_demo_summary(tmp_path):
    summary = build_demo_data(tmp_path / "demo", seed=0, **SMALL)

    assert summary["built"] is True
    assert summary["counts"] == {"train": 12, "test": 8}
    assert summary["class_names"] == list(DEMO_CLASS_NAMES)
    assert 1.0 <= summary["label_cardinality"]["train"] <= 4.0
    assert Path(summary["voc_root"]) == tmp_path / "demo" / "VOCdevkit"
    coco = load_split("coco2017", summary["coco_root"], summary["coco_splits"]["test"])
    assert len(coco.samples) == 8


def test_demo_keeps_complete_folder(tmp_path):
    out = tmp_path / "demo"
    build_demo_data(out, seed=0, **SMALL)
    marker = out / "VOCdevkit" / "kept.txt"
    marker.write_text("present")

    summary = build_demo_data(out, seed=0, **SMALL)

    assert summary["built"] is False
    assert summary["counts"] == {"train": 12, "test": 8}
    assert marker.is_file()


def test_demo_rebuilds_on_new_params(tmp_path):
    out = tmp_path / "demo"
    build_demo_data(out, seed=0, **SMALL)

    summary = build_demo_data(out, n_train=5, n_test=3, seed=0, cell=16)

    assert summary["built"] is True
    assert len(load_split("voc2007", out, "trainval").samples) == 5
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo"]


def test_demo_rejects_foreign_folder(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not a demo")

    with pytest.raises(DatasetError, match="contains no demo.json"):
        build_demo_data(out, seed=0, **SMALL)
    assert (out / "holiday.jpg").is_file()


def test_demo_removes_stale_partial(tmp_path):
    # No process has this id, because Linux limits process ids to 2**22.
    stale = tmp_path / ".demo.partial-999999999"
    (stale / "VOCdevkit").mkdir(parents=True)

    build_demo_data(tmp_path / "demo", seed=0, **SMALL)

    assert not stale.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo"]


def test_demo_invalid_params(tmp_path):
    with pytest.raises(DatasetError, match="at least 1"):
        build_demo_data(tmp_path / "demo", n_train=0, n_test=8)
    with pytest.raises(DatasetError, match="cell size 4 px"):
        build_demo_data(tmp_path / "demo", n_train=2, n_test=2, cell=4)
