"""The HDF5 feature store: writing, reading, checksums, manifests and compatibility checks."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from mlprobe.errors import StoreError
from mlprobe.features import FeatureStore, ShardWriter, check_compatible, store_dir
from mlprobe.features.layout import model_slug, shard_name, sidecar_name
from mlprobe.features.manifest import build_manifest, read_manifest, write_manifest
from mlprobe.features.writer import find_complete_shard

FEATURE_DIMS = {"stage0": 3, "stage1": 5, "final": 4}
CLASS_NAMES = ["cat", "dog"]


def store_config(**changes):
    config = {
        "dataset": "toy",
        "split": "train",
        "model": "resnet10t",
        "weights_fingerprint": "ab" * 32,
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "class_names": list(CLASS_NAMES),
        "feature_names": list(FEATURE_DIMS),
        "feature_dims": dict(FEATURE_DIMS),
        "views": 1,
        "shard_size": 4,
    }
    config.update(changes)
    return config


def make_rows(count, seed, config):
    """Return (features name -> float16 [n, V, D], labels int8 [n, K], image ids) of random rows."""
    rng = np.random.default_rng(seed)
    features = {
        name: rng.standard_normal((count, config["views"], dim)).astype(np.float16)
        for name, dim in config["feature_dims"].items()
    }
    labels = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(count, len(config["class_names"])))
    image_ids = [f"image-{seed}-{row}-é" for row in range(count)]
    return features, labels, image_ids


def write_store(directory: Path, shard_rows=(4, 4, 2), **changes):
    """Write a complete store with random rows; return (features, labels, image ids) in row order."""
    config = store_config(**changes)
    directory.mkdir(parents=True, exist_ok=True)
    all_rows = []
    shards = []
    for index, count in enumerate(shard_rows):
        rows = make_rows(count, index, config)
        with ShardWriter(
            directory,
            index,
            feature_dims=config["feature_dims"],
            views=config["views"],
            num_classes=len(config["class_names"]),
        ) as writer:
            # two appends per shard, as the extraction loop appends batch by batch
            half = count // 2
            writer.append({name: value[:half] for name, value in rows[0].items()}, rows[1][:half], rows[2][:half])
            writer.append({name: value[half:] for name, value in rows[0].items()}, rows[1][half:], rows[2][half:])
            sidecar = writer.finish({"config": config})
        shards.append(sidecar)
        all_rows.append(rows)

    write_manifest(directory, build_manifest(config, shards, skipped=[]))
    features = {name: np.concatenate([rows[0][name] for rows in all_rows]) for name in config["feature_dims"]}
    labels = np.concatenate([rows[1] for rows in all_rows])
    image_ids = [image_id for rows in all_rows for image_id in rows[2]]
    return features, labels, image_ids


def test_round_trip(tmp_path):
    features, labels, image_ids = write_store(tmp_path / "store")

    store = FeatureStore.open(tmp_path / "store")

    assert store.num_images == 10
    assert store.feature_names == ["stage0", "stage1", "final"]
    assert store.feature_dims == FEATURE_DIMS
    assert store.class_names == CLASS_NAMES
    assert (store.views, store.model, store.image_size) == (1, "resnet10t", 32)
    for name in FEATURE_DIMS:
        read = store.read_features(name)
        assert read.dtype == np.float16
        assert np.array_equal(read, features[name])
    assert store.read_labels().dtype == np.int8
    assert np.array_equal(store.read_labels(), labels)
    assert store.read_image_ids() == image_ids


def test_manifest_shard_rows(tmp_path):
    write_store(tmp_path / "store", shard_rows=(4, 4, 2))

    manifest = read_manifest(tmp_path / "store")

    assert [(shard["file"], shard["first_row"], shard["rows"]) for shard in manifest["shards"]] == [
        ("shard-00000.h5", 0, 4),
        ("shard-00001.h5", 4, 4),
        ("shard-00002.h5", 8, 2),
    ]
    assert set(manifest["versions"]) == {"python", "torch", "timm", "h5py", "numpy", "mlprobe"}
    assert manifest["created"].endswith("+00:00")


def test_shard_datasets_on_disk(tmp_path):
    write_store(tmp_path / "store", shard_rows=(3,))

    with h5py.File(tmp_path / "store" / "shard-00000.h5", "r") as file:
        assert file["features/stage1"].shape == (3, 1, 5)
        assert file["features/stage1"].dtype == np.float16
        assert file["labels"].dtype == np.int8
        assert file["image_ids"].asstr()[0] == "image-0-0-é"


def test_iter_chunks_covers_rows_in_order(tmp_path):
    features, labels, _ = write_store(tmp_path / "store", shard_rows=(4, 4, 2))
    store = FeatureStore.open(tmp_path / "store")

    chunks = list(store.iter_chunks(["final", "stage0"], max_rows=3))

    assert [(start, len(chunk_labels)) for start, _, chunk_labels in chunks] == [
        (0, 3), (3, 1), (4, 3), (7, 1), (8, 2),
    ]
    assert np.array_equal(np.concatenate([chunk["final"] for _, chunk, _ in chunks]), features["final"])
    assert np.array_equal(np.concatenate([chunk["stage0"] for _, chunk, _ in chunks]), features["stage0"])
    assert np.array_equal(np.concatenate([chunk_labels for _, _, chunk_labels in chunks]), labels)


def test_unknown_feature_name(tmp_path):
    write_store(tmp_path / "store")
    store = FeatureStore.open(tmp_path / "store")

    with pytest.raises(StoreError) as raised:
        store.read_features("stage9")

    assert "stage9" in str(raised.value)
    assert "stage0, stage1, final" in str(raised.value)


def test_failed_shard_leaves_nothing(tmp_path):
    config = store_config()
    features, labels, image_ids = make_rows(4, 0, config)

    with pytest.raises(RuntimeError, match="interrupted"):
        with ShardWriter(tmp_path, 0, feature_dims=FEATURE_DIMS, views=1, num_classes=2) as writer:
            writer.append(features, labels, image_ids)
            raise RuntimeError("interrupted")

    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_unfinished_shard_not_visible(tmp_path):
    config = store_config()
    features, labels, image_ids = make_rows(4, 0, config)
    writer = ShardWriter(tmp_path, 0, feature_dims=FEATURE_DIMS, views=1, num_classes=2)
    writer.open()
    writer.append(features, labels, image_ids)

    visible = sorted(path.name for path in tmp_path.glob("shard-*"))
    writer.abort()

    assert visible == []
    assert find_complete_shard(tmp_path, 0, {}) is None


def test_sidecar_written_with_checksum(tmp_path):
    write_store(tmp_path / "store", shard_rows=(4,))

    sidecar = json.loads((tmp_path / "store" / sidecar_name(0)).read_text())
    manifest = read_manifest(tmp_path / "store")

    assert sidecar["rows"] == 4
    assert sidecar["sha256"] == manifest["shards"][0]["sha256"]
    assert find_complete_shard(tmp_path / "store", 0, {"config": store_config()}) is not None
    assert find_complete_shard(tmp_path / "store", 0, {"config": store_config(image_size=64)}) is None


def test_damaged_shard_named(tmp_path):
    write_store(tmp_path / "store")
    damaged = tmp_path / "store" / shard_name(1)
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))

    with pytest.raises(StoreError) as raised:
        FeatureStore.open(tmp_path / "store")

    assert str(damaged) in str(raised.value)
    assert "sha256" in str(raised.value)
    assert FeatureStore.open(tmp_path / "store", verify=False).num_images == 10


def test_damaged_shard_redone_on_resume(tmp_path):
    write_store(tmp_path / "store", shard_rows=(4,))
    damaged = tmp_path / "store" / shard_name(0)
    content = bytearray(damaged.read_bytes())
    content[-1] ^= 0xFF
    damaged.write_bytes(bytes(content))

    assert find_complete_shard(tmp_path / "store", 0, {"config": store_config()}) is None


def test_missing_shard_named(tmp_path):
    write_store(tmp_path / "store")
    (tmp_path / "store" / shard_name(2)).unlink()

    with pytest.raises(StoreError) as raised:
        FeatureStore.open(tmp_path / "store", verify=False)

    assert shard_name(2) in str(raised.value)


def test_missing_manifest_means_unfinished(tmp_path):
    write_store(tmp_path / "store")
    (tmp_path / "store" / "manifest.json").unlink()

    with pytest.raises(StoreError) as raised:
        FeatureStore.open(tmp_path / "store")

    assert "did not finish" in str(raised.value)


def test_missing_store_folder(tmp_path):
    with pytest.raises(StoreError) as raised:
        FeatureStore.open(tmp_path / "nowhere")

    assert str(tmp_path / "nowhere") in str(raised.value)


def test_manifest_missing_field(tmp_path):
    write_store(tmp_path / "store")
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["weights_fingerprint"]
    path.write_text(json.dumps(manifest))

    with pytest.raises(StoreError) as raised:
        FeatureStore.open(tmp_path / "store")

    assert "weights_fingerprint" in str(raised.value)
    assert str(path) in str(raised.value)


def test_manifest_row_gap(tmp_path):
    write_store(tmp_path / "store")
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][1]["first_row"] = 5
    path.write_text(json.dumps(manifest))

    with pytest.raises(StoreError) as raised:
        FeatureStore.open(tmp_path / "store")

    assert "shard-00001.h5" in str(raised.value)


def test_manifest_other_schema_version(tmp_path):
    write_store(tmp_path / "store")
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))

    with pytest.raises(StoreError) as raised:
        FeatureStore.open(tmp_path / "store")

    assert "99" in str(raised.value)


def test_manifest_rows_disagree_with_shard(tmp_path):
    write_store(tmp_path / "store", shard_rows=(4,))
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["rows"] = 3
    manifest["num_images"] = 3
    path.write_text(json.dumps(manifest))
    store = FeatureStore.open(tmp_path / "store")

    with pytest.raises(StoreError) as raised:
        store.read_labels()

    assert "shard-00000.h5" in str(raised.value)


def test_compatible_stores_pass(tmp_path):
    write_store(tmp_path / "train", split="train")
    write_store(tmp_path / "test", split="test", views=1)
    write_store(tmp_path / "augmented", split="train", views=3)

    stores = [FeatureStore.open(tmp_path / name) for name in ("train", "test", "augmented")]

    check_compatible(*stores)


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "resnet18"),
        ("weights_fingerprint", "cd" * 32),
        ("image_size", 64),
        ("class_names", ["cat", "bird"]),
        ("feature_dims", {"stage0": 3, "stage1": 6, "final": 4}),
    ],
)
def test_incompatible_stores_rejected(tmp_path, field, value):
    write_store(tmp_path / "a")
    write_store(tmp_path / "b", **{field: value})
    first, second = FeatureStore.open(tmp_path / "a"), FeatureStore.open(tmp_path / "b")

    with pytest.raises(StoreError) as raised:
        check_compatible(first, second)

    message = str(raised.value)
    assert field in message
    assert str(tmp_path / "a") in message
    assert str(tmp_path / "b") in message


def test_store_dir_layout(tmp_path):
    assert store_dir(tmp_path, "voc2007", "resnetv2_50x3_bit.goog_in21k", 448, "test") == (
        tmp_path / "voc2007" / "resnetv2_50x3_bit.goog_in21k-448" / "test"
    )
    assert store_dir(tmp_path, "coco2017", "swin_base_patch4_window12_384.ms_in22k", None, "val") == (
        tmp_path / "coco2017" / "swin_base_patch4_window12_384.ms_in22k-384" / "val"
    )
    assert model_slug("hf-hub:timm/vit_base") == "hf-hub_timm_vit_base"


def test_compressed_shard_round_trip(tmp_path):
    config = store_config()
    features, labels, image_ids = make_rows(6, 1, config)

    with ShardWriter(tmp_path, 0, feature_dims=FEATURE_DIMS, views=1, num_classes=2, compression="gzip") as writer:
        writer.append(features, labels, image_ids)
        writer.finish({"config": config})

    with h5py.File(tmp_path / shard_name(0), "r") as file:
        assert file["features/final"].compression == "gzip"
        assert np.array_equal(file["features/final"][()], features["final"])
