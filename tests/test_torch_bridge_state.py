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
