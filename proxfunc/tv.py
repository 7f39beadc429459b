"""Total variation: the exact 1-D TV prox (Condat's direct algorithm) and the fused lasso.

``tv1d(reg, dim)`` is ``f(z) = reg * sum_rows sum_j |z_{j+1} - z_j|``, the rows being the 1-D
fibres of every leaf along ``dim`` (each leaf separately; a leaf with one entry along ``dim``
contributes 0). Its prox is computed exactly (up to rounding) by Condat's direct algorithm,
batched over all rows at once.

References: L. Condat, *A direct algorithm for 1D total variation denoising*, IEEE Signal
Processing Letters 20(11), 2013; J. Friedman, T. Hastie, H. Höfling and R. Tibshirani,
*Pathwise coordinate optimization*, Ann. Appl. Stat. 2007 (the fused lasso prox is the soft
threshold of the TV prox); Parikh & Boyd (2014) section 6.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _dist, _tree
from ._base import Hyper, Prox, check_hyper
from ._util import hyper_tensor, zeros_like_value
from .norms import soft_threshold

__all__ = ["tv1d", "fused_lasso", "tv1d_rows"]


# ----------------------------------------------------------------------------- the algorithm
def _condat_rows(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Condat's direct algorithm on every row of ``x`` ``(B, n)`` at once, ``lam`` ``(B,)`` >= 0.

    Each row runs Condat's state machine (the C code of the paper, one pass of its main loop per
    iteration here): the candidate segment ``[k0, k]`` keeps the bounds ``vmin <= v <= vmax`` of
    its value and the running sums ``umin, umax`` of the dual variable; when a bound is violated
    the segment ``[k0, kminus]`` (or ``[k0, kplus]``) is final and the scan restarts after it.
    Rows advance together, each by one transition per iteration, until every row is done; a
    final segment's value is written at its first index only, and a cumulative maximum over the
    segment starts spreads it over the segment. Eager torch with a host read of "all rows done"
    every 16 iterations (the number of iterations depends on the data: about ``n`` to ``3n``).
    Computed in float64 (float32 and lower inputs are promoted; the caller rounds back).
    """
    B, n = x.shape
    dev = x.device
    rows = torch.arange(B, device=dev)
    xp = torch.cat([x, x[:, -1:]], dim=1)  # a padded copy: reading x[k + 1] at k = n - 1 is harmless
    k = torch.zeros(B, dtype=torch.long, device=dev)
    k0 = torch.zeros_like(k)
    kminus = torch.zeros_like(k)
    kplus = torch.zeros_like(k)
    umin = lam.clone()
    umax = -lam
    vmin = x[:, 0] - lam
    vmax = x[:, 0] + lam
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    seg_val = torch.zeros(B, n + 1, dtype=x.dtype, device=dev)  # column n: the sink of rows that do not emit
    seg_start = torch.zeros(B, n + 1, dtype=torch.bool, device=dev)
    two = 2 * lam
    it = 0
    while True:
        last = k == n - 1
        # at the end of the row: close the segment
        e1 = last & (umin < 0)
        e2 = last & ~e1 & (umax > 0)
        e3 = last & ~e1 & ~e2
        # inside the row: look at x[k + 1]
        xn = xp.gather(1, (k + 1).unsqueeze(1)).squeeze(1)
        umin_n = umin + xn - vmin
        umax_n = umax + xn - vmax
        m1 = ~last & (umin_n < -lam)
        m2 = ~last & ~m1 & (umax_n > lam)
        m3 = ~last & ~m1 & ~m2
        live = ~done
        e1, e2, e3, m1, m2, m3 = (c & live for c in (e1, e2, e3, m1, m2, m3))

        # emissions: segment [k0, kminus] at vmin (e1, m1), [k0, kplus] at vmax (e2, m2), [k0, n-1] (e3)
        len_last = (k - k0 + 1).to(x.dtype)
        v_e3 = vmin + umin / len_last
        emit_low = e1 | m1
        emit_high = e2 | m2
        emit = emit_low | emit_high | e3
        val = torch.where(emit_low, vmin, torch.where(emit_high, vmax, v_e3))
        pos = torch.where(emit, k0, torch.full_like(k0, n))
        seg_val[rows, pos] = val
        seg_start[rows, pos] = True
        new_k0 = torch.where(emit_low, kminus + 1, torch.where(emit_high, kplus + 1, k0))
        new_k0 = new_k0.clamp_max(n - 1)
        x0 = x.gather(1, new_k0.unsqueeze(1)).squeeze(1)

        # state after each transition
        # e1: k = kminus = k0; vmin = x[k0]; umin = lam; umax = vmin + lam - vmax(old)
        # e2: k = kplus = k0; vmax = x[k0]; umax = -lam; umin = vmax - lam - vmin(old)
        # m1: k = kplus = kminus = k0; vmin = x[k0]; vmax = vmin + 2 lam; umin = lam; umax = -lam
        # m2: k = kplus = kminus = k0; vmax = x[k0]; vmin = vmax - 2 lam; umin = lam; umax = -lam
        # m3: k += 1; umin, umax = umin_n, umax_n; then the bound updates
        restart = emit_low | emit_high
        k3 = k + 1
        cnt3 = (k3 - k0 + 1).to(x.dtype)
        up_min = m3 & (umin_n >= lam)
        up_max = m3 & (umax_n <= -lam)
        vmin3 = torch.where(up_min, vmin + (umin_n - lam) / cnt3, vmin)
        vmax3 = torch.where(up_max, vmax + (umax_n + lam) / cnt3, vmax)
        umin3 = torch.where(up_min, lam, umin_n)
        umax3 = torch.where(up_max, -lam, umax_n)

        new_vmin = torch.where(e1 | m1, x0, torch.where(m2, x0 - two, torch.where(m3, vmin3, vmin)))
        new_vmax = torch.where(e2 | m2, x0, torch.where(m1, x0 + two, torch.where(m3, vmax3, vmax)))
        new_umin = torch.where(e1 | m1 | m2, lam, torch.where(e2, x0 - lam - vmin, torch.where(m3, umin3, umin)))
        new_umax = torch.where(e2 | m1 | m2, -lam, torch.where(e1, x0 + lam - vmax, torch.where(m3, umax3, umax)))
        kminus = torch.where(restart & ~e2, new_k0, torch.where(up_min, k3, kminus))
        kplus = torch.where(restart & ~e1, new_k0, torch.where(up_max, k3, kplus))
        k = torch.where(restart, new_k0, torch.where(m3, k3, k))
        k0 = new_k0
        vmin, vmax, umin, umax = new_vmin, new_vmax, new_umin, new_umax
        done = done | e3
        it += 1
        if it % 16 == 0 and bool(done.all()):
            break
    start = seg_start[:, :n]
    idx = torch.arange(n, device=dev).expand(B, n)
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), dim=1).values
    return seg_val[:, :n].gather(1, first)


def _segments(z: torch.Tensor) -> torch.Tensor:
    """Segment ids of every row of ``z`` ``(B, n)``: entries with equal neighbours share one."""
    jump = torch.cat([torch.zeros_like(z[:, :1], dtype=torch.long), (z[:, 1:] != z[:, :-1]).long()], dim=1)
    return torch.cumsum(jump, dim=1)


def _segment_mean(g: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """The mean of ``g`` over every segment, spread back over the segment."""
    sums = torch.zeros_like(g).scatter_add(1, seg, g)
    cnt = torch.zeros_like(g).scatter_add(1, seg, torch.ones_like(g))
    return (sums / cnt.clamp_min(1)).gather(1, seg)


def _tv_lam_rate(z: torch.Tensor) -> torch.Tensor:
    """``dz/dlam`` of ``z = prox(x)``: ``(s_R - s_L) / |S|`` on every segment ``S``, with
    ``s_L = sign(z_S - z_prev)`` and ``s_R = sign(z_next - z_S)`` (0 at the ends of the row),
    from ``z_S = mean(x_S) - lam (s_L - s_R) / |S|``."""
    seg = _segments(z)
    d = torch.sign(z[:, 1:] - z[:, :-1])
    zero = torch.zeros_like(z[:, :1])
    s_left = torch.cat([zero, d], dim=1)  # nonzero at a segment's first entry
    s_right = torch.cat([d, zero], dim=1)  # nonzero at a segment's last entry
    cnt = torch.zeros_like(z).scatter_add(1, seg, torch.ones_like(z))
    dsum = torch.zeros_like(z).scatter_add(1, seg, s_right - s_left)
    return (dsum / cnt.clamp_min(1)).gather(1, seg)


def _tv_backward_parts(z: torch.Tensor, g: torch.Tensor):
    """``(J^T g, (dz/dlam)^T g per row)`` for ``z = prox(x)``; ``J`` averages over every
    constant segment of ``z`` (a symmetric projection)."""
    return _segment_mean(g, _segments(z)), (g * _tv_lam_rate(z)).sum(dim=1)


def _tv1d_impl(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    if x.numel() == 0 or n < 2:
        return x.clone()
    xd = x.to(torch.float64) if x.device.type != "mps" else x.to(torch.float32)
    lam_d = lam.to(xd.dtype).expand(x.shape[0]).contiguous()
    return _condat_rows(xd, lam_d).to(x.dtype)


if hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("proxfunc::tv1d_rows", mutates_args=())
    def _tv1d_op(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return _tv1d_impl(x, lam)

    @_tv1d_op.register_fake
    def _(x, lam):
        return torch.empty_like(x)

    def _raw(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return _tv1d_op(x, lam)
else:  # pragma: no cover - torch < 2.4: eager only (no opaque node for torch.compile)
    _raw = _tv1d_impl


def _fold(info, in_dims, x, lam):
    """``x`` ``(size, B, n)`` and ``lam`` ``(size * B,)`` from vmapped arguments."""
    xd, ld = in_dims
    size = info.batch_size
    x = x.movedim(xd, 0) if xd is not None else x.expand(size, *x.shape)
    B = x.shape[1]
    lam = lam.movedim(ld, 0) if ld is not None else lam.expand(size, *lam.shape)
    return x, lam.reshape(size, -1).expand(size, B).reshape(-1)


class _TV1d(torch.autograd.Function):
    """Rows' TV prox with its derivatives: ``J`` (symmetric) averages over every constant
    segment of the output; ``dz/dlam`` as in :func:`_tv_backward_parts`. ``vmap`` folds the
    batch into the rows (the algorithm's loop cannot run under a transform)."""

    @staticmethod
    def forward(x, lam):
        return _raw(x, lam)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.lam_dim = inputs[1].dim()

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        gx, glam = _tv_backward_parts(z.to(torch.float64), g.to(torch.float64))
        glam = glam.sum() if ctx.lam_dim == 0 else glam
        return gx.to(g.dtype), glam.to(g.dtype)

    @staticmethod
    def jvp(ctx, dx, dlam):
        (z,) = ctx.saved_tensors
        zd = z.to(torch.float64)
        out = torch.zeros_like(zd)
        if dx is not None:
            out = out + _segment_mean(dx.to(torch.float64), _segments(zd))
        if dlam is not None:
            rate = _tv_lam_rate(zd)
            dl = dlam.to(torch.float64)
            out = out + rate * (dl if dl.dim() == 0 else dl.unsqueeze(1))
        return out.to(z.dtype)

    @staticmethod
    def vmap(info, in_dims, x, lam):
        xs, lams = _fold(info, in_dims, x, lam)
        size, B, n = xs.shape
        return _TV1d.apply(xs.reshape(size * B, n), lams).reshape(size, B, n), 0


def _tv1d_call(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return _TV1d.apply(x, lam)


def tv1d_rows(x: torch.Tensor, lam: Any) -> torch.Tensor:
    """The exact prox of ``lam * sum_j |z_{j+1} - z_j|`` of every row of ``x`` ``(B, n)``.

    ``lam`` is a float, a 0-d tensor or a ``(B,)`` tensor (one weight per row), ``>= 0``.
    The algorithm runs in a ``torch.library`` custom op (``proxfunc::tv1d_rows``), so
    ``torch.compile(fullgraph=True)`` keeps it as one opaque node; an autograd function around
    it gives ``J^T g`` and ``J v`` (``J`` averages over every constant segment of the output)
    and the derivative in ``lam`` (``torch.func.grad``, ``jvp``, ``jacrev``, ``jacfwd``), and
    ``torch.vmap`` folds its batch into the rows. Inside, Condat's algorithm loops on the device with a host read of
    "all rows done" every 16 iterations (see :func:`_condat_rows`).

    Example:
        >>> import torch
        >>> from proxfunc.tv import tv1d_rows
        >>> tv1d_rows(torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]]), torch.tensor([0.5, 1.0]))
        tensor([[0.5000, 2.0000, 0.2500, 0.2500],
                [1.0000, 1.0000, 0.5000, 0.5000]])
    """
    if x.dim() != 2:
        raise ValueError(f"tv1d_rows: x must be (rows, n), got shape {tuple(x.shape)}")
    lam_t = lam.to(x.dtype) if isinstance(lam, torch.Tensor) else torch.full((), float(lam), dtype=x.dtype)
    lam_t = lam_t.to(x.device)
    if lam_t.dim() not in (0, 1) or (lam_t.dim() == 1 and lam_t.shape[0] != x.shape[0]):
        raise ValueError(f"tv1d_rows: lam must be a number, 0-d or ({x.shape[0]},), got shape {tuple(lam_t.shape)}")
    return _tv1d_call(x, _cap(x, lam_t))


def _cap(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``lam`` capped at each row's ``max_k |sum_{j<=k} (x_j - mean)|``, the smallest weight whose
    solution is the row's mean: the same solution, and Condat's bounds ``x_0 -+ lam`` then stay
    at the scale of the row (a weight far above it would cancel the row's values away). The
    derivative in ``lam`` is 0 where it is capped, as it is for the exact solution."""
    if x.shape[1] < 2 or x.shape[0] == 0:
        return lam
    c = torch.cumsum(x - x.mean(dim=1, keepdim=True), dim=1)[:, :-1].abs().amax(dim=1)
    return torch.where(torch.isfinite(c), torch.minimum(lam, c.to(lam.dtype)), lam)


# ----------------------------------------------------------------------------- the operators
def _check_dim(owner: str, dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{owner}: dim must be an int, got {type(dim).__name__}")
    return dim


def _rows_of(owner: str, x: torch.Tensor, dim: int, path: str) -> tuple[torch.Tensor, Any]:
    if x.dim() == 0:
        return x.reshape(1, 1), lambda r: r.reshape(())
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{owner}: dim={dim} is out of range for params{path} of shape {tuple(x.shape)}")
    moved = x.movedim(dim, -1)
    shape = moved.shape
    if x.numel() == 0:
        return None, None
    rows = moved.reshape(-1, shape[-1])
    return rows, lambda r: r.reshape(shape).movedim(-1, dim)


def _tv_value(leaves, dim, reg) -> torch.Tensor:
    if not leaves:
        return zeros_like_value(leaves)
    parts = []
    for x in leaves:
        xa = x.to(_tree.acc_dtype(x))
        if xa.dim() == 0 or xa.shape[dim] < 2:
            parts.append(xa.new_zeros(()))
        else:
            parts.append(torch.diff(xa, dim=dim).abs().sum())
    return reg * _tree.total(parts, leaves)


class tv1d(Prox):  # noqa: N801
    """Prox of 1-D total variation along ``dim``, exact (Condat's direct algorithm).

        f(z) = reg * sum over rows r of sum_j |z_r[j+1] - z_r[j]|,

    the rows being the 1-D fibres of every leaf along ``dim`` (default ``-1``: the rows of a
    matrix, a signal for a 1-D leaf). ``op(x, t)`` solves every row's problem
    ``argmin_z reg*t*TV(z) + ||z - x||^2 / 2`` exactly (up to rounding): the output is piecewise
    constant and keeps every row's mean. ``reg >= 0`` is a float or a 0-d tensor (gradients
    flow to it). Computed in float64 and rounded to the leaf's dtype. Default step 1.0 as for
    every operator.

    Under ``torch.compile(fullgraph=True)`` the rows go through one opaque custom op
    (``proxfunc::tv1d_rows``, :func:`tv1d_rows`); ``vmap`` folds its batch into the rows;
    autograd averages the cotangent over every constant segment of the output. A DTensor leaf
    is replicated for the call (each rank solves every row) and its placements restored after.
    Condat (2013).

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.tv1d(0.5)(torch.tensor([0.0, 3.0, 0.0, 0.0]))
        tensor([0.5000, 2.0000, 0.2500, 0.2500])
    """

    _hyper_names = ("reg", "dim")
    _public_name = "tv1d"

    def __init__(self, reg: Hyper = 1.0, dim: int = -1):
        self._set(reg=check_hyper("tv1d", "reg", reg), dim=_check_dim("tv1d", dim))

    def _prox_rows(self, leaves, step, tree):
        out = []
        for x, p in zip(leaves, tree.paths):
            if _dist.is_dtensor(x):  # the rows' algorithm runs on the whole tensor, replicated
                mesh = x.device_mesh
                rep = [_dist._replicate()] * mesh.ndim
                full = x.redistribute(mesh, rep).to_local()
                z = self._prox_rows([full], step, _tree.flatten(full, self._name())[1])[0]
                out.append(_dist.dtensor_class().from_local(z, mesh, rep, run_check=False))
                continue
            rows, back = _rows_of(self._name(), x, self.dim, p)
            if rows is None or rows.shape[-1] < 2:  # empty, or one entry per row: TV is 0
                out.append(x.clone())
                continue
            acc = _tree.acc_dtype(x)
            lam = hyper_tensor(self.reg, acc, x.device) * step
            out.append(back(tv1d_rows(rows.to(acc), lam).to(x.dtype)))
        return out

    def _prox(self, leaves, step, tree):
        return self._prox_rows(leaves, step, tree)

    def _value(self, leaves, tree):
        return _tv_value(leaves, self.dim, self.reg)


class fused_lasso(tv1d):  # noqa: N801
    """Prox of the fused lasso along ``dim``: 1-D total variation plus l1, exact.

        f(z) = reg_tv * sum_rows sum_j |z[j+1] - z[j]| + reg_l1 * sum_j |z_j|,

    rows as in :class:`tv1d`. ``op(x, t) = soft(tv1d(reg_tv)(x, t), reg_l1 * t)``: the soft
    threshold of the TV prox is the exact prox of the sum (Friedman et al. 2007, lemma A.1).
    ``reg_tv, reg_l1 >= 0``, floats or 0-d tensors.

    Example:
        >>> import torch, proxfunc as pf
        >>> pf.fused_lasso(0.5, 0.25)(torch.tensor([0.0, 3.0, 0.0, 0.0]))
        tensor([0.2500, 1.7500, 0.0000, 0.0000])
    """

    _hyper_names = ("reg_tv", "reg_l1", "dim")
    _public_name = "fused_lasso"

    def __init__(self, reg_tv: Hyper = 1.0, reg_l1: Hyper = 1.0, dim: int = -1):
        self._set(
            reg_tv=check_hyper("fused_lasso", "reg_tv", reg_tv),
            reg_l1=check_hyper("fused_lasso", "reg_l1", reg_l1),
            dim=_check_dim("fused_lasso", dim),
        )

    @property
    def reg(self):  # the TV weight, for the row machinery of tv1d
        return self.reg_tv

    def _prox(self, leaves, step, tree):
        tv = self._prox_rows(leaves, step, tree)
        return [soft_threshold(z, self.reg_l1 * step) for z in tv]

    def _value(self, leaves, tree):
        l1 = _tree.total([_tree.reduce_except(x, None, "abssum")[0] for x in leaves], leaves) if leaves else 0.0
        return _tv_value(leaves, self.dim, self.reg_tv) + self.reg_l1 * l1
