"""Command line: one click group whose subcommands run each stage of the pipeline.

Run ``mlprobe --help`` (or ``python -m mlprobe.cli --help``) for the list.
Distributed extraction runs the same module under torchrun, for example
``torchrun --nproc-per-node 2 -m mlprobe.cli extract ...``.
"""

import contextlib
import logging
import sys
import time
from pathlib import Path

import click

from mlprobe import defaults
from mlprobe.errors import MlprobeError, StoreError

logger = logging.getLogger("mlprobe")

DATASETS = tuple(defaults.TRAIN_TEST_SPLITS)


class CommaList(click.ParamType):
    """A comma-separated list of values converted by ``convert_item``."""

    name = "list"

    def __init__(self, convert_item, metavar):
        self.convert_item = convert_item
        self.metavar = metavar

    def get_metavar(self, param, ctx=None):
        return self.metavar

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)

        items = [item.strip() for item in str(value).split(",") if item.strip()]
        if not items:
            self.fail(f"expected a comma-separated list, got {value!r}", param, ctx)

        try:
            return [self.convert_item(item) for item in items]
        except ValueError as error:
            self.fail(f"invalid value in {value!r}: {error}", param, ctx)


def parse_bytes(text):
    """Parse a size such as ``512MiB``, ``4GiB`` or ``1000000`` into bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()

    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)

    return int(lowered)


class Group(click.Group):
    """Click group that reports invalid input as one line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlprobeError as error:
            logger.debug("command failed", exc_info=True)
            raise click.ClickException(str(error)) from error


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Level of the log lines written to standard error.",
)
def cli(log_level):
    """Multi-label image classification by efficient transfer learning.

    Extract frozen backbone features once, then train linear and layover
    heads on the cached features for every stage in one sweep.
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@cli.command("backbones")
def backbones_command():
    """List the short backbone names and the timm models they stand for."""
    from mlprobe.extract.backbones import SHORT_NAMES

    width = max(len(name) for name in SHORT_NAMES)
    for short_name, timm_name in SHORT_NAMES.items():
        click.echo(f"{short_name:<{width}}  {timm_name}")
    click.echo(f"\nAny other timm model name works too; the demo uses {defaults.DEMO_MODEL}.")


@cli.command("download")
@click.argument("dataset", type=click.Choice(DATASETS[:-1]))
@click.option("--root", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="Folder to download and extract the archives into.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def download_command(dataset, root, progress):
    """Download DATASET from its official archive addresses (resumable)."""
    from mlprobe.extract.download import download

    download(dataset, root, progress=progress)


@cli.command("demo-data")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/demo"), show_default=True,
              help="Folder that receives the VOC and COCO layouts.")
@click.option("--train", "n_train", type=click.IntRange(min=1), default=defaults.DEMO_TRAIN_IMAGES,
              show_default=True, help="Number of training mosaics.")
@click.option("--test", "n_test", type=click.IntRange(min=1), default=defaults.DEMO_TEST_IMAGES,
              show_default=True, help="Number of test mosaics.")
@click.option("--seed", type=int, default=defaults.DEMO_SEED, show_default=True, help="Random seed.")
def demo_data_command(out, n_train, n_test, seed):
    """Write multi-label digit mosaics in the VOC and COCO layouts."""
    from mlprobe.extract.demo_data import build_demo_data

    summary = build_demo_data(out, n_train=n_train, n_test=n_test, seed=seed)
    click.echo(f"VOC layout:  {summary['voc_root']}")
    click.echo(f"COCO layout: {summary['coco_root']}")
    click.echo(f"images: {summary['counts']}, mean labels per image: {summary['label_cardinality']}")


def extract_options(command):
    """Add the options shared by ``extract`` and ``demo`` to ``command``."""
    options = [
        click.option("--batch-size", type=click.IntRange(min=1), default=defaults.EXTRACT_BATCH_SIZE,
                     show_default=True,
                     help="Backbone inputs per forward pass; with --views K, batch-size // K images of K views."),
        click.option("--workers", type=click.IntRange(min=0), default=defaults.EXTRACT_WORKERS,
                     show_default=True, help="DataLoader processes that decode and resize images."),
        click.option("--device", default=None, help="Torch device; default: cuda when present, else cpu."),
        click.option("--progress/--no-progress", default=True, help="Show progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command("extract")
@click.option("--dataset", type=click.Choice(DATASETS), required=True, help="Dataset format.")
@click.option("--root", type=click.Path(path_type=Path), required=True, help="Dataset root folder.")
@click.option("--split", "splits", type=CommaList(str, "SPLIT[,SPLIT]"), default=None,
              help="Splits to extract; default: the dataset's train and test splits.")
@click.option("--model", required=True, help="timm model name or short name (see `mlprobe backbones`).")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Square input size in pixels; default: the model's pretrained input size.")
@click.option("--out", type=click.Path(path_type=Path), default=Path(defaults.FEATURES_ROOT), show_default=True,
              help="Root folder of the feature stores.")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Load backbone weights from this state dict file instead of timm's pretrained weights.")
@click.option("--random-weights", is_flag=True,
              help="Use randomly initialised weights (smoke tests only: the features mean nothing).")
@click.option("--classes", "classes_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="CSV datasets: file with one class name per line, fixing the class order.")
@click.option("--shard-size", type=click.IntRange(min=1), default=defaults.SHARD_SIZE, show_default=True,
              help="Images per HDF5 shard.")
@click.option("--skip-bad", is_flag=True,
              help="Record unreadable images in the manifest and go on instead of stopping.")
@click.option("--views", type=click.IntRange(min=1), default=defaults.VIEWS, show_default=True,
              help="Augmented views stored per training image (RandAugment, then Cutout of half the image "
                   "side); other splits get the single unaugmented view. 1 stores the unaugmented view.")
@click.option("--view-seed", type=click.IntRange(min=0), default=defaults.VIEW_SEED, show_default=True,
              help="Base seed of the augmented views.")
@click.option("--augment-splits", type=CommaList(str, "SPLIT[,SPLIT]"),
              default=",".join(defaults.TRAINING_SPLIT_NAMES), show_default=True,
              help="Splits that get --views augmented views.")
@click.option("--compression", type=click.Choice(["none", "gzip", "lzf"]), default="none", show_default=True,
              help="HDF5 compression of the feature datasets.")
@click.option("--decode-on-gpu", is_flag=True,
              help="Decode JPEG files on the CUDA device with torchvision.io.decode_jpeg (needs a GPU).")
@extract_options
def extract_command(dataset, root, splits, model, image_size, out, checkpoint, random_weights,
                    classes_file, shard_size, skip_bad, views, view_seed, augment_splits, compression,
                    decode_on_gpu, batch_size, workers, device, progress):
    """Run a frozen backbone over a dataset and cache its pooled stage features.

    Under torchrun (WORLD_SIZE above 1) the processes join one torch.distributed group
    (nccl with CUDA, else gloo), split the shards by rank, and rank 0 writes the manifest.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mlprobe.extract.datasets import load_splits
    from mlprobe.extract.distributed import distributed_from_environment
    from mlprobe.extract.loop import extract_split
    from mlprobe.features import FeatureStore

    loaded = load_splits(dataset, root, splits or list(defaults.TRAIN_TEST_SPLITS[dataset]), classes_file=classes_file)
    with distributed_from_environment() as (rank, world_size), logging_redirect_tqdm(), resume_hint_on_interrupt():
        for split in loaded:
            split_name = split.split
            store = extract_split(
                split,
                model_name=model,
                image_size=image_size,
                out_root=out,
                batch_size=batch_size,
                workers=workers,
                shard_size=shard_size,
                device=device,
                checkpoint=checkpoint,
                random_weights=random_weights,
                skip_bad=skip_bad,
                progress=progress,
                rank=rank,
                world_size=world_size,
                compression=None if compression == "none" else compression,
                views=views,
                view_seed=view_seed,
                training=split_name in augment_splits,
                decode_on_gpu=decode_on_gpu,
            )
            if rank == 0:
                stored = FeatureStore.open(store, verify=False)
                skipped = f" ({len(stored.skipped)} unreadable skipped)" if stored.skipped else ""
                click.echo(f"{dataset} {split_name}: {stored.num_images} images{skipped} -> {store}")


@contextlib.contextmanager
def resume_hint_on_interrupt():
    """Turn Ctrl-C during extraction into a one-line message on how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        logger.warning("extraction interrupted")
        click.echo("Interrupted: complete shards are kept; run the same command again to resume.", err=True)
        sys.exit(130)


def probe_options(command):
    """Add the sweep options shared by ``probe`` and ``demo`` to ``command``."""
    options = [
        click.option("--head", "heads", type=CommaList(str, "HEAD[,HEAD]"), default=",".join(defaults.SWEEP_HEADS),
                     show_default=True, help="Head kinds: linear, layover, concat, all-stages."),
        click.option("--where", "wheres", type=CommaList(int, "STAGE[,STAGE]"), default=None,
                     help="Stages for layover and concat heads, counted from 0; default: every stage stored."),
        click.option("--seed", "seeds", type=CommaList(int, "SEED[,SEED]"),
                     default=",".join(map(str, defaults.SWEEP_SEEDS)), show_default=True,
                     help="Seeds of head initialisation and batch order."),
        click.option("--lr", "lrs", type=CommaList(float, "LR[,LR]"),
                     default=",".join(map(str, defaults.SWEEP_LEARNING_RATES)), show_default=True,
                     help="Initial learning rates (cosine-annealed to 0)."),
        click.option("--weight-decay", "weight_decays", type=CommaList(float, "WD[,WD]"),
                     default=",".join(map(str, defaults.SWEEP_WEIGHT_DECAYS)), show_default=True,
                     help="L2 weight decays."),
        click.option("--normalization", "normalizations", type=CommaList(str, "NORM[,NORM]"),
                     default=",".join(defaults.SWEEP_NORMALIZATIONS), show_default=True,
                     help="Feature normalisations: none, standardize (training statistics), l2."),
        click.option("--epochs", type=click.IntRange(min=1), default=defaults.EPOCHS, show_default=True,
                     help="Training epochs."),
        click.option("--probe-batch-size", type=click.IntRange(min=1), default=defaults.BATCH_SIZE,
                     show_default=True, help="Cached feature rows per training step of every head."),
        click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=defaults.VAL_FRACTION,
                     show_default=True,
                     help="Share of the training images held out to choose epoch and settings; 0 chooses on test."),
        click.option("--split-seed", type=int, default=defaults.SPLIT_SEED, show_default=True,
                     help="Seed of the train/validation split."),
        click.option("--difficult", type=click.Choice(["positive", "ignore"]), default="positive",
                     show_default=True, help="How training treats labels marked difficult."),
        click.option("--max-memory", type=parse_bytes, default="4GiB", show_default=True,
                     help="Bound on the float32 training features held at once; beyond it they stream by chunks."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_sweep(pairs, out, sweep, device, progress):
    """Train the sweep on (train store, test store) pairs and print the result table."""
    from mlprobe.probe.results import format_markdown
    from mlprobe.probe.run import run_probe

    started = time.perf_counter()
    rows = run_probe(
        pairs,
        out,
        heads=sweep["heads"],
        wheres=sweep["wheres"],
        seeds=sweep["seeds"],
        lrs=sweep["lrs"],
        weight_decays=sweep["weight_decays"],
        normalizations=sweep["normalizations"],
        epochs=sweep["epochs"],
        batch_size=sweep["probe_batch_size"],
        val_fraction=sweep["val_fraction"],
        split_seed=sweep["split_seed"],
        difficult=sweep["difficult"],
        device=device,
        max_memory_bytes=sweep["max_memory"],
        progress=progress,
    )
    logger.info("probe finished in %.1f s: %d result rows in %s", time.perf_counter() - started, len(rows), out)

    click.echo(format_markdown(rows))
    click.echo(f"\nresults: {out / 'results.csv'}")
    return rows


def store_pairs(features, dataset, models, image_size, train_split, test_split):
    """Return the (train store, test store) directory pair of every model."""
    from mlprobe.extract.backbones import resolve_model_name
    from mlprobe.features.layout import store_dir

    pairs = []
    for model in models:
        timm_name = resolve_model_name(model)
        pair = tuple(store_dir(features, dataset, timm_name, image_size, split) for split in (train_split, test_split))
        for path in pair:
            if not path.is_dir():
                raise StoreError(f"feature store {path} not found; stores under {Path(features) / dataset}: "
                                 f"{available_stores(Path(features) / dataset)}; check --model, --image-size "
                                 "and the splits, or run `mlprobe extract`")
        pairs.append(pair)
    return pairs


def available_stores(dataset_folder):
    """Return the "model-size/split" names of the complete stores in a dataset's folder, or "none"."""
    names = sorted(str(manifest.parent.relative_to(dataset_folder)) for manifest in dataset_folder.glob("*/*/manifest.json"))
    return ", ".join(names) or "none"


@cli.command("probe")
@click.option("--features", type=click.Path(path_type=Path), default=Path(defaults.FEATURES_ROOT),
              show_default=True, help="Root folder of the feature stores.")
@click.option("--dataset", type=click.Choice(DATASETS), required=True, help="Dataset whose stores to read.")
@click.option("--model", "models", type=CommaList(str, "MODEL[,MODEL]"), required=True,
              help="Models whose stores to probe, side by side.")
@click.option("--image-size", type=click.IntRange(min=1), required=True, help="Image size the stores were made at.")
@click.option("--train-split", default=None, help="Training split; default: the dataset's usual one.")
@click.option("--test-split", default=None, help="Test split; default: the dataset's usual one.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for results and head weights.")
@click.option("--device", default=None, help="Torch device; default: cuda when present, else cpu.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@probe_options
def probe_command(features, dataset, models, image_size, train_split, test_split, out, device, progress,
                  **sweep):
    """Train every head of the sweep on cached features and report mAP, CF1 and OF1."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    default_train, default_test = defaults.TRAIN_TEST_SPLITS[dataset]
    pairs = store_pairs(features, dataset, models, image_size, train_split or default_train,
                        test_split or default_test)
    with logging_redirect_tqdm():
        run_sweep(pairs, out, sweep, device, progress)


@cli.command("demo")
@click.option("--data", type=click.Path(path_type=Path), default=Path("data/demo"), show_default=True,
              help="Folder of the generated demo images.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for the feature stores and the probe results.")
@click.option("--layout", type=click.Choice(["voc2007", "coco2017"]), default="voc2007", show_default=True,
              help="Which on-disk layout of the demo data to read.")
@extract_options
@probe_options
def demo_command(data, out, layout, batch_size, workers, device, progress, **sweep):
    """Build the digit mosaics, extract tf_efficientnet_lite0 features and probe them."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        run_demo(data, out, layout, batch_size, workers, device, progress, sweep)


def run_demo(data, out, layout, batch_size, workers, device, progress, sweep):
    """Build the demo data, extract its train and test stores, and run the sweep on them."""
    from mlprobe.extract.datasets import load_splits
    from mlprobe.extract.demo_data import build_demo_data
    from mlprobe.extract.loop import extract_split

    summary = build_demo_data(data)
    root = Path(summary["voc_root"] if layout == "voc2007" else summary["coco_root"])
    features = out / "features"

    stores = []
    for split in load_splits(layout, root, list(defaults.TRAIN_TEST_SPLITS[layout])):
        stores.append(
            extract_split(
                split,
                model_name=defaults.DEMO_MODEL,
                image_size=defaults.DEMO_IMAGE_SIZE,
                out_root=features,
                batch_size=batch_size,
                workers=workers,
                shard_size=defaults.SHARD_SIZE,
                device=device,
                progress=progress,
            )
        )

    run_sweep([tuple(stores)], out, sweep, device, progress)


@cli.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--head", "head_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help="Head weight file written by probe (runs/.../heads/*.pt).")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Backbone state dict, when the features were extracted with --checkpoint.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=defaults.THRESHOLD, show_default=True,
              help="Probability at which a class is reported.")
def predict_command(images, head_file, checkpoint, threshold):
    """Classify IMAGES with a trained head on its live backbone."""
    from mlprobe.probe.classifier import load_classifier

    classifier = load_classifier(head_file, checkpoint=checkpoint)
    predictions = classifier.predict_files(list(images), threshold)
    for path, labels in zip(images, predictions):
        ranked = sorted(labels.items(), key=lambda item: -item[1])
        click.echo(f"{path}: " + (", ".join(f"{name} {value:.2f}" for name, value in ranked) or "(no class)"))


def main():
    """Run the command line."""
    cli(prog_name="mlprobe")


if __name__ == "__main__":
    main()
