"""Joint training of every head of a sweep on the cached features of one store.

All heads train in one pass over the data. Heads that share kind, stage,
normalisation and seed form a group whose parameters are stacked
(StackedHeads), so one step of the group is a few matrix products whatever the
number of heads in it. Each head keeps its own learning rate, weight decay,
momentum buffer, cosine schedule and batch order (drawn from its seed), and the
loss is the sum of the heads' losses, so every head follows the same
trajectory as when it is trained alone with torch.optim.SGD (momentum 0.9,
dampening 0, no Nesterov), CosineAnnealingLR(T_max=epochs) stepped once per
epoch and MultiLabelSoftMarginLoss, up to float rounding.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from mlprobe import defaults
from mlprobe.errors import MlprobeError
from mlprobe.probe.data import READ_CHUNK_ROWS, feature_statistics
from mlprobe.probe.heads import FINAL, Head, StackedHeads, input_names, normalize_feature, single_head_from_state
from mlprobe.probe.metrics import evaluate, mean_average_precision_batch
from mlprobe.probe.sweep import HeadConfig, stage_indices

logger = logging.getLogger(__name__)

DIFFICULT_MODES = ("positive", "ignore")
# Elements of the largest intermediate tensor ([rows, heads, width]) in one
# evaluation block; about 32 MB of float32.
_EVAL_BLOCK_ELEMENTS = 8_000_000


@dataclass
class HeadResult:
    """Training history and chosen epoch of one head.

    Epochs are counted from 1. The histories hold one value per epoch; val_map is
    None without a validation split. best_epoch is chosen on `selected_on`
    ("val", or "test" without a validation split); test_metrics is evaluate() on
    the test rows at best_epoch. ref_mAP and ref_best_epoch follow the
    reference protocol: the best test mAP over the epochs.
    """

    config: HeadConfig
    train_loss: list[float]
    val_map: list[float] | None
    test_map: list[float]
    best_epoch: int
    selected_on: str
    val_mAP: float | None
    test_metrics: dict
    ref_mAP: float
    ref_best_epoch: int
    head: Head


@dataclass
class SweepResult:
    """Every head's result plus the memory and time the sweep used.

    memory keys:
    - "mode": "resident" or "streaming".
    - "feature_bytes": float32 bytes of every feature row the sweep reads.
    - "peak_feature_bytes": the most feature bytes in memory at one time,
      counted as the float32 blocks (resident) or the largest float16 chunk
      plus its float32 copy (streaming).
    - "parameter_bytes": parameters, gradients, momentum buffers and best-epoch copies.
    - "chunk_rows": rows per streamed chunk, 0 when resident.
    - "max_memory_bytes": the bound requested.
    - "max_rss_bytes": the process's peak resident set size (getrusage).
    """

    heads: list[HeadResult]
    memory: dict
    seconds: float
    statistics: dict = field(default_factory=dict)


def resolve_device(device: str | None) -> torch.device:
    """Return the requested torch device, or cuda when present, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cosine_schedule(base_lr: float, epochs: int) -> list[float]:
    """Return the learning rate of each epoch under CosineAnnealingLR(T_max=epochs, eta_min=0).

    This repeats the recursive update of torch's CosineAnnealingLR.get_lr
    (torch 2.x) in the same float operations, so the rates equal those of a
    scheduler stepped once per epoch. A test compares them with the scheduler.
    Running the scheduler itself would need a torch optimizer, whose first
    construction imports torch._dynamo (over a second on a 2-core machine).
    """
    rates = [float(base_lr)]
    for epoch in range(1, epochs):
        previous = rates[-1]
        if (epoch - 1 - epochs) % (2 * epochs) == 0:
            rates.append(previous + base_lr * (1 - math.cos(math.pi / epochs)) / 2)
        else:
            factor = (1 + math.cos(math.pi * epoch / epochs)) / (1 + math.cos(math.pi * (epoch - 1) / epochs))
            rates.append(factor * previous)
    return rates


def batch_order(seed: int, epoch: int, chunk_index: int, num_rows: int) -> np.ndarray:
    """Return the order (int64 [num_rows]) in which a head of this seed visits a chunk's rows in an epoch.

    Drawn by numpy's default_rng([seed, epoch, chunk_index]); with resident
    features the only chunk is 0. Heads of the same seed share the order.
    """
    return np.random.default_rng([seed, epoch, chunk_index]).permutation(num_rows)


def view_draws(seed: int, epoch: int, chunk_index: int, num_rows: int, views: int) -> np.ndarray:
    """Return the augmented view (int64 [num_rows] in [0, views)) that each row shows a head of this seed in an epoch.

    Every image gets its own uniform draw each epoch, from numpy's
    default_rng([seed, epoch, chunk_index, 1]), so heads of the same seed see
    the same views and the draw does not depend on which other heads train.
    """
    return np.random.default_rng([seed, epoch, chunk_index, 1]).integers(0, views, size=num_rows)


def training_targets(labels: np.ndarray, difficult: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn int8 labels [N, K] in -1/0/1 into float32 targets and an optional float32 mask.

    difficult="positive" counts difficult (0) labels as positive, as the reference
    method does; "ignore" gives them target 0 and mask 0 so they add no loss.
    """
    if difficult == "positive":
        return (labels != -1).astype(np.float32), None
    if difficult == "ignore":
        return (labels == 1).astype(np.float32), (labels != 0).astype(np.float32)
    raise MlprobeError(f"difficult={difficult!r} is invalid; choose from {', '.join(DIFFICULT_MODES)}")


def soft_margin_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Return MultiLabelSoftMarginLoss per head, float32 [H], from logits [B, H, K].

    targets and mask are [B, 1, K] or [B, H, K]. The formula is torch's own:
    the per-label loss, times the mask, summed over classes and divided by K,
    then averaged over the batch.
    """
    loss = -(targets * torch.nn.functional.logsigmoid(logits) + (1 - targets) * torch.nn.functional.logsigmoid(-logits))
    if mask is not None:
        loss = loss * mask
    return (loss.sum(dim=-1) / logits.shape[-1]).mean(dim=0)


@dataclass
class _Rows:
    """Features of a set of rows on the device: float32 [n, V, D] per name, targets and labels."""

    features: dict[str, torch.Tensor]
    targets: torch.Tensor
    mask: torch.Tensor | None
    labels: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.targets.shape[0]


class _Group:
    """Heads that share kind, stage, normalisation and seed, trained as one StackedHeads."""

    def __init__(self, key: tuple, indices: list[int], configs: list[HeadConfig], names: list[str], dims: list[int],
                 num_classes: int, epochs: int, device: torch.device):
        self.kind, self.where, self.normalization, self.seed = key
        self.indices = indices
        self.names = names
        members = [configs[index] for index in indices]
        self.stacked = StackedHeads(self.kind, names, dims, num_classes, [config.seed for config in members]).to(device)
        self.parameters = [getattr(self.stacked, spec.name.replace(".", "_")) for spec in self.stacked.specs]
        self.head_dims = [self.stacked.head_dim(spec.name) for spec in self.stacked.specs]
        self.best = [parameter.detach().clone() for parameter in self.parameters]

        schedules = {lr: cosine_schedule(lr, epochs) for lr in {config.lr for config in members}}
        self.lr_values = [[schedules[config.lr][epoch] for config in members] for epoch in range(epochs)]
        self.lr_by_epoch = torch.tensor(self.lr_values, dtype=torch.float32, device=device)
        self.decays = torch.tensor([config.weight_decay for config in members], dtype=torch.float32, device=device)

        count = len(indices)
        self.train_loss = np.zeros((epochs, count))
        self.val_map = np.full((epochs, count), math.nan)
        self.test_map = np.full((epochs, count), math.nan)
        self.best_score = torch.full((count,), -math.inf, dtype=torch.float64)

    def per_head_views(self, values: torch.Tensor) -> list[torch.Tensor]:
        """View a per-head vector [H] once per parameter so that it broadcasts along the head dimension."""
        views = []
        for parameter, head_dim in zip(self.parameters, self.head_dims):
            shape = [1] * parameter.dim()
            shape[head_dim] = -1
            views.append(values.view(shape))
        return views

    @torch.no_grad()
    def keep_best(self, epoch: int, scores: np.ndarray) -> None:
        """Copy the parameters of heads whose selection score improved (strictly) this epoch."""
        score = torch.from_numpy(np.nan_to_num(scores, nan=-math.inf))
        improved = score > self.best_score
        if epoch == 0:
            improved[:] = True
        self.best_score = torch.where(improved, score, self.best_score)
        masks = self.per_head_views(improved.to(self.parameters[0].device))
        for parameter, best, mask in zip(self.parameters, self.best, masks):
            best.copy_(torch.where(mask, parameter, best))

    @torch.no_grad()
    def restore_best(self) -> None:
        """Load the best-epoch parameters into the stacked heads."""
        for parameter, best in zip(self.parameters, self.best):
            parameter.copy_(best)

    def parameter_bytes(self) -> int:
        """Bytes of parameters, gradients, momentum buffers and best copies."""
        return 4 * sum(parameter.numel() * parameter.element_size() for parameter in self.parameters)


class _JointSGD:
    """SGD with momentum over the stacked parameters of every group, one head's settings per slice.

    Each head's update is torch.optim.SGD's (momentum 0.9, dampening 0, no
    Nesterov): g = grad + weight_decay * p; buf = momentum * buf + g (buf = g
    on the first step); p = p - lr * buf. The updates of all groups run as a
    few torch._foreach_* calls, so the Python work per step does not grow with
    the number of heads or groups.
    """

    def __init__(self, groups: list[_Group]):
        self.groups = groups
        self.parameters = [parameter for group in groups for parameter in group.parameters]
        self.momentum: list[torch.Tensor] | None = None
        self.decayed = []
        self.decay_views = []
        position = 0
        for group in groups:
            if bool(group.decays.any()):
                self.decayed.extend(range(position, position + len(group.parameters)))
                self.decay_views.extend(group.per_head_views(group.decays))
            position += len(group.parameters)
        self.negative_lrs: list[torch.Tensor] = []

    def start_epoch(self, epoch: int) -> None:
        """Set every head's learning rate for this epoch."""
        self.negative_lrs = [view for group in self.groups for view in group.per_head_views(-group.lr_by_epoch[epoch])]

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update to every head from the gradients of the last backward pass, then drop them."""
        gradients = [parameter.grad for parameter in self.parameters]
        if self.decayed:
            torch._foreach_addcmul_([gradients[i] for i in self.decayed], [self.parameters[i] for i in self.decayed],
                                    self.decay_views)
        if self.momentum is not None:
            torch._foreach_add_(gradients, self.momentum, alpha=defaults.MOMENTUM)
        torch._foreach_addcmul_(self.parameters, gradients, self.negative_lrs)

        # The updated gradient tensors are the new momentum buffers.
        self.momentum = gradients
        for parameter in self.parameters:
            parameter.grad = None


def train_sweep(
    configs: list[HeadConfig],
    train,
    test,
    *,
    val=None,
    class_names: list[str] | None = None,
    epochs: int = defaults.EPOCHS,
    batch_size: int = defaults.BATCH_SIZE,
    difficult: str = "positive",
    device: str | None = None,
    max_memory_bytes: int | None = None,
    progress: bool = False,
    on_epoch: Callable[[list[dict]], None] | None = None,
) -> SweepResult:
    """Train every configured head jointly on `train` and evaluate it every epoch.

    train, val, test: row sources (mlprobe.probe.data.ArraySource or StoreSource)
    with the same features and classes. Without `val`, the epoch is chosen on
    test. Features are converted from float16 to float32 once and kept on the
    device when their float32 bytes (train, val and test) fit in
    max_memory_bytes (None means no bound). Otherwise they are read in chunks
    every epoch, as _plan_memory describes. on_epoch receives one record per
    head after each epoch (epoch, head_id, config, lr, train_loss, val_mAP,
    test_mAP). Returns the per-head results in the order of `configs`.
    """
    started = time.perf_counter()
    _check_arguments(configs, train, val, test, epochs, batch_size, difficult)
    target_device = resolve_device(device)
    num_classes = train.labels.shape[1]
    class_names = class_names or [str(index) for index in range(num_classes)]
    names, groups = _build_groups(configs, train.feature_dims, num_classes, epochs, target_device)
    logger.info("training %d heads in %d groups on %s for %d epochs (%d training rows, batch %d)",
                len(configs), len(groups), target_device, epochs, train.num_rows, batch_size)

    statistics = _statistics(configs, train, names, target_device)
    memory = _plan_memory(train, val, test, names, max_memory_bytes, batch_size)
    memory["parameter_bytes"] = sum(group.parameter_bytes() for group in groups)
    resident = _load_resident(train, val, test, names, difficult, target_device, memory)

    optimizer = _JointSGD(groups)
    bar = tqdm(range(epochs), desc="probe epochs", unit="epoch", disable=not progress)
    for epoch in bar:
        epoch_started = time.perf_counter()
        losses = _train_epoch(groups, optimizer, train, resident.get("train"), epoch, batch_size, difficult, statistics,
                              names, memory, target_device)
        val_maps = _evaluate_epoch(groups, val, resident.get("val"), difficult, statistics, names, memory, target_device)
        test_maps = _evaluate_epoch(groups, test, resident.get("test"), difficult, statistics, names, memory, target_device)
        records = _record_epoch(groups, configs, epoch, losses, val_maps, test_maps)
        if on_epoch is not None:
            on_epoch(records)
        bar.set_postfix(best_val_mAP=_best_text(records, "val_mAP"), best_test_mAP=_best_text(records, "test_mAP"))
        logger.debug("epoch %d took %.2f s", epoch + 1, time.perf_counter() - epoch_started)

    results = _finish(groups, configs, test, resident.get("test"), train.feature_dims, class_names, statistics,
                      names, memory, target_device, has_val=val is not None)
    memory["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - started
    logger.info("trained %d heads in %.1f s (%s features, peak %.1f MB of features)", len(configs), seconds,
                memory["mode"], memory["peak_feature_bytes"] / 2**20)
    return SweepResult(heads=results, memory=memory, seconds=seconds, statistics=statistics)


def _best_text(records: list[dict], key: str) -> str:
    values = [record[key] for record in records if record[key] is not None]
    return f"{max(values):.3f}" if values else "-"


def _check_arguments(configs: list[HeadConfig], train, val, test, epochs: int, batch_size: int, difficult: str) -> None:
    for name, source in (("val", val), ("test", test)):
        if source is None:
            continue
        if source.labels.shape[1] != train.labels.shape[1]:
            raise MlprobeError(f"{name} rows have {source.labels.shape[1]} classes, training rows {train.labels.shape[1]}; use stores of the same dataset")
        if source.feature_dims != train.feature_dims:
            raise MlprobeError(f"{name} features {source.feature_dims} differ from the training features {train.feature_dims}; use stores of the same model")
    if not configs:
        raise MlprobeError("no head configurations to train; give at least one head kind")
    if epochs < 1:
        raise MlprobeError(f"epochs={epochs} is invalid; train for at least 1 epoch")
    if batch_size < 1:
        raise MlprobeError(f"batch_size={batch_size} is invalid; use at least 1")
    if difficult not in DIFFICULT_MODES:
        raise MlprobeError(f"difficult={difficult!r} is invalid; choose from {', '.join(DIFFICULT_MODES)}")
    ids = [config.head_id for config in configs]
    if len(set(ids)) != len(ids):
        raise MlprobeError("the sweep lists a head configuration twice; remove the duplicate")


def _build_groups(configs, feature_dims, num_classes, epochs, device) -> tuple[list[str], list[_Group]]:
    """Group the configs by (kind, where, normalization, seed); return the feature names read and the groups."""
    stages = [f"stage{index}" for index in stage_indices(list(feature_dims))]
    members: dict[tuple, list[int]] = {}
    for index, config in enumerate(configs):
        members.setdefault((config.kind, config.where, config.normalization, config.seed), []).append(index)

    groups = []
    names_read: list[str] = []
    for key, indices in members.items():
        names = input_names(key[0], key[1], stages)
        missing = [name for name in names if name not in feature_dims]
        if missing:
            raise MlprobeError(f"head {configs[indices[0]].name} needs features {missing}, which the store lacks; it contains {sorted(feature_dims)}")
        dims = [feature_dims[name] for name in names]
        groups.append(_Group(key, indices, configs, names, dims, num_classes, epochs, device))
        names_read.extend(name for name in names if name not in names_read)
    return names_read, groups


def _statistics(configs, train, names, device) -> dict:
    """Return {"mean": {name: Tensor [D]}, "std": {...}} over the training rows, empty if no head standardises."""
    if not any(config.normalization == "standardize" for config in configs):
        return {}
    means, stds = feature_statistics(train, names)
    return {
        "mean": {name: torch.from_numpy(value).to(device) for name, value in means.items()},
        "std": {name: torch.from_numpy(value).to(device) for name, value in stds.items()},
    }


def _plan_memory(train, val, test, names, max_memory_bytes, batch_size) -> dict:
    """Decide whether the float32 features stay on the device or stream in chunks.

    Resident: every row of train (all views), val and test (view 0) as float32.
    Streaming: chunks of at most chunk_rows rows, sized so that one float16
    chunk and its float32 copy fit in max_memory_bytes.
    """
    width = sum(train.feature_dims[name] for name in names)
    train_bytes = train.num_rows * train.views * width * 4
    eval_bytes = sum(source.num_rows * width * 4 for source in (val, test) if source is not None)
    total = train_bytes + eval_bytes
    if max_memory_bytes is None or total <= max_memory_bytes:
        return {"mode": "resident", "feature_bytes": total, "peak_feature_bytes": total, "chunk_rows": 0,
                "max_memory_bytes": max_memory_bytes}

    chunk_rows = int(max_memory_bytes // (train.views * width * 6))
    if chunk_rows < 1:
        raise MlprobeError(f"max_memory_bytes={max_memory_bytes} is below one feature row ({train.views * width * 6} bytes); raise it")
    if chunk_rows < batch_size:
        logger.warning("max_memory_bytes=%d fits %d rows per chunk, fewer than the batch size %d, so batches shrink",
                       max_memory_bytes, chunk_rows, batch_size)
    logger.info("features need %.1f MB as float32, above the bound of %.1f MB: streaming chunks of %d rows",
                total / 2**20, max_memory_bytes / 2**20, chunk_rows)
    return {"mode": "streaming", "feature_bytes": total, "peak_feature_bytes": 0, "chunk_rows": chunk_rows,
            "max_memory_bytes": max_memory_bytes}


def _to_device_rows(features: dict[str, np.ndarray], labels: np.ndarray, difficult: str, device: torch.device,
                    view: int | None) -> _Rows:
    """Convert one chunk (float16 [n, V, D] per name, int8 labels [n, K]) to float32 device tensors.

    view: keep only that view (as [n, 1, D]); None keeps all views.
    """
    converted = {}
    for name, value in features.items():
        selected = value if view is None else value[:, view : view + 1]
        converted[name] = torch.from_numpy(np.ascontiguousarray(selected, dtype=np.float32)).to(device)
    targets, mask = training_targets(labels, difficult)
    return _Rows(
        features=converted,
        targets=torch.from_numpy(targets).to(device),
        mask=None if mask is None else torch.from_numpy(mask).to(device),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int8)).to(device),
    )


def _load_resident(train, val, test, names, difficult, device, memory) -> dict[str, _Rows]:
    """Load the train (all views), val and test (view 0) rows once when the plan is resident."""
    if memory["mode"] != "resident":
        return {}
    loaded = {"train": _read_all(train, names, difficult, device, view=None)}
    # NOTE: validation rows come from the training store, so with augmented views
    # their view 0 is augmented too; test rows always have the plain view.
    if val is not None:
        loaded["val"] = _read_all(val, names, difficult, device, view=0)
    loaded["test"] = _read_all(test, names, difficult, device, view=0)
    return loaded


def _read_all(source, names, difficult, device, view) -> _Rows:
    """Read every row of a source into one float32 device block."""
    views = source.views if view is None else 1
    features = {name: torch.empty((source.num_rows, views, source.feature_dims[name]), dtype=torch.float32, device=device)
                for name in names}
    for start, chunk, _ in source.iter_chunks(names, READ_CHUNK_ROWS):
        for name, value in chunk.items():
            selected = value if view is None else value[:, view : view + 1]
            features[name][start : start + len(value)] = torch.from_numpy(np.asarray(selected, dtype=np.float32)).to(device)
    targets, mask = training_targets(source.labels, difficult)
    return _Rows(
        features=features,
        targets=torch.from_numpy(targets).to(device),
        mask=None if mask is None else torch.from_numpy(mask).to(device),
        labels=torch.from_numpy(np.asarray(source.labels, dtype=np.int8)).to(device),
    )


def _chunks(source, rows: _Rows | None, names, difficult, memory, device, view: int | None):
    """Yield the source's rows as _Rows blocks: the resident block, or chunks read now.

    NOTE: when streaming, each head shuffles only within a chunk and the chunks
    come in store order every epoch, so batches never mix rows of two chunks.
    The batch order therefore differs from resident training of the same seed.
    """
    if rows is not None:
        yield rows
        return
    for _, features, labels in source.iter_chunks(names, memory["chunk_rows"]):
        block = _to_device_rows(features, labels, difficult, device, view)
        chunk_bytes = sum(value.nbytes for value in features.values()) + sum(
            value.numel() * value.element_size() for value in block.features.values())
        memory["peak_feature_bytes"] = max(memory["peak_feature_bytes"], chunk_bytes)
        yield block


def _normalized(rows: _Rows, name: str, view: int | torch.Tensor, index: torch.Tensor, normalization: str,
                statistics: dict) -> torch.Tensor:
    """Gather rows `index` of one feature as float32 [b, D], normalised.

    view: one view for every row, or int64 [b] with a view for each row of `index`.
    """
    if isinstance(view, torch.Tensor):
        values = rows.features[name][index, view]
    else:
        values = rows.features[name][:, view].index_select(0, index)
    if normalization == "standardize":
        return normalize_feature(values, normalization, statistics["mean"][name], statistics["std"][name])
    return normalize_feature(values, normalization, None, None)


def _train_epoch(groups, optimizer: _JointSGD, train, rows, epoch, batch_size, difficult, statistics, names, memory,
                 device) -> np.ndarray:
    """Run one epoch of joint SGD steps over the training rows; return each head's mean loss in group order.

    With augmented views in the store, every image shows each head one view per
    epoch, drawn per image by view_draws.
    """
    optimizer.start_epoch(epoch)
    seeds = sorted({group.seed for group in groups})
    head_seeds = torch.tensor([seeds.index(group.seed) for group in groups for _ in group.indices], device=device)
    loss_sum = torch.zeros(len(head_seeds), dtype=torch.float64, device=device)

    blocks = _chunks(train, rows, names, difficult, memory, device, view=None)
    for chunk_index, block in enumerate(blocks):
        count = block.num_rows
        orders = {seed: torch.from_numpy(batch_order(seed, epoch, chunk_index, count)).to(device) for seed in seeds}
        views = {seed: torch.from_numpy(view_draws(seed, epoch, chunk_index, count, train.views)).to(device)
                 for seed in seeds} if train.views > 1 else None
        for start in range(0, count, batch_size):
            batches = {seed: order[start : start + batch_size] for seed, order in orders.items()}
            batch_views = {seed: views[seed][batch] for seed, batch in batches.items()} if views else None
            per_head = _train_step(groups, block, batch_views, batches, seeds, head_seeds, statistics)
            loss_sum.add_(per_head.detach(), alpha=len(batches[seeds[0]]))
            optimizer.step()
    return (loss_sum / train.num_rows).cpu().numpy()


def _train_step(groups, block: _Rows, batch_views: dict[int, torch.Tensor] | None, batches: dict[int, torch.Tensor],
                seeds: list[int], head_seeds: torch.Tensor, statistics: dict) -> torch.Tensor:
    """Backpropagate the summed loss of every head on its seed's batch; return the losses [H] in group order.

    batch_views: the view of each batch row per seed, or None when the store has one view.
    """
    inputs: dict[tuple, torch.Tensor] = {}
    logits = []
    for group in groups:
        index = batches[group.seed]
        group_inputs = []
        for name in group.names:
            key = (group.seed, name, group.normalization)
            if key not in inputs:
                view = 0 if batch_views is None else batch_views[group.seed]
                inputs[key] = _normalized(block, name, view, index, group.normalization, statistics)
            group_inputs.append(inputs[key])
        logits.append(group.stacked(group_inputs))

    targets, mask = _batch_targets(block, batches, seeds, head_seeds)
    per_head = soft_margin_loss(torch.cat(logits, dim=1), targets, mask)
    per_head.sum().backward()
    return per_head


def _batch_targets(block: _Rows, batches, seeds, head_seeds) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return targets and mask as [b, 1, K] for a single seed, else [b, H, K] with each head's seed's rows."""
    if len(seeds) == 1:
        index = batches[seeds[0]]
        mask = None if block.mask is None else block.mask.index_select(0, index).unsqueeze(1)
        return block.targets.index_select(0, index).unsqueeze(1), mask

    targets = torch.stack([block.targets.index_select(0, batches[seed]) for seed in seeds], dim=1)
    mask = None
    if block.mask is not None:
        mask = torch.stack([block.mask.index_select(0, batches[seed]) for seed in seeds], dim=1)[:, head_seeds]
    return targets[:, head_seeds], mask


@torch.no_grad()
def _predict(groups, source, rows, difficult, statistics, names, memory, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return each group's logits [N, H, K] on view 0 of a source's rows, and the int8 labels [N, K]."""
    outputs = [torch.empty((source.num_rows, len(group.indices), group.stacked.num_classes), device=device) for group in groups]
    labels = []
    position = 0
    for block in _chunks(source, rows, names, difficult, memory, device, view=0):
        for group, output in zip(groups, outputs):
            width = max([group.stacked.num_classes] + (group.stacked.input_dims if group.kind == "layover" else []))
            step = max(1, _EVAL_BLOCK_ELEMENTS // (len(group.indices) * width))
            for start in range(0, block.num_rows, step):
                index = torch.arange(start, min(start + step, block.num_rows), device=device)
                group_inputs = [_normalized(block, name, 0, index, group.normalization, statistics) for name in group.names]
                output[position + start : position + start + len(index)] = group.stacked(group_inputs)
        labels.append(block.labels)
        position += block.num_rows
    return outputs, torch.cat(labels)


def _evaluate_epoch(groups, source, rows, difficult, statistics, names, memory, device) -> list[np.ndarray] | None:
    """Return each group's mAP per head (float64 [H]) on a source, or None without a source."""
    if source is None:
        return None
    outputs, labels = _predict(groups, source, rows, difficult, statistics, names, memory, device)
    return [mean_average_precision_batch(output.permute(1, 0, 2), labels).numpy() for output in outputs]


def _record_epoch(groups, configs, epoch, losses_in_group_order, val_maps, test_maps) -> list[dict]:
    """Store the epoch's losses and mAPs in the groups, update best copies, return one record per head."""
    records = []
    offset = 0
    for position, group in enumerate(groups):
        losses = losses_in_group_order[offset : offset + len(group.indices)]
        offset += len(group.indices)
        group.train_loss[epoch] = losses
        group.test_map[epoch] = test_maps[position]
        if val_maps is not None:
            group.val_map[epoch] = val_maps[position]
        group.keep_best(epoch, group.val_map[epoch] if val_maps is not None else group.test_map[epoch])

        rates = group.lr_values[epoch]
        for member, index in enumerate(group.indices):
            config = configs[index]
            records.append({
                "epoch": epoch + 1,
                "head_id": config.head_id,
                "config": config.to_dict(),
                "lr": float(rates[member]),
                "train_loss": float(losses[member]),
                "val_mAP": None if val_maps is None else _finite_or_none(val_maps[position][member]),
                "test_mAP": _finite_or_none(test_maps[position][member]),
            })
    return records


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _finish(groups, configs, test, test_rows, feature_dims, class_names, statistics, names, memory, device, *, has_val):
    """Evaluate every head at its chosen epoch and build the HeadResults in config order."""
    for group in groups:
        group.restore_best()
    outputs, labels = _predict(groups, test, test_rows, "positive", statistics, names, memory, device)
    labels = labels.cpu().numpy()
    cpu_statistics = {key: {name: value.cpu() for name, value in values.items()} for key, values in statistics.items()}

    results: list[HeadResult | None] = [None] * len(configs)
    for group, output in zip(groups, outputs):
        scores = output.cpu().numpy()
        selection = group.val_map if has_val else group.test_map
        for member, index in enumerate(group.indices):
            config = configs[index]
            best = _first_max(selection[:, member])
            reference = _first_max(group.test_map[:, member])
            head = single_head_from_state(
                config.kind, feature_dims, len(class_names), where=config.where, normalization=config.normalization,
                state=group.stacked.single_state(member),
                mean=cpu_statistics.get("mean"), std=cpu_statistics.get("std"),
            )
            results[index] = HeadResult(
                config=config,
                train_loss=group.train_loss[:, member].tolist(),
                val_map=group.val_map[:, member].tolist() if has_val else None,
                test_map=group.test_map[:, member].tolist(),
                best_epoch=best + 1,
                selected_on="val" if has_val else "test",
                val_mAP=_finite_or_none(group.val_map[best, member]) if has_val else None,
                test_metrics=evaluate(scores[:, member], labels, class_names=class_names),
                ref_mAP=float(group.test_map[reference, member]),
                ref_best_epoch=reference + 1,
                head=head,
            )
    return results


def _first_max(values: np.ndarray) -> int:
    """Index of the first maximum, ignoring NaN (0 when every value is NaN)."""
    cleaned = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-math.inf)
    return int(np.argmax(cleaned))
