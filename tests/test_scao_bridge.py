"""SCAO through the torch bridge with one state per param group (``state_scope="group"``).

A parameter whose ``grad`` is ``None`` enters the group's step as zeros; the bridge keeps its
old value in every state sub-tree laid out like the params. SCAO's curvature state is such a
tree, so a frozen parameter keeps its curvature factors (and its Adam moments) bit for bit while
the other parameters' factors keep moving.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch_bridge  # noqa: E402  pylint: disable=g-import-not-at-top

_FAST = dict(warmup_steps=1, precond_freq=1, min_precond_updates=1, blend_steps=1, k_min=1,
             k_max=2)


def _state_of(opt, prefix):
  """The group's state tensors whose path has a component starting with ``prefix``
  (e.g. ``"leaves/0/"``: the curvature factors of the module ``0``)."""
  (entry,) = opt.state_dict()["state"].values()
  return {k: v.clone() for k, v in entry.items() if prefix in k}


@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_group_scope_frozen_parameter_keeps_its_curvature(mode):
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
  opt = torch_bridge.SCAO(model, state_scope="group", lr=1e-2, mode=mode, **_FAST)
  x, y = torch.randn(16, 8), torch.randn(16, 4)
  frozen = list(model[0].parameters())

  def step(freeze):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if freeze:
      for p in frozen:
        p.grad = None
    opt.step()

  for _ in range(3):     # past the warm-up, every parameter's factors are set
    step(freeze=False)
  curv_frozen, curv_live = _state_of(opt, "leaves/0/"), _state_of(opt, "leaves/2/")
  moments_frozen = {**_state_of(opt, "mu/0/"), **_state_of(opt, "nu/0/")}
  assert any(k.endswith("weight/U_l") for k in curv_frozen), sorted(curv_frozen)
  values = [p.detach().clone() for p in frozen]
  for _ in range(4):
    step(freeze=True)

  new_frozen, new_live = _state_of(opt, "leaves/0/"), _state_of(opt, "leaves/2/")
  assert new_frozen.keys() == curv_frozen.keys()
  for name, old in curv_frozen.items():
    assert torch.equal(new_frozen[name], old), name
  for name, new in {**_state_of(opt, "mu/0/"), **_state_of(opt, "nu/0/")}.items():
    assert torch.equal(new, moments_frozen[name]), name
  for p, old in zip(frozen, values):
    assert torch.equal(p.detach(), old)
  assert any(not torch.equal(new_live[k], v) for k, v in curv_live.items() if v.is_floating_point())
