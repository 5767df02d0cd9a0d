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
