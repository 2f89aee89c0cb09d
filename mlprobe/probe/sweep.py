"""Head configurations of a probe sweep and the grid that enumerates them."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass

from mlprobe import defaults
from mlprobe.errors import MlprobeError
from mlprobe.probe.heads import HEAD_KINDS, NORMALIZATIONS

logger = logging.getLogger(__name__)

# Head kinds that read one stage besides the final feature, so they take `where`.
STAGE_HEADS = ("layover", "concat")


@dataclass(frozen=True)
class HeadConfig:
    """One head of the sweep: its kind, input stage and training settings.

    where: stage index for layover and concat heads, None for linear and all-stages.
    seed: seeds the parameter initialisation and the batch order.
    lr: initial learning rate, cosine-annealed to 0 over the run.
    weight_decay: L2 penalty added to the gradient, as torch.optim.SGD does.
    normalization: "none", "standardize" (training mean and std) or "l2".
    """

    kind: str
    where: int | None
    seed: int = defaults.SEED
    lr: float = defaults.LEARNING_RATE
    weight_decay: float = defaults.WEIGHT_DECAY
    normalization: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise MlprobeError(f"unknown head kind {self.kind!r}; choose from {', '.join(HEAD_KINDS)}")
        if (self.kind in STAGE_HEADS) != (self.where is not None):
            raise MlprobeError(f"head {self.kind!r} with where={self.where}: only {' and '.join(STAGE_HEADS)} heads take a stage")
        if self.normalization not in NORMALIZATIONS:
            raise MlprobeError(f"unknown normalization {self.normalization!r}; choose from {', '.join(NORMALIZATIONS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MlprobeError(f"learning rate {self.lr} is invalid; use a positive number such as 0.1")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise MlprobeError(f"weight decay {self.weight_decay} is invalid; use 0 or a positive number")
        if self.seed < 0:
            raise MlprobeError(f"seed {self.seed} is invalid; use a non-negative integer")

    @property
    def name(self) -> str:
        """Head name with its stage, such as "linear" or "layover@2"."""
        return self.kind if self.where is None else f"{self.kind}@{self.where}"

    @property
    def head_id(self) -> str:
        """Unique, readable id of the configuration, such as "layover@2/seed0/lr0.1/wd0/standardize"."""
        return f"{self.name}/seed{self.seed}/lr{self.lr:g}/wd{self.weight_decay:g}/{self.normalization}"

    def to_dict(self) -> dict:
        """Return the fields as a JSON-serialisable dict."""
        return asdict(self)


def stage_indices(feature_names: list[str]) -> list[int]:
    """Return the stage indices present among a store's feature names ("stage0", ..., "final")."""
    indices = []
    for name in feature_names:
        if name.startswith("stage") and name[5:].isdigit():
            indices.append(int(name[5:]))
    return sorted(indices)


def build_grid(
    *,
    stages: list[int],
    heads: list[str] = defaults.SWEEP_HEADS,
    wheres: list[int] | None = None,
    seeds: list[int] = defaults.SWEEP_SEEDS,
    lrs: list[float] = defaults.SWEEP_LEARNING_RATES,
    weight_decays: list[float] = defaults.SWEEP_WEIGHT_DECAYS,
    normalizations: list[str] = defaults.SWEEP_NORMALIZATIONS,
) -> list[HeadConfig]:
    """Enumerate heads x stages x seeds x learning rates x weight decays x normalisations.

    stages: stage indices the store holds. wheres: stages for layover and concat
    heads, default every stage in `stages`. Duplicate values are dropped, keeping
    the first. Raises MlprobeError naming the argument for an empty list, an
    unknown head or normalisation, a stage the store lacks, or an invalid number.
    """
    heads = _unique("heads", heads)
    seeds = _unique("seeds", [int(seed) for seed in seeds])
    lrs = _unique("lrs", [float(lr) for lr in lrs])
    weight_decays = _unique("weight_decays", [float(decay) for decay in weight_decays])
    normalizations = _unique("normalizations", normalizations)
    wheres = _validate_wheres(wheres, stages, heads)

    for head in heads:
        if head not in HEAD_KINDS:
            raise MlprobeError(f"{_label('heads')}: unknown head kind {head!r}; choose from {', '.join(HEAD_KINDS)}")
    for normalization in normalizations:
        if normalization not in NORMALIZATIONS:
            raise MlprobeError(f"{_label('normalizations')}: unknown value {normalization!r}; choose from {', '.join(NORMALIZATIONS)}")
    for lr in lrs:
        if not (lr > 0 and math.isfinite(lr)):
            raise MlprobeError(f"{_label('lrs')}: learning rate {lr} is invalid; use positive numbers such as 0.1")
    for decay in weight_decays:
        if not (decay >= 0 and math.isfinite(decay)):
            raise MlprobeError(f"{_label('weight_decays')}: {decay} is invalid; use 0 or positive numbers")
    for seed in seeds:
        if seed < 0:
            raise MlprobeError(f"{_label('seeds')}: {seed} is invalid; use non-negative integers")

    configs = []
    for head in heads:
        head_wheres = wheres if head in STAGE_HEADS else [None]
        for where, seed, lr, decay, normalization in itertools.product(head_wheres, seeds, lrs, weight_decays, normalizations):
            configs.append(HeadConfig(head, where, seed, lr, decay, normalization))
    logger.info("sweep grid: %d head configurations (%s)", len(configs), ", ".join(heads))
    return configs


# The command-line option that sets each argument of build_grid, for error messages.
OPTIONS = {"heads": "--head", "wheres": "--where", "seeds": "--seed", "lrs": "--lr",
           "weight_decays": "--weight-decay", "normalizations": "--normalization"}


def _label(argument: str) -> str:
    return f"{argument} ({OPTIONS[argument]})"


def _unique(argument: str, values) -> list:
    values = list(values)
    if not values:
        raise MlprobeError(f"{_label(argument)}: empty list; give at least one value")
    return list(dict.fromkeys(values))


def _validate_wheres(wheres: list[int] | None, stages: list[int], heads: list[str]) -> list[int]:
    if not any(head in STAGE_HEADS for head in heads):
        if wheres:
            logger.warning("wheres %s ignored: only %s heads take a stage", wheres, " and ".join(STAGE_HEADS))
        return []
    if not stages:
        raise MlprobeError(f"the store contains no stage features, so {' and '.join(STAGE_HEADS)} heads cannot run; remove them from heads")
    if wheres is None:
        return list(stages)

    wheres = _unique("wheres", [int(where) for where in wheres])
    for where in wheres:
        if where not in stages:
            raise MlprobeError(f"{_label('wheres')}: stage {where} is not in the store; available stages: {stages}")
    return wheres
