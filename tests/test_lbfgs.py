"""CompactLBFGS: torch's fixed-step L-BFGS iterates, and a backtracking safeguard."""

from __future__ import annotations

import pytest
import torch

from dlg.lbfgs import CompactLBFGS


def _problem(seed: int = 0, n: int = 40):
    """A smooth non-quadratic objective over two tensors (quadratic + quartic + Rosenbrock)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn((n, n), generator=gen, dtype=torch.float64)
    a = a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)

    def loss(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        rosen = ((1 - z[:-1]) ** 2).sum() + 10 * ((z[1:] - z[:-1] ** 2) ** 2).sum()
        return 0.5 * x @ a @ x - b @ x + 0.01 * (x**4).sum() + rosen

    return loss


def _run(make_opt, loss_fn, steps: int, n: int = 40, start: float = 0.0):
    x = torch.full((n,), start, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = make_opt([x, z])
    losses = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss_fn(x, z)
        value.backward()
        return value

    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
    return x.detach(), z.detach(), losses


@pytest.mark.parametrize("history", [3, 100])
def test_iterates_match_torch_lbfgs(history: int) -> None:
    """Same step rule, memory and stopping tests as torch: the same iterates (float64)."""
    loss_fn = _problem()
    ours = _run(lambda p: CompactLBFGS(p, history_size=history), loss_fn, steps=4)
    theirs = _run(lambda p: torch.optim.LBFGS(p, history_size=history), loss_fn, steps=4)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
    assert ours[2] == pytest.approx(theirs[2], rel=1e-7)


def test_converges_to_the_minimum() -> None:
    loss_fn = _problem(seed=1)
    x, z, losses = _run(lambda p: CompactLBFGS(p, backtrack=True), loss_fn, steps=20)
    x.requires_grad_(True)
    z.requires_grad_(True)
    grads = torch.autograd.grad(loss_fn(x, z), [x, z])
    assert max(float(g.abs().max()) for g in grads) < 1e-4  # torch's default tolerances stop here
    torch.testing.assert_close(z, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-3)
    assert losses == sorted(losses, reverse=True)


def test_backtracking_rescues_an_overlong_step() -> None:
    """A step length of 5 overshoots a quadratic's minimum fourfold: taken as is, every
    iteration multiplies the loss by 16; backtracking shortens it and converges."""

    def bowl(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (x**2).sum() + (z**2).sum()

    def fresh(backtrack: bool):
        return lambda p: CompactLBFGS(p, lr=5.0, max_iter=5, backtrack=backtrack)

    _, _, plain = _run(fresh(False), bowl, steps=3, n=4, start=3.0)
    x, _, safe = _run(fresh(True), bowl, steps=3, n=4, start=3.0)
    start = 4 * 3.0**2
    assert plain[0] == pytest.approx(start)
    assert plain[-1] > 1e3 * start
    assert safe[-1] < 1e-8 * start
    assert float(x.abs().max()) < 1e-4


def test_needs_parameters() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CompactLBFGS([])
