"""Extraction benchmark: throughput against a pure forward pass, 2 processes against 1, bytes on disk.

Every figure comes from one run on one machine, side by side:

- throughput: ``extract_split`` from the demo JPEG files into a store, against the same
  backbone's forward pass over the same images already decoded into tensors of the same
  size, with the same batch size, threads and device. Runs alternate between the two so
  that background load affects both alike.
- scaling: 2 processes (gloo, one torch thread each) against 1 process with 2 torch
  threads, both with ``workers=0`` so that the total number of compute threads is equal.
- storage: bytes per image of the store folder against the theoretical size, the sum of
  the feature widths times 2 bytes (float16), without compression, with gzip and with lzf.

Run ``python -m bench.extraction`` from the repository root. Each timed quantity is run
``repeats`` times and reported as the median.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlprobe import defaults
from mlprobe.extract.backbones import FeatureExtractor, create_backbone, data_config
from mlprobe.extract.datasets import load_split
from mlprobe.extract.demo_data import build_demo_data
from mlprobe.extract.images import ImageDataset
from mlprobe.extract.loop import extract_split

logger = logging.getLogger(__name__)

MODEL = defaults.DEMO_MODEL
IMAGE_SIZE = defaults.DEMO_IMAGE_SIZE
BATCH_SIZE = defaults.EXTRACT_BATCH_SIZE
THROUGHPUT_TARGET = 0.85  # extraction images/s as a fraction of the pure forward pass
REPEATS = 3


def run(work_dir: Path, *, images: int = 1000, repeats: int = REPEATS) -> dict:
    """Measure extraction throughput, 2-process scaling and storage on the demo images.

    Args:
        work_dir: folder for the demo images and the stores; it is reused between runs.
        images: training mosaics to extract.
        repeats: runs of every timed quantity; the medians are reported.

    Returns:
        dict with ``setup`` (machine and settings), ``throughput``, ``scaling``, ``storage``
        (raw figures in images/s, seconds and bytes) and ``markdown`` (lines for a table).
    """
    work_dir = Path(work_dir)
    demo = build_demo_data(work_dir / "demo", n_train=images, n_test=1)
    split = load_split("voc2007", Path(demo["voc_root"]), "trainval")

    results = {"setup": _setup(images, repeats)}
    results["throughput"] = measure_throughput(split, work_dir / "throughput", repeats)
    results["scaling"] = measure_scaling(Path(demo["voc_root"]), work_dir / "scaling", repeats)
    results["storage"] = measure_storage(split, work_dir / "storage")
    results["setup"]["load_average_after"] = _load_average()
    results["markdown"] = markdown_lines(results)
    return results


def _setup(images: int, repeats: int) -> dict:
    """Return the machine and the settings every measurement shares."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": MODEL,
        "image_size": IMAGE_SIZE,
        "batch_size": BATCH_SIZE,
        "loader_workers": defaults.EXTRACT_WORKERS,
        "images": images,
        "repeats": repeats,
        "load_average_before": _load_average(),
    }


def _load_average() -> list[float] | None:
    """Return the 1, 5 and 15 minute load averages where the system has them."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


# --- Throughput ---------------------------------------------------------------------------


def measure_throughput(split, out: Path, repeats: int) -> dict:
    """Time ``extract_split`` and the pure forward pass over the same images, alternately.

    The extraction figure ``extract_images_per_s`` counts the extraction loop: decoding in
    the default number of loader workers, forward passes, float16 conversion and shard
    writes. ``end_to_end_images_per_s`` also counts model loading, the weights fingerprint
    and the manifest. ``no_workers_images_per_s`` is the loop with decoding in the main
    process, which on a machine with few cores competes less with the forward pass. The
    forward figure runs the same FeatureExtractor on float32 [B, 3, S, S] tensors decoded
    beforehand.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_backbone(MODEL)
    extractor = FeatureExtractor(model).to(device, memory_format=torch.channels_last)
    tensors = _decoded_images(split, data_config(model, IMAGE_SIZE))
    count = len(split.samples)

    runs: dict[str, list[float]] = {"extract": [], "end_to_end": [], "no_workers": [], "forward": []}
    for repeat in range(repeats):
        timings = _time_extraction(split, out, defaults.EXTRACT_WORKERS)
        runs["end_to_end"].append(count / timings["seconds"])
        runs["extract"].append(count / timings["extract_s"])
        runs["no_workers"].append(count / _time_extraction(split, out, 0)["extract_s"])
        runs["forward"].append(count / _time_forward(extractor, tensors, device))
        logger.info(
            "throughput repeat %d: extraction %.1f images/s (%.1f end to end, %.1f without workers), "
            "forward %.1f images/s",
            repeat, runs["extract"][-1], runs["end_to_end"][-1], runs["no_workers"][-1], runs["forward"][-1],
        )

    medians = {name: statistics.median(rates) for name, rates in runs.items()}
    return {
        "device": str(device),
        "extract_images_per_s": medians["extract"],
        "end_to_end_images_per_s": medians["end_to_end"],
        "no_workers_images_per_s": medians["no_workers"],
        "forward_images_per_s": medians["forward"],
        "ratio": medians["extract"] / medians["forward"],
        "end_to_end_ratio": medians["end_to_end"] / medians["forward"],
        "no_workers_ratio": medians["no_workers"] / medians["forward"],
        "target": THROUGHPUT_TARGET,
        "runs": runs,
    }


def _time_extraction(split, out: Path, workers: int) -> dict:
    """Extract the split into a fresh store; return its ``timings`` plus ``seconds`` for the whole call."""
    shutil.rmtree(out, ignore_errors=True)
    timings: dict = {}
    started = time.perf_counter()
    extract_split(
        split, model_name=MODEL, image_size=IMAGE_SIZE, out_root=out, batch_size=BATCH_SIZE, workers=workers,
        progress=False, timings=timings,
    )
    timings["seconds"] = time.perf_counter() - started
    return timings


def _decoded_images(split, config: dict) -> torch.Tensor:
    """Decode, resize and normalise every image of the split: float32 [N, 3, S, S]."""
    dataset = ImageDataset(split.samples, config)
    return torch.stack([dataset[position][1] for position in range(len(dataset))])


def _time_forward(extractor: FeatureExtractor, tensors: torch.Tensor, device: torch.device) -> float:
    """Return the seconds of one forward pass over ``tensors`` in batches of BATCH_SIZE."""
    if device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cpu", enabled=False)
    started = time.perf_counter()
    with torch.inference_mode(), autocast:
        for batch in tensors.split(BATCH_SIZE):
            outputs = extractor(batch.to(device).contiguous(memory_format=torch.channels_last))
        if device.type == "cuda":
            torch.cuda.synchronize()
    del outputs
    return time.perf_counter() - started


# --- Scaling ------------------------------------------------------------------------------


def measure_scaling(voc_root: Path, out: Path, repeats: int) -> dict:
    """Time the extraction with 1 process of 2 threads and with 2 gloo processes of 1 thread.

    Each run starts fresh processes. The clock starts at a barrier after every process has
    loaded torch and stops when rank 0 has written the manifest, so both figures include
    model loading and the weights fingerprint.
    """
    total_threads = max(2, torch.get_num_threads())
    rates: dict[int, list[float]] = {1: [], 2: []}
    loop_rates: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for processes in (1, 2):
            result = _run_processes(voc_root, out / f"{processes}-{repeat}", processes, total_threads // processes)
            rates[processes].append(result["images"] / result["seconds"])
            loop_rates[processes].append(result["images"] / result["extract_s"])
            logger.info("scaling repeat %d: %d processes, %.1f images/s", repeat, processes, rates[processes][-1])

    one_process = statistics.median(rates[1])
    two_processes = statistics.median(rates[2])
    return {
        "total_threads": total_threads,
        "one_process_images_per_s": one_process,
        "two_processes_images_per_s": two_processes,
        "ratio": two_processes / one_process,
        "one_process_loop_images_per_s": statistics.median(loop_rates[1]),
        "two_processes_loop_images_per_s": statistics.median(loop_rates[2]),
        "runs": {"1": rates[1], "2": rates[2]},
    }


def _run_processes(voc_root: Path, out: Path, processes: int, threads: int) -> dict:
    """Run one extraction in ``processes`` spawned processes and return rank 0's timing."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result_file = out / "rank0.json"
    torch.multiprocessing.spawn(
        _scaling_worker,
        args=(processes, threads, str(voc_root), str(out), _free_port(), str(result_file)),
        nprocs=processes,
        join=True,
    )
    return json.loads(result_file.read_text())


def _scaling_worker(rank: int, processes: int, threads: int, voc_root: str, out: str, port: int, result_file: str):
    """Run one process of a scaling run: join the group, extract this rank's shards, and time it."""
    torch.set_num_threads(threads)
    if processes > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=processes
        )
    split = load_split("voc2007", Path(voc_root), "trainval")
    shard_size = -(-len(split.samples) // (4 * processes))  # 4 shards per process

    if processes > 1:
        torch.distributed.barrier()
    timings: dict = {}
    started = time.perf_counter()
    extract_split(
        split, model_name=MODEL, image_size=IMAGE_SIZE, out_root=Path(out) / "features", batch_size=BATCH_SIZE,
        workers=0, shard_size=shard_size, progress=False, timings=timings,
    )
    seconds = time.perf_counter() - started

    if processes > 1:
        extract_seconds = torch.tensor([timings["extract_s"]])
        torch.distributed.all_reduce(extract_seconds, op=torch.distributed.ReduceOp.MAX)
        timings["extract_s"] = float(extract_seconds)
        torch.distributed.destroy_process_group()
    if rank == 0:
        Path(result_file).write_text(
            json.dumps({"seconds": seconds, "extract_s": timings["extract_s"], "images": len(split.samples)})
        )


def _free_port() -> int:
    """Return a TCP port on the loopback interface that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- Storage ------------------------------------------------------------------------------


def measure_storage(split, out: Path) -> dict:
    """Extract the split without compression, with gzip and with lzf; return bytes per image of each store."""
    results = {}
    for compression in (None, "gzip", "lzf"):
        root = out / (compression or "none")
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        directory = extract_split(
            split, model_name=MODEL, image_size=IMAGE_SIZE, out_root=root, batch_size=BATCH_SIZE, progress=False,
            compression=compression,
        )
        seconds = time.perf_counter() - started
        manifest = json.loads((directory / "manifest.json").read_text())
        store_bytes = sum(path.stat().st_size for path in directory.iterdir() if path.is_file())
        theoretical = sum(manifest["feature_dims"].values()) * 2 * manifest["views"]
        results[compression or "none"] = {
            "bytes_per_image": store_bytes / manifest["num_images"],
            "theoretical_bytes_per_image": theoretical,
            "ratio": store_bytes / manifest["num_images"] / theoretical,
            "extract_end_to_end_s": seconds,
        }
    return results


# --- Report -------------------------------------------------------------------------------


def markdown_lines(results: dict) -> list[str]:
    """Format the figures as markdown lines for BENCHMARKS.md, without a heading."""
    setup, throughput, scaling, storage = (
        results["setup"], results["throughput"], results["scaling"], results["storage"]
    )
    lines = [
        f"`bench/extraction.py`: {setup['images']} demo mosaics ({2 * defaults.DEMO_CELL} px JPEGs), "
        f"{setup['model']} with its package weights at {setup['image_size']} px, "
        f"batch size {setup['batch_size']}, medians of {setup['repeats']} runs, torch with "
        f"{setup['torch_threads']} threads. Load averages (1, 5, 15 min): {setup['load_average_before']} before, "
        f"{setup['load_average_after']} after.",
        "",
        "| measurement | figure |",
        "| --- | --- |",
        f"| pure forward pass on decoded tensors ({throughput['device']}) | "
        f"{throughput['forward_images_per_s']:.0f} images/s (runs {_span(throughput['runs']['forward'])}) |",
        f"| extraction loop, JPEG files to store, {setup['loader_workers']} loader workers | "
        f"{throughput['extract_images_per_s']:.0f} images/s (runs {_span(throughput['runs']['extract'])}); "
        f"{throughput['ratio']:.2f} of the forward pass, target {throughput['target']:.2f} |",
        f"| extraction including model load and manifest | {throughput['end_to_end_images_per_s']:.0f} images/s "
        f"({throughput['end_to_end_ratio']:.2f} of the forward pass) |",
        f"| extraction loop, decoding in the main process (0 workers) | "
        f"{throughput['no_workers_images_per_s']:.0f} images/s "
        f"({throughput['no_workers_ratio']:.2f} of the forward pass) |",
        f"| 1 process, {scaling['total_threads']} threads, no loader workers | "
        f"{scaling['one_process_images_per_s']:.0f} images/s (runs {_span(scaling['runs']['1'])}) |",
        f"| 2 processes (gloo), {scaling['total_threads'] // 2} thread each, no loader workers | "
        f"{scaling['two_processes_images_per_s']:.0f} images/s (runs {_span(scaling['runs']['2'])}); "
        f"{scaling['ratio']:.2f}x one process |",
    ]
    for name, figures in storage.items():
        label = "no compression" if name == "none" else f"{name} compression"
        lines.append(
            f"| bytes per image, {label} | {figures['bytes_per_image']:.0f} "
            f"({figures['ratio']:.2f} of {figures['theoretical_bytes_per_image']} theoretical) |"
        )
    return lines


def _span(values: list[float]) -> str:
    """Format the lowest and highest of a list of rates, for example ``112-140``."""
    return f"{min(values):.0f}-{max(values):.0f}"


def main() -> None:
    """Run the benchmark in a temporary folder and print the raw figures and the markdown table."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    images = int(sys.argv[1]) if len(sys.argv) > 1 else 1000

    with tempfile.TemporaryDirectory(prefix="mlprobe-bench-") as work_dir:
        results = run(Path(work_dir), images=images)

    print(json.dumps({key: value for key, value in results.items() if key != "markdown"}, indent=2))
    print()
    print("\n".join(results["markdown"]))


if __name__ == "__main__":
    main()
