"""Joint training of a sweep: equivalence with training each head alone, selection, memory modes."""

import copy
import json

import numpy as np
import pytest
import torch

from mlprobe.errors import MlprobeError
from mlprobe.probe.data import ArraySource, feature_statistics, split_rows
from mlprobe.probe.heads import build_head
from mlprobe.probe.metrics import evaluate
from mlprobe.probe.selection import choose_configs
from mlprobe.probe.sweep import HeadConfig
from mlprobe.probe.train import batch_order, cosine_schedule, train_sweep, training_targets, view_draws

DIMS = {"stage0": 6, "stage1": 10, "final": 16}
CLASSES = 4


def make_features(rows, seed, noise=1.0):
    """Return float16 features [rows, D] per name that encode the labels linearly, and int8 labels [rows, K]."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((rows, CLASSES)) < 0.35, 1, -1).astype(np.int8)
    labels[rng.random((rows, CLASSES)) < 0.05] = 0  # a few difficult labels
    projection_rng = np.random.default_rng(1000)  # the same class directions in every split
    features = {}
    for name, dim in DIMS.items():
        directions = projection_rng.normal(size=(CLASSES, dim))
        signal = (labels == 1).astype(np.float64) @ directions
        features[name] = (signal + noise * rng.normal(size=(rows, dim)) + 3.0).astype(np.float16)
    return features, labels


def train_alone(config, features, labels, *, epochs, batch_size, statistics):
    """Train one plain single-head module the usual way; return the state dict and loss of every epoch."""
    head = build_head(config.kind, DIMS, CLASSES, where=config.where, normalization=config.normalization,
                      seed=config.seed)
    if statistics is not None:
        head.set_statistics(*[{name: torch.from_numpy(value) for name, value in part.items()} for part in statistics])
    optimizer = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    criterion = torch.nn.MultiLabelSoftMarginLoss()
    inputs = {name: torch.from_numpy(value.astype(np.float32)) for name, value in features.items()}
    targets = torch.from_numpy((labels != -1).astype(np.float32))  # difficult counted positive

    states, losses = [], []
    for epoch in range(epochs):
        order = torch.from_numpy(batch_order(config.seed, epoch, 0, len(labels)))
        total = 0.0
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = criterion(head({name: value[index] for name, value in inputs.items()}), targets[index])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        scheduler.step()
        states.append(copy.deepcopy(head.state_dict()))
        losses.append(total / len(labels))
    return head, states, losses


MIXED_CONFIGS = [
    HeadConfig("linear", None, 0, 0.1, 0.0, "none"),
    HeadConfig("linear", None, 0, 0.02, 1e-3, "none"),  # same group as the first: stacked together
    HeadConfig("layover", 0, 1, 0.05, 1e-3, "standardize"),
    HeadConfig("layover", 1, 0, 0.1, 0.0, "l2"),
    HeadConfig("concat", 1, 2, 0.03, 0.0, "l2"),
    HeadConfig("all-stages", None, 2, 0.1, 1e-4, "none"),
    HeadConfig("linear", None, 1, 0.03, 1e-3, "standardize"),
]


def test_joint_training_equals_training_alone():
    train_features, train_labels = make_features(150, seed=0)  # 150 rows: batches of 32 leave a partial one
    test_features, test_labels = make_features(60, seed=1)
    epochs, batch_size = 3, 32

    result = train_sweep(MIXED_CONFIGS, ArraySource(train_features, train_labels),
                         ArraySource(test_features, test_labels), epochs=epochs, batch_size=batch_size)
    statistics = feature_statistics(ArraySource(train_features, train_labels), list(DIMS))

    test_inputs = {name: torch.from_numpy(value.astype(np.float32)) for name, value in test_features.items()}
    for config, joint in zip(MIXED_CONFIGS, result.heads):
        head, states, losses = train_alone(config, train_features, train_labels, epochs=epochs,
                                           batch_size=batch_size, statistics=statistics)

        np.testing.assert_allclose(joint.train_loss, losses, rtol=1e-5, err_msg=config.head_id)
        chosen_state = states[joint.best_epoch - 1]
        for name, value in joint.head.state_dict().items():
            torch.testing.assert_close(value, chosen_state[name], rtol=1e-4, atol=1e-5, msg=f"{config.head_id} {name}")
        head.load_state_dict(chosen_state)
        with torch.no_grad():
            torch.testing.assert_close(joint.head(test_inputs), head(test_inputs), rtol=1e-4, atol=1e-4)


def test_joint_last_epoch_weights_equal_alone():
    # With a falling learning rate the test mAP of a separable problem keeps
    # rising, and the head chosen on test is the last epoch's, so this checks
    # the final weights after a full run as well.
    train_features, train_labels = make_features(96, seed=2)
    config = HeadConfig("layover", 1, 3, 0.1, 1e-4, "none")

    result = train_sweep([config], ArraySource(train_features, train_labels), ArraySource(train_features, train_labels),
                         epochs=2, batch_size=40)
    head, states, _ = train_alone(config, train_features, train_labels, epochs=2, batch_size=40, statistics=None)

    chosen = result.heads[0]
    for name, value in chosen.head.state_dict().items():
        torch.testing.assert_close(value, states[chosen.best_epoch - 1][name], rtol=1e-4, atol=1e-5)


def test_cosine_schedule_equals_torch_scheduler():
    for epochs in (1, 2, 5, 30):
        parameter = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([parameter], lr=0.07, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        expected = []
        for _ in range(epochs):
            expected.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()

        assert cosine_schedule(0.07, epochs) == expected


def test_standardize_uses_training_rows_only():
    features, labels = make_features(120, seed=3)
    features["final"][100:] += np.float16(50.0)  # validation rows far off: they must not move the mean
    source = ArraySource(features, labels)
    train_rows = np.arange(100)
    val_rows = np.arange(100, 120)
    config = HeadConfig("linear", None, 0, 0.1, 0.0, "standardize")

    result = train_sweep([config], source.subset(train_rows), source.subset(val_rows), val=source.subset(val_rows),
                         epochs=1, batch_size=50)

    head = result.heads[0].head
    train_final = features["final"][:100].astype(np.float64)
    np.testing.assert_allclose(head.input_mean.numpy(), train_final.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.input_std.numpy(), train_final.std(axis=0), rtol=1e-4, atol=1e-4)


def test_learns_separable_problem():
    train_features, train_labels = make_features(400, seed=4, noise=0.5)
    test_features, test_labels = make_features(200, seed=5, noise=0.5)
    configs = [HeadConfig("linear", None, 0, 0.1, 0.0, "standardize"), HeadConfig("layover", 1, 0, 0.1, 0.0, "standardize")]

    result = train_sweep(configs, ArraySource(train_features, train_labels), ArraySource(test_features, test_labels),
                         epochs=8)

    for head in result.heads:
        assert head.test_metrics["mAP"] > 0.95, head.config.head_id


def test_selection_picks_val_best_epoch():
    features, labels = make_features(240, seed=6, noise=3.0)
    train_rows, val_rows = split_rows(200, 0.2, split_seed=0)
    source = ArraySource({name: value[:200] for name, value in features.items()}, labels[:200])
    test = ArraySource({name: value[200:] for name, value in features.items()}, labels[200:])
    configs = [HeadConfig("linear", None, 0, 0.5, 0.0, "none"), HeadConfig("concat", 0, 1, 0.3, 0.0, "none")]
    val = source.subset(val_rows)

    result = train_sweep(configs, source.subset(train_rows), test, val=val, epochs=6, batch_size=16)

    val_inputs = {name: torch.from_numpy(value[:200][val_rows].astype(np.float32)) for name, value in features.items()}
    for head in result.heads:
        assert head.selected_on == "val"
        assert head.best_epoch == int(np.argmax(head.val_map)) + 1
        assert head.val_mAP == pytest.approx(max(head.val_map))
        assert head.ref_best_epoch == int(np.argmax(head.test_map)) + 1
        assert head.ref_mAP == pytest.approx(max(head.test_map))
        # The returned module contains the weights of the chosen epoch.
        with torch.no_grad():
            scores = head.head(val_inputs).numpy()
        assert evaluate(scores, labels[:200][val_rows])["mAP"] == pytest.approx(head.val_mAP, abs=1e-6)
        assert head.test_metrics["mAP"] == pytest.approx(head.test_map[head.best_epoch - 1], abs=1e-6)


def test_without_validation_selects_on_test():
    features, labels = make_features(100, seed=7)
    configs = [HeadConfig("linear", None, 0, 0.1, 0.0, "none"), HeadConfig("linear", None, 0, 0.01, 0.0, "none")]

    result = train_sweep(configs, ArraySource(features, labels), ArraySource(features, labels), epochs=3)

    for head in result.heads:
        assert head.selected_on == "test"
        assert head.val_mAP is None
        assert head.best_epoch == head.ref_best_epoch


def test_choose_configs_on_validation():
    features, labels = make_features(200, seed=8, noise=2.0)
    source = ArraySource(features, labels)
    train_rows, val_rows = split_rows(200, 0.25, split_seed=1)
    configs = [HeadConfig("linear", None, 0, lr, 0.0, "none") for lr in (1.0, 0.1, 1e-4)]
    configs.append(HeadConfig("linear", None, 1, 0.1, 0.0, "none"))

    result = train_sweep(configs, source.subset(train_rows), source.subset(val_rows), val=source.subset(val_rows),
                         epochs=3)
    chosen = choose_configs(result.heads)

    seed_zero = [head for head in result.heads if head.config.seed == 0]
    assert len(chosen) == 2
    assert chosen[0].val_mAP == max(head.val_mAP for head in seed_zero)
    assert chosen[1].config.seed == 1


def test_epoch_records():
    features, labels = make_features(80, seed=9)
    records = []
    configs = [HeadConfig("linear", None, 0, 0.1, 0.0, "none"), HeadConfig("concat", 1, 0, 0.1, 0.0, "l2")]
    source = ArraySource(features, labels)

    train_sweep(configs, source.subset(np.arange(60)), source, val=source.subset(np.arange(60, 80)), epochs=2,
                on_epoch=records.extend)

    assert len(records) == 4
    assert {record["epoch"] for record in records} == {1, 2}
    assert {record["head_id"] for record in records} == {config.head_id for config in configs}
    for record in records:
        json.dumps(record)
        assert record["train_loss"] > 0
        assert 0 <= record["val_mAP"] <= 1
        assert 0 <= record["test_mAP"] <= 1


def test_streaming_single_chunk_equals_resident():
    train_features, train_labels = make_features(100, seed=10)
    test_features, test_labels = make_features(200, seed=11)
    configs = [HeadConfig("layover", 0, 0, 0.1, 1e-4, "standardize"), HeadConfig("linear", None, 1, 0.05, 0.0, "l2")]
    width = DIMS["final"] + DIMS["stage0"]
    # Streaming costs 6 bytes per value (a float16 read plus its float32 copy).
    # This bound fits the 100 training rows as one chunk but not all 300 rows resident.
    bound = 100 * width * 6

    resident = train_sweep(configs, ArraySource(train_features, train_labels), ArraySource(test_features, test_labels),
                           epochs=2, batch_size=32)
    streamed = train_sweep(configs, ArraySource(train_features, train_labels), ArraySource(test_features, test_labels),
                           epochs=2, batch_size=32, max_memory_bytes=bound)

    assert resident.memory["mode"] == "resident"
    assert streamed.memory["mode"] == "streaming"
    assert streamed.memory["chunk_rows"] == 100
    for first, second in zip(resident.heads, streamed.heads):
        np.testing.assert_allclose(first.train_loss, second.train_loss, rtol=1e-6)
        assert first.test_metrics["mAP"] == pytest.approx(second.test_metrics["mAP"])


def test_streaming_small_chunks_bounded_and_learns():
    train_features, train_labels = make_features(300, seed=12, noise=0.5)
    test_features, test_labels = make_features(100, seed=13, noise=0.5)
    configs = [HeadConfig("linear", None, 0, 0.1, 0.0, "standardize")]
    bound = 40 * DIMS["final"] * 6  # chunks of 40 rows of the final feature

    result = train_sweep(configs, ArraySource(train_features, train_labels), ArraySource(test_features, test_labels),
                         epochs=6, batch_size=16, max_memory_bytes=bound)

    assert result.memory["mode"] == "streaming"
    assert result.memory["chunk_rows"] == 40
    assert 0 < result.memory["peak_feature_bytes"] <= bound
    assert result.heads[0].test_metrics["mAP"] > 0.9


def test_difficult_targets():
    labels = np.array([[1, 0, -1]], dtype=np.int8)

    positive_targets, positive_mask = training_targets(labels, "positive")
    ignore_targets, ignore_mask = training_targets(labels, "ignore")

    assert positive_targets.tolist() == [[1.0, 1.0, 0.0]]
    assert positive_mask is None
    assert ignore_targets.tolist() == [[1.0, 0.0, 0.0]]
    assert ignore_mask.tolist() == [[1.0, 0.0, 1.0]]


def test_difficult_ignored_adds_no_gradient():
    # Class 0 is difficult on every image. With difficult="ignore" its loss
    # terms are masked, so its classifier row keeps the initial values; with
    # "positive" it is trained towards positive.
    features, labels = make_features(64, seed=14)
    labels[:, 0] = 0
    config = HeadConfig("linear", None, 0, 0.1, 0.0, "none")
    initial = build_head("linear", DIMS, CLASSES, seed=0).state_dict()
    source = ArraySource(features, labels)

    ignored = train_sweep([config], source, source, epochs=2, difficult="ignore").heads[0].head.state_dict()
    positive = train_sweep([config], source, source, epochs=2, difficult="positive").heads[0].head.state_dict()

    torch.testing.assert_close(ignored["classifier.weight"][0], initial["classifier.weight"][0])
    torch.testing.assert_close(ignored["classifier.bias"][0], initial["classifier.bias"][0])
    assert ignored["classifier.bias"][1] != initial["classifier.bias"][1]
    assert positive["classifier.bias"][0] > initial["classifier.bias"][0]


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"difficult": "skip"}, "difficult"),
        ({"configs": []}, "no head configurations"),
    ],
)
def test_bad_arguments_rejected(arguments, message):
    features, labels = make_features(20, seed=15)
    source = ArraySource(features, labels)
    configs = arguments.pop("configs", [HeadConfig("linear", None)])

    with pytest.raises(MlprobeError, match=message):
        train_sweep(configs, source, source, **arguments)


def test_views_drawn_per_image_per_epoch():
    draws = [view_draws(0, epoch, 0, 1000, 3) for epoch in range(2)]

    assert set(np.unique(draws[0])) == {0, 1, 2}
    assert not np.array_equal(draws[0], draws[1])
    assert np.array_equal(draws[0], view_draws(0, 0, 0, 1000, 3))


def test_views_feed_training():
    # Identical views train exactly like a single view; an all-zero second
    # view changes the first epoch already, because each image draws its view.
    features, labels = make_features(64, seed=16)
    same_views = {name: np.stack([value, value], axis=1) for name, value in features.items()}
    zero_view = {name: np.stack([value, np.zeros_like(value)], axis=1) for name, value in features.items()}
    config = HeadConfig("linear", None, 0, 0.1, 0.0, "none")
    test = ArraySource(features, labels)

    single = train_sweep([config], ArraySource(features, labels), test, epochs=2, batch_size=64)
    same = train_sweep([config], ArraySource(same_views, labels), test, epochs=2, batch_size=64)
    zero = train_sweep([config], ArraySource(zero_view, labels), test, epochs=2, batch_size=64)

    assert same.heads[0].train_loss == pytest.approx(single.heads[0].train_loss)
    assert zero.heads[0].train_loss[0] != pytest.approx(single.heads[0].train_loss[0])


def write_store(directory, features, labels, *, model="toy-model", shard_size=64):
    """Write features (float16 [N, D] per name) and labels as a real feature store; return its folder."""
    from mlprobe.features import ShardWriter
    from mlprobe.features.manifest import build_manifest, write_manifest

    config = {
        "dataset": "toy", "split": directory.name, "model": model, "weights_fingerprint": "cd" * 32,
        "image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
        "class_names": [f"class{index}" for index in range(CLASSES)], "feature_names": list(DIMS),
        "feature_dims": dict(DIMS), "views": 1, "shard_size": shard_size,
    }
    directory.mkdir(parents=True)
    shards = []
    for index, start in enumerate(range(0, len(labels), shard_size)):
        stop = min(start + shard_size, len(labels))
        with ShardWriter(directory, index, feature_dims=DIMS, views=1, num_classes=CLASSES) as writer:
            writer.append({name: value[start:stop, None, :] for name, value in features.items()}, labels[start:stop],
                          [f"image{row}" for row in range(start, stop)])
            shards.append(writer.finish({"config": config}))
    write_manifest(directory, build_manifest(config, shards, skipped=[]))
    return directory


def test_run_probe_on_real_stores(tmp_path):
    from mlprobe.probe.results import COLUMNS
    from mlprobe.probe.run import run_probe

    train_features, train_labels = make_features(200, seed=20, noise=0.5)
    test_features, test_labels = make_features(80, seed=21, noise=0.5)
    train_dir = write_store(tmp_path / "trainval", train_features, train_labels)
    test_dir = write_store(tmp_path / "test", test_features, test_labels)
    out = tmp_path / "out"

    rows = run_probe([(train_dir, test_dir)], out, heads=["linear", "layover"], seeds=[0], lrs=[0.1, 0.01],
                     weight_decays=[0.0], normalizations=["none", "standardize"], epochs=3, batch_size=32,
                     val_fraction=0.2, split_seed=0, max_memory_bytes=4000)

    assert [(row["head"], row["where"]) for row in rows] == [("linear", None), ("layover", 0), ("layover", 1)]
    for row in rows:
        assert row["selected_on"] == "val"
        assert (row["train_images"], row["val_images"], row["test_images"]) == (160, 40, 80)
        assert 1 <= row["best_epoch"] <= 3
        assert row["mAP"] > 0.8
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == COLUMNS
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 3 * 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3 * 4 * 3
    summary = json.loads((out / "results.json").read_text())
    assert summary["runs"][0]["memory"]["mode"] == "streaming"
    assert summary["runs"][0]["split"]["val_images"] == 40
    assert "**" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "heads").glob("*.pt"))) == 3
    assert not list(out.glob(".*.tmp"))


def test_saved_head_reproduces_test_scores(tmp_path):
    from mlprobe.probe.heads import load_head
    from mlprobe.probe.run import run_probe

    train_features, train_labels = make_features(120, seed=22)
    test_features, test_labels = make_features(50, seed=23)
    train_dir = write_store(tmp_path / "trainval", train_features, train_labels)
    test_dir = write_store(tmp_path / "test", test_features, test_labels)

    rows = run_probe([(train_dir, test_dir)], tmp_path / "out", heads=["layover"], wheres=[1], seeds=[0], lrs=[0.1],
                     weight_decays=[0.0], normalizations=["standardize"], epochs=2, val_fraction=0.0)
    head, extra = load_head(tmp_path / "out" / "heads" / "toy-model__layover@1__seed0.pt")
    inputs = {name: torch.from_numpy(value.astype(np.float32)) for name, value in test_features.items()}
    with torch.no_grad():
        scores = head(inputs).numpy()

    assert rows[0]["selected_on"] == "test"
    assert extra["config"]["where"] == 1
    assert evaluate(scores, test_labels)["mAP"] == pytest.approx(rows[0]["mAP"], abs=1e-6)


def test_run_probe_rejects_mismatched_stores(tmp_path):
    from mlprobe.errors import StoreError
    from mlprobe.probe.run import run_probe

    features, labels = make_features(40, seed=24)
    train_dir = write_store(tmp_path / "trainval", features, labels)
    test_dir = write_store(tmp_path / "test", features, labels, model="other-model")

    with pytest.raises(StoreError, match="model"):
        run_probe([(train_dir, test_dir)], tmp_path / "out", heads=["linear"], epochs=1)
    assert not (tmp_path / "out" / "results.csv").exists()


def test_test_rows_with_other_classes_rejected():
    features, labels = make_features(20, seed=25)
    other_labels = np.concatenate([labels, labels[:, :1]], axis=1)

    with pytest.raises(MlprobeError, match="classes"):
        train_sweep([HeadConfig("linear", None)], ArraySource(features, labels), ArraySource(features, other_labels))
