"""Fast paths shared by the operators. Imports nothing above :mod:`proxfunc._tree`."""

from .threshold import threshold, threshold_fixed_point, threshold_max, threshold_sort, threshold_unrolled

__all__ = ["threshold", "threshold_fixed_point", "threshold_max", "threshold_sort", "threshold_unrolled"]
