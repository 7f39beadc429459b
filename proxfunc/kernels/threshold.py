"""Water-filling thresholds: the core of the simplex / l1-ball projections and of linf1.

For values ``v`` of one group and a radius ``r > 0``, the *simplex threshold* is the unique
``theta`` with ``sum_j max(v_j - theta, 0) = r``. The projection onto the simplex
``{z >= 0, sum z = r}`` is ``max(v - theta, 0)`` (Held, Wolfe & Crowder 1974; Michelot 1986;
Duchi et al. 2008; Condat 2016). For the l1 ball ``{||z||_1 <= r}`` one uses ``v = |x|`` and
``tau = max(theta, 0)``; then ``P(x) = x - clamp(x, -tau, tau)`` and, by the Moreau identity,
the prox of ``r * ||.||_inf`` is ``clamp(x, -tau, tau)``.

A group may be spread over several tensors ("parts"): part ``k`` is a tensor ``a_k`` and a
group dim ``d_k`` (``None``: the whole tensor is the one group). Group ``i`` is the union of
``a_k`` sliced at ``i`` along ``d_k``. Nothing is concatenated on the eager fast path.

Two exact methods:

* :func:`threshold_fixed_point` (sort-free): Michelot's fixed point. ``theta_0`` is the
  mean excess; each step keeps the entries above ``theta`` and recomputes the mean excess
  over them. ``theta`` increases monotonically and reaches the exact value when the active
  set stops changing (at most ``n`` steps, typically < 10). The loop runs without autograd on
  concrete tensors; the returned threshold is then recomputed from the final active set in
  one differentiable formula, so gradients flow to ``v`` and ``r``.
* :func:`threshold_sort`: the sort + cumulative-sum method of Held et al. / Duchi et al.,
  fixed-shape and traceable (used under ``torch.compile`` and ``torch.func`` transforms),
  and the reference the tests compare against.
"""

from __future__ import annotations

import torch

from .._tree import along, reduce_except

__all__ = ["threshold", "threshold_fixed_point", "threshold_sort"]

Part = tuple[torch.Tensor, "int | None"]


def _sum_where(parts: list[Part], theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sum and count of the entries strictly above ``theta``."""
    s = None
    n = None
    for a, d in parts:
        m = a > along(theta, a, d)
        sa = reduce_except(torch.where(m, a, torch.zeros((), dtype=a.dtype, device=a.device)), d, "sum")
        na = reduce_except(m.to(a.dtype), d, "sum")
        s = sa if s is None else s + sa
        n = na if n is None else n + na
    assert s is not None and n is not None
    return s, n


def threshold_fixed_point(parts: list[Part], radius: torch.Tensor | float, max_iter: int | None = None) -> torch.Tensor:
    """Exact simplex threshold per group by Michelot's fixed point (no sort)."""
    with torch.no_grad():
        dparts = [(a.detach(), d) for a, d in parts]
        r = radius.detach() if isinstance(radius, torch.Tensor) else radius
        s = sum(reduce_except(a, d, "sum") for a, d in dparts)
        count = sum(reduce_except(torch.ones_like(a), d, "sum") for a, d in dparts)
        theta = (s - r) / count.clamp_min(1)
        limit = int(count.max().item()) + 2 if max_iter is None and count.numel() else (max_iter or 1)
        for _ in range(limit):
            s, c = _sum_where(dparts, theta)
            # c == 0 happens only for r == 0, once theta is the maximum: that is the answer.
            theta = torch.where(c > 0, (s - r) / c.clamp_min(1), theta)
            if bool(((c == count) | (c == 0)).all()):
                break
            count = torch.where(c > 0, c, count)
    # One differentiable evaluation on the final active set. Entries equal to theta may be
    # counted in or out without changing the value; counting them in keeps r == 0 exact.
    s_grad = None
    n_act = None
    for a, d in parts:
        m = a.detach() >= along(theta, a, d)
        sa = reduce_except(torch.where(m, a, torch.zeros((), dtype=a.dtype, device=a.device)), d, "sum")
        na = reduce_except(m.to(a.dtype), d, "sum")
        s_grad = sa if s_grad is None else s_grad + sa
        n_act = na if n_act is None else n_act + na
    assert s_grad is not None and n_act is not None
    # No entry >= theta happens when rounding put the loop's theta a hair above the group max
    # (radius 0 on tied entries): keep the loop's theta, which is that max up to one rounding.
    return torch.where(n_act > 0, (s_grad - radius) / n_act.clamp_min(1), theta.to(s_grad.dtype))


def threshold_sort(parts: list[Part], radius: torch.Tensor | float) -> torch.Tensor:
    """Exact simplex threshold per group by sorting (fixed shape, traceable)."""
    rows = []
    for a, d in parts:
        if d is None:
            rows.append(a.reshape(1, -1))
        else:
            rows.append(a.movedim(d, 0).reshape(a.shape[d], -1))
    v = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
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


def threshold(parts: list[Part], radius: torch.Tensor | float, *, traceable: bool) -> torch.Tensor:
    """The simplex threshold per group; sort-free unless ``traceable`` is required."""
    if traceable:
        return threshold_sort(parts, radius)
    return threshold_fixed_point(parts, radius)
