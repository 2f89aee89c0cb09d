"""The extraction loop on generated images with the real tf_efficientnet_lite0 weights.

Every run uses 64 px inputs, shards of 8 images and batches of 4, so a shard is always
made of the same two batches and reruns give bit-identical features.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mlprobe.cli import cli
from mlprobe.errors import DatasetError, MlprobeError, StoreError
from mlprobe.extract.backbones import FeatureExtractor, create_backbone, data_config, weights_fingerprint
from mlprobe.extract.datasets import Sample, Split, load_split
from mlprobe.extract.demo_data import build_demo_data
from mlprobe.extract.images import ImageDataset
from mlprobe.extract.augment import ViewAugmenter
from mlprobe.extract.loop import RunOptions, _batches, _make_loader, extract_split
from mlprobe.features import FeatureStore
from mlprobe.features.layout import shard_name, sidecar_name

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "tf_efficientnet_lite0"
IMAGE_SIZE = 64
SHARD_SIZE = 8
BATCH_SIZE = 4
CLASS_NAMES = ["red", "green", "blue"]


def make_split(folder: Path, count: int = 20) -> Split:
    """Write ``count`` images of varied size and format; labels mark the colour channels with a mean above 127.5."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for index in range(count):
        height, width = 20 + 7 * (index % 5), 30 + 5 * (index % 3)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"image{index:02d}.{'png' if index % 4 == 0 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        labels = np.where(pixels.reshape(-1, 3).mean(axis=0) > 127.5, 1, -1).astype(np.int8)
        if index % 7 == 0:
            labels[index % 3] = 0  # difficult
        samples.append(Sample(image_id=f"{index:06d}", path=path, labels=labels))
    return Split(dataset="toy", split="train", class_names=list(CLASS_NAMES), samples=samples, info={})


def extract(split: Split, out_root: Path, **options) -> Path:
    settings = {
        "model_name": MODEL,
        "image_size": IMAGE_SIZE,
        "out_root": out_root,
        "batch_size": BATCH_SIZE,
        "workers": 0,
        "shard_size": SHARD_SIZE,
        "progress": False,
    }
    settings.update(options)
    return extract_split(split, **settings)


def read_all(directory: Path) -> dict:
    store = FeatureStore.open(directory)
    result = {name: store.read_features(name) for name in store.feature_names}
    result["labels"] = store.read_labels()
    result["image_ids"] = store.read_image_ids()
    return result


def assert_same_store(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        if name == "image_ids":
            assert first[name] == second[name]
        else:
            assert np.array_equal(first[name], second[name]), name


def file_identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_ino, status.st_mtime_ns


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A split of 20 images and its store from one uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    split = make_split(root / "images")
    directory = extract(split, root / "features")
    return split, directory, read_all(directory)


def test_store_matches_live_forward(reference):
    split, directory, stored = reference
    model = create_backbone(MODEL)
    extractor = FeatureExtractor(model)
    dataset = ImageDataset(split.samples, data_config(model, IMAGE_SIZE))
    images = torch.stack([dataset[index][1] for index in range(len(dataset))])

    with torch.inference_mode():
        live = extractor(images)

    assert directory.name == "train"
    assert directory.parent.name == f"{MODEL}-{IMAGE_SIZE}"
    for name, value in live.items():
        assert stored[name].shape == (20, 1, extractor.feature_dims[name])
        assert np.allclose(stored[name][:, 0].astype(np.float32), value.numpy(), rtol=1e-2, atol=1e-2), name
    assert np.array_equal(stored["labels"], split.labels())
    assert stored["image_ids"] == [sample.image_id for sample in split.samples]


def test_manifest_records_run(reference):
    split, directory, _ = reference
    manifest = json.loads((directory / "manifest.json").read_text())

    assert manifest["model"] == MODEL
    assert manifest["weights_fingerprint"] == weights_fingerprint(create_backbone(MODEL))
    assert manifest["image_size"] == IMAGE_SIZE
    assert manifest["mean"] == [0.5, 0.5, 0.5]
    assert manifest["interpolation"] == "bicubic"
    assert manifest["class_names"] == CLASS_NAMES
    assert manifest["feature_names"] == ["stage0", "stage1", "stage2", "stage3", "stage4", "final"]
    assert manifest["num_images"] == 20
    assert [shard["rows"] for shard in manifest["shards"]] == [8, 8, 4]
    assert manifest["skipped"] == []
    assert (manifest["dataset"], manifest["split"]) == ("toy", "train")


def test_loader_workers_give_same_store(reference, tmp_path):
    split, _, stored = reference

    directory = extract(split, tmp_path, workers=2)

    assert_same_store(read_all(directory), stored)


def test_resume_redoes_only_missing_shard(reference, tmp_path):
    split, _, stored = reference
    directory = extract(split, tmp_path)
    kept_identities = {index: file_identity(directory / shard_name(index)) for index in (0, 2)}
    (directory / shard_name(1)).unlink()
    (directory / sidecar_name(1)).unlink()

    extract(split, tmp_path)

    assert {index: file_identity(directory / shard_name(index)) for index in (0, 2)} == kept_identities
    assert (directory / shard_name(1)).is_file()
    assert_same_store(read_all(directory), stored)


def test_resume_redoes_shard_with_changed_labels(reference, tmp_path):
    split, _, _ = reference
    directory = extract(split, tmp_path)
    kept_identities = {index: file_identity(directory / shard_name(index)) for index in (0, 1)}
    old = split.samples[17]
    changed_labels = -old.labels
    samples = list(split.samples)
    samples[17] = Sample(image_id=old.image_id, path=old.path, labels=changed_labels)
    changed = Split(split.dataset, split.split, split.class_names, samples, {})

    extract(changed, tmp_path)

    assert {index: file_identity(directory / shard_name(index)) for index in (0, 1)} == kept_identities
    assert np.array_equal(FeatureStore.open(directory).read_labels()[17], changed_labels)


def test_corrupt_image_stops_without_partial_shard(tmp_path):
    split = make_split(tmp_path / "images")
    bad = split.samples[12].path
    corrupt(bad)

    with pytest.raises(DatasetError) as raised:
        extract(split, tmp_path / "features")

    directory = tmp_path / "features" / "toy" / f"{MODEL}-{IMAGE_SIZE}" / "train"
    assert str(bad) in str(raised.value)
    assert "--skip-bad" in str(raised.value)
    assert sorted(path.name for path in directory.iterdir()) == [shard_name(0), sidecar_name(0)]


def test_rerun_after_fixing_image_keeps_finished_shard(reference, tmp_path):
    _, _, stored = reference
    split = make_split(tmp_path / "images")
    original = split.samples[12].path.read_bytes()
    corrupt(split.samples[12].path)
    with pytest.raises(DatasetError):
        extract(split, tmp_path / "features")
    directory = tmp_path / "features" / "toy" / f"{MODEL}-{IMAGE_SIZE}" / "train"
    finished = file_identity(directory / shard_name(0))

    split.samples[12].path.write_bytes(original)
    extract(split, tmp_path / "features")

    assert file_identity(directory / shard_name(0)) == finished
    assert_same_store(read_all(directory), stored)


def test_skip_bad_records_image_and_aligns_labels(reference, tmp_path):
    _, _, stored = reference
    split = make_split(tmp_path / "images")
    bad = split.samples[5]
    corrupt(bad.path)

    directory = extract(split, tmp_path / "features", skip_bad=True)

    store = FeatureStore.open(directory)
    kept_rows = [row for row in range(20) if row != 5]
    assert store.num_images == 19
    assert [shard["rows"] for shard in store.manifest["shards"]] == [7, 8, 4]
    assert len(store.skipped) == 1
    assert store.skipped[0]["image_id"] == bad.image_id
    assert store.skipped[0]["path"] == str(bad.path)
    assert str(bad.path) in store.skipped[0]["reason"]
    assert "--skip-bad" not in store.skipped[0]["reason"]
    assert store.read_image_ids() == [stored["image_ids"][row] for row in kept_rows]
    assert np.array_equal(store.read_labels(), stored["labels"][kept_rows])
    # Rows after the skipped image come from other batches than in the reference run, so
    # they may differ in the last float16 bit.
    assert np.allclose(store.read_features("final"), stored["final"][kept_rows], rtol=1e-2, atol=1e-3)


def test_empty_split_rejected(tmp_path):
    empty = Split(dataset="toy", split="test", class_names=list(CLASS_NAMES), samples=[], info={})

    with pytest.raises(DatasetError) as raised:
        extract(empty, tmp_path)

    assert "'test'" in str(raised.value)
    assert not (tmp_path / "toy").exists()


def test_labels_of_wrong_width_rejected(reference, tmp_path):
    split, _, _ = reference
    wrong = Split(split.dataset, split.split, ["red", "green"], split.samples, {})

    with pytest.raises(DatasetError) as raised:
        extract(wrong, tmp_path)

    assert split.samples[0].image_id in str(raised.value)


def test_ranks_write_disjoint_shards(reference, tmp_path):
    split, _, stored = reference

    directory = extract(split, tmp_path, rank=1, world_size=2)
    written_by_rank_1 = sorted(path.name for path in directory.glob("shard-*.h5"))
    manifest_after_rank_1 = (directory / "manifest.json").exists()
    extract(split, tmp_path, rank=0, world_size=2)

    assert written_by_rank_1 == [shard_name(1)]
    assert not manifest_after_rank_1
    assert_same_store(read_all(directory), stored)


def test_rank_0_alone_cannot_merge(reference, tmp_path):
    split, _, _ = reference

    with pytest.raises(StoreError) as raised:
        extract(split, tmp_path, rank=0, world_size=2)

    assert "shard 1" in str(raised.value)


def test_smaller_shards_replace_old_ones(reference, tmp_path):
    split, _, stored = reference
    extract(split, tmp_path)

    directory = extract(split, tmp_path, shard_size=4)

    assert sorted(path.name for path in directory.glob("shard-*.h5")) == [shard_name(index) for index in range(5)]
    assert_same_store(read_all(directory), stored)


SPLIT_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from mlprobe.extract.datasets import Sample, Split, load_split
from mlprobe.extract.demo_data import build_demo_data

def load_split(path):
    data = json.loads(Path(path).read_text())
    samples = [Sample(item["id"], Path(item["path"]), np.array(item["labels"], dtype=np.int8)) for item in data["samples"]]
    return Split(data["dataset"], data["split"], data["class_names"], samples, {})
"""


def write_split_json(split: Split, path: Path) -> None:
    samples = [{"id": s.image_id, "path": str(s.path), "labels": s.labels.tolist()} for s in split.samples]
    data = {"dataset": split.dataset, "split": split.split, "class_names": split.class_names, "samples": samples}
    path.write_text(json.dumps(data))


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_killed_run_resumes_to_same_store(tmp_path):
    split = make_split(tmp_path / "images", count=40)
    write_split_json(split, tmp_path / "split.json")
    script = tmp_path / "run.py"
    script.write_text(
        SPLIT_SCRIPT
        + textwrap.dedent(
            f"""
            from mlprobe.extract.loop import extract_split
            extract_split(load_split(sys.argv[1]), model_name={MODEL!r}, image_size={IMAGE_SIZE},
                          out_root=Path(sys.argv[2]), batch_size=2, workers=0, shard_size=2, progress=False)
            """
        )
    )
    directory = tmp_path / "features" / "toy" / f"{MODEL}-{IMAGE_SIZE}" / "train"

    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "split.json"), str(tmp_path / "features")], env=subprocess_env()
    )
    try:
        while process.poll() is None and not (directory / sidecar_name(1)).exists():
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    if process.returncode == 0 or (directory / "manifest.json").exists():
        pytest.skip("the run finished before it could be killed")

    extract(split, tmp_path / "features", batch_size=2, shard_size=2)
    reference = extract(split, tmp_path / "reference", batch_size=2, shard_size=2)

    assert process.returncode == -signal.SIGKILL
    assert not list(directory.glob(".*.tmp"))
    assert_same_store(read_all(directory), read_all(reference))


@pytest.mark.slow
def test_torchrun_cli_matches_one_process(tmp_path):
    demo = build_demo_data(tmp_path / "demo", n_train=16, n_test=8)
    voc_root = Path(demo["voc_root"])
    features = tmp_path / "features"

    completed = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "mlprobe.cli", "extract", "--dataset", "voc2007", "--root", str(voc_root),
            "--model", MODEL, "--image-size", str(IMAGE_SIZE), "--out", str(features),
            "--shard-size", str(SHARD_SIZE), "--batch-size", str(BATCH_SIZE), "--workers", "0",
            "--views", "2", "--no-progress",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("images ->") == 2, completed.stdout
    for split_name, views in (("trainval", 2), ("test", 1)):
        split = load_split("voc2007", voc_root, split_name)
        reference = read_all(extract(split, tmp_path / "reference", views=2))
        store = FeatureStore.open(features / "voc2007" / f"{MODEL}-{IMAGE_SIZE}" / split_name)
        result = read_all(store.path)
        assert store.views == views, split_name
        assert result["image_ids"] == reference["image_ids"]
        assert np.array_equal(result["labels"], reference["labels"])
        # torchrun runs each process with one thread, which can change float32 sums in the last bits.
        for name in store.feature_names:
            assert np.allclose(result[name], reference[name], rtol=1e-2, atol=1e-3), (split_name, name)


def test_shard_of_only_bad_images_is_empty(reference, tmp_path):
    _, _, stored = reference
    split = make_split(tmp_path / "images")
    for sample in split.samples[16:]:
        corrupt(sample.path)

    directory = extract(split, tmp_path / "features", skip_bad=True)

    store = FeatureStore.open(directory)
    assert [shard["rows"] for shard in store.manifest["shards"]] == [8, 8, 0]
    assert [entry["image_id"] for entry in store.skipped] == [sample.image_id for sample in split.samples[16:]]
    assert store.read_image_ids() == stored["image_ids"][:16]
    assert np.array_equal(store.read_features("final"), stored["final"][:16])


@pytest.fixture(scope="module")
def augmented(reference, tmp_path_factory):
    """The reference split's store with 3 augmented views per image."""
    split, _, _ = reference
    directory = extract(split, tmp_path_factory.mktemp("augmented"), views=3, view_seed=7)
    return directory, read_all(directory)


def test_views_stored_per_image(reference, augmented):
    _, _, plain = reference
    directory, stored = augmented
    store = FeatureStore.open(directory)

    assert store.views == 3
    for name in store.feature_names:
        assert stored[name].shape == (20, 3, store.feature_dims[name]), name
    assert np.array_equal(stored["labels"], plain["labels"])
    final = stored["final"].astype(np.float32)
    plain_final = plain["final"][:, 0].astype(np.float32)
    for first, second in ((0, 1), (0, 2), (1, 2)):
        assert (np.abs(final[:, first] - final[:, second]).max(axis=1) > 0.01).all(), (first, second)
    for view in range(3):
        assert (np.abs(final[:, view] - plain_final).max(axis=1) > 0.01).all(), view


def test_views_manifest_records_augmentation(augmented):
    directory, _ = augmented
    manifest = json.loads((directory / "manifest.json").read_text())

    assert manifest["views"] == 3
    assert manifest["augmentation"]["views"] == 3
    assert manifest["augmentation"]["view_seed"] == 7
    assert manifest["augmentation"]["randaugment_num_ops"] == 2
    assert manifest["augmentation"]["randaugment_magnitude"] == 9
    assert manifest["augmentation"]["cutout_factor"] == 0.5


def test_views_same_across_ranks_and_workers(reference, augmented, tmp_path):
    split, _, _ = reference
    _, stored = augmented

    extract(split, tmp_path, views=3, view_seed=7, rank=1, world_size=2, workers=2)
    directory = extract(split, tmp_path, views=3, view_seed=7, rank=0, world_size=2)

    assert_same_store(read_all(directory), stored)


def test_other_view_seed_changes_views(reference, augmented, tmp_path):
    split, _, _ = reference
    _, stored = augmented

    directory = extract(replace(split, samples=split.samples[:4]), tmp_path, views=3, view_seed=8)

    changed = read_all(directory)["final"].astype(np.float32)
    assert (np.abs(changed - stored["final"][:4].astype(np.float32)).max(axis=2) > 0.01).all()


def test_test_split_keeps_single_view(reference, tmp_path):
    split, _, plain = reference
    test_split = replace(split, split="test")

    directory = extract(test_split, tmp_path, views=3)

    store = FeatureStore.open(directory)
    assert store.views == 1
    assert store.manifest["augmentation"] is None
    assert_same_store(read_all(directory), plain)


def test_training_flag_overrides_split_name(reference, tmp_path):
    split, _, _ = reference
    first_images = replace(split, samples=split.samples[:4])

    not_augmented = extract(first_images, tmp_path / "off", views=3, training=False)
    augmented = extract(replace(first_images, split="holdout"), tmp_path / "on", views=3, training=True)

    assert FeatureStore.open(not_augmented).views == 1
    assert FeatureStore.open(augmented).views == 3


def test_changed_views_redo_shards(reference, tmp_path):
    split, _, plain = reference

    extract(split, tmp_path, views=3, view_seed=7)
    directory = extract(split, tmp_path)

    assert FeatureStore.open(directory).views == 1
    assert_same_store(read_all(directory), plain)


def test_gzip_compression_same_features(reference, tmp_path):
    _, _, plain = reference

    directory = extract(reference[0], tmp_path, compression="gzip")

    assert_same_store(read_all(directory), plain)


def test_decode_on_gpu_without_cuda_rejected(reference, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available, so GPU decoding is allowed")
    split, _, _ = reference

    with pytest.raises(MlprobeError) as raised:
        extract(split, tmp_path, decode_on_gpu=True)

    assert "--decode-on-gpu needs a CUDA device" in str(raised.value)
    assert not (tmp_path / "toy").exists()


def test_cli_decode_on_gpu_without_cuda_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available, so GPU decoding is allowed")
    demo = build_demo_data(tmp_path / "demo", n_train=2, n_test=2)
    arguments = [
        "extract", "--dataset", "voc2007", "--root", str(demo["voc_root"]), "--model", MODEL,
        "--out", str(tmp_path / "features"), "--decode-on-gpu",
    ]

    result = CliRunner().invoke(cli, arguments)

    assert result.exit_code == 1
    assert "Error: --decode-on-gpu needs a CUDA device" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("views", [1, 3])
def test_device_decoding_batches_match_pillow(reference, views):
    """The decode_on_gpu batches, run with libjpeg on the CPU, match the Pillow batches."""
    split, _, _ = reference
    config = data_config(create_backbone(MODEL), IMAGE_SIZE)
    augmenter = ViewAugmenter(config, views=views) if views > 1 else None
    indices = list(range(len(split.samples)))
    batches = {}
    for decode_on_gpu in (False, True):
        options = RunOptions(torch.device("cpu"), BATCH_SIZE, 0, False, False, None, decode_on_gpu)
        loader = _make_loader(split, indices, config, augmenter, options)
        batches[decode_on_gpu] = list(_batches(loader, split, config, augmenter, options))

    for (pillow_indices, pillow_images, pillow_errors), (device_indices, device_images, device_errors) in zip(
        batches[False], batches[True]
    ):
        assert device_indices == pillow_indices
        assert device_errors == pillow_errors
        assert device_images.shape == pillow_images.shape
        assert device_images.shape[1] == views
        # Torch's antialiased resize differs from Pillow's by a few grey levels in a few pixels.
        assert (device_images - pillow_images).abs().mean() < 0.01
