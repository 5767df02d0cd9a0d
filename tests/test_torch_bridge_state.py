"""``torch_bridge.Optimizer.state``: torch's parameter → state-dict mapping over the JAX state,
and gradient release as methods."""

from __future__ import annotations

import pytest
import torch

import stax
import torch_bridge

F = torch.nn.functional


def _mlp():
  torch.manual_seed(0)
  return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(m, opt, steps, freeze=()):
  g = torch.Generator().manual_seed(1)
  x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
  for _ in range(steps):
    opt.zero_grad()
    F.mse_loss(m(x), y).backward()
    for p in freeze:
      p.grad = None
    opt.step()


def test_state_maps_each_stepped_parameter_to_its_state_dict_entries():
  m = _mlp()
  opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2, weight_decay=1e-2)
  assert len(opt.state) == 0 and dict(opt.state.items()) == {}
  frozen = m[2].bias
  _train(m, opt, 2, freeze=[frozen])
  params = list(m.parameters())
  sd = opt.state_dict()["state"]
  assert len(opt.state) == 3 and frozen not in opt.state
  assert opt.state[frozen] == {} and opt.state.get(frozen) is None  # as torch's defaultdict
  assert [p for p in opt.state] == params[:3]
  for i, (p, st) in enumerate(opt.state.items()):
    assert p is params[i]
    assert set(st) == set(sd[i])
    for name, t in st.items():
      assert isinstance(t, torch.Tensor) and t.dtype == sd[i][name].dtype
      assert torch.equal(t, sd[i][name]), name
  mu = [k for k in opt.state[params[0]] if k.endswith("/mu")]
  nu = [k for k in opt.state[params[0]] if k.endswith("/nu")]
  assert mu and nu
  assert opt.state[params[0]][mu[0]].shape == params[0].shape
  assert opt.state[params[0]][mu[0]].abs().sum() > 0  # the moments are there
  counts = [v for k, v in opt.state[params[0]].items() if k.endswith("/count")]
  assert counts and all(int(c) == 2 for c in counts)


def test_state_is_a_read_only_copy_and_costs_nothing_per_step():
  m1, m2 = _mlp(), _mlp()
  o1 = torch_bridge.Optimizer(m1.parameters(), stax.adamw, lr=1e-2)
  o2 = torch_bridge.Optimizer(m2.parameters(), stax.adamw, lr=1e-2)
  _train(m1, o1, 1)
  _train(m2, o2, 1)
  # (the compiled step is shared by optimizers of the same configuration in this process,
  # so count what the reads below would add, not the absolute number)
  compiled = o2.trace_count
  for _ in range(3):
    for st in o2.state.values():  # reading (and scribbling on the copies) changes nothing
      for t in st.values():
        t.zero_()
    _train(m1, o1, 1)
    _train(m2, o2, 1)
  for p, q in zip(m1.parameters(), m2.parameters()):
    assert torch.equal(p, q)
  assert o2.trace_count == compiled  # reading the state recompiled nothing


def test_state_follows_load_state_dict_and_an_empty_assignment_resets():
  m = _mlp()
  opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2)
  _train(m, opt, 2)
  sd = opt.state_dict()
  m2 = _mlp()
  opt2 = torch_bridge.Optimizer(m2.parameters(), stax.adamw, lr=1e-2)
  opt2.load_state_dict(sd)
  for p, q in zip(m.parameters(), m2.parameters()):
    a, b = opt.state[p], opt2.state[q]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
  opt2.state = {}  # as `optimizer.state = defaultdict(dict)`: start the moments afresh
  assert len(opt2.state) == 0 and opt2.state_dict()["state"] == {}
  _train(m2, opt2, 1)
  counts = [v for k, v in opt2.state[m2[0].weight].items() if k.endswith("/count")]
  assert all(int(c) == 1 for c in counts)


def test_group_scope_state_sits_under_the_groups_first_parameter():
  m = _mlp()
  opt = torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-2, state_scope="group")
  _train(m, opt, 1)
  params = list(m.parameters())
  assert list(opt.state) == [params[0]]
  assert set(opt.state[params[0]]) == set(opt.state_dict()["state"][0])


def test_gradient_release_methods_equal_normal_step():
  m1, m2 = _mlp(), _mlp()
  o1 = torch_bridge.Optimizer(m1.parameters(), stax.adamw, lr=1e-2)
  o2 = torch_bridge.Optimizer(m2.parameters(), stax.adamw, lr=1e-2)
  handles = o2.enable_gradient_release()
  assert len(handles) == 4
  _train(m1, o1, 2)
  _train(m2, o2, 2)
  assert all(p.grad is None for p in m2.parameters())
  o2.disable_gradient_release()
  _train(m1, o1, 1)
  _train(m2, o2, 1)
  for p, q in zip(m1.parameters(), m2.parameters()):
    torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="state_scope"):
    torch_bridge.Optimizer(m2.parameters(), stax.adamw, state_scope="group"
                           ).enable_gradient_release()


def test_torch_distributed_state_dict_api_round_trips():
  """``torch.distributed.checkpoint.state_dict``'s get/set (FQN-keyed state, the FSDP2 path)
  load into a fresh optimizer as torch's own ``load_state_dict`` does: same state, same next
  step, and no FQN keys left behind as unknown entries."""
  from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                       set_optimizer_state_dict)
  m1, m2 = _mlp(), _mlp()
  o1 = torch_bridge.Optimizer(m1.parameters(), stax.adamw, lr=1e-2)
  o2 = torch_bridge.Optimizer(m2.parameters(), stax.adamw, lr=1e-2)
  _train(m1, o1, 2)
  _train(m2, o2, 1)                         # some other state to overwrite
  with torch.no_grad():
    for a, b in zip(m1.parameters(), m2.parameters()):
      b.copy_(a)
  sd = get_optimizer_state_dict(m1, o1)
  assert set(sd["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
  set_optimizer_state_dict(m2, o2, sd)
  s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
  assert set(s2) == set(s1) == {0, 1, 2, 3}
  for k in s1:
    for n, t in s1[k].items():
      assert torch.equal(t, s2[k][n]), (k, n)
  _train(m1, o1, 1)
  _train(m2, o2, 1)
  for a, b in zip(m1.parameters(), m2.parameters()):
    assert torch.equal(a, b)


def test_distributed_checkpoint_keeps_the_skipped_step_counter():
  """``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``: the bridge's
  ``nonfinite_skipped_steps`` (its top-level ``'bridge'`` entry) was lost there and a resumed
  run counted from 0. Every saved group carries it too; it loads from there and stays out of the
  live param groups. (``flatten_optimizer_state_dict=True`` rebuilds only the keys the live
  groups have, so there it still restarts from 0: README.)"""
  from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                       get_optimizer_state_dict,
                                                       set_optimizer_state_dict)
  m1, m2 = _mlp(), _mlp()
  o1 = torch_bridge.Optimizer(m1.parameters(), stax.adamw, lr=1e-2, global_nonfinite="skip")
  o2 = torch_bridge.Optimizer(m2.parameters(), stax.adamw, lr=1e-2, global_nonfinite="skip")
  x = torch.ones(2, 6)
  for i in range(4):
    o1.zero_grad()
    m1(x).sum().backward()
    if i in (1, 2):
      m1[0].weight.grad[0, 0] = float("nan")
    o1.step()
  _train(m2, o2, 1)
  assert (o1.nonfinite_skipped_steps, o2.nonfinite_skipped_steps) == (2, 0)
  options = StateDictOptions(flatten_optimizer_state_dict=False)
  sd = get_optimizer_state_dict(m1, o1, options=options)
  assert "bridge" not in sd
  set_optimizer_state_dict(m2, o2, sd, options=options)
  assert o2.nonfinite_skipped_steps == 2
  assert all("nonfinite_skipped_steps" not in g for g in o2.param_groups)
  # the plain state dict: the 'bridge' entry is read first; groups' keys alone load too
  plain = o1.state_dict()
  assert int(plain["bridge"]["nonfinite_skipped_steps"]) == 2
  del plain["bridge"]
  o3 = torch_bridge.Optimizer(_mlp().parameters(), stax.adamw, lr=1e-2, global_nonfinite="skip")
  o3.load_state_dict(plain)
  assert o3.nonfinite_skipped_steps == 2


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("writeback", ["copy", "swap"])
def test_state_stays_with_its_parameter_when_the_groups_change(named, writeback):
  """torch keys ``optimizer.state`` by tensor: a parameter taken out of the groups takes its
  state along, the others keep theirs, and a new tensor put in a removed one's place (model
  surgery: a resized embedding) starts afresh. The bridge had filed state by position, so
  after ``param_groups[0]["params"].pop(0)`` the next parameter stepped on with the removed
  one's moments, and a replacement of another shape raised ``TypeError`` in the step. Checked
  against ``torch.optim.AdamW`` step by step (unnamed parameters are called by position, which
  shifts: their state is renamed with them)."""
  torch.manual_seed(0)
  shapes = [(4,), (3, 5), (6,), (2, 3)]
  ts = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
  bs = [torch.nn.Parameter(t.detach().clone()) for t in ts]
  ref = torch.optim.AdamW(ts, lr=1e-2, weight_decay=1e-2)
  opt = torch_bridge.Optimizer([(f"p{i}", b) if named else b for i, b in enumerate(bs)],
                               stax.adamw, lr=1e-2, weight_decay=1e-2, writeback=writeback)
  g = torch.Generator().manual_seed(3)

  def step(pairs):
    for t, b in pairs:
      t.grad = torch.randn(t.shape, generator=g) * (1.0 + t.numel())
      b.grad = t.grad.clone()
    ref.step()
    opt.step()
    for t, b in pairs:
      torch.testing.assert_close(b, t, rtol=0, atol=2e-6)

  pairs = list(zip(ts, bs))
  step(pairs)
  step(pairs)
  for o in (ref, opt):                       # stop optimising the first parameter
    o.param_groups[0]["params"].pop(0)
    if named and o is opt:
      o.param_groups[0]["param_names"].pop(0)
  pairs = pairs[1:]
  assert bs[0] not in opt.state
  step(pairs)
  count = [v for k, v in opt.state[bs[1]].items() if k.endswith("/count")]
  assert [int(c) for c in count] == [3]
  # replace the last parameter by a larger new tensor (its own, fresh state), reorder the rest
  t_new = torch.nn.Parameter(torch.randn(4, 3))
  b_new = torch.nn.Parameter(t_new.detach().clone())
  ref.param_groups[0]["params"] = [t_new, ts[2], ts[1]]
  opt.param_groups[0]["params"] = [b_new, bs[2], bs[1]]
  if named:
    opt.param_groups[0]["param_names"] = ["new", "p2", "p1"]
  pairs = [(t_new, b_new), (ts[2], bs[2]), (ts[1], bs[1])]
  assert bs[3] not in opt.state and b_new not in opt.state
  step(pairs)
  step(pairs)
  counts = {i: [int(v) for k, v in opt.state[b].items() if k.endswith("/count")]
            for i, b in ((0, b_new), (1, bs[1]), (2, bs[2]))}
  assert counts == {0: [2], 1: [5], 2: [5]}
  assert len(opt.state_dict()["state"]) == 3


def test_group_scope_state_stays_with_an_unchanged_group():
  """With ``state_scope="group"`` a group's state stays with the group while it has the same
  tensors in the same order, when an earlier group changes (the positions and unnamed
  parameters' names it is filed by shift); a group whose tensors changed starts afresh."""
  m = _mlp()
  params = list(m.parameters())
  opt = torch_bridge.Optimizer([{"params": params[:2]}, {"params": params[2:]}], stax.adamw,
                               lr=1e-2, state_scope="group")
  _train(m, opt, 2)
  kept = {k: v.clone() for k, v in opt.state[params[2]].items()}
  opt.param_groups[0]["params"].pop(1)
  now = opt.state[params[2]]   # the same leaves (unnamed parameters renamed: param_2 → param_1)
  assert [k.replace("param_2", "param_1").replace("param_3", "param_2") for k in kept] == list(now)
  for a, b in zip(kept.values(), now.values()):
    assert torch.equal(a, b)
  assert params[0] not in opt.state       # its group changed: it starts again
  _train(m, opt, 1)
  counts = [int(v) for k, v in opt.state[params[2]].items() if k.endswith("/count")]
  assert counts == [3]
  counts = [int(v) for k, v in opt.state[params[0]].items() if k.endswith("/count")]
  assert counts == [1]


def test_state_pop_and_del_of_a_parameter_without_state_are_torchs():
  """``optimizer.state.pop(p, None)`` for a parameter with no state yet (a new ``lm_head`` after
  model surgery) returns ``None`` and ``state[p]; del state[p]`` works, as on torch's
  ``defaultdict(dict)``; both had raised ``KeyError``. A stepped parameter's entries are
  popped (and it restarts), a tensor that is not a parameter still raises ``KeyError``."""
  m = _mlp()
  ref = torch.optim.AdamW(_mlp().parameters(), lr=1e-2)
  opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2)
  for o in (ref, opt):
    w = o.param_groups[0]["params"][0]
    assert o.state.pop(w, None) is None
    _ = o.state[w]
    del o.state[w]
  with pytest.raises(KeyError):
    opt.state.pop(m[0].weight)
  stranger = torch.zeros(3)
  with pytest.raises(KeyError):
    del opt.state[stranger]
  _train(m, opt, 1)
  popped = opt.state.pop(m[0].weight)
  assert set(popped) and m[0].weight not in opt.state and m[0].bias in opt.state


@pytest.mark.parametrize("writeback", ["copy", "swap"])
def test_a_step_under_inference_mode_leaves_the_parameters_trainable(writeback):
  """``optimizer.step()`` inside ``torch.inference_mode()`` (an evaluation helper that steps)
  then more training: as ``torch.optim.AdamW`` (within 1e-6 over 3 steps). In swap mode the new
  parameter storage had been made as inference tensors, and the next backward raised
  "Inference tensors cannot be saved for backward"."""
  ms = [_mlp(), _mlp()]
  opts = [torch.optim.AdamW(ms[0].parameters(), lr=1e-2, weight_decay=1e-2),
          torch_bridge.Optimizer(ms[1].parameters(), stax.adamw, lr=1e-2, weight_decay=1e-2,
                                 writeback=writeback)]
  x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
  for m, opt in zip(ms, opts):
    for i in range(3):
      opt.zero_grad()
      m(x).square().mean().backward()
      if i == 1:
        with torch.inference_mode():
          opt.step()
      else:
        opt.step()
    assert not any(p.is_inference() for p in m.parameters())
  diff = max((p - q).abs().max().item() for p, q in zip(*(m.parameters() for m in ms)))
  assert diff < 1e-6, diff


def test_a_setting_that_reshapes_the_state_raises_naming_the_parameters():
  """A static hyperparameter changed in a group after the first step, under which the
  transformation keeps another state (``codec``: encoded moments; ``nonfinite``: the guard's
  counter), had failed inside the trace (``DynamicJaxprTracer has no attribute codes``, "The
  number of updates and states has to be the same in chain!"); now ``ValueError`` naming the
  parameters and the way out, and after ``del optimizer.state[p]`` the run goes on under the
  new setting, as a fresh optimizer would."""
  for key, value, kw in (("codec", "stax", {"min_compress_elements": 1}),
                         ("nonfinite", "ignore", {})):
    m = _mlp()
    opt = torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2, **kw)
    _train(m, opt, 1)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=r"state of 'param_0'.*made under other settings.*"
                                         r"del optimizer.state\[p\]"):
      _train(m, opt, 1)
    for p in list(m.parameters()):
      del opt.state[p]
    before = [p.detach().clone() for p in m.parameters()]
    _train(m, opt, 1)
    m2 = _mlp()
    with torch.no_grad():
      for p, q in zip(m2.parameters(), before):
        p.copy_(q)
    fresh = torch_bridge.Optimizer(m2.parameters(), stax.adamw, lr=1e-2, **dict(kw, **{key: value}))
    _train(m2, fresh, 1)
    assert max((p - q).abs().max().item() for p, q in zip(m.parameters(), m2.parameters())) == 0


def test_stac_maximize_can_change_between_steps():
  """STAC's ``maximize`` (its group key) flipped after two steps: the run equals STAC on the
  negated loss for those two steps and the plain loss after (torch reads ``maximize`` every
  step; the bridge had chained an ``optax.scale(-1)`` that changed the state's structure, and
  the next step failed inside optax)."""
  x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
  ms = [_mlp(), _mlp()]
  flip = torch_bridge.STAC(ms[0], lr=1e-2, maximize=True)
  plain = torch_bridge.STAC(ms[1], lr=1e-2)
  for t in range(4):
    for m, opt, sign in ((ms[0], flip, 1.0), (ms[1], plain, -1.0 if t < 2 else 1.0)):
      opt.zero_grad()
      (sign * m(x).square().mean()).backward()
      opt.step()
    if t == 1:
      for g in flip.param_groups:   # (the sign trunk's group and the AdamW cap's)
        g["maximize"] = False
  diff = max((p - q).abs().max().item() for p, q in zip(*(m.parameters() for m in ms)))
  assert diff < 1e-7, diff
  assert max((p - q).abs().max().item() for p, q in zip(ms[0].parameters(), _mlp().parameters())) > 1e-3


@pytest.mark.parametrize("writeback", ["copy", "swap"])
def test_a_backward_through_a_graph_from_before_the_step_fails_as_torchs(writeback):
  """A second backward through a graph built before ``step()`` (``retain_graph=True``) raises
  torch's "modified by an inplace operation" as with ``torch.optim.AdamW``. In swap mode the
  new parameter storage had been put in without bumping the version counter, so the backward
  ran and silently differentiated at the stepped weights."""
  for opt_of in (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
                 lambda m: torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2,
                                                  writeback=writeback)):
    m = _mlp()
    opt = opt_of(m)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    m(x).square().mean().backward()
    opt.step()                      # (swap mode now owns the parameters' buffers)
    opt.zero_grad()
    loss = m(x).square().mean()
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
      loss.backward()
