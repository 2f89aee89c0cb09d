"""Augmented views of training images: RandAugment, then Cutout, seeded per view.

A single cached pass cannot redraw augmentations every epoch, so a training store can hold
V augmented views of every image and the probe draws one view per image per epoch.

View v of sample index i under view seed s depends only on (s, i, v) and the image, so a
resumed run, a run with loader workers and every rank of a distributed run store the same
views. Each view is an independent draw of these steps, applied to the image already
resized to S x S pixels (so the augmentation cost does not depend on the file's size):

1. RandAugment as in ``torchvision.transforms.RandAugment`` (num_ops 2, magnitude 9 of 31
   bins by default, nearest interpolation) on the uint8 image. Its geometric operations fill
   uncovered pixels with black, torchvision's default.
2. Conversion to float in 0..1 and normalisation with the model's mean and std.
3. Cutout: one square hole of side round(cutout_factor * S) pixels, centred on a pixel drawn
   uniformly from the image and clipped at the borders, is set to 0. After normalisation 0
   is the normalisation mean, so the hole is filled with the mean colour.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms import functional as F

from mlprobe import defaults

AUGMENTATION_NAME = "randaugment+cutout"


def view_seed_for(view_seed: int, index: int, view: int) -> int:
    """Return the 63-bit seed of view ``view`` of sample ``index`` under ``view_seed`` (all non-negative)."""
    state = np.random.SeedSequence([view_seed, index, view]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class ViewAugmenter:
    """Draw V seeded augmented views of one image.

    Args:
        config: data config with image_size (pixels), mean and std (3 floats each).
        views: V, the views per image.
        view_seed: non-negative base seed of every view.
        num_ops, magnitude: RandAugment's operations per view and their strength (0..30).
        cutout_factor: side of the Cutout hole as a fraction of the image side (0 disables it).
    """

    def __init__(
        self,
        config: dict,
        *,
        views: int,
        view_seed: int = defaults.VIEW_SEED,
        num_ops: int = defaults.RANDAUGMENT_NUM_OPS,
        magnitude: int = defaults.RANDAUGMENT_MAGNITUDE,
        cutout_factor: float = defaults.CUTOUT_FACTOR,
    ):
        if views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        if view_seed < 0:
            raise ValueError(f"view_seed must be non-negative, got {view_seed}")
        if not 0.0 <= cutout_factor <= 1.0:
            raise ValueError(f"cutout_factor must be in 0..1, got {cutout_factor}")

        self.image_size = int(config["image_size"])
        self.mean = [float(value) for value in config["mean"]]
        self.std = [float(value) for value in config["std"]]
        self.views = views
        self.view_seed = view_seed
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.cutout_factor = cutout_factor
        self.cutout_size = int(round(cutout_factor * self.image_size))
        self.randaugment = RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=InterpolationMode.NEAREST)

    def settings(self) -> dict:
        """Return the augmentation settings as stored in the manifest."""
        return {
            "name": AUGMENTATION_NAME,
            "views": self.views,
            "view_seed": self.view_seed,
            "randaugment_num_ops": self.num_ops,
            "randaugment_magnitude": self.magnitude,
            "randaugment_magnitude_bins": self.randaugment.num_magnitude_bins,
            "randaugment_interpolation": "nearest",
            "randaugment_fill": "black",
            "cutout_factor": self.cutout_factor,
            "cutout_fill": "normalization mean",
        }

    def __call__(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """Augment one image.

        Args:
            image: uint8 [3, S, S], already resized; any device.
            index: the sample index in the split, part of every view's seed.

        Returns:
            float32 [V, 3, S, S] normalised views on the image's device.
        """
        if image.dtype != torch.uint8 or tuple(image.shape) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected a uint8 image of shape (3, {self.image_size}, {self.image_size}), "
                f"got {image.dtype} {tuple(image.shape)}"
            )
        return torch.stack([self._view(image, index, view) for view in range(self.views)])

    def _view(self, image: torch.Tensor, index: int, view: int) -> torch.Tensor:
        # RandAugment draws from torch's global CPU generator; fork_rng restores it afterwards,
        # so the seeding here does not change random numbers elsewhere in the process.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(view_seed_for(self.view_seed, index, view))
            augmented = self.randaugment(image)
            centre_y, centre_x = torch.randint(self.image_size, (2,)).tolist()

        normalised = F.normalize(augmented.float() / 255.0, self.mean, self.std)
        return self._cut_out(normalised, centre_y, centre_x)

    def _cut_out(self, image: torch.Tensor, centre_y: int, centre_x: int) -> torch.Tensor:
        """Set the square hole around (centre_y, centre_x) to 0, the normalisation mean."""
        if self.cutout_size == 0:
            return image

        top = centre_y - self.cutout_size // 2
        left = centre_x - self.cutout_size // 2
        bottom = min(self.image_size, top + self.cutout_size)
        right = min(self.image_size, left + self.cutout_size)
        image[:, max(0, top) : bottom, max(0, left) : right] = 0.0
        return image
