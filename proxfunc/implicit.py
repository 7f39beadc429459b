"""Differentiating the solution of a composite problem: implicit differentiation of the
proximal-gradient fixed point.

:func:`argmin` returns ``x*(theta) = argmin_x fun(x, *args) + g_theta(x)`` (solved by
:class:`proxfunc.ProximalGradient`) as a differentiable function of the data ``args`` and of
the prox's hyperparameters ``prox_args``. Its derivative does not go through the iterations: it
comes from the fixed-point equation the solution satisfies for any step ``s > 0``,

    x* = T(x*, theta),    T(x, theta) = prox_theta(x - s grad fun(x, theta), s),

by the implicit function theorem, ``dx* = (I - d_x T)^{-1} d_theta T dtheta``. With
``D = d prox`` at ``z = x* - s grad fun(x*)`` (symmetric positive semidefinite with eigenvalues
in ``[0, 1]`` for the prox of a convex function) and ``C = I - s H`` (``H`` the Hessian of
``fun``, symmetric), ``d_x T = D C``. A cotangent ``v`` of ``x*`` becomes

    u = (I - C D)^{-1} v = v + C D q,   where   (D - D C D) q = D v,

and the gradients are ``(d_theta T)^T u``. ``D - D C D = D (I - D) + s D H D`` is symmetric
positive semidefinite for convex ``fun``, so the solve is conjugate gradients, matrix-free
(three Jacobian-vector products a step: the prox's twice, the Hessian's once), and it works on
the support of the solution: where the prox is flat (``D = 0``: entries set to zero by ``l1``,
clamped by ``box``, dead groups of ``l21``) the system is zero and CG never leaves the range of
``D``. For the lasso, ``D`` is the support's indicator and the system is ``s H_SS q_S = v_S``.
The tangent (forward mode) is the same solve transposed. This is jaxopt's ``implicit_diff``
(Blondel et al. 2022) for ``torch.func``: an ``autograd.Function`` with ``setup_context``, a
``vmap`` rule (one solve per batch entry), a backward and a forward-mode rule built from
``torch.func`` transforms, so it works under ``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``
and ``vmap``, nested.

Requirements: ``fun`` is convex and twice differentiable in ``x`` and differentiable in
``args``; the prox is that of a convex function, differentiable at ``z`` (it is almost
everywhere; at a kink, ``D`` is the one its reference implementation computes), so the
derivative is the one of the problem with the solution's support held fixed.

References: M. Blondel et al., *Efficient and Modular Implicit Differentiation*, NeurIPS 2022;
Q. Bertrand et al., *Implicit differentiation of Lasso-type models for hyperparameter
optimization*, ICML 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, jvp, vjp
from torch.utils import _pytree as pytree

from ._base import Prox
from ._util import traceable
from .solvers import ProximalGradient

__all__ = ["argmin", "conjugate_gradient"]


# ------------------------------------------------------------------------- flat-list algebra
def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    out = None
    for x, y in zip(a, b):
        p = (x * y).sum()
        out = p if out is None else out + p
    assert out is not None
    return out


def conjugate_gradient(
    op: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    b: list[torch.Tensor],
    *,
    tol: float = 1e-12,
    maxiter: int | None = None,
) -> list[torch.Tensor]:
    """Solve ``op(x) = b`` for a symmetric positive semidefinite linear ``op`` on lists of tensors.

    Stops when ``||r|| <= tol * ||b||``. Eagerly the test is read on the host; under a
    ``torch.func`` transform or ``torch.compile`` it runs ``maxiter`` masked iterations (an
    iteration that has converged changes nothing). ``maxiter`` defaults to ``2n + 10`` (``n``
    unknowns) under a transform and ``10n + 100`` eagerly. For a consistent singular system
    (``b`` in the range of ``op``) it converges to the solution of least norm.
    """
    n = sum(x.numel() for x in b)
    eager = not traceable(*b)
    if maxiter is None:
        maxiter = 10 * n + 100 if eager else 2 * n + 10
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    rs = _dot(r, r)
    stop = rs * (tol * tol)
    for _ in range(maxiter):
        if eager and bool(rs <= stop):
            break
        ap = op(p)
        pap = _dot(p, ap)
        active = (rs > stop) & (pap > 0)
        alpha = torch.where(active, rs / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rs))
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap)]
        rs_new = _dot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = [ri + beta * pi for ri, pi in zip(r, p)]
        rs = torch.where(active, rs_new, rs)
    return x


# ------------------------------------------------------------------------------ the problem
class _Problem:
    """Everything about one :func:`argmin` call that is not a tensor to differentiate."""

    def __init__(self, fun, prox, x_spec, args_leaves, args_spec, pargs_leaves, pargs_spec, options):
        self.fun = fun
        self.prox = prox
        self.x_spec = x_spec
        self.n_x = x_spec.num_leaves
        # tensor leaves travel through the Function; the others stay here
        self.args_slots = [i for i, v in enumerate(args_leaves) if isinstance(v, torch.Tensor)]
        self.args_const = list(args_leaves)
        self.args_spec = args_spec
        self.pargs_slots = [i for i, v in enumerate(pargs_leaves) if isinstance(v, torch.Tensor)]
        self.pargs_const = list(pargs_leaves)
        self.pargs_spec = pargs_spec
        self.options = options

    def split(self, tensors):
        n_a = len(self.args_slots)
        xs = list(tensors[: self.n_x])
        a = list(tensors[self.n_x : self.n_x + n_a])
        p = list(tensors[self.n_x + n_a :])
        return xs, a, p

    def args(self, a: list[torch.Tensor]) -> tuple:
        leaves = list(self.args_const)
        for i, t in zip(self.args_slots, a):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.args_spec)

    def make_prox(self, p: list[torch.Tensor]) -> Prox:
        if isinstance(self.prox, Prox):
            return self.prox
        leaves = list(self.pargs_const)
        for i, t in zip(self.pargs_slots, p):
            leaves[i] = t
        op = self.prox(*pytree.tree_unflatten(leaves, self.pargs_spec))
        if not isinstance(op, Prox):
            raise TypeError(f"argmin: prox(*prox_args) must return a proxfunc operator, got {type(op).__name__}")
        return op

    def x(self, xs: list[torch.Tensor]) -> Any:
        return pytree.tree_unflatten(list(xs), self.x_spec)

    # the pieces of the fixed-point map T(x, a, p) = prox_p(x - s grad fun(x, *a), s)
    def grad_step(self, xs, a, s):
        args = self.args(a)
        g = grad(lambda x: self.fun(x, *args))(self.x(xs))
        return [xi - s * gi for xi, gi in zip(xs, pytree.tree_leaves(g))]

    def prox_leaves(self, zs, p, s):
        return pytree.tree_leaves(self.make_prox(p)(self.x(zs), s))

    def T(self, xs, a, p, s):
        return self.prox_leaves(self.grad_step(xs, a, s), p, s)

    def system(self, xs, a, p, s):
        """``(D, C)`` as functions on lists of tensors (``D`` the prox's Jacobian at ``z``,
        ``C`` the gradient step's), both symmetric: applied by ``vjp``."""
        zs, c_vjp = vjp(lambda x: self.grad_step(x, a, s), xs)
        zs = [z.detach() for z in zs]
        _, d_vjp = vjp(lambda z: self.prox_leaves(z, p, s), zs)

        def D(v):
            return list(d_vjp(list(v))[0])

        def C(v):
            return list(c_vjp(list(v))[0])

        return D, C

    def solve_q(self, D, C, rhs):
        def op(q):
            dq = D(q)
            return [a - b for a, b in zip(dq, D(C(dq)))]

        opts = self.options
        return conjugate_gradient(op, rhs, tol=opts["cg_tol"], maxiter=opts["cg_maxiter"])


class _Argmin(torch.autograd.Function):
    @staticmethod
    def forward(problem: _Problem, *tensors: torch.Tensor):
        xs, a, p = problem.split(tensors)
        opts = problem.options
        solver = ProximalGradient(problem.fun, problem.make_prox(p), **opts["solver"])
        res = solver.run(problem.x(xs), *problem.args(a), maxiter=opts["maxiter"], tol=opts["tol"])
        out = [t.clone() for t in pytree.tree_leaves(res.params)]
        step = res.state.stepsize.detach().clone()
        return (*out, step)

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem = inputs[0]
        _, a, p = problem.split(inputs[1:])
        xs = output[:-1]
        s = output[-1]
        ctx.problem = problem
        ctx.mark_non_differentiable(s)
        ctx.save_for_backward(*xs, s, *a, *p)
        ctx.save_for_forward(*xs, s, *a, *p)

    @staticmethod
    def _saved(ctx):
        problem = ctx.problem
        saved = list(ctx.saved_tensors)
        xs = saved[: problem.n_x]
        s = saved[problem.n_x]
        rest = saved[problem.n_x + 1 :]
        n_a = len(problem.args_slots)
        return problem, xs, s, rest[:n_a], rest[n_a:]

    @staticmethod
    def backward(ctx, *grads):
        problem, xs, s, a, p = _Argmin._saved(ctx)
        v = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads[: problem.n_x])]
        D, C = problem.system(xs, a, p, s)
        q = problem.solve_q(D, C, D(v))
        u = [vi + ci for vi, ci in zip(v, C(D(q)))]
        _, t_vjp = vjp(lambda a_, p_: problem.T(xs, a_, p_, s), a, p)
        ga, gp = t_vjp(u)
        return (None, *([None] * problem.n_x), *ga, *gp)

    @staticmethod
    def jvp(ctx, *tangents):
        problem, xs, s, a, p = _Argmin._saved(ctx)
        _, ta, tp = problem.split(tangents[1:])
        ta = [torch.zeros_like(t) if d is None else d for t, d in zip(a, ta)]
        tp = [torch.zeros_like(t) if d is None else d for t, d in zip(p, tp)]
        _, b = jvp(lambda a_, p_: problem.T(xs, a_, p_, s), (a, p), (ta, tp))
        D, C = problem.system(xs, a, p, s)
        cb = C(b)
        q = problem.solve_q(D, C, D(cb))
        r = [ci + di for ci, di in zip(cb, C(D(q)))]
        dx = [bi + di for bi, di in zip(b, D(r))]
        return (*dx, None)

    @staticmethod
    def vmap(info, in_dims, problem, *tensors):
        dims = in_dims[1:]
        outs = []
        for i in range(info.batch_size):
            part = [t if d is None else t.select(d, i) for t, d in zip(tensors, dims)]
            outs.append(_Argmin.apply(problem, *part))
        stacked = tuple(torch.stack(list(col)) for col in zip(*outs))
        return stacked, (0,) * len(stacked)


def argmin(
    fun: Callable[..., torch.Tensor],
    params: Any,
    prox: Prox | Callable[..., Prox] | None = None,
    *,
    args: tuple = (),
    prox_args: tuple = (),
    tol: float = 1e-10,
    maxiter: int = 10_000,
    cg_tol: float = 1e-12,
    cg_maxiter: int | None = None,
    **options: Any,
) -> Any:
    """The minimiser of ``fun(x, *args) + g(x)``, differentiable in ``args`` and ``prox_args``
    by implicit differentiation (see the module docstring).

    Args:
        fun: smooth convex part, ``fun(x, *args) -> 0-d tensor``, written functionally.
        params: the starting point (a tensor or a pytree of tensors; not differentiated).
        prox: a proxfunc operator, ``None`` (``g = 0``), or a callable ``prox(*prox_args) ->
            operator`` whose hyperparameters are to be differentiated (``lambda reg:
            pf.l1(reg)``).
        args: extra arguments of ``fun`` (pytrees; their tensors are differentiated).
        prox_args: the arguments of a callable ``prox`` (pytrees; their tensors are
            differentiated).
        tol: the solver's stopping tolerance (:meth:`proxfunc.ProximalGradient.run`); the
            derivative is that of the exact solution, so solve tightly.
        maxiter: the solver's iteration limit.
        cg_tol: the tolerance of the conjugate-gradient solve of the backward and forward
            rules (:func:`conjugate_gradient`).
        cg_maxiter: its iteration limit (``None``: ``2n + 10`` for ``n`` unknowns).
        options: those of :class:`proxfunc.ProximalGradient` (``stepsize``,
            ``acceleration``, ...).

    Returns:
        The solution, with the structure of ``params``. Under ``grad``, ``vjp``, ``jacrev``,
        ``jvp``, ``jacfwd`` and ``vmap`` (a batch of problems is solved one by one), and with
        ``.backward()``.

    Example (the lasso's solution path slope, ``d w* / d reg``)::

        fun = lambda w, X, y: 0.5 * ((X @ w - y) ** 2).mean()
        solve = lambda reg: pf.argmin(fun, torch.zeros(p), pf.l1, args=(X, y), prox_args=(reg,))
        torch.func.jacrev(solve)(torch.tensor(0.01))
    """
    if not callable(fun):
        raise TypeError(f"argmin: fun must be callable, got {type(fun).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"argmin: args must be a tuple, got {type(args).__name__}")
    if not isinstance(prox_args, tuple):
        raise TypeError(f"argmin: prox_args must be a tuple, got {type(prox_args).__name__}")
    if prox is None:
        from .calculus import identity

        prox = identity()
    if not isinstance(prox, Prox) and not callable(prox):
        raise TypeError(f"argmin: prox must be a proxfunc operator, a callable or None, got {type(prox).__name__}")
    if isinstance(prox, Prox) and prox_args:
        raise ValueError("argmin: prox_args is for a callable prox; this prox is an operator")
    if options.get("value_and_grad"):
        raise ValueError("argmin: value_and_grad is not supported (the derivative needs fun's autograd)")
    x_leaves, x_spec = pytree.tree_flatten(params)
    for x in x_leaves:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("argmin: every leaf of params must be a floating tensor")
    a_leaves, a_spec = pytree.tree_flatten(args)
    p_leaves, p_spec = pytree.tree_flatten(prox_args)
    opts = {"tol": tol, "maxiter": maxiter, "cg_tol": cg_tol, "cg_maxiter": cg_maxiter, "solver": options}
    problem = _Problem(fun, prox, x_spec, a_leaves, a_spec, p_leaves, p_spec, opts)
    ProximalGradient(fun, prox if isinstance(prox, Prox) else None, **options)  # argument checks, before solving
    tensors = [x.detach() for x in x_leaves]
    tensors += [a_leaves[i] for i in problem.args_slots] + [p_leaves[i] for i in problem.pargs_slots]
    out = _Argmin.apply(problem, *tensors)
    return pytree.tree_unflatten(list(out[:-1]), x_spec)
