"""torch_bridge.Optimizer: parity with torch.optim.AdamW and pure JAX, schedulers without
recompilation, None gradients, DLPack zero-copy, state_dict round trips, errors, release."""

from __future__ import annotations

import copy
import io
import os
import pickle
from typing import NamedTuple

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
from tests import contract_problems as cp
from tests.registry import MAIN

F = torch.nn.functional


def _mlp(seed=0, dtype=torch.float32):
  torch.manual_seed(seed)
  return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                             torch.nn.Linear(8, 3)).to(dtype)


def _data(seed=1, n=16, dtype=torch.float32):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)


def _maxdiff(m1, m2):
  return max((a.float() - b.float()).abs().max().item()
             for a, b in zip(m1.parameters(), m2.parameters()))


def _train_pair(opt_a, opt_b, m_a, m_b, steps, sched=None, none_every=0, metric=False):
  x, y = _data()
  sa = sched(opt_a) if sched else None
  sb = sched(opt_b) if sched else None
  for t in range(steps):
    for m, o, s in ((m_a, opt_a, sa), (m_b, opt_b, sb)):
      o.zero_grad()
      loss = F.mse_loss(m(x), y)
      loss.backward()
      if none_every and t % none_every == 1:
        m[2].bias.grad = None  # skipped this step (torch semantics)
      o.step()
      if s is not None:
        s.step(loss.item()) if metric else s.step()


# ----------------------------------------------------------------------------- parity: torch
def test_adamw_matches_torch_adamw_with_scheduler_and_none_grads():
  m1, m2 = _mlp(), _mlp()
  opt = torch_bridge.Optimizer(m1.parameters(), stax.adamw, lr=1e-2, weight_decay=1e-2,
                               nonfinite="ignore")
  ref = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=1e-2)
  _train_pair(opt, ref, m1, m2, 100, sched=lambda o: torch.optim.lr_scheduler.StepLR(o, 20, 0.5),
              none_every=3)
  assert _maxdiff(m1, m2) < 1e-6
  assert _maxdiff(m1, _mlp()) > 1e-2  # it did train
  # the skipped bias's count lags the others (torch's per-parameter step)
  counts = {k: int(v["0/count"]) for k, v in opt.state_dict()["state"].items()}
  assert counts[0] == 100 and counts[3] == 100 - 33
  assert opt.trace_count == 2  # one compilation per has-grad pattern, none per lr change


SCHEDULERS = {
    "StepLR": (lambda o: torch.optim.lr_scheduler.StepLR(o, 5, 0.7), False),
    "CosineAnnealingLR": (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 30), False),
    "OneCycleLR": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 3e-2, total_steps=40), False),
    "ReduceLROnPlateau": (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, factor=0.5, patience=0, threshold=0.5), True),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_match_torch_without_recompiling(name):
  sched, metric = SCHEDULERS[name]
  m1, m2 = _mlp(), _mlp()
  opt = torch_bridge.Optimizer(m1.parameters(), stax.adamw, lr=1e-2, weight_decay=0.0,
                               nonfinite="ignore")
  ref = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.0)
  _train_pair(opt, ref, m1, m2, 30, sched=sched, metric=metric)
  assert opt.trace_count == 1
  assert _maxdiff(m1, m2) < 1e-6
  lrs = {g["lr"] for g in opt.param_groups}
  assert lrs != {1e-2}  # the scheduler did change it
  if name == "OneCycleLR":
    assert opt.param_groups[0]["betas"][0] != 0.9  # OneCycleLR cycles beta1 too


def test_hyperparameter_vector_follows_every_kind_of_group_change():
  """The step's packed hyperparameters are refilled in place when only traced values change
  (a scheduler's write) and re-parsed when anything else does; either way they equal a fresh
  parse of the group."""
  from torch_bridge import _hyperparams  # pylint: disable=import-outside-toplevel
  m = _mlp()
  opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2, nesterov=False)
  group = opt.param_groups[0]

  def fresh():
    traced, static, _ = opt._parse_group(0)  # pylint: disable=protected-access
    return (static,) + _hyperparams.pack(traced)

  def entry():
    e = opt._group_hyper(0)  # pylint: disable=protected-access
    return (e.static, e.layout, e.vector)

  def same(a, b):
    return a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])

  assert same(entry(), fresh())
  parses = []
  real = opt._parse_group  # pylint: disable=protected-access

  def counting(gi):
    parses.append(gi)
    return real(gi)

  opt._parse_group = counting  # pylint: disable=protected-access
  for change, reparse in ((lambda: group.update(lr=3e-3), False),             # traced: refill
                          (lambda: group.update(betas=(0.8, 0.95)), False),   # traced tuple
                          (lambda: group.update(weight_decay=0), True),       # int: new type
                          (lambda: group.update(nesterov=True), True),        # static
                          (lambda: group.update(lr=torch.tensor(1e-3)), True),  # never cached
                          (lambda: group.update(lr=2e-3), False),  # the cached structure
                          (lambda: group.update(lr=1e-3), False)):
    change()
    parses.clear()
    e = entry()
    assert bool(parses) == reparse
    assert same(e, fresh())
  assert dict(entry()[0])["nesterov"] is True


def test_param_groups_and_add_param_group_match_torch():
  m1, m2 = _mlp(), _mlp()
  opt = torch_bridge.Optimizer([{"params": m1[0].parameters(), "lr": 3e-2}], stax.adamw,
                               lr=1e-2, weight_decay=0.0, nonfinite="ignore")
  ref = torch.optim.AdamW([{"params": m2[0].parameters(), "lr": 3e-2}], lr=1e-2,
                          weight_decay=0.0)
  _train_pair(opt, ref, m1, m2, 5)
  opt.add_param_group({"params": m1[2].parameters(), "betas": (0.8, 0.99)})
  ref.add_param_group({"params": m2[2].parameters(), "betas": (0.8, 0.99)})
  _train_pair(opt, ref, m1, m2, 10)
  assert _maxdiff(m1, m2) < 1e-6
  sd = opt.state_dict()
  assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
  assert set(sd["state"]) == {0, 1, 2, 3}


def test_closure_hooks_and_profiler():
  m = _mlp()
  opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2)
  x, y = _data()
  calls = []
  opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
  opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

  def closure():
    opt.zero_grad()
    loss = F.mse_loss(m(x), y)
    loss.backward()
    return loss

  with torch.autograd.profiler.profile() as prof:
    loss = opt.step(closure)
  assert isinstance(loss, torch.Tensor) and loss.item() > 0
  assert calls == ["pre", "post"]
  assert any("Optimizer.step#Optimizer.step" in e.name for e in prof.function_events)
  opt.zero_grad(set_to_none=True)
  assert all(p.grad is None for p in m.parameters())
  # kineto profiler too; global hooks; a pre-hook may replace the closure (torch's contract)
  from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
  seen = []
  h1 = register_optimizer_step_pre_hook(lambda o, a, k: seen.append("gpre"))
  h2 = register_optimizer_step_post_hook(lambda o, a, k: seen.append("gpost"))
  other = []

  def replaced():
    other.append(1)
    return closure()

  h3 = opt.register_step_pre_hook(lambda o, a, k: ((o, replaced), k))
  try:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as kprof:
      opt.step(closure)
  finally:
    h1.remove(), h2.remove(), h3.remove()
  assert seen == ["gpre", "gpost"] and other == [1]
  assert any("Optimizer.step#Optimizer.step" in e.name for e in kprof.events())


# ----------------------------------------------------------------------------- DLPack
def test_dlpack_zero_copy_and_fallbacks():
  t = torch.randn(64, 64)
  a = convert.to_jax(t)
  assert convert.shares_memory(t, a)
  p = torch.nn.Parameter(torch.randn(32, 16))
  assert convert.shares_memory(p, convert.to_jax(p))  # detach() is a view
  before = dict(convert.copy_counts)
  nc = convert.to_jax(t.T)  # permuted strides: made contiguous (a copy)
  np.testing.assert_array_equal(np.asarray(nc), t.T.numpy())
  off = convert.to_jax(t.view(-1)[1:17])  # 4-byte storage offset: not 64-byte aligned
  np.testing.assert_array_equal(np.asarray(off), t.view(-1)[1:17].numpy())
  assert convert.copy_counts["non_contiguous"] == before.get("non_contiguous", 0) + 1
  assert convert.copy_counts["unaligned"] == before.get("unaligned", 0) + 1
  # a whole bridge step on ordinary parameters copies nothing on the way to JAX
  m = _mlp()
  opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2)
  x, y = _data()
  F.mse_loss(m(x), y).backward()
  ptrs = [q.data_ptr() for q in m.parameters()]
  before = dict(convert.copy_counts)
  opt.step()
  assert dict(convert.copy_counts) == before
  assert [q.data_ptr() for q in m.parameters()] == ptrs  # written back in place (copy_)
  # init never aliased a parameter (torch memory) into the JAX state
  state_ptrs = {x.unsafe_buffer_pointer() for st in opt._states.states.values()  # pylint: disable=protected-access
                for x in jax.tree.leaves(st) if x.size}
  assert not state_ptrs & set(ptrs)


@pytest.mark.parametrize("dtype,writeback", [(torch.bfloat16, "copy"), (torch.float16, "copy"),
                                             (torch.bfloat16, "swap")])
def test_low_precision_params_equal_pure_jax(dtype, writeback):
  m = _mlp(dtype=dtype)
  names = [n for n, _ in m.named_parameters()]
  p0 = {n: jnp.asarray(q.detach().float().numpy()).astype(jnp.dtype(str(dtype)[6:]))
        for n, q in m.named_parameters()}
  opt = torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-2, weight_decay=1e-2,
                               writeback=writeback)
  tx = bridged_adamw(learning_rate=1e-2, weight_decay=1e-2)
  states = {n: tx.init({n: p0[n]}) for n in names}
  ref_step = per_parameter_step(tx, names)  # per-parameter states, like the bridge's default

  x, y = _data(dtype=dtype)
  for _ in range(4):
    opt.zero_grad()
    F.mse_loss(m(x).float(), y.float()).backward()
    grads = {n: jnp.asarray(q.grad.float().numpy()).astype(p0[n].dtype)
             for n, q in m.named_parameters()}
    p0, states = ref_step(p0, states, grads)
    opt.step()
  for n, q in m.named_parameters():
    assert q.dtype == dtype
    np.testing.assert_array_equal(q.detach().float().numpy(), np.asarray(p0[n], np.float32))
  st = opt.state_dict()["state"][0]
  assert st["inner_state/0/mu"].dtype == dtype


# ----------------------------------------------------------------------------- registry
def _quad_tensors():
  params, _, targets = cp.quadratic()
  rng = np.random.default_rng(0)
  curv = jax.tree.map(lambda t: rng.uniform(0.5, 2.0, t.shape).astype(np.float32), targets)
  return params, targets, curv


def _grads_np(p, t, c):
  return c * (p - t)


@pytest.mark.parametrize("entry", MAIN, ids=[e.name for e in MAIN])
def test_registry_bridge_equals_pure_jax_and_resumes_bit_exact(entry):
  """Every main registry optimizer (tests.registry.MAIN): bridge (group scope) == pure JAX
  after 50 steps, and a torch.save/torch.load at step 25 continues bit for bit (the resumed
  copy runs with ``writeback="swap"``, so swap equals copy bit for bit for every optimizer
  too)."""
  params, targets, curv = _quad_tensors()
  names = [f"{m}.{k}" for m in params for k in params[m]]
  flat_t = {f"{m}.{k}": np.asarray(targets[m][k]) for m in params for k in params[m]}
  flat_c = {f"{m}.{k}": curv[m][k] for m in params for k in params[m]}

  def make_model(writeback="copy"):
    ps = [torch.nn.Parameter(torch.zeros(params[n.split(".")[0]][n.split(".")[1]].shape))
          for n in names]
    return ps, torch_bridge.Optimizer(list(zip(names, ps)), entry.factory, state_scope="group",
                                      static_args=entry.static_args, writeback=writeback,
                                      **entry.kwargs)

  def set_grads(ps):
    for n, p in zip(names, ps):
      p.grad = torch.from_numpy(_grads_np(p.detach().numpy(), flat_t[n], flat_c[n]))

  ps_a, opt_a = make_model()
  ps_b = opt_b = None
  for t in range(50):
    set_grads(ps_a)
    opt_a.step()
    if ps_b is not None:
      set_grads(ps_b)
      opt_b.step()
    if t == 24:
      buf = io.BytesIO()
      torch.save({"opt": opt_a.state_dict(), "params": [p.detach().clone() for p in ps_a]}, buf)
      buf.seek(0)
      ck = torch.load(buf, weights_only=False)
      ps_b, opt_b = make_model(writeback="swap")
      with torch.no_grad():
        for p, q in zip(ps_b, ck["params"]):
          p.copy_(q)
      opt_b.load_state_dict(ck["opt"])
  for p, q in zip(ps_a, ps_b):
    assert torch.equal(p, q), entry.name

  # Pure JAX on the same tree, same gradients and the same hyperparameter values: the bridge
  # feeds float hyperparameters as float32 arrays (inject_hyperparams), so the reference does
  # too (with Python floats, quantised states such as TurboAdam's flip codes on 1-ulp changes).
  traced, static = opt_a._hyperparams(0)  # pylint: disable=protected-access
  hp = {k: (tuple(jnp.asarray(x, jnp.float32) for x in v) if isinstance(v, tuple)  # betas
            else jnp.asarray(v, jnp.float32)) for k, v in traced.items()}
  jp = jax.tree.map(jnp.asarray, params)
  tt = jax.tree.map(jnp.asarray, targets)
  cc = jax.tree.map(jnp.asarray, curv)

  @jax.jit
  def run(p, hp):
    tx = entry.factory(**dict(static), **hp)

    def body(_, c):
      p, s = c
      u, s = tx.update(jax.tree.map(_grads_np, p, tt, cc), s, p)
      return optax.apply_updates(p, u), s
    return jax.lax.fori_loop(0, 50, body, (p, tx.init(p)))[0]

  out = run(jp, hp)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(out))
  for n, p in zip(names, ps_a):
    m, k = n.split(".")
    np.testing.assert_allclose(p.detach().numpy(), np.asarray(out[m][k]), rtol=0,
                               atol=2e-5 * max(scale, 1.0), err_msg=f"{entry.name} {n}")


# ----------------------------------------------------------------------------- state_dict
class _U8(NamedTuple):
  """A test codec: v stored as uint8 codes of sqrt(v) with a float32 scale, rounded
  stochastically (so the state has uint8 codes, an int32 count and a uint32 key, which the
  state dict holds as its int32 bits)."""

  needs_key: bool = True

  def init(self, param):
    return (jnp.zeros(param.shape, jnp.uint8), jnp.ones((), jnp.float32))

  def decode(self, enc, like):
    codes, scale = enc
    return (codes.astype(jnp.float32) * scale / 255.0) ** 2

  def encode(self, value, key):
    r = jnp.sqrt(value.astype(jnp.float32))
    scale = jnp.maximum(jnp.max(r), 1e-30)
    x = r / scale * 255.0
    noise = jax.random.uniform(jax.random.wrap_key_data(key), x.shape)
    return (jnp.clip(jnp.floor(x + noise), 0, 255).astype(jnp.uint8), scale)


def _u8_adam(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
  storage = stax.SeparateStorage(stax.FullPrecision(jnp.float32), _U8())
  return optax.chain(stax.scale_by_adam(b1, b2, eps, storage=storage),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))


@pytest.mark.parametrize("factory,dtype", [(stax.adamw, torch.bfloat16),
                                           (_u8_adam, torch.float32), (_u8_adam, torch.bfloat16)])
def test_save_load_continue_is_bit_exact_and_never_casts(factory, dtype):
  def make():
    m = _mlp(dtype=dtype)
    return m, torch_bridge.Optimizer(m.named_parameters(), factory, lr=1e-2, weight_decay=1e-3)

  x, y = _data(dtype=dtype)

  def train(m, o, n, sched):
    for _ in range(n):
      o.zero_grad()
      F.mse_loss(m(x), y).backward()
      o.step()
      sched.step()

  m_a, o_a = make()
  s_a = torch.optim.lr_scheduler.CosineAnnealingLR(o_a, 20)
  train(m_a, o_a, 6, s_a)
  buf = io.BytesIO()
  torch.save({"m": m_a.state_dict(), "o": o_a.state_dict(), "s": s_a.state_dict()}, buf)
  train(m_a, o_a, 6, s_a)

  buf.seek(0)
  ck = torch.load(buf)
  m_b, o_b = make()
  s_b = torch.optim.lr_scheduler.CosineAnnealingLR(o_b, 20)
  m_b.load_state_dict(ck["m"])
  o_b.load_state_dict(ck["o"])
  s_b.load_state_dict(ck["s"])
  st = o_b.state_dict()["state"][0]
  dtypes = {k: v.dtype for k, v in st.items()}
  assert ck["o"]["state"][0].keys() == st.keys()
  for k, v in ck["o"]["state"][0].items():
    assert dtypes[k] == v.dtype, k  # nothing was cast to the parameter dtype
  if factory is _u8_adam:
    assert torch.uint8 in dtypes.values() and torch.uint32 not in dtypes.values()
    assert torch.int32 in dtypes.values()
    # torch's own load_state_dict policy would have cast the counter to the param dtype
    cnt = [k for k in st if k.endswith("count")][0]
    casted = torch.optim.Optimizer._process_value_according_to_param_policy(
        next(iter(m_b.parameters())), st[cnt], 0, [{"params": [0]}], cnt)
    assert casted.dtype == dtype
  train(m_b, o_b, 6, s_b)
  for a, b in zip(m_a.parameters(), m_b.parameters()):
    assert torch.equal(a, b)


def test_load_state_dict_rejects_mismatches():
  m = _mlp()
  o = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2)
  x, y = _data()
  F.mse_loss(m(x), y).backward()
  o.step()
  sd = o.state_dict()
  key = [k for k in sd["state"][0] if k.endswith("/mu")][0]
  sd["state"][0][key] = sd["state"][0][key].double()
  o2 = torch_bridge.Optimizer(_mlp().parameters(), stax.adamw, lr=1e-2)
  with pytest.raises(ValueError, match="mu"):
    o2.load_state_dict(sd)
  with pytest.raises(ValueError, match="groups"):
    o2.load_state_dict({"state": {}, "param_groups": sd["param_groups"] * 2})


def test_float16_checkpoint_with_a_float16_v_loads_widened():
  """v of a float16 parameter is float32 (stax.FullPrecision's widen_float16); a checkpoint
  saved when it was float16 loads, widened exactly, and continues as the same state in
  float32 does; a narrowing (float32 saved where float16 is kept) is still refused."""
  x, y = _data(dtype=torch.float16)

  def make(sd=None):
    torch.manual_seed(0)
    m = _mlp(dtype=torch.float16)
    o = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2)
    if sd is not None:
      m.load_state_dict(sd["m"])
      o.load_state_dict(sd["o"])
    return m, o

  def train(m, o, n):
    for _ in range(n):
      o.zero_grad()
      F.mse_loss(m(x).float(), y.float()).backward()
      o.step()

  m, o = make()
  train(m, o, 3)
  saved = {"m": m.state_dict(), "o": o.state_dict()}
  key = [k for k in saved["o"]["state"][0] if k.endswith("/nu")][0]
  assert saved["o"]["state"][0][key].dtype == torch.float32
  old = copy.deepcopy(saved)
  for st in old["o"]["state"].values():   # as before: v in float16, its values exact in both
    st[key] = st[key].half()
  exact = copy.deepcopy(old)
  for st in exact["o"]["state"].values():
    st[key] = st[key].float()
  m_a, o_a = make(old)
  m_b, o_b = make(exact)
  assert o_a.state_dict()["state"][0][key].dtype == torch.float32
  train(m_a, o_a, 3)
  train(m_b, o_b, 3)
  for a, b in zip(m_a.parameters(), m_b.parameters()):
    assert torch.equal(a, b)
  mu = [k for k in saved["o"]["state"][0] if k.endswith("/mu")][0]
  for st in old["o"]["state"].values():
    st[mu] = st[mu].float()                 # m is kept in float16: no narrowing on load
  with pytest.raises(ValueError, match="mu"):
    make(old)


# ----------------------------------------------------------------------------- None grads
def test_none_grad_group_scope_keeps_that_params_moments():
  m = _mlp()
  o = torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-2, state_scope="group")
  x, y = _data()
  F.mse_loss(m(x), y).backward()
  o.step()
  before = o.state_dict()["state"][0]
  o.zero_grad()
  F.mse_loss(m(x), y).backward()
  m[0].weight.grad = None
  w0 = m[0].weight.detach().clone()
  o.step()
  after = o.state_dict()["state"][0]
  key = [k for k in after if k.endswith("mu/0/weight")][0]
  assert torch.equal(before[key], after[key])
  other = [k for k in after if k.endswith("mu/2/weight")][0]
  assert not torch.equal(before[other], after[other])
  assert torch.equal(m[0].weight, w0)


# ----------------------------------------------------------------------------- errors
def test_errors():
  with pytest.raises(TypeError, match="complex"):
    torch_bridge.Optimizer([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))],
                           stax.adamw)
  with pytest.raises(TypeError, match="float64"):
    torch_bridge.Optimizer([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))],
                           stax.adamw)
  with pytest.raises(TypeError, match="momentum"):
    torch_bridge.Optimizer(_mlp().parameters(), stax.adamw, momentum=0.9)
  with pytest.raises(ValueError, match="learning_rate"):
    torch_bridge.Optimizer(_mlp().parameters(), stax.adamw, lr=-1.0)
  with pytest.raises(TypeError, match="value"):
    torch_bridge.Optimizer(_mlp().parameters(), optax.contrib.reduce_on_plateau)
  emb = torch.nn.Embedding(10, 4, sparse=True)
  o = torch_bridge.Optimizer(emb.parameters(), stax.adamw)
  emb(torch.tensor([1, 2])).sum().backward()
  with pytest.raises(RuntimeError, match="sparse"):
    o.step()
  # a transform whose update needs `value=` (only visible when it runs)
  m = _mlp()
  o = torch_bridge.Optimizer(
      m.parameters(),
      lambda learning_rate=1e-2: optax.chain(optax.adam(learning_rate),
                                             optax.contrib.reduce_on_plateau()))
  x, y = _data()
  F.mse_loss(m(x), y).backward()
  with pytest.raises(TypeError, match="torch training loop"):
    o.step()


# ----------------------------------------------------------------------------- layout
def test_matrix_transform_gets_torch_layout():
  """optax muon on torch (out, in) weights with the bridge's dimension numbers equals muon on
  the transposed (in, out) kernels with optax's default dimension numbers."""
  torch.manual_seed(0)
  lin = torch.nn.Linear(12, 5, bias=False)
  w_in_out = jnp.asarray(lin.weight.detach().numpy().T)
  opt = torch_bridge.Optimizer(lin.named_parameters(), optax.contrib.muon, lr=2e-2,
                               layout_kwarg="muon_weight_dimension_numbers")
  tx = optax.contrib.muon(2e-2)
  state = tx.init({"weight": w_in_out})
  p = {"weight": w_in_out}
  x = torch.randn(7, 12)
  for _ in range(3):
    opt.zero_grad()
    lin(x).square().sum().backward()
    g = {"weight": jnp.asarray(lin.weight.grad.numpy().T)}
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    opt.step()
  np.testing.assert_allclose(lin.weight.detach().numpy().T, np.asarray(p["weight"]),
                             atol=2e-6)
  # and the layout matters: without it the bridge computes something else
  lin2 = torch.nn.Linear(12, 5, bias=False)
  with torch.no_grad():
    lin2.weight.copy_(torch.from_numpy(np.asarray(w_in_out).T.copy()))
  o2 = torch_bridge.Optimizer(lin2.parameters(), optax.contrib.muon, lr=2e-2)
  lin2(x).square().sum().backward()
  o2.step()
  lin3 = torch.nn.Linear(12, 5, bias=False)
  with torch.no_grad():
    lin3.weight.copy_(torch.from_numpy(np.asarray(w_in_out).T.copy()))
  o3 = torch_bridge.Optimizer(lin3.named_parameters(), optax.contrib.muon, lr=2e-2,
                              layout_kwarg="muon_weight_dimension_numbers")
  lin3(x).square().sum().backward()
  o3.step()
  assert (lin2.weight - lin3.weight).abs().max() > 1e-4


def test_each_groups_own_transform_gets_the_torch_layout_exactly_when_it_takes_it():
  """A param group's ``"transform"`` gets the torch layout if and only if it takes
  ``dimension_numbers``, whatever the default transform is: OAdamW in a group under a default
  ``optax.adam`` steps a conv weight as the same OAdamW does as the default (its ``(out,
  in·kh·kw)`` matrix, not a guess of the Flax layout), and ``optax.lion`` in a group under a
  default ``stax.adamw`` (which takes it) is not handed an argument it lacks. (Before stop 54
  the default transform decided for every group: the first raised ``TypeError`` at the first
  ``step()``, the second stepped the conv weight as another matrix, 3e-2 off; and a group's
  factory took the default factory's own defaults for what the user left unset: OAdamW's
  ``betas``/``eps`` were optax.adam's.)"""
  def conv():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 4))
  torch.manual_seed(3)
  x, y = torch.randn(8, 4, 8, 8), torch.randint(0, 4, (8,))

  def run(m, opts, n=3):
    for _ in range(n):
      for o in opts:
        o.zero_grad()
      torch.nn.functional.cross_entropy(m(x), y).backward()
      for o in opts:
        o.step()
    return [p.detach().clone() for p in m.parameters()]

  m1 = conv()
  ps = list(m1.named_parameters())
  grouped = torch_bridge.Optimizer([{"params": ps[:2], "transform": stax.oadamw},
                                    {"params": ps[2:]}], optax.adam, lr=1e-2)
  m2 = conv()
  ps = list(m2.named_parameters())
  alone = [torch_bridge.Optimizer(ps[:2], stax.oadamw, lr=1e-2),
           torch_bridge.Optimizer(ps[2:], optax.adam, lr=1e-2)]
  a, b = run(m1, [grouped]), run(m2, alone)
  assert [r.matrix for r in grouped.describe() if r.path == "0.weight"] == [(1, 36, 8)]
  for pa, pb in zip(a, b):
    np.testing.assert_allclose(pa.numpy(), pb.numpy(), atol=1e-6)
  # lion under a default that takes the layout
  m3 = conv()
  ps = list(m3.named_parameters())
  lion = torch_bridge.Optimizer([{"params": ps[:2]},
                                 {"params": ps[2:], "transform": optax.lion, "lr": 1e-4}],
                                stax.adamw, lr=1e-3)
  # what the user left unset is lion's own default, not stax.adamw's (torch semantics for
  # what the user passed: lr=1e-3 reaches the first group, the group's lr its own)
  assert lion.param_groups[1]["weight_decay"] == 1e-3 and lion.param_groups[0]["weight_decay"] == 1e-4
  assert tuple(lion.param_groups[1]["betas"]) == (0.9, 0.99)
  w0 = m3[2].weight.detach().clone()
  run(m3, [lion], 1)
  # lion's first step is -lr·(sign(g) + wd·w) (m starts at 0, b1 = 0.9 mixes in g alone)
  m4 = conv()
  torch.nn.functional.cross_entropy(m4(x), y).backward()
  want = -1e-4 * (torch.sign(m4[2].weight.grad) + 1e-3 * w0)
  np.testing.assert_allclose((m3[2].weight.detach() - w0).numpy(), want.numpy(), atol=4e-9)


# ----------------------------------------------------------------------------- release
def test_gradient_release_equals_normal_step():
  m1, m2 = _mlp(), _mlp()
  o1 = torch_bridge.Optimizer(m1.named_parameters(), stax.adamw, lr=1e-2, weight_decay=1e-2)
  o2 = torch_bridge.Optimizer(m2.named_parameters(), stax.adamw, lr=1e-2, weight_decay=1e-2)
  torch_bridge.prepare_for_gradient_release(m2, o2)
  x, y = _data()
  for _ in range(3):
    o1.zero_grad()
    F.mse_loss(m1(x), y).backward()
    o1.step()
    F.mse_loss(m2(x), y).backward()  # each parameter stepped by its hook
    assert all(p.grad is None for p in m2.parameters())
    o2.step()  # no-op
  assert _maxdiff(m1, m2) == 0.0
  torch_bridge.remove_gradient_release(o2)
  F.mse_loss(m2(x), y).backward()
  assert m2[0].weight.grad is not None


def test_swap_writeback_equals_copy_and_updates_in_place():
  m1, m2 = _mlp(), _mlp()
  o1 = torch_bridge.Optimizer(m1.parameters(), stax.adamw, lr=1e-2)
  o2 = torch_bridge.Optimizer(m2.parameters(), stax.adamw, lr=1e-2, writeback="swap")
  ptr0 = m2[0].weight.data_ptr()
  _train_pair(o1, o2, m1, m2, 2)
  # the first step moves each parameter into a JAX-owned buffer...
  ptrs = [p.data_ptr() for p in m2.parameters()]
  assert ptrs[0] != ptr0
  # ...which XLA then updates in place (donated): the same addresses step after step, also
  # when a parameter has no gradient on some steps (it is read, not donated, then)
  _train_pair(o1, o2, m1, m2, 6, none_every=2)
  assert [p.data_ptr() for p in m2.parameters()] == ptrs
  assert _maxdiff(m1, m2) == 0.0
  with pytest.raises(ValueError, match="writeback"):
    torch_bridge.Optimizer(m1.parameters(), stax.adamw, writeback="move")


def test_swap_writeback_keeps_a_channels_last_weight_channels_last():
  """A channels_last conv weight stays channels_last through swap-mode steps, as through
  torch.optim.AdamW's and copy mode's (its row-major JAX buffer had become the weight, and
  its next gradient was contiguous), with copy mode's values; a contiguous parameter beside it
  still moves into its JAX-owned buffer."""
  def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 16, 2))
  m1, m2 = model(), model()
  for m in (m1, m2):
    m[0].to(memory_format=torch.channels_last)
  o1 = torch_bridge.Optimizer(m1.named_parameters(), stax.adamw, lr=1e-2)
  o2 = torch_bridge.Optimizer(m2.named_parameters(), stax.adamw, lr=1e-2, writeback="swap")
  x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
  lin = m2[2].weight.data_ptr()
  for _ in range(3):
    for m, o in ((m1, o1), (m2, o2)):
      o.zero_grad()
      m(x).square().sum().backward()
      o.step()
  w = m2[0].weight
  assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
  m2(x).square().sum().backward()
  assert w.grad.is_contiguous(memory_format=torch.channels_last)
  assert m2[2].weight.data_ptr() != lin        # moved into a JAX buffer, as before
  assert _maxdiff(m1, m2) == 0.0


def test_swap_writeback_never_frees_memory_a_view_holds():
  """Torch views each JAX-owned buffer through DLPack and lets go of it for the call: a view
  of the parameter held elsewhere keeps a reference, so JAX does not donate that buffer (the
  parameter moves to a new one) and the view keeps its values — never freed, never reused. A
  view taken before the first step keeps torch's own memory."""
  m1, m2 = _mlp(), _mlp()
  o1 = torch_bridge.Optimizer(m1.parameters(), stax.adamw, lr=1e-2)
  o2 = torch_bridge.Optimizer(m2.parameters(), stax.adamw, lr=1e-2, writeback="swap")
  first = m2[0].weight.detach()
  first_values = first.clone()
  _train_pair(o1, o2, m1, m2, 2)
  assert torch.equal(first, first_values)  # torch's original storage: untouched, not freed
  view = m2[0].weight.detach()
  view_values = view.clone()
  _train_pair(o1, o2, m1, m2, 3)
  assert torch.equal(view, view_values)
  assert m2[0].weight.data_ptr() != view.data_ptr()
  assert _maxdiff(m1, m2) == 0.0
  del view
  # the buffers outlive the optimizer (each tensor keeps the JAX array it views alive)
  expect = [p.detach().clone() for p in m2.parameters()]
  del o2
  import gc
  gc.collect()
  jax.clear_caches()
  junk = [jnp.full((6, 6), 7.0) + i for i in range(8)]  # reuse any freed buffer
  jax.block_until_ready(junk)
  assert all(torch.equal(p.detach(), e) for p, e in zip(m2.parameters(), expect))


def test_swap_writeback_sees_values_torch_writes_into_its_buffers():
  """model.load_state_dict writes into the JAX-owned buffers in place; the next step uses the
  loaded values (a rewind to a checkpoint replays the same steps bit for bit)."""
  import copy
  m = _mlp()
  opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2, writeback="swap")
  x, y = _data()

  def train(n):
    for _ in range(n):
      opt.zero_grad()
      F.mse_loss(m(x), y).backward()
      opt.step()

  train(3)
  ptrs = [p.data_ptr() for p in m.parameters()]
  ck_m, ck_o = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
  train(2)
  after = [p.detach().clone() for p in m.parameters()]
  m.load_state_dict(ck_m)
  opt.load_state_dict(ck_o)
  assert [p.data_ptr() for p in m.parameters()] == ptrs  # copied into the same buffers
  train(2)
  for p, a in zip(m.parameters(), after):
    assert torch.equal(p.detach(), a)


def test_swap_writeback_gives_parameters_back_when_the_step_fails():
  def broken(learning_rate=1e-3):
    def update(updates, state, params=None):
      raise ValueError("broken transform")
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  m = _mlp()
  opt = torch_bridge.Optimizer(m.parameters(), broken, lr=1e-3, writeback="swap")
  before = [p.detach().clone() for p in m.parameters()]
  x, y = _data()
  F.mse_loss(m(x), y).backward()
  with pytest.raises(ValueError, match="broken transform"):
    opt.step()
  for p, b in zip(m.parameters(), before):
    assert p.shape == b.shape and torch.equal(p.detach(), b)


def test_step_outputs_alias_their_own_buffers():
  """The compiled step needs no temporary copy of any moment: each output reuses the donated
  buffer it replaces (a mismatched output order made XLA copy every moment: 1.8x slower)."""
  torch.manual_seed(0)
  m = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(4)])
  for writeback in ("copy", "swap"):
    # nonfinite="ignore": the default guard's lax.cond has temporaries of its own
    opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-3, nonfinite="ignore",
                                 writeback=writeback)
    for p in m.parameters():
      p.grad = torch.randn_like(p)
    opt.step()
    plan = next(iter(opt._plans.values()))  # pylint: disable=protected-access
    seen = {}

    def spy(*args, real=plan.compiled.fn):
      seen["args"] = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a,
          args)
      return real(*args)

    real = plan.compiled.fn
    plan.compiled.fn = spy
    opt.step()
    plan.compiled.fn = real
    stats = real.lower(*seen["args"]).compile().memory_analysis()
    one_param = 64 * 64 * 4
    assert stats.temp_size_in_bytes < one_param, (writeback, stats)
    assert stats.alias_size_in_bytes >= 3 * 4 * one_param  # p, mu, nu of every layer


def test_ready_transformation_is_accepted():
  m = _mlp()
  w0 = m[0].weight.detach().clone()
  opt = torch_bridge.Optimizer(m.parameters(), optax.sgd(0.1))
  x, y = _data()
  F.mse_loss(m(x), y).backward()
  g = m[0].weight.grad.clone()
  opt.step()
  torch.testing.assert_close(m[0].weight.detach(), w0 - 0.1 * g, rtol=0, atol=1e-7)
  with pytest.raises(TypeError, match="factory"):
    torch_bridge.Optimizer(m.parameters(), optax.sgd(0.1), lr=0.1)


def test_a_models_conv1d_weights_are_matrices_stored_in_out():
  """Hugging Face ``Conv1D`` weights (GPT-2's ``c_fc``, ``c_proj``) are stored ``(in, out)``;
  a drop-in built from the model reads them so (:class:`torch_bridge.ModuleLayout`): OAdamW's
  step of a ``Conv1D`` weight is the transpose of its step of the same layer as ``nn.Linear``
  (``(out, in)``) with the transposed gradient. By name alone (``c_attn`` only) the bridge
  read ``c_fc`` as ``(out, in)``: with ``shape_scale="original"`` its update was 2x too small
  (fan-out 128 over fan-in 32)."""
  pu = pytest.importorskip("transformers.pytorch_utils")
  torch.manual_seed(0)
  conv = torch.nn.ModuleDict({"c_fc": pu.Conv1D(128, 32), "c_proj": pu.Conv1D(32, 128)})
  lin = torch.nn.ModuleDict({"c_fc": torch.nn.Linear(32, 128), "c_proj": torch.nn.Linear(128, 32)})
  with torch.no_grad():
    for k in conv:
      conv[k].weight.normal_(0, 0.1)
      lin[k].weight.copy_(conv[k].weight.T)
      lin[k].bias.copy_(conv[k].bias)
  layout = torch_bridge.ModuleLayout(conv)
  D = stax.MatrixDimensionNumbers
  assert dict(layout.dims) == {"c_fc.weight": D(0, 1), "c_proj.weight": D(0, 1)}
  assert torch_bridge.ModuleLayout(lin).dims == ()
  moved = []
  for model, t in ((conv, True), (lin, False)):
    opt = torch_bridge.OAdamW(model, lr=1e-2, weight_decay=0.0, grouping="seed",
                              shape_scale="original")
    before = {k: model[k].weight.detach().clone() for k in model}
    g = torch.Generator().manual_seed(5)
    for k in model:
      grad = torch.randn(conv[k].weight.shape, generator=g)
      model[k].weight.grad = grad if t else grad.T.contiguous()
      model[k].bias.grad = torch.zeros_like(model[k].bias)
    opt.step()
    moved.append({k: (model[k].weight.detach() - before[k]) for k in model})
    if t:
      copied = pickle.loads(pickle.dumps(opt))
  for k in conv:
    torch.testing.assert_close(moved[0][k], moved[1][k].T, rtol=1e-5, atol=1e-7)
  assert float(moved[0]["c_fc"].pow(2).mean().sqrt()) > 0
  assert copied._layout.fn == layout


def _muon_step(model, grads, **kw):
  """One OAdamW step (lr 1, no decay, every matrix to Muon) of ``model`` with ``grads``
  (name -> tensor); the change of each parameter."""
  opt = torch_bridge.OAdamW(model, lr=1.0, weight_decay=0.0, grouping="seed", **kw)
  before = {n: p.detach().clone() for n, p in model.named_parameters()}
  for n, p in model.named_parameters():
    p.grad = grads[n].clone()
  opt.step()
  return {n: p.detach() - before[n] for n, p in model.named_parameters()}, opt


@pytest.mark.parametrize("name", ["qkv", "qkv_proj", "Wqkv", "to_qkv"])
def test_a_fused_qkv_linear_is_three_matrices(name):
  """A ``[q; k; v]`` linear ``(3E, E)`` under its common names (timm's ViT ``attn.qkv``,
  Phi-3's ``qkv_proj``, ModernBERT's ``Wqkv``, vit-pytorch's ``to_qkv``) steps as the three
  projections unfused (it was one ``3E × E`` matrix: Muon's step mixed them); a grouped-query
  ``(E + 2·kv, E)`` and GPT-NeoX's interleaved ``query_key_value`` stay one matrix."""
  D = stax.MatrixDimensionNumbers
  g = torch.Generator().manual_seed(1)
  e = 8
  fused = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict(
      {name: torch.nn.Linear(e, 3 * e, bias=False)})})
  grad = torch.randn(3 * e, e, generator=g)
  d, _ = _muon_step(fused, {f"attn.{name}.weight": grad})
  parts = torch.nn.ModuleDict({k: torch.nn.Linear(e, e, bias=False) for k in "qkv"})
  dp, _ = _muon_step(parts, {f"{k}.weight": grad[i * e:(i + 1) * e] for i, k in enumerate("qkv")})
  torch.testing.assert_close(d[f"attn.{name}.weight"],
                             torch.cat([dp[f"{k}.weight"] for k in "qkv"]), rtol=1e-5, atol=1e-6)
  one = torch.nn.ModuleDict({"w": torch.nn.Linear(e, 3 * e, bias=False)})
  d1, _ = _muon_step(one, {"w.weight": grad})
  assert float((d1["w.weight"] - d[f"attn.{name}.weight"]).abs().max()) > 0.05
  assert torch_bridge.torch_dimension_numbers((3 * e, e), f"attn.{name}.weight") == D(
      1, 0, output_groups=3)
  assert torch_bridge.torch_dimension_numbers((e + 4, e), f"attn.{name}.weight") == D(1, 0)
  assert torch_bridge.torch_dimension_numbers((3 * e, e), "attn.query_key_value.weight") == D(
      1, 0)


def test_a_models_module_types_give_its_matrices():
  """:class:`torch_bridge.ModuleLayout` reads module types where a name and a shape mislead:
  a ``ConvTranspose2d`` weight ``(in, out, kh, kw)`` steps as its equivalent conv's weight
  ``(out, in, kh, kw)`` (it had been read with fan-in and fan-out swapped: 0.25 off); LSTM and
  GRU gate weights are 4 and 3 matrices (each gate's step equals Muon on that gate alone; one
  fused matrix had been 0.27-0.33 off); a grouped conv's groups are independent matrices (a
  change in one group's gradient had moved the others' updates by 0.18-0.23); GPT-2's
  cross-attention ``c_attn`` (E, 2E) is two matrices and GPT-BigCode's ``nn.Linear`` ``c_attn``
  one ``(out, in)`` matrix (they had been split in three: 0.36 off, or raised ``ValueError``);
  ``nn.Embedding`` weights stay out of Muon whatever their names; and the generic
  ``Optimizer`` given the model uses the same layout and names."""
  D = stax.MatrixDimensionNumbers
  g = torch.Generator().manual_seed(0)
  rnd = lambda *s: torch.randn(*s, generator=g)
  # transposed conv == its equivalent conv (weight permuted; the kernel flip permutes columns)
  torch.manual_seed(0)
  convt = torch.nn.ModuleDict({"up": torch.nn.ConvTranspose2d(8, 16, 3, bias=False)})
  conv = torch.nn.ModuleDict({"up": torch.nn.Conv2d(8, 16, 3, bias=False)})
  to_conv = lambda w: w.permute(1, 0, 2, 3).flip(2, 3)
  with torch.no_grad():
    conv["up"].weight.copy_(to_conv(convt["up"].weight))
  gt = rnd(8, 16, 3, 3)
  dt, _ = _muon_step(convt, {"up.weight": gt})
  dc, _ = _muon_step(conv, {"up.weight": to_conv(gt)})
  torch.testing.assert_close(to_conv(dt["up.weight"]), dc["up.weight"], rtol=1e-5, atol=1e-6)
  # RNN gates: each gate's step is Muon on that gate alone
  for rnn, gates in ((torch.nn.LSTM(6, 8), 4), (torch.nn.GRU(6, 8), 3)):
    grads = {n: rnd(*p.shape) for n, p in rnn.named_parameters()}
    d, opt = _muon_step(rnn, grads)
    assert torch_bridge.ModuleLayout(rnn)((gates * 8, 6), "weight_ih_l0") == D(
        1, 0, output_groups=gates)
    for name in ("weight_ih_l0", "weight_hh_l0"):
      w = dict(rnn.named_parameters())[name]
      parts = torch.nn.ModuleDict({f"g{i}": torch.nn.Linear(w.shape[1], 8, bias=False)
                                   for i in range(gates)})
      with torch.no_grad():
        for i in range(gates):
          parts[f"g{i}"].weight.copy_(w[8 * i:8 * (i + 1)] - d[name][8 * i:8 * (i + 1)])
      dp, _ = _muon_step(parts, {f"g{i}.weight": grads[name][8 * i:8 * (i + 1)]
                                 for i in range(gates)})
      torch.testing.assert_close(d[name], torch.cat([dp[f"g{i}.weight"] for i in range(gates)]),
                                 rtol=1e-5, atol=1e-6)
  # grouped conv: groups independent
  torch.manual_seed(0)
  gconv = torch.nn.ModuleDict({"c": torch.nn.Conv2d(8, 8, 3, groups=2, bias=False)})
  w0 = gconv["c"].weight.detach().clone()
  grad = rnd(8, 4, 3, 3)
  d1, opt = _muon_step(gconv, {"c.weight": grad})
  assert opt.describe().by_path["c.weight"].matrix == (2, 36, 4)
  with torch.no_grad():
    gconv["c"].weight.copy_(w0)
  grad2 = grad.clone()
  grad2[:4] *= 100.0
  d2, _ = _muon_step(gconv, {"c.weight": grad2})
  torch.testing.assert_close(d1["c.weight"][4:], d2["c.weight"][4:], rtol=1e-5, atol=1e-6)
  # c_attn: GPT-2 cross-attention (E, 2E) two matrices; an nn.Linear c_attn torch's (out, in)
  pu = pytest.importorskip("transformers.pytorch_utils")
  attn = torch.nn.ModuleDict({"c_attn": pu.Conv1D(32, 16), "q_attn": pu.Conv1D(16, 16)})
  assert torch_bridge.ModuleLayout(attn)((16, 32), "c_attn.weight") == D(0, 1, output_groups=2)
  lin = torch.nn.ModuleDict({"c_attn": torch.nn.Linear(16, 48)})   # (48, 16): BigCode style
  assert torch_bridge.ModuleLayout(lin)((48, 16), "c_attn.weight") == D(1, 0)
  assert torch_bridge.torch_dimension_numbers((16, 32), "x.c_attn.weight") == D(1, 0)
  # embeddings by type; the generic Optimizer given the model
  torch.manual_seed(0)
  lm = torch.nn.ModuleDict({"tok": torch.nn.Embedding(40, 8), "proj": torch.nn.Linear(8, 8),
                            "up": torch.nn.ConvTranspose2d(8, 16, 3)})
  drop = torch_bridge.OAdamW(lm).describe().by_path
  assert drop["tok.weight"].rule == "adam" and drop["proj.weight"].rule == "muon"
  generic = torch_bridge.Optimizer(lm, stax.oadamw).describe().by_path
  assert generic["up.weight"].matrix == drop["up.weight"].matrix == (1, 72, 16)


def test_reparametrised_weights_keep_their_modules_layout():
  """A weight under ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` /
  ``orthogonal`` (stored as ``parametrizations.<name>.original*``) or the older
  ``weight_norm``/``spectral_norm`` hooks (``weight_v``, ``weight_orig``) has its module's
  layout: a transposed conv's fan-in, a grouped conv's groups, an LSTM's gates (it had the
  plain ``(out, in)`` reading: HiFi-GAN's and wav2vec2's weight-normed convs); weight norm's
  magnitude is no matrix."""
  import warnings
  P = torch.nn.utils.parametrizations
  plain = {"tconv": torch.nn.ConvTranspose1d(8, 16, 3), "gconv": torch.nn.Conv1d(8, 16, 3, groups=4),
           "lstm": torch.nn.LSTM(4, 8)}
  want = {k: torch_bridge.ModuleLayout(m)(tuple(getattr(m, w).shape), w)
          for (k, m), w in zip(plain.items(), ("weight", "weight", "weight_hh_l0"))}
  assert want["tconv"] == stax.MatrixDimensionNumbers((0, 2), 1)
  assert want["gconv"].output_groups == 4 and want["lstm"].output_groups == 4
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # the older hooks are deprecated
    cases = [
        (lambda m, w: P.weight_norm(m, name=w), "parametrizations.{w}.original1",
         "parametrizations.{w}.original0"),
        (lambda m, w: P.spectral_norm(m, name=w), "parametrizations.{w}.original", None),
        (lambda m, w: torch.nn.utils.weight_norm(m, name=w), "{w}_v", "{w}_g"),
        (lambda m, w: torch.nn.utils.spectral_norm(m, name=w), "{w}_orig", None)]
    for wrap, direction, magnitude in cases:
      for (k, make), w in zip({"tconv": lambda: torch.nn.ConvTranspose1d(8, 16, 3),
                               "gconv": lambda: torch.nn.Conv1d(8, 16, 3, groups=4),
                               "lstm": lambda: torch.nn.LSTM(4, 8)}.items(),
                              ("weight", "weight", "weight_hh_l0")):
        m = wrap(make(), w)
        layout = torch_bridge.ModuleLayout(m)
        shapes = dict((n, tuple(p.shape)) for n, p in m.named_parameters())
        name = direction.format(w=w)
        assert layout(shapes[name], name) == want[k], (k, name)
        if magnitude is not None:
          g = magnitude.format(w=w)
          assert layout(shapes[g], g) is None, (k, g)
  m = P.weight_norm(torch.nn.ConvTranspose1d(8, 16, 3))
  d = torch_bridge.OAdamW(torch.nn.Sequential(m)).describe().by_path
  assert d["0.parametrizations.weight.original1"].matrix == (1, 24, 16)


def test_importing_the_bridge_starts_no_jax_backend():
  """``import torch_bridge`` leaves JAX's backends unstarted, so ``XLA_FLAGS`` a user sets
  after it (the README's lean-memory flag, a host device count) still take effect (its fast
  DLPack path had asked for the CPU device at import)."""
  import subprocess
  import sys
  code = ("import os, torch_bridge, stax\n"
          "from jax._src import xla_bridge\n"
          "assert not xla_bridge._backends, 'started at import'\n"
          "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=3'\n"
          "import jax, torch\n"
          "assert len(jax.devices()) == 3, jax.devices()\n"
          "m = torch.nn.Linear(4, 2)\n"
          "o = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-3)\n"
          "m(torch.ones(1, 4)).sum().backward(); o.step(); print('ok')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
