"""Arrays with a narrow last axis cross the bridge's jitted step flat
(:func:`torch_bridge.convert.boundary_shape`) and the step's elementwise work runs on the flat
arrays (:mod:`torch_bridge._flatten`): bit for bit the step on the real shapes."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import stax
import torch_bridge
from torch_bridge import convert
from tests.bridge_reference import bridged_adamw, per_parameter_step
from torch_bridge._flatten import flat_call, flattenable
from torch_bridge.layout import torch_dimension_numbers

# A torch conv weight, an attention kernel (in, heads, head_dim), a bias and a wide matrix.
SHAPES = {"conv": (32, 16, 3, 3), "attn": (64, 4, 16), "bias": (32,), "lin": (48, 256)}


def test_boundary_shape():
  bs = convert.boundary_shape
  assert bs((64, 3, 7, 7)) == (64 * 3 * 49,)
  assert bs((4, 127)) == (508,) and bs((4, 128)) == (4, 128)
  assert bs((768, 2304)) == (768, 2304) and bs((512, 3, 3, 512)) == (512, 3, 3, 512)
  assert bs((64,)) == (64,) and bs(()) == ()
  t = torch.zeros(8, 4, 3, 3, requires_grad=True)
  v = convert.boundary_view(t, (288,))
  assert v.shape == (288,) and v.data_ptr() == t.data_ptr() and not v.requires_grad
  assert convert.boundary_view(t) is t
  assert convert.real_view(v, t.shape).shape == t.shape


def _oadamw():
  dims = {k: torch_dimension_numbers(s) for k, s in SHAPES.items()}
  return stax.oadamw(1e-2, weight_decay=1e-2, dimension_numbers=dims)


TRANSFORMS = {
    "stax.adamw": lambda: stax.adamw(1e-2, weight_decay=1e-2),
    # the torch layout, as the bridge passes it (under the JAX default the 3-D leaf is stacked
    # layers, each clipped by its own RMS: a per-layer scale meets the leaf in its real shape)
    "stax.stable_adamw": lambda: stax.stable_adamw(
        1e-2, weight_decay=1e-2,
        dimension_numbers={k: torch_dimension_numbers(s) for k, s in SHAPES.items()}),
    "stax.stam": lambda: stax.stam(1e-2, weight_decay=1e-2),
    "stax.turbo_adam": lambda: stax.turbo_adam(1e-2, weight_decay=1e-2,
                                               min_compress_elements=64),
    "stax.oadamw (torch layout)": _oadamw,
    # a shape-based label: only >= 2-D leaves decay
    "optax.adamw, mask by ndim": lambda: optax.adamw(
        1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
}


#: Transforms some of whose narrow leaves must cross in their real shape: the factored second
#: moment (rows ⊗ cols) meets the flat first moment in an elementwise op; Muon's orthogonalised
#: update (a product of matrices) meets the parameter.
MIXED = {"stax.turbo_adam", "stax.oadamw (torch layout)"}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_flat_call_is_bit_exact(name):
  """Three steps of the transform with the narrow leaves (parameters, gradients, state) that
  ``flattenable`` allows passed flat equal the same steps on the real shapes bit for bit, and
  the transform saw the real shapes (a shape-based mask, a matrix view, a row-blocked codec).
  Elementwise transforms take every narrow leaf flat."""
  tx = TRANSFORMS[name]()
  keys = jax.random.split(jax.random.PRNGKey(0), len(SHAPES))
  params = {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, SHAPES.items())}

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  leaves, tree = jax.tree.flatten((params, state))
  gtree = jax.tree.structure(params)
  n = len(leaves)
  avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in [*leaves, *gtree.flatten_up_to(params)]]
  shapes = [tuple(a.shape) for a in avals]

  def fn(*xs):
    p, s = tree.unflatten(xs[:n])
    return step(p, s, gtree.unflatten(xs[n:]))

  cands = [i for i, sh in enumerate(shapes) if convert.boundary_shape(sh) != sh]
  flat = flattenable(fn, avals, cands)
  assert (flat == frozenset(cands)) == (name not in MIXED), sorted(set(cands) - flat)
  cross = [(math.prod(sh),) if i in flat else sh for i, sh in enumerate(shapes)]
  flat_step = jax.jit(lambda *a: flat_call(fn, a, shapes, cross[:n]))
  real_step = jax.jit(step)
  real = (params, state)
  args = [x.reshape(c) for x, c in zip(leaves, cross)]
  for t in range(3):
    g = {k: jnp.cos(v * (t + 1)) for k, v in real[0].items()}
    real = real_step(*real, g)
    args = flat_step(*args, *[x.reshape(c) for x, c in zip(jax.tree.leaves(g), cross[n:])])
    for a, b, c in zip(jax.tree.leaves(real), args, cross):
      assert b.shape == c
      np.testing.assert_array_equal(np.asarray(b).reshape(a.shape), np.asarray(a), err_msg=name)


def _fusion_ops_in(hlo: str, shape: str) -> int:
  """Elementwise instructions of type ``shape`` inside fused computations (a reduction reads
  its operand in the real shape, through a bitcast)."""
  body = hlo[:hlo.index("ENTRY")]
  return len([m for m in re.finditer(rf"= f32\[{shape}\]\S* (\w[\w-]*)\(", body)
              if m.group(1) not in ("bitcast", "parameter")])


def test_elementwise_work_runs_on_the_flat_arrays():
  """The compiled AdamW step of conv weights passed flat has no operation in the 4-D shape left
  in its kernels, the non-finite check's sum of ``g - g`` included (0 or NaN in any order, so it
  sums the flat array); a plain reshape to the real shape inside the step leaves some (XLA
  moves a reshape through an op only when every user of it moves, and a kernel mixing 4-D
  bitcasts into a 1-D loop ran 3x slower than the 4-D one)."""
  shape, n = (64, 64, 3, 3), 64 * 64 * 9
  tx = stax.adamw(1e-3, weight_decay=1e-2)
  ps = {f"w{i}": jnp.ones(shape) for i in range(2)}
  state = tx.init(ps)
  leaves, tree = jax.tree.flatten((ps, state))
  shapes = [tuple(x.shape) for x in leaves] + [shape] * 2

  def step(*xs):
    p, s = tree.unflatten(xs[:len(leaves)])
    g = {"w0": xs[-2], "w1": xs[-1]}
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  args = [jnp.ones(convert.boundary_shape(s)) for s in shapes]
  outs = [convert.boundary_shape(sh) for sh in shapes[:len(leaves)]]
  assert flattenable(step, [jax.ShapeDtypeStruct(sh, jnp.float32) for sh in shapes],
                     range(len(shapes))) == {i for i, sh in enumerate(shapes) if len(sh) == 4}
  with_pass = jax.jit(lambda *a: flat_call(step, a, shapes, outs))
  plain = jax.jit(lambda *a: jax.tree.leaves(step(*[
      x.reshape(s) for x, s in zip(a, shapes)])))
  dims = ",".join(map(str, shape))
  text = with_pass.lower(*args).compile().as_text()
  assert f"f32[{dims}]" not in text
  assert _fusion_ops_in(plain.lower(*args).compile().as_text(), dims) > 0
  assert any(f"f32[{n}]" in line for line in
             with_pass.lower(*args).compile().as_text().splitlines() if "fusion(" in line)


class _Conv(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
    self.c2 = torch.nn.Conv2d(16, 8, 3, padding=1)
    self.head = torch.nn.Linear(8, 4)

  def forward(self, x):
    x = torch.relu(self.c1(x))
    return self.head(torch.relu(self.c2(x)).mean((2, 3)))


@pytest.mark.parametrize("writeback", ["copy", "swap"])
def test_conv_net_through_the_bridge_equals_pure_jax(writeback):
  """A conv net's weights (out, in, 3, 3) cross flat, its state is filed in the real shapes
  (state_dict, ``optimizer.state``), and four bridged AdamW steps equal pure JAX's on the real
  shapes bit for bit; save → load → continue too."""
  torch.manual_seed(0)
  m = _Conv()
  names = [n for n, _ in m.named_parameters()]
  p0 = {n: jnp.asarray(q.detach().numpy()) for n, q in m.named_parameters()}
  opt = torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-2, weight_decay=1e-2,
                               writeback=writeback)
  tx = bridged_adamw(learning_rate=1e-2, weight_decay=1e-2)
  states = {n: tx.init({n: p0[n]}) for n in names}
  ref_step = per_parameter_step(tx, names)

  x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 4)

  def train(opt, steps):
    nonlocal p0, states
    for _ in range(steps):
      opt.zero_grad()
      torch.nn.functional.mse_loss(m(x), y).backward()
      grads = {n: jnp.asarray(q.grad.numpy()) for n, q in m.named_parameters()}
      p0, states = ref_step(p0, states, grads)
      opt.step()

  train(opt, 2)
  plan = next(iter(opt._plans.values()))  # pylint: disable=protected-access
  live = opt._states.live_leaves(plan.compiled)  # pylint: disable=protected-access
  assert (16 * 3 * 9,) in [tuple(a.shape) for a in live]          # the conv's moments, flat
  sd = opt.state_dict()
  assert sd["state"][0]["inner_state/0/mu"].shape == m.c1.weight.shape
  assert opt.state[m.c1.weight]["inner_state/0/nu"].shape == m.c1.weight.shape
  opt2 = torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-2, weight_decay=1e-2,
                                writeback=writeback)
  opt2.load_state_dict(sd)
  train(opt2, 2)
  for n, q in m.named_parameters():
    assert q.shape == p0[n].shape
    np.testing.assert_array_equal(q.detach().numpy(), np.asarray(p0[n]), err_msg=n)
  mu = opt2.state_dict()["state"][0]["inner_state/0/mu"]
  ref_mu = optax.tree_utils.tree_get(states[names[0]], "mu")[names[0]]
  np.testing.assert_array_equal(mu.numpy(), np.asarray(ref_mu))


def test_orderless_reductions_run_flat_and_others_in_the_real_shape():
  """A max over every axis, and a sum of ``x - x``, read the flat array; a sum of ``x * x`` (its
  value depends on the order) reads the real shape, bit for bit the real step's."""
  shape = (64, 16, 3, 3)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  fns = {"max": lambda x: jnp.max(x), "probe": lambda x: jnp.sum(x - x),
         "square": lambda x: jnp.sum(x * x), "rows": lambda x: jnp.sum(x * x, axis=(1, 2, 3))}
  for name, f in fns.items():
    flat = jax.jit(lambda a, f=f: flat_call(f, [a], [shape])[0])
    text = flat.lower(x.reshape(-1)).compile().as_text()
    assert (f"[{','.join(map(str, shape))}]" in text) == (name in ("square", "rows")), name
    np.testing.assert_array_equal(flat(x.reshape(-1)), jax.jit(f)(x), err_msg=name)
  bad = x.reshape(-1).at[7].set(jnp.inf)
  assert np.isnan(jax.jit(lambda a: flat_call(fns["probe"], [a], [shape])[0])(bad))


@pytest.mark.parametrize("writeback", ["copy", "swap"])
@pytest.mark.parametrize("scope", ["param", "global"])
def test_a_nonfinite_conv_gradient_still_skips_the_step(writeback, scope):
  """A NaN in a conv weight's gradient (passed flat) skips that parameter's step (the
  transform's own check), or every parameter's (``global_nonfinite="skip"``, the bridge's)."""
  torch.manual_seed(0)
  m = _Conv()
  kw = {"global_nonfinite": "skip"} if scope == "global" else {}
  opt = torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-2, writeback=writeback,
                               **kw)
  torch.nn.functional.mse_loss(m(torch.randn(2, 3, 8, 8)), torch.randn(2, 4)).backward()
  opt.step()
  before = {n: p.detach().clone() for n, p in m.named_parameters()}
  m.c2.weight.grad[3, 1, 2, 0] = float("nan")
  opt.step()
  for n, p in m.named_parameters():
    assert torch.equal(p, before[n]) == (n == "c2.weight" or scope == "global"), n
  assert opt.nonfinite_skipped_steps == (1 if scope == "global" else 0)


def test_the_benchmarks_pure_jax_flat_boundary_is_the_same_step():
  """``benchmarks/bridge_speed.py``'s ``jax_adamw_flat`` contender: conv weights, their moments
  and gradients 1-D, three steps bit for bit the step on the real shapes."""
  from benchmarks.bridge_speed import _flat_boundary  # pylint: disable=g-import-not-at-top
  tx = stax.adamw(1e-2, weight_decay=1e-2)
  params = {k: jax.random.normal(jax.random.PRNGKey(i), s)
            for i, (k, s) in enumerate(SHAPES.items())}
  grads = {k: jnp.cos(v) for k, v in params.items()}

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s, g, flat_step = _flat_boundary(step, params, tx.init(params), grads)
  assert p["conv"].shape == (32 * 16 * 9,) and g["attn"].shape == (64 * 4 * 16,)
  assert p["lin"].shape == SHAPES["lin"]
  real = (params, tx.init(params))
  for _ in range(3):
    p, s = jax.jit(flat_step)(p, s, g)
    real = jax.jit(step)(*real, grads)
  for a, b in zip(jax.tree.leaves(real), jax.tree.leaves((p, s))):
    np.testing.assert_array_equal(np.asarray(b).reshape(a.shape), np.asarray(a))


@pytest.mark.parametrize("writeback", ["copy", "swap"])
def test_a_channels_last_conv_weight_crosses_as_a_counted_copy(writeback):
  """A non-contiguous (``channels_last``) conv weight is copied to cross 1-D, the copy counted
  as for any non-contiguous tensor, and the steps equal those of the contiguous model."""
  torch.manual_seed(0)
  a, b = _Conv(), _Conv()
  b.load_state_dict(a.state_dict())
  b = b.to(memory_format=torch.channels_last)
  assert not b.c1.weight.is_contiguous()
  opts = [torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2, writeback=writeback)
          for m in (a, b)]
  before = convert.copy_counts["non_contiguous"]
  for t in range(2):
    for m, opt in zip((a, b), opts):
      for k, p in enumerate(m.parameters()):   # the same gradients, in each model's layout
        g = torch.cos(torch.arange(p.numel(), dtype=torch.float32) * (t + k + 1)).view(p.shape)
        p.grad = g.contiguous(memory_format=torch.channels_last) if m is b and g.ndim == 4 else g
      opt.step()
  assert convert.copy_counts["non_contiguous"] > before
  for p, q in zip(a.parameters(), b.parameters()):
    torch.testing.assert_close(p, q, rtol=0, atol=0)
