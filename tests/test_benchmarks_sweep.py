"""The quality benchmark's learning-rate sweep, its equal-wall-clock reading, and the
char-LM's backward pass (the residual-gradient barrier)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import main as M
from benchmarks import quality as Q
from benchmarks import tasks as T


def _fake(lr_best, diverge_above=math.inf):
  """run(lr) whose final val loss is a parabola in log10(lr) with its minimum at lr_best."""
  calls = []

  def run(lr):
    calls.append(lr)
    v = (math.log10(lr) - math.log10(lr_best)) ** 2 + 1.0
    return {"lr": lr, "diverged": lr > diverge_above, "val_loss": [v], "val_metric": [0.0], "wall_s": [1.0],
            "seed": 0}

  return run, calls


@pytest.mark.parametrize("lr_best", [1e-4, 3e-4, 3e-3, 2e-2, 0.05, 1.0])
def test_sweep_extends_until_the_best_is_interior(lr_best):
  run, calls = _fake(lr_best)
  runs, best, at_edge = Q.sweep(run, (1e-3, 3e-3, 1e-2), M.LADDER)
  ladder = list(M.LADDER)
  # the independent answer: the ladder point nearest lr_best in log space
  want = min(ladder, key=lambda x: (abs(math.log10(x) - math.log10(lr_best)), x))
  assert best["lr"] == want
  tried = sorted(calls)
  assert len(set(calls)) == len(calls) == len(runs)
  assert tried == ladder[ladder.index(tried[0]):ladder.index(tried[-1]) + 1]  # contiguous
  assert at_edge == (want in (ladder[0], ladder[-1]))
  if not at_edge:
    assert tried[0] < best["lr"] < tried[-1]
    # no more runs than needed: one neighbour beyond the best on the side it moved to
    assert len(calls) == 3 + abs(ladder.index(want) - ladder.index(3e-3))


def test_sweep_treats_divergence_as_worst_and_moves_down():
  run, calls = _fake(1e-1, diverge_above=2e-3)  # everything above 2e-3 diverges
  _, best, at_edge = Q.sweep(run, (1e-3, 3e-3, 1e-2), M.LADDER)
  assert best["lr"] == 1e-3 and not at_edge and 3e-4 in calls
  run, calls = _fake(1e-1, diverge_above=0.0)  # every run diverges: down to the ladder's end
  _, best, at_edge = Q.sweep(run, (1e-3, 3e-3, 1e-2), M.LADDER)
  assert best["lr"] == 1e-4 and at_edge and max(calls) == 1e-2


def test_sweep_without_ladder_runs_the_grid_only():
  run, calls = _fake(1.0)
  _, best, at_edge = Q.sweep(run, (3e-3, 1e-2, 3e-2))
  assert sorted(calls) == [3e-3, 1e-2, 3e-2] and best["lr"] == 3e-2 and at_edge


def test_loss_at_time_interpolates_between_evaluations():
  r = {"wall_s": [1.0, 2.0, 4.0], "val_loss": [3.0, 2.0, 1.0], "diverged": False}
  assert Q.loss_at_time(r, 1.5) == (pytest.approx(2.5), False)
  assert Q.loss_at_time(r, 3.0) == (pytest.approx(1.5), False)
  assert Q.loss_at_time(r, 9.0) == (1.0, True)
  assert Q.loss_at_time(r, 0.5) == (None, False)
  assert Q.loss_at_time(dict(r, diverged=True), 3.0) == (None, False)


def test_equal_time_uses_adamw_seconds_and_seed_means():
  def run(name, seed, wall, loss):
    return {"task": "t", "optimizer": name, "lr": 1e-3, "seed": seed, "wall_s": wall,
            "val_loss": loss, "diverged": False}
  res = {"tasks": {"t": {}},
         "summary": [{"task": "t", "optimizer": "optax.adamw", "best_lr": 1e-3,
                      "train_s_mean": 2.0},
                     {"task": "t", "optimizer": "slow", "best_lr": 1e-3, "train_s_mean": 4.0}],
         "quality": [run("optax.adamw", 0, [1.0, 2.0], [2.0, 1.0]),
                     run("slow", 0, [2.0, 4.0], [3.0, 0.5]),
                     run("slow", 1, [1.0, 4.0], [3.0, 0.0])]}
  M._equal_time(res, "t")
  adam, slow = res["summary"]
  assert res["tasks"]["t"]["equal_time_s"] == 2.0
  assert adam["val_loss_at_equal_time"] == 1.0 and adam["finished_by_equal_time"]
  assert slow["val_loss_at_equal_time"] == pytest.approx((3.0 + 2.0) / 2)
  assert not slow["finished_by_equal_time"]


def test_char_lm_residual_barrier_keeps_gradients_and_cuts_the_backward():
  """The barrier leaves the gradient unchanged (against torch's autograd, an independent
  reference) and stops XLA from recomputing the residual stream's gradient in every block."""
  torch = pytest.importorskip("torch")
  task = T.make_task("shakespeare")
  params = task.init(0)
  x, y = T.gather(task, task.order(0, 1)[0][:4])
  pj = jax.tree.map(jnp.asarray, params)
  gj = jax.grad(lambda q: task.loss(T.JnpOps(), q, jnp.asarray(x), jnp.asarray(y)))(pj)
  pt = jax.tree.map(lambda a: torch.tensor(np.asarray(a), requires_grad=True), params)
  task.loss(T.TorchOps(), pt, torch.as_tensor(x), torch.as_tensor(y).long()).backward()
  for a, b in zip(jax.tree.leaves(gj), jax.tree.leaves(jax.tree.map(lambda t: t.grad, pt))):
    np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=2e-3, atol=2e-6)

  class NoBarrier(T.JnpOps):
    def residual(self, h):
      return h

  def cost(ops):
    f = jax.jit(jax.grad(lambda q: task.loss(ops, q, jnp.asarray(x), jnp.asarray(y))))
    return f.lower(pj).compile().cost_analysis()["bytes accessed"]

  assert cost(T.JnpOps()) < 0.9 * cost(NoBarrier())


def test_beats_adamw_sentence_uses_the_standard_error():
  from benchmarks import make_readme
  row = lambda name, m, sd: {"optimizer": name, "val_loss_mean": m, "val_loss_std": sd,
                             "n_seeds": 3}
  text = make_readme.beats_adamw([row("optax.adamw", 1.0, 0.03), row("stax.a", 0.9, 0.03),
                                  row("stax.b", 1.02, 0.03), row("stax.c", 1.2, 0.0),
                                  row("stax.d", math.nan, math.nan), row("seed:x", 0.5, 0.0)])
  better, tied, worse = (text.split("**")[i] for i in (2, 4, 6))
  assert "stax.a (-10.0 %)" in better and "stax.b" not in better
  assert "stax.b (+2.0 %)" in tied                     # 0.02 < se = 0.03·sqrt(2/3) = 0.0245
  assert "stax.c (+20.0 %)" in worse and "stax.d (diverged)" in worse
  assert "seed:x" not in text


def test_quality_points_are_gaps_to_adamw_in_bits():
  from benchmarks import plots
  row = lambda name, m, sd, bpp: {"task": "t", "optimizer": name, "val_loss_mean": m,
                                  "val_loss_std": sd, "state_bytes_per_param": bpp}
  res = {"tasks": {"t": {}}, "summary": [row("optax.adamw", 2.0, 0.1, 8.0),
                                         row("stax.stac", 2.2, 0.2, 0.125),
                                         row("stax.x", math.nan, math.nan, 1.0),
                                         dict(row("stax.y", 1.0, 0.0, 1.0), error="boom")]}
  (p,) = plots.quality_points(res)
  assert p["name"] == "stax.stac" and p["bits"] == 1.0
  assert p["gap"] == pytest.approx(0.1) and p["std"] == pytest.approx(0.1)
