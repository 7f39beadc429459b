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


#: The oldest torch whose dynamo traces proxfunc with ``fullgraph=True`` (README: torch.compile).
#: Measured: 2.6.0, 2.8.0, 2.11.0 and 2.13.0 pass every compile test; 2.5.1 and 2.4.1 fail 16
#: (pytree group_dim, partition, matrix operators: constructs their dynamo did not trace);
#: 2.1.2 fails most; 2.0 cannot compile on Python 3.11+.
COMPILE_MIN_TORCH = (2, 6)


def _compile_skip_reason() -> str | None:
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < COMPILE_MIN_TORCH:
        return f"proxfunc compiles with fullgraph=True from torch {COMPILE_MIN_TORCH[0]}.{COMPILE_MIN_TORCH[1]}"
    try:
        from torch._dynamo.eval_frame import check_if_dynamo_supported

        check_if_dynamo_supported()
    except Exception as e:  # a platform or Python dynamo does not run on
        return f"torch.compile is not supported here: {e}"
    return None


_COMPILE_SKIP = _compile_skip_reason()
#: Tests that call ``torch.compile``: skipped, with the reason, where this torch cannot compile.
requires_compile = pytest.mark.skipif(_COMPILE_SKIP is not None, reason=_COMPILE_SKIP or "")


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
