"""The HDF5 feature store: one folder of shards plus a manifest per (dataset, model, image size, split)."""

from mlprobe.features.layout import store_dir
from mlprobe.features.reader import FeatureStore, check_compatible
from mlprobe.features.writer import ShardWriter

__all__ = ["FeatureStore", "ShardWriter", "check_compatible", "store_dir"]
