"""torch_bridge under FSDP2 (``fully_shard``, 2 processes, gloo, CPU; tests/fsdp_worker.py):
DTensor parameters step on full copies (torch_bridge/_dtensor.py), equal to one process for
element-wise, per-tensor-statistic, matrix (Muon) and block-codec optimizers, and as local shards
(``dtensor="local"``) for element-wise ones; a NaN gradient element in one rank's shard skips
the step on every rank; the optimizer state saved with ``torch.distributed.checkpoint`` by 2
ranks restores in 1 process and back."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
  pytest.skip("torch without gloo", allow_module_level=True)

from tests import fsdp_worker as W  # noqa: E402
from tests.localhost_ranks import run_ranks  # noqa: E402

TIMEOUT_S = 600
# float32 rounding: the ranks' gradients are averaged by a reduce-scatter, one process takes the
# mean over the whole batch; the parameters move by ~0.04 over the run
ATOL = 2e-7


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One process: the reference runs (checkpoint at SAVE_AT); then the two ranks."""
  import torch.distributed.checkpoint as dcp
  out = tmp_path_factory.mktemp("fsdp")
  ref = {}
  for name in W.OPTIMIZERS:
    m = W.model()
    opt = W.make_opt(name, m)
    for step in range(W.STEPS):
      if step == W.SAVE_AT:
        dcp.save({"model": W.full_params(m), "optim": opt.state_dict()},
                 checkpoint_id=str(out / f"{name}-dcp-1proc"))
      W.train_step(m, opt, step)
    ref[name] = W.full_params(m)
  run_ranks("tests.fsdp_worker", [out, ",".join(W.OPTIMIZERS)], timeout_s=TIMEOUT_S)
  return out, ref


def _max_diff(a, b) -> float:
  assert a.keys() == b.keys()
  return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", W.OPTIMIZERS)
def test_fsdp2_step_equals_one_process(runs, name):
  out, ref = runs
  got = torch.load(out / f"{name}-fsdp.pt")
  assert _max_diff(got, ref[name]) <= ATOL
  start = W.full_params(W.model())
  assert _max_diff(ref[name], start) > 1e-2          # the run moved the parameters


@pytest.mark.parametrize("name", W.OPTIMIZERS)
def test_dcp_checkpoint_reshards_between_world_sizes(runs, name):
  """2 ranks' checkpoint continued in 1 process, and 1 process's continued on 2 ranks, end where
  the uninterrupted runs end."""
  out, ref = runs
  m, opt = W.restore(name, out / f"{name}-dcp", sharded=False)
  for step in range(W.SAVE_AT, W.STEPS):
    W.train_step(m, opt, step)
  fsdp = torch.load(out / f"{name}-fsdp.pt")
  assert _max_diff(W.full_params(m), fsdp) <= ATOL
  assert _max_diff(torch.load(out / f"{name}-fsdp-from-1proc.pt"), ref[name]) <= ATOL


def test_gradient_release_refuses_dtensor_parameters(monkeypatch):
  """Unsupported combination: a clear error when it is asked for, not a crash (a stand-in
  class plays DTensor, so no process group is needed)."""
  from torch_bridge import _dtensor

  class FakeDTensor:
    pass
  opt = W.make_opt("adamw", W.model())
  monkeypatch.setattr(_dtensor, "dtensor_type", lambda: FakeDTensor)
  monkeypatch.setattr(opt, "_flat_params", lambda: [FakeDTensor()])
  with pytest.raises(ValueError, match="gradient release does not support DTensor"):
    opt.enable_gradient_release()


def test_local_mode_keeps_each_ranks_share_of_the_state(runs):
  """``dtensor="local"`` (element-wise transforms): a rank holds its shards' state, half of the
  full-copy mode's on 2 ranks (the 3/2 row split of the 5-row layer: 3 rows on rank 0)."""
  out, _ = runs
  full = [int((out / f"adamw-state-elements-rank{r}.txt").read_text()) for r in range(2)]
  local = [int((out / f"adamw_local-state-elements-rank{r}.txt").read_text()) for r in range(2)]
  assert full[0] == full[1]
  assert sum(local) <= full[0] + 64                  # + the per-parameter scalars on each rank
  assert max(local) < 0.6 * full[0]


@pytest.mark.parametrize("name", ["oadamw", "stam"])
def test_owner_mode_splits_the_state_between_ranks(runs, name):
  """``dtensor="owner"``: each parameter's state (and its Newton–Schulz) on one rank only; the
  two ranks together hold what each holds with full copies, and so do their parameter copies."""
  out, _ = runs
  full = [int((out / f"{name}-state-elements-rank{r}.txt").read_text()) for r in range(2)]
  owner = [int((out / f"{name}_owner-state-elements-rank{r}.txt").read_text()) for r in range(2)]
  assert full[0] == full[1] and sum(owner) == full[0] and max(owner) < 0.75 * full[0]
  # and each full-size parameter copy lives on its owner only (the all-gather fallback keeps
  # one on every rank)
  copies = {m: [int((out / f"{m}-copy-elements-rank{r}.txt").read_text()) for r in range(2)]
            for m in (name, f"{name}_owner")}
  assert copies[name][0] == copies[name][1] > 0
  assert sum(copies[f"{name}_owner"]) == copies[name][0]
  if name == "oadamw":
    fallback = [int((out / f"oadamw_owner_allgather-copy-elements-rank{r}.txt").read_text())
                for r in range(2)]
    assert fallback == copies[name]


def test_owner_mode_needs_per_parameter_state():
  import stax
  import torch_bridge
  m = W.model()
  with pytest.raises(ValueError, match="dtensor='owner'.*state_scope='param'"):
    torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2, dtensor="owner",
                           state_scope="group")
  with pytest.raises(ValueError, match="dtensor='owner'"):
    torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2, dtensor="owner",
                           global_nonfinite="skip")


def test_local_mode_refuses_transforms_that_are_not_element_wise():
  import stax
  import torch_bridge
  m = W.model()
  for factory, kw in ((stax.stable_adamw, {}), (stax.oadamw, {}),
                      (stax.adamw, {"codec": "factored"})):
    with pytest.raises(ValueError, match="dtensor='local'.*element-wise"):
      torch_bridge.Optimizer(m.parameters(), factory, lr=1e-2, dtensor="local", **kw)
  with pytest.raises(ValueError, match="`dtensor` must be one of"):
    torch_bridge.Optimizer(m.parameters(), stax.adamw, lr=1e-2, dtensor="sharded")


def test_auto_mode_keeps_fsdp_state_sharding_where_it_is_exact():
  """The default ``dtensor="auto"``: ``"local"`` for element-wise transforms (state sharded as
  FSDP2 shards it, as torch's own optimizers), ``"full"`` for everything else (per-tensor
  statistics, matrices, codec blocks) and for ``writeback="swap"``; never ``"owner"`` unasked."""
  import optax
  import stax
  import torch_bridge
  m = W.model()
  cases = [(stax.adamw, {}, "local"), (optax.lion, {}, "local"), (optax.sgd, {}, "local"),
           (stax.adamw, {"codec": "factored"}, "full"), (stax.stable_adamw, {}, "full"),
           (stax.oadamw, {}, "full"), (stax.stam, {}, "full"), (stax.turbo_adam, {}, "full"),
           (stax.adamw, {"writeback": "swap"}, "full")]
  for factory, kw, want in cases:
    opt = torch_bridge.Optimizer(m.parameters(), factory, lr=1e-2, **kw)
    assert opt._dtensor_mode == want, (factory, kw)
