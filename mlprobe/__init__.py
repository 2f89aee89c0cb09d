"""Multi-label image classification by efficient transfer learning.

Stage 1 (``mlprobe.extract``) runs a frozen backbone once over every image and
caches pooled stage features in HDF5 shards (``mlprobe.features``). Stage 2
(``mlprobe.probe``) trains linear and layover heads on the cached features.
"""

__version__ = "0.1.0"
