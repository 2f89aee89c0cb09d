"""A trained head on top of its live frozen backbone, for classifying new images."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mlprobe.errors import BackboneError, MlprobeError
from mlprobe.extract.backbones import FeatureExtractor, create_backbone, weights_fingerprint
from mlprobe.extract.images import build_transform, load_image
from mlprobe.probe.heads import Head, load_head

logger = logging.getLogger(__name__)


class HeadClassifier(nn.Module):
    """Backbone features computed live, then a head trained on cached features.

    forward(images float [B, 3, S, S], normalised as the store was) returns
    logits float32 [B, K]; sigmoid gives the probability of each class.
    """

    def __init__(self, extractor: FeatureExtractor, head: Head, class_names: list[str], preprocessing: dict):
        super().__init__()
        self.extractor = extractor
        self.head = head
        self.class_names = list(class_names)
        self.preprocessing = dict(preprocessing)
        self.transform = build_transform(self.preprocessing)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(images))

    @torch.inference_mode()
    def predict_files(self, paths: list[Path], threshold: float) -> list[dict[str, float]]:
        """Return, for each image file, the classes whose probability reaches threshold, with the probabilities."""
        batch = torch.stack([self.transform(load_image(Path(path))) for path in paths])
        probabilities = torch.sigmoid(self(batch))

        predictions = []
        for row in probabilities:
            predictions.append({
                name: float(value) for name, value in zip(self.class_names, row.tolist()) if value >= threshold
            })
        return predictions


def load_classifier(head_file: Path, *, checkpoint: Path | None = None) -> HeadClassifier:
    """Rebuild the backbone a head was trained on and join the two.

    The backbone's weights must be the ones the features were extracted with:
    their fingerprint is compared with the one saved beside the head, and a
    mismatch raises BackboneError.
    """
    head, extra = load_head(Path(head_file))
    backbone = extra.get("backbone") or {}
    if "model" not in backbone:
        raise MlprobeError(f"{head_file} records no backbone; retrain it with this version of mlprobe")

    model = create_backbone(backbone["model"], checkpoint=checkpoint, image_size=backbone["image_size"])
    fingerprint = weights_fingerprint(model)
    if fingerprint != backbone["weights_fingerprint"]:
        raise BackboneError(
            f"the weights of {backbone['model']} (fingerprint {fingerprint[:12]}) differ from those the head "
            f"{head_file} was trained on ({backbone['weights_fingerprint'][:12]}); pass the same --checkpoint"
        )

    logger.info("loaded head %s on %s at %d px", head_file, backbone["model"], backbone["image_size"])
    return HeadClassifier(FeatureExtractor(model).eval(), head, extra["class_names"], backbone)
