"""Proximal gradient solvers (ISTA / FISTA) on pytrees, and proximal training steps.

:func:`proximal_gradient` minimises a composite objective

    F(x) = fun(x) + g(x),

where ``fun`` is smooth (its gradient comes from :func:`torch.func.grad_and_value`) and ``g`` is
the function a proxfunc operator names (``prox.value``). ``x`` is a tensor or any pytree of
tensors (a dict of named tensors is the common case). jaxopt's ``ProximalGradient`` is the
model: the same iteration, stopping rule and result, on PyTorch pytrees, plus adaptive restart
and a line search that grows the step again only where its tests certify the larger step, so
it converges to the fixed point to rounding (the gradient-mapping norm reaches ``1e-14`` in
float64 on well-conditioned problems).

:class:`ProximalGradient` exposes the same solver as a pure ``init`` / ``update`` pair whose
state is a tuple of tensors, so one iteration can be compiled with ``torch.compile`` and driven
by the user's own loop; :meth:`ProximalGradient.run_compiled` compiles the whole loop as one
``while_loop`` graph (small problems, many solves). :func:`proxfunc.argmin`
(:mod:`proxfunc.implicit`) differentiates the solution by implicit differentiation.

:class:`prox_sgd` and :class:`prox_adam` are functional optimizers for ``torch.func`` training
loops: a gradient update followed by the prox, pure functions of ``(params, grads, state)``.

References:
    A. Beck and M. Teboulle, *A Fast Iterative Shrinkage-Thresholding Algorithm for Linear
    Inverse Problems*, SIAM J. Imaging Sciences 2(1), 2009 (ISTA/FISTA, backtracking).
    B. O'Donoghue and E. Candes, *Adaptive Restart for Accelerated Gradient Schemes*,
    Foundations of Computational Mathematics 15, 2015 (gradient and function restart).
    N. Parikh and S. Boyd, *Proximal Algorithms*, 2014, section 4.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.func import grad_and_value

from . import _tree
from ._base import Hyper, Prox, _is_compiling, check_hyper
from ._tree import acc_dtype
from ._util import traceable
from .calculus import identity

__all__ = [
    "proximal_gradient",
    "ProximalGradient",
    "ProxGradState",
    "ProxGradResult",
    "prox_sgd",
    "prox_adam",
    "ProxSGDState",
    "ProxAdamState",
]

Stepsize = float | Callable[[Any], Hyper] | None


# --------------------------------------------------------------------------- pytree arithmetic
def _map(fn: Callable[..., torch.Tensor], tree: Any, *rest: Any) -> Any:
    return _tree.tree_map(fn, tree, *rest)


def _leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in _tree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _vdot(a: Any, b: Any) -> torch.Tensor:
    """``<a, b>`` summed over all leaves (in the leaves' common dtype)."""
    parts = [(x * y).sum() for x, y in zip(_leaves(a), _leaves(b))]
    if not parts:
        return torch.zeros(())
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def _sqnorm(a: Any) -> torch.Tensor:
    return _vdot(a, a)


def _axpy(alpha: Hyper, x: Any, y: Any) -> Any:
    """``y + alpha * x`` leafwise."""
    return _map(lambda xi, yi: yi + alpha * xi, x, y)


def _sub(a: Any, b: Any) -> Any:
    return _map(torch.sub, a, b)


def _where(cond: torch.Tensor, a: Any, b: Any) -> Any:
    return _map(lambda x, y: torch.where(cond, x, y), a, b)


def _scalar_like(value: Any, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype or like.dtype, device=like.device).detach().clone()


def _first_leaf(params: Any, owner: str) -> torch.Tensor:
    leaves = _leaves(params)
    if not leaves:
        raise ValueError(f"{owner}: params has no tensor leaves")
    for x in leaves:
        if not x.is_floating_point():
            raise TypeError(f"{owner}: every leaf of params must be a floating tensor, got dtype {x.dtype}")
    return leaves[0]


def _unflat(leaves: list, spec: Any) -> Any:
    return leaves[0] if spec.is_leaf() else _tree.pytree.tree_unflatten(leaves, spec)


def _ldot(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``<a, b>`` over lists of tensors, accumulated in ``dtype``, as a 0-d tensor."""
    parts = [torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return torch.zeros((), dtype=dtype)
    return torch.stack(parts).sum()


_EPS = {t: float(torch.finfo(t).eps) for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_MAX = {t: float(torch.finfo(t).max) for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


@dataclass
class _Fast:
    """The eager loop's state: flat leaves and Python numbers (see :class:`ProxGradState`)."""

    x: list
    y: list
    g: list | None
    fy: float | None
    gx: list | None
    t: float
    s: float
    s_next: float
    k: int
    error: float
    value: float
    smooth: float
    bound: float
    restarted: bool
    trials: int
    vd: torch.dtype
    differentiable: bool


# --------------------------------------------------------------------------------- the solver
class ProxGradState(NamedTuple):
    """State of :class:`ProximalGradient` (a tuple of tensors: ``torch.compile`` friendly).

    Attributes:
        params: the current iterate ``x_k``.
        y: the point where the next gradient is taken (``x_k`` for ISTA, the extrapolated
            point for FISTA).
        momentum: FISTA's ``t_k`` (1 after a restart; unused by ISTA).
        stepsize: the step of the last update.
        iteration: number of updates done (0-d int64 tensor).
        error: the gradient-mapping norm ``||y - prox(y - s grad f(y), s)|| / s`` of the last
            update (``inf`` before the first): the fixed-point residual divided by the step.
        value: ``F(x_k) = fun(x_k) + g(x_k)`` where the update needs it (``restart="function"``),
            NaN otherwise (:meth:`ProximalGradient.run` evaluates it at the end).
        smooth: ``fun(x_k)`` (NaN where the update did not evaluate it: FISTA with a fixed step).
        bound: the sufficient-decrease bound of the last step,
            ``fun(y) + <grad f(y), x_k - y> + ||x_k - y||^2 / (2 s)`` (``inf`` before the first).
        restarted: whether the last update restarted the momentum (bool tensor).
        trials: number of prox evaluations the last line search used (0-d int64 tensor).
        next_stepsize: the first trial step of the next line search (see
            :class:`ProximalGradient` for when it grows).
        grad: ISTA: ``grad fun(y)``, computed by the last update's accepted trial (reused, so an
            ISTA iteration evaluates the gradient once); ``None`` for FISTA.
        fy: ISTA: ``fun(y)`` (with ``grad``); ``None`` for FISTA.
        differentiable: whether the iterations keep their autograd graph (some input of the
            problem requires grad: ``params``, a tensor in ``args``, a tensor captured by ``fun``,
            a tensor hyperparameter of ``prox``). A Python bool, fixed at :meth:`init`.
        grad_params: FISTA with ``quadratic=True``: ``grad fun(params)`` (``None`` otherwise).
    """

    params: Any
    y: Any
    momentum: torch.Tensor
    stepsize: torch.Tensor
    iteration: torch.Tensor
    error: torch.Tensor
    value: torch.Tensor
    smooth: torch.Tensor
    bound: torch.Tensor
    restarted: torch.Tensor
    trials: torch.Tensor
    next_stepsize: torch.Tensor | None = None
    grad: Any = None
    fy: torch.Tensor | None = None
    differentiable: bool = False
    grad_params: Any = None


@dataclass
class ProxGradResult:
    """What :func:`proximal_gradient` returns.

    Attributes:
        params: the solution (same pytree structure, shapes and dtypes as the input).
        iterations: number of iterations run.
        error: the final gradient-mapping norm (the stopping criterion).
        value: ``fun(params) + prox.value(params)`` (a Python float).
        converged: ``error < tol``.
        stepsize: the last step used.
        state: the final :class:`ProxGradState` (to resume with :meth:`ProximalGradient.update`).
        history: with ``history=True``, a dict of per-iteration lists: ``value``, ``smooth``,
            ``bound``, ``error``, ``stepsize``, ``restarted``, ``trials``; otherwise ``None``.
    """

    params: Any
    iterations: int
    error: float
    value: float
    converged: bool
    stepsize: float
    state: ProxGradState
    history: dict[str, list] | None = field(default=None, repr=False)


def _requires_grad(obj: Any) -> bool:
    """Whether a tensor inside ``obj`` (a pytree, or an operator's hyperparameters) requires grad."""
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, Prox):
        return any(_requires_grad(v) for _, v in obj._params())
    if isinstance(obj, dict):
        return any(_requires_grad(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_requires_grad(v) for v in obj)
    return False


_NAN = float("nan")


class ProximalGradient:
    """Proximal gradient descent (ISTA) and its accelerated form (FISTA) as ``init``/``update``.

    Minimises ``F(x) = fun(x, *args) + g(x)`` where ``g`` is the function ``prox`` names::

        x_{k+1} = prox(y_k - s_k * grad fun(y_k), s_k)
                = argmin_z g(z) + ||z - (y_k - s_k grad fun(y_k))||^2 / (2 s_k),

    with ``y_k = x_k`` (ISTA) or the FISTA extrapolation ``y_{k+1} = x_{k+1} +
    (t_k - 1)/t_{k+1} (x_{k+1} - x_k)``, ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2``
    (Beck & Teboulle 2009).

    Args:
        fun: smooth part, ``fun(params, *args) -> 0-d tensor``, convex for the line search's
            guarantees; differentiated by autograd (``torch.func.grad_and_value`` under a
            transform or ``torch.compile``), so it must be written functionally
            (``torch.func.functional_call`` for a module). With ``value_and_grad=True``,
            ``fun`` returns ``(value, grad)`` itself and no autograd runs.
        prox: a proxfunc operator (``None``: ``g = 0``, plain gradient descent).
        stepsize: ``None`` (default) for backtracking line search; a positive float for a fixed
            step (``1/L`` for an ``L``-Lipschitz gradient); or a callable ``k -> step`` (a
            schedule, called with the iteration number: a Python int, or a 0-d tensor under
            ``torch.compile``).
        acceleration: ``True`` for FISTA, ``False`` for ISTA.
        restart: FISTA's adaptive restart (O'Donoghue & Candes 2015): ``"gradient"`` (default:
            restart when ``<y_k - x_{k+1}, x_{k+1} - x_k> > 0``), ``"function"`` (when
            ``F(x_{k+1}) > F(x_k)``) or ``None``. A restart sets ``t = 1`` and ``y = x_{k+1}``.
        init_stepsize: the first trial step of the line search.
        decrease_factor: the line search multiplies a rejected step by this (in ``(0, 1)``).
        increase_factor: the factor by which the next search may start above an accepted step
            (``>= 1``; 1 keeps the steps non-increasing, as in Beck & Teboulle). ``None``
            (default) means 1.2, except for FISTA without restart, where it means 1: growing
            steps break FISTA's momentum schedule and, without a restart to reset it, the
            iterates can oscillate instead of converging.
        maxls: maximum number of trial steps per line search. Under ``torch.compile`` the
            search always evaluates ``maxls`` trials (masked), so keep it small there.
        value_and_grad: ``fun`` returns ``(value, grad)`` (``grad`` a pytree like ``params``).
        quadratic: ``fun`` is a quadratic (least squares: its gradient is affine). FISTA then
            evaluates ``fun`` and its gradient once an iteration, at the trial point (which also
            gives it ISTA's Lipschitz test), and takes the gradient and value at the
            extrapolated point as their exact combinations from the last two iterates. Wrong
            for any other ``fun``. Used by the eager loop (:meth:`run`, :meth:`update` eagerly);
            the traced paths evaluate the gradient at the extrapolated point.

    Line search. With ``d = x+ - y`` for the trial ``x+ = prox(y - s grad, s)``, a trial step
    ``s`` is accepted when the sufficient-decrease test on the smooth part holds,

        fun(x+) - fun(y) - <grad fun(y), d> <= ||d||^2 / (2 s)   (+ rounding slack),

    and, for ISTA (which evaluates ``grad fun(x+)`` anyway: it is the next iteration's
    gradient), also the Lipschitz test ``<grad fun(x+) - grad fun(y), d> <= ||d||^2 / s``
    (+ its rounding slack). Both hold for every ``s <= 1/L``; the gradient test has no
    cancellation of function values, so it stays informative down to ``||d||`` of the order
    of rounding. If no trial passes within ``maxls``, the last (smallest) one is taken.

    The next search starts at ``increase_factor * s`` only when the accepted step is certified
    with margin: the tests would also hold with ``||d||^2 / (2 s)`` divided by
    ``increase_factor``, and ``||d||^2 / (2 s)`` is above the rounding slack of the
    function-value test (near the solution that test is decided by rounding, and a step
    accepted within rounding is not evidence for a larger one). Otherwise it starts at ``s``.
    So the step never grows past what the tests certify, and near a solution it stays put.

    ``state.error`` is the norm of the gradient mapping at the point where the gradient was
    taken, ``||y - prox(y - s grad fun(y), s)|| / s``, which is 0 exactly at a minimiser.

    Differentiable unrolling: when some input requires grad (``params``, a tensor in ``args``
    or captured by ``fun``, a tensor hyperparameter of ``prox``: see
    ``ProxGradState.differentiable``), the iterates keep their graph and ``state.params`` can
    be back-propagated through the iterations (the line-search and restart decisions are
    constants). Otherwise the loop runs without autograd bookkeeping: one gradient of ``fun``
    per iteration (by ``torch.autograd.grad`` on fresh leaves) and the prox's eager fast path.
    For the derivative of the solution itself, see :func:`proxfunc.argmin` (implicit
    differentiation). The bookkeeping scalars (``value``, ``error``, ...) are detached.
    """

    def __init__(
        self,
        fun: Callable[..., Any],
        prox: Prox | None = None,
        *,
        stepsize: Stepsize = None,
        acceleration: bool = True,
        restart: str | None = "gradient",
        init_stepsize: float = 1.0,
        decrease_factor: float = 0.5,
        increase_factor: float | None = None,
        maxls: int = 30,
        value_and_grad: bool = False,
        quadratic: bool = False,
    ):
        name = "proximal_gradient"
        if not callable(fun):
            raise TypeError(f"{name}: fun must be callable, got {type(fun).__name__}")
        if prox is None:
            prox = identity()
        if not isinstance(prox, Prox):
            raise TypeError(f"{name}: prox must be a proxfunc operator or None, got {type(prox).__name__}")
        if stepsize is not None and not callable(stepsize):
            stepsize = check_hyper(name, "stepsize", stepsize, strict=True)
        if restart not in (None, "gradient", "function"):
            raise ValueError(f"{name}: restart must be None, 'gradient' or 'function', got {restart!r}")
        if not isinstance(acceleration, bool):
            raise TypeError(f"{name}: acceleration must be a bool")
        if not isinstance(value_and_grad, bool):
            raise TypeError(f"{name}: value_and_grad must be a bool")
        if not isinstance(quadratic, bool):
            raise TypeError(f"{name}: quadratic must be a bool")
        check_hyper(name, "init_stepsize", init_stepsize, strict=True)
        if not 0.0 < float(decrease_factor) < 1.0:
            raise ValueError(f"{name}: decrease_factor must be in (0, 1), got {decrease_factor}")
        if increase_factor is None:
            increase_factor = 1.0 if (acceleration and restart is None) else 1.2
        if not float(increase_factor) >= 1.0 or math.isinf(float(increase_factor)):
            raise ValueError(f"{name}: increase_factor must be a finite number >= 1, got {increase_factor}")
        if isinstance(maxls, bool) or not isinstance(maxls, int) or maxls < 1:
            raise ValueError(f"{name}: maxls must be a positive int, got {maxls!r}")
        self.fun = fun
        self.prox = prox
        self.stepsize = stepsize
        self.acceleration = acceleration
        self.restart = restart
        self.init_stepsize = float(init_stepsize)
        self.decrease_factor = float(decrease_factor)
        self.increase_factor = float(increase_factor)
        self.maxls = maxls
        self.value_and_grad = value_and_grad
        self.quadratic = quadratic
        self._compiled: Callable | None = None  # run_compiled's loop, compiled on first use

    def __repr__(self) -> str:
        kind = "FISTA" if self.acceleration else "ISTA"
        step = "line search" if self.stepsize is None else self.stepsize
        return f"ProximalGradient({kind}, prox={self.prox!r}, stepsize={step!r}, restart={self.restart!r})"

    # ------------------------------------------------------------------------- pieces
    def objective(self, params: Any, *args: Any) -> torch.Tensor:
        """``F(params) = fun(params, *args) + prox.value(params)``."""
        return self._value(params, args) + self.prox.value(params)

    def _value(self, params: Any, args: tuple) -> torch.Tensor:
        out = self.fun(params, *args)
        return out[0] if self.value_and_grad else out

    def _value_and_grad(self, y: Any, args: tuple, lean: bool) -> tuple[Any, torch.Tensor]:
        """``(grad fun(y), fun(y))``; ``lean``: by autograd on fresh leaves, nothing kept."""
        if self.value_and_grad:
            f, g = self.fun(y, *args)
            return g, f
        if not lean:
            return grad_and_value(self.fun)(y, *args)
        leaves, spec = _tree.pytree.tree_flatten(y)
        with torch.enable_grad():
            fresh = [x.detach().requires_grad_() for x in leaves]
            f = self.fun(_tree.pytree.tree_unflatten(fresh, spec), *args)
            grads = torch.autograd.grad(f, fresh, allow_unused=True)
        grads = [torch.zeros_like(x) if gi is None else gi for x, gi in zip(fresh, grads)]
        return _tree.pytree.tree_unflatten(grads, spec), f.detach()

    def init(self, params: Any, *args: Any) -> ProxGradState:
        """The state before the first iteration (evaluates ``fun`` once; ISTA: with its gradient)."""
        like = _first_leaf(params, "proximal_gradient")
        vd = acc_dtype(like)
        f0 = self._value(params, args)
        if not isinstance(f0, torch.Tensor) or f0.numel() != 1:
            raise TypeError("proximal_gradient: fun must return a scalar (0-d) tensor")
        differentiable = (
            not _is_compiling()
            and torch.is_grad_enabled()
            and (f0.requires_grad or _requires_grad(params) or _requires_grad(args) or _requires_grad(self.prox))
        )
        f0 = f0.detach().reshape(()).to(vd)
        v0 = f0 + self.prox.value(params).detach().to(vd)
        s0 = self.init_stepsize if self.stepsize is None else self._scheduled(0)
        grad = fy = None
        if not self.acceleration:
            grad, fy = self._value_and_grad(params, args, self._lean(params, differentiable))
            fy = fy.detach().reshape(()).to(vd)
        step = _scalar_like(s0, like, vd)
        return ProxGradState(
            params=params,
            y=params,
            momentum=_scalar_like(1.0, like, vd),
            stepsize=step,
            iteration=_scalar_like(0, like, torch.int64),
            error=_scalar_like(float("inf"), like, vd),
            value=v0,
            smooth=f0,
            bound=_scalar_like(float("inf"), like, vd),
            restarted=_scalar_like(False, like, torch.bool),
            trials=_scalar_like(0, like, torch.int64),
            next_stepsize=step,
            grad=grad,
            fy=fy,
            differentiable=differentiable,
        )

    def _scheduled(self, k: Any) -> Hyper:
        s = self.stepsize
        return s(k) if callable(s) else s  # type: ignore[operator,return-value]

    def _lean(self, y: Any, differentiable: bool) -> bool:
        """Eager and nothing to differentiate: no graph, the fast paths of the prox."""
        if _is_compiling() or (differentiable and torch.is_grad_enabled()):
            return False
        return not traceable(*_leaves(y))

    def _trial(self, y: Any, g: Any, fy: torch.Tensor, gn: torch.Tensor, s: Hyper, args: tuple, lean: bool):
        """One trial step ``s``: the new point, ``fun`` there (ISTA: and its gradient) and the
        line-search verdicts ``ok`` (accepted) and ``grow`` (certified with margin)."""
        x_new = self.prox(_axpy(-s, g, y), s)
        d = _sub(x_new, y)
        g_new = None
        if self.acceleration:
            f_new = self._value(x_new, args)
        else:
            g_new, f_new = self._value_and_grad(x_new, args, lean)
        vd = fy.dtype
        f_new = f_new.detach().reshape(()).to(vd)
        inc = self.increase_factor
        with torch.no_grad():
            dd = _sqnorm(d).to(vd)
            gd = _vdot(g, d).to(vd)
            q = dd / (2 * s)
            lin = f_new - fy - gd
            slack = 16 * torch.finfo(vd).eps * (fy.abs() + f_new.abs())
            ok = lin <= q + slack
            grow = (q >= 4 * slack) & (lin + slack <= q / inc)
            if g_new is not None:
                lin_g = _vdot(g_new, d).to(vd) - gd
                slack_g = 16 * torch.finfo(vd).eps * torch.sqrt(dd) * (gn + torch.sqrt(_sqnorm(g_new).to(vd)))
                ok = ok & (lin_g <= 2 * q + slack_g)
                grow = grow & (lin_g + slack_g <= 2 * q / inc)
            bound = fy + gd + q
        return x_new, d, f_new, g_new, ok, grow & ok, bound, dd

    def _line_search(self, y, g, fy, s0, args, lean):
        dec = self.decrease_factor
        vd = fy.dtype
        gn = torch.sqrt(_sqnorm(g).to(vd)) if not self.acceleration else None
        if not _is_compiling():
            s = float(s0)
            for trial in range(1, self.maxls + 1):
                x_new, d, f_new, g_new, ok, grow, bound, dd = self._trial(y, g, fy, gn, s, args, lean)
                verdict = int(ok) + 2 * int(grow) if trial < self.maxls else 1 + 2 * int(grow)
                if verdict & 1:
                    break
                s *= dec
            s_next = s * self.increase_factor if verdict & 2 else s
            step = s0.new_tensor(s)
            return x_new, d, f_new, g_new, bound, dd, step, step.new_tensor(s_next), trial
        # Traced: a fixed number of masked trials, keeping the first accepted one.
        s = s0
        accepted = torch.zeros((), dtype=torch.bool, device=s0.device)
        trials = torch.zeros((), dtype=torch.int64, device=s0.device)
        best = None
        for trial in range(self.maxls):
            x_new, d, f_new, g_new, ok, grow, bound, dd = self._trial(y, g, fy, gn, s, args, lean)
            if trial == self.maxls - 1:
                ok = torch.ones_like(ok)
            take = ok & ~accepted
            cand = (x_new, d, f_new, g_new, bound, dd, s, torch.where(grow, s * self.increase_factor, s))
            if best is None:
                best = cand
            else:
                best = tuple(
                    None if c is None else (_where(take, c, b) if i in (0, 1, 3) else torch.where(take, c, b))
                    for i, (c, b) in enumerate(zip(cand, best))
                )
            trials = trials + (~accepted).to(torch.int64)
            accepted = accepted | ok
            s = torch.where(accepted, s, s * dec)
        assert best is not None
        return (*best, trials)

    def update(self, state: ProxGradState, *args: Any) -> ProxGradState:
        """One ISTA/FISTA iteration: a pure function of ``state`` (and ``args``)."""
        if self._lean(state.y, state.differentiable):
            with torch.no_grad():
                st, spec = self._to_fast(state)
                return self._from_fast(self._fast_step(st, spec, args), spec)
        return self._update(state, args, False)

    def _update(self, state: ProxGradState, args: tuple, lean: bool) -> ProxGradState:
        y = state.y
        vd = state.value.dtype
        if state.grad is not None:
            g, fy = state.grad, state.fy
        else:
            g, fy = self._value_and_grad(y, args, lean)
            fy = fy.detach().reshape(()).to(vd)
        if self.stepsize is None:
            s0 = state.next_stepsize if state.next_stepsize is not None else state.stepsize
            x_new, d, f_new, g_new, bound, dd, s, s_next, trials = self._line_search(y, g, fy, s0, args, lean)
            if not isinstance(trials, torch.Tensor):
                trials = state.trials.new_tensor(trials)
            s_next = torch.clamp(s_next, max=torch.finfo(vd).max)
        else:
            k = state.iteration if _is_compiling() else int(state.iteration)
            s_cur = self._scheduled(k)
            x_new = self.prox(_axpy(-s_cur, g, y), s_cur)
            d = _sub(x_new, y)
            g_new = None
            if not self.acceleration:
                g_new, f_new = self._value_and_grad(x_new, args, lean)
                f_new = f_new.detach().reshape(()).to(vd)
            elif self.restart == "function":
                f_new = self._value(x_new, args).detach().reshape(()).to(vd)
            else:
                f_new = torch.full_like(fy, _NAN)
            s = _scalar_like(s_cur, state.stepsize) if not isinstance(s_cur, torch.Tensor) else s_cur.to(vd)
            s = s.reshape(())
            with torch.no_grad():
                dd = _sqnorm(d).to(vd)
                bound = fy + _vdot(g, d).to(vd) + dd / (2 * s)
            trials = torch.ones_like(state.trials)
            s_next = s
        with torch.no_grad():
            error = torch.sqrt(dd) / s
        if self.restart == "function" and self.acceleration:
            value = f_new + self.prox.value(x_new).detach().to(vd)
        else:
            value = torch.full_like(fy, _NAN)
        if self.acceleration:
            x_old = state.params
            t = state.momentum
            if self.restart == "gradient":
                restart = _vdot(d, _sub(x_new, x_old)).to(vd) < 0
            elif self.restart == "function":
                restart = value > state.value
            else:
                restart = torch.zeros((), dtype=torch.bool, device=t.device)
            t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
            beta = torch.where(restart, torch.zeros_like(t), (t - 1) / t_next)
            y_next = _map(lambda xn, xo: xn + beta.to(xn.dtype) * (xn - xo), x_new, x_old)
            t_next = torch.where(restart, torch.ones_like(t), t_next)
            g_next = f_next = None
        else:
            restart = torch.zeros((), dtype=torch.bool, device=state.momentum.device)
            y_next, t_next = x_new, state.momentum
            g_next, f_next = g_new, f_new
        return ProxGradState(
            params=x_new,
            y=y_next,
            momentum=t_next,
            stepsize=s.reshape(()).to(vd),
            iteration=state.iteration + 1,
            error=error,
            value=value,
            smooth=f_new,
            bound=bound,
            restarted=restart,
            trials=trials,
            next_stepsize=s_next.reshape(()).to(vd),
            grad=g_next,
            fy=f_next,
            differentiable=state.differentiable,
        )

    # ------------------------------------------------------------ the eager loop (no autograd)
    def _fast_vg(self, y: list, spec, args: tuple) -> tuple[list, torch.Tensor]:
        if self.value_and_grad:
            f, g = self.fun(_unflat(y, spec), *args)
            return _tree.tree_leaves(g), f
        with torch.enable_grad():
            fresh = [x.detach().requires_grad_() for x in y]
            f = self.fun(_unflat(fresh, spec), *args)
            grads = torch.autograd.grad(f, fresh, allow_unused=True)
        return [torch.zeros_like(x) if gi is None else gi for x, gi in zip(y, grads)], f.detach()

    def _fast_prox(self, y: list, g: list, s: float, spec) -> list:
        z = [torch.add(yi, gi, alpha=-s) for yi, gi in zip(y, g)]
        return _tree.tree_leaves(self.prox(_unflat(z, spec), s))

    def _fast_step(self, st: _Fast, spec, args: tuple) -> _Fast:
        """One iteration on flat leaves with Python-float bookkeeping (one host read per trial,
        every scalar test in Python): the same iteration as :meth:`update`."""
        vd = st.vd
        y, x_old = st.y, st.x
        if st.g is not None:
            g, fy = st.g, st.fy
        else:
            g, fv = self._fast_vg(y, spec, args)
            fy = float(fv)
        accel, inc = self.acceleration, self.increase_factor
        quad = accel and self.quadratic
        gx = (st.gx if st.gx is not None else g) if quad else None  # grad fun(x_k)
        eps = _EPS[vd]
        search = self.stepsize is None
        with_grad = not accel or quad  # the trial evaluates grad fun(x+): the next gradient
        gn = math.sqrt(float(_ldot(g, g, vd))) if with_grad and search else 0.0
        s = st.s_next if search else float(self._scheduled(st.k))
        trials, grow = 0, False
        g_new = diff = None
        while True:
            trials += 1
            x_new = self._fast_prox(y, g, s, spec)
            d = [a - b for a, b in zip(x_new, y)]
            names, parts = ["dd", "gd"], [_ldot(d, d, vd), _ldot(g, d, vd)]
            if accel:
                diff = [a - b for a, b in zip(x_new, x_old)]
                names.append("rd")
                parts.append(_ldot(d, diff, vd))
            if with_grad:
                g_new, f_t = self._fast_vg(x_new, spec, args)
                names += ["f", "g_new.d", "g_new.g_new"]
                parts += [f_t.reshape(()).to(vd), _ldot(g_new, d, vd), _ldot(g_new, g_new, vd)]
                if quad:
                    names += ["g_new.diff", "gx.diff"]
                    parts += [_ldot(g_new, diff, vd), _ldot(gx, diff, vd)]
            elif search or self.restart == "function":
                names.append("f")
                parts.append(self._value(_unflat(x_new, spec), args).detach().reshape(()).to(vd))
            v = dict(zip(names, torch.stack(parts).tolist()))
            dd, gd = v["dd"], v["gd"]
            f_new = v.get("f", _NAN)
            q = dd / (2 * s)
            bound = fy + gd + q if f_new == f_new else _NAN
            if not search:
                break
            lin = f_new - fy - gd
            slack = 16 * eps * (abs(fy) + abs(f_new))
            ok = lin <= q + slack
            grow = q >= 4 * slack and lin + slack <= q / inc
            if with_grad:
                lin_g = v["g_new.d"] - gd
                slack_g = 16 * eps * math.sqrt(dd) * (gn + math.sqrt(v["g_new.g_new"]))
                ok = ok and lin_g <= 2 * q + slack_g
                grow = grow and lin_g + slack_g <= 2 * q / inc
            if ok or trials == self.maxls:
                grow = grow and ok
                break
            s *= self.decrease_factor
        s_next = min(s * inc, _MAX[vd]) if grow else s
        error = math.sqrt(dd) / s
        value = _NAN
        t, restarted = st.t, False
        gx_next = None
        if accel:
            if self.restart == "function":
                value = f_new + float(self.prox.value(_unflat(x_new, spec)))
                restarted = value > st.value
            elif self.restart == "gradient":
                restarted = v["rd"] < 0
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            beta = 0.0 if restarted else (t - 1) / t_next
            if restarted:
                t_next = 1.0
            y_next = [torch.add(xn, df, alpha=beta) for xn, df in zip(x_new, diff)] if beta else x_new
            g_next = fy_next = None
            if quad:  # fun quadratic: its gradient and value at y_{k+1} from those at x_{k+1}, x_k
                gx_next = g_new
                if beta:
                    g_next = [torch.add(a, torch.sub(a, b), alpha=beta) for a, b in zip(g_new, gx)]
                    curv = v["g_new.diff"] - v["gx.diff"]  # <H diff, diff>
                    fy_next = f_new + beta * v["g_new.diff"] + 0.5 * beta * beta * curv
                else:
                    g_next, fy_next = g_new, f_new
        else:
            y_next, t_next = x_new, t
            g_next, fy_next = g_new, f_new
        return _Fast(
            x=x_new,
            y=y_next,
            g=g_next,
            fy=fy_next,
            gx=gx_next,
            t=t_next,
            s=s,
            s_next=s_next,
            k=st.k + 1,
            error=error,
            value=value,
            smooth=f_new,
            bound=bound,
            restarted=restarted,
            trials=trials,
            vd=vd,
            differentiable=st.differentiable,
        )

    def _to_fast(self, state: ProxGradState) -> tuple[_Fast, Any]:
        y, spec = _tree.pytree.tree_flatten(state.y)
        nums = torch.stack(
            [
                state.momentum,
                state.stepsize,
                state.next_stepsize if state.next_stepsize is not None else state.stepsize,
                state.error,
                state.value,
                state.smooth,
                state.bound,
                state.fy if state.fy is not None else state.value,
            ]
        ).tolist()
        st = _Fast(
            x=_tree.tree_leaves(state.params),
            y=y,
            g=None if state.grad is None else _tree.tree_leaves(state.grad),
            fy=nums[7] if state.fy is not None else None,
            gx=None if state.grad_params is None else _tree.tree_leaves(state.grad_params),
            t=nums[0],
            s=nums[1],
            s_next=nums[2],
            k=int(state.iteration),
            error=nums[3],
            value=nums[4],
            smooth=nums[5],
            bound=nums[6],
            restarted=bool(state.restarted),
            trials=int(state.trials),
            vd=state.value.dtype,
            differentiable=state.differentiable,
        )
        return st, spec

    def _from_fast(self, st: _Fast, spec) -> ProxGradState:
        like = st.x[0]
        vd = st.vd

        def num(v, dtype=vd):
            return torch.tensor(v, dtype=dtype, device=like.device)

        return ProxGradState(
            params=_unflat(st.x, spec),
            y=_unflat(st.y, spec),
            momentum=num(st.t),
            stepsize=num(st.s),
            iteration=num(st.k, torch.int64),
            error=num(st.error),
            value=num(st.value),
            smooth=num(st.smooth),
            bound=num(st.bound),
            restarted=num(st.restarted, torch.bool),
            trials=num(st.trials, torch.int64),
            next_stepsize=num(st.s_next),
            grad=None if st.g is None else _unflat(st.g, spec),
            fy=None if st.fy is None else num(st.fy),
            differentiable=st.differentiable,
            grad_params=None if st.gx is None else _unflat(st.gx, spec),
        )

    def run(self, params: Any, *args: Any, maxiter: int = 500, tol: float = 1e-6, history: bool = False):
        """Iterate from ``params`` until ``error < tol`` or ``maxiter``; return a :class:`ProxGradResult`."""
        if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
            raise ValueError(f"proximal_gradient: maxiter must be a non-negative int, got {maxiter!r}")
        tol = float(check_hyper("proximal_gradient", "tol", tol))
        params = _map(torch.Tensor.detach, params)  # the start is a constant
        state = self.init(params, *args)
        hist: dict[str, list] | None = None
        if history:
            hist = {k: [] for k in ("value", "smooth", "bound", "error", "stepsize", "restarted", "trials")}
        if self._lean(state.y, state.differentiable):
            with torch.no_grad():
                st, spec = self._to_fast(state)
                for _ in range(maxiter):
                    st = self._fast_step(st, spec, args)
                    if hist is not None:
                        v = st.value
                        if v != v:
                            f = st.smooth if st.smooth == st.smooth else float(self._value(_unflat(st.x, spec), args))
                            v = f + float(self.prox.value(_unflat(st.x, spec)))
                        hist["value"].append(v)
                        hist["smooth"].append(st.smooth)
                        hist["bound"].append(st.bound)
                        hist["error"].append(st.error)
                        hist["stepsize"].append(st.s)
                        hist["restarted"].append(st.restarted)
                        hist["trials"].append(st.trials)
                    if st.error < tol:
                        break
                state = self._from_fast(st, spec)
        else:
            for _ in range(maxiter):
                state = self.update(state, *args)
                if hist is not None:
                    hist["value"].append(self._final_value(state, args))
                    hist["smooth"].append(float(state.smooth))
                    hist["bound"].append(float(state.bound))
                    hist["error"].append(float(state.error))
                    hist["stepsize"].append(float(state.stepsize))
                    hist["restarted"].append(bool(state.restarted))
                    hist["trials"].append(int(state.trials))
                if float(state.error) < tol:
                    break
        err = float(state.error)
        return ProxGradResult(
            params=state.params,
            iterations=int(state.iteration),
            error=err,
            value=self._final_value(state, args),
            converged=err < tol,
            stepsize=float(state.stepsize),
            state=state,
            history=hist,
        )

    def run_compiled(
        self, params: Any, *args: Any, maxiter: int = 500, tol: float = 1e-6, backend: str = "inductor"
    ) -> ProxGradResult:
        """:meth:`run` as one compiled graph: the whole loop is a ``while_loop`` (torch's
        higher-order op, the analogue of JAX's ``lax.while_loop``) under
        ``torch.compile(fullgraph=True)``, so an iteration costs its kernels and no Python.

        The first call compiles (seconds); later calls with the same solver, the same shapes
        and dtypes reuse the compiled loop, so it pays off for many solves of small problems.
        ``maxiter`` and ``tol`` are tensors in the graph (changing them does not recompile). The
        line search is spread over the loop's iterations: one trial each, a rejected trial keeps
        the point and shrinks the step (``state.iteration`` counts accepted trials,
        ``state.trials`` all, at most ``maxiter * maxls``); a schedule is refused.
        Nothing is differentiated (see :func:`proxfunc.argmin` for derivatives of the solution).
        ``backend`` is ``torch.compile``'s (the first call's choice is kept by this solver).
        """
        name = "proximal_gradient"
        if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
            raise ValueError(f"{name}: maxiter must be a non-negative int, got {maxiter!r}")
        tol = float(check_hyper(name, "tol", tol))
        if callable(self.stepsize):
            raise ValueError(f"{name}: run_compiled takes a fixed stepsize or the line search, not a schedule")
        try:
            from torch._higher_order_ops.while_loop import while_loop
        except ImportError as e:  # pragma: no cover - torch < 2.4
            raise RuntimeError(f"{name}: run_compiled needs torch's while_loop (torch >= 2.4)") from e
        with torch.no_grad():
            params = _map(torch.Tensor.detach, params)
            like = _first_leaf(params, name)
            compiled = self._compiled
            if compiled is None:  # one compiled loop per solver (torch.compile caches by shapes)
                compiled = torch.compile(self._loop, fullgraph=True, backend=backend, dynamic=False)
                self._compiled = compiled
            limits = (_scalar_like(maxiter, like, torch.int64), _scalar_like(tol, like, acc_dtype(like)))
            state = compiled(params, args, limits, while_loop)
        return ProxGradResult(
            params=state.params,
            iterations=int(state.iteration),
            error=float(state.error),
            value=self._final_value(state, args),
            converged=float(state.error) < tol,
            stepsize=float(state.stepsize),
            state=state,
        )

    def _loop(self, params: Any, args: tuple, limits: tuple, while_loop: Callable) -> ProxGradState:
        """The traced body of :meth:`run_compiled`."""
        maxiter, tol = limits
        state = self.init(params, *args)._replace(differentiable=False)
        search = self.stepsize is None
        if search and state.grad is None:  # the spread line search carries grad fun(y) (FISTA too)
            g0, f0 = self._value_and_grad(state.y, args, False)
            state = state._replace(grad=g0, fy=f0.detach().reshape(()).to(state.value.dtype))
        leaves, spec = _tree.pytree.tree_flatten(state)
        slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

        def rebuild(carry):
            full = list(leaves)
            for i, v in zip(slots, carry):
                full[i] = v
            return _tree.pytree.tree_unflatten(full, spec)

        def cond(*carry):
            st = rebuild(carry)
            going = (st.iteration < maxiter) & ~(st.error < tol)
            return going & (st.trials < maxiter * self.maxls) if search else going

        def body(*carry):
            st = rebuild(carry)
            new = self._spread_update(st, args) if search else self._update(st, args, False)
            out = _tree.pytree.tree_leaves(new)
            return tuple(out[i].clone() for i in slots)  # while_loop refuses outputs aliasing others

        carry = tuple(leaves[i].clone() for i in slots)
        return rebuild(while_loop(cond, body, carry))

    def _spread_update(self, st: ProxGradState, args: tuple) -> ProxGradState:
        """The compiled loop's line search, spread over iterations: one trial each; a rejected
        trial keeps the point and halves the step (``decrease_factor``), an accepted one is the
        usual update. ``iteration`` counts accepted trials, ``trials`` all of them."""
        vd = st.value.dtype
        y, g, fy, s = st.y, st.grad, st.fy, st.next_stepsize
        gn = torch.sqrt(_sqnorm(g).to(vd)) if not self.acceleration else None
        x_new, d, f_new, g_new, ok, grow, bound, dd = self._trial(y, g, fy, gn, s, args, False)
        error = torch.sqrt(dd) / s
        if self.acceleration:
            t = st.momentum
            if self.restart == "gradient":
                restart = _vdot(d, _sub(x_new, st.params)).to(vd) < 0
            elif self.restart == "function":
                value = f_new + self.prox.value(x_new).detach().to(vd)
                restart = value > st.value
            else:
                restart = torch.zeros((), dtype=torch.bool, device=t.device)
            t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
            beta = torch.where(restart, torch.zeros_like(t), (t - 1) / t_next)
            y_next = _map(lambda xn, xo: xn + beta.to(xn.dtype) * (xn - xo), x_new, st.params)
            t_next = torch.where(restart, torch.ones_like(t), t_next)
            g_next, f_next = self._value_and_grad(y_next, args, False)
            f_next = f_next.detach().reshape(()).to(vd)
        else:
            restart = torch.zeros((), dtype=torch.bool, device=st.momentum.device)
            y_next, t_next, g_next, f_next = x_new, st.momentum, g_new, f_new
        if not (self.acceleration and self.restart == "function"):
            value = torch.full_like(st.value, _NAN)
        s_next = torch.where(grow, torch.clamp(s * self.increase_factor, max=torch.finfo(vd).max), s)
        return ProxGradState(
            params=_where(ok, x_new, st.params),
            y=_where(ok, y_next, st.y),
            momentum=torch.where(ok, t_next, st.momentum),
            stepsize=torch.where(ok, s, st.stepsize),
            iteration=st.iteration + ok.to(torch.int64),
            error=torch.where(ok, error, st.error),
            value=torch.where(ok, value, st.value),
            smooth=torch.where(ok, f_new, st.smooth),
            bound=torch.where(ok, bound, st.bound),
            restarted=torch.where(ok, restart, st.restarted),
            trials=st.trials + 1,
            next_stepsize=torch.where(ok, s_next, s * self.decrease_factor),
            grad=_where(ok, g_next, g),
            fy=torch.where(ok, f_next, fy),
            differentiable=False,
        )

    def _final_value(self, state: ProxGradState, args: tuple) -> float:
        v = float(state.value)
        if v == v:
            return v
        with torch.no_grad():
            f = float(state.smooth)
            if f != f:
                f = float(self._value(state.params, args))
            return f + float(self.prox.value(state.params))


def proximal_gradient(
    fun: Callable[..., torch.Tensor],
    params: Any,
    prox: Prox | None = None,
    *,
    args: tuple = (),
    stepsize: Stepsize = None,
    acceleration: bool = True,
    restart: str | None = "gradient",
    maxiter: int = 500,
    tol: float = 1e-6,
    history: bool = False,
    **options: Any,
) -> ProxGradResult:
    """Minimise ``fun(params, *args) + prox.value(params)`` by proximal gradient (FISTA by default).

    ``fun`` is smooth and written functionally (its gradient comes from
    :func:`torch.func.grad_and_value`); ``params`` is the starting point, a tensor or any pytree
    of tensors (not modified); ``prox`` is a proxfunc operator (``None`` for ``g = 0``).

    Stops when the gradient-mapping norm ``||y - prox(y - t grad fun(y), t)|| / t < tol`` (``y``
    the point where the gradient was taken; ``y = x_k`` for ISTA) or after ``maxiter``
    iterations. ``stepsize=None`` is backtracking line search (sufficient decrease on the
    smooth part, and for ISTA a Lipschitz test on the gradient; the step grows again only when
    the tests certify the larger step beyond rounding); a float is a fixed step; a callable
    ``k -> step`` a schedule. ``acceleration=False`` gives ISTA. ``restart``, the line-search
    ``options`` (``init_stepsize``, ``decrease_factor``, ``increase_factor``, ``maxls``) and
    ``value_and_grad`` (``fun`` returns ``(value, grad)``: no autograd) are those of
    :class:`ProximalGradient`.

    Returns a :class:`ProxGradResult` with ``.params``, ``.iterations``, ``.error``, ``.value``
    (and ``.history`` when ``history=True``).

    Example (the lasso ``||X w - y||^2 / (2n) + alpha ||w||_1``)::

        fun = lambda w: 0.5 * ((X @ w - y) ** 2).mean()
        res = pf.proximal_gradient(fun, torch.zeros(X.shape[1]), pf.l1(alpha), tol=1e-8)
        res.params, res.iterations, res.value

    Beck & Teboulle (2009); O'Donoghue & Candes (2015) for the restarts.
    """
    solver = ProximalGradient(fun, prox, stepsize=stepsize, acceleration=acceleration, restart=restart, **options)
    if not isinstance(args, tuple):
        raise TypeError(f"proximal_gradient: args must be a tuple, got {type(args).__name__}")
    return solver.run(params, *args, maxiter=maxiter, tol=tol, history=history)


# ------------------------------------------------------------------- training-loop optimizers
class ProxSGDState(NamedTuple):
    """State of :class:`prox_sgd`: the momentum buffer (a pytree, or ``None``) and the step count."""

    momentum: Any
    count: torch.Tensor


class ProxAdamState(NamedTuple):
    """State of :class:`prox_adam`: first and second moment pytrees and the step count."""

    mu: Any
    nu: Any
    count: torch.Tensor


def _lr(owner: str, lr: Any) -> Hyper:
    if callable(lr):
        raise TypeError(f"{owner}: lr must be a float or a 0-d tensor (evaluate your schedule first)")
    return check_hyper(owner, "lr", lr, strict=True)


class prox_sgd:  # noqa: N801
    """Proximal SGD for ``torch.func`` loops: ``x <- prox(x - lr * d, lr)``.

    ``d`` is the gradient (plus ``weight_decay * x``), or with ``momentum`` the heavy-ball
    buffer ``b <- momentum * b + d`` (``d + momentum * b`` with ``nesterov``), exactly as
    ``torch.optim.SGD`` computes its update. The prox is then taken with ``step = lr``: one
    iteration of the proximal gradient method on ``loss + g`` (Parikh & Boyd 2014, 4.2).

    Pure and functional, so it can sit inside a ``torch.compile``-d train step::

        opt = pf.prox_sgd(pf.partition({...}), lr=0.1, momentum=0.9)
        state = opt.init(params)

        @torch.compile
        def train_step(params, state, x, y, lr):
            g = torch.func.grad(loss_fn)(params, x, y)
            return opt.step(params, g, state, lr=lr)

    ``lr`` given to :meth:`step` overrides the default (pass a 0-d tensor under
    ``torch.compile`` so that a changing schedule does not recompile).
    """

    def __init__(
        self,
        prox: Prox | None = None,
        lr: Hyper = 0.1,
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        if prox is not None and not isinstance(prox, Prox):
            raise TypeError(f"prox_sgd: prox must be a proxfunc operator or None, got {type(prox).__name__}")
        self.prox = identity() if prox is None else prox
        self.lr = _lr("prox_sgd", lr)
        self.momentum = float(check_hyper("prox_sgd", "momentum", momentum))
        self.weight_decay = float(check_hyper("prox_sgd", "weight_decay", weight_decay))
        if nesterov and self.momentum == 0:
            raise ValueError("prox_sgd: nesterov needs momentum > 0")
        self.nesterov = bool(nesterov)

    def init(self, params: Any) -> ProxSGDState:
        like = _first_leaf(params, "prox_sgd")
        buf = _map(torch.zeros_like, params) if self.momentum else None
        return ProxSGDState(buf, _scalar_like(0, like, torch.int64))

    def step(self, params: Any, grads: Any, state: ProxSGDState, lr: Hyper | None = None) -> tuple[Any, ProxSGDState]:
        """One step: ``(new_params, new_state)``; nothing is modified in place."""
        lr = self.lr if lr is None else _lr("prox_sgd", lr)
        d = grads
        if self.weight_decay:
            d = _axpy(self.weight_decay, params, d)
        buf = state.momentum
        if self.momentum:
            first = state.count == 0
            # torch.optim.SGD initialises the buffer with the first gradient
            buf = _map(lambda b, di: torch.where(first, di, self.momentum * b + di), buf, d)
            d = _axpy(self.momentum, buf, d) if self.nesterov else buf
        new = self.prox(_axpy(-lr, d, params), lr)
        return new, ProxSGDState(buf, state.count + 1)


class prox_adam:  # noqa: N801
    """Proximal Adam for ``torch.func`` loops: an Adam(W) update, then the prox.

    The moments and the update ``u = m_hat / (sqrt(v_hat) + eps)`` are those of
    ``torch.optim.Adam`` (``decoupled_weight_decay=True``: AdamW). Then

        x <- prox(x - lr * u, step)

    with the **prox step** chosen by ``prox_step``:

    * ``"lr"`` (default): ``step = lr``, what :class:`proxfunc.compat.ProxOptimizer` does
      around ``torch.optim.Adam``. Adam's update has magnitude about ``lr`` per entry
      whatever the scale of the loss, so ``reg`` is measured against that normalised update:
      it does not change if the loss is multiplied by a constant.
    * ``"scaled"``: ``step = lr / mean(sqrt(v_hat) + eps)`` over all entries, the step of the
      metric ``diag(sqrt(v_hat) + eps) / lr`` that Adam uses, averaged to one number (an
      operator's step is a scalar). ``reg`` is then in the units of the loss, as for
      :func:`proximal_gradient` and SGD: multiplying the loss and ``reg`` by the same
      constant gives the same iterates. When the preconditioner is uniform this is the exact
      prox in Adam's metric, so the fixed points are stationary points of ``loss + g``.

    Pure and functional (usable inside ``torch.compile``); see :class:`prox_sgd` for the loop.
    """

    def __init__(
        self,
        prox: Prox | None = None,
        lr: Hyper = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        prox_step: str = "lr",
    ):
        if prox is not None and not isinstance(prox, Prox):
            raise TypeError(f"prox_adam: prox must be a proxfunc operator or None, got {type(prox).__name__}")
        self.prox = identity() if prox is None else prox
        self.lr = _lr("prox_adam", lr)
        b1, b2 = betas
        for name, b in (("betas[0]", b1), ("betas[1]", b2)):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"prox_adam: {name} must be in [0, 1), got {b}")
        self.betas = (float(b1), float(b2))
        self.eps = float(check_hyper("prox_adam", "eps", eps))
        self.weight_decay = float(check_hyper("prox_adam", "weight_decay", weight_decay))
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        if prox_step not in ("lr", "scaled"):
            raise ValueError(f"prox_adam: prox_step must be 'lr' or 'scaled', got {prox_step!r}")
        self.prox_step = prox_step

    def init(self, params: Any) -> ProxAdamState:
        like = _first_leaf(params, "prox_adam")
        return ProxAdamState(
            _map(torch.zeros_like, params), _map(torch.zeros_like, params), _scalar_like(0, like, torch.int64)
        )

    def step(self, params: Any, grads: Any, state: ProxAdamState, lr: Hyper | None = None) -> tuple[Any, ProxAdamState]:
        """One step: ``(new_params, new_state)``; nothing is modified in place."""
        lr = self.lr if lr is None else _lr("prox_adam", lr)
        b1, b2 = self.betas
        count = state.count + 1
        if self.weight_decay and self.decoupled_weight_decay:
            params = _map(lambda x: x * (1 - lr * self.weight_decay), params)
        elif self.weight_decay:
            grads = _axpy(self.weight_decay, params, grads)
        mu = _map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = _map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        cf = count.to(torch.float64)
        c1 = 1 - torch.pow(torch.full_like(cf, b1), cf)
        c2 = 1 - torch.pow(torch.full_like(cf, b2), cf)
        denom = _map(lambda v: torch.sqrt(v / c2.to(v.dtype)) + self.eps, nu)
        upd = _map(lambda m, dn: (m / c1.to(m.dtype)) / dn, mu, denom)
        moved = _axpy(-lr, upd, params)
        if self.prox_step == "lr":
            step = lr
        else:
            dl = _leaves(denom)
            total = sum(x.sum().to(torch.float64) for x in dl)
            n = sum(x.numel() for x in dl)
            step = (lr / (total / n)).to(dl[0].dtype if dl[0].dtype == torch.float64 else torch.float32)
        new = self.prox(moved, step)
        return new, ProxAdamState(mu, nu, count)
