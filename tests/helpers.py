"""Tiny helpers shared by the catalog test modules (float64 tensors from numpy, seeded RNGs)."""

import numpy as np
import torch


def t64(a):
    """A float64 tensor from anything numpy can read."""
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def rng(seed):
    """A seeded numpy Generator."""
    return np.random.default_rng(seed)
