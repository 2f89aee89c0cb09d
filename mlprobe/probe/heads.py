"""Classification heads on pooled backbone features, single and stacked.

Per image, with z the final pooled feature [D] and h the pooled feature of
stage `where` [C]:

- linear:     logits = W_c z + b_c
- layover:    e = sigmoid(W_e h) (C -> D, no bias); a = sigmoid(w_a . z + b_a)
              (one scalar gate); u = (1 - a) z + a e; logits = W_c u + b_c
- concat:     logits = W [z; h] + b
- all-stages: logits = W [stage0; ...; stageS-1; z] + b

Single heads (LinearHead, ...) are plain nn.Modules built from nn.Linear. Their
forward takes `features: dict[str, Tensor [B, D_name]]`, the output of the
backbone's FeatureExtractor or rows of a feature store, and normalises each
input feature with the statistics stored in the head's buffers first.

StackedHeads contains H heads of one kind and input widths as stacked
parameters and computes all H heads' logits with a few (batched) matrix
products. Its heads share one batch of already normalised inputs,
[B, D_name] per feature.

Every parameter is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the
distribution of nn.Linear's default initialisation, in the order of
`parameter_specs`, from a CPU torch.Generator seeded with the head's seed. A
stacked head h is therefore initialised exactly like a single head of the same
seed.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlprobe.errors import MlprobeError
from mlprobe.files import write_atomic

logger = logging.getLogger(__name__)

HEAD_KINDS = ("linear", "layover", "concat", "all-stages")
NORMALIZATIONS = ("none", "standardize", "l2")
FINAL = "final"
_L2_EPSILON = 1e-12


def stage_name(where: int) -> str:
    """Return the feature name of backbone stage `where` (counted from 0, never the stem)."""
    return f"stage{where}"


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter of a single head: its name, nn.Linear shape [out, in] or [out], and fan-in."""

    name: str
    shape: tuple[int, ...]
    fan_in: int


def input_names(kind: str, where: int | None, stage_names: list[str]) -> list[str]:
    """Return the feature names a head reads, in the order they are concatenated.

    stage_names: every stage feature name of the store in stage order
    ("stage0", ...), used by the all-stages head.
    """
    if kind == "linear":
        return [FINAL]
    if kind in ("layover", "concat"):
        return [FINAL, stage_name(where)]
    if kind == "all-stages":
        return [*stage_names, FINAL]
    raise ValueError(f"unknown head kind {kind!r}; expected one of {', '.join(HEAD_KINDS)}")


def parameter_specs(kind: str, input_dims: list[int], num_classes: int) -> list[ParameterSpec]:
    """List a head's parameters in initialisation order.

    input_dims: widths of the features in `input_names` order ([D] for linear,
    [D, C] for layover and concat, [C_0, ..., C_{S-1}, D] for all-stages).
    """
    if kind == "layover":
        final_dim, stage_dim = input_dims
        return [
            ParameterSpec("expand.weight", (final_dim, stage_dim), stage_dim),
            ParameterSpec("gate.weight", (1, final_dim), final_dim),
            ParameterSpec("gate.bias", (1,), final_dim),
            ParameterSpec("classifier.weight", (num_classes, final_dim), final_dim),
            ParameterSpec("classifier.bias", (num_classes,), final_dim),
        ]
    if kind in ("linear", "concat", "all-stages"):
        width = sum(input_dims)
        return [
            ParameterSpec("classifier.weight", (num_classes, width), width),
            ParameterSpec("classifier.bias", (num_classes,), width),
        ]
    raise ValueError(f"unknown head kind {kind!r}; expected one of {', '.join(HEAD_KINDS)}")


def draw_parameters(specs: list[ParameterSpec], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw float32 CPU tensors from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in `specs` order."""
    drawn = {}
    for spec in specs:
        bound = 1.0 / math.sqrt(spec.fan_in)
        drawn[spec.name] = torch.empty(spec.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    return drawn


def seeded_generator(seed: int) -> torch.Generator:
    """Return the CPU generator that initialises a head of this seed."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def normalize_feature(x: torch.Tensor, normalization: str, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalise float32 features [..., D] along the last dimension.

    standardize: (x - mean) / std with training-set statistics mean, std [D];
    l2: x / max(||x||_2, 1e-12); none: x unchanged.
    """
    if normalization == "standardize":
        return (x - mean) / std
    if normalization == "l2":
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_L2_EPSILON)
    if normalization == "none":
        return x
    raise ValueError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")


class Head(nn.Module):
    """Base of the single heads: input normalisation and parameter initialisation.

    Buffers `input_mean` and `input_std` (float32 [sum of input widths]) hold the
    training statistics for "standardize"; they are 0 and 1 otherwise.
    """

    kind = ""

    def __init__(self, names: list[str], dims: list[int], num_classes: int, where: int | None, normalization: str):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
        self.input_names = list(names)
        self.input_dims = list(dims)
        self.num_classes = num_classes
        self.where = where
        self.normalization = normalization
        self.register_buffer("input_mean", torch.zeros(sum(dims)))
        self.register_buffer("input_std", torch.ones(sum(dims)))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Draw every parameter from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in `parameter_specs` order."""
        drawn = draw_parameters(parameter_specs(self.kind, self.input_dims, self.num_classes), generator)
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in drawn.items():
                parameters[name].copy_(value)

    def set_statistics(self, mean: dict[str, torch.Tensor], std: dict[str, torch.Tensor]) -> None:
        """Store the per-feature training mean and std [D_name] used by "standardize"."""
        with torch.no_grad():
            self.input_mean.copy_(torch.cat([mean[name].float().reshape(-1) for name in self.input_names]))
            self.input_std.copy_(torch.cat([std[name].float().reshape(-1) for name in self.input_names]))

    def normalized_inputs(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Return the head's input features as float32 [B, D_name], normalised, in input order."""
        missing = [name for name in self.input_names if name not in features]
        if missing:
            raise KeyError(f"{self.kind} head needs features {missing}; got {sorted(features)}")
        inputs = []
        offset = 0
        for name, dim in zip(self.input_names, self.input_dims):
            x = features[name].float()
            mean = self.input_mean[offset : offset + dim]
            std = self.input_std[offset : offset + dim]
            inputs.append(normalize_feature(x, self.normalization, mean, std))
            offset += dim
        return inputs

    def describe(self) -> dict:
        """Return the constructor arguments as a JSON-serialisable dict."""
        return {
            "kind": self.kind,
            "where": self.where,
            "input_names": self.input_names,
            "input_dims": self.input_dims,
            "num_classes": self.num_classes,
            "normalization": self.normalization,
        }


class LinearHead(Head):
    """Linear probe on the final feature: logits = W_c z + b_c."""

    kind = "linear"

    def __init__(self, final_dim: int, num_classes: int, *, normalization: str = "none"):
        super().__init__([FINAL], [final_dim], num_classes, None, normalization)
        self.classifier = nn.Linear(final_dim, num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return logits float32 [B, K] from features["final"] [B, D]."""
        (z,) = self.normalized_inputs(features)
        return self.classifier(z)


class LayoverHead(Head):
    """Gated blend of a projected stage feature into the final feature, then linear."""

    kind = "layover"

    def __init__(self, final_dim: int, stage_dim: int, num_classes: int, where: int, *, normalization: str = "none"):
        super().__init__([FINAL, stage_name(where)], [final_dim, stage_dim], num_classes, where, normalization)
        self.expand = nn.Linear(stage_dim, final_dim, bias=False)
        self.gate = nn.Linear(final_dim, 1)
        self.classifier = nn.Linear(final_dim, num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return logits float32 [B, K] from features["final"] [B, D] and features["stage<where>"] [B, C]."""
        z, h = self.normalized_inputs(features)
        e = torch.sigmoid(self.expand(h))
        a = torch.sigmoid(self.gate(z))
        u = (1 - a) * z + a * e
        return self.classifier(u)


class ConcatHead(Head):
    """Linear classifier on the final feature joined with one stage feature: W [z; h] + b."""

    kind = "concat"

    def __init__(self, final_dim: int, stage_dim: int, num_classes: int, where: int, *, normalization: str = "none"):
        super().__init__([FINAL, stage_name(where)], [final_dim, stage_dim], num_classes, where, normalization)
        self.classifier = nn.Linear(final_dim + stage_dim, num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return logits float32 [B, K] from features["final"] [B, D] and features["stage<where>"] [B, C]."""
        return self.classifier(torch.cat(self.normalized_inputs(features), dim=-1))


class AllStagesHead(Head):
    """Linear classifier on every pooled stage and the final feature joined."""

    kind = "all-stages"

    def __init__(self, stage_dims: list[int], final_dim: int, num_classes: int, *, normalization: str = "none"):
        names = [stage_name(i) for i in range(len(stage_dims))] + [FINAL]
        super().__init__(names, [*stage_dims, final_dim], num_classes, None, normalization)
        self.classifier = nn.Linear(sum(stage_dims) + final_dim, num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return logits float32 [B, K] from features "stage0".."stage<S-1>" and "final"."""
        return self.classifier(torch.cat(self.normalized_inputs(features), dim=-1))


def build_head(
    kind: str,
    feature_dims: dict[str, int],
    num_classes: int,
    *,
    where: int | None = None,
    normalization: str = "none",
    seed: int | None = None,
) -> Head:
    """Create a single head for features of the given widths.

    feature_dims: width of every feature of the store ("stage0", ..., "final").
    With a seed, the parameters are drawn by reset_parameters from that seed.
    """
    stages = sorted((name for name in feature_dims if name.startswith("stage")), key=lambda name: int(name[5:]))
    if kind in ("layover", "concat") and stage_name(where) not in feature_dims:
        raise ValueError(f"{kind} head: no feature {stage_name(where)!r}; available: {stages}")
    if kind == "linear":
        head = LinearHead(feature_dims[FINAL], num_classes, normalization=normalization)
    elif kind == "layover":
        head = LayoverHead(feature_dims[FINAL], feature_dims[stage_name(where)], num_classes, where, normalization=normalization)
    elif kind == "concat":
        head = ConcatHead(feature_dims[FINAL], feature_dims[stage_name(where)], num_classes, where, normalization=normalization)
    elif kind == "all-stages":
        head = AllStagesHead([feature_dims[name] for name in stages], feature_dims[FINAL], num_classes, normalization=normalization)
    else:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {', '.join(HEAD_KINDS)}")

    if seed is not None:
        head.reset_parameters(seeded_generator(seed))
    return head


class StackedHeads(nn.Module):
    """H heads of one kind and input widths that read the same inputs, with stacked parameters.

    Weights are stored as [in, H, out], head h being the transpose of its
    nn.Linear weight, so that heads sharing an input are one matrix product:
    "expand.weight" [C, H, D], "gate.weight" [D, H, 1], "classifier.weight"
    [D_in, H, K]. The layover classifier weight is [H, K, D] (nn.Linear
    layout per head) because each head applies it to its own e. Biases are
    [H, out]. Attribute names are the single-head names with "_" for ".".
    """

    def __init__(self, kind: str, names: list[str], dims: list[int], num_classes: int, seeds: list[int]):
        super().__init__()
        self.kind = kind
        self.input_names = list(names)
        self.input_dims = list(dims)
        self.num_classes = num_classes
        self.num_heads = len(seeds)
        self.specs = parameter_specs(kind, self.input_dims, num_classes)
        drawn = [draw_parameters(self.specs, seeded_generator(seed)) for seed in seeds]
        for spec in self.specs:
            layout = self.layout(spec.name)
            stacked = torch.stack([_to_stacked(layout, values[spec.name]) for values in drawn], dim=self.head_dim(spec.name))
            self.register_parameter(spec.name.replace(".", "_"), nn.Parameter(stacked))

    def layout(self, name: str) -> str:
        """Return the storage layout of a parameter: "in_h_out", "h_out_in" or "h_out"."""
        if name.endswith(".bias"):
            return "h_out"
        if self.kind == "layover" and name == "classifier.weight":
            return "h_out_in"
        return "in_h_out"

    def head_dim(self, name: str) -> int:
        """Return the dimension of a stacked parameter that indexes the heads."""
        return 1 if self.layout(name) == "in_h_out" else 0

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Return logits [B, H, K] from normalised inputs [B, D_name] in input order, shared by all heads."""
        heads, classes = self.num_heads, self.num_classes
        if self.kind == "layover":
            return self._layover(*inputs)

        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=-1)
        weight = self.classifier_weight.view(x.shape[1], heads * classes)
        return torch.addmm(self.classifier_bias.view(heads * classes), x, weight).view(x.shape[0], heads, classes)

    def _layover(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Layover logits [B, H, K] from z [B, D] and h [B, C].

        The gate a is one scalar per image and head, so W_c u equals
        (1 - a) W_c z + a W_c e and the blend u [B, H, D] is never formed.
        W_c z is one matrix product shared by all heads, and W_c e is one
        batched product. The result equals the single head's formula up to
        float rounding.
        """
        heads, classes = self.num_heads, self.num_classes
        rows, final_dim = z.shape
        expanded = h @ self.expand_weight.view(h.shape[1], heads * final_dim)
        e = torch.sigmoid(expanded).view(rows, heads, final_dim).transpose(0, 1)
        a = torch.sigmoid(torch.addmm(self.gate_bias.view(heads), z, self.gate_weight.view(final_dim, heads)))
        a = a.unsqueeze(-1)

        weight = self.classifier_weight
        from_z = (z @ weight.view(heads * classes, final_dim).t()).view(rows, heads, classes)
        from_e = _PerHeadLinear.apply(e, weight).transpose(0, 1)
        return torch.addcmul(from_z, a, from_e - from_z) + self.classifier_bias

    def single_state(self, index: int) -> dict[str, torch.Tensor]:
        """Return head `index`'s parameters in nn.Linear layout as detached CPU copies."""
        state = {}
        for spec in self.specs:
            stacked = getattr(self, spec.name.replace(".", "_")).detach()
            value = stacked.select(self.head_dim(spec.name), index)
            state[spec.name] = _to_single(self.layout(spec.name), value, spec.shape).cpu().clone()
        return state


class _PerHeadLinear(torch.autograd.Function):
    """Batched x_h @ W_h^T for x [H, B, D] (any strides) and W [H, K, D].

    Autograd's own bmm backward forms the weight gradient as x^T @ grad. On
    CPU that is several times slower than grad^T @ x for a small K (measured
    with torch 2.14 on one CPU thread), so this backward computes the latter, which
    also has W's layout.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def _to_stacked(layout: str, value: torch.Tensor) -> torch.Tensor:
    """Turn an nn.Linear-layout tensor ([out, in] or [out]) into one head's slice of a stacked parameter."""
    if layout == "in_h_out":
        return value.t()
    return value


def _to_single(layout: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Turn one head's slice of a stacked parameter back into nn.Linear layout."""
    if layout == "in_h_out":
        return value.t().reshape(shape)
    return value.reshape(shape)


def single_head_from_state(
    kind: str,
    feature_dims: dict[str, int],
    num_classes: int,
    *,
    where: int | None,
    normalization: str,
    state: dict[str, torch.Tensor],
    mean: dict[str, torch.Tensor] | None = None,
    std: dict[str, torch.Tensor] | None = None,
) -> Head:
    """Build a single head holding the given parameters (single-head layout) and statistics."""
    head = build_head(kind, feature_dims, num_classes, where=where, normalization=normalization)
    with torch.no_grad():
        parameters = dict(head.named_parameters())
        for name, value in state.items():
            parameters[name].copy_(value)
    if mean is not None and std is not None:
        head.set_statistics(mean, std)
    return head


def save_head(head: Head, path: Path, *, feature_dims: dict[str, int], extra: dict | None = None) -> None:
    """Save a head's state dict and constructor arguments with torch.save, atomically.

    extra: JSON-like metadata stored alongside (config, model, class names, metrics).
    """
    payload = {
        "head": head.describe(),
        "feature_dims": dict(feature_dims),
        "state_dict": {name: value.detach().cpu() for name, value in head.state_dict().items()},
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(Path(path), buffer.getvalue())


def load_head(path: Path) -> tuple[Head, dict]:
    """Load a head written by save_head; return the module (CPU, eval mode) and its metadata.

    Raises MlprobeError when the file is not a head written by save_head.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        logger.debug("torch.load failed on %s", path, exc_info=True)
        raise MlprobeError(
            f"{path} is not a head weight file written by `mlprobe probe` (torch.load raised {type(error).__name__})"
        ) from error
    if not isinstance(payload, dict) or not {"head", "feature_dims", "state_dict"} <= payload.keys():
        raise MlprobeError(f"{path} is not a head weight file written by `mlprobe probe` (heads/*.pt in its output)")
    description = payload["head"]
    head = build_head(
        description["kind"],
        payload["feature_dims"],
        description["num_classes"],
        where=description["where"],
        normalization=description["normalization"],
    )
    head.load_state_dict(payload["state_dict"])
    head.eval()
    return head, payload["extra"]
