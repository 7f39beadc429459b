"""The implementations behind the operators' fast paths. Imports nothing above
:mod:`proxfunc.dispatch` (whose :class:`~proxfunc.dispatch.KernelSpec` the kernels declare).

* :mod:`.threshold`: the water-filling thresholds (the reference's unrolled fixed point; the
  eager fixed point and sort), shared by linf, linf1, the l1 ball, the simplex and others.
* :mod:`.cpu`: hand-written C kernels, built once per machine with the system compiler
  (:mod:`.cpu._cc`), large calls split over torch's OpenMP threads;
  :mod:`.cpu.linf1`, linf1's row groups; :mod:`.cpu.soft_threshold`, l1 of many tensors in
  one call.
* :mod:`.cuda`: Triton kernels (:mod:`.cuda._triton`); :mod:`.cuda.linf1`, linf1's row groups.

Which of them runs is decided by :func:`proxfunc.dispatch.select` alone.
"""

from .threshold import threshold, threshold_fixed_point, threshold_max, threshold_sort, threshold_unrolled

__all__ = ["threshold", "threshold_fixed_point", "threshold_max", "threshold_sort", "threshold_unrolled"]
