"""Single and stacked heads: initialisation, forward math, conversion and saved weights."""

import math

import pytest
import torch

from mlprobe.probe.heads import (
    LayoverHead,
    StackedHeads,
    build_head,
    draw_parameters,
    input_names,
    load_head,
    parameter_specs,
    save_head,
    seeded_generator,
    single_head_from_state,
)

DIMS = {"stage0": 6, "stage1": 9, "stage2": 7, "final": 12}
STAGES = ["stage0", "stage1", "stage2"]
CLASSES = 5
KINDS = [("linear", None), ("layover", 1), ("concat", 2), ("all-stages", None)]


def random_features(rows=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(rows, dim, generator=generator) for name, dim in DIMS.items()}


@pytest.mark.parametrize("kind,where", KINDS)
def test_same_seed_same_parameters(kind, where):
    first = build_head(kind, DIMS, CLASSES, where=where, seed=3)
    second = build_head(kind, DIMS, CLASSES, where=where, seed=3)
    other = build_head(kind, DIMS, CLASSES, where=where, seed=4)

    for (name, a), (_, b), (_, c) in zip(first.named_parameters(), second.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name


@pytest.mark.parametrize("kind,where", KINDS)
def test_init_within_linear_default_bounds(kind, where):
    head = build_head(kind, DIMS, CLASSES, where=where, seed=0)
    names = input_names(kind, where, STAGES)
    specs = parameter_specs(kind, [DIMS[name] for name in names], CLASSES)
    parameters = dict(head.named_parameters())

    assert [spec.name for spec in specs] == list(parameters)
    for spec in specs:
        bound = 1.0 / math.sqrt(spec.fan_in)
        values = parameters[spec.name]
        assert tuple(values.shape) == spec.shape
        assert values.abs().max() <= bound
        if values.numel() >= 50:
            # Uniform on [-b, b] has standard deviation b / sqrt(3).
            assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)


def test_layover_draw_order_documented():
    head = build_head("layover", DIMS, CLASSES, where=0, seed=11)
    generator = seeded_generator(11)
    expected = {}
    for name, shape, fan_in in [
        ("expand.weight", (12, 6), 6),
        ("gate.weight", (1, 12), 12),
        ("gate.bias", (1,), 12),
        ("classifier.weight", (CLASSES, 12), 12),
        ("classifier.bias", (CLASSES,), 12),
    ]:
        bound = 1.0 / math.sqrt(fan_in)
        expected[name] = torch.empty(shape).uniform_(-bound, bound, generator=generator)

    for name, value in head.named_parameters():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("kind,where", KINDS)
def test_stacked_init_equals_single(kind, where):
    names = input_names(kind, where, STAGES)
    seeds = [5, 0, 5, 2]
    stacked = StackedHeads(kind, names, [DIMS[name] for name in names], CLASSES, seeds)

    for index, seed in enumerate(seeds):
        single = build_head(kind, DIMS, CLASSES, where=where, seed=seed)
        state = stacked.single_state(index)
        for name, value in single.named_parameters():
            assert torch.equal(state[name], value), (index, name)


@pytest.mark.parametrize("kind,where", KINDS)
def test_stacked_forward_equals_single(kind, where):
    names = input_names(kind, where, STAGES)
    seeds = [1, 2, 3]
    stacked = StackedHeads(kind, names, [DIMS[name] for name in names], CLASSES, seeds)
    with torch.no_grad():
        for parameter in stacked.parameters():  # move away from the initial values
            parameter.add_(0.1 * torch.randn_like(parameter))
    features = random_features()

    logits = stacked([features[name] for name in names])

    assert logits.shape == (8, 3, CLASSES)
    for index in range(len(seeds)):
        single = single_head_from_state(kind, DIMS, CLASSES, where=where, normalization="none",
                                        state=stacked.single_state(index))
        torch.testing.assert_close(logits[:, index], single(features), rtol=1e-5, atol=1e-5)


def test_stacked_gradient_equals_single():
    names = input_names("layover", 2, STAGES)
    stacked = StackedHeads("layover", names, [DIMS[name] for name in names], CLASSES, [4, 9])
    single = build_head("layover", DIMS, CLASSES, where=2, seed=9)
    features = random_features(seed=1)
    targets = (torch.rand(8, CLASSES, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    loss = torch.nn.MultiLabelSoftMarginLoss()

    stacked_logits = stacked([features[name] for name in names])
    (loss(stacked_logits[:, 0], targets) + loss(stacked_logits[:, 1], targets)).backward()
    loss(single(features), targets).backward()

    for spec_name, value in single.named_parameters():
        stacked_grad = getattr(stacked, spec_name.replace(".", "_")).grad
        head_dim = stacked.head_dim(spec_name)
        head_grad = stacked_grad.select(head_dim, 1)
        head_grad = head_grad.reshape(value.shape) if head_dim == 0 else head_grad.t().reshape(value.shape)
        torch.testing.assert_close(head_grad, value.grad, rtol=1e-5, atol=1e-6)


def test_layover_forward_matches_formula():
    head = build_head("layover", DIMS, CLASSES, where=1, seed=0)
    features = random_features(seed=4)
    z, h = features["final"], features["stage1"]
    w_e = head.expand.weight
    w_a, b_a = head.gate.weight[0], head.gate.bias[0]
    w_c, b_c = head.classifier.weight, head.classifier.bias

    e = torch.sigmoid(h @ w_e.T)
    a = torch.sigmoid(z @ w_a + b_a).unsqueeze(1)
    u = (1 - a) * z + a * e
    expected = u @ w_c.T + b_c

    torch.testing.assert_close(head(features), expected)


def test_concat_and_all_stages_input_order():
    concat = build_head("concat", DIMS, CLASSES, where=0, seed=0)
    all_stages = build_head("all-stages", DIMS, CLASSES, seed=0)
    features = random_features(seed=5)

    joined = torch.cat([features["final"], features["stage0"]], dim=1)
    every = torch.cat([features["stage0"], features["stage1"], features["stage2"], features["final"]], dim=1)

    torch.testing.assert_close(concat(features), joined @ concat.classifier.weight.T + concat.classifier.bias)
    torch.testing.assert_close(all_stages(features), every @ all_stages.classifier.weight.T + all_stages.classifier.bias)


def test_standardize_uses_stored_statistics():
    head = build_head("linear", DIMS, CLASSES, normalization="standardize", seed=0)
    mean = {name: torch.full((dim,), 2.0) for name, dim in DIMS.items()}
    std = {name: torch.full((dim,), 4.0) for name, dim in DIMS.items()}
    head.set_statistics(mean, std)
    features = random_features(seed=6)

    expected = ((features["final"] - 2.0) / 4.0) @ head.classifier.weight.T + head.classifier.bias

    torch.testing.assert_close(head(features), expected)


def test_l2_normalization_scale_invariant():
    head = build_head("concat", DIMS, CLASSES, where=1, normalization="l2", seed=0)
    features = random_features(seed=7)
    scaled = {name: value * 37.0 for name, value in features.items()}

    torch.testing.assert_close(head(features), head(scaled))


def test_missing_feature_named():
    head = build_head("layover", DIMS, CLASSES, where=2, seed=0)

    with pytest.raises(KeyError, match="stage2"):
        head({"final": torch.zeros(2, 12)})


def test_unknown_stage_rejected():
    with pytest.raises(ValueError, match="stage7"):
        build_head("layover", DIMS, CLASSES, where=7)


def test_saved_head_round_trip(tmp_path):
    head = build_head("layover", DIMS, CLASSES, where=0, normalization="standardize", seed=2)
    head.set_statistics({name: torch.randn(dim) for name, dim in DIMS.items()},
                        {name: torch.rand(dim) + 0.5 for name, dim in DIMS.items()})
    path = tmp_path / "heads" / "layover.pt"

    save_head(head, path, feature_dims=DIMS, extra={"model": "toy"})
    loaded, extra = load_head(path)
    features = random_features(seed=8)

    assert isinstance(loaded, LayoverHead)
    assert extra == {"model": "toy"}
    assert not path.with_name(path.name + ".tmp").exists()
    torch.testing.assert_close(loaded(features), head(features))


def test_draw_parameters_uses_generator_only():
    specs = parameter_specs("linear", [12], CLASSES)
    torch.manual_seed(0)
    first = draw_parameters(specs, seeded_generator(1))
    torch.manual_seed(99)
    second = draw_parameters(specs, seeded_generator(1))

    for name in first:
        assert torch.equal(first[name], second[name])
