"""End to end: demo images through the VOC and COCO readers, extraction, probing and live use."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlprobe.cli import cli
from mlprobe.extract.datasets import load_split
from mlprobe.extract.demo_data import build_demo_data
from mlprobe.extract.images import ImageDataset
from mlprobe.extract.loop import extract_split
from mlprobe.features import FeatureStore
from mlprobe.features.layout import store_dir
from mlprobe.probe.classifier import load_classifier
from mlprobe.probe.heads import load_head
from mlprobe.probe.run import run_probe

MODEL = "tf_efficientnet_lite0"
IMAGE_SIZE = 64
STAGES = 5  # tf_efficientnet_lite0 has five stages after the stem
SWEEP = {"heads": ["linear", "layover"], "lrs": [0.1], "weight_decays": [0.0], "normalizations": ["none"],
         "epochs": 4, "batch_size": 16}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Tiny demo data and the stores extracted from its VOC and COCO layouts."""
    root = tmp_path_factory.mktemp("pipeline")
    summary = build_demo_data(root / "data", n_train=48, n_test=32, seed=3)

    stores = {}
    for dataset, data_root in (("voc2007", summary["voc_root"]), ("coco2017", summary["coco_root"])):
        for role, split_name in (("train", "trainval" if dataset == "voc2007" else "train"),
                                 ("test", "test" if dataset == "voc2007" else "val")):
            split = load_split(dataset, data_root, split_name)
            stores[dataset, role] = extract_split(split, model_name=MODEL, image_size=IMAGE_SIZE,
                                                  out_root=root / "features", batch_size=16, workers=0,
                                                  shard_size=20, progress=False)
    return {"root": root, "summary": summary, "stores": stores}


def test_voc_and_coco_stores_agree(demo):
    voc = FeatureStore.open(demo["stores"]["voc2007", "train"])
    coco = FeatureStore.open(demo["stores"]["coco2017", "train"])

    assert voc.num_images == coco.num_images == 48
    assert voc.feature_names == [f"stage{index}" for index in range(STAGES)] + ["final"]
    assert len(voc.manifest["shards"]) == 3
    np.testing.assert_array_equal(voc.read_labels(), coco.read_labels())
    for name in voc.feature_names:
        np.testing.assert_array_equal(voc.read_features(name), coco.read_features(name))


@pytest.mark.parametrize("dataset", ["voc2007", "coco2017"])
def test_probe_writes_every_stage(demo, dataset, tmp_path):
    stores = demo["stores"]
    rows = run_probe([(stores[dataset, "train"], stores[dataset, "test"])], tmp_path, **SWEEP)

    with open(tmp_path / "results.csv", newline="") as file:
        table = list(csv.DictReader(file))
    heads = sorted((row["head"], row["where"]) for row in table)
    assert heads == [("layover", str(where)) for where in range(STAGES)] + [("linear", "")]
    assert len(rows) == len(table)
    for column in ("model", "seed", "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "best_epoch", "lr",
                   "weight_decay", "normalization", "selected_on", "val_mAP"):
        assert column in table[0]
    for row in table:
        assert 0.0 <= float(row["mAP"]) <= 1.0
        assert 1 <= int(row["best_epoch"]) <= SWEEP["epochs"]
    for name in ("results.json", "sweep.csv", "metrics.jsonl", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_cached_head_equals_live_forward(demo, tmp_path):
    stores = demo["stores"]
    run_probe([(stores["voc2007", "train"], stores["voc2007", "test"])], tmp_path, **SWEEP)
    head_file = tmp_path / "heads" / f"{MODEL}__layover@2__seed0.pt"
    head, _ = load_head(head_file)
    classifier = load_classifier(head_file)

    test_store = FeatureStore.open(stores["voc2007", "test"])
    cached = {name: torch.from_numpy(test_store.read_features(name)[:, 0].astype(np.float32))
              for name in test_store.feature_names}
    split = load_split("voc2007", demo["summary"]["voc_root"], "test")
    images = torch.stack([ImageDataset(split.samples, classifier.preprocessing)[index][1] for index in range(8)])

    with torch.inference_mode():
        cached_logits = head({name: value[:8] for name, value in cached.items()})
        live_logits = classifier(images)

    assert test_store.read_image_ids()[:8] == [sample.image_id for sample in split.samples[:8]]
    # The store keeps features in float16, so logits agree to float16 precision.
    torch.testing.assert_close(live_logits, cached_logits, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(live_logits[0], live_logits[1])


def test_cli_extract_probe_predict(demo, tmp_path):
    data = Path(demo["summary"]["coco_root"])
    runner = CliRunner()
    common = ["--dataset", "coco2017", "--model", MODEL, "--image-size", str(IMAGE_SIZE)]

    extracted = runner.invoke(cli, ["extract", "--root", str(data), "--out", str(tmp_path / "features"),
                                    "--workers", "0", "--no-progress", *common])
    assert extracted.exit_code == 0, extracted.output
    assert store_dir(tmp_path / "features", "coco2017", MODEL, IMAGE_SIZE, "val").joinpath("manifest.json").exists()

    probed = runner.invoke(cli, ["probe", "--features", str(tmp_path / "features"), "--out", str(tmp_path / "run"),
                                 "--head", "linear", "--lr", "0.1", "--weight-decay", "0", "--normalization", "none",
                                 "--epochs", "2", "--no-progress", *common])
    assert probed.exit_code == 0, probed.output
    assert "| linear |" in probed.output

    image = next((data / "val2017").iterdir())
    predicted = runner.invoke(cli, ["predict", "--head", str(tmp_path / "run" / "heads" / f"{MODEL}__linear__seed0.pt"),
                                    "--threshold", "0", str(image)])
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.startswith(f"{image}: ")
    assert predicted.output.count("digit") == 10


def test_cli_reports_missing_root_in_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["extract", "--dataset", "voc2007", "--root", str(tmp_path / "absent"),
                                      "--model", MODEL])

    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert str(tmp_path / "absent") in result.output


def test_cli_predict_rejects_non_head_file(tmp_path):
    not_a_head = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, not_a_head)
    image = tmp_path / "image.png"
    image.write_bytes(b"")

    result = CliRunner().invoke(cli, ["predict", "--head", str(not_a_head), str(image)])

    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "is not a head weight file" in result.output


def test_cli_probe_lists_existing_stores(demo, tmp_path):
    result = CliRunner().invoke(cli, ["probe", "--features", str(demo["root"] / "features"), "--dataset", "voc2007",
                                      "--model", MODEL, "--image-size", "999", "--out", str(tmp_path)])

    assert result.exit_code == 1
    assert f"{MODEL}-999" in result.output
    assert f"{MODEL}-{IMAGE_SIZE}/trainval" in result.output
    assert not any(tmp_path.iterdir())


def test_probe_two_models_side_by_side(demo, tmp_path):
    split = load_split("voc2007", demo["summary"]["voc_root"], "trainval")
    test_split = load_split("voc2007", demo["summary"]["voc_root"], "test")
    other = [extract_split(item, model_name="resnet10t", image_size=IMAGE_SIZE, out_root=tmp_path / "features",
                           batch_size=16, workers=0, shard_size=64, random_weights=True, progress=False)
             for item in (split, test_split)]
    stores = demo["stores"]

    rows = run_probe([(stores["voc2007", "train"], stores["voc2007", "test"]), tuple(other)], tmp_path / "run",
                     **{**SWEEP, "heads": ["linear"]})

    assert sorted(row["model"] for row in rows) == ["resnet10t", MODEL]
    with open(tmp_path / "run" / "results.csv", newline="") as file:
        assert sorted(row["model"] for row in csv.DictReader(file)) == ["resnet10t", MODEL]
    assert len(list((tmp_path / "run" / "heads").glob("*.pt"))) == 2
