"""Fast paths shared by the operators. Imports nothing above :mod:`proxfunc._tree`.

* :mod:`.threshold`: the water-filling thresholds (sort-free fixed point, unrolled, sort).
* :mod:`.scale`: ``x * s`` along one dim (l21's second pass), a Triton kernel on large CUDA
  tensors, ATen elsewhere.
* :mod:`.linf1_rows`: linf1's threshold and clamp fused per group on CUDA (Triton).
* :mod:`._triton`: lazy, switchable (``PROXFUNC_TRITON=0``) loading of the Triton kernels.
* :mod:`.soft`: l1's soft threshold of many CPU tensors in one call of a C kernel, bit for bit
  ``x - clamp(x, -t, t)`` (ATen's ``softshrink`` is compute-bound on the CPU).
* :mod:`.l21_rows`: l21's norms and scale of row groups (a weight; a layer's weight + bias) on
  the CPU, in one C call for many tensors, each row scaled while it is in cache.
* :mod:`.linf1_cpu`: linf1's threshold and clamp per row group on the CPU, in one C call (the
  fixed point per group while its rows are in cache).
* :mod:`._cc`: builds such C kernels once per machine with the system compiler, caches them
  on disk and loads them with ctypes; switchable (``PROXFUNC_CC=0``), ATen paths without it.
"""

from .threshold import threshold, threshold_fixed_point, threshold_max, threshold_sort, threshold_unrolled

__all__ = ["threshold", "threshold_fixed_point", "threshold_max", "threshold_sort", "threshold_unrolled"]
