"""Drop-in torch classes: parity with the seeds' own torch packages, module order, errors."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import torch_bridge

F = torch.nn.functional


def _quickstart_model(seed=0):
  """The model of stac-optimizer's README quickstart."""
  torch.manual_seed(seed)
  return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                             torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _run(model, opt, steps, seed=1, nonfinite_at=None):
  g = torch.Generator().manual_seed(seed)
  for t in range(steps):
    x, y = torch.randn(8, 128, generator=g), torch.randn(8, 10, generator=g)
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    if nonfinite_at == t:
      next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()


def _maxdiff(a, b):
  return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------- STAC
stac_seed = pytest.importorskip("stac_optimizer")


@pytest.mark.parametrize("kw", [
    dict(lr=1e-3, last_n_modules=1, weight_decay=1e-2, sign_weight_decay=5e-3,
         error_if_nonfinite=True),  # the seed's quickstart
    dict(lr=2e-3, last_n_modules=2, weight_decay=1e-2, sign_lr_scale=0.5),  # 0.5·wd default
])
def test_stac_matches_seed_package_over_50_steps(kw):
  m_ours, m_seed = _quickstart_model(), _quickstart_model()
  ours = torch_bridge.STAC(m_ours, **kw)
  seed = stac_seed.STAC(m_seed, **kw)
  for a, b in zip(ours.param_groups, seed.param_groups):
    assert (a["stac_role"], a["module_names"], a["lr"], a["weight_decay"]) == (
        b["stac_role"], b["module_names"], b["lr"], b["weight_decay"])
  _run(m_ours, ours, 50)
  _run(m_seed, seed, 50)
  assert _maxdiff(m_ours, m_seed) < 2e-6
  assert _maxdiff(m_ours, _quickstart_model()) > 1e-2
  assert ours.trace_count == 1


class _Tied(torch.nn.Module):
  """head registered *before* the blocks; the output projection is tied to the embedding."""

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(10, 6)
    self.head = torch.nn.Linear(6, 10, bias=False)
    self.head.weight = self.embed.weight
    self.block = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6))
    self.frozen = torch.nn.Linear(6, 6)
    self.frozen.requires_grad_(False)
    self.scale = torch.nn.Parameter(torch.ones(()))

  def forward(self, idx):
    h = self.block(self.embed(idx)) * self.scale
    return self.head(h)


@pytest.mark.parametrize("writeback", ["copy", "swap"])
def test_stac_registration_order_and_tied_parameters_match_seed(writeback):
  m = _Tied()
  names = [n for n, _ in torch_bridge.stac_modules(m)]
  # root first (pre-order), then registration order; the tied head owns nothing new; the
  # frozen module owns no trainable parameter
  assert names == ["<root>", "embed", "block.0", "block.1"]
  part = stac_seed.partition_trainable_modules(m, last_n_modules=2)
  assert [g.name for g in part.sign_modules + part.adamw_modules] == names
  m2 = copy.deepcopy(m)
  ours = torch_bridge.STAC(m, lr=1e-2, last_n_modules=2, weight_decay=0.1, writeback=writeback)
  seed = stac_seed.STAC(m2, lr=1e-2, last_n_modules=2, weight_decay=0.1)
  assert [g["module_names"] for g in ours.param_groups] == [("<root>", "embed"),
                                                            ("block.0", "block.1")]
  g = torch.Generator().manual_seed(0)
  for _ in range(10):
    idx = torch.randint(0, 10, (12,), generator=g)
    for mod, opt in ((m, ours), (m2, seed)):
      opt.zero_grad()
      F.cross_entropy(mod(idx), idx).backward()
      opt.step()
  assert _maxdiff(m, m2) < 1e-6
  assert m.head.weight is m.embed.weight  # still tied, updated once (by the sign trunk)
  # the frozen module is untouched (swap never hands a parameter without a gradient to JAX)
  torch.testing.assert_close(m.frozen.weight, m2.frozen.weight, rtol=0, atol=0)


@pytest.mark.parametrize("error", [False, True])
def test_stac_nonfinite_skips_whole_step_like_seed(error):
  m_ours, m_seed = _quickstart_model(), _quickstart_model()
  ours = torch_bridge.STAC(m_ours, lr=1e-3, error_if_nonfinite=error)
  seed = stac_seed.STAC(m_seed, lr=1e-3, error_if_nonfinite=error)
  _run(m_ours, ours, 2)
  _run(m_seed, seed, 2)
  before = [p.detach().clone() for p in m_ours.parameters()]
  for model, opt in ((m_ours, ours), (m_seed, seed)):
    if error:
      with pytest.raises(RuntimeError):
        _run(model, opt, 1, seed=5, nonfinite_at=0)
    else:
      _run(model, opt, 1, seed=5, nonfinite_at=0)
  assert all(torch.equal(a, b) for a, b in zip(before, m_ours.parameters()))
  if not error:
    assert ours.nonfinite_skipped_steps == seed.nonfinite_skipped_steps == 1
  _run(m_ours, ours, 3, seed=7)
  _run(m_seed, seed, 3, seed=7)
  assert _maxdiff(m_ours, m_seed) < 1e-6  # the AdamW count did not advance either


def test_stac_state_dict_round_trip_and_errors():
  m = _quickstart_model()
  opt = torch_bridge.STAC(m, lr=1e-3, last_n_modules=2)
  _run(m, opt, 3)
  buf = io.BytesIO()
  torch.save({"m": m.state_dict(), "o": opt.state_dict()}, buf)
  _run(m, opt, 3, seed=2)
  buf.seek(0)
  ck = torch.load(buf)
  m2 = _quickstart_model()
  m2.load_state_dict(ck["m"])
  opt2 = torch_bridge.STAC(m2, lr=1e-3, last_n_modules=2)
  opt2.load_state_dict(ck["o"])
  _run(m2, opt2, 3, seed=2)
  assert _maxdiff(m, m2) == 0.0
  # sign-trunk parameters keep no moments (stax.stac's trunk is stateless)
  st = opt.state_dict()["state"]
  assert not any("mu" in k for k in st[0])
  assert any("mu" in k for k in st[max(st)])
  with pytest.raises(RuntimeError, match="add_param_group"):
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
  with pytest.raises(ValueError, match="sign_lr_scale"):
    torch_bridge.STAC(_quickstart_model(), sign_lr_scale=0.0)
  with pytest.raises(ValueError, match="last_n_modules"):
    torch_bridge.STAC(_quickstart_model(), last_n_modules=-1)
  with pytest.raises(ValueError, match="amsgrad"):
    torch_bridge.STAC(_quickstart_model(), amsgrad=True)


# ----------------------------------------------------------------------------- the others
def _mlp(seed=0, width=128):
  torch.manual_seed(seed)
  return torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _pair_run(model_a, opt_a, model_b, opt_b, steps=50, width=128):
  g = torch.Generator().manual_seed(3)
  for _ in range(steps):
    x, y = torch.randn(32, width, generator=g), torch.randn(32, 4, generator=g)
    for m, o in ((model_a, opt_a), (model_b, opt_b)):
      o.zero_grad()
      F.mse_loss(m(x), y).backward()
      o.step()


def test_turbo_adam_faithful_matches_turboadam_020():
  turboadam = pytest.importorskip("turboadam")
  kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, v_bits=4,
            min_m_compress_elements=1024, min_v_compress_elements=1024)
  m_a, m_b = _mlp(), _mlp()  # the (16, 128) weight is compressed (last axis = block size)
  ours = torch_bridge.TurboAdam(m_a, codec="turboadam-0.2", **kw)
  seed = turboadam.TurboAdam(m_b.parameters(), **kw)
  _pair_run(m_a, ours, m_b, seed)
  assert _maxdiff(m_a, m_b) < 5e-5
  assert _maxdiff(m_a, _mlp()) > 1e-2
  st = ours.state_dict()["state"][0]
  assert any(v.dtype == torch.uint8 for v in st.values())  # packed codes crossed as uint8


@pytest.mark.parametrize("scope", ["param", "group"])
def test_turbo_adam_faithful_draws_each_parameters_own_rounding_stream(scope):
  """Every parameter of every param group tracks ``turboadam`` 0.2.0 (gradients fed alike,
  betas exact in float32), per-parameter and per-group state alike: the bridge passes each
  unit's torch ``(group, parameter)`` position as ``rounding_index``, which the seed hashes
  into its rounding streams (every parameter had drawn the first one's: only the first
  matched, the second was 2.8e-3 off after 4 steps at lr 1e-3)."""
  turboadam = pytest.importorskip("turboadam")
  torch.manual_seed(0)
  shapes = [(128, 64), (64, 128), (32, 128)]
  ours = [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in shapes]
  theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
  groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}]
  kw = dict(lr=1e-3, betas=(0.5, 0.75))
  opt = torch_bridge.TurboAdam(groups(ours), codec="turboadam-0.2", state_scope=scope, **kw)
  ref = turboadam.TurboAdam(groups(theirs), **kw)
  g = torch.Generator().manual_seed(1)
  for _ in range(4):
    for a, b, s in zip(ours, theirs, shapes):
      a.grad = torch.randn(s, generator=g)
      b.grad = a.grad.clone()
    opt.step()
    ref.step()
  for a, b in zip(ours, theirs):
    assert (a - b).abs().max().item() < 1e-6


def test_turbo_adams_factored_v_follows_the_torch_layout():
  """The factored codec (the drop-in's default) factors a torch conv weight ``(out, in, kh, kw)``
  as one ``out × in·kh·kw`` matrix and a Linear weight ``(out, in)`` as itself, from the torch
  layout the bridge passes as ``dimension_numbers``; a bias gets the 4-bit log v. The generic
  ``Optimizer(params, stax.turbo_adam)`` passes the same layout on its own (without it the
  Flax default reads a 4-D tensor as ``(kh, kw, in, out)``: ``out·in·kh × kw``), so both
  optimizers step alike."""
  import stax
  def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3), torch.nn.Flatten(),
                               torch.nn.Linear(64 * 4 * 4, 10))
  x = torch.randn(4, 32, 6, 6, generator=torch.Generator().manual_seed(1))
  shapes = {}
  models = [model(), model()]
  opts = [torch_bridge.TurboAdam(models[0], lr=1e-2),
          torch_bridge.Optimizer(models[1].parameters(), stax.turbo_adam, lr=1e-2)]
  for m, opt in zip(models, opts):
    for _ in range(3):
      opt.zero_grad()
      m(x).square().mean().backward()
      opt.step()
    st = opt.state_dict()["state"]
    shapes[type(opt).__name__] = {i: {k.rsplit("/", 1)[-1]: tuple(v.shape)
                                      for k, v in st[i].items() if "/nu" in k} for i in st}
  for got in shapes.values():
    assert got[0] == {"rows": (32, 3, 3), "cols": (64,)}, got     # conv: out × in·kh·kw
    assert got[2] == {"rows": (1024,), "cols": (10,)}, got        # Linear (out, in)
    assert "rows" not in got[1] and "rows" not in got[3], got     # biases: log v
  assert _maxdiff(*models) < 1e-6


def test_scao_faithful_matches_scao_024():
  scao = pytest.importorskip("scao")
  import warnings  # pylint: disable=g-import-not-at-top
  kw = dict(lr=1e-2, weight_decay=0.01, warmup_steps=10, precond_freq=5, min_precond_updates=2,
            blend_steps=10, k_min=2, max_precond_dim=64)
  m_a, m_b = _mlp(width=24), _mlp(width=24)
  ours = torch_bridge.SCAO(m_a, mode="scao-0.2.4", **kw)
  adamw = torch.optim.AdamW(_mlp(width=24).parameters(), lr=1e-2, weight_decay=0.01)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    seed = scao.SCAO(m_b.parameters(), **kw)
    _pair_run(m_a, ours, m_b, seed, width=24)
  assert _maxdiff(m_a, m_b) < 1e-4
  m_c = _mlp(width=24)
  adamw = torch.optim.AdamW(m_c.parameters(), lr=1e-2, weight_decay=0.01)
  _pair_run(m_c, adamw, _mlp(width=24), torch.optim.SGD(_mlp(width=24).parameters(), lr=0.0),
            width=24)
  assert _maxdiff(m_a, m_c) > 1e-3  # the preconditioned phase changed the trajectory


def test_oadamw_core_matches_optimi_stable_adamw_and_lr_is_positional():
  optimi = pytest.importorskip("optimi")
  m_a, m_b = _mlp(), _mlp()
  ours = torch_bridge.OAdamW(m_a, 1e-2, muon="off")  # 2nd positional argument is lr
  seed = optimi.StableAdamW(m_b.parameters(), lr=1e-2, foreach=False, triton=False)
  assert ours.param_groups[0]["lr"] == 1e-2
  _pair_run(m_a, ours, m_b, seed)
  assert _maxdiff(m_a, m_b) < 1e-5
  # the default sends the hidden (out, in) weight to real Muon, read in torch's layout
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import stax  # pylint: disable=g-import-not-at-top
  default = torch_bridge.OAdamW(_mlp(), 1e-2)
  assert "dimension_numbers" not in default.param_groups[0]
  assert default._layout.kwarg == "dimension_numbers"  # pylint: disable=protected-access
  rows = default.describe().by_path
  assert rows["0.weight"].rule == "muon" and rows["2.bias"].rule != "muon"
  d = torch_bridge.torch_dimension_numbers((16, 128), "0.weight")
  assert (d.reduction_axis, d.output_axis) == (1, 0)
  dims = lambda name, x: torch_bridge.torch_dimension_numbers(x.shape, name)
  labels = stax.oadamw_labels({"0": {"weight": jnp.zeros((16, 128))}, "2": {"bias": jnp.zeros(4)}},
                              dimension_numbers=dims)
  assert labels == {"0": {"weight": "muon"}, "2": {"bias": "adam"}}


@pytest.mark.parametrize("cls", ["STAM", "STAMLite"])
def test_stam_dropins_equal_the_jax_factory(cls):
  """The seed is JAX-only: the drop-in equals stax.stam / stam_lite on the same tensors."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import stax  # pylint: disable=g-import-not-at-top
  from tests.bridge_reference import per_parameter_step  # pylint: disable=g-import-not-at-top
  m = _mlp(width=8)
  names = [n for n, _ in m.named_parameters()]
  p = {n: jnp.asarray(q.detach().numpy()) for n, q in m.named_parameters()}
  opt = getattr(torch_bridge, cls)(m, lr=1e-2)
  factory = stax.stam if cls == "STAM" else stax.stam_lite
  traced, static = opt._hyperparams(0)  # pylint: disable=protected-access
  tx = factory(**dict(static), **{k: jnp.asarray(v, jnp.float32) for k, v in traced.items()})
  states = {n: tx.init({n: p[n]}) for n in names}
  ref = per_parameter_step(tx, names)

  gen = torch.Generator().manual_seed(3)
  for _ in range(12):
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
    opt.zero_grad()
    F.mse_loss(m(x), y).backward()
    g = {n: jnp.asarray(q.grad.numpy()) for n, q in m.named_parameters()}
    opt.step()
    p, states = ref(p, states, g)
  for n, q in m.named_parameters():
    torch.testing.assert_close(q.detach(), torch.from_numpy(np.array(p[n])), rtol=0,
                               atol=1e-6)


class _TinyLM(torch.nn.Module):
  """An embedding, a hidden Linear, a LayerNorm and a head: nanoGPT's parameter kinds."""

  def __init__(self):
    super().__init__()
    torch.manual_seed(0)
    self.wte = torch.nn.Embedding(32, 16)
    self.fc = torch.nn.Linear(16, 16)
    self.ln = torch.nn.LayerNorm(16)
    self.head = torch.nn.Linear(16, 32)

  def forward(self, ids):
    return self.head(self.ln(torch.relu(self.fc(self.wte(ids)))))


def _nanogpt_groups(model, named):
  """nanoGPT's ``configure_optimizers`` groups: decaying ``ndim >= 2`` tensors, then the rest
  with no decay (Hugging Face's Trainer builds its groups the same way, of bare tensors)."""
  ps = list(model.named_parameters())
  pick = lambda keep: [(n, p) if named else p for n, p in ps if keep(p)]
  return [{"params": pick(lambda p: p.dim() >= 2), "weight_decay": 0.1},
          {"params": pick(lambda p: p.dim() < 2), "weight_decay": 0.0}]


def _lm_steps(model, opt, steps=3):
  g = torch.Generator().manual_seed(3)
  for _ in range(steps):
    ids = torch.randint(0, 32, (4, 8), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()


@pytest.mark.parametrize("cls", ["OAdamW", "STAC", "TurboAdam", "Optimizer"])
def test_param_groups_of_bare_tensors_take_their_names_from_model(cls):
  """``model=`` names bare tensors in param groups (nanoGPT's and Hugging Face's Trainer's
  groups) from the model and gives its layout: the optimizer equals the one built from the
  same groups of ``(name, tensor)`` pairs, step for step. Without it OAdamW put the embedding
  under Muon and STAC counted modules by group (the LayerNorm, in the second group, was the
  AdamW cap instead of the head)."""
  make = {"OAdamW": lambda ps, **k: torch_bridge.OAdamW(ps, lr=1e-2, **k),
          "STAC": lambda ps, **k: torch_bridge.STAC(ps, lr=1e-2, last_n_modules=1, **k),
          "TurboAdam": lambda ps, **k: torch_bridge.TurboAdam(ps, lr=1e-2,
                                                              min_m_compress_elements=256,
                                                              min_v_compress_elements=256, **k),
          "Optimizer": lambda ps, **k: torch_bridge.Optimizer(ps, _stax().oadamw, lr=1e-2, **k)
          }[cls]
  m_bare, m_named = _TinyLM(), _TinyLM()
  bare = make(_nanogpt_groups(m_bare, named=False), model=m_bare)
  if cls == "STAC":
    # named pairs are counted by group too: the model itself is the reference (its biases and
    # norms do not decay by default, as in the groups)
    named = make(m_named, weight_decay=0.1)
    cap = lambda o: {g["module_names"] for g in o.param_groups if g["stac_role"] == "adamw"}
    assert cap(bare) == cap(named) == {("head",)}
    assert cap(make(_nanogpt_groups(_TinyLM(), named=False))) == {("param_6",)}  # a bias
  else:
    named = make(_nanogpt_groups(m_named, named=True), **(
        {"layout_fn": torch_bridge.ModuleLayout(m_named, embeddings=cls == "Optimizer")}
        if cls != "TurboAdam" else {"layout_fn": torch_bridge.ModuleLayout(m_named)}))
  d_bare, d_named = bare.describe(), named.describe()
  assert sorted((r.path, r.rule, r.matrix) for r in d_bare) == sorted(
      (r.path, r.rule, r.matrix) for r in d_named)
  if cls == "OAdamW":
    assert d_bare.by_path["wte.weight"].rule == "adam"
    unnamed = torch_bridge.OAdamW(_nanogpt_groups(_TinyLM(), named=False), lr=1e-2).describe()
    assert unnamed.by_path["param_0"].rule == "muon"      # the embedding, without model=
  if cls != "STAC":
    assert [g["weight_decay"] for g in bare.param_groups] == [0.1, 0.0]
  _lm_steps(m_bare, bare)
  _lm_steps(m_named, named)
  assert _maxdiff(m_bare, m_named) == 0.0
  with pytest.raises(ValueError, match="position 0 .* not a parameter"):
    make([torch.nn.Parameter(torch.zeros(2, 2))], model=m_bare)
  with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
    make([next(m_bare.parameters())], model="m")


def _stax():
  import stax
  return stax


def test_a_compiled_model_is_grouped_as_the_model():
  """``OAdamW(torch.compile(model))`` (names ``_orig_mod.*``) groups every parameter as
  ``OAdamW(model)``: the top-level ``output`` head and the embedding in Adam, the hidden layer
  in Muon (the wrapped head had gone to Muon)."""
  class LM(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.tok_embeddings = torch.nn.Embedding(32, 16)
      self.layer = torch.nn.Linear(16, 16)
      self.output = torch.nn.Linear(16, 32, bias=False)

    def forward(self, x):
      return self.output(torch.relu(self.layer(self.tok_embeddings(x))))

  m = LM()
  plain = {r.path: r.rule for r in torch_bridge.OAdamW(m).describe()}
  compiled = {r.path.removeprefix("_orig_mod."): r.rule
              for r in torch_bridge.OAdamW(torch.compile(m, backend="eager")).describe()}
  assert compiled == plain
  assert plain["output.weight"] == "adam" and plain["layer.weight"] == "muon"
