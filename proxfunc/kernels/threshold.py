"""Water-filling thresholds: the core of the simplex / l1-ball projections and of linf1.

For values ``v`` of one group and a radius ``r > 0``, the *simplex threshold* is the unique
``theta`` with ``sum_j max(v_j - theta, 0) = r``. The projection onto the simplex
``{z >= 0, sum z = r}`` is ``max(v - theta, 0)`` (Held, Wolfe & Crowder 1974; Michelot 1986;
Duchi et al. 2008; Condat 2016). For the l1 ball ``{||z||_1 <= r}`` one uses ``v = |x|`` and
``tau = max(theta, 0)``; then ``P(x) = x - clamp(x, -tau, tau)`` and, by the Moreau identity,
the prox of ``r * ||.||_inf`` is ``clamp(x, -tau, tau)``.

A group may be spread over several tensors ("parts"): part ``k`` is a tensor ``a_k`` and a
group dim ``d_k`` (``None``: the whole tensor is the one group). Group ``i`` is the union of
``a_k`` sliced at ``i`` along ``d_k``. Nothing is concatenated. With ``absolute=True`` the
values are ``|a_k|`` (computed on the fly, block by block, never materialised in full).

Method (sort-free, exact; eagerly on a GPU a sort measured faster, see :func:`_sorts`):
Michelot's fixed point, started from the lower bound
``theta_0 = max(max_j v_j - r, (sum_j v_j - r) / n)`` (both satisfy ``f(theta_0) >= r`` for
``f(t) = sum_j max(v_j - t, 0)``). Each step keeps the entries above ``theta`` and sets
``theta`` to their mean excess ``(sum_{v > theta} v - r) / #{v > theta}``, which is Newton's
step on the convex, piecewise-linear, decreasing ``f``: ``theta`` increases monotonically,
never passes the solution, and is *exact* as soon as the active set stops changing (at most
``n`` steps; 1-10 in practice, see ``benchmarks/``). The returned threshold is recomputed from
the final active set in one differentiable formula, so gradients flow to ``v`` and ``r``.

* :func:`threshold_fixed_point` (eager on the CPU, concrete tensors): iterates until the active set of
  every group is stable, block by block over the groups so that each block of rows stays in
  cache for all its iterations (one read of the data from memory in total). One group over
  everything is streamed in cache-sized chunks while many entries are active, then its
  candidates are filtered (Condat 2016).
* :func:`threshold_unrolled` (traceable: ``torch.compile``, ``torch.func`` transforms): the
  same iteration unrolled a fixed number of times (no host read, no sort, fixed shapes;
  inductor fuses the steps into one per-row loop). When the active set has not settled after
  ``iters`` steps the result is the last Michelot iterate, a lower bound of ``theta`` that is
  exact for every input the tests and benchmarks use (ties, all-equal rows, rows inside the
  ball, radii from 1e-30 to 1e30, Gaussian rows of length 4096).
* :func:`threshold_sort`: the sort + cumulative-sum method of Held et al. / Duchi et al.,
  kept as the reference the tests compare against.
* :func:`threshold_max`: ``max_k (c_k - r) / k`` over the sorted prefix sums ``c_k``, the
  eager path for small inputs (up to ``_SMALL`` entries in all) and on GPUs, where a
  segmented sort is one fast launch and each synced fixed-point step is not (measured).
"""

from __future__ import annotations

import math

import torch

from .._tree import along, common_dtype, reduce_except

__all__ = ["threshold", "threshold_fixed_point", "threshold_unrolled", "threshold_sort", "threshold_max", "UNROLL"]

Part = tuple[torch.Tensor, "int | None"]

#: Michelot steps unrolled on the traceable path (after the start from the lower bound):
#: ``UNROLL + ceil(log2(n) / 2)`` for groups of ``n`` entries (10 for n = 4096). The steps
#: needed grow like log(n); measured worst cases over Gaussian, uniform, exponential,
#: Cauchy, log-normal and evenly spaced rows and radii 0.01..1e4: 8 steps for n = 4096,
#: 10 for n = 65536, so the schedule keeps a margin of two.
UNROLL = 4

#: Up to this many entries in all, the eager path uses the (exact) sort-based threshold.
_SMALL = 4096

#: Target number of entries per block on the eager path (1 MiB of float32: the per-core L2).
_BLOCK = 1 << 18

#: The same on other devices (a GPU): there a block costs kernel launches and one host sync
#: per step, not cache misses, so the blocks are as large as float32 counting stays exact
#: (2**24 entries, 64 MiB of float32): a 4096x4096 matrix is one block, not 64 blocks of
#: about ten synchronised steps each.
_BLOCK_DEVICE = 1 << 24


def _block_size(a: torch.Tensor) -> int:
    return _BLOCK if a.device.type == "cpu" else _BLOCK_DEVICE


def _vals(a: torch.Tensor, absolute: bool) -> torch.Tensor:
    return a.abs() if absolute else a


def _zero(a: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=a.dtype, device=a.device)


def _start(parts: list[Part], radius, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower bound ``max(max v - r, (sum v - r) / n)`` of the threshold, and ``n`` per group."""
    m = s = n = None
    for a, d in parts:
        v = _vals(a, absolute)
        ma = _amax(v, d)
        sa = reduce_except(v, d, "sum")
        na = a.numel() // max(ma.numel(), 1) if ma.numel() else 0
        m = ma if m is None else torch.maximum(m, ma)
        s = sa if s is None else s + sa
        n = na if n is None else n + na
    assert m is not None and s is not None and n is not None
    lo = torch.maximum(m - radius, (s - radius) / max(n, 1))
    return lo, torch.full_like(lo, float(n))


def _amax(v: torch.Tensor, d: int | None) -> torch.Tensor:
    if d is None:
        return v.amax().reshape(1) if v.numel() else v.new_full((1,), float("-inf"))
    dims = [i for i in range(v.dim()) if i != d]
    if not dims:
        return v
    if v.numel() == 0:
        return v.new_full((v.shape[d],), float("-inf"))
    return v.amax(dim=dims)


def _sum_count(parts: list[Part], theta: torch.Tensor, absolute: bool, strict: bool = True):
    """Per-group sum and count of the values above ``theta`` (``>=`` when not ``strict``)."""
    s = n = None
    for a, d in parts:
        v = _vals(a, absolute)
        th = along(theta, v, d)
        m = v > th if strict else v >= th
        sa = reduce_except(torch.where(m, v, _zero(v)), d, "sum")
        na = reduce_except(m.to(v.dtype), d, "sum")
        s = sa if s is None else s + sa
        n = na if n is None else n + na
    assert s is not None and n is not None
    return s, n


def _step(s: torch.Tensor, c: torch.Tensor, theta: torch.Tensor, radius) -> torch.Tensor:
    # c == 0 happens only for r == 0 once theta reached the maximum: that is the answer.
    # The max keeps the iteration monotone under rounding (so the active sets only shrink).
    return torch.maximum(theta, torch.where(c > 0, (s - radius) / c.clamp_min(1), theta))


def _finish(parts: list[Part], theta: torch.Tensor, radius, absolute: bool) -> torch.Tensor:
    """One differentiable evaluation on the active set ``{v >= theta}`` (theta detached).

    Entries equal to theta may be counted in or out without changing the value; counting
    them in keeps ``r == 0`` exact.
    """
    theta = theta.detach()
    s, n = _sum_count(parts, theta, absolute, strict=False)
    # No entry >= theta happens when rounding put theta a hair above the group max (radius 0
    # on tied maxima): keep theta, which is that max up to one rounding.
    return torch.where(n > 0, (s - radius) / n.clamp_min(1), theta.to(s.dtype))


def _detach(radius):
    return radius.detach() if isinstance(radius, torch.Tensor) else radius


def threshold_unrolled(
    parts: list[Part], radius: torch.Tensor | float, iters: int | None = None, *, absolute: bool = False
) -> torch.Tensor:
    """Simplex threshold per group by ``iters`` unrolled Michelot steps (traceable, no sort).

    ``iters=None`` takes ``UNROLL + ceil(log2(n) / 2)`` for groups of ``n`` entries.
    """
    if not isinstance(radius, torch.Tensor) and parts:
        # A tensor like the values, not a Python number: on DTensors, torch 2.13 caches the
        # sharding plan of ``partial_max - 0.3`` under the key that a later ``partial_max -
        # tensor(0.3)`` (a tensor step) finds, and that plan fails on it ('float' object has
        # no attribute 'mesh'); with a tensor radius every call has the same kind of argument
        like = parts[0][0]
        if isinstance(radius, float) and radius > torch.finfo(like.dtype).max:
            radius = math.inf  # beyond the dtype's range (every finite group is inside the ball)
        radius = like.new_full((), radius)
    with torch.no_grad():
        dparts = [(a.detach(), d) for a, d in parts]
        r = _detach(radius)
        theta, n = _start(dparts, r, absolute)
        if iters is None:
            size = _group_size(dparts)
            iters = UNROLL + math.ceil(math.log2(max(size, 2)) / 2)
        for _ in range(iters):
            s, c = _sum_count(dparts, theta, absolute)
            theta = _step(s, c, theta, r)
    return _finish(parts, theta, radius, absolute)


def _group_size(parts: list[Part]) -> int:
    """Entries per group, from the static shapes (no tensor read)."""
    size = 0
    for a, d in parts:
        size += a.numel() if d is None else (a.numel() // a.shape[d] if a.shape[d] else 0)
    return size


def _blocks(parts: list[Part]) -> list[list[Part]]:
    """Split the groups into contiguous blocks of about ``_block_size`` entries (eager only)."""
    if any(d is None for _, d in parts) or not parts:
        return [parts]
    g = parts[0][0].shape[parts[0][1]]
    per_group = sum(a.numel() for a, _ in parts) // max(g, 1)
    rows = max(1, _block_size(parts[0][0]) // max(per_group, 1))
    if rows >= g:
        return [parts]
    return [[(a.narrow(d, i, min(rows, g - i)), d) for a, d in parts] for i in range(0, g, rows)]


def _sum_count_block(
    vals: list[Part], theta: torch.Tensor, tmp: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sum_count`` with a float mask (vectorised better than a bool one) written into the
    preallocated ``tmp`` (one per part, shaped like it): ``gt`` with a float ``out`` is one
    pass, where ``sign(v - theta).clamp(min=0)`` took three."""
    s = c = None
    for (v, d), buf in zip(vals, tmp):
        m = torch.gt(v, along(theta, v, d), out=buf)  # 1.0 where v > theta, else 0.0
        ca = reduce_except(m, d, "sum")
        if ca is m:  # a 1-d part with d=0 reduces to itself: keep the count before mul_
            ca = ca.clone()
        sa = reduce_except(m.mul_(v), d, "sum")
        s = sa if s is None else s + sa
        c = ca if c is None else c + ca
    assert s is not None and c is not None
    return s, c


def _fixed_point_block(
    parts: list[Part], r, absolute: bool, max_iter: int | None, work: list[tuple[torch.Tensor | None, torch.Tensor]]
) -> torch.Tensor:
    # One block: small, stays in cache. Its values and the per-iteration temporary go into
    # the workspace shared by all blocks: a fresh 1 MiB tensor per iteration would be
    # page-faulted in every time (glibc hands freed chunks of that size back to the OS).
    # The workspace is shaped like the first block; a shorter last block uses a narrowed view.
    vals = [
        (torch.abs(a, out=vb.narrow(d, 0, a.shape[d])) if absolute else a, d) for (a, d), (vb, _) in zip(parts, work)
    ]
    tmp = [tb.narrow(d, 0, a.shape[d]) for (a, d), (_, tb) in zip(parts, work)]
    theta, n = _start(vals, r, False)
    count = n
    limit = int(n.max().item()) + 2 if max_iter is None and n.numel() else (max_iter or 1)
    for _ in range(limit):
        s, c = _sum_count_block(vals, theta, tmp)
        theta = _step(s, c, theta, r)
        if bool(((c == count) | (c == 0)).all()):
            break
        count = c
    return theta


def _fixed_point_single(parts: list[Part], r, absolute: bool) -> torch.Tensor:
    """One group (the whole object): Michelot's fixed point, streamed, then compacted.

    ``theta`` only increases, so entries at or below it never become active again. While
    more than an eighth of the entries are active, each step streams the values in
    cache-sized chunks (a float mask ``v > theta`` into one reused buffer, its count and the
    masked sum): no temporary the size of the input. Then the candidates ``{v > theta}`` are
    kept (Condat 2016's filtering) and the work shrinks geometrically. Compacting from the
    first step (boolean indexing of the whole input) allocated and page-faulted about half
    the input per step.
    """
    chunks = []
    for a, _ in parts:
        flat, size = a.reshape(-1), _block_size(a)
        chunks += [flat[i : i + size] for i in range(0, flat.numel(), size)]
    total = sum(c.numel() for c in chunks)
    if total == 0:
        return _start(parts, r, absolute)[0]
    dtype = common_dtype(chunks)
    size = max(c.numel() for c in chunks)
    mask = chunks[0].new_empty(size, dtype=dtype)
    vbuf = chunks[0].new_empty(size, dtype=dtype) if absolute else None

    def values(c: torch.Tensor) -> torch.Tensor:
        if vbuf is None:
            return c if c.dtype == dtype else c.to(dtype)
        out = vbuf[: c.numel()]
        return torch.abs(c, out=out) if c.dtype == dtype else out.copy_(c).abs_()

    tops, sums = [], []
    for c in chunks:
        v = values(c)
        tops.append(v.amax())
        sums.append(v.sum())
    theta = torch.maximum(torch.stack(tops).amax() - r, (torch.stack(sums).sum() - r) / total).reshape(1)
    count = total
    for _ in range(total + 2):
        if count * 8 <= total:
            break
        counts, sums = [], []
        for c in chunks:
            v = values(c)
            m = torch.gt(v, theta, out=mask[: v.numel()])
            counts.append(m.sum())  # exact: a chunk has fewer than 2**24 entries
            sums.append(m.mul_(v).sum())
        cnt = int(torch.stack(counts).sum(dtype=torch.float64).item())
        if cnt == 0:  # only for r == 0 once theta is the maximum: that is the answer
            return theta
        theta = torch.maximum(theta, (torch.stack(sums).sum() - r) / cnt)
        if cnt == count:
            return theta
        count = cnt
    vals = []  # the few candidates left
    for c in chunks:
        v = values(c)
        vals.append(v[v > theta])
    for _ in range(count + 2):
        c = sum(v.numel() for v in vals)
        if c == 0:
            break
        s = sum(v.sum(dtype=theta.dtype) for v in vals)
        theta = torch.maximum(theta, (s - r) / c)
        if c == count:
            break
        count = c
        vals = [v[v > theta] for v in vals]
    return theta


def threshold_fixed_point(
    parts: list[Part], radius: torch.Tensor | float, max_iter: int | None = None, *, absolute: bool = False
) -> torch.Tensor:
    """Exact simplex threshold per group by Michelot's fixed point (no sort), eager.

    Iterates until every group's active set is stable; the groups are processed in blocks
    that fit in cache, each block running all its iterations before the next is read.
    """
    with torch.no_grad():
        r = _detach(radius)
        dparts = [(a.detach(), d) for a, d in parts]
        if all(d is None for _, d in dparts) and max_iter is None:
            theta = _fixed_point_single(dparts, r, absolute)
        else:
            blocks = _blocks(dparts)
            # per part: a buffer for |values| (absolute only) and one for the mask
            work = [(torch.empty_like(a) if absolute else None, torch.empty_like(a)) for a, _ in blocks[0]]
            thetas = [_fixed_point_block(b, r, absolute, max_iter, work) for b in blocks]
            theta = thetas[0] if len(thetas) == 1 else torch.cat(thetas)
    needs_grad = torch.is_grad_enabled() and (
        any(a.requires_grad for a, _ in parts) or (isinstance(radius, torch.Tensor) and radius.requires_grad)
    )
    if not needs_grad:
        # The converged iterate already is the mean excess over the final active set.
        return theta
    return _finish(parts, theta, radius, absolute)


def _rows(parts: list[Part], absolute: bool) -> torch.Tensor:
    """The values as a ``(groups, entries per group)`` matrix (one copy; fixed shape, traceable)."""
    rows = []
    for a, d in parts:
        a = _vals(a, absolute)
        if d is None:
            rows.append(a.reshape(1, -1))
        else:
            per_group = 1  # explicit, not -1: G may be 0 (a plain loop: dynamo traces it)
            for i, n in enumerate(a.shape):
                if i != d:
                    per_group *= n
            rows.append(a.movedim(d, 0).reshape(a.shape[d], per_group))
    return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]


def threshold_sort(parts: list[Part], radius: torch.Tensor | float, *, absolute: bool = False) -> torch.Tensor:
    """Exact simplex threshold per group by sorting (fixed shape, traceable): the reference."""
    v = _rows(parts, absolute)
    g, n = v.shape
    if n == 0:
        return -torch.as_tensor(radius, dtype=v.dtype, device=v.device).expand(g)
    u, _ = torch.sort(v, dim=1, descending=True)
    c = torch.cumsum(u, dim=1)
    j = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    cond = u * j > (c - radius)
    k = cond.to(torch.int64).sum(dim=1).clamp_min(1)  # cond holds on a prefix
    ck = torch.gather(c, 1, (k - 1).unsqueeze(1)).squeeze(1)
    return (ck - radius) / k.to(v.dtype)


def threshold_max(parts: list[Part], radius: torch.Tensor | float, *, absolute: bool = False) -> torch.Tensor:
    """The simplex threshold as ``max_k (c_k - r) / k``, ``c_k`` the sum of the ``k`` largest values.

    Every candidate is a lower bound (``sum_j max(v_j - theta_k, 0) >= c_k - k theta_k = r``)
    and the candidate at ``k = #{v > theta}`` is the threshold, so the maximum is exact: the
    sort and cumulative sum of :func:`threshold_sort` without locating ``k`` (fewer, larger
    kernels: the path for small inputs, where each kernel launch costs more than its work).
    Differentiable (through the sort and the maximum) and traceable.
    """
    v = _rows(parts, absolute)
    g, n = v.shape
    if n == 0:
        return -torch.as_tensor(radius, dtype=v.dtype, device=v.device).expand(g)
    # Long groups (the eager path on a GPU) sum in float64: a float32 prefix sum over 2**24
    # entries drifted to 7e-7 relative (6 ulps) where the fixed point stays within one.
    acc = torch.float64 if n > _SMALL and v.dtype != torch.float64 and v.device.type != "mps" else v.dtype
    c = torch.cumsum(torch.sort(v, dim=1, descending=True)[0], dim=1, dtype=acc)
    theta = ((c - radius) / torch.arange(1, n + 1, dtype=acc, device=v.device)).amax(dim=1)
    return theta.to(v.dtype)


def threshold(
    parts: list[Part], radius: torch.Tensor | float, *, traceable: bool, absolute: bool = False
) -> torch.Tensor:
    """The simplex threshold per group: sort-free when traced and eagerly on the CPU; eagerly
    on other devices and for tiny inputs, :func:`threshold_max` (see :func:`_sorts`)."""
    if traceable:
        return threshold_unrolled(parts, radius, absolute=absolute)
    if _sorts(parts):
        return threshold_max(parts, radius, absolute=absolute)
    return threshold_fixed_point(parts, radius, absolute=absolute)


def _sorts(parts: list[Part]) -> bool:
    """Whether the eager path takes :func:`threshold_max` (a sort) over the fixed point.

    Tiny inputs (the xor example: 100 groups of 3): a fixed handful of kernels and no host
    round trips beat any iteration; the sort of a few entries per row is free. Off the CPU
    (a GPU): the device's segmented sort (no host sync) beats the fixed point's synchronised
    steps (``python -m benchmarks.cuda_variants``; figures in benchmarks/README.md). Compiled
    code stays sort-free, and
    eager linf1 on CUDA rows takes its kernel (:mod:`proxfunc.kernels.cuda.linf1`).
    """
    return sum(a.numel() for a, _ in parts) <= _SMALL or parts[0][0].device.type != "cpu"
