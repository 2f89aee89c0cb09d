"""The torch.distributed process group of an extraction started by torchrun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process.
With WORLD_SIZE above 1, ``distributed_from_environment`` joins the group (nccl when CUDA
is available, else gloo) for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator

import torch

from mlprobe import defaults
from mlprobe.errors import MlprobeError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def distributed_from_environment(
    timeout_s: float = defaults.DISTRIBUTED_TIMEOUT_S,
) -> Iterator[tuple[int, int]]:
    """Join the torchrun process group for the block and yield (rank, world size).

    Without torchrun (WORLD_SIZE unset or 1), or when the group is already initialised,
    nothing is set up or torn down and the block gets (0, 1) or the existing group's values.

    Args:
        timeout_s: seconds a collective may wait. A rank with fewer shards left, for example
            after a resume, waits at the final barrier until the slowest rank is done. Torch's
            default timeouts (10 min for nccl, 30 min for gloo) would abort such a run.

    Raises:
        MlprobeError: WORLD_SIZE, RANK or LOCAL_RANK is not an integer.
    """
    world_size = _environment_int("WORLD_SIZE", 1)
    if world_size <= 1 or torch.distributed.is_initialized():
        if torch.distributed.is_initialized():
            yield torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            yield 0, 1
        return

    if not torch.distributed.is_available():
        raise MlprobeError(f"WORLD_SIZE is {world_size} but this torch build has no torch.distributed; run one process")

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_environment_int("LOCAL_RANK", 0))
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank = torch.distributed.get_rank()
    logger.info("joined the %s process group as rank %d of %d", backend, rank, world_size)

    try:
        yield rank, world_size
    finally:
        torch.distributed.destroy_process_group()
        logger.debug("rank %d left the process group", rank)


def _environment_int(name: str, default: int) -> int:
    """Read an integer environment variable set by torchrun."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default

    try:
        return int(value)
    except ValueError:
        raise MlprobeError(
            f"environment variable {name}={value!r} is not an integer; start the run with torchrun"
        ) from None
