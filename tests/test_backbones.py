"""Backbone names, weight sources, fingerprints and pooled stage features on real timm models."""

import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import ImageNetInfo

import pytest

from mlprobe import defaults
from mlprobe.errors import BackboneError
from mlprobe.extract import backbones
from mlprobe.extract.backbones import (
    SHORT_NAMES,
    FeatureExtractor,
    create_backbone,
    data_config,
    default_image_size,
    resolve_model_name,
    weights_fingerprint,
)
from mlprobe.extract.images import build_transform

BUILDING_CLASSES = {"palace", "bell cote, bell cot", "boathouse", "monastery"}


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0")


def top_classes(model, images, size, k):
    """Return the k most probable ImageNet class descriptions per image, best first."""
    transform = build_transform(data_config(model, size))
    batch = torch.stack([transform(Image.fromarray(image)) for image in images])
    with torch.inference_mode():
        logits = model(batch)

    info = ImageNetInfo()
    return [[info.index_to_description(int(index)) for index in row.topk(k).indices] for row in logits]


def test_short_names_are_pretrained_timm_names():
    pretrained = set(timm.list_models(pretrained=True))

    for short, timm_name in SHORT_NAMES.items():
        assert timm_name in pretrained, short
        assert resolve_model_name(short) == timm_name


def test_resolve_keeps_timm_names():
    assert resolve_model_name("tf_efficientnet_lite0") == "tf_efficientnet_lite0"
    assert resolve_model_name("resnet50.a1_in1k") == "resnet50.a1_in1k"
    assert resolve_model_name(" convnext ") == "convnext_base.fb_in22k"


def test_resolve_unknown_suggests_close_names():
    with pytest.raises(BackboneError) as raised:
        resolve_model_name("tf_efficientnet_lite")

    message = str(raised.value)
    assert "'tf_efficientnet_lite'" in message
    assert "tf_efficientnet_lite0" in message


def test_resolve_unknown_short_name_typo():
    with pytest.raises(BackboneError) as raised:
        resolve_model_name("swin_larg")

    assert "swin_large" in str(raised.value)


def test_default_image_size():
    assert default_image_size("swin") == 384
    assert default_image_size("tf_efficientnet_lite0") == 224


def test_package_weights_classify_sample_photos(lite0):
    photos = load_sample_images()
    names = [path.rsplit("/", 1)[-1] for path in photos.filenames]

    temple, flower = top_classes(lite0, photos.images, 224, k=5)

    assert names == ["china.jpg", "flower.jpg"]
    assert BUILDING_CLASSES & set(temple), temple
    assert flower[0] == "daisy", flower


def test_package_model_frozen_in_eval_mode(lite0):
    assert not lite0.training
    assert not any(parameter.requires_grad for parameter in lite0.parameters())


def test_lite0_stages_and_final(lite0):
    extractor = FeatureExtractor(lite0)
    images = torch.randn(2, 3, 64, 64)

    with torch.inference_mode():
        features = extractor(images)
        logits = lite0(images)

    assert extractor.feature_names == ["stage0", "stage1", "stage2", "stage3", "stage4", "final"]
    assert list(extractor.feature_dims.values()) == [16, 24, 40, 112, 320, 1280]
    assert list(features) == extractor.feature_names
    assert all(value.dtype == torch.float32 for value in features.values())
    assert {name: tuple(value.shape) for name, value in features.items()} == {
        name: (2, dim) for name, dim in extractor.feature_dims.items()
    }
    assert torch.allclose(lite0.get_classifier()(features["final"]), logits, atol=1e-4)


def test_stage_features_are_spatial_means(lite0):
    extractor = FeatureExtractor(lite0)
    images = torch.randn(1, 3, 64, 64)

    with torch.inference_mode():
        features = extractor(images)
        intermediates = lite0.forward_intermediates(images, intermediates_only=True)

    assert torch.allclose(features["stage2"], intermediates[2].mean(dim=(2, 3)))


def test_resnet_stem_left_out():
    model = create_backbone("resnet10t", random_weights=True)
    extractor = FeatureExtractor(model)

    with torch.inference_mode():
        features = extractor(torch.randn(1, 3, 64, 64))

    assert model.feature_info[0]["module"] == "act1"
    assert extractor.feature_names == ["stage0", "stage1", "stage2", "stage3", "final"]
    assert [features[f"stage{index}"].shape[1] for index in range(4)] == [64, 128, 256, 512]


def test_vit_blocks_are_stages():
    model = create_backbone("test_vit", random_weights=True)
    extractor = FeatureExtractor(model)

    with torch.inference_mode():
        features = extractor(torch.randn(2, 3, 160, 160))

    assert len(extractor.feature_names) == len(model.blocks) + 1
    assert all(value.shape == (2, 64) for value in features.values())


def test_pool_token_output():
    tokens = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)

    pooled = backbones._pool(tokens)

    assert torch.equal(pooled, tokens.mean(dim=1))


def test_data_config_of_lite0(lite0):
    assert data_config(lite0, None) == {
        "image_size": 224,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
    }
    assert data_config(lite0, 128)["image_size"] == 128


def test_checkpoint_round_trip(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    plain = tmp_path / "plain.pth"
    torch.save(source.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in source.state_dict().items()}}, wrapped)

    from_plain = create_backbone("resnet18", checkpoint=plain)
    from_wrapped = create_backbone("resnet18", checkpoint=wrapped)

    assert weights_fingerprint(from_plain) == weights_fingerprint(source)
    assert weights_fingerprint(from_wrapped) == weights_fingerprint(source)


def test_checkpoint_with_other_classifier_keeps_features(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=20).eval()
    path = tmp_path / "finetuned.pth"
    torch.save(source.state_dict(), path)
    images = torch.randn(1, 3, 64, 64)

    loaded = create_backbone("resnet18", checkpoint=path)
    with torch.inference_mode():
        expected = source.forward_head(source.forward_features(images), pre_logits=True)
        actual = FeatureExtractor(loaded)(images)["final"]

    assert torch.allclose(actual, expected)


def test_checkpoint_of_other_model_names_file(tmp_path):
    path = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)

    with pytest.raises(BackboneError) as raised:
        create_backbone("resnet18", checkpoint=path)

    assert str(path) in str(raised.value)
    assert "resnet18" in str(raised.value)


def test_checkpoint_not_a_state_dict(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 1, "loss": 0.5}, path)

    with pytest.raises(BackboneError) as raised:
        create_backbone("resnet18", checkpoint=path)

    assert str(path) in str(raised.value)


def test_checkpoint_and_random_weights_conflict(tmp_path):
    with pytest.raises(BackboneError) as raised:
        create_backbone("resnet18", checkpoint=tmp_path / "x.pth", random_weights=True)

    assert "--random-weights" in str(raised.value)


def test_missing_weights_fail_fast_offline():
    config = timm.models.get_pretrained_cfg("resnet18.a1_in1k")
    if backbones._find_cached_weights(config) is not None:
        pytest.skip("resnet18.a1_in1k weights are in the local cache")
    if backbones._can_connect(*backbones._weights_host(config), defaults.HUB_CONNECT_TIMEOUT):
        pytest.skip("the weight host is reachable, so the weights would be downloaded")

    with pytest.raises(BackboneError) as raised:
        create_backbone("resnet18.a1_in1k")

    message = str(raised.value)
    assert "resnet18.a1_in1k" in message
    assert "--checkpoint" in message
    assert "--random-weights" in message


def test_fingerprint_changes_with_one_weight():
    model = timm.create_model("resnet10t", pretrained=False)
    before = weights_fingerprint(model)

    with torch.no_grad():
        model.fc.bias[0] += 1.0

    assert weights_fingerprint(model) != before
    assert len(before) == 64


def test_random_weights_repeat_across_calls():
    before = torch.random.get_rng_state()

    first = create_backbone("resnet10t", random_weights=True)
    second = create_backbone("resnet10t", random_weights=True)

    assert weights_fingerprint(first) == weights_fingerprint(second)
    assert torch.equal(torch.random.get_rng_state(), before)
