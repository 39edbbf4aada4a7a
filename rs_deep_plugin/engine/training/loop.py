"""The training loop shared by every trainer (QGIS-free)."""
import random

import numpy as np

from ..errors import InputError


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global random generators."""
    import torch
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def check_tile(value, name):
    """Refuse a tile size that is not a multiple of 32 (at least 32)."""
    if not isinstance(value, int) or value < 32 or value % 32:
        raise InputError(f"{name} must be a multiple of 32, at least 32; got {value!r}")


__all__ = ["seed_everything", "check_tile"]
