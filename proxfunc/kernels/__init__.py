"""Fast paths shared by the operators. Imports nothing above :mod:`proxfunc._tree`.

* :mod:`.threshold`: the water-filling thresholds (sort-free fixed point, unrolled, sort).
* :mod:`.scale`: ``x * s`` along one dim (l21's second pass), a Triton kernel on large CUDA
  tensors, ATen elsewhere.
* :mod:`.linf1_rows`: linf1's threshold and clamp fused per group on CUDA (Triton).
* :mod:`._triton`: lazy, switchable (``PROXFUNC_TRITON=0``) loading of the Triton kernels.
"""

from .threshold import threshold, threshold_fixed_point, threshold_max, threshold_sort, threshold_unrolled

__all__ = ["threshold", "threshold_fixed_point", "threshold_max", "threshold_sort", "threshold_unrolled"]
