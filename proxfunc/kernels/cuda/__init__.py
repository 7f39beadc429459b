"""Hand-written Triton kernels for eager CUDA paths, reached only through
:func:`proxfunc.dispatch.select`.

* :mod:`._triton`: builds them lazily once ``triton`` imports (``PROXFUNC_TRITON=0`` switches
  them off), launches them on their tensors' device, and switches off a kernel whose launch
  raised.
* :mod:`.linf1`: linf1's prox of row groups (:data:`.linf1.SPEC`, :func:`.linf1.run`).
"""
