"""Tiny helpers shared by the test modules (float64 tensors from numpy, seeded RNGs, pytree,
a check run in a forked child)."""

import os
import time
import types
from collections.abc import Callable

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


def in_forked_child(check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Fail the calling test unless ``check()`` returns true in a forked child within
    ``timeout`` seconds (a child that hangs is killed). The child never returns into pytest."""
    import pytest

    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = 0 if check() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the check failed in the forked child"
