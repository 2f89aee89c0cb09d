"""Probe benchmark: joint sweep against heads one by one, against scikit-learn, against backbone epochs.

Every figure comes from one run on one machine, side by side, on the demo
data's tf_efficientnet_lite0 features (default 4,000 training and 1,000 test
images at the demo image size):

1. joint: a 24-head sweep trained in one pass, against the same 24 heads
   trained one after another by the same trainer. The heads are linear,
   layover and concat at the middle stage, and all-stages, each at 3
   learning rates and 2 weight decays.
2. sklearn: one linear probe on the final feature with the reference settings
   (epoch chosen on validation) against scikit-learn's one-vs-rest
   LogisticRegression (C = 0.1, standardised features) on the same training
   rows: time and test mAP. The 18-head linear sweep is timed beside them.
3. epoch: the whole default sweep against one epoch of backbone forward passes
   over the same training images, for the demo backbone and for BiT-M R101x3
   at 448 px (the reference method's backbone, timed with random weights on a
   few images, since the cost of a forward pass does not depend on the weights).
4. baselines: scikit-learn's LogisticRegression (C = 0.1, standardised) on
   each pooled feature alone, against the default sweep's val-chosen best head.
5. memory: the peak resident memory a probe process (the default sweep, one
   epoch, since the peak does not grow with epochs) adds over what it had
   after importing the libraries, against the bytes of the cached features.

Run ``python -m bench.probe`` from the repository root.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mlprobe import defaults
from mlprobe.extract.backbones import FeatureExtractor, create_backbone, data_config
from mlprobe.extract.datasets import load_split
from mlprobe.extract.demo_data import build_demo_data
from mlprobe.extract.images import ImageDataset
from mlprobe.extract.loop import extract_split
from mlprobe.features import FeatureStore
from mlprobe.probe.data import StoreSource, split_rows
from mlprobe.probe.metrics import evaluate
from mlprobe.probe.selection import choose_configs
from mlprobe.probe.sweep import build_grid, stage_indices
from mlprobe.probe.train import train_sweep

logger = logging.getLogger(__name__)

JOINT_TARGET = 8.0  # joint sweep speed-up over heads one by one
SKLEARN_TARGET = 10.0  # linear-probe sweep speed-up over scikit-learn, at equal or better mAP
REFERENCE_MODEL = "resnetv2_101x3_bit.goog_in21k"  # BiT-M R101x3, the reference method's backbone
REFERENCE_IMAGE_SIZE = 448
REPEATS = 3


def run(work_dir: Path, *, train_images: int = 4000, test_images: int = 1000, repeats: int = REPEATS) -> dict:
    """Measure the five probe figures on demo features in work_dir; return raw figures and ratios."""
    stores = build_stores(work_dir, train_images, test_images)
    train, val, test = sources(stores)

    results = {
        "setup": {"model": defaults.DEMO_MODEL, "image_size": defaults.DEMO_IMAGE_SIZE, "train_rows": train.num_rows,
                  "val_rows": val.num_rows, "test_rows": test.num_rows, "repeats": repeats,
                  "torch_threads": torch.get_num_threads()},
        "joint": measure_joint(stores, train, val, test, repeats),
        "sklearn": measure_sklearn(stores, train, val, test, repeats),
    }
    results["epoch"] = measure_epoch(stores, work_dir, train)
    results["stages"] = measure_stage_baselines(stores, train, test)
    results["memory"] = measure_memory(stores)
    return results


def build_stores(work_dir: Path, train_images: int, test_images: int) -> dict[str, FeatureStore]:
    """Build demo data and extract its train and test stores (reused when already complete)."""
    summary = build_demo_data(work_dir / "data", n_train=train_images, n_test=test_images)

    stores = {}
    for role, split_name in (("train", "trainval"), ("test", "test")):
        split = load_split("voc2007", summary["voc_root"], split_name)
        path = extract_split(split, model_name=defaults.DEMO_MODEL, image_size=defaults.DEMO_IMAGE_SIZE,
                             out_root=work_dir / "features", batch_size=defaults.EXTRACT_BATCH_SIZE,
                             workers=defaults.EXTRACT_WORKERS, shard_size=defaults.SHARD_SIZE, progress=False)
        stores[role] = FeatureStore.open(path)
    stores["voc_root"] = summary["voc_root"]
    return stores


def sources(stores: dict) -> tuple[StoreSource, StoreSource, StoreSource]:
    """Return the train, validation and test row sources, split as the probe command splits them."""
    train_rows, val_rows = split_rows(stores["train"].num_images, defaults.VAL_FRACTION, defaults.SPLIT_SEED)
    source = StoreSource(stores["train"])
    return source.subset(train_rows), source.subset(val_rows), StoreSource(stores["test"])


def timed(function, repeats: int) -> tuple[float, object]:
    """Return the median wall time in seconds of `repeats` calls and the last call's result."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def joint_configs(stores: dict) -> list:
    """Return the 24-head sweep of the joint-versus-alone comparison."""
    stages = stage_indices(stores["train"].feature_names)
    middle = stages[len(stages) // 2]
    return build_grid(stages=stages, heads=["linear", "layover", "concat", "all-stages"], wheres=[middle], seeds=[0],
                      lrs=[0.1, 0.01, 0.001], weight_decays=[0.0, 1e-4], normalizations=["none"])


def measure_joint(stores, train, val, test, repeats: int) -> dict:
    """Time the 24-head sweep trained jointly and trained head by head, alternating the two."""
    configs = joint_configs(stores)
    epochs = defaults.EPOCHS

    def joint():
        return train_sweep(configs, train, test, val=val, epochs=epochs)

    def alone():
        return [train_sweep([config], train, test, val=val, epochs=epochs) for config in configs]

    joint_times, alone_times = [], []
    for _ in range(repeats):
        joint_times.append(timed(joint, 1)[0])
        alone_times.append(timed(alone, 1)[0])

    joint_seconds = statistics.median(joint_times)
    alone_seconds = statistics.median(alone_times)
    logger.info("joint sweep of %d heads: %.1f s jointly, %.1f s one by one", len(configs), joint_seconds,
                alone_seconds)
    return {"heads": len(configs), "epochs": epochs, "joint_seconds": joint_seconds, "alone_seconds": alone_seconds,
            "speedup": alone_seconds / joint_seconds, "target": JOINT_TARGET}


def read_feature(source, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return one feature (float32 [N, D], view 0) and the labels (int8 [N, K]) of a row source."""
    features, labels = [], []
    for _, chunk, chunk_labels in source.iter_chunks([name], 1 << 20):
        features.append(chunk[name][:, 0].astype(np.float32))
        labels.append(chunk_labels)
    return np.concatenate(features), np.concatenate(labels)


def measure_sklearn(stores, train, val, test, repeats: int) -> dict:
    """Time the linear probe on the final feature against scikit-learn's LogisticRegression."""
    stages = stage_indices(stores["train"].feature_names)
    reference = build_grid(stages=stages, heads=["linear"], wheres=None, seeds=[defaults.SEED],
                           lrs=[defaults.LEARNING_RATE], weight_decays=[defaults.WEIGHT_DECAY], normalizations=["none"])
    sweep = build_grid(stages=stages, heads=["linear"], wheres=None, seeds=[defaults.SEED],
                       lrs=list(defaults.SWEEP_LEARNING_RATES), weight_decays=list(defaults.SWEEP_WEIGHT_DECAYS),
                       normalizations=list(defaults.SWEEP_NORMALIZATIONS))
    x_train, y_train = read_feature(train, "final")
    x_test, y_test = read_feature(test, "final")

    def ours(configs):
        result = train_sweep(configs, train, test, val=val)
        return choose_configs(result.heads)[0]

    ours_times, sweep_times, sklearn_times = [], [], []
    for _ in range(repeats):
        seconds, chosen = timed(lambda: ours(reference), 1)
        ours_times.append(seconds)
        seconds, sweep_chosen = timed(lambda: ours(sweep), 1)
        sweep_times.append(seconds)
        seconds, classifier = timed(lambda: fit_logistic_regression(x_train, y_train), 1)
        sklearn_times.append(seconds)

    ours_seconds = statistics.median(ours_times)
    sklearn_seconds = statistics.median(sklearn_times)
    sweep_seconds = statistics.median(sweep_times)
    return {"ours_seconds": ours_seconds, "sklearn_seconds": sklearn_seconds,
            "speedup": sklearn_seconds / ours_seconds, "target": SKLEARN_TARGET,
            "ours_mAP": chosen.test_metrics["mAP"], "sklearn_mAP": evaluate(classifier.decision_function(x_test), y_test)["mAP"],
            "sweep_heads": len(sweep), "sweep_seconds": sweep_seconds, "sweep_mAP": sweep_chosen.test_metrics["mAP"],
            "sweep_config": sweep_chosen.config.name, "sweep_speedup": sklearn_seconds / sweep_seconds}


def fit_logistic_regression(x_train: np.ndarray, y_train: np.ndarray):
    """Fit one-vs-rest LogisticRegression (C = 0.1) on standardised features; difficult labels count positive."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=0.1, max_iter=1000)))
    return classifier.fit(x_train, (y_train != -1).astype(int))


def measure_stage_baselines(stores, train, test) -> dict:
    """Return the test mAP of LogisticRegression on each single pooled feature, on the sweep's training rows."""
    scores = {}
    for name in stores["train"].feature_names:
        x_train, y_train = read_feature(train, name)
        x_test, y_test = read_feature(test, name)
        classifier = fit_logistic_regression(x_train, y_train)
        scores[name] = evaluate(classifier.decision_function(x_test), y_test)["mAP"]
    best = max(scores, key=scores.get)
    logger.info("LogisticRegression per feature: %s", {name: round(value, 4) for name, value in scores.items()})
    return {"mAP": scores, "best_feature": best, "best_mAP": scores[best]}


def forward_seconds_per_image(model_name: str, image_size: int, images: torch.Tensor, *, random_weights: bool) -> float:
    """Return the median seconds per image of the frozen backbone's forward pass over `images`."""
    model = create_backbone(model_name, random_weights=random_weights, image_size=image_size)
    extractor = FeatureExtractor(model).eval()
    batch = images.contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        extractor(batch[:1])
        seconds, _ = timed(lambda: extractor(batch), 3)
    return seconds / len(batch)


def measure_epoch(stores, work_dir: Path, train) -> dict:
    """Compare the whole default sweep with one epoch of backbone forward passes over the training images."""
    configs = build_grid(stages=stage_indices(stores["train"].feature_names), heads=list(defaults.SWEEP_HEADS),
                         wheres=None, seeds=list(defaults.SWEEP_SEEDS), lrs=list(defaults.SWEEP_LEARNING_RATES),
                         weight_decays=list(defaults.SWEEP_WEIGHT_DECAYS),
                         normalizations=list(defaults.SWEEP_NORMALIZATIONS))
    train_rows, val_rows = split_rows(stores["train"].num_images, defaults.VAL_FRACTION, defaults.SPLIT_SEED)
    test = StoreSource(stores["test"])
    source = StoreSource(stores["train"])
    sweep_seconds, sweep = timed(lambda: train_sweep(configs, source.subset(train_rows), test,
                                                     val=source.subset(val_rows)), 1)
    best = max(choose_configs(sweep.heads), key=lambda result: result.val_mAP)

    split = load_split("voc2007", stores["voc_root"], "trainval")
    demo_config = data_config(create_backbone(defaults.DEMO_MODEL), defaults.DEMO_IMAGE_SIZE)
    dataset = ImageDataset(split.samples, demo_config)
    demo_images = torch.stack([dataset[index][1] for index in range(defaults.EXTRACT_BATCH_SIZE)])
    demo_per_image = forward_seconds_per_image(defaults.DEMO_MODEL, defaults.DEMO_IMAGE_SIZE, demo_images,
                                               random_weights=False)
    reference_images = torch.randn(2, 3, REFERENCE_IMAGE_SIZE, REFERENCE_IMAGE_SIZE)
    reference_per_image = forward_seconds_per_image(REFERENCE_MODEL, REFERENCE_IMAGE_SIZE, reference_images,
                                                    random_weights=True)

    # The epoch covers every training image, validation rows included, as the reference trained on all of them.
    images = stores["train"].num_images
    demo_epoch = demo_per_image * images
    reference_epoch = reference_per_image * images
    logger.info("default sweep of %d heads: %.1f s; one backbone epoch: %.1f s (demo), %.1f s (R101x3 448 px)",
                len(configs), sweep_seconds, demo_epoch, reference_epoch)
    return {"heads": len(configs), "sweep_seconds": sweep_seconds, "train_images": images,
            "best_head": best.config.name, "best_val_mAP": best.val_mAP, "best_mAP": best.test_metrics["mAP"],
            "demo_epoch_seconds": demo_epoch, "demo_ratio": sweep_seconds / demo_epoch,
            "reference_model": REFERENCE_MODEL, "reference_image_size": REFERENCE_IMAGE_SIZE,
            "reference_epoch_seconds": reference_epoch, "reference_ratio": sweep_seconds / reference_epoch}


# VmHWM is the peak resident memory of this process image; unlike getrusage's
# ru_maxrss it does not inherit the peak of the parent that started it.
MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
import torch, numpy, h5py, sklearn
from mlprobe.probe.run import run_probe

def peak_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

baseline = peak_bytes()
run_probe([(Path(sys.argv[1]), Path(sys.argv[2]))], Path(sys.argv[3]), epochs=1)
print(json.dumps({"baseline": baseline, "peak": peak_bytes()}))
"""


def measure_memory(stores) -> dict:
    """Run the default probe in a fresh process; return its added peak memory against the features' bytes."""
    out = Path(stores["train"].path).parents[3] / "probe-memory"
    command = [sys.executable, "-c", MEMORY_SCRIPT, str(stores["train"].path), str(stores["test"].path), str(out)]
    measured = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
                          .splitlines()[-1])

    feature_bytes = sum(
        sum(store.feature_dims.values()) * 2 * store.num_images * store.views for store in (stores["train"], stores["test"])
    )
    added = measured["peak"] - measured["baseline"]
    return {"feature_bytes_float16": feature_bytes, "probe_added_peak_bytes": added,
            "probe_peak_rss_bytes": measured["peak"], "import_rss_bytes": measured["baseline"],
            "ratio": added / feature_bytes}


def markdown_lines(results: dict) -> list[str]:
    """Return the probe section of BENCHMARKS.md as markdown lines."""
    setup, joint, sk, epoch, memory, stages = (
        results[key] for key in ("setup", "joint", "sklearn", "epoch", "memory", "stages")
    )
    mib = 2**20
    return [
        f"Features: {setup['model']} at {setup['image_size']} px on demo data, {setup['train_rows']} training, "
        f"{setup['val_rows']} validation and {setup['test_rows']} test rows; {setup['torch_threads']} torch threads; "
        f"medians of {setup['repeats']} runs.",
        "",
        "| comparison | ours | other | ratio | target |",
        "|---|---|---|---|---|",
        f"| {joint['heads']} heads, {joint['epochs']} epochs: joint sweep vs one by one | {joint['joint_seconds']:.1f} s "
        f"| {joint['alone_seconds']:.1f} s | {joint['speedup']:.1f}x faster | {joint['target']:.0f}x |",
        f"| linear probe (reference settings) vs LogisticRegression one-vs-rest (C 0.1, standardised) | "
        f"{sk['ours_seconds']:.1f} s, mAP {sk['ours_mAP']:.4f} | {sk['sklearn_seconds']:.1f} s, mAP "
        f"{sk['sklearn_mAP']:.4f} | {sk['speedup']:.1f}x faster | {sk['target']:.0f}x at equal or better mAP |",
        f"| linear-probe sweep ({sk['sweep_heads']} heads, val-chosen {sk['sweep_config']}) vs the same "
        f"LogisticRegression | {sk['sweep_seconds']:.1f} s, mAP {sk['sweep_mAP']:.4f} | {sk['sklearn_seconds']:.1f} s "
        f"| {sk['sweep_speedup']:.1f}x faster | - |",
        f"| whole default sweep ({epoch['heads']} heads) vs one epoch of {setup['model']} forward passes "
        f"({epoch['train_images']} images) | {epoch['sweep_seconds']:.1f} s | {epoch['demo_epoch_seconds']:.1f} s | "
        f"{epoch['demo_ratio']:.2f} epochs | below 1 |",
        f"| whole default sweep vs one epoch of BiT-M R101x3 at {epoch['reference_image_size']} px forward passes | "
        f"{epoch['sweep_seconds']:.1f} s | {epoch['reference_epoch_seconds']:.0f} s | {epoch['reference_ratio']:.3f} "
        f"epochs | below 1 |",
        f"| val-chosen best head of the default sweep ({epoch['best_head']}) vs the best single-feature "
        f"LogisticRegression ({stages['best_feature']}) | mAP {epoch['best_mAP']:.4f} | mAP {stages['best_mAP']:.4f} | "
        f"{epoch['best_mAP'] - stages['best_mAP']:+.4f} | at least equal |",
        f"| probe peak memory added vs cached features (float16) | {memory['probe_added_peak_bytes'] / mib:.0f} MiB | "
        f"{memory['feature_bytes_float16'] / mib:.1f} MiB | {memory['ratio']:.1f}x | - |",
    ]


def main() -> None:
    """Run the probe benchmark and print its figures as JSON and markdown."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run(Path("bench/work"))
    print(json.dumps(results, indent=2))
    print("\n".join(markdown_lines(results)))


if __name__ == "__main__":
    main()
