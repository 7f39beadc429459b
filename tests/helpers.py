"""Tiny helpers shared by the test modules (float64 tensors from numpy, seeded RNGs, pytree)."""

import types

import numpy as np
import torch
from torch.utils import _pytree

from proxfunc import _tree

#: ``torch.utils._pytree``'s functions the tests use, on every supported torch (2.0 has no
#: ``tree_leaves`` / ``tree_structure`` and a one-tree ``tree_map``).
pytree = types.SimpleNamespace(
    tree_flatten=_pytree.tree_flatten,
    tree_unflatten=_pytree.tree_unflatten,
    tree_leaves=_tree.tree_leaves,
    tree_structure=_tree.tree_structure,
    tree_map=_tree.tree_map,
)


def t64(a):
    """A float64 tensor from anything numpy can read."""
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def rng(seed):
    """A seeded numpy Generator."""
    return np.random.default_rng(seed)
