"""Head configurations and the sweep grid."""

import pytest

from mlprobe.errors import MlprobeError
from mlprobe.probe.sweep import HeadConfig, build_grid, stage_indices


def test_grid_size_and_default_stages():
    configs = build_grid(stages=[0, 1, 2], heads=["linear", "layover", "concat", "all-stages"], seeds=[0, 1],
                         lrs=[0.1, 0.01], weight_decays=[0.0], normalizations=["none", "l2"])

    per_point = 2 * 2 * 1 * 2  # seeds x lrs x weight decays x normalisations
    assert len(configs) == (1 + 3 + 3 + 1) * per_point
    assert {config.where for config in configs if config.kind == "layover"} == {0, 1, 2}
    assert {config.where for config in configs if config.kind in ("linear", "all-stages")} == {None}
    assert len({config.head_id for config in configs}) == len(configs)


def test_grid_given_wheres():
    configs = build_grid(stages=[0, 1, 2, 3], heads=["layover"], wheres=[3, 1], seeds=[0], lrs=[0.1],
                         weight_decays=[0.0], normalizations=["none"])

    assert [config.where for config in configs] == [3, 1]


def test_grid_drops_duplicates():
    configs = build_grid(stages=[0], heads=["linear", "linear"], seeds=[0, 0], lrs=[0.1, 0.1], weight_decays=[0.0],
                         normalizations=["none"])

    assert len(configs) == 1


@pytest.mark.parametrize(
    "changes,argument",
    [
        ({"heads": ["linaer"]}, "heads"),
        ({"heads": []}, "heads"),
        ({"wheres": [5]}, "wheres"),
        ({"lrs": [0.0]}, "lrs"),
        ({"lrs": [float("nan")]}, "lrs"),
        ({"weight_decays": [-1e-4]}, "weight_decays"),
        ({"normalizations": ["zscore"]}, "normalizations"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [-1]}, "seeds"),
    ],
)
def test_grid_rejects_bad_argument(changes, argument):
    arguments = {"stages": [0, 1], "heads": ["linear", "layover"], "seeds": [0], "lrs": [0.1],
                 "weight_decays": [0.0], "normalizations": ["none"]}
    arguments.update(changes)

    with pytest.raises(MlprobeError, match=argument):
        build_grid(**arguments)


def test_stage_heads_need_stages():
    with pytest.raises(MlprobeError, match="no stage features"):
        build_grid(stages=[], heads=["concat"])


def test_linear_only_needs_no_stage():
    configs = build_grid(stages=[], heads=["linear"], seeds=[0], lrs=[0.1], weight_decays=[0.0],
                         normalizations=["none"])

    assert configs == [HeadConfig("linear", None, 0, 0.1, 0.0, "none")]


@pytest.mark.parametrize(
    "fields,message",
    [
        (("ridge", None), "unknown head kind"),
        (("layover", None), "where"),
        (("linear", 2), "where"),
        (("linear", None, 0, -0.1), "learning rate"),
        (("linear", None, 0, 0.1, -1.0), "weight decay"),
        (("linear", None, 0, 0.1, 0.0, "minmax"), "normalization"),
        (("linear", None, -3), "seed"),
    ],
)
def test_head_config_validation(fields, message):
    with pytest.raises(MlprobeError, match=message):
        HeadConfig(*fields)


def test_head_id_and_name():
    config = HeadConfig("layover", 2, 1, 0.01, 1e-4, "standardize")

    assert config.name == "layover@2"
    assert config.head_id == "layover@2/seed1/lr0.01/wd0.0001/standardize"
    assert config.to_dict()["where"] == 2


def test_stage_indices_from_feature_names():
    assert stage_indices(["stage0", "stage1", "stage10", "stage2", "final"]) == [0, 1, 2, 10]
