"""Hand-written C kernels for eager CPU paths, reached only through
:func:`proxfunc.dispatch.select`.

* :mod:`._cc`: builds them with the system's C compiler (with OpenMP where it can: large
  calls run on torch's threads), caches and verifies the libraries on disk, loads them with
  :mod:`ctypes`.
* :mod:`.linf1`: linf1's prox of row groups (:data:`.linf1.SPEC`, :func:`.linf1.run`).
* :mod:`.soft_threshold`: l1's prox of many tensors in one call
  (:data:`.soft_threshold.SPEC`, :func:`.soft_threshold.run`).
"""
