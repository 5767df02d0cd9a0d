"""Every bridge class behaves as a ``torch.optim.Optimizer`` in what PyTorch's own optimizer
tests check (their ``TestOptimRenewed``, written here in our own words, CPU float32):

* the state dict is deterministic: an optimizer loaded from another's state dict steps in
  lockstep with it, and both then save equal state dicts (which ``torch.load(...,
  weights_only=True)`` reads back); a parameter repeated in two groups keeps one index;
* state-dict hooks and step hooks run as torch runs them, and ``optimizer.state`` keeps what a
  user or a hook puts there (saved by ``state_dict()``, loaded back);
* a state dict saved from ``model.parameters()`` loads into an optimizer built from
  ``model.named_parameters()`` and back;
* ``copy.deepcopy``, ``pickle`` and ``torch.save(optimizer)`` give an optimizer that steps on
  exactly as the original;
* param-group dicts, a 1-element tensor ``lr`` (a multi-element one is torch's ``ValueError``),
  frozen parameters, repeated parameters (torch's warning) and torch's error types for bad
  ``params``;
* ``writeback="swap"`` cannot deadlock after ``load_state_dict`` under CPU load (a subprocess
  stress test that hung before the fix);
* on the JAX side, ``optax.tree.map_params`` works on every registry optimizer's state.
"""

from __future__ import annotations

import collections
import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import stax
import torch_bridge
from torch.optim.optimizer import register_optimizer_step_pre_hook
from tests import contract_problems as cp
from tests.registry import ALL

# name -> (cls(params, **kw)); every drop-in and the generic Optimizer over a factory
CLASSES = {
    "STAC": torch_bridge.STAC,
    "STAM": torch_bridge.STAM,
    "STAMLite": torch_bridge.STAMLite,
    "SCAO": torch_bridge.SCAO,
    "OAdamW": torch_bridge.OAdamW,
    "TurboAdam": torch_bridge.TurboAdam,
    "Optimizer[adamw]": lambda params, **kw: torch_bridge.Optimizer(params, stax.adamw, **kw),
}
NAMES = list(CLASSES)


def _wb():
  torch.manual_seed(0)
  w = torch.nn.Parameter(torch.randn(10, 5))
  b = torch.nn.Parameter(torch.randn(10))
  return w, b


def _clone(*ps):
  return [torch.nn.Parameter(p.detach().clone()) for p in ps]


_X = torch.randn(5, generator=torch.Generator().manual_seed(3))


def _step(opt, w, b):
  opt.zero_grad()
  (w @ _X.to(w.dtype) + b).pow(2).sum().backward()
  opt.step()


def _lockstep(steps, *runs):
  """Steps each ``(opt, w, b)`` of ``runs`` ``steps`` times side by side; all stay equal."""
  (_, w, b), others = runs[0], runs[1:]
  for _ in range(steps):
    for opt, x, y in runs:
      _step(opt, x, y)
    for _, x, y in others:
      assert torch.equal(w, x) and torch.equal(b, y)


def _equal_sd(a, b, where="sd"):
  """Recursive equality of state dicts: tensors with torch.equal, the rest with ==."""
  if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
    assert a.dtype == b.dtype and torch.equal(a, b), where
  elif isinstance(a, dict):
    assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
    for k in a:
      _equal_sd(a[k], b[k], f"{where}[{k!r}]")
  elif isinstance(a, (list, tuple)):
    assert type(a) is type(b) and len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _equal_sd(x, y, f"{where}[{i}]")
  else:
    assert a == b, (where, a, b)


# ------------------------------------------------------------------ state dict, hooks, copies
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_deterministic_and_repeated_params_keep_one_index(name):
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  for _ in range(2):
    _step(opt, w, b)
  wc, bc = _clone(w, b)
  opt_c = cls([wc, bc], lr=1e-3)
  opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
  _lockstep(3, (opt, w, b), (opt_c, wc, bc))
  _equal_sd(opt.state_dict(), opt_c.state_dict())
  buf = io.BytesIO()   # plain data: torch.load(weights_only=True) reads it back
  torch.save(opt.state_dict(), buf)
  buf.seek(0)
  _equal_sd(torch.load(buf, weights_only=True), opt.state_dict())
  # a parameter listed twice keeps its first index (torch's param_mappings)
  opt_c.param_groups.extend(opt_c.param_groups)
  first = [g["params"] for g in opt.state_dict()["param_groups"]]
  again = [g["params"] for g in opt_c.state_dict()["param_groups"]]
  assert again == first + first


def _pre_hook(opt):
  opt.state["test"] = 1


def _post_hook(opt, sd):
  ran = "test" in sd["state"]
  sd["state"].pop("test", None)
  sd["ran_pre_hook"] = ran
  return sd


def _load_pre_1(opt, sd):
  sd["param_groups"][0]["lr"] = 0.002


def _load_pre_2(opt, sd):
  mine = copy.deepcopy(sd)   # a hook may return a new state dict, which is then used
  mine["param_groups"][0]["lr"] = 0.003
  return mine


def _load_post(opt):
  opt.state["ran_pre_2"] = opt.param_groups[0]["lr"] == 0.003
  opt.state["ran_post"] = True


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_and_user_state_entries(name):
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  _step(opt, w, b)
  h = opt.register_state_dict_pre_hook(_pre_hook)
  assert opt.state_dict()["state"]["test"] == 1          # what the pre hook put in state
  opt.register_state_dict_post_hook(_post_hook)
  sd = opt.state_dict()
  assert sd["ran_pre_hook"] and "test" not in sd["state"]
  h.remove()
  del opt.state["test"]
  assert opt.state_dict()["ran_pre_hook"] is False
  opt.register_load_state_dict_pre_hook(_load_pre_1)
  opt.register_load_state_dict_pre_hook(_load_pre_2)
  opt.register_load_state_dict_post_hook(_load_post)
  opt.load_state_dict(opt.state_dict())
  assert opt.state["ran_pre_2"] and opt.state["ran_post"]
  assert opt.param_groups[0]["lr"] == 0.003
  # a parameter's own entries: kept beside the JAX state, saved and loaded
  opt.state[w]["note"] = "kept"
  assert opt.state[w]["note"] == "kept" and len(opt.state[w]) > 1
  saved = opt.state_dict()
  assert saved["state"][0]["note"] == "kept" and saved["state"]["ran_post"] is True
  wc, bc = _clone(w, b)
  opt_c = cls([wc, bc], lr=1e-3)
  opt_c.load_state_dict(saved)
  assert opt_c.state[wc]["note"] == "kept"
  for p in (wc, bc):                   # torch's non-empty-state check, not vacuous here
    assert len(opt_c.state[p]) > 0
  assert len(opt_c.state) == 2 + 2     # two parameters and two user keys


@pytest.mark.parametrize("name", ["Optimizer[adamw]", "STAM"])
def test_step_hooks_run_in_torch_order(name):
  w, b = _wb()
  opt = CLASSES[name]([w, b], lr=1e-3)
  calls = []
  opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
  opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
  h = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre"))
  try:
    _step(opt, w, b)
  finally:
    h.remove()
  assert calls == ["global_pre", "pre", "post"]


@pytest.mark.parametrize("name", ["Optimizer[adamw]", "STAC"])
def test_step_hooks_see_the_closure_as_it_was_given(name):
  """``step(closure=c)`` reaches the hooks as ``args=(opt,), kwargs={"closure": c}`` and
  ``step(c)`` as ``args=(opt, c), kwargs={}``, as torch.optim.AdamW's hooks see them (the bridge
  had passed the closure positionally either way: a torch hook reading ``kwargs["closure"]``
  raised ``KeyError``); a hook's new closure is the one called."""
  for make in (lambda ps: CLASSES[name](ps, lr=1e-3), lambda ps: torch.optim.AdamW(ps, lr=1e-3)):
    w, b = _wb()
    opt = make([w, b])
    seen = []

    def hook(o, args, kwargs):
      seen.append((len(args), sorted(kwargs)))
      c = kwargs.get("closure", args[1] if len(args) > 1 else None)
      return args[:1], {"closure": lambda: (seen.append("wrapped"), c())[1]}

    opt.register_step_pre_hook(hook)

    def closure():
      opt.zero_grad()
      loss = (w.sum() + b.sum()) ** 2
      loss.backward()
      return loss

    assert float(opt.step(closure=closure)) == float(opt.step(closure)) or True
    assert seen == [(1, ["closure"]), "wrapped", (2, []), "wrapped"], (make, seen)
  with pytest.raises(TypeError, match="closure"):
    CLASSES[name]([_wb()[0]], lr=1e-3).step(closure, closure)


@pytest.mark.parametrize("name", NAMES)
def test_del_state_restarts_a_parameter(name):
  """``del optimizer.state[p]`` forgets ``p``'s state: it restarts as a fresh optimizer would."""
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  _step(opt, w, b)
  wf, bf = _clone(w, b)
  fresh = cls([wf, bf], lr=1e-3)
  del opt.state[w]
  del opt.state[b]
  assert len(opt.state) == 0
  _lockstep(1, (opt, w, b), (fresh, wf, bf))


@pytest.mark.parametrize("name", NAMES)
def test_named_and_unnamed_state_dicts_load_into_each_other(name):
  cls = CLASSES[name]
  # STAC partitions by module, and unnamed tensors are each their own module: with every
  # module in the AdamW cap both inputs give one group of the same four parameters.
  kw = dict(last_n_modules=8) if name == "STAC" else {}
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
  x = torch.randn(3, 5)

  def step(m, o):
    o.zero_grad()
    m(x).square().sum().backward()
    o.step()

  def params(m, named):
    if name == "STAC":   # the drop-in's own way to get names: the model
      return m if named else list(m.parameters())
    return list(m.named_parameters()) if named else list(m.parameters())

  for saved_named in (False, True):
    m = copy.deepcopy(model)
    o = cls(params(m, saved_named), lr=1e-2, **kw)
    step(m, o)
    sd = copy.deepcopy(o.state_dict())
    m2 = copy.deepcopy(m)
    o2 = cls(params(m2, not saved_named), lr=1e-2, **kw)
    o2.load_state_dict(sd)
    for _ in range(2):
      step(m, o)
      step(m2, o2)
    for p, q in zip(m.parameters(), m2.parameters()):
      assert torch.equal(p, q), saved_named


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("scheduled", [False, True], ids=["", "scheduled"])
def test_copied_optimizer_steps_on_like_the_original(name, how, scheduled):
  """... also with an LR scheduler attached, whose ``step`` wrapper (a weakref to the
  original optimizer) torch does not carry: carried, it failed to pickle, and a deep copy's
  ``step()`` stepped the original."""
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  if scheduled:
    torch.optim.lr_scheduler.StepLR(opt, step_size=100)
  for _ in range(2):
    _step(opt, w, b)
  if how == "deepcopy":
    copied = copy.deepcopy(opt)
    public = {k for k in opt.__dict__ if not k.startswith("_")} - {"step"}   # the scheduler's
    assert public == {k for k in copied.__dict__ if not k.startswith("_")}
  elif how == "pickle":
    copied = pickle.loads(pickle.dumps(opt))
  else:
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    copied = torch.load(buf, weights_only=False)
  wc, bc = [p for g in copied.param_groups for p in g["params"]]
  assert wc is not w and torch.equal(wc, w)
  _equal_sd(copied.state_dict(), opt.state_dict())
  _lockstep(2, (opt, w, b), (copied, wc, bc))


# --------------------------------------------------------------- constructor inputs and errors
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_equals_float_lr_and_larger_tensors_are_refused(name):
  cls = CLASSES[name]
  w, b = _wb()
  wc, bc = _clone(w, b)
  ref = cls([w, b], lr=1e-3)
  opt = cls([wc, bc], lr=torch.tensor(1e-3))
  _lockstep(3, (ref, w, b), (opt, wc, bc))
  with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
    cls(_clone(w), lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("name", NAMES)
def test_param_group_dicts_equal_the_groups_lr_set_afterwards(name):
  """``[{"params": [w]}, {"params": [b], "lr": 0.01}]`` steps as the plain list with the
  second parameter's group ``lr`` set to 0.01 by hand (as a scheduler would)."""
  cls = CLASSES[name]
  w, b = _wb()
  wc, bc = _clone(w, b)
  opt = cls([{"params": [w]}, {"params": [b], "lr": 0.01}], lr=1e-3)
  if name == "STAC":  # each tensor is a module: w in the sign trunk, b in the AdamW cap
    assert [g["stac_role"] for g in opt.param_groups] == ["sign", "adamw"]
    ref = cls([wc, bc], lr=1e-3)
  else:
    ref = cls([{"params": [wc]}, {"params": [bc]}], lr=1e-3)
  assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.01]
  ref.param_groups[1]["lr"] = 0.01
  _lockstep(3, (opt, w, b), (ref, wc, bc))
  assert not torch.equal(w, _wb()[0])


@pytest.mark.parametrize("name", NAMES)
def test_frozen_parameters_sit_in_the_groups_and_never_move(name):
  cls = CLASSES[name]
  w, b = _wb()
  frozen = torch.nn.Parameter(torch.randn(10, 5), requires_grad=False)
  before = frozen.detach().clone()
  opt = cls([w, frozen, b], lr=1e-3)
  assert sum(len(g["params"]) for g in opt.param_groups) == 3       # as torch keeps them
  assert any(p is frozen for g in opt.param_groups for p in g["params"])
  for _ in range(2):
    _step(opt, w, b)
  assert torch.equal(frozen, before) and frozen not in opt.state
  assert w in opt.state and b in opt.state


@pytest.mark.parametrize("name", NAMES)
def test_torch_errors_and_warnings_for_params(name):
  cls = CLASSES[name]
  w, b = _wb()
  with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
    cls(w, lr=1e-3)
  with pytest.raises(TypeError, match="ordered collections"):
    cls([{"params": {w, b}}], lr=1e-3)
  with pytest.raises(ValueError, match="empty parameter list"):
    cls([], lr=1e-3)
  with pytest.raises(TypeError, match="can only optimize Tensors"):
    cls([w, 3.0], lr=1e-3)
  with pytest.raises(ValueError, match="with/without names"):
    cls([("w", w), b], lr=1e-3)
  with pytest.warns(UserWarning, match="duplicate parameters"):
    opt = cls([w, b, w], lr=1e-3)
  with pytest.raises(ValueError, match="more than one parameter group"):
    cls([{"params": [w]}, {"params": [w, b]}], lr=1e-3)
  del opt


# --------------------------------------------------------------------------- swap write-back
_SWAP_STRESS = textwrap.dedent("""
    import copy, multiprocessing as mp, sys
    import torch, stax, torch_bridge

    def burn(stop):
      import numpy as np
      a = np.random.rand(300, 300)
      while not stop.is_set():
        a = np.tanh(a @ a)

    if __name__ == "__main__":
      stop = mp.Event()
      for _ in range(2):
        mp.Process(target=burn, args=(stop,), daemon=True).start()
      torch.manual_seed(0)
      x = torch.randn(5)
      for rep in range(int(sys.argv[1])):
        w, b = torch.nn.Parameter(torch.randn(10, 5)), torch.nn.Parameter(torch.randn(10))
        opt = torch_bridge.Optimizer([w, b], stax.adamw, lr=1e-3, writeback="swap")
        def closure():
          opt.zero_grad(); loss = (w @ x + b).pow(2).sum(); loss.backward(); return loss
        for _ in range(2): opt.step(closure)
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(3): opt.step(closure)
        w2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
        opt2 = torch_bridge.Optimizer([w2, b2], stax.adamw, lr=1e-3, writeback="swap")
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(3):
          opt2.zero_grad(); (w2 @ x + b2).pow(2).sum().backward(); opt2.step()
      stop.set()
      print("done", flush=True)
""")


def test_swap_writeback_does_not_deadlock_after_load_state_dict_under_load(tmp_path):
  """The step after ``load_state_dict`` with ``writeback="swap"``, under concurrent CPU load,
  repeated: before the fix (torch viewing donated JAX buffers with no DLPack reference, the
  GIL held while XLA threads waited for it in torch's DLPack deleter) this hung within the
  first few repetitions; now it finishes."""
  script = tmp_path / "swap_stress.py"
  script.write_text(_SWAP_STRESS)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  try:
    out = subprocess.run([sys.executable, str(script), "12"], capture_output=True, text=True,
                         timeout=240, env=env, cwd=root)
  except subprocess.TimeoutExpired:
    pytest.fail("writeback='swap' hung (deadlock) after load_state_dict under CPU load")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "done" in out.stdout


# ------------------------------------------------ what real loops do (found by a new-user sweep)
@pytest.mark.parametrize("name", NAMES)
def test_a_failed_load_changes_nothing(name):
  """torch checks a state dict before it changes anything. Loading ``torch.optim.AdamW``'s
  state dict raises (the bridge's state has other leaves) and must leave the groups and the
  state as they were: the groups had already taken the other optimizer's lr 0.5, weight decay
  0.3 and keys, and the next step ran on silently with lr 0.5."""
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  for _ in range(2):
    _step(opt, w, b)
  before = copy.deepcopy(opt.state_dict())
  bad = copy.deepcopy(before)   # other groups' values, and the last parameter's state cut short
  for g in bad["param_groups"]:
    g.update(lr=0.5, foreach=None)
  last = bad["state"][max(bad["state"])]
  del last[next(iter(last))]
  bads = [bad]
  if name != "STAC":            # (STAC has two groups)
    wt, bt = _clone(w, b)
    other = torch.optim.AdamW([wt, bt], lr=0.5, weight_decay=0.3)
    _step(other, wt, bt)
    bads.append(other.state_dict())
  for sd in bads:
    with pytest.raises(ValueError, match="lacks"):
      opt.load_state_dict(sd)
    _equal_sd(opt.state_dict(), before)
  wc, bc = _clone(w, b)
  twin = cls([wc, bc], lr=1e-3)
  twin.load_state_dict(before)
  _lockstep(2, (opt, w, b), (twin, wc, bc))


@pytest.mark.parametrize("name", NAMES)
def test_setstate_with_an_empty_state_resets_it_as_torch_does(name):
  """``optimizer.__setstate__({"state": defaultdict(dict)})``, a common way to reset Adam's
  state, is torch's attribute update; it raised ``KeyError: '_packed_state'``. Now the state
  is empty and the optimizer steps on as a fresh one from the current values."""
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  for _ in range(2):
    _step(opt, w, b)
  opt.__setstate__({"state": collections.defaultdict(dict)})
  assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
  wc, bc = _clone(w, b)
  _lockstep(2, (opt, w, b), (cls([wc, bc], lr=1e-3), wc, bc))


@pytest.mark.parametrize("name", NAMES)
def test_a_frozen_layer_of_a_model_steps_once_unfrozen(name):
  """Gradual unfreezing: a drop-in built from a model keeps its frozen parameters (torch's
  optimizers keep what they are given), which step once they have gradients. STAM, STAMLite,
  SCAO, OAdamW and TurboAdam had left them out for good (2 of 4 parameters, never moved)."""
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
  model[0].requires_grad_(False)
  opt = CLASSES[name](model.named_parameters() if name == "Optimizer[adamw]" else model, lr=1e-2)
  assert sum(len(g["params"]) for g in opt.param_groups) == 4
  x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))

  def step():
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()

  frozen = model[0].weight.detach().clone()
  step()
  assert torch.equal(model[0].weight, frozen) and model[0].weight not in opt.state
  model[0].requires_grad_(True)
  step()
  assert not torch.equal(model[0].weight, frozen) and model[0].weight in opt.state


@pytest.mark.parametrize("name", NAMES)
def test_a_compiled_train_step_runs_the_step_eagerly(name):
  """``torch.compile`` of a train step that calls ``optimizer.step()`` (TorchDynamo's eager
  backend here: no C++ compiler needed) equals the eager loop; TorchDynamo had traced into the
  bridge and failed inside ``jax.device_put`` (``TypeError: flatten(): incompatible function
  arguments``). The step is a graph break, as XLA compiles it already."""
  cls = CLASSES[name]
  runs = []
  for compiled in (False, True):
    w, b = _wb()
    opt = cls([w, b], lr=1e-2)

    def train(x, opt=opt, w=w, b=b):
      opt.zero_grad()
      loss = (w @ x + b).pow(2).sum()
      loss.backward()
      opt.step()
      return loss

    fn = torch.compile(train, backend="eager") if compiled else train
    for i in range(3):
      fn(torch.randn(5, generator=torch.Generator().manual_seed(i)))
    runs.append((w.detach().clone(), b.detach().clone()))
  assert not torch.equal(runs[0][0], _wb()[0])
  for a, c in zip(*runs):
    torch.testing.assert_close(c, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["pickle", "legacy torch.save"])
def test_a_pickled_state_dict_loads(name, how):
  """A state dict is plain data for ``pickle`` and ``torch.save``'s legacy format too (which
  cannot restore torch's uint16/32/64 tensors: SCAO's and TurboAdam's PRNG key failed with
  ``AttributeError: ... UntypedStorage has no attribute 'dtype'``): unsigned state leaves wider
  than a byte are saved as the signed integers of their width (the same bits, the same bytes),
  and load back exactly."""
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  for _ in range(2):
    _step(opt, w, b)
  sd = opt.state_dict()
  dtypes = {t.dtype for e in sd["state"].values() for t in e.values()
            if isinstance(t, torch.Tensor)}
  assert not dtypes & {torch.uint16, torch.uint32, torch.uint64}
  if how == "pickle":
    back = pickle.loads(pickle.dumps(sd))
  else:
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=False)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
  wc, bc = _clone(w, b)
  twin = cls([wc, bc], lr=1e-3)
  twin.load_state_dict(back)
  _equal_sd(twin.state_dict(), sd)
  _lockstep(2, (opt, w, b), (twin, wc, bc))


_SMALL = dict(min_m_compress_elements=1, min_v_compress_elements=1)


def test_an_unsigned_state_leaf_loads_from_either_form():
  """TurboAdam's key leaf saved as uint32 (state dicts from before) or as its int32 bits (now)
  loads to the same state."""
  w, b = _wb()
  opt = torch_bridge.TurboAdam([w, b], lr=1e-3, **_SMALL)
  _step(opt, w, b)
  sd = opt.state_dict()
  key = [k for k in sd["state"][0] if k.endswith("/key")][0]
  assert sd["state"][0][key].dtype == torch.int32
  old = copy.deepcopy(sd)
  old["state"][0][key] = sd["state"][0][key].view(torch.uint32)
  for src in (sd, old):
    twin = torch_bridge.TurboAdam(_clone(w, b), lr=1e-3, **_SMALL)
    twin.load_state_dict(src)
    _equal_sd(twin.state_dict(), sd)


@pytest.mark.parametrize("factory", [stax.stable_adamw, stax.oadamw])
def test_factories_taking_betas_fill_the_groups_betas_for_schedulers(factory):
  """A factory with torch's ``betas`` pair (StableAdamW, OAdamW) has it in every group, as
  ``b1``/``b2`` factories do, so ``OneCycleLR``'s momentum cycling (on by default) finds it and
  reaches the step; it had raised ``ValueError: optimizer must support momentum or beta1``."""
  runs = []
  for cycle in (True, False):
    w, b = _wb()
    opt = torch_bridge.Optimizer([w, b], factory, lr=1e-3)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10,
                                                cycle_momentum=cycle)
    for _ in range(6):
      _step(opt, w, b)
      sched.step()
    if cycle:
      assert opt.param_groups[0]["betas"][0] != 0.9
    runs.append(torch.cat([w.detach().flatten(), b.detach()]))
  # (StableAdamW's debiased first steps, and Muon's of a rank-1 gradient, do not depend on β1)
  assert not torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_whose_dtype_changed_is_refused_until_its_state_is_dropped(name):
  """``model.bfloat16()`` after the optimizer has state: torch's optimizers cannot step on
  (their moments are float32) and neither can the bridge, which now says so before anything
  is written. It had either stepped on with float32 moments or raised a raw JAX error,
  depending on the weight's shape, and ``del optimizer.state[p]`` did not recover (the
  compiled step was reused for the new dtype). After the deletion the parameters step as a
  fresh optimizer's do."""
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  _step(opt, w, b)
  with torch.no_grad():
    for p in (w, b):
      p.data = p.data.to(torch.bfloat16)
  before = [w.detach().clone(), b.detach().clone()]
  with pytest.raises(ValueError, match=r"is now bfloat16\[10, 5\].*made for float32"):
    _step(opt, w, b)
  assert torch.equal(w, before[0]) and torch.equal(b, before[1])
  for p in (w, b):
    del opt.state[p]
  wc, bc = _clone(w, b)
  _lockstep(2, (opt, w, b), (cls([wc, bc], lr=1e-3), wc, bc))
  assert w.dtype == torch.bfloat16


@pytest.mark.parametrize("writeback", ["copy", "swap"])
def test_float64_after_construction_is_refused_without_x64(writeback):
  """``model.double()`` after construction (no ``jax_enable_x64``): the step refuses it, as
  the constructor does. JAX had narrowed the parameters to float32 silently (``lr=0`` still
  moved them by 1e-12), and with ``writeback="swap"`` they came back as float32."""
  if jax.config.read("jax_enable_x64"):
    pytest.skip("x64 is on")
  w, b = _wb()
  opt = torch_bridge.Optimizer([w, b], stax.adamw, lr=0.0, weight_decay=0.0,
                               writeback=writeback)
  _step(opt, w, b)
  with torch.no_grad():
    for p in (w, b):
      p.data = p.data.double()
  before = w.detach().clone()
  with pytest.raises(TypeError, match="jax_enable_x64"):
    _step(opt, w, b)
  assert w.dtype == torch.float64 and torch.equal(w, before)


@pytest.mark.parametrize("name", NAMES)
def test_a_gradient_in_another_dtype_is_refused(name):
  """A gradient whose dtype is not its parameter's (torch allows it with ``grad_dtype``):
  ``TypeError`` naming both dtypes, as torch's AdamW refuses it too; it had reached the
  compiled step and raised raw JAX errors (``lax.min requires arguments to have the same
  dtypes``), or, for a float64 gradient, been narrowed silently."""
  cls = CLASSES[name]
  w, b = _wb()
  opt = cls([w, b], lr=1e-3)
  before = w.detach().clone()
  for dt in (torch.bfloat16, torch.float64):
    for p in (w, b):
      p.grad = None
      p.grad_dtype = dt
      p.grad = torch.ones(p.shape, dtype=dt)
    with pytest.raises(TypeError, match=f"gradient is {dt}"):
      opt.step()
  assert torch.equal(w, before)


def test_a_group_hyperparameter_the_factory_cannot_take_is_refused():
  """A group's ``betas`` for STAM (whose arguments are ``b1_base``/``b2``) had no effect,
  silently, where ``STAM(..., betas=...)`` raises ``TypeError``; now the group raises too.
  Metadata keys torch keeps (a group's name, a scheduler's ``initial_lr``) are kept."""
  w, b = _wb()
  with pytest.raises(TypeError, match="'betas', which stam does not take"):
    torch_bridge.STAM([{"params": [w], "betas": (0.5, 0.6)}, {"params": [b]}], lr=1e-3)
  opt = torch_bridge.STAM([{"params": [w], "name": "decoder", "initial_lr": 1e-3},
                           {"params": [b]}], lr=1e-3)
  assert opt.param_groups[0]["name"] == "decoder"
  _step(opt, w, b)


# ----------------------------------------------------------------------------- JAX side
@pytest.mark.parametrize("entry", ALL, ids=[e.name for e in ALL])
def test_map_params_reaches_every_params_shaped_state_leaf(entry):
  """``optax.tree.map_params`` maps the state's parameter-shaped sub-trees and nothing else:
  after one update, mapping ``x -> x + 1`` changes exactly the leaves of state sub-trees laid
  out like the parameters (moments, codes, per-parameter factors), and the mapped state still
  updates (same structure, shapes and dtypes)."""
  params, _, _ = cp.quadratic()
  tx = entry.make()
  state = tx.init(params)
  _, state = jax.jit(tx.update)(cp.random_grads(params, 0), state, params)
  mapped = optax.tree.map_params(tx.init, lambda x: x + jnp.ones((), x.dtype), state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  changed = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(state))]
  # the leaves map_params may reach: those of sub-trees with the parameters' structure
  ptree = jax.tree.structure(params)
  expect = []

  def walk(node):
    try:
      subs = ptree.flatten_up_to(node)
    except (ValueError, TypeError):
      subs = None
    if subs is not None and not isinstance(node, (jax.Array, np.ndarray)):
      for s in subs:
        expect.extend([isinstance(x, jax.Array) for x in jax.tree.leaves(s)])
      return
    children = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)[0]
    if len(children) == 1 and children[0] is node:
      expect.append(False)
      return
    for c in children:
      walk(c)

  walk(state)
  assert len(expect) == len(changed)
  assert changed == expect, entry.name
  if entry.name != "stac_sign_only":    # every other one keeps moments per parameter
    assert sum(changed) >= len(jax.tree.leaves(params))
  u, _ = jax.jit(tx.update)(cp.random_grads(params, 1), mapped, params)
  assert jax.tree.structure(u) == jax.tree.structure(params)
