"""Shared pytest configuration: a hypothesis profile sized for a small shared CPU.

``HYPOTHESIS_PROFILE=thorough pytest`` runs many more examples per property.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_FACTOR = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 1


def _compile_supported() -> bool:
    try:
        from torch._dynamo.eval_frame import check_if_dynamo_supported

        check_if_dynamo_supported()
    except Exception:  # torch 2.0 on Python 3.11+, or a platform dynamo does not run on
        return False
    return True


#: Tests that call ``torch.compile``: skipped, with the reason, where this torch cannot compile.
requires_compile = pytest.mark.skipif(
    not _compile_supported(),
    reason="torch.compile is not supported by this torch and Python (torch 2.0: Python <= 3.10)",
)


def examples(n: int) -> int:
    """Per-test example budget: ``n`` normally, ten times that under the thorough profile."""
    return n * _FACTOR


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: small matmuls on a shared 2-core machine are far
    faster without OpenMP spin-waiting. The previous thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
