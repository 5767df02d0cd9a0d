"""Training-quality runs: one optimizer, one task, one learning rate, one seed.

Both frameworks see the same initial weights (numpy, from the seed), the same batches in the
same order (``Task.order(seed)``), the same global-norm clipping (``CLIP``) and the same
learning-rate shape: linear warm-up over the first 5% of the steps, then cosine decay to 10%
of the peak, applied as a multiplier on the optimizer's update (so it works for optimizers
that take only a float learning rate; with decoupled weight decay multiplied by the learning
rate, as in every optimizer here, it equals scheduling the learning rate itself).

JAX runs compile one ``lax.scan`` chunk of ``eval_every`` steps (params and state donated) with
the peak learning rate as a traced argument, so a sweep compiles once; compile time is
measured separately and excluded from the wall-clock curves, as is evaluation.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from benchmarks import tasks as T

CLIP = 1.0
WARMUP_FRAC = 0.05
FINAL_FRAC = 0.1


def lr_shape(step, total):
  """Multiplier in [0, 1] of the peak learning rate at ``step`` (0-based), numpy or jnp."""
  warm = max(1, int(WARMUP_FRAC * total))
  xp = np
  try:
    import jax.numpy as jnp
    if not isinstance(step, (int, float, np.ndarray, np.generic)):
      xp = jnp
  except ImportError:  # pragma: no cover
    pass
  s = xp.asarray(step, dtype=np.float32)
  w = (s + 1.0) / warm
  prog = xp.clip((s - warm) / max(1, total - warm), 0.0, 1.0)
  cos = FINAL_FRAC + (1 - FINAL_FRAC) * 0.5 * (1 + xp.cos(math.pi * prog))
  return xp.where(s < warm, w, cos)


def _result(task, opt, lr, seed, steps):
  return {"task": task.name, "optimizer": opt.name, "framework": opt.framework,
          "family": opt.family, "lr": float(lr), "seed": int(seed), "total_steps": int(steps),
          "steps": [], "train_loss": [], "val_loss": [], "val_metric": [], "wall_s": [],
          "compile_s": 0.0, "diverged": False, "error": None}


# --------------------------------------------------------------------------- JAX
class JaxRunner:
  """Compiles once per (task, optimizer, steps) and runs any (lr, seed) on it."""

  def __init__(self, task: T.Task, opt, steps: int):
    import jax
    import jax.numpy as jnp
    import optax

    self.task, self.opt, self.steps = task, opt, steps
    self.k = task.eval_every
    assert steps % self.k == 0, (steps, self.k)
    ops = T.JnpOps()
    shape = lambda c: lr_shape(c, steps)

    def make_tx(lr):
      return optax.chain(optax.clip_by_global_norm(CLIP), opt.build(lr, task),
                         optax.scale_by_schedule(shape))

    def chunk(params, state, lr, xs, ys):
      tx = make_tx(lr)

      def step(carry, batch):
        p, s = carry
        x, y = batch
        loss, g = jax.value_and_grad(lambda q: task.loss(ops, q, x, y))(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

      (params, state), losses = jax.lax.scan(step, (params, state), (xs, ys))
      return params, state, losses

    vx, vy = (jnp.asarray(a) for a in task.val)

    def evaluate(params):
      return task.metrics(ops, params, vx, vy)

    self._make_tx = make_tx
    self._init = jax.jit(lambda p, lr: make_tx(lr).init(p))
    self._chunk = jax.jit(chunk, donate_argnums=(0, 1))
    self._eval = jax.jit(evaluate)
    self._compiled = None
    self.compile_s = 0.0

  def state_bytes(self, params) -> int:
    """Exact bytes of the optimizer's own state (without the harness's clip/schedule)."""
    import jax
    st = jax.eval_shape(lambda p: self.opt.build(1e-3, self.task).init(p), params)
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(st)))

  def _compile(self, params, xs, ys):
    import jax
    import jax.numpy as jnp
    t0 = time.perf_counter()
    lr = jnp.float32(1e-3)
    state = jax.eval_shape(self._init, params, lr)
    self._compiled = self._chunk.lower(params, state, lr, xs, ys).compile()
    self._eval.lower(params).compile()
    self.compile_s = time.perf_counter() - t0

  def run(self, lr: float, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    task, k = self.task, self.k
    res = _result(task, self.opt, lr, seed, self.steps)
    order = task.order(seed, self.steps)
    params = jax.tree.map(jnp.asarray, task.init(seed))
    x0, y0 = T.gather(task, order[:k])
    if self._compiled is None:
      self._compile(params, jnp.asarray(x0), jnp.asarray(y0))
    res["compile_s"] = self.compile_s
    lr_a = jnp.float32(lr)
    state = self._init(params, lr_a)
    jax.block_until_ready(state)
    wall = 0.0
    for c in range(self.steps // k):
      xs, ys = T.gather(task, order[c * k:(c + 1) * k])
      xs, ys = jax.device_put(xs), jax.device_put(ys)
      jax.block_until_ready((xs, ys))
      t0 = time.perf_counter()
      params, state, losses = self._compiled(params, state, lr_a, xs, ys)
      jax.block_until_ready((params, state, losses))
      wall += time.perf_counter() - t0
      vl, va = (float(v) for v in self._eval(params))
      res["steps"].append((c + 1) * k)
      res["train_loss"].append(float(np.mean(np.asarray(losses))))
      res["val_loss"].append(vl)
      res["val_metric"].append(va)
      res["wall_s"].append(wall)
      if not math.isfinite(vl) or vl > 1e3:
        res["diverged"] = True
        break
    return res


# --------------------------------------------------------------------------- torch
def torch_module(params: dict, module_order):
  """An ``nn.Module`` whose children are the task's modules in execution order.

  Each child owns its leaves as direct parameters (what STAC counts as a module). Returns the
  module and a function mapping it back to the nested params dict the shared forward uses.
  """
  import torch

  root = torch.nn.Module()
  for m in module_order:
    child = torch.nn.Module()
    for leaf, arr in params[m].items():
      child.register_parameter(leaf, torch.nn.Parameter(torch.tensor(np.asarray(arr))))
    root.add_module(m, child)

  def as_tree(mod):
    return {m: dict(getattr(mod, m).named_parameters(recurse=False)) for m in module_order}

  return root, as_tree


def run_torch(task: T.Task, opt, lr: float, seed: int, steps: int) -> dict:
  import torch
  res = _result(task, opt, lr, seed, steps)
  ops = T.TorchOps()
  torch.manual_seed(seed)
  module, as_tree = torch_module(task.init(seed), task.module_order)
  t0 = time.perf_counter()
  optimizer = opt.build(lr, module, task)
  sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: float(lr_shape(s, steps)))
  res["compile_s"] = time.perf_counter() - t0
  order = task.order(seed, steps)
  vx, vy = (torch.as_tensor(a) for a in task.val)
  wall, k, losses = 0.0, task.eval_every, []
  params = as_tree(module)
  for i in range(steps):
    x, y = T.gather(task, order[i])
    x, y = torch.as_tensor(x), torch.as_tensor(y).long()
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss(ops, params, x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
    optimizer.step()
    sched.step()
    losses.append(loss.detach())
    wall += time.perf_counter() - t0
    if (i + 1) % k == 0:
      with torch.no_grad():
        vl, va = (float(v) for v in task.metrics(ops, params, vx, vy.long()))
      res["steps"].append(i + 1)
      res["train_loss"].append(float(torch.stack(losses).mean()))
      res["val_loss"].append(vl)
      res["val_metric"].append(va)
      res["wall_s"].append(wall)
      losses = []
      if not math.isfinite(vl) or vl > 1e3:
        res["diverged"] = True
        break
  res["state_bytes"] = torch_state_bytes(optimizer)
  return res


def torch_state_bytes(optimizer) -> int:
  """Bytes of every tensor in ``optimizer.state`` (shared storages counted once)."""
  import torch
  seen, total = set(), 0

  def visit(v):
    nonlocal total
    if isinstance(v, torch.Tensor):
      key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
      if key not in seen:
        seen.add(key)
        total += v.untyped_storage().nbytes()
    elif isinstance(v, dict):
      for x in v.values():
        visit(x)
    elif isinstance(v, (list, tuple)):
      for x in v:
        visit(x)

  for st in optimizer.state.values():
    visit(st)
  return int(total)


def final(res: dict) -> dict[str, Any]:
  """Final validation loss/metric of one run (NaN when it diverged)."""
  if res["diverged"] or not res["val_loss"]:
    return {"val_loss": float("nan"), "val_metric": float("nan")}
  return {"val_loss": res["val_loss"][-1], "val_metric": res["val_metric"][-1]}


def score(res: dict) -> float:
  """Final validation loss of a run, ``inf`` when it diverged (lower is better)."""
  v = final(res)["val_loss"]
  return v if math.isfinite(v) else math.inf


def sweep(run, grid, ladder=()):
  """Runs ``run(lr)`` on ``grid``, then extends it along ``ladder`` while the best is at an edge.

  The best learning rate is the one with the lowest :func:`score`. While it is the smallest
  (largest) rate tried and ``ladder`` has a smaller (larger) one, the next one on that side is
  run, so the returned best is interior to the rates tried unless it is at an end of
  ``ladder`` (or of ``grid`` when ``ladder`` is empty). Ties go to the smaller rate; when every
  run diverged the sweep moves down.

  Args:
    run: ``lr -> result dict`` (as :func:`JaxRunner.run` or :func:`run_torch` return).
    grid: the rates run first (any order; sorted).
    ladder: every rate the sweep may extend to (``grid`` is added to it).

  Returns:
    ``(runs, best, at_edge)``: the runs in the order run, the best run, and whether its rate
    is the smallest or largest rate tried (then the optimum may lie outside the ladder).
  """
  ladder = sorted(set(float(x) for x in (*ladder, *grid)))
  runs = {}
  order = []
  for lr in sorted(float(x) for x in grid):
    runs[lr] = run(lr)
    order.append(runs[lr])
  while True:
    tried = sorted(runs)
    best_lr = min(tried, key=lambda lr: (score(runs[lr]), lr))
    i = ladder.index(best_lr)
    nxt = None
    if best_lr == tried[0] and i > 0 and ladder[i - 1] not in runs:
      nxt = ladder[i - 1]
    elif best_lr == tried[-1] and i + 1 < len(ladder) and ladder[i + 1] not in runs:
      nxt = ladder[i + 1]
    if nxt is None:
      return order, runs[best_lr], best_lr in (tried[0], tried[-1])
    runs[nxt] = run(nxt)
    order.append(runs[nxt])


def loss_at_time(res: dict, t: float):
  """Validation loss of a run at ``t`` training seconds (linear between evaluations).

  Returns ``(loss, finished)``: ``finished`` when the run ended before ``t`` (its final loss is
  returned); ``(None, False)`` when ``t`` is before its first evaluation or the run diverged.
  """
  w, v = res["wall_s"], res["val_loss"]
  if res["diverged"] or not w or t < w[0]:
    return None, False
  if t >= w[-1]:
    return v[-1], True
  return float(np.interp(t, w, v)), False


def time_to_target(res: dict, target: float):
  """(steps, seconds) at the first evaluation with val loss <= target, else (None, None)."""
  for s, v, w in zip(res["steps"], res["val_loss"], res["wall_s"]):
    if v <= target:
      return s, w
  return None, None
