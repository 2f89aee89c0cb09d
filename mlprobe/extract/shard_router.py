"""Routing the rows of each extracted batch into their shards, written on one background thread.

HDF5 writes run on the writer thread, so the next batch decodes and runs while the previous
one is written. A shard is published (renamed and given its sidecar) once its last sample
has passed. A write error stops every later write, so a shard missing rows is never published.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlprobe.errors import DatasetError
from mlprobe.features.writer import ShardWriter

logger = logging.getLogger(__name__)

MAX_PENDING_WRITES = 4  # batches queued for the writer thread before the loop waits for it


@dataclass
class ShardPlan:
    """One shard: its sample range and the sidecar fields a rerun must find unchanged."""

    index: int
    start: int
    stop: int
    expected: dict[str, Any]


@dataclass
class ShardProgress:
    """A shard being written: its writer, skipped images and row counts."""

    plan: ShardPlan
    writer: ShardWriter
    started: float  # perf_counter seconds when the previous shard was queued for publishing, or the loop began
    skipped: list[dict[str, str]] = field(default_factory=list)
    processed: int = 0


class ShardRouter:
    """Send each batch's rows to the shards they belong to, on a single writer thread.

    Batches arrive in sample order, so a shard is complete when its last sample has passed.
    """

    def __init__(self, split, plans: list[ShardPlan], directory: Path, config: dict, skip_bad: bool, compression):
        self.split = split
        self.plans = plans
        self.directory = directory
        self.config = config
        self.skip_bad = skip_bad
        self.compression = compression
        self.position = 0  # index in plans of the shard receiving rows
        self.current: ShardProgress | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: list[Future] = []
        self.failed = False  # set on the writer thread when a write raised
        self.last_boundary = time.perf_counter()
        self.open_writers: list[ShardWriter] = []

    def add_batch(self, indices: list[int], features: dict[str, np.ndarray], errors: list[str]) -> None:
        """Route one batch: ``indices`` [b] sample indices, ``features`` rows of the readable images, ``errors`` [b]."""
        good_row = 0
        batch_start = 0
        while batch_start < len(indices):
            shard = self._shard_for(indices[batch_start])
            batch_stop = batch_start
            while batch_stop < len(indices) and indices[batch_stop] < shard.plan.stop:
                batch_stop += 1

            rows = range(batch_start, batch_stop)
            good = [row for row in rows if not errors[row]]
            for row in rows:
                if errors[row]:
                    sample = self.split.samples[indices[row]]
                    shard.skipped.append({"image_id": sample.image_id, "path": str(sample.path), "reason": errors[row]})

            self._append(shard, [indices[row] for row in good], features, good_row, good_row + len(good))
            good_row += len(good)
            shard.processed += batch_stop - batch_start
            if shard.processed == shard.plan.stop - shard.plan.start:
                self._finish(shard)
            batch_start = batch_stop

    def check_errors(self, indices: list[int], errors: list[str]) -> None:
        """Raise the first unreadable image's DatasetError, or log each one when skipping."""
        for index, error in zip(indices, errors):
            if not error:
                continue
            if not self.skip_bad:
                raise DatasetError(f"{error}, or pass --skip-bad to record it in the manifest and go on")
            logger.warning("skipping image %s: %s", self.split.samples[index].image_id, error)

    def _shard_for(self, index: int) -> ShardProgress:
        """Return the shard receiving sample ``index``, opening its writer on first use."""
        if self.current is not None and index < self.current.plan.stop:
            return self.current

        plan = self.plans[self.position]
        self.position += 1
        if not plan.start <= index < plan.stop:
            raise RuntimeError(f"sample {index} arrived outside shard {plan.index} ({plan.start}..{plan.stop - 1})")

        writer = ShardWriter(
            self.directory,
            plan.index,
            feature_dims=self.config["feature_dims"],
            views=self.config["views"],
            num_classes=len(self.config["class_names"]),
            compression=self.compression,
            max_rows=plan.stop - plan.start,
        )
        self.open_writers.append(writer)
        self._submit(writer.open)
        self.current = ShardProgress(plan, writer, started=self.last_boundary)
        return self.current

    def _append(self, shard: ShardProgress, sample_indices: list[int], features: dict, first: int, stop: int) -> None:
        if not sample_indices:
            return

        rows = {name: values[first:stop] for name, values in features.items()}
        samples = [self.split.samples[index] for index in sample_indices]
        labels = np.stack([sample.labels for sample in samples]).astype(np.int8)
        image_ids = [sample.image_id for sample in samples]
        self._submit(shard.writer.append, rows, labels, image_ids)

    def _finish(self, shard: ShardProgress) -> None:
        fields = {**shard.plan.expected, "skipped": shard.skipped}
        self._submit(self._finish_shard, shard, fields)
        self.current = None
        self.last_boundary = time.perf_counter()

    def _finish_shard(self, shard: ShardProgress, fields: dict) -> None:
        """Publish a shard and log its timing; runs on the writer thread."""
        sidecar = shard.writer.finish(fields)
        self.open_writers.remove(shard.writer)
        elapsed = time.perf_counter() - shard.started
        images = shard.plan.stop - shard.plan.start
        logger.info(
            "shard %d (images %d..%d): %d rows, %d skipped, %.1f s, %.1f images/s",
            shard.plan.index,
            shard.plan.start,
            shard.plan.stop - 1,
            sidecar["rows"],
            len(shard.skipped),
            elapsed,
            images / max(elapsed, 1e-9),
        )

    def _submit(self, function, *args) -> None:
        """Queue a call on the writer thread; wait for the oldest when too many are queued."""
        self.pending.append(self.executor.submit(self._run_unless_failed, function, *args))
        while len(self.pending) > MAX_PENDING_WRITES:
            self.pending.pop(0).result()

    def _run_unless_failed(self, function, *args) -> None:
        """Run a queued call unless an earlier one failed, so a shard missing rows is never published."""
        if self.failed:
            return
        try:
            function(*args)
        except BaseException:
            self.failed = True
            raise

    def wait(self) -> None:
        """Wait for every queued write and stop the writer thread; raises the first write error."""
        for future in self.pending:
            future.result()
        self.pending.clear()
        self.executor.shutdown(wait=True)

    def abort(self) -> None:
        """Drop queued writes and delete the temporary files of unfinished shards."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        for writer in list(self.open_writers):
            writer.abort()
        self.open_writers.clear()
