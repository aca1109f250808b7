"""L-BFGS with a fixed step, in the compact matrix form: torch's algorithm, less overhead.

DLG optimises a few thousand numbers (a 32x32 RGB image and a soft label) with
``torch.optim.LBFGS(lr=1, history_size=100)`` and no line search. On problems this small
torch's implementation spends as long on bookkeeping as on the model: its two-loop
recursion issues about 400 tiny tensor operations per iteration for a full history
(measured: about 2 ms per function evaluation on top of LeNet's 2.6 ms, on the 2-core
CPU).

:class:`CompactLBFGS` follows ``torch.optim.LBFGS.step`` line by line (the same step
rule, memory update, scaling ``gamma = s'y / y'y`` and stopping tests) but computes the
direction ``-H g`` from the compact representation of Byrd, Nocedal and Schnabel
("Representations of quasi-Newton matrices and their use in limited memory methods",
Math. Programming 63, 1994, eq. 3.1)::

    H g = gamma g + S u - gamma Y w,   w = R^-1 S'g,   u = R^-T ((D + gamma Y'Y) w - gamma Y'g)

where ``S`` and ``Y`` hold the last ``m`` steps and gradient changes, ``R`` is the upper
triangle of ``S'Y`` and ``D`` its diagonal. That is a handful of matrix-vector products
and two ``m x m`` triangular solves per iteration, whatever ``m``. In exact arithmetic
it equals the two-loop recursion (the tests compare the iterates with torch's).

It is not a ``torch.optim.Optimizer``: it keeps no per-parameter state and supports no
line search (use ``torch.optim.LBFGS`` for ``strong_wolfe``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence

import torch

CURVATURE_MIN = 1e-10
"""A pair (s, y) enters the memory only when ``y's`` exceeds this (torch's rule)."""

ARMIJO_C = 1e-4
"""Sufficient decrease of the backtracking: ``f(x + t d) <= f(x) + c t g'd``."""

SHRINK_MIN, SHRINK_MAX = 0.1, 0.5
"""A backtracking step shrinks to between these fractions of the previous one."""


class CompactLBFGS:
    """Fixed-step L-BFGS over a few leaf tensors (see the module docstring).

    Args:
        params: the tensors to optimise (leaves with ``requires_grad``).
        lr: the step length (torch's default 1).
        max_iter: iterations per :meth:`step` (torch's default 20).
        max_eval: function evaluations per :meth:`step` (default ``max_iter * 5 // 4``).
        tolerance_grad: stop when the largest gradient entry is at most this.
        tolerance_change: stop when the step, or the change in loss, is below this.
        history_size: the number ``m`` of stored pairs (torch's default 100).
        backtrack: shrink a step that does not decrease the loss enough (Armijo
            backtracking) instead of taking it regardless; the step is then evaluated
            on every iteration, the last one included, and that evaluation starts the
            next :meth:`step`. Off, the iterates are torch's.
        max_backtracks: at most this many shorter steps per iteration.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        lr: float = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        backtrack: bool = False,
        max_backtracks: int = 10,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("CompactLBFGS needs at least one tensor to optimise")
        self.lr = float(lr)
        self.max_iter = int(max_iter)
        self.max_eval = int(max_eval) if max_eval is not None else self.max_iter * 5 // 4
        self.tolerance_grad = tolerance_grad
        self.tolerance_change = tolerance_change
        self.m = int(history_size)
        p0 = self.params[0]
        n = sum(p.numel() for p in self.params)
        # Ring buffers of the last m steps s_i and gradient changes y_i, one row each.
        self._S = torch.zeros((self.m, n), dtype=p0.dtype, device=p0.device)
        self._Y = torch.zeros((self.m, n), dtype=p0.dtype, device=p0.device)
        self._order: list[int] = []  # ring rows, oldest first
        self._idx = torch.zeros(0, dtype=torch.long, device=p0.device)  # _order as a tensor
        # S'Y and Y'Y in chronological order, in float64 (the triangular solves need it).
        self._sty = torch.zeros((0, 0), dtype=torch.float64, device=p0.device)
        self._yty = torch.zeros((0, 0), dtype=torch.float64, device=p0.device)
        self._gamma = 1.0
        self._n_iter = 0
        self._d: torch.Tensor | None = None
        self._t = self.lr
        self._prev_grad: torch.Tensor | None = None
        self.func_evals = 0
        self.backtrack = bool(backtrack)
        self.max_backtracks = int(max_backtracks)
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- flat views ---------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Forget the parameters' gradients (as ``Optimizer.zero_grad``)."""
        for p in self.params:
            p.grad = None

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params]
        )

    def _add(self, t: float, d: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            k = p.numel()
            p.add_(d[offset : offset + k].view_as(p), alpha=t)
            offset += k

    # -- memory -------------------------------------------------------------------------

    def _remember(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Store the pair (s, y), dropping the oldest when the memory is full."""
        if len(self._order) == self.m:
            row = self._order.pop(0)
            self._sty = self._sty[1:, 1:]
            self._yty = self._yty[1:, 1:]
        else:
            row = len(self._order)
        self._S[row] = s
        self._Y[row] = y
        self._order.append(row)
        self._idx = idx = torch.tensor(self._order, device=s.device)
        s_y = (self._Y @ s)[idx].double()  # s' y_j for every stored j (chronological)
        y_s = (self._S @ y)[idx].double()  # s_i' y
        y_y = (self._Y @ y)[idx].double()  # y_i' y
        k = len(self._order)
        sty = torch.zeros((k, k), dtype=torch.float64, device=s.device)
        yty = torch.zeros_like(sty)
        sty[: k - 1, : k - 1] = self._sty
        yty[: k - 1, : k - 1] = self._yty
        sty[k - 1, :] = s_y
        sty[:, k - 1] = y_s
        yty[k - 1, :] = y_y
        yty[:, k - 1] = y_y
        self._sty, self._yty = sty, yty

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """``-H g`` for the current memory (``-gamma g`` when it is empty)."""
        if not self._order:
            return g.neg().mul_(self._gamma)
        idx = self._idx
        gamma = self._gamma
        a = (self._S @ g)[idx].double()  # S'g
        b = (self._Y @ g)[idx].double()  # Y'g
        r = torch.triu(self._sty)  # R: s_i' y_j for i <= j
        w = torch.linalg.solve_triangular(r, a.unsqueeze(1), upper=True).squeeze(1)
        rhs = torch.diagonal(self._sty) * w + gamma * (self._yty @ w) - gamma * b
        u = torch.linalg.solve_triangular(r.T, rhs.unsqueeze(1), upper=False).squeeze(1)
        # Scatter the chronological coefficients back to the ring rows.
        u_ring = torch.zeros(self.m, dtype=torch.float64, device=g.device).index_copy_(0, idx, u)
        w_ring = torch.zeros_like(u_ring).index_copy_(0, idx, w)
        coef_s = u_ring.to(g.dtype)
        coef_y = (-gamma * w_ring).to(g.dtype)
        hg = g * gamma + coef_s @ self._S + coef_y @ self._Y
        return hg.neg_()

    # -- the step -----------------------------------------------------------------------

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run up to ``max_iter`` iterations; return the loss at the starting point.

        ``closure`` zeroes the gradients, computes the loss, sets the parameters'
        gradients (``backward``) and returns the loss (as for ``torch.optim.LBFGS``).
        """
        steps = self.iter_step(closure)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def iter_step(self, closure: Callable[[], torch.Tensor]) -> Generator[None, None, torch.Tensor]:
        """:meth:`step` as a generator that yields after every function evaluation.

        A caller can report progress, or stop, between evaluations (one step of a
        batch of 8 on LeNet is about 25 evaluations, half a second); the iterates are
        :meth:`step`'s. Its return value (``StopIteration.value``) is :meth:`step`'s.
        """
        return self._iter_step(closure)

    @torch.no_grad()  # as a generator decorator torch restores the caller's mode at every yield
    def _iter_step(self, closure: Callable[[], torch.Tensor]) -> Generator[None, None, torch.Tensor]:
        if self._cached is not None:  # evaluated at the end of the previous step
            orig_loss, g = self._cached
            self._cached = None
            current_evals = 0
        else:
            orig_loss, g = self._evaluate(closure)
            yield
            current_evals = 1
        loss = float(orig_loss)
        if g.abs().max() <= self.tolerance_grad:
            return orig_loss
        n_iter = 0
        while n_iter < self.max_iter:
            n_iter += 1
            self._n_iter += 1
            d = self._next_direction(g)
            self._prev_grad = g.clone() if self._prev_grad is None else self._prev_grad.copy_(g)
            prev_loss = loss
            t = min(1.0, 1.0 / float(g.abs().sum())) * self.lr if self._n_iter == 1 else self.lr
            gtd = float(g.dot(d))
            self._d, self._t = d, t
            if gtd > -self.tolerance_change:
                break
            self._add(t, d)
            opt_cond = False
            if n_iter != self.max_iter or self.backtrack:
                new_loss, g = self._evaluate(closure)
                yield
                current_evals += 1
                loss = float(new_loss)
                if self.backtrack:
                    loss, g, t, evals = yield from self._backtrack(closure, prev_loss, gtd, t, d, loss, g)
                    current_evals += evals
                    self._t = t
                    if n_iter == self.max_iter:  # the next step starts here
                        self._cached = (torch.tensor(loss, dtype=torch.float64), g)
                opt_cond = bool(g.abs().max() <= self.tolerance_grad)
            if n_iter == self.max_iter or current_evals >= self.max_eval or opt_cond:
                break
            if float(d.abs().max()) * t <= self.tolerance_change:
                break
            if abs(loss - prev_loss) < self.tolerance_change:
                break
        return orig_loss

    def _next_direction(self, g: torch.Tensor) -> torch.Tensor:
        """Update the memory with the last step's pair, then the new direction ``-H g``."""
        if self._n_iter == 1:
            return g.neg()
        assert self._prev_grad is not None and self._d is not None
        y = g - self._prev_grad
        s = self._d * self._t
        ys = float(y.dot(s))
        if ys > CURVATURE_MIN:  # skip pairs that would break positive definiteness (as torch)
            self._remember(s, y)
            self._gamma = ys / float(y.dot(y))
        return self._direction(g)

    def _evaluate(self, closure: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            loss = closure().detach()
        self.func_evals += 1
        return loss, self._flat_grad()

    def _backtrack(
        self,
        closure: Callable[[], torch.Tensor],
        f0: float,
        gtd: float,
        t: float,
        d: torch.Tensor,
        f: float,
        g: torch.Tensor,
    ) -> Generator[None, None, tuple[float, torch.Tensor, float, int]]:
        """Shrink the step until it decreases the loss enough (Armijo, c = 1e-4).

        The parameters sit at ``x0 + t d`` with loss ``f``; returns the accepted loss,
        gradient, step and the evaluations spent. A quadratic fit through ``f0``, the
        slope ``gtd`` and ``f`` proposes each shorter step, kept within [0.1 t, 0.5 t].
        """
        evals = 0
        while not (f <= f0 + ARMIJO_C * t * gtd) and evals < self.max_backtracks:
            denom = 2.0 * (f - f0 - gtd * t)
            proposal = -gtd * t * t / denom if math.isfinite(f) and denom > 0 else 0.5 * t
            t_new = min(max(proposal, SHRINK_MIN * t), SHRINK_MAX * t)
            self._add(t_new - t, d)
            t = t_new
            new_loss, g = self._evaluate(closure)
            yield
            f = float(new_loss)
            evals += 1
        return f, g, t, evals
