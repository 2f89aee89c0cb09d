"""Tests of the VOC, COCO and CSV readers on generated images and annotation files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlprobe.errors import DatasetError
from mlprobe.extract.datasets import DATASETS, load_split, load_splits
from mlprobe.extract.demo_data import DEMO_CLASS_NAMES, build_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Small demo dataset in both layouts: 12 train and 8 test images."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    build_demo_data(out, n_train=12, n_test=8, seed=0, cell=16)
    return out


def write_image(path: Path, shade: int = 128) -> None:
    """Write a small RGB JPEG, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(path, format="JPEG")


def write_voc(root: Path, split: str, labels: dict[str, dict[str, int]]) -> Path:
    """Write a VOCdevkit layout under root from {class: {image id: label}}; return its VOC2007 folder."""
    voc_dir = root / "VOCdevkit" / "VOC2007"
    main_dir = voc_dir / "ImageSets" / "Main"
    main_dir.mkdir(parents=True, exist_ok=True)
    for name, column in labels.items():
        lines = "".join(f"{image_id} {label:2d}\n" for image_id, label in column.items())
        (main_dir / f"{name}_{split}.txt").write_text(lines)
    for image_id in next(iter(labels.values())):
        write_image(voc_dir / "JPEGImages" / f"{image_id}.jpg")
    return voc_dir


def write_coco(root: Path, split: str, document: dict, year: str = "2017") -> None:
    """Write annotations/instances_<split><year>.json and one JPEG per listed image."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(document))
    for image in document["images"]:
        write_image(root / f"{split}{year}" / image["file_name"])


def write_csv_dataset(root: Path, rows: list[str], images: list[str], classes: list[str] | None = None) -> None:
    """Write root/train.csv with the given data rows, the listed images and optional classes.txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text("image,labels\n" + "".join(f"{row}\n" for row in rows))
    for image in images:
        write_image(root / "images" / image)
    if classes is not None:
        (root / "classes.txt").write_text("".join(f"{name}\n" for name in classes))


# --- VOC ----------------------------------------------------------------------------------


def test_voc_reads_demo_splits(demo):
    trainval = load_split("voc2007", demo, "trainval")
    test = load_split("voc2007", demo, "test")

    assert trainval.dataset == "voc2007"
    assert trainval.class_names == list(DEMO_CLASS_NAMES)
    assert len(trainval.samples) == 12
    assert len(test.samples) == 8
    assert trainval.samples[0].image_id == "000001"
    assert test.samples[0].image_id == "000013"
    labels = trainval.labels()
    assert labels.dtype == np.int8
    assert labels.shape == (12, 10)
    positives = (labels == 1).sum(axis=1)
    assert positives.min() >= 1
    assert positives.max() <= 4
    assert all(sample.path.is_absolute() and sample.path.is_file() for sample in trainval.samples)


def test_voc_accepts_three_roots(demo):
    expected = [sample.image_id for sample in load_split("voc2007", demo, "test").samples]

    for root in (demo / "VOCdevkit", demo / "VOCdevkit" / "VOC2007"):
        found = load_split("voc2007", root, "test")
        assert [sample.image_id for sample in found.samples] == expected


def test_voc_keeps_difficult_as_zero(tmp_path):
    write_voc(tmp_path, "trainval", {
        "cat": {"000001": 1, "000002": 0},
        "dog": {"000001": -1, "000002": -1},
    })

    found = load_split("voc2007", tmp_path, "trainval")

    assert found.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(found.labels(), np.array([[1, -1], [0, -1]], dtype=np.int8))
    assert found.info["difficult_labels"] == 1


def test_voc_class_files_disagree(tmp_path):
    write_voc(tmp_path, "trainval", {
        "cat": {"000001": 1, "000002": -1},
        "dog": {"000001": -1},
    })

    with pytest.raises(DatasetError, match="dog_trainval.txt lists other image ids"):
        load_split("voc2007", tmp_path, "trainval")


def test_voc_invalid_label_line(tmp_path):
    voc_dir = write_voc(tmp_path, "trainval", {"cat": {"000001": 1}})
    (voc_dir / "ImageSets" / "Main" / "cat_trainval.txt").write_text("000001 2\n")

    with pytest.raises(DatasetError, match=r"cat_trainval.txt line 1: expected"):
        load_split("voc2007", tmp_path, "trainval")


def test_voc_missing_split(demo):
    with pytest.raises(DatasetError) as caught:
        load_split("voc2007", demo, "val")

    message = str(caught.value)
    assert "<class>_val.txt" in message
    assert "splits found there: test, trainval" in message
    assert "mlprobe download voc2007" in message


def test_voc_missing_imagesets(tmp_path):
    with pytest.raises(DatasetError) as caught:
        load_split("voc2007", tmp_path, "trainval")

    message = str(caught.value)
    assert str(tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main") in message
    assert "mlprobe download voc2007" in message


def test_voc_missing_image(tmp_path):
    voc_dir = write_voc(tmp_path, "trainval", {"cat": {"000001": 1, "000002": -1}})
    (voc_dir / "JPEGImages" / "000002.jpg").unlink()

    with pytest.raises(DatasetError, match=r"000002.jpg listed in .* not found \(1 of 2 images"):
        load_split("voc2007", tmp_path, "trainval")


def test_missing_root_names_path(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(DatasetError) as caught:
        load_split("voc2007", missing, "trainval")

    assert f"dataset root {missing} not found" in str(caught.value)
    assert "mlprobe download voc2007" in str(caught.value)


def test_unknown_dataset_lists_valid(tmp_path):
    with pytest.raises(DatasetError) as caught:
        load_split("imagenet", tmp_path, "train")

    assert "'imagenet'" in str(caught.value)
    for name in DATASETS:
        assert name in str(caught.value)


# --- COCO ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("voc_split", "coco_split"), [("trainval", "train"), ("test", "val")])
def test_coco_labels_match_voc(demo, voc_split, coco_split):
    voc = load_split("voc2007", demo, voc_split)
    coco = load_split("coco2017", demo / "coco", coco_split)

    assert coco.class_names == voc.class_names
    assert [int(sample.image_id) for sample in coco.samples] == [int(sample.image_id) for sample in voc.samples]
    np.testing.assert_array_equal(coco.labels(), voc.labels())
    assert coco.info["images_without_annotations"] == 0
    for coco_sample, voc_sample in zip(coco.samples, voc.samples):
        assert coco_sample.path.read_bytes() == voc_sample.path.read_bytes()


def test_coco_image_without_annotations(tmp_path, capsys):
    document = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 8, "height": 8},
            {"id": 3, "file_name": "b.jpg", "width": 8, "height": 8},
            {"id": 5, "file_name": "c.jpg", "width": 8, "height": 8},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 9, "bbox": [2, 2, 2, 2], "area": 4, "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 1},
        ],
        "categories": [{"id": 9, "name": "zebra"}, {"id": 2, "name": "bicycle"}],
    }
    write_coco(tmp_path, "train", document)

    found = load_split("coco2017", tmp_path, "train")

    assert found.class_names == ["bicycle", "zebra"]
    assert [sample.image_id for sample in found.samples] == ["3", "5", "7"]
    np.testing.assert_array_equal(found.labels(), np.array([[1, -1], [-1, -1], [-1, 1]], dtype=np.int8))
    assert found.info["images_without_annotations"] == 1
    assert found.samples[1].path == tmp_path / "train2017" / "c.jpg"
    assert capsys.readouterr().out == ""


def test_coco_missing_annotation_file(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text("{}")

    with pytest.raises(DatasetError) as caught:
        load_split("coco2014", tmp_path, "train")

    message = str(caught.value)
    assert str(tmp_path / "annotations" / "instances_train2014.json") in message
    assert "instances_val2014.json" in message
    assert "mlprobe download coco2014" in message


def test_coco_invalid_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")

    with pytest.raises(DatasetError, match="instances_val2017.json is not valid JSON"):
        load_split("coco2017", tmp_path, "val")


def test_coco_empty_split(tmp_path):
    write_coco(tmp_path, "val", {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]})

    with pytest.raises(DatasetError, match="split 'val' of coco2017 is empty"):
        load_split("coco2017", tmp_path, "val")


def test_coco_missing_image(tmp_path):
    document = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}],
    }
    write_coco(tmp_path, "val", document)
    shutil.rmtree(tmp_path / "val2017")

    with pytest.raises(DatasetError, match=r"val2017/a.jpg listed in .*instances_val2017.json not found"):
        load_split("coco2017", tmp_path, "val")


# --- CSV ----------------------------------------------------------------------------------


def test_csv_union_of_class_names(tmp_path):
    write_csv_dataset(tmp_path, ["a.jpg,dog;cat", "b.jpg,", "c.jpg, dog "], ["a.jpg", "b.jpg", "c.jpg"])

    found = load_split("csv", tmp_path, "train")

    assert found.class_names == ["cat", "dog"]
    assert [sample.image_id for sample in found.samples] == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_array_equal(found.labels(), np.array([[1, 1], [-1, -1], [-1, 1]], dtype=np.int8))
    assert found.samples[0].path == tmp_path / "images" / "a.jpg"


def test_csv_classes_txt_sets_order(tmp_path):
    write_csv_dataset(tmp_path, ["a.jpg,cat", "b.jpg,dog"], ["a.jpg", "b.jpg"], classes=["dog", "bird", "cat"])

    found = load_split("csv", tmp_path, "train")

    assert found.class_names == ["dog", "bird", "cat"]
    np.testing.assert_array_equal(found.labels(), np.array([[-1, -1, 1], [1, -1, -1]], dtype=np.int8))


def test_csv_classes_file_argument(tmp_path):
    write_csv_dataset(tmp_path, ["a.jpg,cat"], ["a.jpg"], classes=["dog"])
    classes_file = tmp_path / "my_classes.txt"
    classes_file.write_text("cat\ndog\n")

    found = load_split("csv", tmp_path, "train", classes_file=classes_file)

    assert found.class_names == ["cat", "dog"]


def test_csv_unknown_class(tmp_path):
    write_csv_dataset(tmp_path, ["a.jpg,cat", "b.jpg,dgo"], ["a.jpg", "b.jpg"], classes=["cat", "dog"])

    with pytest.raises(DatasetError) as caught:
        load_split("csv", tmp_path, "train")

    message = str(caught.value)
    assert f"{tmp_path / 'train.csv'} line 3" in message
    assert "unknown class 'dgo'" in message
    assert "cat, dog" in message


def test_csv_missing_image(tmp_path):
    write_csv_dataset(tmp_path, ["a.jpg,cat", "b.jpg,cat"], ["a.jpg"])

    with pytest.raises(DatasetError) as caught:
        load_split("csv", tmp_path, "train")

    assert f"image {tmp_path / 'images' / 'b.jpg'} listed in {tmp_path / 'train.csv'} not found" in str(caught.value)


def test_csv_empty_split(tmp_path):
    write_csv_dataset(tmp_path, [], [])

    with pytest.raises(DatasetError, match="split 'train' of csv is empty"):
        load_split("csv", tmp_path, "train")


def test_csv_wrong_header(tmp_path):
    tmp_path.joinpath("train.csv").write_text("file,tags\na.jpg,cat\n")

    with pytest.raises(DatasetError, match="expected the header 'image,labels'"):
        load_split("csv", tmp_path, "train")


def test_csv_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=r"CSV file .*test.csv for split 'test' not found"):
        load_split("csv", tmp_path, "test")


def test_splits_with_different_classes_rejected(tmp_path):
    write_csv_dataset(tmp_path, ["a.jpg,dog;cat", "b.jpg,dog"], ["a.jpg", "b.jpg"])
    (tmp_path / "test.csv").write_text("image,labels\nb.jpg,dog\n")

    with pytest.raises(DatasetError) as raised:
        load_splits("csv", tmp_path, ["train", "test"])

    assert "'cat'" in str(raised.value)
    assert "classes.txt" in str(raised.value)


def test_splits_share_classes_file(tmp_path):
    write_csv_dataset(tmp_path, ["a.jpg,dog;cat", "b.jpg,dog"], ["a.jpg", "b.jpg"], classes=["cat", "dog"])
    (tmp_path / "test.csv").write_text("image,labels\nb.jpg,dog\n")

    train, test = load_splits("csv", tmp_path, ["train", "test"])

    assert train.class_names == test.class_names == ["cat", "dog"]
    assert test.samples[0].labels.tolist() == [-1, 1]
